"""flatlm.parallel.collectives: each function's result on 3 gloo ranks (default group, a 2-rank subgroup, a 1-D
DeviceMesh), and the no-op in one process (no process group)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from flatlm.parallel import collectives as C
from tests.ranks import run_ranks


def _all_functions(rank: int, world_size: int) -> None:
    assert C.world() == (rank, world_size)
    x = torch.tensor([float(rank + 1), -float(rank)])
    assert torch.equal(C.all_reduce_sum(x), torch.tensor([6.0, -3.0]))
    assert torch.equal(x, torch.tensor([float(rank + 1), -float(rank)])), "all_reduce_sum changed its input"
    assert torch.equal(C.all_reduce_max(x), torch.tensor([3.0, 0.0]))
    assert torch.equal(C.all_reduce_mean(x), torch.tensor([2.0, -1.0]))

    # average_: in place, mixed dtypes (one flat reduce per dtype), values exactly the mean.
    a, b = torch.full((2, 3), float(rank)), torch.full((4,), rank * 3, dtype=torch.float64)
    C.average_([a, b])
    assert torch.equal(a, torch.full((2, 3), 1.0)) and torch.equal(b, torch.full((4,), 3.0, dtype=torch.float64))

    t = torch.full((3,), float(rank))
    assert C.broadcast_(t, src=2) is t and torch.equal(t, torch.full((3,), 2.0))

    # all_to_all_single: rank r sends (j + 1) copies of 10 r + j to rank j.
    send = torch.cat([torch.full((j + 1,), 10.0 * rank + j) for j in range(world_size)])
    recv = torch.empty((rank + 1) * world_size)
    C.all_to_all_single(recv, send, [rank + 1] * world_size, [j + 1 for j in range(world_size)])
    assert torch.equal(recv, torch.cat([torch.full((rank + 1,), 10.0 * r + rank) for r in range(world_size)]))

    assert C.all_gather_object({"r": rank}) == [{"r": r} for r in range(world_size)]
    assert C.broadcast_object(f"from {rank}", src=1) == "from 1"
    C.barrier()

    # A subgroup of ranks 1 and 2: ranks and sources are within the group.
    sub = dist.new_group([1, 2])
    if rank in (1, 2):
        assert C.world(sub) == (rank - 1, 2)
        assert torch.equal(C.all_reduce_sum(torch.tensor([float(rank)]), sub), torch.tensor([3.0]))
        s = torch.tensor([float(rank)])
        C.broadcast_(s, src=1, group=sub)  # group rank 1 = global rank 2
        assert s.item() == 2.0
        assert C.broadcast_object(rank, src=0, group=sub) == 1
        assert C.all_gather_object(rank, sub) == [1, 2]
        C.barrier(sub)

    # A 1-D DeviceMesh (FSDP2's) stands for its process group.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    assert C.world(mesh) == (rank, world_size)
    assert torch.equal(C.all_reduce_sum(torch.tensor([1.0]), mesh), torch.tensor([float(world_size)]))

    # clip_grad_norm_ with sharded gradients: the norm covers every rank's shard; returned as a 0-d tensor.
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.full((2,), float(rank + 1))
    norm = C.clip_grad_norm_([p], max_norm=1.0, sharded=True)
    want = torch.tensor(2.0 * (1 + 4 + 9)).sqrt()
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0 and torch.allclose(norm, want)
    assert torch.allclose(p.grad, torch.full((2,), float(rank + 1)) / (want + 1e-6))


@pytest.mark.timeout(180)
def test_collectives_on_three_ranks() -> None:
    run_ranks(_all_functions, world_size=3)


def test_one_process_is_a_noop() -> None:
    assert not dist.is_initialized()
    assert C.world() == (0, 1)
    x = torch.tensor([1.0, 2.0])
    for f in (C.all_reduce_sum, C.all_reduce_max, C.all_reduce_mean):
        assert torch.equal(f(x), x)
    C.average_([x])
    assert torch.equal(x, torch.tensor([1.0, 2.0]))
    assert torch.equal(C.broadcast_(x, src=0), x)
    out = torch.empty(2)
    assert torch.equal(C.all_to_all_single(out, x, [2], [2]), x)
    assert C.all_gather_object("a") == ["a"] and C.broadcast_object("b") == "b"
    C.barrier()
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    norm = C.clip_grad_norm_([p], max_norm=1.0, sharded=False)
    assert isinstance(norm, torch.Tensor) and norm.item() == pytest.approx(5.0)
    assert torch.allclose(p.grad.norm(), torch.tensor(1.0), atol=1e-6)
