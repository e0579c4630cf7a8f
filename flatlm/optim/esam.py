r"""ESAM: Efficient Sharpness-aware Minimization (stochastic weight perturbation + sharpness-sensitive data selection).

Source: J. Du, H. Yan, J. Feng, J. T. Zhou, L. Zhen, R. S. M. Goh, V. Y. F. Tan, "Efficient Sharpness-aware
Minimization for Improved Training of Neural Networks", ICLR 2022 (arXiv:2110.03141); reference code
dydjw9/Efficient_SAM (``utils/Esam.py``).

Stochastic Weight Perturbation (SWP). Only a random subset of the weights is perturbed, rescaled by 1/beta so that
the perturbation equals SAM's in expectation:

    m_i   ~ Bernoulli(beta), one draw per parameter tensor, independent, fresh every step
    eps_i = m_i (rho / beta) g_i / (||g|| + 1e-12)        ||g||: the global norm of the whole gradient

    E[eps] = rho g / ||g|| (SAM's eps). Unperturbed tensors are not touched (nor copied), and restore copies back
    only the perturbed ones.

    Granularity: whole tensors, as in the reference code (it draws one ``random.random() > beta`` per parameter and
    switches that parameter's gradient off); the paper's notation writes an elementwise mask. Per-tensor masks
    let a future loop skip those tensors' weight gradients in pass 1, the paper's saving. The reference code
    divides by the norm of the selected tensors' gradient only (the others were never computed); flatlm has the
    whole g and uses its norm, which makes eps unbiased for SAM's.

    RNG: the mask of step t is a pure function of (``esam_seed``, t): numpy's SeedSequence of the pair, so every
    rank draws the same mask (each rank sees the same parameter list) and resume is exact. Both numbers are in
    the param groups (``esam_seed``, ``sam_step``) and so in the checkpoint; there is no generator state to save.

Sharpness-sensitive Data Selection (SDS). Pass 2 backpropagates only the fraction gamma of samples whose loss
rose most under the perturbation:

    B+ = the ceil(gamma |B|) samples with the largest  l_i(w + eps) - l_i(w)
    g' = grad of mean_{i in B+} l_i(w + eps)

``second_pass_loss(per_sample_loss, first_pass_per_sample_loss)`` does this per micro-batch. What the train step
passes as "per-sample losses" are already-scaled per-sequence contributions ``c_b = W B / N * sum_b`` (W ranks, B
sequences in the micro-batch, N targets counted in the global batch, sum_b the sequence's summed token loss; see
``flatlm.train.step``), so the mean over B+ is B+'s share of the loss and no further division is needed. The
selection therefore ranks sequences by the increase of their *summed* token loss. In pretraining every sequence
counts the same number of targets, so that is the ranking by per-sequence mean loss (the paper's). With loss masks
(SFT: uneven target counts per sequence) it is not: a long answer outranks a short one with a larger mean
increase. To do with the SFT issue: pass the per-sequence target counts and rank by increase / count (the
backward keeps ``c_b``). The reference keeps the samples strictly above the k-th largest increase
(k - 1 of them); flatlm keeps exactly k. Note the cost: the paper saves compute by a no-grad forward on all
samples and a forward/backward on B+ only; in flatlm's loop pass 2 runs forward with grad on every sample and
the backward starts from B+'s loss, so the gradient is the paper's but the saving is not realised there.

Defaults beta = 0.6, gamma = 0.5 (the reference's run.sh for CIFAR); beta = gamma = 1 is exactly SAM.
Reductions: perturb: one (||g||^2); restore: none. State: none persistent; scratch copies of perturbed w.
Cost: ||g|| 1 stream + beta x SAM's other 7 (beta = 0.6: 5.2 against AdamW's 7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from torch import Tensor

from flatlm.optim.sam import EPS, SAM, BaseFactory, check, is_number


def swp_mask(seed: int, step: int, n: int, beta: float) -> list[bool]:
    """The SWP mask of step ``step``: n independent Bernoulli(beta) draws, a pure function of (seed, step)."""
    return (np.random.default_rng((seed, step)).random(n) < beta).tolist()


class ESAM(SAM):
    """SAM on a random beta-fraction of tensors (scaled 1/beta) and the top-gamma samples by loss increase.

    Args: as ``SAM``, plus ``beta`` in (0, 1] (0.6), ``gamma`` in (0, 1] (0.5), ``seed`` >= 0 (0).
    """

    selects_tensors = True  # a random subset of tensors: of parameters only where each view is a whole one

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseFactory | None = None,
        rho: float = 0.05,
        beta: float = 0.6,
        gamma: float = 0.5,
        seed: int = 0,
        foreach: bool | None = None,
        *,
        sum_across_ranks: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        for name, value in (("beta", beta), ("gamma", gamma)):
            check(is_number(value) and 0 < value <= 1, f"{name} must be in (0, 1], got {value}")
        is_int = isinstance(seed, int) and not isinstance(seed, bool)
        check(is_int and seed >= 0, f"seed must be an integer >= 0, got {seed}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        super().__init__(params, base_optimizer, rho=rho, foreach=foreach, sum_across_ranks=sum_across_ranks)
        for g in self.param_groups:
            g["esam_seed"] = seed
        self._moved: list[Tensor] = []

    def _hyperparameters(self) -> dict[str, Any]:
        return {**super()._hyperparameters(), "beta": self.beta, "gamma": self.gamma}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self.__dict__.get("_initializing", False):
            param_group.setdefault("esam_seed", self.param_groups[0]["esam_seed"])
        super().add_param_group(param_group)

    def _perturb(self, index: int, params: list[Tensor], grads: list[Tensor]) -> bool:
        if not self._whole:
            raise RuntimeError(
                "ESAM selects whole parameters, but these views hold pieces of parameters (a sharded layout); "
                "flatlm.parallel.compat refuses this pair before training"
            )
        norm = self._grad_norm(grads)  # the whole gradient's norm
        mask = swp_mask(int(self.param_groups[0]["esam_seed"]), index, len(params), self.beta)
        self._moved = [p for p, m in zip(params, mask, strict=True) if m]
        moved_grads = [g for g, m in zip(grads, mask, strict=True) if m]
        self._save_and_move(self._moved, moved_grads, (self.rho / self.beta) / (norm + EPS))
        return True

    def _restore_weights(self, params: list[Tensor]) -> None:
        self._put_back(self._moved)
        self._moved = []

    def second_pass_loss(self, per_sample_loss: Tensor, first_pass_per_sample_loss: Tensor) -> Tensor:
        """Mean loss at w + eps over the ceil(gamma n) samples whose loss increased most since pass 1."""
        if per_sample_loss.shape != first_pass_per_sample_loss.shape:
            raise ValueError(
                f"per-sample losses of the two passes differ in shape: {tuple(per_sample_loss.shape)} vs "
                f"{tuple(first_pass_per_sample_loss.shape)}"
            )
        losses = per_sample_loss.reshape(-1)
        if self.gamma >= 1.0:
            return losses.mean()
        k = max(1, math.ceil(self.gamma * losses.numel()))
        increase = losses.detach() - first_pass_per_sample_loss.detach().reshape(-1)
        return losses[increase.topk(k).indices].mean()
