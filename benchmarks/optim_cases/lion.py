"""Lion step time: flatlm's Lion against lion-pytorch's for-loop and foreach classes (use_triton=False).

``cases()`` is read by the shared driver: ``python benchmarks/optim_step.py --only lion``.
"""

from __future__ import annotations

from collections.abc import Callable

from lion_pytorch import Lion as RefLion
from lion_pytorch.foreach import Lion as RefForeachLion
from torch import Tensor
from torch.optim import Optimizer

from flatlm.optim.lion import Lion

Case = tuple[str, Callable[[list[Tensor]], Optimizer], Callable[[list[Tensor]], Optimizer]]
HP = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)


def cases() -> list[Case]:
    """(label, make flatlm optimizer, make reference optimizer) on the same parameters."""
    ref = lambda ps: RefLion(ps, **HP, use_triton=False)  # noqa: E731
    return [
        ("lion (default path)/lion-pytorch Lion", lambda ps: Lion(ps, **HP), ref),
        (
            "lion (default path)/lion-pytorch foreach Lion",
            lambda ps: Lion(ps, **HP),
            lambda ps: RefForeachLion(ps, **HP),
        ),
        ("lion foreach=False (eager)/lion-pytorch Lion", lambda ps: Lion(ps, **HP, foreach=False), ref),
        ("lion foreach=True/lion-pytorch Lion", lambda ps: Lion(ps, **HP, foreach=True), ref),
    ]
