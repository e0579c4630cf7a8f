"""One optimizer step, as data: a step plan of forward/backward passes over the micro-batches, then clip and step.

The loss. Each micro-batch (``flatlm.data.Batch``) gives, per sequence, the sum of the cross entropies of its
counted targets and their count (``token_losses``). The step minimises

    L = (sum of every counted target's loss in the step, all micro-batches of all ranks) / N,

N the global count of counted targets, all-reduced once at the start of the step from the loss masks (before any
backward: a scalar, no host sync). Every backend averages gradients over its W ranks (DDP, FSDP2, ZeRO), so each
micro-batch backwards ``W / N * (its sum)``: the average over ranks of the accumulated gradients is grad L, whatever
the counts per rank (fine-tuning masks make them uneven). With every target counted (pretraining) L is the mean
token loss of the global batch, as before the masks existed (to rounding).

Per-sample values. A pass sees its micro-batch as per-sequence *contributions* ``c_b = W B / N * sum_b`` (B
sequences), so that ``mean_b c_b`` is the micro-batch's share of L. A pass's loss maps (c, pass 1's c) to the
scalar to backward: ``mean`` for plain passes and SAM; ESAM's ``second_pass_loss`` keeps the samples whose
contribution rose most (with every target counted, c_b is the sequence's mean loss / accumulation steps, so its
selection is the one of per-sequence means).

The plan (``StepPlan``): passes, each with the point it evaluates (``w``, or ``w+eps``: the backend's ``perturb``
before it, ``restore`` after), whether its gradients are synchronised over ranks (on the last micro-batch only,
``parallel.no_sync`` around the others; or never: ``parallel.local_pass``), and its loss. ``plan_for`` writes the
two plans flatlm runs:

    plain        w (sync, mean)
    SAM family   w (sync, or local under sam.perturbation=replica, mean)  ->  w+eps (sync, second_pass_loss)
    adversarial  w at x+delta (sync, mean)                         train.adversarial.objective=perturbed
                 w at x (deferred, mean / 2)  ->  w at x+delta (sync, mean / 2)                     =mean

Adversarial training (``train.adversarial``, flatlm.train.adversarial): before the passes, K ascent steps per
micro-batch find delta (gradients w.r.t. delta only: no parameter gradient, nothing synchronised); a pass at
``x+delta`` runs with delta added to the input embeddings by a forward hook, installed for the step only (never
under plain training). A ``deferred`` pass keeps every micro-batch under ``parallel.no_sync``: the next pass's
synchronisation reduces its gradients with its own (one reduction per step). With objective=perturbed the logged
loss is L(x+delta), the loss trained on.

``perturb`` may decline a ``w+eps`` pass (LookSAM between its SAM steps): it is skipped, and gradients still local
then are averaged (``parallel.average_gradients``). After the passes, ``parallel.step`` clips by the global norm and
steps. The logged loss is always pass 1's, at the weights being trained.

SAM's perturbation (``sam.perturbation``):

    global   pass 1 synchronises: eps comes from the global-batch gradient, its norm over every shard (one scalar
             all-reduce under sharded gradients), and equals single-process SAM.
    replica  pass 1 never synchronises: each rank perturbs by the gradient of its own share of the batch
             (m-sharpness, google-research/sam's default); pass 2 synchronises as usual, so the base step uses the
             mean over ranks of grad L_r(w + eps_r). ``parallel.local_pass`` says how a backend keeps pass 1 local.

Host syncs. Nothing here reads a tensor on the host: the count, the loss sum and the gradient norm come back as
tensors (``StepStats``); the loop reads them once per step (flatlm.train.loop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from flatlm.data.batch import Batch, as_batch
from flatlm.parallel.backend import Parallel
from flatlm.parallel.collectives import all_reduce_sum, world

if TYPE_CHECKING:
    from flatlm.config import AdversarialConfig
    from flatlm.train.adversarial import Adversary, EmbeddingPerturbation

IGNORE = -100  # cross_entropy's ignore_index: targets outside the loss mask


@dataclass
class TokenLosses:
    """A micro-batch's loss as sums and counts (fp32), per sequence."""

    sums: torch.Tensor
    """Sum of the counted targets' cross entropies of each sequence, [B] (differentiable)."""
    counts: torch.Tensor
    """Counted targets of each sequence, [B] int64."""


