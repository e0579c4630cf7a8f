"""Small objectives with known Hessians for the analysis tests: a split quadratic and a tiny MLP."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flatlm.analysis.objective import Objective, Reduce

SHAPES = ((2, 3), (4,))  # the quadratic's weights: two tensors, 10 numbers
EIGS = (10.0, 3.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01)


def flat(vs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in vs])


def unflat(x: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        out.append(x[i : i + p.numel()].view(p.shape))
        i += p.numel()
    return out


@dataclass
class Quadratic:
    """L(w) = ½ xᵀ A x + bᵀ x, x = flat(w), given as two terms (A = A1 + A2, b = b1 + b2, A1 ≠ A2)."""

    a: torch.Tensor  # [10, 10]
    b: torch.Tensor  # [10]
    params: list[torch.Tensor]
    obj: Objective

    def loss(self, x: torch.Tensor) -> float:
        return float(0.5 * x @ self.a @ x + self.b @ x)


def quadratic(
    eigs: Sequence[float] = EIGS, *, factor: float = 1.0, with_b: bool = True, w_zero: bool = False, seed: int = 0
) -> Quadratic:
    """A = factor Q diag(eigs) Qᵀ with a seeded random orthogonal Q; w random (or 0), b random (or 0)."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = factor * q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    b = factor * torch.randn(n, generator=g, dtype=torch.float64) if with_b else torch.zeros(n, dtype=torch.float64)
    s = torch.randn(n, n, generator=g, dtype=torch.float64)
    a1 = 0.25 * a + (s + s.T)  # an honest split: neither half is a multiple of A
    a2 = a - a1
    b1, b2 = 0.3 * b, 0.7 * b
    x0 = torch.zeros(n, dtype=torch.float64) if w_zero else torch.randn(n, generator=g, dtype=torch.float64)
    params = [t.clone().requires_grad_(True) for t in unflat(x0, [torch.empty(s) for s in SHAPES])]

    def terms():
        x = flat(params)
        yield 0.5 * x @ a1 @ x + b1 @ x
        yield 0.5 * x @ a2 @ x + b2 @ x

    return Quadratic(a, b, params, Objective(params, terms))


@dataclass
class MLP:
    """A 3-5-2 tanh MLP with cross entropy on 8 points (32 parameters, float64)."""

    params: list[torch.Tensor]
    x: torch.Tensor  # [8, 3]
    y: torch.Tensor  # [8]

    def loss_of(self, ws: Sequence[torch.Tensor], rows: slice = slice(None)) -> torch.Tensor:
        w1, b1, w2, b2 = ws
        h = torch.tanh(self.x[rows] @ w1.T + b1)  # [B, 5]
        return F.cross_entropy(h @ w2.T + b2, self.y[rows], reduction="sum") / self.x.shape[0]

    def objective(self, rows: Sequence[slice] = (slice(0, 4), slice(4, 8)), reduce: Reduce | None = None) -> Objective:
        """One term per slice of the batch, each weighted by its share (sum over all rows / 8)."""

        def terms():
            for r in rows:
                yield self.loss_of(self.params, r)

        return Objective(self.params, terms) if reduce is None else Objective(self.params, terms, reduce)

    def dense_hessian(self) -> torch.Tensor:
        x0 = flat(self.params).detach()
        return torch.autograd.functional.hessian(lambda x: self.loss_of(unflat(x, self.params)), x0)

    def copy(self) -> MLP:
        return MLP([p.detach().clone().requires_grad_(True) for p in self.params], self.x, self.y)


def mlp(seed: int = 0, weight_scale: float = 1.0) -> MLP:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return (weight_scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(True)

    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=g)
    return MLP([r(5, 3), r(5), r(2, 5), r(2)], x, y)


class ThreadAllReduce:
    """An all-reduce SUM among ``world`` threads, each a simulated rank holding its own tensors."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world

    def for_rank(self, rank: int) -> Reduce:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())  # the same order on every rank
            self.barrier.wait()  # nobody overwrites a slot before all have summed
            return total

        return reduce


def run_ranks(fns: Sequence[Callable[[], object]]) -> list[object]:
    """Run one callable per simulated rank in its own thread; return their results in rank order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(fns)) as pool:
        futures = [pool.submit(f) for f in fns]
        return [f.result(timeout=60) for f in futures]
