"""A sentencepiece tokenizer trained on the corpus (BPE with byte fallback: any text encodes), and the one
resolver of ``data.tokenizer`` (``load_tokenizer``: a sentencepiece file, a Hugging Face tokenizer directory or
a flatlm run directory) and of a run's own tokenizer (``run_tokenizer_path``, ``save_run_tokenizer``).

Whitespace is kept exactly (identity normalisation, no whitespace folding) and newline is a piece of
its own, so source code and prose round-trip: ``decode(encode(text)) == text``.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

from flatlm.data.hf_tokenizer import HFTokenizer
from flatlm.errors import FlatlmError

UNK, BOS, EOS = 0, 1, 2
# Bump when the training options below change: it is part of every cache key.
TOKENIZER_VERSION = 1


def sample_lines(documents: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of ``k`` non-blank lines (reservoir sampling: one pass, O(k) memory)."""
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    for doc in documents:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            seen += 1
            if len(reservoir) < k:
                reservoir.append(line)
            else:
                j = rng.randrange(seen)
                if j < k:
                    reservoir[j] = line
    return reservoir


def train_tokenizer(lines: list[str], vocab_size: int) -> bytes:
    """Train a BPE model on ``lines``; returns the serialized model proto."""
    if not lines:
        raise FlatlmError("cannot train a tokenizer: the corpus has no non-blank lines")
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=proto,
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=0.9995,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n"],
            max_sentence_length=1 << 16,
            unk_id=UNK,
            bos_id=BOS,
            eos_id=EOS,
            pad_id=-1,
            hard_vocab_limit=False,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise FlatlmError(
            f"sentencepiece could not train a {vocab_size}-piece tokenizer on this corpus ({exc}); "
            "change data.vocab_size or add data"
        ) from None
    return proto.getvalue()


class Tokenizer:
    """A thin wrapper of a sentencepiece model with flatlm's special ids."""

    kind = "sentencepiece"
    chat_template: str | None = None
    """A sentencepiece model carries no chat template (flatlm's builtin one, or data.chat_template, is used)."""

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if self.sp.vocab_size() == 0:  # sentencepiece accepts an empty proto (a file truncated to 0 bytes)
            raise RuntimeError("an empty sentencepiece model (0 pieces)")
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        """The tokenizer's identity (of its serialized model): part of every token cache's key."""

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FlatlmError(f"tokenizer file {str(path)!r} does not exist; fix data.tokenizer")
        try:
            return cls(path.read_bytes())
        except RuntimeError:
            raise FlatlmError(f"{str(path)!r} is not a sentencepiece model; fix data.tokenizer") from None

    def save(self, path: str | Path) -> None:
        """Write the model file whole or not at all (a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(self.proto)
        os.replace(tmp, path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=2)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.sp.decode([int(i) for i in ids])


AnyTokenizer = Tokenizer | HFTokenizer
RUN_TOKENIZER_FILE = "tokenizer.model"
"""A sentencepiece run's own tokenizer, in its output_dir."""
RUN_TOKENIZER_DIR = "tokenizer"
"""A Hugging Face tokenizer run's own tokenizer (a save_pretrained directory), in its output_dir."""
HF_FILES = ("tokenizer.json", "tokenizer_config.json")
RUN_CONFIG = "config.yaml"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""A fine-tuning run's chat template in its output_dir (and, as transformers writes it, in an export)."""
EXPORT_MARKER = "flatlm_tokenizer.json"
"""Written by flatlm export beside a sentencepiece run's tokenizer: flatlm reads its tokenizer.model back."""


def run_tokenizer_path(out: Path) -> Path:
    """Where the run in ``out`` keeps its tokenizer: ``tokenizer/`` when it exists, else ``tokenizer.model``
    (also when neither exists: what every run before Hugging Face tokenizers wrote)."""
    hf_dir = out / RUN_TOKENIZER_DIR
    return hf_dir if hf_dir.is_dir() else out / RUN_TOKENIZER_FILE


