"""Learning-rate schedules as multipliers of each group's peak lr (``LambdaLR``), so one schedule
drives every parameter group in proportion.

cosine: linear warmup 0 -> 1 over ``warmup_steps``, then
    m(t) = r + (1 - r) * (1 + cos(pi * p)) / 2,  p = (t - warmup) / (total - warmup) in [0, 1],
where r is ``min_lr_ratio``; m(total) = r. constant: warmup, then 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from flatlm.errors import FlatlmError, did_you_mean


def _warmup(step: int, warmup_steps: int) -> float | None:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return None


def cosine(total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    def multiplier(step: int) -> float:
        w = _warmup(step, warmup_steps)
        if w is not None:
            return w
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def constant(total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 1.0) -> Callable[[int], float]:
    del total_steps, min_lr_ratio

    def multiplier(step: int) -> float:
        w = _warmup(step, warmup_steps)
        return 1.0 if w is None else w

    return multiplier


SCHEDULES: dict[str, Callable[..., Callable[[int], float]]] = {"cosine": cosine, "constant": constant}


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, **kw) -> LambdaLR:
    """A ``LambdaLR`` for schedule ``name``; ``kw`` are its arguments (total_steps, warmup_steps, ...)."""
    if name not in SCHEDULES:
        raise FlatlmError(
            f"unknown schedule {name!r}{did_you_mean(name, SCHEDULES)}; valid schedules: {', '.join(SCHEDULES)}"
        )
    return LambdaLR(optimizer, SCHEDULES[name](**kw))
