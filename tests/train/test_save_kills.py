"""SIGKILL at random moments inside checkpoint saves, single-process and on 2 processes: ``latest`` always
names a complete checkpoint, every restart resumes from it, the run finishes.

Each kill is timed from the save itself: the driver (``tests.train.forked``) waits for the ``.step-N.tmp``
directory a save writes into, then kills every rank after a random offset within the measured save duration.
The kills that landed inside a save (its directory not yet renamed, or ``latest`` not yet naming it) are
counted and must be most of them: a kill during start-up or training proves nothing about saves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flatlm.train.inspect import final_state
from flatlm.train.metrics import read_jsonl
from tests.train.forked import run_jobs
from tests.train.runs import overrides

KILLS = 20  # kills that must land inside a save, per case
MAX_ROUNDS = 28  # kills in all (measured under load: 20-25 rounds give 20 inside saves)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_inside_saves_always_leaves_a_complete_latest(tmp_path: Path, text_corpus: Path) -> None:
    cases = {"single": 1, "fsdp2": 2, "zero2": 2}
    extra = {"train.max_steps": 100_000, "checkpoint.every": 1, "checkpoint.keep_last": 2, "train.eval_every": 0}
    jobs = []
    for backend, nproc in cases.items():
        out = tmp_path / backend
        jobs.append(
            {
                "args": overrides(out, text_corpus, "adamw", backend, **extra),
                "nproc": nproc,
                "kill_in_save": {"output_dir": str(out), "kills": KILLS, "max_rounds": MAX_ROUNDS, "calibrate": 3},
            }
        )
    results = run_jobs(jobs, tmp_path / "driver", timeout=580)
    finish = []
    for (backend, nproc), result in zip(cases.items(), results, strict=True):
        rounds = result["rounds"]
        root = tmp_path / backend / "checkpoints"
        phases = [r["phase"] for r in rounds]
        inside = sum(p in ("writing", "renamed") for p in phases)
        assert inside >= KILLS, f"{backend}: only {inside} of {len(rounds)} kills landed inside a save: {phases}"
        for i, r in enumerate(rounds):
            assert r["complete"], f"{backend} kill {i} ({r['phase']}, {r['offset_s']:.3f} s): latest={r['latest']}"
            if i:  # every restart resumed from what latest named after the previous kill
                assert f"resuming from {root / rounds[i - 1]['latest']} " in r["log"], r["log"][-2000:]
        done = json.loads((root / rounds[-1]["latest"] / "trainer_state.json").read_text())["step"]
        args = overrides(tmp_path / backend, text_corpus, "adamw", backend, **{**extra, "train.max_steps": done + 1})
        finish.append({"args": args, "nproc": nproc})
        print(
            f"{backend}: {inside}/{len(rounds)} kills inside saves; phases {phases}; "
            f"window {rounds[0]['window_s']:.3f} s"
        )
    for (backend, _), result in zip(cases.items(), run_jobs(finish, tmp_path / "finish"), strict=True):
        assert result["codes"] == [0] * len(result["codes"]), result["logs"][0][-3000:]
        out = tmp_path / backend
        steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
        assert steps == list(range(1, len(steps) + 1)), f"{backend}: metrics not contiguous: {steps}"
        assert not list((out / "checkpoints").glob(".step-*")), "partial saves left behind"
        assert final_state(out)  # the final checkpoint reads back by name


@pytest.mark.slow
def test_the_kill_check_catches_a_save_that_names_latest_too_early(tmp_path: Path, text_corpus: Path) -> None:
    """Planted bug: ``latest`` replaced before the checkpoint is written. Kills inside saves must then find it
    naming an incomplete checkpoint (the check above would fail)."""
    out = tmp_path / "run"
    extra = {"train.max_steps": 100_000, "checkpoint.every": 1, "checkpoint.keep_last": 2, "train.eval_every": 0}
    job = {
        "args": overrides(out, text_corpus, "adamw", **extra),
        "fault": {"rank": 0, "where": "early-latest"},
        "kill_in_save": {"output_dir": str(out), "kills": 3, "max_rounds": 3, "calibrate": 3},
    }
    (result,) = run_jobs([job], tmp_path / "driver")
    rounds = result["rounds"]
    assert any(r["phase"] == "writing" and not r["complete"] for r in rounds), rounds
