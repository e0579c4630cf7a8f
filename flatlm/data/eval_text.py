"""Text to evaluate a model on: a run's validation documents (or given files), a seeded choice of them, packed into
windows that cover every chosen document exactly.

``flatlm eval`` and ``flatlm landscape`` measure a model on *documents*, not on windows of a token stream, so that
clean and corrupted text (``flatlm.data.corrupt``) are the same documents: a corruption changes the number of
tokens, and windows cut from two different streams would cover different text. ``choose_documents`` takes a seeded
order of the documents and keeps the first ones until their clean text holds the requested number of tokens (the
last one cut to fit);
``document_batches`` encodes any version of those documents (each followed by EOS, as the token cache does) into one
stream cut into ``seq_len`` windows, the last one padded with its padded targets masked out, so every token of every
chosen document is counted once.

A run's validation documents are the documents of its ``data`` section that its seeded split held out
(``split_documents`` over ``iter_documents``, as the token cache was built): the text the model never trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from flatlm.config import DataConfig, RunConfig
from flatlm.data.batch import Batch
from flatlm.data.packing import split_documents
from flatlm.data.sources import iter_documents
from flatlm.data.tokenizer import AnyTokenizer
from flatlm.errors import FlatlmError


def validation_documents(cfg: RunConfig, seed: int) -> list[str]:
    """The documents ``cfg``'s train/validation split held out (``seed``: the split's seed, ``data_seed(cfg)``)."""
    if cfg.data.format == "chat":
        raise FlatlmError(
            "this is a fine-tuning (data.format=chat) run, whose validation split is conversations; evaluate it on "
            "text with --data PATH, or on a pretraining run's validation split with --val-of RUN_DIR"
        )
    documents = list(iter_documents(cfg.data))
    _, val_ids = split_documents(len(documents), cfg.data.val_fraction, seed)
    if not len(val_ids):
        raise FlatlmError(
            "the run has no validation split (data.val_fraction=0); pass --data PATH with held-out text to evaluate on"
        )
    return [documents[int(i)] for i in val_ids]


def file_documents(paths: Sequence[str], text_field: str = "text") -> list[str]:
    """The documents of text, jsonl/json or parquet files, directories or globs (as ``data.source=files`` reads
    them: one document per text file, one per row of the others, column ``text_field``)."""
    cfg = DataConfig(source="files", paths=[str(Path(p).expanduser()) for p in paths], text_field=text_field)
    documents = list(iter_documents(cfg))
    if not documents:
        raise FlatlmError(f"--data {' '.join(paths)} holds no document; pass text, jsonl or parquet files")
    return documents


def choose_documents(documents: Sequence[str], tokenizer: AnyTokenizer, tokens: int, seed: int) -> list[str]:
    """The first documents of a seeded order until their clean text (each with its EOS) holds ``tokens`` tokens,
    the last one cut to the prefix that fits (at a line end where there is one), or all of them; the same
    documents for any corruption. (Whole source files run to thousands of tokens: without the cut, one more file
    could double the text measured.)"""
    order = np.random.default_rng(seed).permutation(len(documents))
    chosen: list[str] = []
    count = 0
    for i in order:
        text = documents[int(i)]
        length = len(tokenizer.encode([text])[0]) + 1
        if count + length > tokens:
            prefix = _prefix(text, tokenizer, tokens - count)
            if prefix:
                chosen.append(prefix)
            break
        chosen.append(text)
        count += length
    return chosen


def _prefix(text: str, tokenizer: AnyTokenizer, tokens: int) -> str:
    """The longest prefix of ``text`` that encodes to at most ``tokens - 1`` tokens (its EOS is the last), cut back
    to its last line end when it has one."""
    low, high = 0, len(text)  # encodes to <= tokens - 1 at low; bisect on the character count
    while low < high:
        mid = (low + high + 1) // 2
        if len(tokenizer.encode([text[:mid]])[0]) + 1 <= tokens:
            low = mid
        else:
            high = mid - 1
    cut = text.rfind("\n", 0, low)
    return text[: cut + 1] if cut > 0 else text[:low]


def document_batches(
    documents: Sequence[str], tokenizer: AnyTokenizer, seq_len: int, batch_size: int, rank: int = 0, world: int = 1
) -> list[Batch]:
    """``documents`` as one token stream (each followed by EOS) cut into windows of ``seq_len`` inputs, every
    token after the first counted exactly once (the last window padded with EOS, its padded targets masked out);
    this rank's windows (``rank``, ``rank + world``, ...) in batches of ``batch_size``."""
    stream = np.fromiter(
        (t for ids in tokenizer.encode(list(documents)) for t in [*ids, tokenizer.eos_id]), dtype=np.int64
    )
    if len(stream) < 2:
        raise FlatlmError("the evaluation text holds fewer than 2 tokens; pass more text")
    windows = -(-(len(stream) - 1) // seq_len)
    padded = np.full(windows * seq_len + 1, tokenizer.eos_id, dtype=np.int64)
    padded[: len(stream)] = stream
    index = np.arange(windows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    rows = torch.from_numpy(padded[index])  # [windows, seq_len + 1]
    counted = torch.from_numpy(index[:, 1:] < len(stream))  # [windows, seq_len]: targets that are real tokens
    mine = list(range(rank, windows, world))
    return [
        Batch(rows[part, :-1], rows[part, 1:], loss_mask=counted[part])
        for part in (mine[i : i + batch_size] for i in range(0, len(mine), batch_size))
    ]
