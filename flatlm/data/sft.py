"""Supervised fine-tuning data: tokenized chat examples with a per-token trainable mask, packed or one per row.

An example is a conversation rendered and tokenized (flatlm.data.chat): ``ids`` and ``trainable`` (the assistant's
tokens and their EOS), at most ``seq_len + 1`` tokens (longer ones are cut and counted). Its inputs are
``ids[:-1]``, its targets ``ids[1:]`` and its loss mask ``trainable[1:]``: target ``t`` counts when token ``t+1``
was written by the assistant.

Two views of a split, each with the ``PackedSequences`` interface (``len``, ``batch(indices) -> Batch``,
``seq_len``, ``num_tokens``) so the sampler, the step and evaluation take them unchanged:

``PackedExamples`` (data.packing=true)
    Greedy and deterministic: examples in order, a new row when the next one does not fit. Every row has exactly
    ``seq_len`` inputs; each example's positions restart at 0, which is how the step confines attention to each
    example (flatlm.train.step.packed_attention_mask). The row's tail is padding: EOS ids, never counted, its own
    segment starting at position 0 (so no example attends to it and it attends to none).
``PaddedExamples`` (data.packing=false)
    One example per row, right-padded (EOS, not counted) to the longest of the batch. No position ids: causal
    attention never lets a real token see the padding to its right.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flatlm.data.batch import Batch
from flatlm.data.chat import ChatTokenizer, Renderer, encode_segments, to_conversation


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
        self.rows = pack_rows([len(ids) - 1 for ids in examples.ids], seq_len)
        self.num_tokens = sum(len(ids) - 1 for ids in examples.ids)
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

    def batch(self, indices: np.ndarray | list[int] | range) -> Batch:
        """The rows ``indices``: [len(indices), seq_len] each, with loss mask and position ids."""
        rows = [self.row(int(r)) for r in indices]
        inputs, targets, mask, positions = (torch.from_numpy(np.stack(col)) for col in zip(*rows, strict=True))
        return Batch(inputs.long(), targets.long(), mask.bool(), positions.long())


class PaddedExamples:
    """One example per row, right-padded to the longest example of the batch (no position ids)."""

    def __init__(self, examples: Examples, seq_len: int, pad_id: int):
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self.num_tokens = sum(len(ids) - 1 for ids in examples.ids)

    def __len__(self) -> int:
        return len(self.examples)

    def padding_fraction(self, batch_size: int) -> float:
        """Share of padding when consecutive examples are batched ``batch_size`` at a time."""
        lengths = np.array([len(ids) - 1 for ids in self.examples.ids])
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
