"""SAM family overhead: the wrapper's own work (perturb + restore) against the base step (fused torch AdamW).

The two forward/backward passes are the model's cost, not the optimizer's, so they are left out: two fixed random
gradient sets stand for the passes' outputs, and ``perturb`` and ``restore`` run back to back on them.
``overhead_cases()`` is read by the shared driver (benchmarks/optim_step.py). Run this file alone for interleaved
timings with both medians and minimums (the minimum is the figure least disturbed by other processes on a shared
machine):

    python -m benchmarks.optim_cases.sam [--repeats 31] [--threads N] [--vocab 0]

LookSAM is timed on its two kinds of step: a full SAM step (t mod k == 0: perturb + restore) and a reuse step
(t mod k != 0: ``perturb`` alone writes the final gradient and returns False); a k-step cycle costs one full
step plus k - 1 reuse steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
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


def llama_shapes(hidden: int = 512, intermediate: int = 1376, layers: int = 8, vocab: int = 0) -> list[tuple]:
    """q, k, v, o, gate, up, down and two norms per layer, the final norm, and an untied embedding/head if vocab."""
    per_layer = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate), (hidden,), (hidden,)]
    return ([(vocab, hidden)] * 2 if vocab else []) + per_layer * layers + [(hidden,)]


def make_params(shapes: list[tuple], seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        p.grad = torch.randn(shape, generator=g) * 1e-3
        params.append(p)
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--vocab", type=int, default=0, help="add an untied embedding and LM head of this vocabulary")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = llama_shapes(vocab=args.vocab)
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{numel / 1e6:.1f}M params in {len(shapes)} tensors"
    )
    ratios: dict[str, float] = {}
    for label, setup_own, setup_base in overhead_cases():
        own, base = setup_own(make_params(shapes)), setup_base(make_params(shapes))
        t_own, t_base = [], []
        for _ in range(args.repeats):  # interleaved: load from other processes hits both alike
            for fn, out in ((base, t_base), (own, t_own)):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        ratios[label] = med = statistics.median(t_own) / statistics.median(t_base)
        streams = next(v for k, v in STREAMS.items() if label.startswith(k)) / 7
        print(
            f"{label:<36} own {statistics.median(t_own) * 1e3:6.1f} ms (min {min(t_own) * 1e3:6.1f})  "
            f"AdamW {statistics.median(t_base) * 1e3:6.1f} ms (min {min(t_base) * 1e3:6.1f})  "
            f"ratio median {med:.2f}, min {min(t_own) / min(t_base):.2f}; streams {streams:.2f}"
        )
    full, reuse = ratios["looksam full step (1 in k)"], ratios["looksam reuse step (k-1 in k)"]
    print(f"looksam k=5 cycle, per step: ratio {(full + 4 * reuse) / 5:.2f}; streams {(15 + 4 * 5) / 5 / 7:.2f}")


if __name__ == "__main__":
    main()
