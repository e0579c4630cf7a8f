"""flatlm export: a (sharded) checkpoint as a Hugging Face model that transformers loads with equal logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatlm.config import load_config
from flatlm.errors import FlatlmError
from flatlm.train.cli import main
from flatlm.train.export import export, find_checkpoint, load_checkpoint_model
from flatlm.train.loop import train
from tests.conftest import tiny_overrides
from tests.train.launching import launch

TEXT = "the optimizer moves the weights towards flat regions\ndef return class"


def _check_export(run: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["export", str(run), str(out)]) == 0
    model, tok, _ = load_checkpoint_model(find_checkpoint(run))
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = tok.encode([TEXT])[0]
    assert hf_tok(TEXT, add_special_tokens=False)["input_ids"] == ids  # same tokens as flatlm's tokenizer
    assert hf_tok.eos_token_id == tok.eos_id
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_export_single_process_run(tmp_path: Path, text_corpus: Path) -> None:
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(run, text_corpus, **{"train.max_steps": 3})))
    _check_export(run, tmp_path / "hf")
    with pytest.raises(FlatlmError, match="exists and is not empty"):
        export(run, tmp_path / "hf")  # never overwrites
    with pytest.raises(FlatlmError, match="neither a flatlm checkpoint"):
        export(tmp_path, tmp_path / "other")


@pytest.mark.slow
def test_export_fsdp2_sharded_checkpoint(tmp_path: Path, text_corpus: Path) -> None:
    run = tmp_path / "run"
    args = {"train.max_steps": 3, "parallel.backend": "fsdp2", "train.micro_batch_size": 2}
    r = launch(tiny_overrides(run, text_corpus, **args))
    assert r.returncode == 0, r.stderr[-3000:]
    _check_export(run, tmp_path / "hf")


def test_export_cli_bad_source_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is neither a flatlm checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_training_starts_from_an_export(tmp_path: Path, text_corpus: Path) -> None:
    run = tmp_path / "run"
    first = train(load_config(None, tiny_overrides(run, text_corpus, **{"train.max_steps": 6})))
    hf = export(run, tmp_path / "hf")
    extra = {"model.name": str(hf), "model.init_from": str(hf), "data.tokenizer": str(hf / "tokenizer.model")}
    extra["train.max_steps"] = 2
    again = train(load_config(None, tiny_overrides(tmp_path / "ft", text_corpus, **extra)))
    # starts where the first run ended (its last losses), far below a fresh model's first loss
    assert again.losses[0] < first.losses[0] - 0.5
    assert abs(again.losses[0] - first.losses[-1]) < 0.3
    wrong = {"model.init_from": str(hf), "model.overrides.hidden_size": 32, "train.max_steps": 1}
    with pytest.raises(FlatlmError, match="does not fit this model .* is \\(.*\\) there"):
        train(load_config(None, tiny_overrides(tmp_path / "bad", text_corpus, **wrong)))
