"""The few collectives optimizers need, and local views of sharded tensors.

Everything here is a no-op in one process, so callers need no special case. Tensors may be plain or
DTensors (FSDP2); ``local`` gives the shard this rank holds, which shares storage with the DTensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local(x: Tensor) -> Tensor:
    """The part of ``x`` this rank holds: a DTensor's local shard (same storage), else ``x``."""
    return x.to_local() if isinstance(x, DTensor) else x


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over all ranks (a new tensor; ``x`` itself in one process)."""
    if world()[1] == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def local_sumsq(tensors: Sequence[Tensor]) -> Tensor:
    """Sum of squares of the local parts of ``tensors`` in float32 (0-d; zero for an empty list)."""
    parts = [local(t) for t in tensors]
    if not parts:
        return torch.zeros(())
    norms = torch._foreach_norm(parts, 2, dtype=torch.float32)  # one norm per tensor
    return torch.stack(norms).square().sum()


def global_grad_norm(params: Sequence[Tensor], sharded: bool) -> Tensor:
    """L2 norm of every gradient of ``params`` over the whole model (0-d float32 tensor).

    ``sharded``: each rank holds a different part of the gradients (FSDP2, ZeRO), so local sums of squares
    are all-reduced (one scalar). Replicated gradients (DDP, one process) need no communication.
    """
    sumsq = local_sumsq([p.grad for p in params if p.grad is not None])
    return (all_reduce_sum(sumsq) if sharded else sumsq).sqrt()


@torch.no_grad()
def clip_grad_norm_(params: Sequence[Tensor], max_norm: float, sharded: bool) -> float:
    """Scale the gradients so their global L2 norm is at most ``max_norm``; returns the norm before clipping.

    Same rule as ``torch.nn.utils.clip_grad_norm_`` (coefficient max_norm / (norm + 1e-6), capped at 1),
    with the norm taken over every shard.
    """
    norm = global_grad_norm(params, sharded)
    if max_norm < float("inf"):
        grads = [local(p.grad) for p in params if p.grad is not None]
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef)
    return norm.item()
