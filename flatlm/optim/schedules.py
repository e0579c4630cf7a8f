"""Learning-rate schedules as multipliers m(t) of each group's peak lr (a ``LambdaLR``).

One multiplier scales every parameter group in proportion, so a Muon group and its AdamW group (or a
SAM wrapper and its base, which share groups) move together. ``t`` counts optimizer steps from 0;
all schedules start with a linear warmup ``m(t) = (t + 1) / W`` for ``t < W`` (``W = warmup_steps``),
then, with ``T = total_steps``, ``r = min_lr_ratio`` and ``p = (t - W) / (T - W)`` in [0, 1]:

    constant  m = 1
    cosine    m = r + (1 - r) (1 + cos(pi p)) / 2                     (Loshchilov & Hutter 2017)
    linear    m = 1 - (1 - r) p
    wsd       m = 1 until the last ``decay_fraction`` of the steps, then linear to r
              (warmup-stable-decay; Hu et al. 2024, MiniCPM)
    step      m = gamma ** floor((t - W) / step_size)                 (no lower bound)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from flatlm.errors import FlatlmError, did_you_mean

Multiplier = Callable[[int], float]


def _with_warmup(warmup_steps: int, after: Multiplier) -> Multiplier:
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return after(step)

    return multiplier


def _progress(step: int, warmup_steps: int, total_steps: int) -> float:
    return min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def constant(total_steps: int, warmup_steps: int = 0) -> Multiplier:
    del total_steps
    return _with_warmup(warmup_steps, lambda t: 1.0)


def cosine(total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> Multiplier:
    def after(t: int) -> float:
        p = _progress(t, warmup_steps, total_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))

    return _with_warmup(warmup_steps, after)


def linear(total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> Multiplier:
    return _with_warmup(warmup_steps, lambda t: 1.0 - (1.0 - min_lr_ratio) * _progress(t, warmup_steps, total_steps))


def wsd(total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0, decay_fraction: float = 0.2) -> Multiplier:
    if not 0.0 <= decay_fraction <= 1.0:
        raise FlatlmError(f"wsd decay_fraction must be in [0, 1], got {decay_fraction}")
    decay_steps = round(decay_fraction * (total_steps - warmup_steps))
    decay_start = total_steps - decay_steps

    def after(t: int) -> float:
        if t < decay_start or decay_steps == 0:
            return 1.0
        return 1.0 - (1.0 - min_lr_ratio) * min(1.0, (t - decay_start + 1) / decay_steps)

    return _with_warmup(warmup_steps, after)


def step(total_steps: int, warmup_steps: int = 0, step_size: int = 1000, gamma: float = 0.1) -> Multiplier:
    del total_steps
    if step_size <= 0 or gamma <= 0:
        raise FlatlmError(f"step schedule needs step_size > 0 and gamma > 0, got {step_size} and {gamma}")
    return _with_warmup(warmup_steps, lambda t: gamma ** ((t - warmup_steps) // step_size))


SCHEDULES: dict[str, Callable[..., Multiplier]] = {
    "constant": constant,
    "cosine": cosine,
    "linear": linear,
    "wsd": wsd,
    "step": step,
}


def schedule_arguments(name: str) -> list[str]:
    """The keyword arguments schedule ``name`` takes (``total_steps`` first)."""
    _check_name(name)
    return list(inspect.signature(SCHEDULES[name]).parameters)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, **kw: float) -> LambdaLR:
    """A ``LambdaLR`` for schedule ``name``; ``kw`` are its arguments (total_steps, warmup_steps, ...)."""
    valid = schedule_arguments(name)
    unknown = sorted(set(kw) - set(valid))
    if unknown:
        raise FlatlmError(
            f"schedule {name!r} takes no argument {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}"
        )
    if "total_steps" not in kw:
        raise FlatlmError(f"schedule {name!r} needs total_steps")
    return LambdaLR(optimizer, SCHEDULES[name](**kw))


def _check_name(name: str) -> None:
    if name not in SCHEDULES:
        raise FlatlmError(
            f"unknown schedule {name!r}{did_you_mean(name, SCHEDULES)}; valid schedules: {', '.join(SCHEDULES)}"
        )
