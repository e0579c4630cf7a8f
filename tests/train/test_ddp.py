"""Data parallel with 2 CPU processes (gloo) equals one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flatlm.config import load_config
from flatlm.train.loop import train
from flatlm.train.metrics import read_jsonl
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LR = {"lion": 3e-4, "muon": 3e-3, "adafactor": 1e-2}
EXTRA = {"adafactor": {"optim.hparams.relative_step": False}}


def _launch(args: list[str], *, accelerate: bool) -> subprocess.CompletedProcess:
    if accelerate:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "configs/accelerate/ddp.yaml"),
            "--num_processes",
            "2",
            "-m",
            "flatlm.train",
            *args,
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "flatlm.train",
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "accelerate"),
    [("adamw", True), ("sam", False), ("lion", False), ("adafactor", False), ("muon", False)],
)
def test_ddp_two_processes_equal_single(tmp_path: Path, text_corpus: Path, name: str, accelerate: bool) -> None:
    extra = {
        "optim.name": name,
        "optim.lr": LR.get(name, 3e-3),
        "train.max_steps": 4,
        "train.eval_every": 0,
        **EXTRA.get(name, {}),
    }
    single = train(load_config(None, tiny_overrides(tmp_path / "single", text_corpus, **extra))).losses
    out = tmp_path / "ddp"
    r = _launch(tiny_overrides(out, text_corpus, **extra), accelerate=accelerate)
    assert r.returncode == 0, r.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [rec["loss"] for rec in records] == pytest.approx(single, rel=1e-4)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["parallel"]["backend"] == "ddp"
    assert all(rec["optim_state_bytes"] > 0 for rec in records)


@pytest.mark.slow
def test_ddp_bad_batch_layout_fails_once_cleanly(tmp_path: Path, text_corpus: Path) -> None:
    # 8 sequences over 2 processes x micro-batch 3 does not divide: both ranks refuse, one message.
    r = _launch(tiny_overrides(tmp_path / "r", text_corpus, **{"train.micro_batch_size": 3}), accelerate=False)
    assert r.returncode != 0
    assert r.stderr.count("is not divisible by train.micro_batch_size=3 x world size 2") == 1
    assert not (tmp_path / "r").exists()
