from __future__ import annotations

import numpy as np
import pytest

from flatlm.data.packing import PackedSequences, require_sequences, split_documents
from flatlm.errors import FlatlmError

EOS = 2


def _corpus(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Documents of the given lengths (EOS included); document i holds tokens 100*(i+1), 100*(i+1)+1, ... then EOS."""
    tokens, offsets = [], [0]
    for i, n in enumerate(lengths):
        tokens.extend([100 * (i + 1) + j for j in range(n - 1)] + [EOS])
        offsets.append(offsets[-1] + n)
    return np.asarray(tokens, dtype=np.uint16), np.asarray(offsets)


def test_windows_are_the_concatenated_stream_shifted() -> None:
    tokens, offsets = _corpus([5, 3, 9, 4, 7])
    ids = np.array([0, 2, 3])  # documents 1 and 4 belong to another split
    packed = PackedSequences(tokens, offsets, ids, seq_len=4)
    stream = np.concatenate([tokens[offsets[i] : offsets[i + 1]] for i in ids])
    assert packed.num_tokens == len(stream) == 18
    assert len(packed) == (18 - 1) // 4 == 4
    for i in range(len(packed)):
        assert packed[i].tolist() == stream[i * 4 : i * 4 + 5].tolist()
    batch = packed.batch([0, 3])
    x, y = batch.inputs, batch.targets
    assert x.shape == y.shape == (2, 4)
    assert batch.loss_mask is None and batch.position_ids is None  # pretraining: every target counts
    assert batch.counted().tolist() == [4, 4]
    assert x[1, 1:].tolist() == y[1, :-1].tolist()


def test_eos_separates_documents_and_windows_cross_them() -> None:
    tokens, offsets = _corpus([3, 3, 3])
    packed = PackedSequences(tokens, offsets, np.arange(3), seq_len=8)
    window = packed[0].tolist()
    assert window == [100, 101, EOS, 200, 201, EOS, 300, 301, EOS]


def test_tail_dropped_and_index_checked() -> None:
    tokens, offsets = _corpus([10])
    packed = PackedSequences(tokens, offsets, np.arange(1), seq_len=4)
    assert len(packed) == 2  # windows [0:5], [4:9]; token 9 only as a target of nothing -> dropped
    with pytest.raises(IndexError):
        packed[2]


def test_exact_fit_boundary() -> None:
    tokens, offsets = _corpus([9])  # 9 tokens = 2 windows of 4 (+1 shared)
    assert len(PackedSequences(tokens, offsets, np.arange(1), seq_len=4)) == 2
    tokens, offsets = _corpus([8])
    assert len(PackedSequences(tokens, offsets, np.arange(1), seq_len=4)) == 1


def test_empty_split_error() -> None:
    tokens, offsets = _corpus([3])
    packed = PackedSequences(tokens, offsets, np.arange(1), seq_len=16)
    assert len(packed) == 0
    with pytest.raises(FlatlmError, match="data.seq_len=16"):
        require_sequences(packed, "training")
    empty = PackedSequences(tokens, offsets, np.array([], dtype=np.int64), seq_len=4)
    assert len(empty) == 0


def test_split_by_document_deterministic_from_seed() -> None:
    tr, va = split_documents(100, 0.1, seed=3)
    tr2, va2 = split_documents(100, 0.1, seed=3)
    assert tr.tolist() == tr2.tolist() and va.tolist() == va2.tolist()
    assert len(va) == 10 and set(tr) | set(va) == set(range(100)) and not set(tr) & set(va)
    assert split_documents(100, 0.1, seed=4)[1].tolist() != va.tolist()


def test_split_keeps_one_document_each_side() -> None:
    assert [len(s) for s in split_documents(2, 0.01, 0)] == [1, 1]
    assert [len(s) for s in split_documents(3, 0.99, 0)] == [1, 2]
    assert [len(s) for s in split_documents(5, 0.0, 0)] == [5, 0]
