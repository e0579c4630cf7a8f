"""Parameter-group policy: which parameters get weight decay (the model never decides this).

Rules are regexes over fully qualified parameter names; the first match wins and every parameter
lands in exactly one group. Norm weights, biases and embeddings (including the LM head when it
is tied to them) get no weight decay; everything else (matrices) does.
"""

from __future__ import annotations

import re
from typing import Any

import torch

NO_DECAY_PATTERNS = (r"norm", r"\.bias$", r"embed", r"wte", r"wpe")


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or any(re.search(p, name) for p in NO_DECAY_PATTERNS)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups, ``decay`` and ``no_decay``; each keeps its parameters' names in ``names``."""
    decay: dict[str, torch.nn.Parameter] = {}
    no_decay: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        (no_decay if is_no_decay(name, param) else decay)[name] = param
    groups = [
        {"name": "decay", "params": list(decay.values()), "names": list(decay), "weight_decay": weight_decay},
        {"name": "no_decay", "params": list(no_decay.values()), "names": list(no_decay), "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
