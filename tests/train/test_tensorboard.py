"""TensorBoard agrees with metrics.jsonl after a resume, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flatlm.config import load_config
from flatlm.train.loop import train
from flatlm.train.metrics import read_jsonl
from tests.conftest import tiny_overrides


def _scalars(log_dir: Path, tag: str, purge: bool = True) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(log_dir), purge_orphaned_data=purge)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_shows_each_step_once(tmp_path: Path, text_corpus: Path) -> None:
    """The newest checkpoint is unreadable, so the rerun resumes at step 4 and runs steps 5 and 6 again: TensorBoard
    must show each step once, with the values metrics.jsonl keeps (it drops the records past the checkpoint)."""
    out = tmp_path / "run"
    overrides = tiny_overrides(out, text_corpus, **{"train.tensorboard": True, "checkpoint.every": 2})
    train(load_config(None, overrides))
    for shard in (out / "checkpoints" / "step-6" / "state").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated: the rerun falls back to step-4
    result = train(load_config(None, overrides))
    assert len(result.losses) == 2

    log_dir = out / "tensorboard"
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    loss = _scalars(log_dir, "train/loss")
    assert [step for step, _ in loss] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in loss] == [float(np.float32(r["loss"])) for r in records]  # TB keeps float32
    assert [step for step, _ in _scalars(log_dir, "eval/val_loss")] == [3, 6]
    # The premise: steps 5 and 6 were written twice; the purge marker is what hides the first ones.
    assert [step for step, _ in _scalars(log_dir, "train/loss", purge=False)] == [1, 2, 3, 4, 5, 6, 5, 6]
