"""Loss landscapes: L along a line, over a plane, and on the segment between two sets of weights.

Directions follow Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets" (NeurIPS): a Gaussian
direction d ~ N(0, I) is *filter-normalised* so that each filter has the norm of the weights' filter,

.. math::

    d_{i} \\leftarrow \\frac{d_{i}}{\\|d_{i}\\|} \\|w_{i}\\|

where a filter is a row along dim 0 of a tensor with ndim >= 2 (an output unit of a linear layer, a token's
embedding row, a conv filter), flattened over its other dims. Tensors with ndim < 2 (biases, norm gains) get
a zero direction: the paper's "ignore biasbn" choice, which keeps a unit-scale gain from dominating. The
scale invariance this removes makes plots of different networks comparable.

Evaluations write w + a d (never an increment) under ``no_grad`` and restore w bit for bit afterwards; the
module's train/eval mode is left alone. Each point costs one :meth:`Objective.loss` (one reduce).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flatlm.analysis.objective import Displaced, Objective, Vector, axpy, random_vector
from flatlm.errors import FlatlmError


def filter_normalized_direction(params: Sequence[torch.Tensor], generator: torch.Generator) -> Vector:
    """A Gaussian direction with each filter (dim-0 row) scaled to its weight row's norm; 1-D tensors get 0."""
    out = []
    for p, d in zip(params, random_vector(params, generator), strict=True):
        if p.ndim < 2:
            out.append(torch.zeros_like(d))
            continue
        rows = d.reshape(d.shape[0], -1)  # [filters, fan_in...]
        w_norm = p.detach().reshape(p.shape[0], -1).norm(dim=1, keepdim=True)  # [filters, 1]
        d_norm = rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(d.dtype).tiny)
        out.append((rows / d_norm * w_norm).view(p.shape))
    return out


def _check(params: Sequence[torch.Tensor], v: Sequence[torch.Tensor], what: str) -> None:
    if len(v) != len(params) or any(a.shape != b.shape for a, b in zip(params, v, strict=False)):
        raise FlatlmError(f"the {what} does not match the parameters' shapes; build it from the same params")


def line(obj: Objective, direction: Sequence[torch.Tensor], alphas: Sequence[float]) -> list[float]:
    """L(w + a d) for each a in ``alphas``."""
    _check(obj.params, direction, "direction")
    out = []
    with torch.no_grad(), Displaced(obj.params) as at:
        for a in alphas:
            at.shift([d * a for d in direction])
            out.append(obj.loss())
    return out


def plane(
    obj: Objective,
    d1: Sequence[torch.Tensor],
    d2: Sequence[torch.Tensor],
    alphas: Sequence[float],
    betas: Sequence[float],
) -> list[list[float]]:
    """L(w + a d1 + b d2) as rows over ``betas``, columns over ``alphas``: shape [len(betas)][len(alphas)]."""
    _check(obj.params, d1, "first direction")
    _check(obj.params, d2, "second direction")
    grid = []
    with torch.no_grad(), Displaced(obj.params) as at:
        for b in betas:
            row = []
            for a in alphas:
                at.shift(axpy(b, d2, [d * a for d in d1]))
                row.append(obj.loss())
            grid.append(row)
    return grid


def interpolation(obj: Objective, other: Sequence[torch.Tensor], alphas: Sequence[float]) -> list[float]:
    """L((1 - a) w + a w_other) for each a; exact at a = 0 and a = 1 (``torch.lerp``)."""
    _check(obj.params, other, "other set of weights")
    out = []
    with torch.no_grad(), Displaced(obj.params) as at:
        for a in alphas:
            at.set([torch.lerp(w, o.to(w.device, w.dtype), float(a)) for w, o in zip(at.origin, other, strict=True)])
            out.append(obj.loss())
    return out
