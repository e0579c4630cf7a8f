"""Adafactor step time: flatlm's fast path against transformers' Adafactor, and against torch.optim.Adafactor.

``cases()`` is read by the shared driver (benchmarks/optim_step.py). Run this file alone for a quick interleaved
timing on the Llama-shaped parameter set (hidden 512, intermediate 1376, 8 layers: ~25.3M parameters). It prints
medians of wall time and of process CPU time (the latter is steadier on a shared machine; with 1 thread it is the
step's own compute):

    python -m benchmarks.optim_cases.adafactor [--repeats 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
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


def llama_shapes(hidden: int = 512, intermediate: int = 1376, layers: int = 8) -> list[tuple[int, ...]]:
    """Shapes of a Llama's decoder parameters (q, k, v, o, gate, up, down, two norms per layer; final norm)."""
    per_layer = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate), (hidden,), (hidden,)]
    return per_layer * layers + [(hidden,)]


def _params_with_grads(shapes: list[tuple[int, ...]], seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


def state_bytes(opt: Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = llama_shapes()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(shapes)} tensors, {n_params / 1e6:.1f}M")
    for label, make_ours, make_ref in cases():
        ours, ref = make_ours(_params_with_grads(shapes, 0)), make_ref(_params_with_grads(shapes, 0))
        wall: dict[str, list[float]] = {"ours": [], "ref": []}
        cpu: dict[str, list[float]] = {"ours": [], "ref": []}
        for i in range(args.warmup + args.repeats):
            for name, opt in (("ours", ours), ("ref", ref)) if i % 2 else (("ref", ref), ("ours", ours)):
                w0, c0 = time.perf_counter(), time.process_time()
                opt.step()
                if i >= args.warmup:
                    wall[name].append(time.perf_counter() - w0)
                    cpu[name].append(time.process_time() - c0)
        w_ours, w_ref = statistics.median(wall["ours"]), statistics.median(wall["ref"])
        c_ours, c_ref = statistics.median(cpu["ours"]), statistics.median(cpu["ref"])
        print(
            f"{label:40s} wall ours {w_ours * 1e3:6.1f} ref {w_ref * 1e3:6.1f} ms ratio {w_ours / w_ref:.2f} | "
            f"cpu ours {c_ours * 1e3:6.1f} ref {c_ref * 1e3:6.1f} ms ratio {c_ours / c_ref:.2f} | "
            f"state B/param ours {state_bytes(ours) / n_params:.3f} ref {state_bytes(ref) / n_params:.3f}"
        )


if __name__ == "__main__":
    main()
