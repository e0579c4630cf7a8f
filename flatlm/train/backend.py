"""Model + optimizer on the chosen backend: the order matters, so it lives in one place.

    fsdp2      fully_shard the model  -> param groups -> optimizer on the DTensor parameters
    ddp        param groups -> optimizer (ZeRO-1 by ownership if asked) -> DistributedDataParallel
    zero1-3    param groups -> client optimizer -> deepspeed.initialize (flatlm builds the DeepSpeed config)
    single     param groups -> optimizer

What distribution the optimizer needs (global sums for SAM, Muon's gather -> Newton-Schulz -> scatter, Adafactor's
layout and partial-sum reduction, ownership) is decided by ``flatlm.parallel.layouts.distribution`` from the backend
and passed to ``build_optimizer``, which hands each constructor its part: nothing is patched onto an optimizer
after it is built. Under ZeRO the layout object given to the constructor is bound by the DeepSpeed backend once
``deepspeed.initialize`` has made the flat partitions.
"""

from __future__ import annotations

from typing import Any

import torch

from flatlm.config import RunConfig
from flatlm.optim import build_optimizer, model_param_groups
from flatlm.parallel.backend import DDPParallel, Parallel, wrap_ddp
from flatlm.parallel.compat import check_parallel  # re-exported: train/loop.py and train/checks.py call it
from flatlm.parallel.fsdp2 import FSDP2Parallel, shard_fsdp2
from flatlm.parallel.layouts import distribution


def setup_parallel(
    model: torch.nn.Module, cfg: RunConfig, device: torch.device, accum: int
) -> tuple[Parallel, torch.optim.Optimizer, list[dict[str, Any]]]:
    """Apply ``cfg.parallel.backend`` to ``model`` and build the optimizer on the resulting parameters."""
    check_parallel(cfg)
    backend = cfg.parallel.backend
    if backend == "fsdp2":
        shard_fsdp2(model, reshard_after_forward=cfg.parallel.reshard_after_forward, bf16=cfg.train.bf16)
    groups = model_param_groups(cfg.optim.name, model, cfg.optim.weight_decay, cfg.optim.hparams)
    injected = distribution(
        backend,
        shard_optimizer_state=cfg.parallel.shard_optimizer_state,
        replica_perturbation=cfg.sam.perturbation == "replica",
    )
    optimizer = build_optimizer(cfg.optim.name, groups, distribution=injected, lr=cfg.optim.lr, **cfg.optim.hparams)
    if backend in ("zero1", "zero2", "zero3"):
        from flatlm.parallel.deepspeed import deepspeed_parallel

        parallel, optimizer = deepspeed_parallel(model, optimizer, cfg, accum, layout=injected.layout)
    elif backend == "ddp":
        parallel = DDPParallel(model, wrap_ddp(model, device))
    elif backend == "fsdp2":
        parallel = FSDP2Parallel(model, cfg.parallel.reshard_after_forward)
    else:
        parallel = Parallel(backend, model, model)
    return parallel, optimizer, groups
