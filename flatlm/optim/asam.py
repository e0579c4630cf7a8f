r"""ASAM: Adaptive Sharpness-Aware Minimization.

Source: J. Kwon, J. Kim, H. Park, I. K. Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
Learning of Deep Neural Networks", ICML 2021 (arXiv:2102.11600); reference code SamsungLabs/ASAM.

SAM's ball ||eps|| <= rho is replaced by the scale-invariant ||T_w^{-1} eps|| <= rho with the elementwise
normalisation operator T_w = |w| + eta (a diagonal matrix). The first-order maximiser is

    T   = |w| + eta                                     elementwise, per parameter
    eps = rho T^2 g / (||T g|| + 1e-12)                 ||.|| the global L2 norm over every parameter

and the rest is SAM: g' = grad L(w + eps), restore w, base step with g'. ``eta`` (default 0.01, the paper's and
the reference's) keeps parameters near zero perturbable. The reference code's rho is 0.5 on CIFAR (the adaptive
ball is measured relative to |w|, so rho is far larger than SAM's 0.05); that is the default here.

Difference from the reference code: SamsungLabs/ASAM applies T only to parameters whose name contains "weight"
(biases get T = 1, inside the same norm). The wrapper sees tensors, not names, so T applies to every parameter;
flatlm's Llama models have no biases, so the two agree there.

Reductions: perturb: one (||T g||^2); restore: none. State: none beyond SAM's scratch copy of w, whose
parameter storage holds T while g is scaled (then w + eps is written from the copy), so no extra memory.
Transient views (copies the backend drops after the step, FSDP2's unsharded weights under replica perturbation)
keep nothing: T is a temporary of this call, freed when ``perturb`` returns, and w is never copied back (a kept
copy keyed by the view would hold a whole unsharded weight copy on every rank between steps).
Cost: 20 parameter-sized streams (copy w 2, |w| + eta 4, T g 3, norm 1, T^2 g 3, w back 2, w += s g 3,
restore 2) against SAM's 8 and AdamW's 7.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from flatlm.optim.sam import EPS, SAM, BaseFactory, _abs_add_, _add_scaled_, _copy_, _mul_list_, check_nonnegative


class ASAM(SAM):
    """SAM with the adaptive ball: eps = rho (|w| + eta)^2 g / ||(|w| + eta) g||.

    Args: as ``SAM``, plus ``eta`` >= 0 (0.01); ``rho`` defaults to 0.5 (reference code).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseFactory | None = None,
        rho: float = 0.5,
        eta: float = 0.01,
        foreach: bool | None = None,
        *,
        sum_across_ranks: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        check_nonnegative("eta", eta)
        self.eta = float(eta)
        super().__init__(params, base_optimizer, rho=rho, foreach=foreach, sum_across_ranks=sum_across_ranks)

    def _hyperparameters(self) -> dict[str, Any]:
        return {**super()._hyperparameters(), "eta": self.eta}

    def _perturb(self, index: int, params: list[Tensor], grads: list[Tensor]) -> bool:
        fe = self.foreach
        if self._transient:  # nothing is put back: T in a temporary, w + eps in place, no copy kept
            if fe and params:
                t = torch._foreach_abs(params)
                torch._foreach_add_(t, self.eta)
            else:
                t = [p.abs().add_(self.eta) for p in params]
            _mul_list_(grads, t, fe)  # grads <- T g
            norm = self._grad_norm(grads)
            _mul_list_(grads, t, fe)  # grads <- T^2 g
            del t
            _add_scaled_(params, grads, self.rho / (norm + EPS), fe, src_is_scratch=True)
            return True
        saved = self._buffers(params, "w")
        _copy_(saved, params, fe)  # exact copy of w; the params' storage is scratch until it is rewritten below
        t = params
        _abs_add_(t, self.eta, fe)  # T = |w| + eta, in the parameters' own storage (no temporary)
        _mul_list_(grads, t, fe)  # grads <- T g
        norm = self._grad_norm(grads)  # ||T g||, global
        _mul_list_(grads, t, fe)  # grads <- T^2 g
        _copy_(params, saved, fe)  # back to w, then w + rho T^2 g / ||T g||
        _add_scaled_(params, grads, self.rho / (norm + EPS), fe, src_is_scratch=True)
        return True
