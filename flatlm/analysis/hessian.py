"""Hessian spectrum of an :class:`~flatlm.analysis.objective.Objective` from Hessian-vector products only.

The Hessian H = ∇²L(w) is never formed; every method calls ``obj.hvp`` (one double backward per term and one
reduce), so each costs its number of products, and the same code runs in one process or over ranks.

- :func:`top_eigenvalue` — power iteration (von Mises 1929) with the Rayleigh quotient
  ``λ_t = v_t^T H v_t``, ``v_{t+1} = H v_t / ||H v_t||``. It converges to the eigenvalue of **largest
  magnitude** |λ| (with its sign), at the rate (|λ_2| / |λ_1|)^{2t}. For a language model near a minimum that is
  normally the top positive eigenvalue; a large negative eigenvalue would be returned instead.
- :func:`top_eigenvalues` — Lanczos (Lanczos 1950; Golub & Van Loan, "Matrix Computations" §10.1) with full
  reorthogonalisation: m steps build an orthonormal basis Q of the Krylov space {q, Hq, ..., H^{m-1}q} and
  the tridiagonal T = Q^T H Q; the Ritz values (eigenvalues of T) approximate the extreme eigenvalues of H,
  the largest algebraic ones here. The residual ||H y_i - θ_i y_i|| of Ritz pair i equals |β_m s_{m,i}| (s_i
  the eigenvector of T), a bound on |θ_i - λ| for some eigenvalue λ. Memory: m vectors the size of the
  parameters.
- :func:`trace` — Hutchinson's estimator (Hutchinson 1990): tr H = E[z^T H z] for Rademacher z (entries ±1);
  the mean of the samples with its standard error. For a diagonal H every sample is exactly tr H.

Random start vectors are drawn from ``torch.Generator().manual_seed(seed)`` on the CPU, so every rank draws
the same vector (as the reduce requires).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from flatlm.analysis.objective import Objective, Vector, axpy, dot, norm, random_vector, scale, work_dtype
from flatlm.errors import FlatlmError


def _plain(x: object) -> object:
    """JSON-safe: non-finite floats become None, containers recurse."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, list):
        return [_plain(y) for y in x]
    return x


class _Json:
    def to_json(self) -> dict[str, object]:
        """Plain floats, ints, bools and lists (a non-finite float becomes None)."""
        return {k: _plain(v) for k, v in asdict(self).items()}  # type: ignore[call-overload]


@dataclass
class Eigen(_Json):
    """The eigenvalue of largest magnitude, by power iteration."""

    value: float
    iterations: int
    rel_change: float
    """|λ_t - λ_{t-1}| / |λ_t| at the last iteration (inf after one iteration)."""
    history: list[float] = field(default_factory=list)
    """The Rayleigh quotient λ_t after each iteration."""
    converged: bool = False
    """rel_change < tol (or H v = 0, an exact answer)."""


@dataclass
class Spectrum(_Json):
    """The top-k eigenvalues (largest algebraic), by Lanczos."""

    values: list[float]
    """Ritz values, descending."""
    iterations: int
    """Lanczos steps taken (HVPs)."""
    residuals: list[float]
    """|β_m s_{m,i}| per value: the Ritz residual, a bound on the distance to an eigenvalue of H."""
    converged: list[bool]
    """residual <= tol |value| per value."""


@dataclass
class Trace(_Json):
    """tr H by Hutchinson's estimator."""

    value: float
    """The mean of the samples z^T H z."""
    samples: int
    stderr: float
    """Standard error of the mean (sample std / sqrt(samples); inf for one sample)."""
    rel_change: float
    """|mean_n - mean_{n-1}| / |mean_n| at the last sample."""
    history: list[float] = field(default_factory=list)
    """The running mean after each sample."""
    converged: bool = False
    """stderr < tol |mean| (checked from the 10th sample on)."""


def _unit(v: Vector) -> Vector:
    return scale(1.0 / norm(v), v)


def _rel(new: float, old: float) -> float:
    if new == old:
        return 0.0
    return abs(new - old) / abs(new) if new != 0 else math.inf


