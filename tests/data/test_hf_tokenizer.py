"""Hugging Face tokenizers as flatlm tokenizers: the wrapper's interface, its identity (sha256), the one resolver
of data.tokenizer, and token caches keyed by that identity. The tokenizers are made here (a byte-level BPE trained
on a few documents, saved with save_pretrained): no downloads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import flatlm.data.cache as cache_module
import flatlm.data.hf_tokenizer as hf_module
from flatlm.config import DataConfig
from flatlm.data import load_or_build
from flatlm.data.hf_tokenizer import HFTokenizer
from flatlm.data.tokenizer import Tokenizer, load_tokenizer, sample_lines, train_tokenizer
from flatlm.errors import FlatlmError
from tests.conftest import make_documents

TEXT = "the optimizer moves the weights\n  towards flat regions ünïcödé\n\tdef return class 😀"
TEMPLATE = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"


def make_hf_tokenizer(
    path: Path, vocab_size: int = 300, *, eos: bool = True, bos_processor: bool = False, template: str | None = None
) -> Path:
    """Save a byte-level BPE tokenizer trained on the test documents as an HF tokenizer directory ``path``.
    ``bos_processor``: a post-processor that adds BOS when special tokens are asked for (flatlm must not ask)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(make_documents(60), trainer)
    if bos_processor:
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>" if eos else None
    )
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(str(path))
    return path


def sentencepiece() -> Tokenizer:
    return Tokenizer(train_tokenizer(sample_lines(make_documents(80), 10_000, seed=0), 400))


def test_the_wrapper_encodes_without_special_tokens_and_round_trips(tmp_path: Path) -> None:
    tok = HFTokenizer.load(make_hf_tokenizer(tmp_path / "hf", bos_processor=True, template=TEMPLATE))
    assert tok.kind == "hf" and tok.hf.eos_token == "</s>"
    assert tok.vocab_size == len(tok.hf) == 300
    assert (tok.eos_id, tok.bos_id) == (2, 1)
    ids = tok.encode([TEXT, "def"])
    with_special = tok.hf(TEXT)["input_ids"]
    assert with_special[0] == tok.bos_id and ids[0] == with_special[1:]  # the post-processor's BOS is not added
    assert tok.decode(ids[0]) == TEXT and tok.decode(np.asarray(ids[1])) == "def"
    assert tok.encode([]) == []
    assert tok.chat_template == TEMPLATE
    assert HFTokenizer.load(make_hf_tokenizer(tmp_path / "plain")).chat_template is None
    assert sentencepiece().chat_template is None and sentencepiece().kind == "sentencepiece"


def test_a_tokenizer_without_eos_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FlatlmError, match="has no eos token .*set.? eos_token"):
        HFTokenizer.load(make_hf_tokenizer(tmp_path / "hf", eos=False))


def test_sha256_is_stable_across_save_and_load_and_names_the_encoding(tmp_path: Path) -> None:
    """Catches: an identity of the file bytes (changes on save), or of something that is not the vocabulary
    (two tokenizers encoding differently share one cache)."""
    tok = HFTokenizer.load(make_hf_tokenizer(tmp_path / "a", template=TEMPLATE))
    tok.save(tmp_path / "saved")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary directory is gone
    again = HFTokenizer.load(tmp_path / "saved")
    assert again.sha256 == tok.sha256 and again.encode([TEXT]) == tok.encode([TEXT])
    tok.hf.backend_tokenizer.enable_truncation(5)  # a call-time setting (truncation=True sets it): not identity
    assert HFTokenizer(tok.hf).sha256 == tok.sha256
    tok.hf.backend_tokenizer.no_truncation()
    other = HFTokenizer.load(make_hf_tokenizer(tmp_path / "b", vocab_size=280, template=TEMPLATE))
    assert other.sha256 != tok.sha256
    untemplated = HFTokenizer.load(make_hf_tokenizer(tmp_path / "c"))
    assert untemplated.sha256 != tok.sha256  # the chat template renders the data: part of it


def test_planted_identity_without_the_vocabulary_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = hf_module.canonical_serialization
    monkeypatch.setattr(hf_module, "canonical_serialization", lambda hf, **_: json.dumps(hf.special_tokens_map))
    a = HFTokenizer.load(make_hf_tokenizer(tmp_path / "a"))
    b = HFTokenizer.load(make_hf_tokenizer(tmp_path / "b", vocab_size=280))
    assert a.sha256 == b.sha256  # what the test above rejects
    monkeypatch.setattr(hf_module, "canonical_serialization", real)
    assert HFTokenizer(a.hf).sha256 != HFTokenizer(b.hf).sha256


