"""The only module that calls torch.distributed collectives, and local views of sharded tensors.

Every other module (backends, sharded optimizers, the checkpoint and preemption code) communicates through
these functions, so there is one place to read what crosses ranks, one place to change the transport, and a
layering test (tests/test_layering.py) that no module elsewhere calls ``dist.all_reduce`` & co.

Each function takes an optional ``group``: a ``ProcessGroup``, a one-dimensional ``DeviceMesh`` (FSDP2's), or
``None`` for the default group. Everything is a no-op in one process (no process group, or a group of one), so
callers need no special case. Ranks named as ``src`` are ranks *within* ``group``. Tensors may be plain or
DTensors (FSDP2); ``local`` gives the shard this rank holds, which shares storage with the DTensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

Group: TypeAlias = "dist.ProcessGroup | DeviceMesh | None"


def _pg(group: Group) -> dist.ProcessGroup | None:
    """The process group behind ``group`` (a 1-D mesh's group; None stays the default group)."""
    if isinstance(group, DeviceMesh):
        return group.get_group()
    return group


def initialized() -> bool:
    """Whether this process has joined a process group."""
    return dist.is_available() and dist.is_initialized()


def world(group: Group = None) -> tuple[int, int]:
    """(rank, size) of ``group`` (default: the default process group); (0, 1) without one."""
    if not initialized():
        return 0, 1
    pg = _pg(group)
    return dist.get_rank(pg), dist.get_world_size(pg)


def _alone(group: Group) -> bool:
    return world(group)[1] == 1


def local(x: Tensor) -> Tensor:
    """The part of ``x`` this rank holds: a DTensor's local shard (same storage), else ``x``."""
    return x.to_local() if isinstance(x, DTensor) else x


def _all_reduce(x: Tensor, op: dist.ReduceOp.RedOpType, group: Group) -> Tensor:
    if _alone(group):
        return x
    x = x.clone()
    dist.all_reduce(x, op=op, group=_pg(group))
    return x


def all_reduce_sum(x: Tensor, group: Group = None) -> Tensor:
    """Sum of ``x`` over the ranks of ``group`` (a new tensor; ``x`` itself in one process)."""
    return _all_reduce(x, dist.ReduceOp.SUM, group)


def all_reduce_max(x: Tensor, group: Group = None) -> Tensor:
    """Elementwise maximum of ``x`` over the ranks of ``group`` (a new tensor; ``x`` itself in one process)."""
    return _all_reduce(x, dist.ReduceOp.MAX, group)


def all_reduce_mean(x: Tensor, group: Group = None) -> Tensor:
    """Mean of ``x`` over the ranks of ``group`` (a new tensor; ``x`` itself in one process)."""
    if _alone(group):
        return x
    return all_reduce_sum(x, group) / world(group)[1]


@torch.no_grad()
def average_(tensors: Sequence[Tensor], group: Group = None) -> None:
    """Replace each tensor by its mean over the ranks of ``group``, in place: one flat all-reduce per
    (dtype, device) of the list (one in the usual case), so a list of gradients costs one collective."""
    if _alone(group) or not tensors:
        return
    size = world(group)[1]
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for bucket in buckets.values():
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=_pg(group))
        flat /= size
        for t, mean in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
            t.copy_(mean)


def broadcast_(tensor: Tensor, src: int, group: Group = None) -> Tensor:
    """Overwrite ``tensor`` on every rank of ``group`` with rank ``src``'s, in place; returns ``tensor``."""
    if not _alone(group):
        dist.broadcast(tensor, group=_pg(group), group_src=src)
    return tensor


def all_to_all_single(
    output: Tensor,
    input: Tensor,
    output_split_sizes: Sequence[int] | None = None,
    input_split_sizes: Sequence[int] | None = None,
    group: Group = None,
) -> Tensor:
    """``torch.distributed.all_to_all_single``: rank r's ``input_split_sizes[j]`` elements go to rank j, which
    receives them as its ``output_split_sizes[r]`` elements (dim 0). In one process ``input`` is copied into
    ``output``. Returns ``output``."""
    if _alone(group):
        output.copy_(input)
        return output
    dist.all_to_all_single(
        output,
        input,
        list(output_split_sizes) if output_split_sizes is not None else None,
        list(input_split_sizes) if input_split_sizes is not None else None,
        group=_pg(group),
    )
    return output


def all_gather_object(obj: Any, group: Group = None) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in one process)."""
    if _alone(group):
        return [obj]
    everyone: list[Any] = [None] * world(group)[1]
    dist.all_gather_object(everyone, obj, group=_pg(group))
    return everyone


def broadcast_object(obj: Any, src: int = 0, group: Group = None) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank of ``group`` (other ranks' ``obj`` is ignored)."""
    if _alone(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group=_pg(group), group_src=src)
    return box[0]


def barrier(group: Group = None) -> None:
    """Wait until every rank of ``group`` gets here (nothing in one process)."""
    if not _alone(group):
        dist.barrier(group=_pg(group))


def local_sumsq(tensors: Sequence[Tensor]) -> Tensor:
    """Sum of squares of the local parts of ``tensors`` in float32 (0-d; zero for an empty list)."""
    parts = [local(t) for t in tensors]
    if not parts:
        return torch.zeros(())
    norms = torch._foreach_norm(parts, 2, dtype=torch.float32)  # one norm per tensor
    return torch.stack(norms).square().sum()


def global_grad_norm(params: Sequence[Tensor], sharded: bool, group: Group = None) -> Tensor:
    """L2 norm of every gradient of ``params`` over the whole model (0-d float32 tensor).

    ``sharded``: each rank holds a different part of the gradients (FSDP2, ZeRO), so local sums of squares
    are all-reduced over ``group`` (one scalar). Replicated gradients (DDP, one process) need no communication.
    """
    sumsq = local_sumsq([p.grad for p in params if p.grad is not None])
    return (all_reduce_sum(sumsq, group) if sharded else sumsq).sqrt()


@torch.no_grad()
def clip_grad_norm_(params: Sequence[Tensor], max_norm: float, sharded: bool, group: Group = None) -> Tensor:
    """Scale the gradients so their global L2 norm is at most ``max_norm``; returns the norm before clipping as
    a 0-d float32 tensor (no host sync: whoever logs it calls ``float()``).

    Same rule as ``torch.nn.utils.clip_grad_norm_`` (coefficient max_norm / (norm + 1e-6), capped at 1),
    with the norm taken over every shard.
    """
    norm = global_grad_norm(params, sharded, group)
    if max_norm < float("inf"):
        grads = [local(p.grad) for p in params if p.grad is not None]
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef)
    return norm
