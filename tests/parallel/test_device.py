"""Which GPU a process takes (``flatlm.parallel.device``), with CUDA's answers replaced: the local rank's among all
of a node's GPUs; the one GPU a process sees when the scheduler binds one to each task; a clear error when a node
runs more processes than it has GPUs (on every rank, rank 0 included, so that the error is said)."""

from __future__ import annotations

import pytest
import torch

from flatlm.errors import FlatlmError
from flatlm.parallel import Environment
from flatlm.parallel.device import local_device


def _cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _env(local_rank: int, local_world: int) -> Environment:
    return Environment(rank=local_rank + 8, world_size=16, local_rank=local_rank, local_world_size=local_world)


@pytest.mark.timeout(30)
def test_the_device_of_a_process(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, 0)
    assert local_device(_env(3, 8)) == torch.device("cpu")
    _cuda(monkeypatch, 8)  # one launcher per node, every process sees the node's 8 GPUs
    assert [local_device(_env(r, 8)) for r in range(8)] == [torch.device("cuda", r) for r in range(8)]
    _cuda(monkeypatch, 1)  # srun --gpus-per-task=1: each task sees its own GPU as device 0
    assert local_device(_env(5, 8)) == torch.device("cuda", 0)
    _cuda(monkeypatch, 4)
    for rank in (0, 6):  # 8 processes, 4 GPUs: every rank says it, not only the ranks left without one
        with pytest.raises(FlatlmError, match=r"8 processes on this node but each sees 4 GPUs.*--gpus-per-node 4"):
            local_device(_env(rank, 8))
