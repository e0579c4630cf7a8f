r"""Adversarial training on the input embeddings (``train.adversarial``): the input-space baseline set against SAM's
weight-space perturbation.

The objective. With e = E(x) the token embeddings of a micro-batch ([B, L, d], the output of
``model.get_input_embeddings()``), the step minimises over the weights w

    perturbed   L(w; e + delta*)                        (Madry et al. 2018, "Towards deep learning models resistant
                                                         to adversarial attacks", ICLR)
    mean        (L(w; e) + L(w; e + delta*)) / 2         (Goodfellow et al. 2015's mixed objective; Miyato et al.
                                                         2017 perturb text embeddings the same way)

where delta* approximately maximises L(w; e + delta) over the ball ``||delta[b, t, :]|| <= epsilon`` at every
position (b, t), found by K steps of projected gradient ascent (PGD, Madry et al.; on embeddings as in Miyato et al.
2017, "Adversarial training methods for semi-supervised text classification", ICLR, and Zhu et al. 2020, "FreeLB:
enhanced adversarial training for natural language understanding", ICLR):

    delta_0     = 0                                   (init=zero)  or  uniform in the ball (init=uniform: a random
                                                      start, as FreeLB's and PGD's random restarts)
    g_k         = grad_delta L(w; e + delta_k)        (torch.autograd.grad w.r.t. delta only)
    delta_{k+1} = Proj( delta_k + alpha * u(g_k) )
        l2      u(g) = g / ||g||   per position (0 where g = 0),  Proj: delta * min(1, epsilon / ||delta||) per position
        linf    u(g) = sign(g),                                   Proj: clamp(delta, -epsilon, epsilon)

alpha = ``step_size`` (default 2 epsilon / K: K steps can cross the ball). The training pass then runs at
e + delta_K, delta_K detached (FreeLB also accumulates the parameter gradients of every ascent step; flatlm does not:
its ascent passes compute no parameter gradient at all).

What the ascent costs and touches. Each ascent step is one forward and one backward per micro-batch whose backward
computes input gradients only (autograd never evaluates a weight's gradient nobody asked for): no ``.grad`` is
written, so no backend's reduction fires (DDP's reducer hooks, FSDP2's reduce-scatter, DeepSpeed's
post-accumulate-grad hooks sit on the weights' gradient accumulation). The ascent forwards through the backend's
model (``Parallel.model``: the bare module under DDP and ZeRO-1/2; the ``fully_shard``-ed root under FSDP2 and the
hooked module under ZeRO-3, whose parameter gathering runs as in any forward and backward), never through the DDP
wrapper or the engine. Every rank runs the same K passes, so the gathers line up. Wall time of the ascent
(``adv_time_s``) and the extra passes (``adv_passes``: K, plus 1 for the mean objective's clean pass) are logged per
step; on CUDA the time is taken between two device synchronisations (the only host syncs this adds). Memory: the
step keeps each micro-batch's delta_K (accumulation x B x L x d fp32) from the ascent to the training pass.

Measured (tiny model, 2 CPU gloo ranks, 4 steps, K=2, tests/train/test_adversarial.py): ddp, fsdp2, zero1, zero2 and
zero3 equal one process on the same global batch within 1.4e-6 relative (fp32, both objectives); under bf16, ddp
within 1.3e-7 and fsdp2 / zero2 within their own bf16 recipes' noise (model 9.7e-3), as for plain training; an
ascent pass counts 2/3 of a training pass's matmul FLOPs (torch's FLOP counter); ``model.compile`` gives the eager
losses to 1e-6.

Determinism. init=zero is deterministic and the same on every world size (delta depends only on the micro-batch and
the weights). init=uniform draws delta_0 for micro-batch i of rank r at step s from a CPU ``torch.Generator`` seeded
with SeedSequence(seed, s, r, i): reproducible and resumable, but another world size draws differently.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flatlm.config import AdversarialConfig
from flatlm.data.batch import Batch
from flatlm.train.step import token_losses


def direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The ascent direction u(g) of a gradient [B, L, d]: g / ||g|| per position (l2; 0 where g = 0) or sign(g)."""
    if norm == "linf":
        return g.sign()
    length = g.norm(dim=-1, keepdim=True)  # [B, L, 1]
    return g / length.clamp(min=torch.finfo(g.dtype).tiny)


