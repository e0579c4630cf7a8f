"""One optimizer step: forward/backward over the micro-batches, (SAM's second pass), clip, step.

``accum`` micro-batches per process make one step; each micro-batch's mean loss is divided by
``accum`` so the accumulated gradient is that of the whole batch. Optimizers of the SAM family
(those with ``perturb``/``restore``) get their two-pass step:

    pass 1 over all micro-batches (g at w)  ->  optimizer.perturb()  (w <- w + eps)
    pass 2 over the same micro-batches (g' at w + eps)  ->  optimizer.restore()  (w back, final grad)
    clip by global norm  ->  optimizer.step()  (the base optimizer)

The logged loss is always pass 1's: the loss at the weights being trained. Under data parallelism
gradients are synchronised once per pass, on its last micro-batch (``parallel.no_sync`` around the others).
SAM's perturbation (``sam.perturbation``):

    global   pass 1 synchronises: eps comes from the global-batch gradient, its norm over every shard
             (one scalar all-reduce under sharded gradients), and equals single-process SAM.
    replica  pass 1 never synchronises: each rank perturbs by the gradient of its own share of the batch
             (m-sharpness, google-research/sam's default); pass 2 synchronises as usual, so the base step uses
             the mean over ranks of grad L_r(w + eps_r). Needs whole weights on every rank (ddp, zero1/2);
             ``parallel.local_pass`` says how a backend keeps pass 1 local (DDP ``no_sync``; DeepSpeed
             ``torch.autograd.grad`` on the bare module, which DeepSpeed's reduction hooks never see).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flatlm.parallel.backend import Parallel

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
    parallel: Parallel,
    batches: list[Batch],
    bf16: bool,
    reduce: Callable[[int, torch.Tensor], torch.Tensor],
    sync: bool = True,
) -> list[torch.Tensor]:
    """Forward + backward every micro-batch; ``reduce(i, per_seq)`` gives the scalar to backward.

    Gradients are synchronised on the last micro-batch only (never when ``sync`` is False)."""
    per_batch = []
    for i, (x, y) in enumerate(batches):
        if not sync:
            context, module = parallel.local_pass(), parallel.local_module(model)
        elif i < len(batches) - 1:
            context, module = parallel.no_sync(), model
        else:
            context, module = contextlib.nullcontext(), model
        with context:
            per_seq = per_sequence_loss(module, x, y, bf16)
            parallel.backward(reduce(i, per_seq) / len(batches))
        per_batch.append(per_seq.detach())
    return per_batch


def train_step(
    parallel: Parallel,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    params: list[torch.nn.Parameter],
    *,
    grad_clip: float,
    bf16: bool = False,
    model: torch.nn.Module | None = None,
    replica_perturbation: bool = False,
) -> StepStats:
    """One optimizer step over ``batches`` (this process's micro-batches); ``model`` defaults to
    ``parallel.forward_module`` (pass a compiled one to run that instead)."""
    model = model if model is not None else parallel.forward_module
    two_pass = is_two_pass(optimizer)
    first_sync = not (two_pass and replica_perturbation)
    first = _accumulate(model, parallel, batches, bf16, lambda i, per_seq: per_seq.mean(), sync=first_sync)
    second = False
    if two_pass and parallel.perturb(optimizer):
        second_loss = optimizer.second_pass_loss
        _accumulate(model, parallel, batches, bf16, lambda i, per_seq: second_loss(per_seq, first[i]))
        parallel.restore(optimizer)
        second = True
    elif not first_sync:  # a step without a second pass (LookSAM between its SAM steps): sync pass 1 now
        parallel.average_gradients(params)
    grad_norm = parallel.step(optimizer, params, grad_clip if grad_clip > 0 else float("inf"))
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
