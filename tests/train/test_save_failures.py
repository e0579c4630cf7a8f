"""Saves that fail on one rank, and runs stopped by signals, on 1 and 2 processes.

A rank whose part of a save fails (disk full on its node, any exception) must not leave the others waiting at
a barrier: every rank ends within seconds with the same one-line error, the previous checkpoint and ``latest``
intact. SIGTERM/SIGINT finish the step, save and exit 0 on every rank; a second Ctrl-C while that checkpoint is
written is ignored; one that stops the run before any checkpoint exists is said by the next run.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from flatlm.train.checkpoint import CHECKPOINT_DIR, LATEST
from flatlm.train.inspect import final_state
from flatlm.train.metrics import read_jsonl
from tests.train.forked import run_jobs
from tests.train.runs import overrides

FAULTS = [  # backend, where, error, failing rank, what rank 0 must report
    ("fsdp2", "rng", "enospc", 1, "rank 1: OSError: [Errno 28] No space left on device"),
    ("fsdp2", "dcp", "enospc", 1, "OSError: [Errno 28] No space left on device (rank 1)"),
    (
        "zero2",
        "engine",
        "enospc",
        1,
        "rank 1: RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0",
    ),
    ("zero2", "recovery", "enospc", 0, "rank 0: OSError: [Errno 28] No space left on device"),
    ("fsdp2", "rng", "exception", 0, "rank 0: RuntimeError: a planted failure"),
]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_save_failing_on_one_rank_fails_every_rank_at_once(tmp_path: Path, text_corpus: Path) -> None:
    runs = [tmp_path / f"{b}-{w}-{e}-rank{r}" for b, w, e, r, _ in FAULTS]
    jobs = [
        {
            "args": overrides(run, text_corpus, "adamw", backend),
            "nproc": 2,
            "grace_s": 10,
            "fault": {"rank": rank, "where": where, "error": error, "save": 2},  # the save of step 6
        }
        for run, (backend, where, error, rank, _) in zip(runs, FAULTS, strict=True)
    ]
    problems = {}
    for run, (*_, want), r in zip(runs, FAULTS, run_jobs(jobs, tmp_path / "driver"), strict=True):
        errors = [line for line in r["logs"][0].splitlines() if "error:" in line]
        root = run / CHECKPOINT_DIR
        if r["hung"] or r["codes"] != [2, 2]:
            problems[run.name] = f"exit codes {r['codes']} (hung: {r['hung']}):\n{r['logs'][0][-2000:]}"
        elif r["spread_s"] > 5:
            problems[run.name] = f"the ranks ended {r['spread_s']:.1f} s apart"
        elif len(errors) != 1 or f"saving checkpoint step-6 into {root} failed ({want})" not in errors[0]:
            problems[run.name] = f"error lines: {errors}"
        elif any("Traceback" in log for log in r["logs"]):
            problems[run.name] = "a traceback was printed:\n" + "\n".join(r["logs"])[-2000:]
        elif (root / LATEST).read_text().strip() != "step-3" or list(root.glob(".step-*")):
            problems[run.name] = f"checkpoints left: {sorted(p.name for p in root.iterdir())}"
    assert not problems, "\n".join(f"{k}: {v}" for k, v in problems.items())
    reruns = [
        {"args": overrides(run, text_corpus, "adamw", b), "nproc": 2} for run, (b, *_) in zip(runs, FAULTS, strict=True)
    ]
    for run, r in zip(runs, run_jobs(reruns, tmp_path / "driver-rerun"), strict=True):
        assert r["codes"] == [0, 0], r["logs"][0][-2000:]
        assert f"resuming from {run / CHECKPOINT_DIR / 'step-3'} (step 3)" in r["logs"][0]
        assert [x["step"] for x in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
        assert final_state(run)


LONG = {"train.max_steps": 500, "checkpoint.every": 0, "train.eval_every": 0}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_signals_stop_after_a_saved_step_on_every_rank(tmp_path: Path, text_corpus: Path) -> None:
    """SIGTERM and SIGINT (one process), SIGTERM to rank 1 only (two processes): exit 0 after the same step on
    every rank with that step saved; a second SIGINT during that save is ignored; the reruns resume."""

    def job(name: str, backend: str, signals: list[tuple[int, int, str]]) -> dict:
        out = tmp_path / name
        whens = {
            "steps": {"steps": 2, "metrics": str(out / "metrics.jsonl")},
            "save": {"save": str(out / CHECKPOINT_DIR)},
        }
        return {
            "args": overrides(out, text_corpus, "adamw", backend, **LONG),
            "nproc": 1 if backend == "single" else 2,
            "signals": [{"sig": sig, "rank": rank, "when": whens[when]} for sig, rank, when in signals],
        }

    cases = {
        "sigterm": ("single", [(signal.SIGTERM, 0, "steps")]),
        "sigint": ("single", [(signal.SIGINT, 0, "steps")]),
        "two-processes": ("fsdp2", [(signal.SIGTERM, 1, "steps")]),
        "double-ctrl-c-while-saving": ("single", [(signal.SIGINT, 0, "steps"), (signal.SIGINT, 0, "save")]),
    }
    results = run_jobs([job(name, *case) for name, case in cases.items()], tmp_path / "driver")
    reruns = []
    for (name, (backend, signals)), r in zip(cases.items(), results, strict=True):
        out = tmp_path / name
        log = r["logs"][0]
        assert r["codes"] == [0] * len(r["codes"]), f"{name}: {r['codes']} {r['signals']}\n{log[-3000:]}"
        done = len(read_jsonl(out / "metrics.jsonl"))
        who = signal.Signals(signals[0][0]).name if signals[0][1] == 0 else "a signal on another rank"
        assert f"stopped by {who} after step {done}; checkpoint saved" in log, f"{name}: {log[-2000:]}"
        if name == "two-processes":  # rank 1 got the signal and stopped after the same step
            assert f"after step {done}" in log and r["logs"][1].count("Traceback") == 0
        if name.startswith("double"):
            assert "still writing the checkpoint; the run stops as soon as it is complete" in log, log[-2000:]
        assert (out / CHECKPOINT_DIR / LATEST).read_text().strip() == f"step-{done}", name
        assert final_state(out)
        extra = {**LONG, "train.max_steps": done + 2}
        reruns.append({"args": overrides(out, text_corpus, "adamw", backend, **extra), "nproc": len(r["codes"])})
    for (name, _), r in zip(cases.items(), run_jobs(reruns, tmp_path / "driver-rerun"), strict=True):
        steps = [x["step"] for x in read_jsonl(tmp_path / name / "metrics.jsonl")]
        assert r["codes"] == [0] * len(r["codes"]), r["logs"][0][-2000:]
        assert "resuming from" in r["logs"][0] and steps == list(range(1, len(steps) + 1)), name


@pytest.mark.slow
def test_double_ctrl_c_before_any_checkpoint_is_said_by_the_next_run(tmp_path: Path, text_corpus: Path) -> None:
    """A second signal outside a save stops the run at once; before any checkpoint exists, the rerun warns that it
    starts from step 0 instead of doing so silently. The two signals differ (SIGTERM, then SIGINT 0 ms later): two
    identical ones sent that close may be delivered as one (or taken as one request relayed twice), while a SIGINT
    after a SIGTERM is a person's "stop now" however soon it comes."""
    out = tmp_path / "run"
    when = {"steps": 2, "metrics": str(out / "metrics.jsonl")}
    wide = {"model.overrides.hidden_size": 512, "model.overrides.intermediate_size": 1408}
    first = {
        "args": overrides(out, text_corpus, "adamw", **LONG, **wide),
        "signals": [{"sig": signal.SIGTERM, "when": when}, {"sig": signal.SIGINT, "when": when}],
    }
    (killed,) = run_jobs([first], tmp_path / "driver")
    assert killed["codes"] in ([-signal.SIGINT], [-signal.SIGTERM]), killed["logs"][0][-2000:]
    assert not (out / CHECKPOINT_DIR).is_dir() or not list((out / CHECKPOINT_DIR).glob("step-*"))
    (rerun,) = run_jobs(
        [{"args": overrides(out, text_corpus, "adamw", **{**LONG, **wide, "train.max_steps": 3})}], tmp_path / "d2"
    )
    assert rerun["codes"] == [0], rerun["logs"][0][-2000:]
    assert f"[flatlm] {out} has no complete checkpoint: starting from step 0" in rerun["logs"][0]
    assert [x["step"] for x in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
