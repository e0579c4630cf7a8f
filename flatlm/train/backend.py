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
from flatlm.errors import FlatlmError
from flatlm.optim import build_optimizer, model_param_groups
from flatlm.parallel.backend import Parallel, wrap_ddp
from flatlm.parallel.fsdp2 import FSDP2Parallel, shard_fsdp2
from flatlm.parallel.hooks import OwnedParamsOptimizer, install_hooks

REPLICA_BACKENDS = ("single", "ddp", "zero1", "zero2", "fsdp2")  # fsdp2: unsharded for the step


def check_parallel(cfg: RunConfig) -> None:
    """Combinations of backend and options that cannot run; each is one clear error (checked before any write)."""
    backend = cfg.parallel.backend
    if cfg.sam.perturbation == "replica" and backend not in REPLICA_BACKENDS:
        raise FlatlmError(
            f"sam.perturbation=replica perturbs each rank's whole weights by its own gradient, but {backend} "
            f"shards the weights; use sam.perturbation=global, or {', '.join(REPLICA_BACKENDS[1:])}"
        )
    if cfg.sam.perturbation == "replica" and backend == "fsdp2" and cfg.optim.name not in ("sam", "asam"):
        raise FlatlmError(
            f"sam.perturbation=replica under fsdp2 runs sam and asam (optim.name={cfg.optim.name}: its final "
            "gradient needs pass 1's gradient, which stays on each rank); use sam.perturbation=global or ddp"
        )
    if backend in ("zero1", "zero2", "zero3"):
        from flatlm.parallel.deepspeed import check_zero_optimizer

        check_zero_optimizer(cfg)


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
        parallel = Parallel(backend, model, wrap_ddp(model, device))
    elif backend == "fsdp2":
        parallel = FSDP2Parallel(model, cfg.parallel.reshard_after_forward)
        if replica and hasattr(optimizer, "swap_weights"):
            optimizer.swap_weights = False  # perturb the unsharded copies in place
    else:
        parallel = Parallel(backend, model, model)
    replicated = backend == "ddp" and not cfg.parallel.shard_optimizer_state  # whole state on every rank
    install_hooks(optimizer, grads_sharded=parallel.grads_sharded, replica_perturbation=replica, replicated=replicated)
    return parallel, optimizer, groups
