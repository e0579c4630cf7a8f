"""Adafactor step time: flatlm's fast path against transformers' Adafactor, and against torch.optim.Adafactor.

``cases()`` is read by the shared driver: ``python benchmarks/optim_step.py --only adafactor``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer
from transformers.optimization import Adafactor as HFAdafactor

from flatlm.optim.adafactor import Adafactor

Case = tuple[str, Callable[[list[Tensor]], Optimizer], Callable[[list[Tensor]], Optimizer]]


def cases() -> list[Case]:
    """(label, make flatlm optimizer, make reference optimizer) on the same parameters."""
    return [
        ("adafactor/transformers (relative step)", lambda ps: Adafactor(ps), lambda ps: HFAdafactor(ps)),
        (
            "adafactor/transformers (lr, beta1, wd)",
            lambda ps: Adafactor(ps, lr=1e-3, relative_step=False, beta1=0.9, weight_decay=0.1),
            lambda ps: HFAdafactor(ps, lr=1e-3, relative_step=False, beta1=0.9, weight_decay=0.1),
        ),
        (
            "adafactor/torch.optim (relative step)",
            lambda ps: Adafactor(ps),
            lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.0, foreach=True),
        ),
        (
            "adafactor per-tensor path/transformers",
            lambda ps: Adafactor(ps, foreach=False),
            lambda ps: HFAdafactor(ps),
        ),
    ]
