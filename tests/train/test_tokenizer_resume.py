"""A run's tokenizer belongs to the run: a resume after the corpus changed keeps it, byte for byte."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from flatlm.config import load_config
from flatlm.data import GlobalBatchSampler, load_or_build
from flatlm.data.cache import default_cache_dir
from flatlm.data.sources import source_fingerprint
from flatlm.data.tokenizer import Tokenizer
from flatlm.errors import FlatlmError
from flatlm.train.loop import train
from flatlm.train.metrics import read_jsonl
from tests.conftest import chat_overrides, tiny_overrides

# Words the first corpus never has: a tokenizer trained on the changed corpus has other pieces.
NEW_WORDS = "zebra quantum xylophone jigsaw kumquat vortex whisky fjord sphinx bovine cryptic".split()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_resume_after_the_corpus_changed_keeps_the_run_tokenizer(
    tmp_path: Path, text_corpus: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    extra = {"train.max_steps": 3, "checkpoint.every": 3}
    train(load_config(None, tiny_overrides(out, text_corpus, **extra)))
    run_tok = out / "tokenizer.model"
    original, stamp = run_tok.read_bytes(), run_tok.stat().st_mtime_ns

    for i in range(40):  # change the corpus: more documents, new words
        words = [NEW_WORDS[(i * 7 + j) % len(NEW_WORDS)] for j in range(60)]
        (text_corpus / f"new{i:03d}.txt").write_text(" ".join(words) + "\n")
    cfg = load_config(None, tiny_overrides(out, text_corpus, **{**extra, "train.max_steps": 5}))
    # What the old code did on resume: train a tokenizer on the changed corpus. It differs from the run's,
    # so a resume that used it (or wrote it to tokenizer.model) fails the byte comparison below.
    fresh = load_or_build(cfg.data, log=lambda _: None)
    assert fresh.tokenizer.proto != original

    with caplog.at_level(logging.INFO, logger="flatlm"):
        result = train(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("resuming from") and "(step 3)" in m for m in messages), messages
    warned = [m for m in messages if "not what this run's tokenizer was trained on" in m]
    assert len(warned) == 1 and "a tokenizer trained on the current data differs from it" in warned[0], messages
    assert len(result.losses) == 2 and [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    assert run_tok.read_bytes() == original and run_tok.stat().st_mtime_ns == stamp  # never rewritten
    # The resumed steps read the changed corpus encoded by the run's tokenizer: its own cache, keyed by both.
    sha = Tokenizer(original).sha256
    used = [
        json.loads(m.read_text())
        for m in default_cache_dir(cfg.data).glob("*/meta.json")
        if json.loads(m.read_text()).get("tokenizer_sha256") == sha  # sft-*/meta.json (chat examples) has none
    ]
    assert source_fingerprint(cfg.data) in [meta["source_fingerprint"] for meta in used]
    assert max(meta["num_documents"] for meta in used) == 100

    # A no-op rerun (the run is finished) keeps it too.
    train(cfg)
    assert run_tok.read_bytes() == original and run_tok.stat().st_mtime_ns == stamp


def test_resume_prefers_the_run_tokenizer_to_a_changed_data_tokenizer(tmp_path: Path, text_corpus: Path) -> None:
    """data.tokenizer names a file whose bytes changed since the run started: the run's own copy is used."""
    from flatlm.data.cache import resume_tokenizer

    cfg = load_config(None, tiny_overrides(tmp_path / "run", text_corpus)).data
    first = load_or_build(cfg, log=lambda _: None).tokenizer
    run_tok = tmp_path / "run.model"
    first.save(run_tok)
    other = load_or_build(cfg.model_copy(update={"vocab_size": 350}), log=lambda _: None).tokenizer
    given = tmp_path / "given.model"
    other.save(given)
    warnings: list[str] = []
    got = resume_tokenizer(cfg.model_copy(update={"tokenizer": str(given)}), run_tok, warnings.append)
    assert got.proto == first.proto != other.proto
    assert len(warnings) == 1 and "is not the tokenizer this run started with" in warnings[0]
    given.unlink()
    got = resume_tokenizer(cfg.model_copy(update={"tokenizer": str(given)}), run_tok, warnings.append)
    assert got.proto == first.proto and len(warnings) == 2 and "(it cannot be read now)" in warnings[1]
    got = resume_tokenizer(cfg, run_tok, warnings.append)  # the corpus it was trained on: silent
    assert got.proto == first.proto and len(warnings) == 2
    run_tok.write_bytes(b"garbage")
    unreadable = r"the run's tokenizer .*run.model' cannot be read \(not a sentencepiece model\); .*overwrite=true"
    with pytest.raises(FlatlmError, match=unreadable):
        resume_tokenizer(cfg, run_tok, warnings.append)


