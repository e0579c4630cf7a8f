"""flatlm export: a (sharded) checkpoint as a Hugging Face model whose logits are the training model's own.

The reference is the model the loop trained, captured in its process after the last step (``step_probe``: one
process, and each FSDP2 rank's forward through its sharded module), never the exporter's own loading path, which
an export test would otherwise check against itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import flatlm.train.export as export_module
from flatlm.config import load_config
from flatlm.errors import FlatlmError
from flatlm.train.cli import main
from flatlm.train.export import export
from flatlm.train.loop import train
from tests.conftest import tiny_overrides
from tests.train.step_probe import PROBE_IDS, Probe, launch_probed, load_records, probing

TEXT = "the optimizer moves the weights towards flat regions\ndef return class"
# The exported model is the same LlamaForCausalLM with the same fp32 weights, run by the same CPU kernels:
# measured bit-identical (0.0) against both the one-process and the FSDP2 training forward; one transposed
# attention matrix of the tiny test model moves the logits by ~1e-2.
LOGITS_ATOL = 1e-6


def _hf_logits(out: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        return hf_model(input_ids=PROBE_IDS).logits


def _check_export(run: Path, out: Path, trained_logits: torch.Tensor) -> None:
    """Export ``run`` through the CLI; transformers loads it with the run's tokenizer and the trained logits."""
    from transformers import AutoTokenizer

    from flatlm.data.tokenizer import Tokenizer

    assert main(["export", str(run), str(out)]) == 0
    torch.testing.assert_close(_hf_logits(out), trained_logits, rtol=0, atol=LOGITS_ATOL)
    tok = Tokenizer.load(run / "tokenizer.model")
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = tok.encode([TEXT])[0]
    assert hf_tok(TEXT, add_special_tokens=False)["input_ids"] == ids  # same tokens as flatlm's tokenizer
    assert hf_tok.eos_token_id == tok.eos_id


@pytest.mark.slow
def test_export_single_process_run(tmp_path: Path, text_corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: an export whose weights are not the trained ones (misnamed, transposed, stale, re-initialised),
    including bugs shared by the exporter's loader and anything that reads the checkpoint back."""
    run = tmp_path / "run"
    probe = Probe(grads=False, saved=False, logits_after_step=3)
    with probing(probe):
        train(load_config(None, tiny_overrides(run, text_corpus, **{"train.max_steps": 3})))
    trained = probe.steps[-1].logits
    assert trained is not None and trained.dtype == torch.float32
    _check_export(run, tmp_path / "hf", trained)
    with pytest.raises(FlatlmError, match="exists and is not empty"):
        export(run, tmp_path / "hf")  # never overwrites
    with pytest.raises(FlatlmError, match="neither a flatlm checkpoint"):
        export(tmp_path, tmp_path / "other")

    # Planted bug: the exporter's loader transposes one square weight. The comparison must see it.
    real = export_module.load_checkpoint_model

    def transposed(checkpoint: Path) -> tuple:
        model, tok, cfg = real(checkpoint)
        with torch.no_grad():
            w = model.model.layers[0].self_attn.q_proj.weight
            w.copy_(w.t().clone())
        return model, tok, cfg

    monkeypatch.setattr(export_module, "load_checkpoint_model", transposed)
    export(run, tmp_path / "hf-bad")
    assert (_hf_logits(tmp_path / "hf-bad") - trained).abs().max() > 1000 * LOGITS_ATOL


@pytest.mark.slow
def test_export_fsdp2_sharded_checkpoint(tmp_path: Path, text_corpus: Path) -> None:
    """Catches: a sharded (FSDP2, 2 ranks) checkpoint exported with shards misplaced or missing: the export's
    logits must equal the FSDP2 training module's own forward after the last step (every rank's)."""
    run = tmp_path / "run"
    args = {"train.max_steps": 3, "parallel.backend": "fsdp2", "train.micro_batch_size": 2}
    r = launch_probed([(tiny_overrides(run, text_corpus, **args), ["logits=3"])])
    assert r.returncode == 0, r.stderr[-3000:]
    trained = [load_records(run, rank)[-1].logits for rank in (0, 1)]
    torch.testing.assert_close(trained[0], trained[1], rtol=0, atol=0)  # one model, whichever rank ran it
    _check_export(run, tmp_path / "hf", trained[0])


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
    with pytest.raises(FlatlmError, match="is a flatlm run: set data.tokenizer="):  # its ids, not a new tokenizer's
        train(load_config(None, tiny_overrides(tmp_path / "bad", text_corpus, **{"model.init_from": str(hf)})))
    wrong = {"model.init_from": str(hf), "data.tokenizer": str(hf), "model.overrides.hidden_size": 32}
    wrong["train.max_steps"] = 1
    with pytest.raises(FlatlmError, match="does not fit this model .* is \\(.*\\) there"):
        train(load_config(None, tiny_overrides(tmp_path / "bad", text_corpus, **wrong)))


@pytest.mark.timeout(180)
def test_an_hf_tokenizer_chat_run_exports_and_loads_with_its_own_template(tmp_path: Path) -> None:
    """Catches: an HF-tokenizer fine-tuning run exported (and read back by load_tokenizer) with the template its
    tokenizer shipped instead of the one its examples were rendered with (chat_template.jinja)."""
    from transformers import AutoTokenizer

    from flatlm.data.hf_tokenizer import HFTokenizer
    from flatlm.data.tokenizer import load_tokenizer
    from tests.data.test_chat import CHATML
    from tests.data.test_hf_tokenizer import TEMPLATE, make_hf_tokenizer
    from tests.data.test_sft import chat_jsonl
    from tests.train.test_tokenizer_resume import chat_overrides

    hf_dir = make_hf_tokenizer(tmp_path / "hf", template=TEMPLATE)  # ships a template of its own
    given = HFTokenizer.load(hf_dir)
    custom = tmp_path / "chatml.jinja"
    custom.write_text(CHATML)
    run = tmp_path / "run"
    extra = {"data.tokenizer": hf_dir, "data.chat_template": custom}
    train(load_config(None, chat_overrides(run, chat_jsonl(tmp_path / "chat.jsonl"), **extra)))
    assert (run / "chat_template.jinja").read_text() == CHATML and given.chat_template == TEMPLATE

    for directory in (run, run / "checkpoints" / "step-1"):  # data.tokenizer=<the run> renders as the run did
        own = load_tokenizer(directory)
        assert isinstance(own, HFTokenizer) and own.chat_template == CHATML
        assert own.encode([TEXT]) == given.encode([TEXT])
    out = export(run, tmp_path / "export")
    exported = AutoTokenizer.from_pretrained(out)
    assert exported.chat_template == CHATML
    assert exported(TEXT, add_special_tokens=False)["input_ids"] == given.encode([TEXT])[0]
    again = load_tokenizer(out)
    assert again.chat_template == CHATML and again.sha256 == load_tokenizer(run).sha256
