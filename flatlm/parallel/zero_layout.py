"""Which pieces of which matrices each rank holds in DeepSpeed's flat partitions, for shape-aware optimizers.

``zero_views.zero_fragments`` gives this rank's fragments; ``flat_layouts`` exchanges them once (one
``all_gather_object`` at setup) so that, for every flat partition (the same index on every rank), each rank
knows every parameter in it and every rank's piece of each: what Muon's gather/scatter and Adafactor's
statistics need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from flatlm.parallel.muon import Piece
from flatlm.parallel.zero_views import flat_partitions, zero_fragments


@dataclass
class FlatLayout:
    """The parameters of one flat partition across all ranks, and where this rank's pieces sit in its flat."""

    flat: Tensor  # this rank's flat fp32 partition (the client optimizer's parameter)
    names: list[str]  # every parameter with a piece in this flat on some rank (same order on every rank)
    shapes: list[tuple[int, ...]]  # their full shapes
    pieces: list[list[Piece]]  # pieces[i][r]: rank r's elements of parameter i (numel 0 if none)
    offsets: list[int]  # where this rank's piece of parameter i starts in ``flat`` (-1 if none)

    def local(self, i: int, tensor: Tensor, rank: int) -> Tensor:
        """This rank's piece of parameter i in ``tensor`` (laid out like ``flat``); empty if none."""
        n = self.pieces[i][rank].numel
        return tensor.narrow(0, max(self.offsets[i], 0), n) if n else tensor.new_empty(0)


def flat_layouts(engine: Any, model: torch.nn.Module) -> dict[int, FlatLayout]:
    """id(flat partition) -> its layout across ranks. Collective (every rank calls it once)."""
    mine = [
        [(f.name, tuple(f.shape), f.start, f.numel, f.offset) for f in frags] for frags in zero_fragments(engine, model)
    ]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict[int, FlatLayout] = {}
    for k, flat in enumerate(flat_partitions(engine)):
        order: dict[str, tuple[int, ...]] = {}
        for r in range(world):
            for name, shape, *_ in everyone[r][k]:
                order.setdefault(name, shape)
        names = sorted(order)
        index = {n: i for i, n in enumerate(names)}
        pieces = [[Piece(0, 0) for _ in range(world)] for _ in names]
        offsets = [-1] * len(names)
        for r in range(world):
            for name, _, start, numel, offset in everyone[r][k]:
                pieces[index[name]][r] = Piece(start, numel)
                if r == rank:
                    offsets[index[name]] = offset
        out[id(flat)] = FlatLayout(flat, names, [order[n] for n in names], pieces, offsets)
    return out
