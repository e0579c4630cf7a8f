"""Split documents into train/validation and pack a split into fixed-length sequences.

A split is the concatenation of its documents' tokens (each ending with EOS), in corpus order.
Sequence ``i`` of length ``L`` is the window ``stream[i*L : i*L + L + 1]``: inputs are its first
``L`` tokens, targets its last ``L`` (consecutive windows share one token, so no target is lost).
Windows run across document boundaries; the EOS between documents marks them. The tail that does
not fill a window is dropped. Nothing is copied: windows are gathered from the memory map. ``batch`` gives a
``flatlm.data.batch.Batch`` with every target counted (no loss mask) and default positions.
"""

from __future__ import annotations

import numpy as np
import torch

from flatlm.data.batch import Batch
from flatlm.errors import FlatlmError


def split_documents(num_documents: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids), each sorted; a seeded permutation picks the validation set.

    With ``val_fraction > 0`` the validation split gets at least one document and the training
    split keeps at least one.
    """
    n_val = round(num_documents * val_fraction)
    if val_fraction > 0 and num_documents >= 2:
        n_val = min(max(n_val, 1), num_documents - 1)
    perm = np.random.default_rng(seed).permutation(num_documents)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class PackedSequences:
    """The fixed-length sequences of the documents ``doc_ids`` of a token cache."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, doc_ids: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        starts, ends = offsets[doc_ids], offsets[np.asarray(doc_ids) + 1]
        # Merge runs of consecutive documents into one span each: fewer pieces to gather from.
        if len(starts):
            breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
            self.span_starts = starts[np.r_[0, breaks]]
            span_ends = ends[np.r_[breaks - 1, len(ends) - 1]]
        else:
            self.span_starts = span_ends = np.zeros(0, dtype=np.int64)
        lengths = span_ends - self.span_starts
        self.cum = np.r_[0, np.cumsum(lengths)]  # stream position where each span begins
        self.num_tokens = int(self.cum[-1])

    def __len__(self) -> int:
        return max(self.num_tokens - 1, 0) // self.seq_len

    def __getitem__(self, i: int) -> np.ndarray:
        """Window ``i``: ``seq_len + 1`` token ids (int64)."""
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        return self._gather(i * self.seq_len, self.seq_len + 1)

    def _gather(self, pos: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        filled = 0
        span = int(np.searchsorted(self.cum, pos, side="right")) - 1
        while filled < length:
            offset = pos + filled - int(self.cum[span])
            take = min(length - filled, int(self.cum[span + 1] - self.cum[span]) - offset)
            start = int(self.span_starts[span]) + offset
            out[filled : filled + take] = self.tokens[start : start + take]
            filled += take
            span += 1
        return out

    def input_tokens(self, indices: np.ndarray | list[int] | range) -> int:
        """Every window is ``seq_len`` real tokens (no padding)."""
        return len(indices) * self.seq_len

    def batch(self, indices: np.ndarray | list[int]) -> Batch:
        """The windows ``indices`` as a batch: inputs and targets each ``[len(indices), seq_len]`` int64, every
        target counted (pretraining)."""
        windows = torch.from_numpy(np.stack([self[int(i)] for i in indices]))  # [B, L+1]
        return Batch(windows[:, :-1], windows[:, 1:])


def require_sequences(packed: PackedSequences, split: str, min_count: int = 1) -> None:
    if len(packed) < min_count:
        raise FlatlmError(
            f"the {split} split has {packed.num_tokens} tokens, which packs into {len(packed)} "
            f"sequences of data.seq_len={packed.seq_len} (at least {min_count} needed); lower "
            "data.seq_len or add data"
        )
