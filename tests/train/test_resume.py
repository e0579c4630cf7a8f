"""Auto-resume from sharded (DCP) checkpoints: an interrupted run continues bit-identically."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flatlm.config import load_config
from flatlm.errors import FlatlmError
from flatlm.train.checkpoint import CHECKPOINT_DIR, LATEST
from flatlm.train.loop import train
from flatlm.train.metrics import read_jsonl
from tests.conftest import tiny_overrides
from tests.train.launching import ROOT, launch

EXTRA = {"adafactor": {"optim.hparams.relative_step": False}}


def _overrides(out: Path, corpus: Path, optim: str, **extra: object) -> list[str]:
    base = {"optim.name": optim, "train.max_steps": 6, "checkpoint.every": 3, "train.eval_every": 3}
    return tiny_overrides(out, corpus, **{**base, **EXTRA.get(optim, {}), **extra})


def interrupt_after(out: Path, step: int) -> None:
    """Make ``out`` look like a run killed after saving step ``step``: later checkpoints gone, ``latest`` at
    ``step``; the metrics of the later steps stay (a resume must replace them, not duplicate them)."""
    root = out / CHECKPOINT_DIR
    for path in root.glob("step-*"):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    (root / LATEST).write_text(f"step-{step}\n")


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw", "adafactor", "lion", "muon", "sam"])
def test_interrupted_run_resumes_bit_identical(tmp_path: Path, text_corpus: Path, optim: str) -> None:
    full = tmp_path / "full"
    train(load_config(None, _overrides(full, text_corpus, optim)))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    interrupt_after(resumed, 3)
    result = train(load_config(None, _overrides(resumed, text_corpus, optim)))
    assert len(result.losses) == 3  # steps 4-6 only
    expected, got = read_jsonl(full / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # replaced, not duplicated
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # bit-identical
    assert [r["lr"] for r in got] == [r["lr"] for r in expected]
    assert [r["step"] for r in read_jsonl(resumed / "eval.jsonl")] == [3, 6]


@pytest.mark.slow
def test_raising_max_steps_continues_a_finished_run(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, _overrides(out, text_corpus, "adamw", **{"train.max_steps": 3})))
    result = train(load_config(None, _overrides(out, text_corpus, "adamw", **{"train.max_steps": 5})))
    assert len(result.losses) == 2
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    again = train(load_config(None, _overrides(out, text_corpus, "adamw", **{"train.max_steps": 5})))
    assert again.losses == []  # already done: nothing to run, nothing rewritten
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "optim"),
    [
        ("ddp", "muon"),
        *[("fsdp2", o) for o in ("adamw", "adafactor", "lion", "muon", "sam")],
        *[("zero2", o) for o in ("adamw", "adafactor", "lion", "muon", "sam")],
    ],
)
def test_two_process_run_resumes_bit_identical(tmp_path: Path, text_corpus: Path, backend: str, optim: str) -> None:
    args = {"parallel.backend": backend, "train.micro_batch_size": 2}
    full = tmp_path / "full"
    r = launch(_overrides(full, text_corpus, optim, **args))
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    interrupt_after(resumed, 3)
    r = launch(_overrides(resumed, text_corpus, optim, **args))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    expected, got = read_jsonl(full / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]


def _run_on(backend: str, out: Path, corpus: Path, optim: str) -> None:
    args = {"train.micro_batch_size": 2}
    if backend == "single":
        train(load_config(None, _overrides(out, corpus, optim, **args)))
        return
    r = launch(_overrides(out, corpus, optim, **args, **{"parallel.backend": backend}))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "then", "optim"),
    [("fsdp2", "single", "adafactor"), ("single", "fsdp2", "muon"), ("ddp", "single", "sam")],
)
def test_checkpoint_resumes_on_another_world_size(
    tmp_path: Path, text_corpus: Path, first: str, then: str, optim: str
) -> None:
    """Written by N processes, resumed by M: same model and optimizer state, so the continuation matches."""
    full = tmp_path / "full"
    _run_on(first, full, text_corpus, optim)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    interrupt_after(resumed, 3)
    _run_on(then, resumed, text_corpus, optim)
    expected, got = read_jsonl(full / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_exits_zero_and_rerun_resumes(tmp_path: Path, text_corpus: Path, sig: signal.Signals) -> None:
    out = tmp_path / "run"
    args = _overrides(out, text_corpus, "adamw", **{"train.max_steps": 500, "checkpoint.every": 0})
    proc = subprocess.Popen([sys.executable, "-m", "flatlm.train", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(read_jsonl(metrics)) >= 2) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    done = len(read_jsonl(metrics))
    assert f"stopped by {sig.name} after step {done}" in err
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{done}"
    result = train(load_config(None, _overrides(out, text_corpus, "adamw", **{"train.max_steps": done + 2})))
    assert len(result.losses) == 2
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, done + 3))


@pytest.mark.slow
def test_corrupt_checkpoint_falls_back_to_the_previous(tmp_path: Path, text_corpus: Path) -> None:
    full = tmp_path / "full"
    train(load_config(None, _overrides(full, text_corpus, "adamw")))
    broken = tmp_path / "broken"
    shutil.copytree(full, broken)
    for shard in (broken / "checkpoints" / "step-6" / "state").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated, as a full disk leaves it
    result = train(load_config(None, _overrides(broken, text_corpus, "adamw")))
    assert len(result.losses) == 3  # resumed at step 3, the newest readable checkpoint
    got, expected = read_jsonl(broken / "metrics.jsonl"), read_jsonl(full / "metrics.jsonl")
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]
    assert (broken / "checkpoints" / "latest").read_text().strip() == "step-6"  # rewritten, readable again


class _Exploit:
    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(tempfile.gettempdir()) / "flatlm-pickle-ran"


@pytest.mark.slow
def test_checkpoint_with_a_malicious_pickle_is_refused(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, _overrides(out, text_corpus, "adamw", **{"train.max_steps": 3})))
    MARKER.unlink(missing_ok=True)
    (out / "checkpoints" / "step-3" / "state" / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(FlatlmError, match="no checkpoint in .* can be read"):
        train(load_config(None, _overrides(out, text_corpus, "adamw", **{"train.max_steps": 5})))
    assert not MARKER.exists()  # the pickle never ran


@pytest.mark.slow
def test_sigkill_during_saves_never_breaks_latest(tmp_path: Path, text_corpus: Path) -> None:
    """Kill -9 a run that checkpoints every step at random moments: ``latest`` always names a complete,
    loadable checkpoint, and the rerun resumes from it."""
    out = tmp_path / "run"
    extra = {"train.max_steps": 100_000, "checkpoint.every": 1, "checkpoint.keep_last": 2, "train.eval_every": 0}
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-m", "flatlm.train", *_overrides(out, text_corpus, "adamw", **extra)],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while not (out / "checkpoints" / "latest").is_file() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait()
        latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
        assert (latest / "trainer_state.json").is_file() and (latest / "state" / ".metadata").is_file()
        step = json.loads((latest / "trainer_state.json").read_text())["step"]
        assert step >= 1
    done = json.loads((latest / "trainer_state.json").read_text())["step"]
    result = train(load_config(None, _overrides(out, text_corpus, "adamw", **{**extra, "train.max_steps": done + 1})))
    assert len(result.losses) == 1
    assert not list((out / "checkpoints").glob(".step-*"))  # partial saves cleaned up
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, done + 2))


@pytest.mark.slow
def test_switching_optimizer_needs_load_optimizer_false(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, _overrides(out, text_corpus, "adamw", **{"train.max_steps": 3})))
    with pytest.raises(FlatlmError, match=r"holds a different run \(optim.name: 'adamw' -> 'lion'\).*load_optimizer"):
        train(load_config(None, _overrides(out, text_corpus, "lion", **{"train.max_steps": 5})))
    with pytest.raises(FlatlmError, match=r"model.overrides.hidden_size: 64 -> 32"):
        train(load_config(None, _overrides(out, text_corpus, "adamw", **{"model.overrides.hidden_size": 32})))
    extra = {"train.max_steps": 5, "checkpoint.load_optimizer": False, "optim.lr": 3e-4}
    result = train(load_config(None, _overrides(out, text_corpus, "lion", **extra)))
    assert len(result.losses) == 2  # continued from step 3's weights with a fresh Lion
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[3]["lr"] < 3e-4  # the new optimizer's lr on the resumed schedule, not AdamW's 3e-3


@pytest.mark.slow
def test_failed_save_keeps_the_previous_checkpoint(
    tmp_path: Path, text_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed.checkpoint as dcp

    real_save, calls = dcp.save, []

    def save_until_disk_full(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", save_until_disk_full)
    out = tmp_path / "run"
    with pytest.raises(FlatlmError, match="saving checkpoint step-6 .* failed .*No space left.* are intact"):
        train(load_config(None, _overrides(out, text_corpus, "adamw")))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-3"
    assert not list((out / "checkpoints").glob(".step-*"))  # nothing half-written left behind
    monkeypatch.setattr(dcp, "save", real_save)
    result = train(load_config(None, _overrides(out, text_corpus, "adamw")))
    assert len(result.losses) == 3  # resumed from the intact step 3
