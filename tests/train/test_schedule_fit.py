"""Schedules that fit the run: warmup as a fraction of it, a warning when warmup covers it; data.seed apart from the
model's seed; the peak memory in every step record."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from flatlm.config import load_config
from flatlm.optim import build_scheduler
from flatlm.parallel import environment
from flatlm.train.checks import schedule_kwargs, schedule_warning, warmup_steps
from flatlm.train.loop import setup, train
from flatlm.train.metrics import read_jsonl
from tests.conftest import tiny_overrides


def _lrs(overrides: list[str]) -> list[float]:
    cfg = load_config(None, overrides)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(cfg.schedule.name, opt, **schedule_kwargs(cfg))
    out = []
    for _ in range(cfg.train.max_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("steps", [20, 200])
def test_warmup_fraction_scales_with_the_run(steps: int) -> None:
    lrs = _lrs([f"train.max_steps={steps}", "schedule.warmup_fraction=0.1", "schedule.min_lr_ratio=0.1"])
    warm = steps // 10
    assert lrs[:warm] == pytest.approx([(k + 1) / warm for k in range(warm)])  # linear warmup over 10% of the run
    assert lrs[warm] == pytest.approx(1.0)
    assert lrs[-1] < 0.15  # and it decays to near min_lr_ratio by the end, whatever the length


def test_warmup_fraction_takes_the_place_of_warmup_steps() -> None:
    cfg = load_config(None, ["train.max_steps=30", "schedule.warmup_steps=25", "schedule.warmup_fraction=0.2"])
    assert warmup_steps(cfg) == 6 and schedule_kwargs(cfg)["warmup_steps"] == 6
    assert warmup_steps(load_config(None, ["schedule.warmup_steps=7"])) == 7  # without a fraction: the steps


def test_wsd_with_fractions_decays_at_the_end_of_any_run() -> None:
    for steps in (20, 100):
        lrs = _lrs(
            [f"train.max_steps={steps}", "schedule.name=wsd", "schedule.warmup_fraction=0.1", "schedule.min_lr_ratio=0"]
        )
        decay = [t for t in range(steps) if lrs[t] < 1.0 and t >= steps // 10]
        assert decay and decay[0] >= steps * 0.75 and lrs[-1] < 0.2  # the last ~20% of the post-warmup steps


def test_warning_when_warmup_covers_the_run() -> None:
    assert "covers the whole run" in schedule_warning(load_config(None, ["train.max_steps=20"]))  # default 20 steps
    assert schedule_warning(load_config(None, ["train.max_steps=21"])) is None
    assert schedule_warning(load_config(None, ["train.max_steps=20", "schedule.warmup_fraction=0.1"])) is None


def test_loop_warns_and_records_peak_memory(
    tmp_path: Path, text_corpus: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flatlm")
    out = tmp_path / "run"
    train(load_config(None, tiny_overrides(out, text_corpus, **{"train.max_steps": 3, "schedule.warmup_steps": 5})))
    assert any("covers the whole run" in r.message for r in caplog.records)
    peaks = [r["peak_mem_bytes"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(peaks) == 3 and peaks[0] > 50 * 2**20 and peaks == sorted(peaks)  # a peak only grows


def test_data_seed_fixes_split_and_order_apart_from_the_model_seed(tmp_path: Path, text_corpus: Path) -> None:
    env = environment()

    def built(name: str, **extra: object):
        return setup(load_config(None, tiny_overrides(tmp_path / name, text_corpus, **extra)), env, torch.device("cpu"))

    base = built("a", seed=0)
    same_data = built("b", seed=1, **{"data.seed": 0})
    other = built("c", seed=1)
    assert np.array_equal(base.sampler.global_batch(0), same_data.sampler.global_batch(0))
    assert base.data.train.num_tokens == same_data.data.train.num_tokens
    emb = "model.embed_tokens.weight"
    assert not torch.equal(base.model.state_dict()[emb], same_data.model.state_dict()[emb])  # init follows `seed`
    assert not np.array_equal(base.sampler.global_batch(0), other.sampler.global_batch(0))  # data follows it too
