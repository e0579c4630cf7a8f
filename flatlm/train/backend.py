"""Model + optimizer on the chosen backend: the order matters, so it lives in one place.

    fsdp2      fully_shard the model  -> param groups -> optimizer on the DTensor parameters
    ddp        param groups -> optimizer (ZeRO-1 by ownership if asked) -> DistributedDataParallel
    zero1-3    param groups -> client optimizer -> deepspeed.initialize (flatlm builds the DeepSpeed config)
    single     param groups -> optimizer

then the optimizers' reduction hooks are pointed at the collectives the backend needs (flatlm.parallel).
"""

from __future__ import annotations

from typing import Any

import torch

from flatlm.config import RunConfig
from flatlm.optim import build_optimizer, model_param_groups
from flatlm.parallel.backend import DDPParallel, Parallel, wrap_ddp
from flatlm.parallel.compat import check_parallel  # re-exported: train/loop.py and train/checks.py call it
from flatlm.parallel.fsdp2 import FSDP2Parallel, shard_fsdp2
from flatlm.parallel.hooks import OwnedParamsOptimizer, install_hooks


def setup_parallel(
    model: torch.nn.Module, cfg: RunConfig, device: torch.device, accum: int
) -> tuple[Parallel, torch.optim.Optimizer, list[dict[str, Any]]]:
    """Apply ``cfg.parallel.backend`` to ``model`` and build the optimizer on the resulting parameters."""
    check_parallel(cfg)
    backend = cfg.parallel.backend
    if backend == "fsdp2":
        shard_fsdp2(model, reshard_after_forward=cfg.parallel.reshard_after_forward, bf16=cfg.train.bf16)
    groups = model_param_groups(cfg.optim.name, model, cfg.optim.weight_decay, cfg.optim.hparams)
    step_wrapper = OwnedParamsOptimizer if cfg.parallel.shard_optimizer_state and backend == "ddp" else None
    optimizer = build_optimizer(cfg.optim.name, groups, step_wrapper=step_wrapper, lr=cfg.optim.lr, **cfg.optim.hparams)
    replica = cfg.sam.perturbation == "replica"
    if backend in ("zero1", "zero2", "zero3"):
        from flatlm.parallel.deepspeed import deepspeed_parallel

        parallel, optimizer = deepspeed_parallel(model, optimizer, cfg, accum)
    elif backend == "ddp":
        parallel = DDPParallel(model, wrap_ddp(model, device))
    elif backend == "fsdp2":
        parallel = FSDP2Parallel(model, cfg.parallel.reshard_after_forward)
    else:
        parallel = Parallel(backend, model, model)
    replicated = backend == "ddp" and not cfg.parallel.shard_optimizer_state  # whole state on every rank
    install_hooks(optimizer, grads_sharded=parallel.grads_sharded, replica_perturbation=replica, replicated=replicated)
    return parallel, optimizer, groups
