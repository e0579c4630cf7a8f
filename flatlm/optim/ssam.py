r"""SSAM (Stable SAM): SAM whose descent gradient is renormalised to the ascent gradient's norm.

Source: C. Tan, J. Zhang, J. Liu, Y. Wang, Y. Hao, "Stabilizing Sharpness-aware Minimization Through A Simple
Renormalization Strategy", arXiv:2401.07250 (2024; JMLR 2025). The paper calls it StableSAM / SSAM.

    eps     = rho g / (||g|| + 1e-12)                    as SAM
    g'      = grad L(w + eps)
    g_final = g' ||g|| / (||g'|| + 1e-12)                the surrogate gradient keeps the exact gradient's norm

so the step length of the base optimizer is that of plain training while the direction is SAM's; the paper
shows this widens the range of learning rates where sharpness-aware training is stable. The norms are the
global L2 norms over every parameter (before any gradient clipping, which the loop applies afterwards).

Name clash: "SSAM" also names Sparse SAM (Mi et al., NeurIPS 2022), which perturbs a sparse mask of weights;
that is not this. This is the issue's definition ("renormalise the perturbed gradient to the first gradient's
norm"), which is Tan et al.'s.

Reductions: perturb: one (||g||^2); restore: one (||g'||^2). State: none beyond SAM's scratch copy of w
(||g|| is kept as a 0-d tensor between perturb and restore). Cost: SAM's 8 streams + ||g'|| 1 + rescale 2 = 11.
"""

from __future__ import annotations

from torch import Tensor

from flatlm.optim.sam import EPS, SAM, _mul_


class SSAM(SAM):
    """SAM with g_final = g' ||g|| / ||g'|| (Tan et al. 2024). Args as ``SAM``."""

    writes_final_grad = True  # g' rescaled in place
    final_grad_uses_first_pass = True  # by this rank's ||g||

    def _perturb(self, index: int, params: list[Tensor], grads: list[Tensor]) -> bool:
        norm = self._grad_norm(grads)
        self._first_norm = norm  # ||g||, a 0-d tensor: no host sync
        self._save_and_move(params, grads, self.rho / (norm + EPS))
        return True

    def _final_grad(self, params: list[Tensor], grads: list[Tensor]) -> None:
        norm_perturbed = self._grad_norm(grads)  # ||g'||
        _mul_(grads, self._first_norm / (norm_perturbed + EPS), self.foreach)