def top_eigenvalue(obj: Objective, *, iters: int = 20, tol: float = 1e-3, seed: int = 0) -> Eigen:
    """Power iteration on H v: the eigenvalue of largest |λ|, stopping when |Δλ| / |λ| < tol or at ``iters``."""
    if iters < 1:
        raise FlatlmError(f"power iteration needs iters >= 1, got {iters}")
    v = _unit(random_vector(obj.params, torch.Generator().manual_seed(seed)))
    history: list[float] = []
    rel = math.inf
    for _ in range(iters):
        hv = obj.hvp(v)
        lam = dot(v, hv)  # Rayleigh quotient, ||v|| = 1
        if history:
            rel = _rel(lam, history[-1])
        history.append(lam)
        size = norm(hv)
        if size == 0.0:  # v lies in the null space: H v = 0 exactly, λ = 0 for this direction
            return Eigen(lam, len(history), 0.0, history, True)
        v = scale(1.0 / size, hv)
        if rel < tol:
            break
    return Eigen(history[-1], len(history), rel, history, rel < tol)


def _orthogonalise(w: Vector, basis: list[Vector]) -> Vector:
    """Classical Gram–Schmidt against ``basis``, twice ("twice is enough", Giraud et al. 2005)."""
    for _ in range(2):
        for q in basis:
            w = axpy(-dot(q, w), q, w)
    return w


def top_eigenvalues(obj: Objective, k: int, *, iters: int | None = None, seed: int = 0, tol: float = 1e-3) -> Spectrum:
    """Lanczos with full reorthogonalisation: the k largest (algebraic) eigenvalues of H, descending.

    Takes m = ``iters`` or max(2k, k + 10) steps, capped at the parameter count. When the Krylov space becomes
    invariant (β ≈ 0) before m steps, Lanczos restarts from a random vector orthogonal to the basis (β = 0 in
    T), so repeated eigenvalues are found too.
    """
    n = sum(p.numel() for p in obj.params)
    if not 1 <= k <= n:
        raise FlatlmError(f"top_eigenvalues needs 1 <= k <= {n} (the parameter count), got k={k}")
    m = min(iters if iters is not None else max(2 * k, k + 10), n)
    if m < k:
        raise FlatlmError(f"Lanczos with {m} steps cannot give {k} eigenvalues; set iters >= k")
    gen = torch.Generator().manual_seed(seed)
    eps = torch.finfo(work_dtype(obj.params)).eps
    q = _unit(random_vector(obj.params, gen))
    basis: list[Vector] = []
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples q_j and q_{j+1}
    size = 0.0  # running estimate of ||H||, for the breakdown test
    beta_last = 0.0
    for j in range(m):
        basis.append(q)
        w = obj.hvp(q)
        alphas.append(dot(q, w))
        w = _orthogonalise(w, basis)  # removes α_j q_j and β_{j-1} q_{j-1} and any lost orthogonality
        beta = norm(w)
        size = max(size, abs(alphas[-1]), beta)
        if j == m - 1:
            beta_last = beta
            break
        if beta <= 100 * eps * size:  # invariant subspace: restart orthogonally, T decouples
            w = _orthogonalise(random_vector(obj.params, gen), basis)
            betas.append(0.0)
            q = _unit(w)
        else:
            betas.append(beta)
            q = scale(1.0 / beta, w)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)  # ascending
    top = torch.argsort(theta, descending=True)[:k]
    values = [float(theta[i]) for i in top]
    residuals = [abs(beta_last * float(s[-1, i])) for i in top]
    floor = 100 * eps * size
    converged = [r <= max(tol * abs(v), floor) for v, r in zip(values, residuals, strict=True)]
    return Spectrum(values, len(alphas), residuals, converged)


def trace(obj: Objective, *, samples: int = 50, tol: float = 1e-2, seed: int = 0) -> Trace:
    """Hutchinson's estimate of tr H with Rademacher vectors; stops early when stderr / |mean| < tol (n >= 10)."""
    if samples < 1:
        raise FlatlmError(f"Hutchinson's trace needs samples >= 1, got {samples}")
    gen = torch.Generator().manual_seed(seed)
    xs: list[float] = []
    history: list[float] = []
    stderr, converged = math.inf, False
    for _ in range(samples):
        z = random_vector(obj.params, gen, kind="rademacher")
        xs.append(dot(z, obj.hvp(z)))
        mean = sum(xs) / len(xs)
        history.append(mean)
        if len(xs) > 1:
            var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
            stderr = math.sqrt(var / len(xs))
        converged = len(xs) >= 10 and stderr < tol * abs(mean)  # fewer samples: too few to trust the stderr
        if converged:
            break
    rel = _rel(history[-1], history[-2]) if len(history) > 1 else math.inf
    return Trace(history[-1], len(xs), stderr, rel, history, converged)
