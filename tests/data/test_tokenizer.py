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


def test_a_run_keeps_one_tokenizer_of_its_kind_and_never_replaces_it(tmp_path, tok: Tokenizer) -> None:
    """Catches: a run tokenizer rewritten on resume, replaced by another one, or kept where no resume looks."""
    from flatlm.data.hf_tokenizer import HFTokenizer
    from flatlm.data.tokenizer import run_tokenizer_path, save_run_tokenizer
    from tests.data.test_hf_tokenizer import make_hf_tokenizer

    sp_run, hf_run = tmp_path / "sp", tmp_path / "hf"
    sp_run.mkdir(), hf_run.mkdir()
    assert run_tokenizer_path(sp_run) == sp_run / "tokenizer.model"  # neither yet: where old runs keep it
    save_run_tokenizer(sp_run, tok)
    stamp = (sp_run / "tokenizer.model").stat().st_mtime_ns
    save_run_tokenizer(sp_run, tok)  # a resume: the same one, left as it is
    assert (sp_run / "tokenizer.model").stat().st_mtime_ns == stamp
    assert run_tokenizer_path(sp_run) == sp_run / "tokenizer.model" and not (sp_run / "tokenizer").exists()

    hf = HFTokenizer.load(make_hf_tokenizer(tmp_path / "given"))
    save_run_tokenizer(hf_run, hf)
    assert run_tokenizer_path(hf_run) == hf_run / "tokenizer" and not (hf_run / "tokenizer.model").exists()
    assert HFTokenizer.load(hf_run / "tokenizer").sha256 == hf.sha256
    save_run_tokenizer(hf_run, hf)
    for run, other in ((hf_run, tok), (sp_run, hf), (hf_run, HFTokenizer.load(make_hf_tokenizer(tmp_path / "b", 280)))):
        with pytest.raises(RuntimeError, match="is not the tokenizer this run encoded its data with; not replacing"):
            save_run_tokenizer(run, other)
    assert HFTokenizer.load(hf_run / "tokenizer").sha256 == hf.sha256


def test_a_resume_with_an_unreadable_hf_run_tokenizer_is_one_clear_error(tmp_path) -> None:
    from flatlm.config import DataConfig
    from flatlm.data.cache import resume_tokenizer

    run_tokenizer = tmp_path / "tokenizer"
    run_tokenizer.mkdir()
    (run_tokenizer / "tokenizer.json").write_text("{truncated")
    with pytest.raises(FlatlmError, match="cannot be read .not a loadable Hugging Face tokenizer.; restore it"):
        resume_tokenizer(DataConfig(), run_tokenizer, warn=print)
