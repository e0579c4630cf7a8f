"""Everything about optimizers that knows about ranks: ownership, collectives, global norms, and the
gather/scatter that keeps shape-aware optimizers (Muon, Adafactor) exact on sharded parameters.

The optimizers' math (``flatlm.optim.<name>``) sees local tensors and calls hooks for the few things that
need the whole parameter or the whole model; ``install_hooks`` points those hooks at the collectives here.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from flatlm.parallel.adafactor import RowShardedReductions
from flatlm.parallel.collectives import all_reduce_sum, clip_grad_norm_, global_grad_norm, local, world
from flatlm.parallel.muon import ReplicatedOrthogonalize, ShardedOrthogonalize
from flatlm.parallel.ownership import OwnedParamsOptimizer, assign_owners

__all__ = [
    "OwnedParamsOptimizer",
    "ReplicatedOrthogonalize",
    "ShardedOrthogonalize",
    "all_reduce_sum",
    "assign_owners",
    "clip_grad_norm_",
    "global_grad_norm",
    "install_hooks",
    "local",
    "world",
]


def install_hooks(
    optimizer: torch.optim.Optimizer, *, grads_sharded: bool, replica_perturbation: bool, replicated: bool = False
) -> None:
    """Point the optimizers' reduction hooks at the collectives this backend needs.

    SAM family: global norms over every shard (``grads_sharded``, global perturbation), else local.
    Muon on DTensor (FSDP2) matrices: gather -> Newton-Schulz once per matrix -> scatter.
    Muon on whole matrices replicated on every rank (``replicated``: plain DDP): Newton-Schulz on each matrix's
    owner, then a broadcast (no rank repeats another's work).
    Adafactor on DTensor (FSDP2) parameters: column statistics and RMS values summed over the ranks' rows.
    """
    from flatlm.optim.adafactor import Adafactor
    from flatlm.optim.muon import Muon
    from flatlm.optim.registry import inner_optimizers
    from flatlm.optim.sam import SAM

    for opt in inner_optimizers(optimizer):
        if isinstance(opt, SAM) and grads_sharded and not replica_perturbation:
            opt.sum_across_ranks = all_reduce_sum
        on_dtensors = any(isinstance(p, DTensor) for g in opt.param_groups for p in g["params"])
        if isinstance(opt, Muon) and on_dtensors:
            opt.orthogonalize_fn = ShardedOrthogonalize()
        elif isinstance(opt, Muon) and replicated and world()[1] > 1:
            opt.orthogonalize_fn = ReplicatedOrthogonalize()
        if isinstance(opt, Adafactor) and on_dtensors:
            opt.reductions = RowShardedReductions()
