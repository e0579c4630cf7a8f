"""Objective, Hessian spectrum and SAM sharpness against Hessians known in closed form or formed densely."""

from __future__ import annotations

import json

import pytest
import torch

from flatlm.analysis.hessian import top_eigenvalue, top_eigenvalues, trace
from flatlm.analysis.objective import Objective, dot, norm, random_vector, scale
from flatlm.analysis.sharpness import sam_sharpness
from flatlm.errors import FlatlmError
from tests.analysis.problems import EIGS, ThreadAllReduce, flat, mlp, quadratic, run_ranks


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def dense(problem: str) -> tuple[Objective, torch.Tensor]:
    """The objective and its dense Hessian: the quadratic's A, or the MLP's from autograd.functional.hessian."""
    if problem == "quadratic":
        q = quadratic()
        return q.obj, q.a
    m = mlp()
    return m.objective(), m.dense_hessian()


def top_abs(h: torch.Tensor) -> float:
    ev = torch.linalg.eigvalsh(h)
    return float(ev[ev.abs().argmax()])


# ------------------------------------------------------------------------------------------ the objective


@pytest.mark.parametrize("problem", ["quadratic", "mlp"])
def test_hvp_matches_the_dense_hessian(problem: str) -> None:
    obj, h = dense(problem)
    for seed in (3, 4):
        v = random_vector(obj.params, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(flat(obj.hvp(v)), h @ flat(v), rtol=1e-5, atol=1e-8)


def test_loss_and_gradient_of_the_quadratic_are_closed_form() -> None:
    q = quadratic()
    x = flat(q.params).detach()
    torch.testing.assert_close(flat(q.obj.gradient()), q.a @ x + q.b)
    assert q.obj.loss() == pytest.approx(q.loss(x), rel=1e-12)


def test_unused_and_linear_parameters_get_zero_curvature() -> None:
    used = torch.randn(3, dtype=torch.float64, requires_grad=True)
    linear = torch.randn(2, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(4, dtype=torch.float64, requires_grad=True)
    obj = Objective([used, linear, unused], lambda: [(used**2).sum() + linear.sum()])
    hv = obj.hvp([torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64), torch.ones(4)])
    torch.testing.assert_close(hv[0], 2 * torch.ones(3, dtype=torch.float64))
    assert not hv[1].any() and not hv[2].any()
    g = obj.gradient()
    torch.testing.assert_close(g[1], torch.ones(2, dtype=torch.float64))
    assert not g[2].any()
    only_linear = Objective([linear], lambda: [3 * linear.sum()])
    assert not only_linear.hvp([torch.ones(2, dtype=torch.float64)])[0].any()


def test_objective_errors_name_the_fix() -> None:
    frozen = torch.zeros(2)
    with pytest.raises(FlatlmError, match="requires_grad"):
        Objective([frozen], lambda: [frozen.sum()])
    obj = quadratic().obj
    with pytest.raises(FlatlmError, match="1 <= k <= 10"):
        top_eigenvalues(obj, 11)


def test_random_vectors_are_seeded_and_rademacher_is_plus_minus_one() -> None:
    params = quadratic().params
    a = random_vector(params, torch.Generator().manual_seed(5))
    b = random_vector(params, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(x.dtype == torch.float64 and x.shape == p.shape for x, p in zip(a, params, strict=True))
    z = flat(random_vector(params, torch.Generator().manual_seed(5), kind="rademacher"))
    assert set(z.tolist()) == {-1.0, 1.0}


# ------------------------------------------------------------------------------------------ the spectrum


@pytest.mark.parametrize("problem", ["quadratic", "mlp"])
def test_power_iteration_finds_the_largest_magnitude_eigenvalue(problem: str) -> None:
    obj, h = dense(problem)
    eig = top_eigenvalue(obj, iters=300, tol=1e-10)
    assert rel(eig.value, top_abs(h)) < 1e-4
    assert eig.converged and eig.iterations == len(eig.history) and eig.rel_change < 1e-10
    json.dumps(eig.to_json())


@pytest.mark.parametrize(("problem", "k"), [("quadratic", 4), ("mlp", 3)])
def test_lanczos_top_k_equals_eigvalsh(problem: str, k: int) -> None:
    obj, h = dense(problem)
    spec = top_eigenvalues(obj, k)
    exact = torch.linalg.eigvalsh(h).flip(0)[:k].tolist()
    assert spec.iterations == min(max(2 * k, k + 10), h.shape[0])
    for got, want, res in zip(spec.values, exact, spec.residuals, strict=True):
        assert rel(got, want) < 1e-4
        assert abs(got - want) <= res + 1e-12  # the Ritz residual bounds the error
    assert all(spec.converged)
    json.dumps(spec.to_json())


def test_lanczos_finds_repeated_eigenvalues_by_restarting() -> None:
    obj = quadratic((10.0, 10.0, 3.0, 3.0, 1.0, 1.0, 0.5, 0.5, 0.1, 0.1)).obj
    spec = top_eigenvalues(obj, 3)
    assert spec.values == pytest.approx([10.0, 10.0, 3.0], rel=1e-6)


def test_hutchinson_is_exact_for_a_diagonal_hessian() -> None:
    eigs = torch.tensor(EIGS, dtype=torch.float64)
    params = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64)]
    params[1].requires_grad_(True)
    obj = Objective(params, lambda: [0.5 * (eigs * flat(params) ** 2).sum()])
    tr = trace(obj, samples=50, tol=1e-2)
    assert rel(tr.value, float(eigs.sum())) < 1e-12
    assert tr.samples == 10 and tr.stderr == pytest.approx(0.0, abs=1e-12) and tr.converged