def test_load_tokenizer_resolves_each_kind(tmp_path: Path) -> None:
    sp = sentencepiece()
    sp.save(tmp_path / "sp.model")
    assert isinstance(load_tokenizer(tmp_path / "sp.model"), Tokenizer)
    hf_dir = make_hf_tokenizer(tmp_path / "hf")
    hf = load_tokenizer(str(hf_dir))
    assert isinstance(hf, HFTokenizer)

    sp_run = tmp_path / "sp-run"  # a flatlm run directory, and one of its checkpoints
    (sp_run / "checkpoints" / "step-3").mkdir(parents=True)
    (sp_run / "config.yaml").write_text("seed: 0\n")
    sp.save(sp_run / "tokenizer.model")
    for spec in (sp_run, sp_run / "checkpoints" / "step-3"):
        got = load_tokenizer(spec)
        assert isinstance(got, Tokenizer) and got.sha256 == sp.sha256
    hf_run = tmp_path / "hf-run"
    hf_run.mkdir()
    (hf_run / "config.yaml").write_text("seed: 0\n")
    hf.save(hf_run / "tokenizer")
    got = load_tokenizer(hf_run)
    assert isinstance(got, HFTokenizer) and got.sha256 == hf.sha256

    kinds = "a sentencepiece .model file, a Hugging Face tokenizer directory .* or a flatlm run directory"
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    (tmp_path / "empty").mkdir()
    (tmp_path / "run-without-tokenizer").mkdir()
    (tmp_path / "run-without-tokenizer" / "config.yaml").write_text("seed: 0\n")
    for spec, why in [("notes.txt", "is none of them"), ("empty", "is none of them"), ("nothing", "does not exist")]:
        with pytest.raises(FlatlmError, match=f"data.tokenizer='.*{spec}' {why}; pass {kinds}"):
            load_tokenizer(tmp_path / spec)
    with pytest.raises(FlatlmError, match="is none of them"):
        load_tokenizer(tmp_path / "run-without-tokenizer")
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(FlatlmError, match="is not a sentencepiece model; fix data.tokenizer"):
        load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(FlatlmError, match="is not a loadable Hugging Face tokenizer"):
        load_tokenizer(tmp_path / "broken")


def _exported_tokenizer(tmp_path: Path, chat_template: str | None = None) -> tuple[HFTokenizer, Tokenizer]:
    """(the HF view of a flatlm export's tokenizer files, the sentencepiece model it was written from)."""
    from flatlm.train.export import _save_as_llama_tokenizer

    sp = sentencepiece()
    sp.save(tmp_path / "sp.model")
    out = tmp_path / "export"
    out.mkdir()
    _save_as_llama_tokenizer(sp, tmp_path / "sp.model", out, chat_template)  # what flatlm export writes
    return HFTokenizer.load(out), sp


def test_an_exported_model_dir_loads_its_sentencepiece_model(tmp_path: Path) -> None:
    """flatlm reads an export's tokenizer.model back (the ids the model was trained on), on every text, also where
    the HF view differs (text beginning with whitespace), with a fine-tuning run's chat template."""
    _, sp = _exported_tokenizer(tmp_path, chat_template="{{ messages }}")
    tok = load_tokenizer(tmp_path / "export")
    assert isinstance(tok, Tokenizer) and tok.sha256 == sp.sha256
    texts = [TEXT, " x", "   leading", "\n  x", "a\n\n\n  b", *make_documents(3, seed=3)]
    assert tok.encode(texts) == sp.encode(texts)
    assert tok.chat_template == "{{ messages }}"


def test_the_hf_view_of_an_export_has_the_sentencepiece_ids(tmp_path: Path) -> None:
    """What transformers users get from an export (AutoTokenizer): flatlm's ids on text that does not begin with
    whitespace (see the xfail below), the same special ids, and the run's chat template."""
    tok, sp = _exported_tokenizer(tmp_path, chat_template="{{ messages }}")
    texts = [TEXT, "a\n\n\n  b", "leading and trailing   ", "x\n y", "the  model", *make_documents(5, seed=3)]
    assert tok.encode(texts) == sp.encode(texts)
    assert [tok.decode(ids) for ids in sp.encode(texts)] == texts
    assert (tok.eos_id, tok.bos_id, tok.vocab_size) == (sp.eos_id, sp.bos_id, sp.vocab_size)
    assert tok.chat_template == "{{ messages }}"


def test_hf_view_differs_from_sentencepiece_on_text_beginning_with_whitespace(tmp_path: Path) -> None:
    """The reason flatlm reads an export's tokenizer.model: transformers' LlamaTokenizer (Metaspace,
    prepend_scheme=first) adds no dummy prefix to text that begins with a space or a newline, sentencepiece always
    does. Should transformers change that, this fails and the export can be read through its HF files again."""
    tok, sp = _exported_tokenizer(tmp_path)
    for text in (" x", "   leading", "\n  x"):
        assert tok.encode([text]) != sp.encode([text]), text
        assert sp.decode(sp.encode([text])[0]) == text  # sentencepiece round-trips it (the HF view loses " x"'s space)