def delta_gradient(loss: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """d loss / d delta, and nothing else: ``torch.autograd.grad`` writes no ``.grad`` and fires no gradient hook of
    any parameter (so no backend reduces anything)."""
    (grad,) = torch.autograd.grad(loss, delta)
    return grad


def project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """delta [B, L, d] put back in the ball of radius ``epsilon`` at every position (l2 or linf)."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    length = delta.norm(dim=-1, keepdim=True)  # [B, L, 1]
    return delta * (epsilon / length.clamp(min=epsilon)).clamp(max=1.0)


def uniform_in_ball(shape: torch.Size, epsilon: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """A draw uniform in the ball at every position (CPU, fp32): linf, each coordinate in [-epsilon, epsilon]; l2, a
    uniform direction times epsilon * U^(1/d) (the radius law of the uniform d-ball)."""
    if norm == "linf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * epsilon
    gaussian = torch.randn(shape, generator=generator)
    radius = torch.rand((*shape[:-1], 1), generator=generator) ** (1.0 / shape[-1])
    return gaussian / gaussian.norm(dim=-1, keepdim=True).clamp(min=1e-30) * radius * epsilon


def init_generator(seed: int, step: int, rank: int, micro_batch: int) -> torch.Generator:
    """The generator of one micro-batch's delta_0: seeded from (seed, step, rank, micro-batch index), well mixed."""
    state = np.random.SeedSequence([seed, step, rank, micro_batch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class EmbeddingPerturbation:
    """A forward hook on the input embedding that adds ``current`` (when set) to its output."""

    def __init__(self, embedding: torch.nn.Module) -> None:
        self.current: torch.Tensor | None = None
        self._handle = embedding.register_forward_hook(self._add)

    def _add(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.current is None:
            return None
        if self.current.shape != output.shape:
            raise RuntimeError(f"delta {list(self.current.shape)} does not fit the embeddings {list(output.shape)}")
        return output + self.current.to(output.dtype)

    def remove(self) -> None:
        self._handle.remove()


@dataclass(frozen=True)
class Adversary:
    """``train.adversarial`` for the train step: the ascent, the hook and the init draws."""

    config: AdversarialConfig
    seed: int
    """The init noise's seed (``train.adversarial.seed``, else the run's)."""

    @property
    def extra_passes(self) -> int:
        """Forward/backward passes per step beyond plain training's one: K ascent steps, + 1 clean pass (mean)."""
        return self.config.steps + (1 if self.config.objective == "mean" else 0)

    def init_delta(self, shape: torch.Size, device: torch.device, step: int, rank: int, index: int) -> torch.Tensor:
        """delta_0 of micro-batch ``index`` (fp32)."""
        if self.config.init == "zero":
            return torch.zeros(shape, device=device)
        gen = init_generator(self.seed, step, rank, index)
        return uniform_in_ball(shape, self.config.epsilon, self.config.norm, gen).to(device)

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[EmbeddingPerturbation]:
        """The hook on ``model``'s input embedding for the duration of the step (removed after, on any exit)."""
        hook = EmbeddingPerturbation(model.get_input_embeddings())
        try:
            yield hook
        finally:
            hook.remove()

    def ascend(
        self,
        module: torch.nn.Module,
        hook: EmbeddingPerturbation,
        batch: Batch,
        bf16: bool,
        delta: torch.Tensor,
    ) -> torch.Tensor:
        """K projected-gradient steps from ``delta`` (see the module docstring); returns delta_K, detached. Computes
        no parameter gradient (``torch.autograd.grad`` w.r.t. delta only)."""
        cfg = self.config
        delta = delta.detach()
        for _ in range(cfg.steps):
            delta.requires_grad_(True)
            hook.current = delta
            loss = token_losses(module, batch, bf16).sums.sum()  # any positive scale: u(g) is scale-free
            grad = delta_gradient(loss, delta)
            with torch.no_grad():
                delta = project(delta + cfg.alpha * direction(grad, cfg.norm), cfg.epsilon, cfg.norm)
        hook.current = None
        return delta.detach()

    def ascend_all(
        self,
        module: torch.nn.Module,
        hook: EmbeddingPerturbation,
        batches: Sequence[Batch],
        bf16: bool,
        step: int,
        rank: int,
        embedding_dim: int,
    ) -> tuple[list[torch.Tensor], float]:
        """delta_K of every micro-batch of the step, and the ascent's wall time in seconds."""
        device = batches[0].inputs.device
        _synchronize(device)
        start = time.perf_counter()
        deltas = []
        for i, batch in enumerate(batches):
            shape = torch.Size((*batch.inputs.shape, embedding_dim))  # [B, L, d]
            deltas.append(self.ascend(module, hook, batch, bf16, self.init_delta(shape, device, step, rank, i)))
        _synchronize(device)
        return deltas, time.perf_counter() - start


def embedding_dim(model: torch.nn.Module) -> int:
    """d of the input embedding (``embedding_dim``: the full width also when the weight is sharded or partitioned)."""
    embedding = model.get_input_embeddings()
    dim = getattr(embedding, "embedding_dim", None)
    if dim is None:
        raise TypeError(f"{type(embedding).__name__} has no embedding_dim: cannot size the adversarial perturbation")
    return int(dim)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