@pytest.mark.parametrize("problem", ["quadratic", "mlp"])
def test_hutchinson_is_within_a_few_standard_errors_of_the_trace(problem: str) -> None:
    obj, h = dense(problem)
    tr = trace(obj, samples=200, tol=0.0)  # tol 0: never stops early
    exact = float(torch.trace(h))
    assert tr.samples == 200 and len(tr.history) == 200
    assert abs(tr.value - exact) < 4 * tr.stderr
    # the standard error is the estimator's own: Var[zᵀHz] = 2 Σ_{i≠j} H_ij² for Rademacher z
    sd = float(2 * ((h**2).sum() - (h.diag() ** 2).sum())) ** 0.5
    assert tr.stderr == pytest.approx(sd / 200**0.5, rel=0.2)
    json.dumps(tr.to_json())


# ------------------------------------------------------------------------------------------ SAM sharpness


def test_sam_sharpness_of_a_quadratic_at_its_minimum_is_half_lambda_rho_squared() -> None:
    q = quadratic(with_b=False, w_zero=True)  # g = 0 at w = 0: the random start path
    before = [p.detach().clone() for p in q.params]
    values = []
    for rho in (0.01, 0.1, 1.0):
        s = sam_sharpness(q.obj, rho, steps=10)
        assert rel(s.value, 0.5 * EIGS[0] * rho**2) < 0.03
        assert len(s.history) == 11 and s.value == max(s.history)
        values.append(s.value)
    assert values == sorted(values)
    assert all(torch.equal(p, b) for p, b in zip(q.params, before, strict=True))
    # planted: without the ascent steps (the random start alone) the 3% check above would fail
    assert rel(sam_sharpness(q.obj, 1.0, steps=0).value, 0.5 * EIGS[0]) > 0.03


def test_sam_sharpness_away_from_the_minimum_improves_on_the_first_order_point() -> None:
    q = quadratic()
    before = [p.detach().clone() for p in q.params]
    g = flat(q.obj.gradient())
    rho = 0.5
    s = sam_sharpness(q.obj, rho, steps=5)
    x = flat(q.params).detach()
    e0 = rho * g / g.norm()
    assert s.history[0] == pytest.approx(q.loss(x + e0) - q.loss(x), rel=1e-9)
    assert s.value >= s.history[0]
    assert s.value <= rho * float(g.norm()) + 0.5 * EIGS[0] * rho**2 + 1e-9  # the ball's analytic upper bound
    assert all(torch.equal(p, b) for p, b in zip(q.params, before, strict=True))
    json.dumps(s.to_json())


