"""Lion step time: flatlm's Lion against lion-pytorch's for-loop and foreach classes (use_triton=False).

``cases()`` is read by the shared driver (benchmarks/optim_step.py). Run this file alone for a quick interleaved
timing on the parameters of a Llama with hidden 512, intermediate 1376, 8 layers (~25.3M parameters, plain
tensors; ``--vocab N`` adds an untied embedding and head):

    python -m benchmarks.optim_cases.lion [--repeats 21] [--threads N] [--vocab 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
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


def llama_shapes(hidden: int = 512, intermediate: int = 1376, layers: int = 8, vocab: int = 0) -> list[tuple]:
    """Shapes of a Llama's parameters: q, k, v, o, gate, up, down, two norms per layer; final norm; embeddings."""
    per_layer = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate), (hidden,), (hidden,)]
    embeddings = [(vocab, hidden), (vocab, hidden)] if vocab else []
    return embeddings + per_layer * layers + [(hidden,)]


def _params_with_grads(shapes: list[tuple], seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


def _state_bytes_per_param(opt: Optimizer) -> float:
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    size = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return size / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--vocab", type=int, default=0, help="add an untied embedding and LM head of this vocabulary")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = _params_with_grads(llama_shapes(vocab=args.vocab))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; {sum(p.numel() for p in params) / 1e6:.1f}M")
    for label, make_ours, make_ref in cases():
        ours, ref = make_ours(params), make_ref(params)
        ours.step(), ref.step()  # state created outside the timing
        times: dict[str, list[float]] = {"ours": [], "ref": []}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
            for name, opt in (("ref", ref), ("ours", ours)):
                t0 = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - t0)
        mo, mr = statistics.median(times["ours"]), statistics.median(times["ref"])
        paired = statistics.median(o / r for o, r in zip(times["ours"], times["ref"], strict=True))
        print(
            f"{label}: flatlm {mo * 1e3:.1f} ms, reference {mr * 1e3:.1f} ms, ratio {mo / mr:.2f} "
            f"(median of paired ratios {paired:.2f}); state bytes/param {_state_bytes_per_param(ours):.1f} "
            f"vs {_state_bytes_per_param(ref):.1f}"
        )
        del ours, ref


if __name__ == "__main__":
    main()
