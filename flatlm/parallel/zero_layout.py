"""Which pieces of which matrices each rank holds in DeepSpeed's flat partitions, for shape-aware optimizers.

``zero_views.zero_fragments`` gives this rank's fragments; ``flat_layouts`` exchanges them once (one
``all_gather_object`` at setup) so that, for every flat partition (the same index on every rank), each rank
knows every parameter in it and every rank's piece of each: what Muon's gather/scatter and Adafactor's
statistics need.

``ZeroLayout`` is the ``flatlm.optim.distribution.Layout`` Muon and Adafactor are built with under ZeRO. The flat
partitions exist only after ``deepspeed.initialize``, which needs the client optimizer: so the layout is passed to
the optimizer's constructor empty and the DeepSpeed backend ``bind``s it right after initialize (before any step).
Each flat partition is then a list of ``FlatPiece`` parts, one per parameter with elements in it on some rank (the
same list on every rank; this rank's piece may be empty): a run of the matrix's row-major elements that may start
and end mid-row. Row and column statistics of a piece go through index maps (the row and column of each element)
into whole R [n] and C [m], which ``shard_sum`` adds up over the ranks; the math is the optimizers' own.
State stays as ZeRO checkpoints keep it: momentum and ``exp_avg`` flat-partition-shaped, Adafactor's R, C (whole)
and V (this rank's piece) as ``{index of the parameter among the partition's sorted names: tensor}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatlm.optim.distribution import Layout, Part
from flatlm.parallel.collectives import all_gather_object, world
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
    everyone = all_gather_object(mine)
    rank, size = world()
    out: dict[int, FlatLayout] = {}
    for k, flat in enumerate(flat_partitions(engine)):
        order: dict[str, tuple[int, ...]] = {}
        for r in range(size):
            for name, shape, *_ in everyone[r][k]:
                order.setdefault(name, shape)
        names = sorted(order)
        index = {n: i for i, n in enumerate(names)}
        pieces = [[Piece(0, 0) for _ in range(size)] for _ in names]
        offsets = [-1] * len(names)
        for r in range(size):
            for name, _, start, numel, offset in everyone[r][k]:
                pieces[index[name]][r] = Piece(start, numel)
                if r == rank:
                    offsets[index[name]] = offset
        out[id(flat)] = FlatLayout(flat, names, [order[n] for n in names], pieces, offsets)
    return out


class FlatPiece(Part):
    """This rank's run of elements [start, start + numel) of one parameter (row-major), at ``offset`` in the flat
    partition; ``pieces``: every rank's run (Muon's gather). Everything computed from it is partial."""

    rows_partial = cols_partial = partial = True

    def __init__(self, shape: tuple[int, ...], pieces: list[Piece], rank: int, offset: int) -> None:
        super().__init__(shape)
        self.pieces = tuple(pieces)
        self.start, self.numel_here, self.offset = pieces[rank].start, pieces[rank].numel, offset
        self._index: tuple[Tensor, Tensor] | None = None

    def view(self, tensor: Tensor) -> Tensor:
        if not self.numel_here:
            return tensor.new_empty(0)
        return tensor.view(-1).narrow(0, self.offset, self.numel_here)

    def state_shape(self, kind: str, local: Tensor) -> tuple[torch.Size, torch.Size]:
        if kind == "row":  # R and C are whole on every rank
            return torch.Size(self.shape[:1]), torch.Size(self.shape[:1])
        if kind == "col":
            return torch.Size(self.shape[1:]), torch.Size(self.shape[1:])
        return local.shape, self.shape

    def _rows_cols(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Row and column of each element of this piece (cached: the layout is fixed)."""
        if self._index is None:
            flat = torch.arange(self.start, self.start + self.numel_here, device=like.device)
            m = self.shape[1]
            self._index = (flat // m, flat % m)
        return self._index

    def row_means(self, x: Tensor) -> Tensor:
        rows, _ = self._rows_cols(x)
        return x.new_zeros(self.shape[0]).index_add_(0, rows, x).div_(self.shape[1])

    def col_means(self, x: Tensor) -> Tensor:
        _, cols = self._rows_cols(x)
        return x.new_zeros(self.shape[1]).index_add_(0, cols, x).div_(self.shape[0])

    def outer(self, r: Tensor, c: Tensor, out: Tensor | None = None) -> Tensor:
        rows, cols = self._rows_cols(r)
        return torch.mul(r[rows], c[cols], out=out)

    def weighted_sumsq(self, x2: Tensor, r2: Tensor, c2: Tensor) -> Tensor:
        rows, cols = self._rows_cols(x2)
        return torch.dot(x2, r2[rows] * c2[cols])


class ZeroLayout(Layout):
    """The layout of DeepSpeed's flat partitions (see the module docstring); ``bind`` it after initialize."""

    keyed_by_part = True

    def __init__(self) -> None:
        self._parts: dict[int, list[Part]] | None = None
        self.layouts: dict[int, FlatLayout] = {}

    def bind(self, engine: Any, model: torch.nn.Module) -> None:
        """Read the engine's flat partitions (collective: every rank calls it once, after deepspeed.initialize)."""
        rank, _ = world()
        self.layouts = flat_layouts(engine, model)
        self._parts = {
            key: [FlatPiece(lay.shapes[i], lay.pieces[i], rank, lay.offsets[i]) for i in range(len(lay.names))]
            for key, lay in self.layouts.items()
        }

    def parts(self, tensor: Tensor) -> list[Part]:
        if self._parts is None:
            raise RuntimeError("ZeroLayout is bound by the DeepSpeed backend after deepspeed.initialize, before a step")
        if id(tensor) not in self._parts:
            raise RuntimeError("the optimizer steps a tensor that is not one of DeepSpeed's flat partitions")
        parts = self._parts[id(tensor)]
        if any(len(part.shape) > 2 for part in parts):
            raise ValueError("shape-aware optimizers on ZeRO partitions support 1-D and 2-D parameters")
        return parts