# -- a fine-tuning run's chat template belongs to it too ---------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_resumed_chat_run_keeps_its_template(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Catches: a resumed sentencepiece chat run rendering with (and writing) the builtin template instead of the
    one it started with (its tokenizer.model carries none), or with a data.chat_template file changed since."""
    from flatlm.data.chat import BUILTIN_TEMPLATE
    from flatlm.data.splits import data_seed, load_data
    from flatlm.data.tokenizer import run_tokenizer_path
    from tests.data.test_chat import CHATML
    from tests.data.test_sft import chat_jsonl

    rows = chat_jsonl(tmp_path / "chat.jsonl")
    custom = tmp_path / "chatml.jinja"
    custom.write_text(CHATML)
    stage1 = tmp_path / "stage1"
    train(load_config(None, chat_overrides(stage1, rows, **{"data.chat_template": custom})))
    # stage 2 takes its template from stage 1 (data.tokenizer=<run dir>), then is resumed
    stage2 = tmp_path / "stage2"
    extra = {"data.tokenizer": stage1, "model.init_from": stage1}
    train(load_config(None, chat_overrides(stage2, rows, **extra)))
    assert (stage2 / "chat_template.jinja").read_text() == CHATML
    before = load_data(load_config(None, chat_overrides(stage2, rows, **extra)))  # as the run started
    cfg = load_config(None, chat_overrides(stage2, rows, **{**extra, "train.max_steps": 2}))
    assert len(train(cfg).losses) == 1
    assert (stage2 / "chat_template.jinja").read_text() == CHATML
    resumed = load_data(cfg, run_tokenizer_path(stage2))
    assert resumed.chat_template == CHATML
    assert [ids.tolist() for ids in resumed.train.examples.ids] == [ids.tolist() for ids in before.train.examples.ids]
    # the real tokens seen go on from the checkpoint's count (padding never counted)
    sampler = GlobalBatchSampler(len(resumed.train), 4, data_seed(cfg))
    seen = np.cumsum([resumed.train.input_tokens(sampler.global_batch(s)) for s in range(2)]).tolist()
    assert [r["tokens"] for r in read_jsonl(stage2 / "metrics.jsonl")] == seen

    custom.write_text(BUILTIN_TEMPLATE)  # the file stage 1 named changed: stage 1 resumes with its own copy
    with caplog.at_level(logging.WARNING, logger="flatlm"):
        train(load_config(None, chat_overrides(stage1, rows, **{"data.chat_template": custom, "train.max_steps": 2})))
    assert any("is not the template this run started with" in r.getMessage() for r in caplog.records)
    assert (stage1 / "chat_template.jinja").read_text() == CHATML


def test_a_run_never_replaces_its_chat_template(tmp_path: Path) -> None:
    """The safety net under the resume: writing another template over a run's is refused; the same one is a no-op."""
    from flatlm.data.tokenizer import save_run_chat_template

    save_run_chat_template(tmp_path, "A")
    save_run_chat_template(tmp_path, "A")
    with pytest.raises(RuntimeError, match="not the chat template this run rendered its examples with"):
        save_run_chat_template(tmp_path, "B")
    assert (tmp_path / "chat_template.jinja").read_text() == "A"
