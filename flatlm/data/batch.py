"""A micro-batch as the data side hands it to the training step and to evaluation.

A language-model batch is more than (inputs, targets): fine-tuning counts the loss on some targets only (the
answer, never the prompt), and packed documents may restart their positions. So the step consumes a small
dataclass, and the loss is a sum over the *counted* targets normalised by their count (flatlm.train.step):

    inputs        [B, L] int64  token ids fed to the model
    targets       [B, L] int64  the next token of each input position
    loss_mask     [B, L] bool   True where the target counts in the loss; None: every target counts (pretraining)
    position_ids  [B, L] int64  None: the model's default 0..L-1

``PackedSequences.batch`` (pretraining windows) produces batches with every target counted. ``as_batch`` also
takes a plain ``(inputs, targets)`` pair, the form tests and benchmarks write by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor
    """Token ids fed to the model, [B, L] int64."""
    targets: torch.Tensor
    """The token to predict at each input position, [B, L] int64."""
    loss_mask: torch.Tensor | None = None
    """True where the target counts in the loss, [B, L] bool; None: every target counts."""
    position_ids: torch.Tensor | None = None
    """Position of each input token, [B, L] int64; None: the model's default (0..L-1 in every row)."""

    def __post_init__(self) -> None:
        shape = tuple(self.inputs.shape)
        if len(shape) != 2 or tuple(self.targets.shape) != shape:
            raise ValueError(f"inputs and targets must both be [B, L]; got {shape} and {tuple(self.targets.shape)}")
        for name in ("loss_mask", "position_ids"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} must have the inputs' shape {shape}; got {tuple(value.shape)}")
        if self.loss_mask is not None and self.loss_mask.dtype != torch.bool:
            raise ValueError(f"loss_mask must be a bool tensor; got {self.loss_mask.dtype}")

    @property
    def size(self) -> int:
        """Sequences in the batch (B)."""
        return int(self.inputs.shape[0])

    def counted(self) -> torch.Tensor:
        """Counted targets of each sequence, [B] int64 (on the batch's device; no host sync)."""
        if self.loss_mask is None:
            return torch.full((self.size,), self.targets.shape[1], dtype=torch.int64, device=self.targets.device)
        return self.loss_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(self.inputs.to(device), self.targets.to(device), move(self.loss_mask), move(self.position_ids))


def as_batch(batch: Batch | tuple[torch.Tensor, torch.Tensor]) -> Batch:
    """``batch`` itself, or a ``(inputs, targets)`` pair as a batch with every target counted."""
    if isinstance(batch, Batch):
        return batch
    inputs, targets = batch
    return Batch(inputs, targets)


class Sequences(Protocol):
    """What the training loop reads a split through: pretraining windows (``flatlm.data.packing.PackedSequences``)
    and fine-tuning examples, packed or one per row (``flatlm.data.sft``)."""

    seq_len: int
    num_tokens: int

    def __len__(self) -> int:
        """Rows (sequences) in the split: what the sampler permutes."""
        ...

    def batch(self, indices: Sequence[int]) -> Batch:
        """Rows ``indices`` as one micro-batch."""
        ...

    def input_tokens(self, indices: Sequence[int]) -> int:
        """Input positions of rows ``indices`` that hold a real token, not padding: what the training loop counts as
        tokens seen (``tokens``, ``tokens_per_s``). Known on the host from the rows' lengths; no batch is built."""
        ...
