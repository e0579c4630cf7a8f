"""The measured objective L(w), its gradient and Hessian-vector products, over any number of ranks.

Every curvature and landscape measurement in :mod:`flatlm.analysis` sees the loss through one object:

.. math::

    L(w) = \\sum_{r \\in \\text{ranks}} \\sum_{t \\in \\text{terms}_r} \\ell_t(w)

Each rank yields its own differentiable 0-d terms (already weighted by the caller, e.g. by tokens in the batch
over tokens in the whole evaluation set), and ``reduce`` sums a tensor over ranks (an all-reduce SUM injected by
the caller; the identity in one process). The parameters are whole tensors, identical on every rank.

Communication: exactly one ``reduce`` per :meth:`Objective.loss`, :meth:`Objective.gradient` and
:meth:`Objective.hvp`, on one flattened buffer, so a distributed measurement costs one collective per product.

Hessian-vector product (Pearlmutter 1994, "Fast exact multiplication by the Hessian"), by double backward:

.. math::

    H v = \\nabla_w \\big( \\nabla_w L(w) \\cdot v \\big)

computed per term (only one term's graph is alive at a time) and accumulated before the reduce.

Vectors are plain ``list[torch.Tensor]`` shaped like the parameters; :func:`dot`, :func:`norm`, :func:`axpy`
and :func:`scale` are the vector algebra, with inner products accumulated in float64. Gradients and HVPs are
accumulated and reduced in the parameters' dtype, or float32 when that is narrower (bfloat16 weights).

Lockstep over ranks: every returned value is reduced, so each rank takes the same branches (early stops,
Lanczos restarts) and issues the same collectives; the measurements in this package rely on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import reduce as fold

import torch

from flatlm.errors import FlatlmError

Vector = list[torch.Tensor]
Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over ranks and returns the sum (the identity in one process)."""


def identity(t: torch.Tensor) -> torch.Tensor:
    """The reduce of a single process: the local sum is the global sum."""
    return t


# ----------------------------------------------------------------------------------------------- vector algebra


