"""Sharded Newton-Schulz (FSDP2 dim-0 shards) equals the single-process one, and runs once per matrix."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from flatlm.optim.muon import orthogonalize
from flatlm.parallel.layouts import RowShards
from flatlm.parallel.muon import ReplicatedOrthogonalize, ShardedOrthogonalize, owners_by_shape, row_chunks
from tests.ranks import run_ranks

# Uneven rows (7, 5), fewer rows than ranks would give (1), repeated shapes (batched), wide and tall.
SHAPES = [(16, 8), (7, 12), (16, 8), (5, 5), (8, 16), (1, 6), (16, 8)]


def test_row_chunks_follow_torch_chunk() -> None:
    for rows, world in [(7, 2), (1, 2), (16, 3), (5, 4)]:
        pieces = row_chunks(rows, 3, world)
        expected = [c.shape[0] for c in torch.empty(rows, 3).chunk(world)]
        expected += [0] * (world - len(expected))
        assert [p.numel // 3 for p in pieces] == expected
        assert [p.start for p in pieces] == [3 * sum(expected[:r]) for r in range(world)]


def test_owners_batch_same_shapes_and_balance() -> None:
    owners = owners_by_shape(SHAPES, 2)
    assert sorted(owners) == [0, 0, 0, 0, 1, 1, 1]
    same = [owners[i] for i, s in enumerate(SHAPES) if s == (16, 8)]
    assert sorted(same) == [0, 0, 1]  # dealt consecutively: both ranks batch their (16, 8) matrices


def _sharded_equals_single(rank: int, world: int, dtype: torch.dtype) -> None:
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=gen) for s in SHAPES]
    updates = [distribute_tensor(m, mesh, [Shard(0)]) for m in full]
    parts = [part for u in updates for part in RowShards().parts(u)]  # FSDP2's layout: global shapes, row pieces
    assert [tuple(p.shape) for p in parts] == SHAPES
    fn = ShardedOrthogonalize()
    out = fn([part.view(u) for part, u in zip(parts, updates, strict=True)], parts, steps=5, eps=1e-7, dtype=dtype)
    expected = orthogonalize(full, steps=5, eps=1e-7, dtype=dtype)
    for o, e, u in zip(out, expected, updates, strict=True):
        assert o.shape == u.to_local().shape  # this rank's rows
        torch.testing.assert_close(o, e.chunk(world)[rank] if rank < len(e.chunk(world)) else e[:0], rtol=0, atol=0)
    # Each matrix is orthogonalised once across the ranks: no redundant Newton-Schulz.
    count = torch.tensor([fn.ns_matrices])
    dist.all_reduce(count)
    assert count.item() == len(SHAPES)
    assert fn.ns_matrices in (3, 4)


def test_sharded_orthogonalize_bit_equal_float32() -> None:
    run_ranks(_sharded_equals_single, torch.float32)


def test_sharded_orthogonalize_bit_equal_bfloat16() -> None:
    run_ranks(_sharded_equals_single, torch.bfloat16)


def _replicated_equals_single(rank: int, world: int) -> None:
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=gen) for s in SHAPES]  # the same on every rank, as under DDP
    fn = ReplicatedOrthogonalize()
    out = fn(full, steps=5, eps=1e-7, dtype=torch.bfloat16)
    for o, e in zip(out, orthogonalize(full, steps=5, eps=1e-7, dtype=torch.bfloat16), strict=True):
        torch.testing.assert_close(o, e, rtol=0, atol=0)
    count = torch.tensor([fn.ns_matrices])
    dist.all_reduce(count)
    assert count.item() == len(SHAPES)


def test_replicated_orthogonalize_once_per_matrix_bit_equal() -> None:
    run_ranks(_replicated_equals_single)
