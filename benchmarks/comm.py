"""Bytes moved per step and per-rank memory for each optimizer x backend at 2 ranks (not a timed test).

    python benchmarks/comm.py [--optims adamw,sam,muon,adafactor,lion] [--backends ddp,ddp-owned,fsdp2,zero1,...]

The driver starts ``torchrun --nproc_per_node 2 benchmarks/comm.py --worker B O`` per case. A worker builds a
Llama (hidden 128, 2 layers, vocab 512; fp32) on the backend through flatlm's own setup, runs 3 steps
(2 micro-batches per rank and step) and counts, during steps 2-3, the tensor bytes every rank passes to each
torch.distributed collective (all-gather and reduce-scatter counted at the full, unsharded size; all-to-all
at what is sent). It also measures this rank's parameter, gradient and optimizer-state bytes at step time.

The table compares with the minimum a backend needs, in units of P = the model's fp32 parameter bytes: DDP all-
reduces the gradients once per forward/backward pass (1 P; SAM 2 P); ZeRO-1/2 reduce the gradients and all-gather
the updated weights (2 P); FSDP2 and ZeRO-3 gather the weights for the forward and again for the backward of every
micro-batch and reduce-scatter the gradients once per pass (2 micro-batches: 5 P; SAM 10 P); ownership ZeRO-1 on DDP
all-reduces and broadcasts (2 P). Beyond that, SAM-global adds one scalar all-reduce, Muon (sharded) two all-to-alls
of its matrices (this rank's 1/N of each, in bf16, out and back: 4/N bytes per matrix element; under DDP one bf16
broadcast of each result by its owner), Adafactor n + m + 2 numbers per matrix. Memory is compared with the ZeRO
paper's per-rank formulas for fp32 training, K = optimizer state bytes per parameter (AdamW 8): DDP 4+4+K, ZeRO-1
4+4+K/N, ZeRO-2 4+(4+K)/N, ZeRO-3 and FSDP2 (4+4+K)/N bytes per parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["ddp", "ddp-owned", "fsdp2", "zero1", "zero2", "zero3"]
OPTIMS = ["adamw", "sam", "lion", "muon", "adafactor"]
MICRO_BATCHES = 2  # per rank and step
WORLD = 2
GRAD_PASSES = {"ddp": 1, "ddp-owned": 1, "fsdp2": 1, "zero1": 1, "zero2": 1, "zero3": 1}
WEIGHT_MOVES = {"ddp": 0, "ddp-owned": 1, "fsdp2": 2, "zero1": 1, "zero2": 1, "zero3": 2}
COLLECTIVES = (
    "all_reduce",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_gather_single",  # FSDP2 (torch 2.13)
    "reduce_scatter_single",
    "_all_gather_base_coalesced",  # DeepSpeed ZeRO-3's coalesced parameter gathers
    "all_gather_coalesced",
    "all_reduce_coalesced",
    "all_to_all_single",
    "broadcast",
    "all_gather",
    "reduce_scatter",
    "_all_gather_base",
    "_reduce_scatter_base",
)


def _nbytes(x: Any) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, list | tuple):
        return sum(_nbytes(t) for t in x)
    return 0


class Counter:
    """Wraps torch.distributed's collectives; counts bytes per op while ``on``."""

    def __init__(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.on = False
        self.inside = 0
        self.bytes: dict[str, int] = defaultdict(int)
        for name in COLLECTIVES:
            fn = getattr(c10d, name, None) or getattr(dist, name, None)
            if fn is None:
                continue
            wrapped = self._wrap(name, fn)
            for namespace in (dist, c10d):
                if getattr(namespace, name, None) is fn:
                    setattr(namespace, name, wrapped)

    def _wrap(self, name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.on and not self.inside:  # count the outermost call (aliases call each other)
                if name == "all_to_all_single":  # (output, input, ...): what this rank sends
                    size = _nbytes(args[1] if len(args) > 1 else kwargs.get("input"))
                else:  # gathers and reduce-scatters at their full size, all-reduce and broadcast as given
                    size = max([_nbytes(a) for a in (*args[:2], *kwargs.values())] or [0])
                self.bytes[name.strip("_").replace("_base", "").replace("_coalesced", "")] += size
            self.inside += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside -= 1

        return counted


def worker(backend: str, optim: str, out: Path) -> None:
    counter = Counter()  # before flatlm imports torch.distributed functions by name
    import torch
    import torch.distributed as dist

    from flatlm.config import load_config
    from flatlm.models import build_model, model_config
    from flatlm.optim.state_size import optimizer_state_bytes
    from flatlm.parallel import environment
    from flatlm.parallel.collectives import local
    from flatlm.parallel.distributed import init_process_group, resolve_backend
    from flatlm.train.backend import setup_parallel
    from flatlm.train.step import train_step

    env = environment()
    overrides = {
        "parallel.backend": backend.removesuffix("-owned"),
        "parallel.shard_optimizer_state": backend == "ddp-owned",
        "optim.name": optim,
        "optim.lr": 1e-3,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 2,
        **({"optim.hparams.relative_step": False} if optim == "adafactor" else {}),
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    cfg = cfg.model_copy(update={"parallel": resolve_backend(cfg.parallel, env)})
    device = torch.device("cpu")
    init_process_group(env, device)
    torch.manual_seed(0)
    arch = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
    model = build_model(model_config("tiny", 512, {**arch, "num_key_value_heads": 4}), seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    muon_elements = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n)
    muon_elements -= model.lm_head.weight.numel()
    parallel, optimizer, groups = setup_parallel(model, cfg, device, accum=MICRO_BATCHES)
    if parallel.backend == "ddp":  # DDP's reducer calls C++ directly; this hook all-reduces through Python
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        parallel.forward_module.register_comm_hook(None, allreduce_hook)
    params = [p for g in groups for p in g["params"]]
    memory: dict[str, int] = {}
    step_fn = parallel.step

    def measuring_step(opt: Any, ps: list, max_norm: float) -> float:
        if parallel.backend.startswith("zero"):
            from flatlm.parallel.zero_views import pending_grads

            memory["grads"] = sum(_nbytes(g) for g in pending_grads(parallel.engine))
        else:
            memory["grads"] = sum(_nbytes(local(p.grad)) for p in ps if p.grad is not None)
        return step_fn(opt, ps, max_norm)

    parallel.step = measuring_step  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(env.rank)
    for step in range(3):
        counter.on = step > 0
        batches = []
        for _ in range(MICRO_BATCHES):
            tokens = torch.randint(0, 512, (2, 65), generator=gen)
            batches.append((tokens[:, :-1], tokens[:, 1:]))
        train_step(parallel, optimizer, batches, params, grad_clip=1.0)
    counter.on = False
    if parallel.backend == "zero3":
        weights = sum(p.ds_tensor.numel() * 4 for p in model.parameters())
    else:
        weights = sum(_nbytes(local(p)) for p in model.parameters())
    if parallel.backend.startswith("zero"):
        from flatlm.parallel.zero_views import flat_partitions

        memory["fp32_master"] = sum(_nbytes(f) for f in flat_partitions(parallel.engine))
    memory["weights"] = weights
    memory["optimizer_state"] = optimizer_state_bytes(optimizer)
    if env.rank == 0:
        result = {
            "backend": backend,
            "optim": optim,
            "param_bytes": 4 * n_params,
            "muon_elements": muon_elements,
            "bytes_per_step": {k: v / 2 for k, v in counter.bytes.items()},
            "memory": memory,
        }
        out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads occasionally abort it after the work is done


def expected_bytes(backend: str, optim: str, param_bytes: int, muon_elements: int) -> float:
    """The minimum tensor bytes per rank and step (see the module docstring)."""
    passes = 2 if optim == "sam" else 1
    grads = param_bytes * passes * GRAD_PASSES[backend]
    # FSDP2 / ZeRO-3 gather the weights for the forward and the backward of every micro-batch (2 per rank here)
    weights = param_bytes * WEIGHT_MOVES[backend] * (passes * MICRO_BATCHES if backend in ("fsdp2", "zero3") else 1)
    extra = 8 if optim == "sam" and backend != "ddp" and backend != "ddp-owned" else 0
    if optim == "muon" and backend in ("fsdp2", "zero1", "zero2", "zero3"):
        extra += 2 * 2 * muon_elements / WORLD  # this rank's 1/N of each matrix, in bf16, out and back
    if optim == "muon" and backend == "ddp":
        extra += 2 * muon_elements  # each result broadcast once by its owner, in bf16
    return grads + weights + extra


def zero_formula(backend: str, k: float, world: int) -> float:
    """ZeRO paper per-rank bytes per parameter for fp32 training (params 4, grads 4, state k)."""
    return {
        "ddp": 8 + k,
        "ddp-owned": 8 + k / world,
        "zero1": 8 + k / world,
        "zero2": 4 + (4 + k) / world,
        "zero3": (8 + k) / world,
        "fsdp2": (8 + k) / world,
    }[backend]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("BACKEND", "OPTIM", "OUT"))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--optims", default=",".join(OPTIMS))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], Path(args.worker[2]))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            for optim in args.optims.split(","):
                out = Path(tmp) / f"{backend}-{optim}.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                cmd += [str(Path(__file__).resolve()), "--worker", backend, optim, str(out)]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if r.returncode != 0:
                    reason = next((ln for ln in reversed(r.stderr.splitlines()) if "error" in ln.lower()), "failed")
                    print(f"{backend:9} {optim:9} skipped: {reason.strip()[:150]}", flush=True)
                    continue
                rows.append(json.loads(out.read_text()))
                _print_row(rows[-1], header=len(rows) == 1)


def _print_row(row: dict[str, Any], header: bool) -> None:
    p = row["param_bytes"]
    if header:
        print(f"# 2 ranks, fp32, P = {p / 1e6:.2f} MB of parameters; bytes per rank and step, in P")
        print(
            f"{'backend':9} {'optim':9} {'all_red':>7} {'gather':>7} {'red_sc':>7} {'a2a':>7} {'bcast':>7} "
            f"{'total':>7} {'minimum':>7} {'ratio':>6} | {'weights':>7} {'grads':>6} {'state':>6} "
            f"{'master':>6} {'sum B/p':>7} {'ZeRO':>6}"
        )
    b = row["bytes_per_step"]
    gather = sum(v for k, v in b.items() if k.startswith("all_gather"))
    scatter = sum(v for k, v in b.items() if k.startswith("reduce_scatter"))
    total = sum(b.values())
    minimum = expected_bytes(row["backend"], row["optim"], p, row["muon_elements"])
    mem = row["memory"]
    n = p / 4
    per_param = (mem["weights"] + mem["grads"] + mem["optimizer_state"] + mem.get("fp32_master", 0)) / n
    k = {"adamw": 8, "sam": 8, "lion": 4, "muon": 4}.get(row["optim"])
    formula = f"{zero_formula(row['backend'], k, 2):6.2f}" if k is not None else f"{'-':>6}"
    print(
        f"{row['backend']:9} {row['optim']:9} {b.get('all_reduce', 0) / p:7.3f} {gather / p:7.3f} "
        f"{scatter / p:7.3f} {b.get('all_to_all_single', 0) / p:7.3f} {b.get('broadcast', 0) / p:7.3f} "
        f"{total / p:7.3f} {minimum / p:7.3f} {total / minimum:6.2f} | {mem['weights'] / n:7.2f} "
        f"{mem['grads'] / n:6.2f} {mem['optimizer_state'] / n:6.2f} {mem.get('fp32_master', 0) / n:6.2f} "
        f"{per_param:7.2f} {formula}",
        flush=True,
    )


if __name__ == "__main__":
    main()