def dot(u: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> float:
    """Inner product ``sum_i <u_i, v_i>`` of two vectors, accumulated in float64."""
    parts = []
    for a, b in zip(u, v, strict=True):
        dtype = work_dtype([a, b])  # products in at least float32, the sum in float64, no float64 copies
        parts.append((a.to(dtype) * b.to(dtype)).sum(dtype=torch.float64).to(u[0].device))
    return float(torch.stack(parts).sum()) if parts else 0.0  # one device sync per inner product


def norm(v: Sequence[torch.Tensor]) -> float:
    """Euclidean norm of a vector over all its tensors."""
    return dot(v, v) ** 0.5


def axpy(a: float, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Vector:
    """Return ``a x + y`` as a new vector."""
    return [torch.add(yi, xi, alpha=a) for xi, yi in zip(x, y, strict=True)]


def scale(a: float, x: Sequence[torch.Tensor]) -> Vector:
    """Return ``a x`` as a new vector."""
    return [xi * a for xi in x]


def zeros_like(params: Sequence[torch.Tensor]) -> Vector:
    """The zero vector shaped like ``params``, on their devices, in their dtypes or float32 if narrower."""
    return [torch.zeros(p.shape, dtype=work_dtype([p]), device=p.device) for p in params]


def work_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype products are accumulated and reduced in: the widest parameter dtype, at least float32."""
    return fold(torch.promote_types, (p.dtype for p in params), torch.float32)


def random_vector(params: Sequence[torch.Tensor], generator: torch.Generator, kind: str = "gaussian") -> Vector:
    """A random vector shaped like ``params``, identical on every rank for the same generator state.

    Entries are drawn in float32 on the CPU from ``generator`` (seeded by the caller), then moved to each
    parameter's device and dtype, so the draw never depends on the device. ``kind`` is ``"gaussian"``
    (N(0, 1) entries) or ``"rademacher"`` (+1 or -1 with probability 1/2).
    """
    if kind not in ("gaussian", "rademacher"):
        raise FlatlmError(f"random vector kind '{kind}' is unknown; use 'gaussian' or 'rademacher'")
    out = []
    for p in params:
        if kind == "gaussian":
            x = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        else:
            x = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int64).to(torch.float32) * 2 - 1
        out.append(x.to(device=p.device, dtype=p.dtype))
    return out


# ------------------------------------------------------------------------------------------ flatten and reduce


def reduce_vector(reduce: Reduce, v: Sequence[torch.Tensor]) -> Vector:
    """Sum a vector over ranks with one ``reduce`` of one flattened buffer, and split it back."""
    if not v:
        return []
    dtype = work_dtype(v)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in v])
    flat = reduce(flat)
    out, start = [], 0
    for t in v:
        out.append(flat[start : start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


# ---------------------------------------------------------------------------------------------- the objective


@dataclass
class Objective:
    """L(w) = sum over terms of this rank's loss terms, summed over ranks by ``reduce``."""

    params: list[torch.nn.Parameter]
    """The weights measured: whole tensors, identical on every rank, each with ``requires_grad``."""
    terms: Callable[[], Iterable[torch.Tensor]]
    """Yields this rank's differentiable 0-d losses; their sum over all ranks is L (the caller pre-weights)."""
    reduce: Reduce = identity
    """All-reduce SUM of one tensor over ranks; the identity in one process."""

    def __post_init__(self) -> None:
        self.params = list(self.params)
        if not self.params:
            raise FlatlmError("the objective has no parameters; pass the tensors to measure as params")
        frozen = [i for i, p in enumerate(self.params) if not p.requires_grad]
        if frozen:
            raise FlatlmError(
                f"parameters {frozen} do not require grad; measure only trainable tensors (requires_grad=True)"
            )

    def loss(self) -> float:
        """L(w), without building a graph; one reduce."""
        p0 = self.params[0]
        total = torch.zeros(1, dtype=torch.float64, device=p0.device)
        with torch.no_grad():
            for term in self.terms():
                total += term.detach().to(torch.float64)
        return float(self.reduce(total).item())

    def gradient(self) -> Vector:
        """dL/dw, one backward per term, one reduce; an unused parameter gets zeros."""
        acc = zeros_like(self.params)
        for term in self.terms():
            grads = torch.autograd.grad(term, self.params, allow_unused=True)
            _accumulate(acc, grads)
        return reduce_vector(self.reduce, acc)

    def hvp(self, v: Sequence[torch.Tensor]) -> Vector:
        """H v by double backward per term, one reduce; an unused (or linear) parameter gets zeros."""
        if len(v) != len(self.params):
            raise FlatlmError(f"HVP got a vector of {len(v)} tensors for {len(self.params)} parameters")
        acc = zeros_like(self.params)
        for term in self.terms():
            grads = torch.autograd.grad(term, self.params, create_graph=True, allow_unused=True)
            gv = [(g * vi).sum() for g, vi in zip(grads, v, strict=True) if g is not None and g.requires_grad]
            if not gv:
                continue  # the term is at most linear in w: its Hessian is zero
            hv = torch.autograd.grad(torch.stack(gv).sum(), self.params, allow_unused=True)
            _accumulate(acc, hv)
        return reduce_vector(self.reduce, acc)


def _accumulate(acc: Vector, grads: Sequence[torch.Tensor | None]) -> None:
    with torch.no_grad():
        for a, g in zip(acc, grads, strict=True):
            if g is not None:
                a += g.detach()


# ------------------------------------------------------------------------------------------ moving the weights


class Displaced:
    """Evaluate at displaced weights ``w0 + e`` and restore ``w0`` bit for bit afterwards.

    The weights are cloned on entry; :meth:`set` writes ``w0 + e`` (never an increment on the current
    weights, so round-off does not accumulate); exit copies the clone back, even on an exception.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.origin: Vector = []

    def __enter__(self) -> Displaced:
        self.origin = [p.detach().clone() for p in self.params]
        return self

    def set(self, weights: Sequence[torch.Tensor]) -> None:
        """Write ``weights`` into the parameters in place."""
        with torch.no_grad():
            for p, w in zip(self.params, weights, strict=True):
                p.copy_(w)

    def shift(self, e: Sequence[torch.Tensor]) -> None:
        """Write ``w0 + e`` into the parameters in place."""
        self.set(axpy(1.0, e, self.origin))

    def __exit__(self, *exc: object) -> None:
        self.set(self.origin)
