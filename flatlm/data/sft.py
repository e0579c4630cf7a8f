"""Supervised fine-tuning data: tokenized chat examples with a per-token trainable mask, packed or one per row.

An example is a conversation rendered and tokenized (flatlm.data.chat): ``ids`` and ``trainable`` (the assistant's
tokens and their EOS), at most ``seq_len + 1`` tokens (longer ones are cut and counted). Its inputs are
``ids[:-1]``, its targets ``ids[1:]`` and its loss mask ``trainable[1:]``: target ``t`` counts when token ``t+1``
was written by the assistant.

Two views of a split, each with the ``PackedSequences`` interface (``len``, ``batch(indices) -> Batch``,
``seq_len``, ``num_tokens``, ``input_tokens(indices)``: the real tokens the loop counts, padding excluded)
so the sampler, the step and evaluation take them unchanged:

``PackedExamples`` (data.packing=true)
    Greedy and deterministic: examples in order, a new row when the next one does not fit. Every row has exactly
    ``seq_len`` inputs; each example's positions restart at 0, which is how the step confines attention to each
    example (flatlm.train.step.packed_attention_mask). The row's tail is padding: EOS ids, never counted, its own
    segment starting at position 0 (so no example attends to it and it attends to none).
``PaddedExamples`` (data.packing=false)
    One example per row, right-padded (EOS, not counted) to the longest of the batch. No position ids: causal
    attention never lets a real token see the padding to its right.

The examples are cached in ``data.cache_dir`` (``sft-<key>/``: ids, trainable mask and offsets as .npy, their
blake2b digests in ``meta.json``, checked on every open), the key hashing the source's fingerprint, the tokenizer's
sha256, the template, data.chat_format and data.seq_len: a second run on the same data skips rendering and
tokenizing (and, for stdlib_docs, parsing the standard library).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flatlm.config import DataConfig
from flatlm.data.batch import Batch
from flatlm.data.cache import builder, default_cache_dir, digest, file_digest, locked, publish
from flatlm.data.chat import ChatTokenizer, Renderer, encode_segments, to_conversation
from flatlm.data.docstrings import STDLIB_DOCS_VERSION
from flatlm.data.sources import source_fingerprint


@dataclass
class Examples:
    """Tokenized examples: ``ids[i]`` (int64) and ``trainable[i]`` (bool), each at most seq_len + 1 long."""

    ids: list[np.ndarray] = field(default_factory=list)
    trainable: list[np.ndarray] = field(default_factory=list)
    truncated: int = 0
    """Examples cut to seq_len + 1 tokens."""
    dropped: int = 0
    """Examples left out because no trainable target remained (the answer was cut off entirely, or empty)."""

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Iterable[int]) -> Examples:
        chosen = [int(i) for i in indices]
        return Examples([self.ids[i] for i in chosen], [self.trainable[i] for i in chosen])


def tokenize_examples(
    rows: Iterable[tuple[str, dict[str, Any]]],
    chat_format: str,
    renderer: Renderer,
    tokenizer: ChatTokenizer,
    seq_len: int,
) -> Examples:
    """Each ``(where, row)`` as an example: conversation, segments, tokens, cut to ``seq_len + 1`` tokens."""
    out = Examples()
    for where, row in rows:
        ids, mask = encode_segments(renderer.segments(to_conversation(row, chat_format, where)), tokenizer)
        if len(ids) > seq_len + 1:
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            out.truncated += 1
        if not any(mask[1:]):
            out.dropped += 1
            continue
        out.ids.append(np.asarray(ids, dtype=np.int64))
        out.trainable.append(np.asarray(mask, dtype=bool))
    return out


def report(examples: Examples, seq_len: int, warn: Callable[[str], None]) -> None:
    """Warn about cut and dropped examples (the fix: a longer data.seq_len)."""
    total = len(examples) + examples.dropped
    if examples.truncated:
        warn(
            f"{examples.truncated} of {total} chat examples are longer than data.seq_len+1={seq_len + 1} tokens and "
            "were cut (their answers lose their ends); raise data.seq_len to keep them whole"
        )
    if examples.dropped:
        warn(
            f"{examples.dropped} of {total} chat examples have no answer token within data.seq_len={seq_len} "
            "(nothing to train on) and were left out; raise data.seq_len or shorten the prompts"
        )


def example_arrays(ids: np.ndarray, trainable: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, loss mask) of one example: target t is token t+1, counted when the assistant wrote it."""
    return ids[:-1], ids[1:], trainable[1:]


