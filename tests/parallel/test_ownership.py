"""ZeRO-1 by parameter ownership (ddp + parallel.shard_optimizer_state) equals the unsharded optimizer."""

from __future__ import annotations

import pytest
import torch

from flatlm.optim import build_optimizer
from flatlm.optim.distribution import Distribution
from flatlm.optim.state_size import optimizer_state_bytes
from flatlm.parallel.ownership import OwnedParamsOptimizer, assign_owners
from tests.ranks import run_ranks

SHAPES = [(12, 8), (8, 12), (16,), (12, 8), (8, 8), (8,)]


def test_assign_owners_balances_by_size() -> None:
    params = [torch.zeros(s) for s in SHAPES]
    owner = assign_owners(params, 2)
    load = [sum(p.numel() for p in params if owner[id(p)] == r) for r in range(2)]
    assert sum(load) == sum(p.numel() for p in params) and max(load) - min(load) <= 16


def _groups(params: list[torch.nn.Parameter], muon: bool) -> list[dict]:
    if muon:
        return [
            {"params": [p for p in params if p.ndim == 2], "use_muon": True},
            {"params": [p for p in params if p.ndim != 2], "use_muon": False},
        ]
    return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]


HPARAMS = {"adafactor": {"relative_step": False}}
OWNED = Distribution(step_wrapper=OwnedParamsOptimizer)


def _run(rank: int, world: int, name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    ref = build_optimizer(name, _groups(a, name == "muon"), lr=1e-2, **HPARAMS.get(name, {}))
    hp = HPARAMS.get(name, {})
    owned = build_optimizer(name, _groups(b, name == "muon"), lr=1e-2, distribution=OWNED, **hp)
    for step in range(3):
        for p, q in zip(a, b, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        for g in owned.param_groups:  # a scheduler moves the outer groups' lr: the inner optimizer follows
            g["lr"] = 1e-2 / (step + 1)
        for g in ref.param_groups:
            g["lr"] = 1e-2 / (step + 1)
        ref.step()
        owned.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=0)
    # balanced by parameter size, so state proportional to it halves (Adafactor's n + m per matrix need not)
    limit = 0.8 if name == "adafactor" else 0.55
    assert optimizer_state_bytes(owned) <= limit * optimizer_state_bytes(ref)
    # state_dict round trip on this rank's shard
    sd = owned.state_dict()
    fresh = build_optimizer(name, _groups(b, name == "muon"), lr=1e-2, distribution=OWNED, **HPARAMS.get(name, {}))
    fresh.load_state_dict(sd)
    for p in b:
        for k, v in owned.state.get(p, {}).items():
            torch.testing.assert_close(fresh.state[p][k], v)


@pytest.mark.parametrize("name", ["adamw", "muon", "adafactor", "lion", "sam"])
def test_owned_equals_unsharded(name: str) -> None:
    run_ranks(_run, name)
