"""Muon's Newton-Schulz on whole matrices when each rank holds only a piece of every matrix.

The one Muon update (``flatlm.optim.muon.muon``) runs on this rank's parts of the matrices and calls the
``orthogonalize`` a backend injected at construction once per step with all of them: ``(updates, parts, **ns)``,
where each part (``flatlm.optim.distribution.Part``) carries its matrix's global shape and ``pieces``, every rank's
range of the row-major elements (FSDP2's dim-0 shard, or a run of a DeepSpeed ZeRO flat partition, see
``parallel.layouts`` and ``parallel.zero_layout``). ``ShardedOrthogonalize`` serves both; its order of
communication, per optimizer step:

    1. owners     matrix i is orthogonalised by one rank; matrices are grouped by shape, and each shape's
                  list is dealt round-robin (continuing across shapes) so same-shape matrices batch.
    2. all-to-all every rank sends each owner its pieces of the owner's matrices (in the NS dtype).
    3. NS         each owner runs the *same* ``orthogonalize`` on its whole matrices (batched by shape):
                  every matrix is orthogonalised exactly once across all ranks.
    4. all-to-all each owner sends every rank its piece of the result.

Bytes moved per rank and step: 2 x (1 - 1/world) x the Muon matrices' elements (in the NS dtype), the
minimum for gather-then-scatter; no redundant Newton-Schulz, no all-gather of whole matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatlm.optim.distribution import Part
from flatlm.optim.muon import orthogonalize
from flatlm.parallel.collectives import all_to_all_single, broadcast_, world


@dataclass(frozen=True)
class Piece:
    """Where one rank's piece of a matrix lies: elements [start, start + numel) of the row-major matrix."""

    start: int
    numel: int


def row_chunks(rows: int, cols: int, world_size: int) -> list[Piece]:
    """The pieces of a dim-0 sharded [rows, cols] matrix, torch.chunk rule (FSDP2's Shard(0))."""
    per = -(-rows // world_size)  # ceil
    out = []
    for r in range(world_size):
        lo, hi = min(rows, r * per), min(rows, (r + 1) * per)
        out.append(Piece(lo * cols, (hi - lo) * cols))
    return out


def owners_by_shape(shapes: Sequence[tuple[int, ...]], world_size: int) -> list[int]:
    """Owner rank of each matrix: shapes grouped, then dealt round-robin (same on every rank)."""
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i], i))
    owner = [0] * len(shapes)
    for k, i in enumerate(order):
        owner[i] = k % world_size
    return owner


def gather_orthogonalize_scatter(
    pieces: Sequence[Tensor],
    shapes: Sequence[tuple[int, int]],
    layout: Sequence[Sequence[Piece]],
    ns: Callable[[list[Tensor]], list[Tensor]],
    dtype: torch.dtype,
) -> list[Tensor]:
    """Orthogonalise whole matrices from per-rank pieces; returns this rank's piece of each result (1-D).

    ``pieces[i]``: this rank's elements of matrix i (any shape, numel = layout[i][rank].numel);
    ``layout[i][r]``: rank r's piece of matrix i; ``ns``: the single-process math on whole matrices.
    """
    rank, size = world()
    owner = owners_by_shape(shapes, size)
    # 2. send each owner my pieces of its matrices (grouped by destination rank)
    send_idx = [[i for i in range(len(shapes)) if owner[i] == r] for r in range(size)]
    mine = send_idx[rank]
    send = [pieces[i].reshape(-1).to(dtype) for r in range(size) for i in send_idx[r]]
    send_splits = [sum(layout[i][rank].numel for i in send_idx[r]) for r in range(size)]
    recv_splits = [sum(layout[i][r].numel for i in mine) for r in range(size)]
    received = _all_to_all(send, send_splits, recv_splits, dtype, pieces)
    # 3. assemble my matrices (pieces arrive rank by rank, each rank's in my matrices' order) and run NS
    parts: dict[int, list[Tensor]] = {i: [] for i in mine}
    for src, chunk in enumerate(received):
        offset = 0
        for i in mine:
            n = layout[i][src].numel
            parts[i].append(chunk[offset : offset + n])
            offset += n
    whole = [torch.cat(parts[i]).view(shapes[i]) for i in mine]
    results = ns(whole) if whole else []
    # 4. send every rank its piece of my results
    back = [
        results[k].reshape(-1)[layout[i][r].start : layout[i][r].start + layout[i][r].numel]
        for r in range(size)
        for k, i in enumerate(mine)
    ]
    returned = _all_to_all(back, recv_splits, send_splits, dtype, pieces)
    out: list[Tensor] = [None] * len(shapes)  # type: ignore[list-item]
    for r, chunk in enumerate(returned):
        offset = 0
        for i in send_idx[r]:
            n = layout[i][rank].numel
            out[i] = chunk[offset : offset + n]
            offset += n
    return out