def pack_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Greedy first-fit in order: the example indices of each row (``lengths``: input tokens per example)."""
    rows: list[list[int]] = []
    used = seq_len  # no open row yet
    for i, n in enumerate(lengths):
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


class PackedExamples:
    """Examples packed into rows of exactly ``seq_len`` inputs, positions restarting at 0 for each example."""

    def __init__(self, examples: Examples, seq_len: int, pad_id: int):
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        lengths = [len(ids) - 1 for ids in examples.ids]
        self.rows = pack_rows(lengths, seq_len)
        self.row_tokens = np.array([sum(lengths[i] for i in row) for row in self.rows], dtype=np.int64)
        """Input tokens of each row (its padding excluded)."""
        self.num_tokens = int(self.row_tokens.sum())
        """Input tokens of the examples (padding excluded)."""

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def padding_fraction(self) -> float:
        """Share of the rows' input positions that are padding."""
        return 1.0 - self.num_tokens / max(len(self.rows) * self.seq_len, 1)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, targets, loss mask, positions) of row ``r``, each [seq_len]."""
        inputs, targets, mask, positions = [], [], [], []
        for i in self.rows[r]:
            x, y, m = example_arrays(self.examples.ids[i], self.examples.trainable[i])
            inputs.append(x)
            targets.append(y)
            mask.append(m)
            positions.append(np.arange(len(x)))
        pad = self.seq_len - sum(len(x) for x in inputs)
        if pad:  # its own segment: positions from 0, never counted
            inputs.append(np.full(pad, self.pad_id))
            targets.append(np.full(pad, self.pad_id))
            mask.append(np.zeros(pad, dtype=bool))
            positions.append(np.arange(pad))
        return tuple(np.concatenate(x) for x in (inputs, targets, mask, positions))  # type: ignore[return-value]

    def input_tokens(self, indices: np.ndarray | list[int] | range) -> int:
        """Real (non-padding) input tokens of the rows ``indices``."""
        return int(self.row_tokens[np.asarray(indices, dtype=np.int64)].sum())

    def batch(self, indices: np.ndarray | list[int] | range) -> Batch:
        """The rows ``indices``: [len(indices), seq_len] each, with loss mask and position ids."""
        rows = [self.row(int(r)) for r in indices]
        inputs, targets, mask, positions = (torch.from_numpy(np.stack(col)) for col in zip(*rows, strict=True))
        return Batch(inputs.long(), targets.long(), mask.bool(), positions.long())


class PaddedExamples:
    """One example per row, right-padded to the longest example of the batch (no position ids)."""

    def __init__(self, examples: Examples, seq_len: int, pad_id: int):
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self.lengths = np.array([len(ids) - 1 for ids in examples.ids], dtype=np.int64)
        """Input tokens of each example (row)."""
        self.num_tokens = int(self.lengths.sum())

    def __len__(self) -> int:
        return len(self.examples)

    def input_tokens(self, indices: np.ndarray | list[int] | range) -> int:
        """Real input tokens of the rows ``indices``: their examples' lengths, not the padded width of a batch."""
        return int(self.lengths[np.asarray(indices, dtype=np.int64)].sum())

    def padding_fraction(self, batch_size: int) -> float:
        """Share of padding when consecutive examples are batched ``batch_size`` at a time."""
        lengths = self.lengths
        padded = sum(
            int(lengths[i : i + batch_size].max()) * len(lengths[i : i + batch_size])
            for i in range(0, len(lengths), batch_size)
        )
        return 1.0 - int(lengths.sum()) / max(padded, 1)

    def batch(self, indices: np.ndarray | list[int] | range) -> Batch:
        chosen = [int(i) for i in indices]
        width = max(len(self.examples.ids[i]) - 1 for i in chosen)
        inputs = np.full((len(chosen), width), self.pad_id, dtype=np.int64)
        targets = np.full((len(chosen), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(chosen), width), dtype=bool)
        for b, i in enumerate(chosen):
            x, y, m = example_arrays(self.examples.ids[i], self.examples.trainable[i])
            inputs[b, : len(x)], targets[b, : len(x)], mask[b, : len(x)] = x, y, m
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(mask))


