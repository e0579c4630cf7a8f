"""A run's data: the token cache of ``cfg.data``, split by document into training and validation, each packed;
or, for data.format=chat, the tokenized chat examples split by example (flatlm.data.sft).

``load_data`` is what the training loop reads before building the model: the vocabulary size and special ids
come from the tokenizer. A resumed run encodes the data with its own ``tokenizer.model`` (a new tokenizer would
renumber the pieces under the model's embedding), whatever the corpus is now.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from flatlm.config import RunConfig
from flatlm.data.batch import Sequences
from flatlm.data.cache import default_cache_dir, load_or_build, resume_tokenizer, trained_tokenizer
from flatlm.data.chat import renderer_for, resolved_template
from flatlm.data.packing import PackedSequences, require_sequences, split_documents
from flatlm.data.sft import Examples, cached_examples, examples_key, report, sft_view, tokenize_examples
from flatlm.data.sources import iter_rows, source_fingerprint
from flatlm.data.tokenizer import CHAT_TEMPLATE_FILE, AnyTokenizer, encoding_sha256, load_tokenizer
from flatlm.errors import FlatlmError

log = logging.getLogger("flatlm")


@dataclass
class Data:
    train: Sequences
    val: Sequences | None
    """None when there is no validation split, or it is shorter than one sequence."""
    vocab_size: int
    bos_id: int
    eos_id: int
    tokenizer: AnyTokenizer
    chat_template: str | None = None
    """data.format=chat: the template the examples were rendered with (written to the run directory)."""


FINGERPRINT_ROWS = 64
"""Rows of each split read into ``data_fingerprint`` (evenly spaced, the first and the last among them)."""


def data_fingerprint(data: Data) -> str:
    """A short hash of what the model is fed: the tokenizer's encoding, the splits' sizes and ``FINGERPRINT_ROWS``
    rows of each split, tokens, targets and loss masks. Cheap (no pass over the corpus), and the same on two nodes
    exactly when their caches hold the same tokenization of the same documents, as far as those rows show: another
    tokenizer, another document order or split, or documents added or removed change it."""
    h = hashlib.sha256(f"{encoding_sha256(data.tokenizer)}\0{data.vocab_size}\0{data.bos_id}\0{data.eos_id}".encode())
    for split in (data.train, data.val):
        if split is None:
            h.update(b"none")
            continue
        n = len(split)
        h.update(f"\0{n}\0{split.num_tokens}\0{split.seq_len}".encode())
        rows = sorted({round(i * (n - 1) / max(FINGERPRINT_ROWS - 1, 1)) for i in range(FINGERPRINT_ROWS)})
        batch = split.batch(rows)
        for tensor in (batch.inputs, batch.targets, batch.loss_mask, batch.position_ids):
            h.update(b"-" if tensor is None else tensor.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def data_seed(cfg: RunConfig) -> int:
    """The seed of the train/validation split and of the data order: ``data.seed``, else the run's ``seed``."""
    return cfg.seed if cfg.data.seed is None else cfg.data.seed


def load_data(cfg: RunConfig, run_tokenizer: Path | None = None) -> Data:
    """The token cache of ``cfg.data``. ``run_tokenizer``: a resumed run's own tokenizer.model; the data are
    encoded with it (a new one would renumber the pieces under the model's embedding), whatever the corpus."""
    if cfg.data.format == "chat":
        return load_chat_data(cfg, run_tokenizer)
    tokenizer = None
    if run_tokenizer is not None and run_tokenizer.exists():
        tokenizer = resume_tokenizer(cfg.data, run_tokenizer, warn=log.warning)
    elif run_tokenizer is not None:
        log.warning(f"resuming a run without its {run_tokenizer.name}; the data's tokenizer is used and saved there")
    cache = load_or_build(cfg.data, log=log.info, tokenizer=tokenizer, warn=log.warning)
    train_ids, val_ids = split_documents(cache.num_documents, cfg.data.val_fraction, data_seed(cfg))
    train = PackedSequences(cache.tokens, cache.offsets, train_ids, cfg.data.seq_len)
    require_sequences(train, "training", 1)
    val = PackedSequences(cache.tokens, cache.offsets, val_ids, cfg.data.seq_len) if len(val_ids) else None
    if val is not None and len(val) == 0:
        log.warning("the validation split is shorter than one sequence; evaluation is skipped")
        val = None
    tok = cache.tokenizer
    return Data(train, val, tok.vocab_size, tok.bos_id, tok.eos_id, tok)


