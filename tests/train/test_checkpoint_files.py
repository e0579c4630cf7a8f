"""The checkpoint directory's bookkeeping, in one process: rotation, an interrupted same-step swap, clean-up
failures after a save has landed. (Kills and failures across ranks: test_save_kills.py, test_save_failures.py.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import flatlm.train.checkpoint as checkpoint
from flatlm.train.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    TRAINER_STATE,
    recover_interrupted_swap,
    save_checkpoint,
)


def _save(out: Path, step: int, keep_last: int = 5, mark: str = "") -> Path:
    # DeepSpeed-style call without DCP state: the parts are the RNG file and a marker file.
    return save_checkpoint(out, step, None, {"mark": mark}, "seed: 0\n", keep_last, legacy_files={"x.pt": {}})


def _steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir())


def test_rotation_keeps_the_checkpoint_just_saved_after_a_fallback(tmp_path: Path) -> None:
    """A resume that fell back past a broken step-6 to step-3 then saves step-4 with keep_last=1: rotation by step
    number alone deleted step-4 itself (latest named a deleted directory); now the newer timeline is left alone."""
    for step in (3, 6):
        _save(tmp_path, step)
    _save(tmp_path, 4, keep_last=1)
    assert _steps(tmp_path) == [LATEST, "step-4", "step-6"]
    assert (tmp_path / CHECKPOINT_DIR / LATEST).read_text().strip() == "step-4"
    _save(tmp_path, 5, keep_last=2)
    assert _steps(tmp_path) == [LATEST, "step-4", "step-5", "step-6"]


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not an OSError, so no handler sees it)."""


def test_a_kill_between_the_swap_renames_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving a step that already has a checkpoint renames step-N away, then the new copy in: killed in between,
    latest names a missing step-N. The next start puts the new copy back instead of falling back (or to step 0)."""
    _save(tmp_path, 3, mark="first")
    real_rename = checkpoint.os.rename

    def killed_before_second(src: str | Path, dst: str | Path) -> None:
        if Path(src).name == ".step-3.tmp":
            raise _Killed
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", killed_before_second)
    with pytest.raises(_Killed):
        _save(tmp_path, 3, mark="second")
    monkeypatch.setattr(checkpoint.os, "rename", real_rename)
    root = tmp_path / CHECKPOINT_DIR
    assert not (root / "step-3").exists() and checkpoint.list_checkpoints(tmp_path) == []  # what a start found
    assert recover_interrupted_swap(tmp_path) == ".step-3.tmp"
    assert json.loads((root / "step-3" / TRAINER_STATE).read_text())["mark"] == "second"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-3"]
    assert recover_interrupted_swap(tmp_path) is None  # nothing left to recover


def test_cleanup_failing_after_latest_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Once latest names the new checkpoint the save has landed: a failing rotation must not report the save as
    failed (exit 2, 'previous checkpoints intact') when it is not."""
    _save(tmp_path, 3)

    def broken_rotate(*args: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint, "_rotate", broken_rotate)
    with caplog.at_level(logging.WARNING, logger="flatlm"):
        final = _save(tmp_path, 6, keep_last=1)
    assert final.name == "step-6" and (tmp_path / CHECKPOINT_DIR / LATEST).read_text().strip() == "step-6"
    assert "checkpoint step-6 is saved, but removing older checkpoints failed" in caplog.text


def _complete(out: Path, step: int) -> None:
    path = out / CHECKPOINT_DIR / f"step-{step}"
    (path / checkpoint.STATE_DIR).mkdir(parents=True)
    (path / checkpoint.STATE_DIR / ".metadata").write_bytes(b"")
    (path / TRAINER_STATE).write_text(json.dumps({"step": step}))


def _agree_on_rank_zeros_list(rank: int, world_size: int, base: str) -> None:
    # Each rank sees a different directory (as a rank whose listing raced a save or clean-up would): rank 0 has
    # step-3, rank 1 step-6. Alone they would resume different checkpoints; agreed, both take rank 0's.
    out = Path(base) / f"rank{rank}"
    _complete(out, 3 if rank == 0 else 6)
    own = checkpoint.resumable_checkpoints(out)
    assert [p.name for p in own] == ["step-3" if rank == 0 else "step-6"]  # what each would pick alone
    assert checkpoint.agreed_candidates(out) == [Path(base) / "rank0" / CHECKPOINT_DIR / "step-3"]


@pytest.mark.timeout(120)
def test_ranks_resume_from_rank_zeros_list(tmp_path: Path) -> None:
    from tests.ranks import run_ranks

    run_ranks(_agree_on_rank_zeros_list, str(tmp_path))
