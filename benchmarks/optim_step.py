"""Optimizer step time against references, one process, interleaved; printed as ratios.

    python benchmarks/optim_step.py [--hidden 512 --layers 8] [--repeats 9] [--only lion,adamw] [--threads N]

Parameters are the tensors of a Llama (hidden 512, 8 layers, 4k vocab: ~30M parameters by default)
with fixed random gradients. For each case both optimizers get their own copy of the parameters, are
warmed up, then timed alternately (flatlm, reference, flatlm, ...) and the medians compared. Also
printed: optimizer-state bytes per parameter and the memory bandwidth the step achieves, counting
the bytes it must move: read parameter and gradient, write parameter, read and write its state
(``4 * 3 * numel + 2 * state_bytes`` for fp32).

Cases come from ``benchmarks/optim_cases/<name>.py``: ``cases()`` yields (label, make_flatlm,
make_reference) and, for wrappers measured against their base step, ``overhead_cases()`` yields
(label, setup_own_work, setup_base_step) returning zero-argument callables.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import optim_cases
from benchmarks.optim_cases.common import llama_shapes
from flatlm.optim.state_size import optimizer_state_bytes


def make_params(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        p.grad = torch.randn(shape, generator=g) * 1e-3
        params.append(p)
    return params


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(a: Callable[[], object], b: Callable[[], object], repeats: int, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_time(a))
        tb.append(_time(b))
    return statistics.median(ta), statistics.median(tb)


def run(args: argparse.Namespace) -> None:
    shapes = llama_shapes(args.hidden, args.layers, args.vocab)
    numel = sum(torch.Size(s).numel() for s in shapes)
    cpu = platform.processor() or platform.machine()
    print(f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}: {numel / 1e6:.1f}M params")
    header = f"{'case':<42} {'flatlm ms':>10} {'ref ms':>9} {'ratio':>6} {'state B/p':>9} {'GB/s':>6}"
    print(header)
    print("-" * len(header))
    for mod_info in pkgutil.iter_modules(optim_cases.__path__):
        if mod_info.name == "common" or (args.only and mod_info.name not in args.only.split(",")):
            continue
        module = importlib.import_module(f"benchmarks.optim_cases.{mod_info.name}")
        for label, make_ours, make_ref in getattr(module, "cases", list)():
            ours_p, ref_p = make_params(shapes), make_params(shapes)
            ours, ref = make_ours(ours_p), make_ref(ref_p)
            t_ours, t_ref = interleaved(ours.step, ref.step, args.repeats)
            state = optimizer_state_bytes(ours)
            gbps = (4 * 3 * numel + 2 * state) / t_ours / 1e9
            print(
                f"{label:<42} {t_ours * 1e3:>10.1f} {t_ref * 1e3:>9.1f} {t_ours / t_ref:>6.2f} "
                f"{state / numel:>9.2f} {gbps:>6.1f}"
            )
        for label, setup_own, setup_base in getattr(module, "overhead_cases", list)():
            own, base = setup_own(make_params(shapes)), setup_base(make_params(shapes))
            t_own, t_base = interleaved(own, base, args.repeats)
            print(f"{label:<42} {t_own * 1e3:>10.1f} {t_base * 1e3:>9.1f} {t_own / t_base:>6.2f} {'':>9} {'':>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--only", default="", help="comma-separated case modules, e.g. adamw,lion")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