def packed_attention_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The causal attention of packed examples, confined to each example, as an additive mask: [B, 1, L, L] fp32,
    0 where query i may attend key j (j <= i, both in the same example), the most negative float elsewhere. An
    example starts where its position restarts at 0.

    Additive, not bool: transformers' eager attention adds the mask to the scores (a bool mask would add 1 and 0 and
    leak), SDPA takes either. Its cost is the mask itself (4 B L^2 bytes: 0.5 MiB for 16 x 128^2) and SDPA's masked
    kernel in place of its causal fast path (benchmarks/packed_attention.py)."""
    example = (position_ids == 0).cumsum(dim=1)  # [B, L]: which example each token belongs to
    same = example[:, :, None] == example[:, None, :]  # [B, L, L]
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (same & causal)[:, None]  # [B, 1, L, L]
    return torch.zeros(allowed.shape, device=position_ids.device).masked_fill_(~allowed, torch.finfo(torch.float32).min)


def token_losses(model: torch.nn.Module, batch: Batch, bf16: bool) -> TokenLosses:
    """Next-token cross entropy of ``batch``'s counted targets, summed per sequence (nats, fp32). A batch with
    position ids (packed examples) attends within each example only (``packed_attention_mask``)."""
    autocast = torch.autocast(batch.inputs.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    extra = {}
    if batch.position_ids is not None:
        extra = {"position_ids": batch.position_ids, "attention_mask": packed_attention_mask(batch.position_ids)}
    with autocast:
        logits = model(input_ids=batch.inputs, **extra).logits  # [B, L, V]
    targets = batch.targets if batch.loss_mask is None else batch.targets.masked_fill(~batch.loss_mask, IGNORE)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none", ignore_index=IGNORE)
    return TokenLosses(sums=loss.view(targets.shape).sum(dim=1), counts=batch.counted())  # [B], [B]


def per_sequence_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Mean next-token cross entropy of each sequence, [B] (nats/token, fp32), every target counted."""
    losses = token_losses(model, Batch(inputs, targets), bf16)
    return losses.sums / losses.counts


# -- the step plan -------------------------------------------------------------------------------------------------

PassLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(per-sample contributions of this micro-batch [B], pass 1's [B], detached) -> the scalar to backward."""


def mean_loss(per_sample: torch.Tensor, first_pass_per_sample: torch.Tensor) -> torch.Tensor:
    """The micro-batch's share of the step's loss (sum of counted token losses * W / N)."""
    del first_pass_per_sample
    return per_sample.mean()


@dataclass(frozen=True)
class Pass:
    """One forward/backward over all of the step's micro-batches."""

    point: Literal["w", "w+eps"]
    """Where gradients are taken: at the weights being trained, or perturbed (``perturb`` before, ``restore``
    after; a ``perturb`` returning False skips the pass)."""
    sync: bool
    """Gradients synchronised over ranks at the end of the pass; False: they stay on each rank (``local_pass``)."""
    loss: PassLoss = mean_loss
    """The scalar each micro-batch backwards."""
    inputs: Literal["x", "x+delta"] = "x"
    """The inputs: the batch's token embeddings, or those plus the step's adversarial delta (train.adversarial)."""
    weight: float = 1.0
    """The pass's share of the objective: each micro-batch backwards ``weight * loss`` (objective=mean: 1/2)."""
    deferred: bool = False
    """Every micro-batch under ``parallel.no_sync``: the next pass, which must synchronise, reduces these gradients
    with its own."""


@dataclass(frozen=True)
class StepPlan:
    passes: tuple[Pass, ...]

    def __post_init__(self) -> None:
        if not self.passes or self.passes[0].point != "w":
            raise ValueError("a step plan starts with a pass at w (its loss is the one logged and the reference)")
        for i, spec in enumerate(self.passes):
            if spec.deferred and not (spec.sync and i + 1 < len(self.passes) and self.passes[i + 1].sync):
                raise ValueError("a deferred pass is synchronised by the next one: it needs a synchronised pass after")


def is_two_pass(optimizer: torch.optim.Optimizer) -> bool:
    """A SAM-family optimizer: it moves the weights between passes (``perturb``/``restore``)."""
    return hasattr(optimizer, "perturb") and hasattr(optimizer, "restore")


def plan_for(
    optimizer: torch.optim.Optimizer,
    *,
    replica_perturbation: bool = False,
    adversarial: AdversarialConfig | None = None,
) -> StepPlan:
    """The passes ``optimizer`` needs: one at w, SAM's two, or adversarial training's (see the module docstring)."""
    if adversarial is not None and adversarial.enabled:
        if is_two_pass(optimizer):
            raise ValueError("adversarial training with a SAM-family optimizer is not supported")
        if adversarial.objective == "mean":
            return StepPlan(
                (Pass("w", sync=True, weight=0.5, deferred=True), Pass("w", True, inputs="x+delta", weight=0.5))
            )
        return StepPlan((Pass("w", sync=True, inputs="x+delta"),))
    if not is_two_pass(optimizer):
        return StepPlan((Pass("w", sync=True),))
    second_pass_loss: PassLoss = optimizer.second_pass_loss  # type: ignore[assignment]
    return StepPlan((Pass("w", sync=not replica_perturbation), Pass("w+eps", sync=True, loss=second_pass_loss)))


# -- executing it --------------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    """What one step measured, as tensors (read on the host by whoever logs them)."""

    loss_sum: torch.Tensor
    """Sum of pass 1's counted token losses over this rank's micro-batches (0-d fp32, detached)."""
    counted: torch.Tensor
    """Counted targets of the whole step, all ranks (0-d int64): the global loss is sum over ranks / counted."""
    grad_norm: torch.Tensor
    """Global L2 norm of the gradient the optimizer stepped with, before clipping (0-d)."""
    second_pass: bool = False
    """Whether a pass at w + eps ran (SAM family)."""
    adv_time_s: float = 0.0
    """Wall time of the adversarial ascent passes (train.adversarial; 0 without)."""
    adv_passes: int = 0
    """Forward/backward passes beyond plain training's one: K ascent steps (+1 for objective=mean's clean pass)."""


def global_count(batches: Sequence[Batch]) -> torch.Tensor:
    """Counted targets of the step over every rank (0-d int64): one scalar all-reduce, no host sync."""
    local_count = torch.stack([b.counted().sum() for b in batches]).sum()
    return all_reduce_sum(local_count)


def _run_pass(
    model: torch.nn.Module,
    parallel: Parallel,
    batches: Sequence[Batch],
    bf16: bool,
    spec: Pass,
    token_scale: torch.Tensor,
    first: list[torch.Tensor] | None,
    hook: EmbeddingPerturbation | None = None,
    deltas: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Forward + backward of every micro-batch; returns the per-sample contributions (detached) and the sum of the
    token losses (detached, 0-d). A pass at ``x+delta`` adds ``deltas[i]`` to micro-batch i's embeddings (``hook``)."""
    contributions, total = [], torch.zeros((), device=batches[0].inputs.device)
    for i, batch in enumerate(batches):
        if hook is not None:
            hook.current = deltas[i] if spec.inputs == "x+delta" and deltas is not None else None
        if not spec.sync:
            context, module = parallel.local_pass(), parallel.local_module(model)
        elif spec.deferred or i < len(batches) - 1:
            context, module = parallel.no_sync(), model
        else:
            context, module = contextlib.nullcontext(), model
        with context:
            sums = token_losses(module, batch, bf16).sums  # [B]
            per_sample = sums * (token_scale * batch.size)  # [B]: mean over samples = this micro-batch's share of L
            reference = first[i] if first is not None else per_sample.detach()
            loss = spec.loss(per_sample, reference)
            parallel.backward(loss if spec.weight == 1.0 else spec.weight * loss)
        contributions.append(per_sample.detach())
        total = total + sums.detach().sum()
    return contributions, total


def train_step(
    parallel: Parallel,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch | tuple[torch.Tensor, torch.Tensor]],
    params: list[torch.nn.Parameter],
    *,
    grad_clip: float,
    bf16: bool = False,
    model: torch.nn.Module | None = None,
    replica_perturbation: bool = False,
    plan: StepPlan | None = None,
    adversary: Adversary | None = None,
    step: int = 0,
) -> StepStats:
    """One optimizer step over ``batches`` (this process's micro-batches) by ``plan`` (default: ``plan_for``);
    ``model`` defaults to ``parallel.forward_module`` (pass a compiled one to run that instead). ``adversary``
    (train.adversarial, on): its ascent first, then the plan's passes; ``step`` seeds its init noise."""
    model = model if model is not None else parallel.forward_module
    micro = [as_batch(b) for b in batches]
    if adversary is not None and adversary.config.enabled:
        return _adversarial_step(parallel, optimizer, micro, params, adversary, step, grad_clip, bf16, model, plan)
    plan = plan if plan is not None else plan_for(optimizer, replica_perturbation=replica_perturbation)
    counted = global_count(micro)
    # Backends average gradients over ranks: W / N per token makes that average grad(global sum / N).
    token_scale = (world()[1] / counted.clamp(min=1).double()).float()  # a step counting nothing has zero gradient
    first: list[torch.Tensor] | None = None
    loss_sum = torch.zeros(())
    synced, perturbed = True, False
    for spec in plan.passes:
        if spec.point == "w+eps":
            if not parallel.perturb(optimizer):
                continue  # the variant needs no pass here (LookSAM between its SAM steps)
            perturbed = True
        contributions, total = _run_pass(model, parallel, micro, bf16, spec, token_scale, first)
        if spec.point == "w+eps":
            parallel.restore(optimizer)
        if first is None:
            first, loss_sum = contributions, total
        synced = spec.sync
    if not synced:  # the last pass that ran kept its gradients local: average them now
        parallel.average_gradients(params)
    grad_norm = parallel.step(optimizer, params, grad_clip if grad_clip > 0 else float("inf"))
    return StepStats(loss_sum=loss_sum, counted=counted, grad_norm=torch.as_tensor(grad_norm), second_pass=perturbed)


def _adversarial_step(
    parallel: Parallel,
    optimizer: torch.optim.Optimizer,
    micro: list[Batch],
    params: list[torch.nn.Parameter],
    adversary: Adversary,
    step: int,
    grad_clip: float,
    bf16: bool,
    model: torch.nn.Module,
    plan: StepPlan | None,
) -> StepStats:
    """``train_step`` under train.adversarial: the ascent through ``parallel.model`` (no wrapper, no engine: no
    parameter gradient, nothing reduced), then the plan's passes with delta in the embeddings, clip and step."""
    from flatlm.train.adversarial import embedding_dim

    plan = plan if plan is not None else plan_for(optimizer, adversarial=adversary.config)
    counted = global_count(micro)
    token_scale = (world()[1] / counted.clamp(min=1).double()).float()
    loss_sum = torch.zeros(())
    with adversary.applied(parallel.model) as hook:
        dim = embedding_dim(parallel.model)
        deltas, seconds = adversary.ascend_all(parallel.model, hook, micro, bf16, step, world()[0], dim)
        for spec in plan.passes:
            if spec.point != "w":
                raise ValueError("adversarial training runs passes at w only")
            _, total = _run_pass(model, parallel, micro, bf16, spec, token_scale, None, hook, deltas)
            if spec is plan.passes[0]:
                loss_sum = total
    grad_norm = parallel.step(optimizer, params, grad_clip if grad_clip > 0 else float("inf"))
    return StepStats(
        loss_sum=loss_sum,
        counted=counted,
        grad_norm=torch.as_tensor(grad_norm),
        adv_time_s=seconds,
        adv_passes=adversary.extra_passes,
    )


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Sequence[Batch], bf16: bool = False) -> float:
    """Mean loss per counted target over ``batches`` in eval mode (one host read)."""
    was_training = model.training
    model.eval()
    sums, counts = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
    for batch in batches:
        losses = token_losses(model, as_batch(batch), bf16)
        sums, counts = sums + losses.sums.double().sum(), counts + losses.counts.sum()
    model.train(was_training)
    return (sums / counts.clamp(min=1)).item()
