r"""GSAM: Surrogate Gap Guided Sharpness-Aware Minimization.

Source: J. Zhuang, B. Gong, L. Yuan, Y. Cui, H. Adam, N. Dvornek, S. Tatikonda, J. Duncan, T. Liu, "Surrogate Gap
Minimization Improves Sharpness-Aware Training", ICLR 2022 (arXiv:2203.08065); reference code juntang-zhuang/GSAM.

SAM minimises the perturbed loss f_p(w) = f(w + eps). GSAM also minimises the surrogate gap h = f_p - f, but only
along the direction orthogonal to grad f_p, so that f_p is not disturbed:

    eps      = rho_t g / (||g|| + 1e-12)                         as SAM, g = grad f(w)
    g'       = grad f(w + eps)                                   = grad f_p(w)
    g_perp   = g - (<g, g'> / (||g'||^2 + 1e-12)) g'             part of g orthogonal to g'
    g_final  = g' - alpha g_perp                                 descend f_p, ascend f along g_perp (shrinks h)

alpha = 0 is SAM. The reference code writes the projection with the cosine, (cos ||g|| / ||g'||) g', which is the
same up to where the 1e-12 sits. Default alpha = 0.2 (the reference's example script).

rho schedule (optional). The paper anneals rho with the learning rate:
    rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)
i.e. ``rho`` is the paper's rho_max. Here lr_t is the first param group's current lr, lr_max its ``initial_lr``
(set by any torch LR scheduler) or else its lr when GSAM was built, and the fraction is clamped to [0, 1].
``rho_min=None`` (default) keeps rho constant, as the reference code does when rho_max == rho_min.

Reductions: perturb: one (||g||^2); restore: one call for the vector (<g, g'>, ||g'||^2).
State: nothing persistent; between perturb and restore a scratch copy of w and the pass-1 gradient tensors.
Cost: SAM's 8 streams + <g, g'> 2 + ||g'|| 1 + g' *= (1 + alpha coef) 2 + g' -= alpha g 3 = 16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from flatlm.optim.sam import EPS, SAM, BaseFactory, _add_, _dot, _mul_, _sumsq, check, check_nonnegative


class GSAM(SAM):
    """SAM with g_final = g' - alpha * (part of g orthogonal to g'), and an optional lr-proportional rho.

    Args: as ``SAM``, plus ``alpha`` >= 0 (0.2), ``rho_min`` in [0, rho] or None (constant rho), ``lr_min`` >= 0.
    """

    writes_final_grad = True  # g' - alpha g_perp, in g' 's storage
    final_grad_uses_first_pass = True  # g_perp is built from this rank's g

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseFactory | None = None,
        rho: float = 0.05,
        alpha: float = 0.2,
        rho_min: float | None = None,
        lr_min: float = 0.0,
        foreach: bool | None = None,
        *,
        sum_across_ranks: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        check_nonnegative("alpha", alpha)
        check_nonnegative("lr_min", lr_min)
        if rho_min is not None:
            check_nonnegative("rho_min", rho_min)
            check(rho_min <= rho, f"rho_min must be <= rho ({rho}), got {rho_min}")
        self.alpha = float(alpha)
        self.rho_min = None if rho_min is None else float(rho_min)
        self.lr_min = float(lr_min)
        super().__init__(params, base_optimizer, rho=rho, foreach=foreach, sum_across_ranks=sum_across_ranks)
        self._lr_max = float(self.param_groups[0]["lr"]) if "lr" in self.param_groups[0] else None

    def _hyperparameters(self) -> dict[str, Any]:
        return {**super()._hyperparameters(), "alpha": self.alpha, "rho_min": self.rho_min, "lr_min": self.lr_min}

    def current_rho(self) -> float:
        """rho_t: rho, or interpolated between rho_min and rho as the first group's lr moves from lr_min to lr_max."""
        if self.rho_min is None:
            return self.rho
        group = self.param_groups[0]
        lr_max = float(group.get("initial_lr", self._lr_max if self._lr_max is not None else 0.0))
        if "lr" not in group or lr_max <= self.lr_min:
            return self.rho
        frac = (float(group["lr"]) - self.lr_min) / (lr_max - self.lr_min)
        return self.rho_min + (self.rho - self.rho_min) * min(1.0, max(0.0, frac))

    def _perturb(self, index: int, params: list[Tensor], grads: list[Tensor]) -> bool:
        self._g = self._keep(grads)  # g is needed again in restore
        norm = self._grad_norm(grads)
        self._save_and_move(params, grads, self.current_rho() / (norm + EPS), grads_kept=True)
        return True

    def _final_grad(self, params: list[Tensor], grads: list[Tensor]) -> None:
        g, self._g = self._g, []
        dot, sq = self._global(_dot(g, grads), _sumsq(grads, self.foreach))
        coef = dot / (sq + EPS)  # g_perp = g - coef g'
        # g_final = g' - alpha (g - coef g') = (1 + alpha coef) g' - alpha g
        _mul_(grads, 1.0 + self.alpha * coef, self.foreach)
        _add_(grads, g, -self.alpha, self.foreach)
