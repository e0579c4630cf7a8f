"""Parameter-group policy: which parameters get weight decay (the model never decides this).

Rules are regexes over fully qualified parameter names; the first match wins and every parameter
lands in exactly one group. Norm weights, biases and embeddings (including the LM head when it
is tied to them) get no weight decay; everything else (matrices) does.

``muon_param_groups`` splits the same way for Muon: the 2-D hidden matrices (attention, MLP) go to Muon; the
token embedding, the LM head, norms and biases go to AdamW inside the same optimizer (Jordan; Moonlight).
"""

from __future__ import annotations

import re
from typing import Any

import torch

NO_DECAY_PATTERNS = (r"norm", r"\.bias$", r"embed", r"wte", r"wpe")
HEAD_PATTERNS = (r"lm_head",)  # 2-D, but an input/output layer: AdamW under Muon


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


def is_muon_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D hidden weight: 2-D, decayed (not a norm, bias or embedding) and not the LM head."""
    return param.ndim == 2 and not is_no_decay(name, param) and not any(re.search(p, name) for p in HEAD_PATTERNS)


def muon_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Groups for ``flatlm.optim.muon.Muon``, each with ``use_muon`` and ``names``.

    ``muon``: 2-D hidden matrices, decayed. ``adamw_decay``: other decayed parameters (an untied LM head).
    ``adamw_no_decay``: token embedding (and a head tied to it), norms, biases, as in ``param_groups``.
    """
    groups: dict[str, dict[str, Any]] = {
        "muon": {"use_muon": True, "weight_decay": weight_decay},
        "adamw_decay": {"use_muon": False, "weight_decay": weight_decay},
        "adamw_no_decay": {"use_muon": False, "weight_decay": 0.0},
    }
    for g in groups.values():
        g.update(params=[], names=[])
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        decay = "adamw_no_decay" if is_no_decay(name, param) else "adamw_decay"
        key = "muon" if is_muon_matrix(name, param) else decay
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    if not groups["muon"]["params"]:
        raise ValueError(
            f"Muon needs at least one 2-D hidden weight matrix; {type(model).__name__} has none (only embeddings, "
            "the LM head, norms, biases or non-2-D weights). Use AdamW for this model."
        )
    return [{"name": key, **g} for key, g in groups.items() if g["params"]]
