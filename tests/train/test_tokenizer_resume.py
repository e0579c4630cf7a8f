"""A run's tokenizer belongs to the run: a resume after the corpus changed keeps it, byte for byte."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from flatlm.config import load_config
from flatlm.data import load_or_build
from flatlm.data.cache import default_cache_dir
from flatlm.data.sources import source_fingerprint
from flatlm.data.tokenizer import Tokenizer
from flatlm.errors import FlatlmError
from flatlm.train.loop import train
from flatlm.train.metrics import read_jsonl
from tests.conftest import tiny_overrides

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
        if json.loads(m.read_text())["tokenizer_sha256"] == sha
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
