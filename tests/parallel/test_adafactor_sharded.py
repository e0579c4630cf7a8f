"""Adafactor on FSDP2's row shards equals Adafactor on whole parameters, with factored state per shard.

The sharded optimizer is built as FSDP2's backend builds it: ``flatlm.parallel.layouts.distribution("fsdp2")``
passed to ``build_optimizer`` (the row-shard layout and the all-reduce of partial statistics, at construction).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from flatlm.optim import build_optimizer
from flatlm.parallel.layouts import RowShards, distribution
from tests.ranks import run_ranks

SHAPES = [(9, 6), (4, 10), (7,), (1, 5)]  # uneven rows, a vector, a matrix with fewer rows than ranks
MODES = {
    "relative": {},
    "lr_beta1_wd": {"lr": 1e-2, "relative_step": False, "beta1": 0.9, "weight_decay": 0.1},
    "loop": {"lr": 1e-2, "relative_step": False, "foreach": False},
}


def _run(rank: int, world: int, hparams: dict) -> None:
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)
    full = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in full]
    ref = build_optimizer("adafactor", full, **hparams)
    opt = build_optimizer("adafactor", sharded, distribution=distribution("fsdp2"), **hparams)
    assert isinstance(opt._layout, RowShards) and opt._shard_sum is not None  # injected at construction
    for _ in range(4):
        for p, s in zip(full, sharded, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            s.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
        ref.step()
        opt.step()
    for p, s in zip(full, sharded, strict=True):
        torch.testing.assert_close(s.full_tensor(), p.detach(), rtol=1e-6, atol=1e-7)
        state = opt.state[s]
        if p.ndim == 2:  # factored: this rank's rows + every column, never a matrix; DTensors like the parameter
            assert state["exp_avg_sq_row"].to_local().shape == s.to_local().shape[:1]
            assert state["exp_avg_sq_row"].shape == p.shape[:1] and state["exp_avg_sq_row"].placements == s.placements
            assert state["exp_avg_sq_col"].to_local().shape == p.shape[1:]
            torch.testing.assert_close(state["exp_avg_sq_col"].to_local(), ref.state[p]["exp_avg_sq_col"])
            torch.testing.assert_close(state["exp_avg_sq_row"].full_tensor(), ref.state[p]["exp_avg_sq_row"])
            assert "exp_avg_sq" not in state


@pytest.mark.parametrize("mode", list(MODES))
def test_adafactor_row_sharded_equals_whole(mode: str) -> None:
    run_ranks(_run, MODES[mode])