SftSequences = PackedExamples | PaddedExamples


def sft_view(examples: Examples, seq_len: int, pad_id: int, packing: bool) -> SftSequences:
    """The packed or the one-per-row view of ``examples`` (data.packing)."""
    return (PackedExamples if packing else PaddedExamples)(examples, seq_len, pad_id)


# -- the cache of tokenized examples -------------------------------------------------------------------------------

SFT_CACHE_FORMAT = 1  # bump when the layout below, the rendering or the tokenization of examples changes
SFT_FILES = ("ids.npy", "trainable.npy", "offsets.npy")


def examples_key(cfg: DataConfig, tokenizer_sha256: str, template: str) -> str:
    """Names the examples of this source rendered with ``template``, tokenized by this tokenizer, cut at seq_len."""
    return "sft-" + digest(
        {
            "source": source_fingerprint(cfg),
            "tokenizer_sha256": tokenizer_sha256,
            "template_sha256": hashlib.sha256(template.encode()).hexdigest(),
            "chat_format": cfg.chat_format,
            "seq_len": cfg.seq_len,
            "stdlib_docs": STDLIB_DOCS_VERSION if cfg.source == "stdlib_docs" else None,
            "format": SFT_CACHE_FORMAT,
        }
    )


def _write_examples(out: Path, examples: Examples) -> None:
    lengths = [len(ids) for ids in examples.ids]
    arrays = {
        "ids.npy": np.concatenate(examples.ids) if lengths else np.zeros(0, dtype=np.int64),
        "trainable.npy": np.concatenate(examples.trainable) if lengths else np.zeros(0, dtype=bool),
        "offsets.npy": np.r_[0, np.cumsum(lengths)].astype(np.int64),
    }
    for name, array in arrays.items():
        np.save(out / name, array)
    meta = {
        "format": SFT_CACHE_FORMAT,
        "truncated": examples.truncated,
        "dropped": examples.dropped,
        "blake2b": {name: file_digest(out / name) for name in SFT_FILES},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))  # last: marks the directory whole


def _read_examples(path: Path) -> tuple[Examples | None, str]:
    """The examples cached at ``path`` if they verify (digests of every file), else None and why not."""
    if not (path / "meta.json").is_file():
        return None, "missing"
    try:
        meta = json.loads((path / "meta.json").read_text())
        for name in SFT_FILES:
            if file_digest(path / name) != meta["blake2b"][name]:
                return None, f"{name} does not match its digest"
        ids, trainable, offsets = (np.load(path / name) for name in SFT_FILES)
    except (OSError, ValueError, KeyError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))
    return Examples(
        [ids[a:b] for a, b in bounds], [trainable[a:b] for a, b in bounds], meta["truncated"], meta["dropped"]
    ), ""


def cached_examples(
    cfg: DataConfig, key: str, build: Callable[[], Examples], log: Callable[[str], None], warn: Callable[[str], None]
) -> Examples:
    """The examples of ``key`` from ``data.cache_dir``, built by ``build`` (once, under a lock) when missing or
    damaged. Built in a temporary directory renamed into place: readers never see half of one."""
    root = default_cache_dir(cfg)
    path = root / key
    examples, problem = _read_examples(path)
    if examples is not None:
        return examples
    with locked(root, key, log):
        examples, problem = _read_examples(path)  # another process may have built it meanwhile
        if examples is not None:
            return examples
        if problem != "missing":
            warn(f"the chat example cache {path} is damaged ({problem}); rebuilding it")
        examples = build()
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-{builder()}-", dir=root))
        try:
            _write_examples(tmp, examples)
            publish(tmp, path, lambda: _read_examples(path)[0] is not None)  # another node's whole one stays
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return examples
