"""End-to-end runs of the loop on a small corpus made on disk (seconds each)."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from flatlm.config import load_config
from flatlm.errors import FlatlmError
from flatlm.train.loop import train
from flatlm.train.metrics import read_jsonl
from tests.conftest import tiny_overrides


def _run(out: Path, corpus: Path, **extra: object):
    return train(load_config(None, tiny_overrides(out, corpus, **extra)))


def checkpoint_keys(step_dir: Path) -> set[str]:
    """The tensor names a DCP checkpoint holds."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(step_dir / "state")).read_metadata().state_dict_metadata)


def test_tiny_run_writes_everything(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "run"
    result = _run(out, text_corpus, **{"train.tensorboard": True, "train.plot": True, "checkpoint.every": 4})
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and "eval" not in r
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [3, 6] and all(e["eval"] for e in evals)
    assert evals[-1]["val_ppl"] == pytest.approx(torch.tensor(evals[-1]["val_loss"]).exp().item(), rel=1e-6)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 6 and saved["parallel"]["backend"] == "single"
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-4", "step-6"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-6"
    state = json.loads((out / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["tokens"] == 6 * 8 * 32
    saved_keys = checkpoint_keys(out / "checkpoints" / "step-6")
    assert "model.model.embed_tokens.weight" in saved_keys
    assert "optim.state.model.embed_tokens.weight.exp_avg" in saved_keys
    assert (out / "checkpoints" / "step-6" / "rng-rank0.json").is_file()
    assert (out / "loss.png").stat().st_size > 5000
    assert list((out / "tensorboard").iterdir())
    assert result.losses == [r["loss"] for r in records]


def test_schedule_warmup_then_cosine_to_min(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "run"
    _run(out, text_corpus, **{"train.max_steps": 10, "schedule.warmup_steps": 4, "schedule.min_lr_ratio": 0.1})
    lrs = [r["lr"] for r in read_jsonl(out / "metrics.jsonl")]
    peak = 3e-3
    assert lrs[:4] == pytest.approx([peak * k / 4 for k in (1, 2, 3, 4)])
    assert lrs[4] == pytest.approx(peak) and all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[-1] > 0.1 * peak


def test_bit_identical_losses_for_same_config_and_seed(tmp_path: Path, text_corpus: Path) -> None:
    a = _run(tmp_path / "a", text_corpus).losses
    b = _run(tmp_path / "b", text_corpus).losses
    c = _run(tmp_path / "c", text_corpus, seed=1).losses
    assert a == b
    assert a != c


def test_accumulation_matches_one_big_micro_batch(tmp_path: Path, text_corpus: Path) -> None:
    a = _run(tmp_path / "a", text_corpus, **{"train.micro_batch_size": 2}).losses
    b = _run(tmp_path / "b", text_corpus, **{"train.micro_batch_size": 8}).losses
    assert a == pytest.approx(b, rel=1e-5)


def test_grad_clip_caps_the_update(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "run"
    _run(out, text_corpus, **{"train.grad_clip": 1e-3, "train.max_steps": 2})
    assert all(r["grad_norm"] > 1e-3 for r in read_jsonl(out / "metrics.jsonl"))  # pre-clip norm is logged


def test_activation_checkpointing_same_losses(tmp_path: Path, text_corpus: Path) -> None:
    a = _run(tmp_path / "a", text_corpus, **{"train.max_steps": 3}).losses
    b = _run(tmp_path / "b", text_corpus, **{"train.max_steps": 3, "model.activation_checkpointing": True}).losses
    assert a == pytest.approx(b, rel=1e-5)


def test_bf16_autocast_runs_and_stays_close(tmp_path: Path, text_corpus: Path) -> None:
    a = _run(tmp_path / "a", text_corpus, **{"train.max_steps": 3}).losses
    b = _run(tmp_path / "b", text_corpus, **{"train.max_steps": 3, "train.bf16": True}).losses
    assert b == pytest.approx(a, rel=2e-2)


# ---- bad input: one clear error, nothing written --------------------------------------------
@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ({"data.seq_len": 2048}, r"data.seq_len=2048 is above the model's maximum positions \(1024"),
        ({"train.global_batch_size": 10}, r"global_batch_size=10 is not divisible by .*micro_batch_size=4"),
        ({"model.name": "tinny"}, r"unknown model preset 'tinny'.*did you mean 'tiny'"),
        ({"optim.name": "adamx"}, r"unknown optimizer 'adamx'.*valid optimizers"),
        ({"schedule.name": "cosin"}, r"unknown schedule 'cosin'.*did you mean 'cosine'"),
        ({"optim.hparams.betaz": "[0.9,0.9]"}, r"no hyperparameter 'betaz'.*did you mean 'betas'"),
        # Values torch only trips over while stepping (an IndexError, a TypeError): caught by the probe step.
        ({"optim.hparams.betas": "[0.9]"}, r"^optim.hparams.betas=\[0.9\] does not work for optimizer 'adamw' "),
        ({"optim.name": "lion", "optim.hparams.betas": 0.9}, r"^optim.hparams.betas=0.9 does not work .*'lion'"),
        ({"optim.name": "sam", "optim.hparams.eps": "x"}, r"^optim.hparams.eps='x' does not work .*'sam'"),
        ({"data.paths": "/nonexistent/*.txt"}, r"data path '/nonexistent/\*.txt' does not exist"),
    ],
)
def test_bad_input_errors_before_writing(tmp_path: Path, text_corpus: Path, extra: dict, pattern: str) -> None:
    out = tmp_path / "run"
    with pytest.raises(FlatlmError, match=pattern):
        _run(out, text_corpus, **extra)
    assert not out.exists()


def test_missing_data_path_writes_nothing(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(FlatlmError, match="does not exist"):
        _run(out, text_corpus, **{"data.paths": f"[{tmp_path}/absent/*.txt]"})
    assert not out.exists()


def test_output_dir_of_a_different_run_is_refused(
    tmp_path: Path, text_corpus: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    _run(out, text_corpus, **{"train.max_steps": 2})
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FlatlmError, match=r"holds a different run \(optim.lr: 0.003 -> 0.01\).*overwrite=true"):
        _run(out, text_corpus, **{"train.max_steps": 2, "optim.lr": 0.01})
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # Asking for it replaces the run, and says which.
    with caplog.at_level(logging.WARNING, logger="flatlm"):
        _run(out, text_corpus, **{"train.max_steps": 3, "optim.lr": 0.01, "overwrite": True})
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("overwrite=true")]
    assert said == [
        f"overwrite=true: replacing the run in '{out}' (a different run: optim.lr: 0.003 -> 0.01; latest checkpoint "
        "step-2; 2 step records); removing config.yaml, metrics.jsonl, eval.jsonl, checkpoints/, tokenizer.model"
    ]
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.01
    assert len(read_jsonl(out / "metrics.jsonl")) == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-3"]


def test_foreign_nonempty_output_dir_refused(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FlatlmError, match="not empty and holds no flatlm run"):
        _run(out, text_corpus)
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_torch_compile_matches_eager_with_sam(tmp_path: Path, text_corpus: Path) -> None:
    """model.compile works, also with SAM swapping parameter storage between the passes."""
    extra = {"optim.name": "sam", "train.max_steps": 3}
    eager = _run(tmp_path / "eager", text_corpus, **extra).losses
    compiled = _run(tmp_path / "compiled", text_corpus, **extra, **{"model.compile": True}).losses
    assert compiled == pytest.approx(eager, rel=1e-4)
