"""What the flatness measures cost against a plain gradient, on the default job's model (``model.name=tiny``), one
process, interleaved, printed as ratios: a Hessian-vector product (double backward through SDPA's math kernel, what
``flatlm landscape`` runs) and a gradient under the math kernel, each against a gradient under SDPA's default kernel
(what training runs). A power iteration, Lanczos step or Hutchinson sample is one HVP; a SAM-sharpness step is one
gradient; a landscape point is one forward.

    python benchmarks/hessian_cost.py [--batch 16 --seq-len 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatlm.analysis.objective import Objective, random_vector
from flatlm.data.batch import Batch
from flatlm.models import build_model, model_config
from flatlm.train.step import token_losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(model_config("tiny", args.vocab, {}), seed=0).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1))
    batch = Batch(ids[:, :-1], ids[:, 1:])

    def terms() -> Iterator[torch.Tensor]:
        losses = token_losses(model, batch, bf16=False)
        yield losses.sums.sum() / losses.counts.sum()

    obj = Objective(params=[p for p in model.parameters() if p.requires_grad], terms=terms)
    v = random_vector(obj.params, torch.Generator().manual_seed(0))
    math = lambda: sdpa_kernel([SDPBackend.MATH])  # noqa: E731
    cases: dict[str, tuple[Callable[[], contextlib.AbstractContextManager], Callable[[], object]]] = {
        "gradient (default SDPA)": (contextlib.nullcontext, obj.gradient),
        "gradient (math SDPA)": (math, obj.gradient),
        "hvp (math SDPA)": (math, lambda: obj.hvp(v)),
        "loss (math SDPA)": (math, obj.loss),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, (context, fn) in cases.items():
            with context():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["gradient (default SDPA)"][1:])
    params = sum(p.numel() for p in obj.params)
    print(f"tiny model, {params:,} parameters, batch {args.batch} x {args.seq_len}, {torch.get_num_threads()} threads")
    for name, values in times.items():
        median = statistics.median(values[1:])
        print(f"{name:26s} {median * 1e3:8.1f} ms   {median / base:5.2f}x a training gradient")


if __name__ == "__main__":
    main()
