"""SAM sharpness: the worst loss rise within an L2 ball of radius ρ around the weights.

Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving Generalization", define

.. math::

    S_\\rho(w) = \\max_{\\|e\\|_2 \\le \\rho} L(w + e) - L(w)

and approximate the maximiser to first order by e_0 = ρ g / ||g||, g = ∇L(w). This module starts there and
takes ``steps`` projected, normalised gradient-ascent steps with step size ρ,

.. math::

    e_{t+1} = \\Pi_\\rho\\big(e_t + \\rho \\, \\nabla L(w + e_t) / \\|\\nabla L(w + e_t)\\|\\big), \\qquad
    \\Pi_\\rho(x) = x \\min(1, \\rho / \\|x\\|),

reporting the largest rise found (a lower bound on S_ρ). For a quadratic at its minimum, L = ½ wᵀAw, the
steps are a power iteration for the top eigenvector and the rise tends to ½ λ_max ρ². When g = 0 exactly
(e.g. at a critical point) e_0 is a random Gaussian direction of norm ρ, drawn from ``seed`` (the same on
every rank). The perturbation is taken over all ``obj.params``; the weights are restored bit for bit.
Cost: ``steps + 1`` gradients and ``steps + 2`` losses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from flatlm.analysis.objective import Displaced, Objective, Vector, axpy, norm, random_vector, scale
from flatlm.errors import FlatlmError


@dataclass
class Sharpness:
    """max over ||e|| <= rho of L(w+e) - L(w), as found by ``steps`` ascent steps."""

    value: float
    """The largest rise L(w+e) - L(w) found."""
    rho: float
    steps: int
    history: list[float] = field(default_factory=list)
    """The rise at e_0 (SAM's first-order point) and after each ascent step: steps + 1 values."""
    base_loss: float = 0.0
    """L(w)."""

    def to_json(self) -> dict[str, object]:
        """Plain floats, ints and lists."""
        return asdict(self)


def _direction(g: Vector, obj: Objective, seed: int) -> Vector:
    """g / ||g||, or a seeded random unit vector when g = 0."""
    size = norm(g)
    if size == 0.0:
        g = random_vector(obj.params, torch.Generator().manual_seed(seed))
        size = norm(g)
    return scale(1.0 / size, g)


def _project(e: Vector, rho: float) -> Vector:
    size = norm(e)
    return e if size <= rho else scale(rho / size, e)


def sam_sharpness(obj: Objective, rho: float, *, steps: int = 5, seed: int = 0) -> Sharpness:
    """SAM sharpness within radius ``rho`` by ``steps`` projected normalised gradient-ascent steps from ρ g/||g||."""
    if rho <= 0:
        raise FlatlmError(f"SAM sharpness needs rho > 0, got {rho}")
    if steps < 0:
        raise FlatlmError(f"SAM sharpness needs steps >= 0, got {steps}")
    base = obj.loss()
    e = scale(rho, _direction(obj.gradient(), obj, seed))
    history: list[float] = []
    with Displaced(obj.params) as at:
        for t in range(steps + 1):
            at.shift(e)
            history.append(obj.loss() - base)
            if t == steps:
                break
            e = _project(axpy(rho, _direction(obj.gradient(), obj, seed + 1 + t), e), rho)
    return Sharpness(max(history), rho, steps, history, base)