def test_a_sharper_quadratic_reports_larger_curvature_and_sharpness() -> None:
    base, sharp = quadratic(), quadratic(factor=4.0)
    lam = [top_eigenvalue(q.obj, iters=100, tol=1e-10).value for q in (base, sharp)]
    tr = [trace(q.obj, samples=20, tol=0.0).value for q in (base, sharp)]
    top = [top_eigenvalues(q.obj, 2).values[0] for q in (base, sharp)]
    assert lam[1] == pytest.approx(4 * lam[0], rel=1e-6) and top[1] == pytest.approx(4 * top[0], rel=1e-6)
    assert tr[1] == pytest.approx(4 * tr[0], rel=1e-6)
    for rho in (0.05, 0.5):
        s = [sam_sharpness(q.obj, rho).value for q in (base, sharp)]
        assert s[1] > 2 * s[0] > 0


# ------------------------------------------------------------------------------------------ over ranks


def test_two_simulated_ranks_with_a_real_all_reduce_equal_one_process() -> None:
    """Each thread holds its own copy of the MLP and half of the batch; the reduce sums the halves."""
    whole = mlp()
    single = whole.objective()
    world = ThreadAllReduce(2)
    copies = [whole.copy(), whole.copy()]
    halves = [
        c.objective(rows=(r,), reduce=world.for_rank(i))
        for i, (c, r) in enumerate(zip(copies, (slice(0, 4), slice(4, 8)), strict=True))
    ]
    v = random_vector(single.params, torch.Generator().manual_seed(1))

    def measure(obj: Objective) -> dict[str, object]:
        return {
            "loss": obj.loss(),
            "grad": flat(obj.gradient()),
            "hvp": flat(obj.hvp(v)),
            "eig": top_eigenvalue(obj, iters=30, tol=0.0).history,
            "lanczos": top_eigenvalues(obj, 2).values,
            "trace": trace(obj, samples=12, tol=0.0).history,
            "sam": sam_sharpness(obj, 0.1, steps=2).history,
        }

    want = measure(single)
    got = run_ranks([lambda o=o: measure(o) for o in halves])
    for rank in got:
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(rank[key], value, rtol=1e-10, atol=1e-12)
            else:
                assert rank[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert world.calls[0] == world.calls[1] > 0
    # each half alone (a missing reduce) is far from the whole: the comparison above can fail
    alone = copies[0].objective(rows=(slice(0, 4),))
    assert not torch.allclose(flat(alone.hvp(v)), want["hvp"], rtol=1e-3)
    assert rel(top_eigenvalue(alone, iters=30, tol=0.0).value, want["eig"][-1]) > 1e-2


def test_one_reduce_per_product_on_one_flat_buffer() -> None:
    seen: list[tuple[int, ...]] = []

    def counting(t: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(t.shape))
        return t

    q = quadratic()
    obj = Objective(q.params, q.obj.terms, counting)
    obj.hvp(random_vector(q.params, torch.Generator().manual_seed(0)))
    obj.gradient()
    obj.loss()
    assert seen == [(10,), (10,), (1,)]


# ------------------------------------------------------------------------------------------ planted bugs


def test_planted_power_iteration_without_renormalisation_is_caught() -> None:
    """The unnormalised iterate's quotient vᵀHv grows like λ^{2t}; the comparison used above rejects it."""
    obj, h = dense("mlp")
    v = random_vector(obj.params, torch.Generator().manual_seed(0))
    v = scale(1 / norm(v), v)
    for _ in range(30):
        hv = obj.hvp(v)
        wrong = dot(v, hv)  # forgot v <- Hv / ||Hv||
        v = hv
    assert rel(wrong, top_abs(h)) > 1e-4
    assert rel(top_eigenvalue(obj, iters=300, tol=1e-10).value, top_abs(h)) < 1e-4


def test_bfloat16_weights_accumulate_and_reduce_in_float32() -> None:
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16, requires_grad=True)
    scales = torch.tensor([4.0, 1.0, 0.5])
    seen: list[torch.dtype] = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.dtype)
        return t

    obj = Objective([w], lambda: [0.5 * (scales * w.float() ** 2).sum()], reduce)
    hv = obj.hvp([torch.ones(3, dtype=torch.bfloat16)])
    assert hv[0].dtype == torch.float32 and seen == [torch.float32]
    torch.testing.assert_close(hv[0], scales)
    assert top_eigenvalues(obj, 2).values == pytest.approx([4.0, 1.0], rel=1e-2)