def chat_tokenizer(cfg: RunConfig, run_tokenizer: Path | None = None) -> AnyTokenizer:
    """A chat run's tokenizer: the resumed run's own, else data.tokenizer, else one trained on the chat text."""
    if run_tokenizer is not None and run_tokenizer.exists():
        return resume_tokenizer(cfg.data, run_tokenizer, warn=log.warning)
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    log.warning(
        "data.format=chat without data.tokenizer: training a tokenizer on the chat text; fine-tuning normally "
        "starts from a pretrained model (model.init_from) and must use its tokenizer (data.tokenizer=<its run dir>)"
    )
    return trained_tokenizer(cfg.data, default_cache_dir(cfg.data), source_fingerprint(cfg.data), log.info)


def run_chat_template(cfg: RunConfig, own: Path, tok: AnyTokenizer) -> str:
    """A resumed chat run's template: its own ``chat_template.jinja`` (``own``), as its tokenizer is its own, and a
    warning when the configuration would now resolve to another one (its examples were rendered with this one)."""
    kept = own.read_text(encoding="utf-8")
    try:
        now, why = resolved_template(cfg.data, tok), "it resolves to another template now"
    except FlatlmError:  # data.chat_template moved or deleted since: the run has its own copy
        now, why = None, "it cannot be read now"
    if now != kept:
        log.warning(
            f"data.chat_template ({cfg.data.chat_template or 'unset'}) is not the template this run started with "
            f"({why}); resuming with the run's own {own}"
        )
    return kept


def load_chat_data(cfg: RunConfig, run_tokenizer: Path | None = None) -> Data:
    """data.format=chat: the examples of ``cfg.data``'s rows rendered with the resolved template (a resumed run's
    own ``chat_template.jinja``: ``run_chat_template``), split by example (the seeded split of ``split_documents``),
    packed or one per row (data.packing)."""
    tok = chat_tokenizer(cfg, run_tokenizer)
    own = run_tokenizer.parent / CHAT_TEMPLATE_FILE if run_tokenizer is not None else None
    template = (
        run_chat_template(cfg, own, tok) if own is not None and own.is_file() else resolved_template(cfg.data, tok)
    )
    seq_len = cfg.data.seq_len

    def build() -> Examples:
        return tokenize_examples(iter_rows(cfg.data), cfg.data.chat_format, renderer_for(template, tok), tok, seq_len)

    key = examples_key(cfg.data, tok.sha256, template)
    examples = cached_examples(cfg.data, key, build, log.info, log.warning)
    report(examples, seq_len, log.warning)
    if not len(examples):
        raise FlatlmError(
            "the chat data hold no example with an answer token within data.seq_len; check the rows "
            "(an assistant message, a response or an output) or raise data.seq_len"
        )
    train_ids, val_ids = split_documents(len(examples), cfg.data.val_fraction, data_seed(cfg))
    train = sft_view(examples.subset(train_ids), seq_len, tok.eos_id, cfg.data.packing)
    require_sequences(train, "training", 1)
    val = sft_view(examples.subset(val_ids), seq_len, tok.eos_id, cfg.data.packing) if len(val_ids) else None
    log.info(
        f"chat data: {len(examples):,} examples ({len(train_ids):,} train, {len(val_ids):,} validation), "
        f"{train.num_tokens:,} training tokens in {len(train):,} {'packed ' if cfg.data.packing else ''}rows"
    )
    return Data(train, val, tok.vocab_size, tok.bos_id, tok.eos_id, tok, chat_template=template)
