"""Fine-tuning starts: model.init_from a flatlm run or checkpoint (its consolidated weights, bit-exact), and runs
whose data.tokenizer is a Hugging Face tokenizer directory (kept as output_dir/tokenizer/, resumed with, exported)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import flatlm.train.export as export_module
from flatlm.config import RunConfig, load_config
from flatlm.data.hf_tokenizer import HFTokenizer
from flatlm.data.tokenizer import Tokenizer, load_tokenizer, sample_lines, train_tokenizer
from flatlm.errors import FlatlmError
from flatlm.models import build_model, model_config
from flatlm.train.export import check_init_from_tokenizer, export, init_weights_from
from flatlm.train.inspect import final_state
from flatlm.train.loop import train
from tests.conftest import make_documents, tiny_overrides
from tests.data.test_hf_tokenizer import TEXT, make_hf_tokenizer, sentencepiece
from tests.train.runs import assert_same_state, state_differences

OVERRIDES = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
SMALL = {f"model.overrides.{k}": v for k, v in OVERRIDES.items()}


def _fresh_model(run: Path, **overrides: int) -> torch.nn.Module:
    """The model a fine-tuning run with data.tokenizer=<run> builds before model.init_from (another seed)."""
    tok = load_tokenizer(run)
    config = model_config("tiny", tok.vocab_size, {**OVERRIDES, **overrides}, bos_id=tok.bos_id, eos_id=tok.eos_id)
    return build_model(config, seed=123)


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def _saved_weights(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights read by flatlm.train.inspect (not the loader init_from uses)."""
    return {k: v for k, v in final_state(path).items() if k.startswith("model.")}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_init_from_a_run_or_checkpoint_is_its_weights_bit_exact(
    tmp_path: Path, text_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches: weights not the run's latest (an older checkpoint, a re-initialised or partly loaded model)."""
    run = tmp_path / "run"
    extra = {**SMALL, "train.max_steps": 6, "checkpoint.every": 3}
    first = train(load_config(None, tiny_overrides(run, text_corpus, **extra)))
    final, older = _saved_weights(run), _saved_weights(run / "checkpoints" / "step-3")
    assert state_differences(final, older)  # training moved them: the two checkpoints tell apart

    model = _fresh_model(run)
    assert state_differences(_model_state(model), final)
    init_weights_from(model, str(run))
    assert_same_state(_model_state(model), final)
    model = _fresh_model(run)
    init_weights_from(model, str(run / "checkpoints" / "step-3"))
    assert_same_state(_model_state(model), older)

    with pytest.raises(FlatlmError, match=r"does not exist; pass a flatlm run directory \(flatlm train writes runs/de"):
        init_weights_from(_fresh_model(run), str(tmp_path / "runs" / "nothing"))
    with pytest.raises(
        FlatlmError,
        match=r"does not fit this model \(.* is \(400, 32\) there, \(400, 64\) here\); .* the run's model.name=tiny",
    ):
        init_weights_from(_fresh_model(run, hidden_size=64, intermediate_size=128), str(run))

    # Through the loop: data.tokenizer=<run> and model.init_from=<run> start where the run ended.
    ft = {**SMALL, "model.init_from": str(run), "data.tokenizer": str(run), "train.max_steps": 1}
    again = train(load_config(None, tiny_overrides(tmp_path / "ft", text_corpus, **ft)))
    assert (tmp_path / "ft" / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes()
    assert again.losses[0] < first.losses[0] - 0.3 and abs(again.losses[0] - first.losses[-1]) < 0.3

    # Planted bug: weights read but never copied in. The comparison must see it.
    monkeypatch.setattr(export_module, "copy_weights", lambda model, source, path, fix: None)
    model = _fresh_model(run)
    init_weights_from(model, str(run))
    assert state_differences(_model_state(model), final)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_run_with_an_hf_tokenizer_keeps_it_resumes_with_it_and_exports_it(
    tmp_path: Path, text_corpus: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches: an HF-tokenizer run that does not keep its tokenizer (tokenizer/), resumes with a swapped
    data.tokenizer, or exports a tokenizer that is not the one it trained with."""
    hf_dir = make_hf_tokenizer(tmp_path / "hf")
    given = HFTokenizer.load(hf_dir)
    out = tmp_path / "run"
    extra = {**SMALL, "data.tokenizer": str(hf_dir), "train.max_steps": 3, "checkpoint.every": 3}
    train(load_config(None, tiny_overrides(out, text_corpus, **extra)))
    assert (out / "tokenizer").is_dir() and not (out / "tokenizer.model").exists()
    kept = load_tokenizer(out)
    assert isinstance(kept, HFTokenizer) and kept.sha256 == given.sha256 and kept.vocab_size == 300

    shutil.rmtree(hf_dir)  # data.tokenizer now names another tokenizer: the run resumes with its own
    make_hf_tokenizer(hf_dir, vocab_size=280)
    with caplog.at_level(logging.INFO, logger="flatlm"):
        result = train(load_config(None, tiny_overrides(out, text_corpus, **{**extra, "train.max_steps": 5})))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("resuming from") and "(step 3)" in m for m in messages), messages
    assert [m for m in messages if "is not the tokenizer this run started with" in m], messages
    assert not [m for m in messages if "resuming a run without its" in m], messages
    assert len(result.losses) == 2 and load_tokenizer(out).sha256 == given.sha256

    hf_out = export(out, tmp_path / "export")
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(hf_out)
    assert exported(TEXT, add_special_tokens=False)["input_ids"] == given.encode([TEXT])[0]
    assert exported.eos_token_id == given.eos_id and len(exported) == given.vocab_size
    assert HFTokenizer.load(hf_out).sha256 == given.sha256


def _padded_hf_model(path: Path, vocab_size: int) -> Path:
    """A tiny Llama saved with an embedding of ``vocab_size`` rows beside a 300-id HF tokenizer (padded, as Qwen's
    and Pythia's embeddings are)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    make_hf_tokenizer(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        intermediate_size=64,
        max_position_embeddings=128,
        **{k: v for k, v in OVERRIDES.items() if k != "intermediate_size"},
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.timeout(120)
def test_a_model_whose_embedding_is_larger_than_its_tokenizer_is_fine_tuned(tmp_path: Path, text_corpus: Path) -> None:
    """Catches: model_config cutting a path config's vocab_size down to the tokenizer's (init_from then refused)."""
    model_dir = _padded_hf_model(tmp_path / "padded", vocab_size=320)
    tok = load_tokenizer(model_dir)
    assert tok.vocab_size == 300
    config = model_config(str(model_dir), tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
    assert config.vocab_size == 320  # never shrunk
    assert model_config(str(model_dir), 400).vocab_size == 400  # grown to a larger tokenizer
    assert model_config("tiny", 300, OVERRIDES).vocab_size == 300  # a preset: the tokenizer's size
    extra = {**SMALL, "model.name": str(model_dir), "model.init_from": str(model_dir), "data.tokenizer": str(model_dir)}
    result = train(load_config(None, tiny_overrides(tmp_path / "run", text_corpus, **extra, **{"train.max_steps": 1})))
    assert len(result.losses) == 1 and np.isfinite(result.losses[0])


# -- model.init_from and data.tokenizer must agree (checked before any data are read) ----------------------------


def _fake_run(path: Path, tok: Tokenizer) -> Path:
    """What check_init_from_tokenizer reads of a flatlm run: its config.yaml and tokenizer.model (plus a checkpoint
    directory with its trainer state)."""
    from flatlm.train.checkpoint import TRAINER_STATE

    (path / "checkpoints" / "step-1").mkdir(parents=True)
    (path / "checkpoints" / "step-1" / TRAINER_STATE).write_text("{}")
    (path / "config.yaml").write_text("{}\n")
    tok.save(path / "tokenizer.model")
    return path


def _cfg(init_from: Path, tokenizer: Path | None) -> RunConfig:
    extra = [f"model.init_from={init_from}"] + ([f"data.tokenizer={tokenizer}"] if tokenizer else [])
    return load_config(None, extra)


def test_init_from_a_flatlm_run_needs_its_tokenizer(tmp_path: Path) -> None:
    """Catches: a flatlm run, checkpoint or export as model.init_from with data.tokenizer unset (a new tokenizer for
    the data: other ids under the embedding) or naming another tokenizer."""
    own, other = sentencepiece(), Tokenizer(train_tokenizer(sample_lines(make_documents(80), 10_000, seed=0), 350))
    run = _fake_run(tmp_path / "run", own)
    other.save(tmp_path / "other.model")
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    own.save(export_dir / "tokenizer.model")
    (export_dir / "flatlm_tokenizer.json").write_text("{}")
    for source in (run, run / "checkpoints" / "step-1", export_dir):
        with pytest.raises(FlatlmError, match=f"model.init_from={source} is a flatlm run: set data.tokenizer={source}"):
            check_init_from_tokenizer(_cfg(source, None))
        with pytest.raises(FlatlmError, match=r"data.tokenizer=.*other.model \(sha256 \w+\) is not the tokenizer of"):
            check_init_from_tokenizer(_cfg(source, tmp_path / "other.model"))
        assert check_init_from_tokenizer(_cfg(source, source)) is None
        assert check_init_from_tokenizer(_cfg(source, run / "tokenizer.model")) is None
    assert check_init_from_tokenizer(load_config(None, [])) is None


def test_init_from_an_hf_model_with_another_tokenizer_only_warns(tmp_path: Path) -> None:
    hf = make_hf_tokenizer(tmp_path / "hf")
    other = make_hf_tokenizer(tmp_path / "other", vocab_size=280)
    templated = make_hf_tokenizer(tmp_path / "templated", template="{{ messages[0]['content'] }}")
    assert "gives other ids than the tokenizer of" in check_init_from_tokenizer(_cfg(hf, other))
    assert "data.tokenizer is not set" in check_init_from_tokenizer(_cfg(hf, None))
    assert check_init_from_tokenizer(_cfg(hf, hf)) is None
    assert check_init_from_tokenizer(_cfg(hf, templated)) is None  # the same ids: a chat template is no difference


@pytest.mark.timeout(60)
def test_the_refusal_comes_before_any_data_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flatlm.train.loop as loop_module

    run = _fake_run(tmp_path / "run", sentencepiece())

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data were read before the tokenizer check")

    monkeypatch.setattr(loop_module, "load_data", no_data)
    with pytest.raises(FlatlmError, match="is a flatlm run: set data.tokenizer="):
        train(load_config(None, [f"output_dir={tmp_path / 'out'}", f"model.init_from={run}"]))
    assert not (tmp_path / "out").exists()
