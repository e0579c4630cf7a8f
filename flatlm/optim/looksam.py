r"""LookSAM: SAM's second pass only every k steps, its direction reused in between.

Source: Y. Liu, S. Mai, X. Chen, C.-J. Hsieh, Y. You, "Towards Efficient and Scalable Sharpness-Aware
Minimization", CVPR 2022 (arXiv:2203.02714), Algorithm 1 (LookSAM; the layer-wise Look-LayerSAM is not here).

The SAM gradient g_s = grad L(w + eps) splits into a part parallel to the plain gradient g and a part g_v
orthogonal to it; g_v is what pushes towards flat regions, and it changes slowly, so it is reused:

    step t with t mod k == 0 (t = 0, k, 2k, ...; two passes):
        eps     = rho g / (||g|| + 1e-12)
        g_s     = grad L(w + eps)
        g_v     = g_s - (<g, g_s> / (||g||^2 + 1e-12)) g       stored (the paper: g_s - ||g_s|| cos(theta) g/||g||)
        g_final = g_s
    other steps (one pass; ``perturb`` returns False):
        g_final = g + alpha (||g|| / (||g_v|| + 1e-12)) g_v

t counts ``perturb`` calls from 0 (``sam_step`` in the param groups), so the first step is a full SAM step. The
paper's defaults: k = 5, alpha = 0.7. Norms and the dot product are global over every parameter.

Reductions: full step: perturb one (||g||^2), restore one (<g, g_s>); other steps: one call for the vector
(||g||^2, ||g_v||^2). State per view (``ParamView.key``): ``sam_g_v`` (as the parameter; created zero by the first
``step`` so that a fresh optimizer's state_dict has it); on full steps, between perturb and restore, a scratch copy of
w and the pass-1 gradient tensors (which then become the new g_v: no extra copy).
Cost: full step SAM's 8 streams + <g, g_s> 2 + g_v built in place 5 = 15; reuse step ||g|| 1 + ||g_v|| 1 +
g += s g_v 3 = 5; a cycle of k = 5 steps averages 7 per step, AdamW's 7.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from flatlm.optim.sam import EPS, SAM, BaseFactory, _add_, _add_scaled_, _dot, _mul_, _sumsq, check, check_nonnegative

G_V = "sam_g_v"


class LookSAM(SAM):
    """SAM every ``k`` steps; in between g_final = g + alpha ||g|| / ||g_v|| g_v (Liu et al. 2022).

    Args: as ``SAM``, plus ``k`` >= 1 (5) and ``alpha`` >= 0 (0.7).
    """

    writes_final_grad = True  # reuse steps rewrite pass 1's gradient
    final_grad_uses_first_pass = True  # g_v is built from this rank's g
    keeps_state = True  # sam_g_v
    may_skip_second_pass = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseFactory | None = None,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        foreach: bool | None = None,
        *,
        sum_across_ranks: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        check(isinstance(k, int) and not isinstance(k, bool) and k >= 1, f"k must be an integer >= 1, got {k}")
        check_nonnegative("alpha", alpha)
        self.k = k
        self.alpha = float(alpha)
        super().__init__(params, base_optimizer, rho=rho, foreach=foreach, sum_across_ranks=sum_across_ranks)

    def _hyperparameters(self) -> dict[str, Any]:
        return {**super()._hyperparameters(), "k": self.k, "alpha": self.alpha}

    def _init_state(self) -> None:
        """g_v = 0 for every trainable tensor of this optimizer's own views, once (a backend's views get theirs on
        the first step, which is a full one)."""
        if self.sam_state:
            return
        for v in self.param_views():
            if v.tensor.requires_grad:
                self.sam_state[v.key][G_V] = torch.zeros_like(v.tensor, memory_format=torch.preserve_format)

    def _perturb(self, index: int, params: list[Tensor], grads: list[Tensor]) -> bool:
        fe = self.foreach
        if index % self.k == 0:  # full SAM step: keep g for the decomposition in restore
            self._g = self._keep(grads)
            self._first_sq = self._global(_sumsq(grads, fe))[0]
            self._save_and_move(params, grads, self.rho / (self._first_sq.sqrt() + EPS), grads_kept=True)
            return True
        # reuse step: params that have no g_v yet (never had a grad on a full step) get g unchanged
        with_v = [i for i, p in enumerate(params) if G_V in self.sam_state.get(self._key(p), {})]
        gv = [self.sam_state[self._key(params[i])][G_V] for i in with_v]
        gp = [grads[i] for i in with_v]
        sq_g, sq_v = self._global(_sumsq(grads, fe), _sumsq(gv, fe))
        _add_scaled_(gp, gv, self.alpha * sq_g.sqrt() / (sq_v.sqrt() + EPS), fe, src_is_scratch=False)
        return False

    def _final_grad(self, params: list[Tensor], grads: list[Tensor]) -> None:
        g, self._g = self._g, []
        coef = self._global(_dot(g, grads))[0] / (self._first_sq + EPS)
        _mul_(g, -coef, self.foreach)  # g_v = g_s - coef g, built in the pass-1 gradient's storage
        _add_(g, grads, 1.0, self.foreach)
        for p, v in zip(params, g, strict=True):  # the new g_v replaces the old one; g_final stays g_s
            self.sam_state[self._key(p)][G_V] = v
