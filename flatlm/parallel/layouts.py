"""What each backend injects into the optimizers it steps, built before the optimizer (``distribution``), and the
FSDP2 layout: every parameter a DTensor sharded on dim 0, so each rank holds whole rows.

``distribution(backend, ...)`` returns the ``flatlm.optim.distribution.Distribution`` that ``build_optimizer``
passes to the constructors (the optimizer's class and attributes never change afterwards):

    backend      SAM sum_across_ranks     Muon orthogonalize / layout        Adafactor layout / shard_sum
    single       -                        - / -                              - / -
    ddp          -                        ReplicatedOrthogonalize / -        - / -          (whole, replicated)
    ddp owned    -  (step_wrapper: OwnedParamsOptimizer builds the inner optimizer on the owned parameters)
    fsdp2        all_reduce_sum (global)  ShardedOrthogonalize / RowShards   RowShards / all_reduce_sum
    zero1-3      all_reduce_sum (global)  ShardedOrthogonalize / ZeroLayout  ZeroLayout / all_reduce_sum

A ZeRO ``ZeroLayout`` is empty until ``deepspeed.initialize`` has made the flat partitions: the DeepSpeed backend
binds it (``parallel.deepspeed.deepspeed_parallel``), before the first step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from flatlm.optim.distribution import Distribution, Layout, Part
from flatlm.parallel.collectives import all_reduce_sum, local, world
from flatlm.parallel.muon import Piece, ReplicatedOrthogonalize, ShardedOrthogonalize, row_chunks

ZERO_BACKENDS = ("zero1", "zero2", "zero3")


class RowShardPart(Part):
    """This rank's rows of a DTensor parameter sharded on dim 0 (FSDP2): whole rows, so row means are complete
    here; column means and sums of squares are partial. ``pieces``: every rank's elements (Muon's gather)."""

    partial = True

    def __init__(self, shape: torch.Size, pieces: tuple[Piece, ...]) -> None:
        super().__init__(shape)
        self.pieces = pieces
        self.cols_partial = len(shape) == 2  # a 2-D matrix's rows are split (a 3-D tensor's batch is)

    def view(self, tensor: Tensor) -> Tensor:
        return local(tensor)


class RowShards(Layout):
    """FSDP2's layout: one part per parameter, its local shard; Adafactor's row state and V sharded like the
    parameter, C replicated (DTensors on the parameter's mesh, so checkpoints reshard them like the parameter)."""

    def parts(self, tensor: Tensor) -> list[Part]:
        if not isinstance(tensor, DTensor):  # its elements would count as one rank's rows: W x too large sums
            raise ValueError(
                f"FSDP2 optimizers expect DTensor parameters sharded on dim 0, got a {type(tensor).__name__} of shape "
                f"{tuple(tensor.shape)}: shard the model with fully_shard (flatlm.parallel.fsdp2.shard_fsdp2) before "
                "building the optimizer, or build it without the fsdp2 distribution"
            )
        if tuple(tensor.placements) != (Shard(0),):
            raise ValueError(f"FSDP2 optimizers expect dim-0 sharded parameters, got placements {tensor.placements}")
        shape = tensor.shape
        rows = shape[0] if len(shape) else 1
        pieces = tuple(row_chunks(rows, math.prod(shape[1:]), world()[1]))
        return [RowShardPart(shape, pieces)]

    def zeros(self, tensor: Tensor, part: Part, kind: str, dtype: torch.dtype) -> Tensor:
        local_shape, global_shape = part.state_shape(kind, part.view(tensor))
        zeros = torch.zeros(local_shape, device=local(tensor).device, dtype=dtype)
        replicated = kind == "col" and tensor.ndim == 2  # C is whole on every rank
        placements = [Replicate()] * len(tensor.placements) if replicated else tensor.placements
        stride = torch.empty(global_shape, device="meta").stride()
        return DTensor.from_local(
            zeros, tensor.device_mesh, placements, run_check=False, shape=global_shape, stride=stride
        )

    def local(self, state: Tensor) -> Tensor:
        return local(state)


def distribution(
    backend: str, *, shard_optimizer_state: bool = False, replica_perturbation: bool = False
) -> Distribution:
    """The ``Distribution`` the optimizers on ``backend`` are built with (see the module docstring)."""
    if backend == "ddp" and shard_optimizer_state:
        from flatlm.parallel.ownership import OwnedParamsOptimizer

        return Distribution(step_wrapper=OwnedParamsOptimizer)
    if backend == "ddp":
        return Distribution(orthogonalize=ReplicatedOrthogonalize() if world()[1] > 1 else None)
    sam_sum = None if replica_perturbation else all_reduce_sum  # replica: each rank's own gradient, its own norm
    if backend == "fsdp2":
        return Distribution(sam_sum, ShardedOrthogonalize(), RowShards(), all_reduce_sum)
    if backend in ZERO_BACKENDS:
        from flatlm.parallel.zero_layout import ZeroLayout

        return Distribution(sam_sum, ShardedOrthogonalize(), ZeroLayout(), all_reduce_sum)
    return Distribution()
