"""A run's data: the token cache of ``cfg.data``, split by document into training and validation, each packed.

``load_data`` is what the training loop reads before building the model: the vocabulary size and special ids
come from the tokenizer. A resumed run encodes the data with its own ``tokenizer.model`` (a new tokenizer would
renumber the pieces under the model's embedding), whatever the corpus is now.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flatlm.config import RunConfig
from flatlm.data.cache import load_or_build, resume_tokenizer
from flatlm.data.packing import PackedSequences, require_sequences, split_documents
from flatlm.data.tokenizer import Tokenizer

log = logging.getLogger("flatlm")


@dataclass
class Data:
    train: PackedSequences
    val: PackedSequences | None
    """None when there is no validation split, or it is shorter than one sequence."""
    vocab_size: int
    bos_id: int
    eos_id: int
    tokenizer: Tokenizer
    chat_template: str | None = None
    """data.format=chat: the template the examples were rendered with (written to the run directory)."""


def data_seed(cfg: RunConfig) -> int:
    """The seed of the train/validation split and of the data order: ``data.seed``, else the run's ``seed``."""
    return cfg.seed if cfg.data.seed is None else cfg.data.seed


def load_data(cfg: RunConfig, run_tokenizer: Path | None = None) -> Data:
    """The token cache of ``cfg.data``. ``run_tokenizer``: a resumed run's own tokenizer.model; the data are
    encoded with it (a new one would renumber the pieces under the model's embedding), whatever the corpus."""
    tokenizer = None
    if run_tokenizer is not None and run_tokenizer.is_file():
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