# -- token caches ---------------------------------------------------------------------------------------------------


def _cfg(corpus: Path, cache: Path, tokenizer: Path) -> DataConfig:
    return DataConfig(source="files", paths=[str(corpus)], cache_dir=str(cache), tokenizer=str(tokenizer))


def _two_tokenizer_problems(corpus: Path, tmp_path: Path) -> list[str]:
    """Build the corpus's cache with two HF tokenizers: what is wrong with the second one's cache."""
    a, b = make_hf_tokenizer(tmp_path / "a"), make_hf_tokenizer(tmp_path / "b", vocab_size=280)
    built_a = load_or_build(_cfg(corpus, tmp_path / "c", a), log=lambda _: None)
    built_b = load_or_build(_cfg(corpus, tmp_path / "c", b), log=lambda _: None, warn=lambda _: None)
    tok_b = HFTokenizer.load(b)
    first = make_documents(60)[0]  # the corpus's doc000.txt
    problems = []
    if built_b.path == built_a.path:
        problems.append("one cache for two tokenizers")
    if built_b.meta["tokenizer_sha256"] != tok_b.sha256:
        problems.append("the cache's meta.json names another tokenizer")
    if list(built_b.tokens[built_b.offsets[0] : built_b.offsets[1] - 1]) != tok_b.encode([first])[0]:
        problems.append("the tokens are not the second tokenizer's")
    return problems


def test_a_cache_is_keyed_by_the_hf_tokenizer_and_reused(text_corpus: Path, tmp_path: Path) -> None:
    hf_dir = make_hf_tokenizer(tmp_path / "hf")
    cfg = _cfg(text_corpus, tmp_path / "c", hf_dir)
    logs: list[str] = []
    built = load_or_build(cfg, log=logs.append)
    tok = HFTokenizer.load(hf_dir)
    assert built.meta["tokenizer_sha256"] == tok.sha256 and built.tokenizer.kind == "hf"
    assert HFTokenizer.load(built.path / "tokenizer").sha256 == tok.sha256  # stored beside the tokens
    assert built.meta["vocab_size"] == 300 and built.meta["max_id"] < 300
    moved = tmp_path / "moved"  # the same tokenizer elsewhere (saved again): the same cache, not tokenized again
    tok.save(moved)
    logs.clear()
    again = load_or_build(cfg.model_copy(update={"tokenizer": str(moved)}), log=logs.append)
    assert again.path == built.path and not any(m.startswith("tokenized") for m in logs)
    assert not _two_tokenizer_problems(text_corpus, tmp_path / "two")


def test_planted_cache_that_compares_no_tokenizer_is_caught(
    text_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache key without the tokenizer, opened without checking which tokenizer built it: the second tokenizer
    reads the first one's tokens. The check above must see it."""
    monkeypatch.setattr(cache_module, "cache_key", lambda cfg, tokenizer, fingerprint=None: "one-key")
    real_open = cache_module._open_checked

    def compare_nothing(path: Path, tokenizer: object) -> tuple:
        """The real checks, told the tokenizer is whatever built the cache."""
        if not (path / "meta.json").is_file():
            return real_open(path, tokenizer)
        meta = json.loads((path / "meta.json").read_text())
        return real_open(path, SimpleNamespace(sha256=meta["tokenizer_sha256"], vocab_size=10**6, kind="hf"))

    monkeypatch.setattr(cache_module, "_open_checked", compare_nothing)
    problems = _two_tokenizer_problems(text_corpus, tmp_path)
    assert "one cache for two tokenizers" in problems and "the tokens are not the second tokenizer's" in problems


def test_a_damaged_stored_hf_tokenizer_is_rebuilt(text_corpus: Path, tmp_path: Path) -> None:
    hf_dir = make_hf_tokenizer(tmp_path / "hf")
    cfg = _cfg(text_corpus, tmp_path / "c", hf_dir)
    built = load_or_build(cfg, log=lambda _: None)
    tokens = np.array(built.tokens)
    stored = built.path / "tokenizer"
    shutil.rmtree(stored)
    make_hf_tokenizer(stored, vocab_size=280)  # another tokenizer in its place
    warnings: list[str] = []
    again = load_or_build(cfg, log=lambda _: None, warn=warnings.append)
    assert len(warnings) == 1 and "tokenizer is not the tokenizer it was keyed by" in warnings[0], warnings
    np.testing.assert_array_equal(np.array(again.tokens), tokens)
    assert HFTokenizer.load(stored).sha256 == HFTokenizer.load(hf_dir).sha256
