from __future__ import annotations

import math

import pytest
import torch

from flatlm.errors import FlatlmError
from flatlm.optim.schedules import SCHEDULES, build_scheduler


def _lrs(name: str, steps: int = 20, peak: float = 2.0, **kw) -> list[float]:
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": peak}, {"params": [b], "lr": peak / 10}])
    sched = build_scheduler(name, opt, total_steps=steps, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == pytest.approx(out[-1] / 10)  # groups move in proportion
        opt.step()
        sched.step()
    return out


def test_cosine_formula() -> None:
    lrs = _lrs("cosine", steps=20, warmup_steps=5, min_lr_ratio=0.1)
    assert lrs[:5] == pytest.approx([2.0 * k / 5 for k in range(1, 6)])
    for t in range(5, 20):
        p = (t - 5) / 15
        assert lrs[t] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))))


def test_linear_and_constant() -> None:
    assert _lrs("linear", steps=11, min_lr_ratio=0.0) == pytest.approx([2.0 * (1 - t / 11) for t in range(11)])
    assert _lrs("constant", steps=6, warmup_steps=2) == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0, 2.0])


def test_wsd_stable_then_decay_to_min() -> None:
    lrs = _lrs("wsd", steps=20, warmup_steps=0, min_lr_ratio=0.1, decay_fraction=0.25)
    assert lrs[:15] == pytest.approx([2.0] * 15)
    assert lrs[15:] == pytest.approx([2.0 * (1 - 0.9 * k / 5) for k in range(1, 6)])
    assert lrs[-1] == pytest.approx(0.2)


def test_step_decay() -> None:
    lrs = _lrs("step", steps=9, warmup_steps=1, step_size=3, gamma=0.5)
    assert lrs == pytest.approx([2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5])


def test_errors() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(FlatlmError, match="unknown schedule 'cosin'.*did you mean 'cosine'"):
        build_scheduler("cosin", opt, total_steps=3)
    with pytest.raises(FlatlmError, match="takes no argument 'gamma'"):
        build_scheduler("cosine", opt, total_steps=3, gamma=0.1)
    assert set(SCHEDULES) == {"constant", "cosine", "linear", "wsd", "step"}
