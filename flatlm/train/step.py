"""One optimizer step: forward/backward over the micro-batches, (SAM's second pass), clip, step.

``accum`` micro-batches per process make one step; each micro-batch's mean loss is divided by
``accum`` so the accumulated gradient is that of the whole batch. Optimizers of the SAM family
(those with ``perturb``/``restore``) get their two-pass step:

    pass 1 over all micro-batches (g at w)  ->  optimizer.perturb()  (w <- w + eps)
    pass 2 over the same micro-batches (g' at w + eps)  ->  optimizer.restore()  (w back, final grad)
    clip by global norm  ->  optimizer.step()  (the base optimizer)

The logged loss is always pass 1's: the loss at the weights being trained. Under data parallelism
``no_sync`` skips the gradient all-reduce for all but the last micro-batch of each pass, so each pass
synchronises once and SAM's perturbation uses the global-batch gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each [B, L]


def per_sequence_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Mean next-token cross entropy of each sequence, [B] (nats/token, fp32)."""
    autocast = torch.autocast(inputs.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        logits = model(input_ids=inputs).logits  # [B, L, V]
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # [B*L]
    return loss.view(targets.shape).mean(dim=1)  # [B]


def is_two_pass(optimizer: torch.optim.Optimizer) -> bool:
    return hasattr(optimizer, "perturb") and hasattr(optimizer, "restore")


@dataclass
class StepStats:
    loss: torch.Tensor
    """Mean training loss of this process's share of the step (first pass), a scalar tensor."""
    grad_norm: float
    """Global L2 norm of the gradient the optimizer stepped with, before clipping."""
    second_pass: bool = False
    """Whether a second forward/backward ran (SAM family)."""


def _accumulate(
    model: torch.nn.Module,
    batches: list[Batch],
    bf16: bool,
    reduce: Callable[[int, torch.Tensor], torch.Tensor],
    no_sync: Callable[[], contextlib.AbstractContextManager],
) -> list[torch.Tensor]:
    """Forward + backward every micro-batch; ``reduce(i, per_seq)`` gives the scalar to backward."""
    per_batch = []
    for i, (x, y) in enumerate(batches):
        with no_sync() if i < len(batches) - 1 else contextlib.nullcontext():
            per_seq = per_sequence_loss(model, x, y, bf16)
            (reduce(i, per_seq) / len(batches)).backward()
        per_batch.append(per_seq.detach())
    return per_batch


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    params: list[torch.nn.Parameter],
    *,
    grad_clip: float,
    bf16: bool = False,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> StepStats:
    first = _accumulate(model, batches, bf16, lambda i, per_seq: per_seq.mean(), no_sync)
    second = False
    if is_two_pass(optimizer) and optimizer.perturb():
        _accumulate(model, batches, bf16, lambda i, per_seq: optimizer.second_pass_loss(per_seq, first[i]), no_sync)
        optimizer.restore()
        second = True
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = torch.stack([p.mean() for p in first]).mean()
    return StepStats(loss=loss, grad_norm=grad_norm, second_pass=second)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[Batch], bf16: bool = False) -> float:
    """Mean per-sequence loss over ``batches`` in eval mode."""
    was_training = model.training
    model.eval()
    losses = torch.cat([per_sequence_loss(model, x, y, bf16) for x, y in batches])
    model.train(was_training)
    return losses.mean().item()