def _all_to_all(
    tensors: list[Tensor], send_splits: list[int], recv_splits: list[int], dtype: torch.dtype, like: Sequence[Tensor]
) -> list[Tensor]:
    """One all_to_all_single of the concatenated ``tensors``; returns the received buffer split per source rank."""
    device = like[0].device if like else torch.device("cpu")
    send = torch.cat(tensors) if tensors else torch.empty(0, dtype=dtype, device=device)
    recv = torch.empty(sum(recv_splits), dtype=dtype, device=device)
    all_to_all_single(recv, send, recv_splits, send_splits)
    return list(recv.split(recv_splits))


class ShardedOrthogonalize:
    """The injected ``orthogonalize`` where each rank holds pieces of every matrix (FSDP2 row shards, ZeRO flat
    partitions): gather each matrix on its owner, the same ``flatlm.optim.muon.orthogonalize``, scatter back.
    Returns this rank's pieces, shaped like ``updates``.

    ``ns_matrices`` counts the matrices this rank orthogonalised (tests check the sum over ranks equals the
    number of Muon matrices per step: no redundant Newton-Schulz).
    """

    def __init__(self) -> None:
        self.ns_matrices = 0

    def __call__(self, updates: Sequence[Tensor], parts: Sequence[Part], **ns_kwargs: Any) -> list[Tensor]:
        shapes = [tuple(part.shape) for part in parts]
        layout = [part.pieces for part in parts]  # type: ignore[attr-defined]
        dtype = ns_kwargs.get("dtype", torch.bfloat16)

        def ns(whole: list[Tensor]) -> list[Tensor]:
            self.ns_matrices += len(whole)
            return orthogonalize(whole, **ns_kwargs)

        pieces = gather_orthogonalize_scatter(list(updates), shapes, layout, ns, dtype)
        return [p.view(u.shape) for p, u in zip(pieces, updates, strict=True)]


class ReplicatedOrthogonalize:
    """The injected ``orthogonalize`` under plain DDP, where every rank holds the same whole matrices.

    Instead of every rank running Newton-Schulz on every matrix, each matrix's owner (``owners_by_shape``)
    orthogonalises it and broadcasts the result: one broadcast per rank of its results in the NS dtype
    (every matrix sent once), Newton-Schulz once per matrix across all ranks (KellerJordan/Muon's DDP
    scheme). The results are bit-identical to the single process (same inputs, same ``orthogonalize``).
    """

    def __init__(self) -> None:
        self.ns_matrices = 0

    def __call__(self, updates: Sequence[Tensor], parts: Sequence[Part] = (), **ns_kwargs: Any) -> list[Tensor]:
        rank, size = world()
        if size == 1 or not updates:
            return orthogonalize(updates, **ns_kwargs)
        dtype = ns_kwargs.get("dtype", torch.bfloat16)
        owner = owners_by_shape([tuple(u.shape) for u in updates], size)
        mine = [i for i in range(len(updates)) if owner[i] == rank]
        results = orthogonalize([updates[i] for i in mine], **ns_kwargs)
        self.ns_matrices += len(mine)
        out: list[Tensor] = [None] * len(updates)  # type: ignore[list-item]
        for r in range(size):
            idx = [i for i in range(len(updates)) if owner[i] == r]
            if not idx:
                continue
            if r == rank:
                flat = torch.cat([res.reshape(-1) for res in results])
            else:
                flat = torch.empty(sum(updates[i].numel() for i in idx), dtype=dtype, device=updates[0].device)
            broadcast_(flat, src=r)
            for i, piece in zip(idx, flat.split([updates[i].numel() for i in idx]), strict=True):
                out[i] = piece.view(updates[i].shape)
        return out
