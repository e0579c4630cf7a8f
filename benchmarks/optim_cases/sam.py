"""SAM family overhead: the wrapper's own work (perturb + restore) against the base step (fused torch AdamW).

The two forward/backward passes are the model's cost, not the optimizer's, so they are left out: two fixed random
gradient sets stand for the passes' outputs, and ``perturb`` and ``restore`` run back to back on them.
``overhead_cases()`` is read by the shared driver: ``python benchmarks/optim_step.py --only sam``.

LookSAM is timed on its two kinds of step: a full SAM step (t mod k == 0: perturb + restore) and a reuse step
(t mod k != 0: ``perturb`` alone writes the final gradient and returns False); a k-step cycle costs one full
step plus k - 1 reuse steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from flatlm.optim.asam import ASAM
from flatlm.optim.esam import ESAM
from flatlm.optim.gsam import GSAM
from flatlm.optim.looksam import LookSAM
from flatlm.optim.sam import SAM
from flatlm.optim.ssam import SSAM

OverheadCase = tuple[str, Callable[[list[Tensor]], Callable[[], Any]], Callable[[list[Tensor]], Callable[[], Any]]]


def _adamw(groups: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1, fused=True)


def base_step(params: list[Tensor]) -> Callable[[], Any]:
    """The reference: one fused AdamW step (state created before timing)."""
    opt = _adamw(params)
    opt.step()
    return opt.step


def own_work(make: Callable[[list[Tensor]], SAM], step_index: int = 0) -> Callable[[list[Tensor]], Callable[[], Any]]:
    """Setup of a callable doing one step's wrapper work: perturb (+ restore when it asks for pass 2).

    The two backward passes are stood in for by re-attaching two fixed gradient sets (pass 1's g and pass 2's g')
    to ``p.grad`` (a pointer assignment per parameter, no arithmetic). Variants scale gradients in place, so
    repeated calls drift their values; flushing denormals to zero keeps the drift from reaching x86's slow
    denormal path (the arithmetic is the same on any normal values).
    """

    def setup(params: list[Tensor]) -> Callable[[], Any]:
        torch.set_flush_denormal(True)
        opt = make(params)
        pass1 = [p.grad for p in params]
        pass2 = [g.flip(0).clone() for g in pass1]  # a different gradient, same shapes

        def work() -> None:
            for group in opt.param_groups:
                group["sam_step"] = step_index  # which kind of step (LookSAM's full or reuse step)
            for p, g in zip(params, pass1, strict=True):
                p.grad = g
            if opt.perturb():
                for p, g in zip(params, pass2, strict=True):
                    p.grad = g
                opt.restore()

        work()  # scratch buffers and state allocated outside the timing
        return work

    return setup


# Parameter-sized memory streams each case moves (see the modules' docstrings); a fused AdamW step moves 7.
STREAMS = {"sam": 8, "asam": 20, "ssam": 11, "gsam": 16, "looksam full": 15, "looksam reuse": 5, "esam": 1 + 7 * 0.6}


def overhead_cases() -> list[OverheadCase]:
    """(label, setup of the SAM variant's own work, setup of the base AdamW step) on the same parameter set."""
    return [
        ("sam (perturb+restore vs AdamW step)", own_work(lambda ps: SAM(ps, _adamw)), base_step),
        ("asam", own_work(lambda ps: ASAM(ps, _adamw)), base_step),
        ("ssam", own_work(lambda ps: SSAM(ps, _adamw)), base_step),
        ("gsam", own_work(lambda ps: GSAM(ps, _adamw)), base_step),
        ("looksam full step (1 in k)", own_work(lambda ps: LookSAM(ps, _adamw, k=5), 0), base_step),
        ("looksam reuse step (k-1 in k)", own_work(lambda ps: LookSAM(ps, _adamw, k=5), 1), base_step),
        ("esam beta=0.6", own_work(lambda ps: ESAM(ps, _adamw, beta=0.6)), base_step),
    ]
