from __future__ import annotations

import pytest

from flatlm.data.tokenizer import EOS, Tokenizer, sample_lines, train_tokenizer
from flatlm.errors import FlatlmError
from tests.conftest import make_documents

CODE = 'def f(x):\n    """Doc — ünïcödé ✓."""\n\tif x:\n        return  x * 2\n\n\nprint(f(3))  # 😀\n'


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    lines = sample_lines(make_documents(80) + [CODE] * 5, 10_000, seed=0)
    return Tokenizer(train_tokenizer(lines, 400))


def test_roundtrip_exact_whitespace_newlines_unicode(tok: Tokenizer) -> None:
    for text in (CODE, "a\n\n\n  b", "   leading and trailing   ", "字符 not in training"):
        ids = tok.encode([text])[0]
        assert tok.decode(ids) == text


def test_special_ids(tok: Tokenizer) -> None:
    assert tok.eos_id == EOS
    assert EOS not in tok.encode([CODE])[0]
    assert tok.vocab_size <= 400


def test_sample_lines_deterministic_and_bounded() -> None:
    docs = make_documents(50)
    a, b = sample_lines(docs, 30, seed=0), sample_lines(docs, 30, seed=0)
    assert a == b and len(a) == 30
    assert sample_lines(docs, 30, seed=1) != a
    all_lines = [ln for d in docs for ln in d.split("\n") if ln.strip()]
    assert sorted(sample_lines(docs, 10**6, seed=0)) == sorted(all_lines)


def test_empty_corpus_error() -> None:
    with pytest.raises(FlatlmError, match="no non-blank lines"):
        train_tokenizer([], 400)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FlatlmError, match="does not exist"):
        Tokenizer.load(tmp_path / "none.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(FlatlmError, match="is not a sentencepiece model"):
        Tokenizer.load(bad)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")  # sentencepiece itself accepts this (0 pieces): a file truncated by a full disk
    with pytest.raises(FlatlmError, match="is not a sentencepiece model"):
        Tokenizer.load(empty)


def test_a_resume_with_an_empty_run_tokenizer_is_one_clear_error(tmp_path) -> None:
    from flatlm.config import DataConfig
    from flatlm.data.cache import resume_tokenizer

    run_tokenizer = tmp_path / "tokenizer.model"
    run_tokenizer.write_bytes(b"")
    with pytest.raises(FlatlmError, match="cannot be read .not a sentencepiece model.; restore it"):
        resume_tokenizer(DataConfig(), run_tokenizer, warn=print)