def load_tokenizer(spec: str | Path) -> AnyTokenizer:
    """The tokenizer ``spec`` (``data.tokenizer``) names: a sentencepiece ``.model`` file; a flatlm export (marked by
    ``EXPORT_MARKER``): its ``tokenizer.model``; any other directory with ``tokenizer.json``/``tokenizer_config.json``
    (a local HF model) through ``AutoTokenizer``; a flatlm run directory (``config.yaml`` + its own tokenizer) or one
    of its checkpoints/step-N: that run's.

    A flatlm export of a sentencepiece run holds both ``tokenizer.model`` and a ``LlamaTokenizer`` converted from it,
    and the two differ on text that begins with a space or a newline (transformers adds no dummy prefix there;
    tests/data/test_hf_tokenizer.py) — chat templates' segments often do. So flatlm reads an export's
    ``tokenizer.model``: the ids the model was trained on. A run directory's or an export's ``chat_template.jinja``
    (what a fine-tuning run rendered with) comes along as the tokenizer's template, for an HF run's ``tokenizer/``
    too (its own template is the one it was given, not necessarily the one the run used)."""
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return Tokenizer.load(path)
        except FlatlmError:
            if path.suffix == ".model":
                raise
    if path.is_dir():
        if (path / EXPORT_MARKER).is_file() and (path / RUN_TOKENIZER_FILE).is_file():
            return with_run_chat_template(Tokenizer.load(path / RUN_TOKENIZER_FILE), path)
        if any((path / name).is_file() for name in HF_FILES):
            return HFTokenizer.load(path)
        for run in (path, path.parent.parent if path.parent.name == "checkpoints" else None):
            if run is not None and (run / RUN_CONFIG).is_file():
                own = run_tokenizer_path(run)
                if own.exists():
                    return with_run_chat_template(HFTokenizer.load(own) if own.is_dir() else Tokenizer.load(own), run)
    where = "does not exist" if not path.exists() else "is none of them"
    raise FlatlmError(
        f"data.tokenizer={str(spec)!r} {where}; pass a sentencepiece .model file, a Hugging Face tokenizer "
        "directory (with tokenizer.json or tokenizer_config.json) or a flatlm run directory"
    )


def with_run_chat_template(tokenizer: AnyTokenizer, directory: Path) -> AnyTokenizer:
    """``tokenizer`` with the chat template a fine-tuning run in ``directory`` used (its ``chat_template.jinja``):
    what its examples were rendered with, whatever template the tokenizer itself ships (an HF tokenizer's own)."""
    template = directory / CHAT_TEMPLATE_FILE
    if template.is_file():
        text = template.read_text(encoding="utf-8")
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.set_chat_template(text)
        else:
            tokenizer.chat_template = text
    return tokenizer


def save_run_chat_template(out: Path, template: str) -> None:
    """Write a fine-tuning run's chat template (``chat_template.jinja`` in ``out``) once. A resumed run renders with
    the one that is there (flatlm.data.splits), so it is never replaced: another template there would mean the
    run's examples were rendered another way."""
    path = out / CHAT_TEMPLATE_FILE
    if path.is_file():
        if path.read_text(encoding="utf-8") != template:
            raise RuntimeError(f"{path} is not the chat template this run rendered its examples with; not replacing it")
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(template, encoding="utf-8")
    os.replace(tmp, path)


def encoding_sha256(tokenizer: AnyTokenizer) -> str:
    """What identifies the ids ``tokenizer`` gives text: a sentencepiece model's sha256; an HF tokenizer's without
    its chat template (a template changes how conversations are written, not which ids a string has)."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encoding_sha256
    return tokenizer.sha256


def save_run_tokenizer(out: Path, tokenizer: AnyTokenizer) -> None:
    """Write the run's own tokenizer in its directory ``out`` once (``tokenizer.model``, or ``tokenizer/`` for a
    Hugging Face one). A resumed run encodes with the one that is there, so it is never replaced: another
    tokenizer there would mean the run's data went through another tokenizer."""
    existing = run_tokenizer_path(out)
    if existing.exists():
        try:
            same = load_tokenizer(existing).sha256 == tokenizer.sha256
        except FlatlmError:
            same = False
        if not same:
            raise RuntimeError(f"{existing} is not the tokenizer this run encoded its data with; not replacing it")
        return
    tokenizer.save(out / (RUN_TOKENIZER_DIR if tokenizer.kind == "hf" else RUN_TOKENIZER_FILE))
