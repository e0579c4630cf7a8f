"""Filter-normalised directions, line/plane/interpolation losses against closed forms, exact restores, plots."""

from __future__ import annotations

import pytest
import torch

from flatlm.analysis.landscape import filter_normalized_direction, interpolation, line, plane
from flatlm.analysis.objective import Objective, random_vector
from flatlm.analysis.plots import plot_line, plot_plane
from flatlm.analysis.sharpness import sam_sharpness
from flatlm.errors import FlatlmError
from tests.analysis.problems import flat, quadratic

ALPHAS = [-1.0, -0.5, 0.0, 0.25, 1.0]
BETAS = [-0.5, 0.0, 0.5]


def layered_params() -> list[torch.Tensor]:
    """A weight matrix, a bias, an embedding-like 3-D tensor and a norm gain (float32)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (4,), (5, 2, 2), (3,)]
    return [torch.randn(s, generator=g).requires_grad_(True) for s in shapes]


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def identical(params: list[torch.Tensor], saved: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, s) for p, s in zip(params, saved, strict=True))


# ------------------------------------------------------------------------------------------ directions


def test_each_filter_has_its_weight_rows_norm_and_1d_tensors_get_zero() -> None:
    params = layered_params()
    d = filter_normalized_direction(params, torch.Generator().manual_seed(1))
    for p, di in zip(params, d, strict=True):
        assert di.shape == p.shape and di.dtype == p.dtype
        if p.ndim < 2:
            assert not di.any()
        else:
            rows = di.reshape(p.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(rows, p.detach().reshape(p.shape[0], -1).norm(dim=1))
    # planted: the same generator's raw Gaussian direction (no normalisation) fails the same row check
    raw = random_vector(params, torch.Generator().manual_seed(1))
    matrices = [
        (p.detach().reshape(p.shape[0], -1), r.reshape(p.shape[0], -1))
        for p, r in zip(params, raw, strict=True)
        if p.ndim >= 2
    ]
    assert matrices and not any(torch.allclose(r.norm(dim=1), w.norm(dim=1), rtol=1e-3) for w, r in matrices)


def test_the_same_seed_gives_the_same_direction() -> None:
    params = layered_params()
    a, b, c = (filter_normalized_direction(params, torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    assert identical(a, b)
    assert not torch.equal(a[0], c[0])


# ------------------------------------------------------------------------------------------ evaluations


def test_line_plane_and_interpolation_match_the_closed_form() -> None:
    q = quadratic()
    x = flat(q.params).detach()
    saved = snapshot(q.params)
    d1 = filter_normalized_direction(q.params, torch.Generator().manual_seed(1))
    d2 = filter_normalized_direction(q.params, torch.Generator().manual_seed(2))
    u, v = flat(d1), flat(d2)
    assert line(q.obj, d1, ALPHAS) == pytest.approx([q.loss(x + a * u) for a in ALPHAS], rel=1e-12)
    grid = plane(q.obj, d1, d2, ALPHAS, BETAS)
    assert len(grid) == len(BETAS) and all(len(row) == len(ALPHAS) for row in grid)
    for j, b in enumerate(BETAS):
        assert grid[j] == pytest.approx([q.loss(x + a * u + b * v) for a in ALPHAS], rel=1e-12)
    assert grid[BETAS.index(0.0)][ALPHAS.index(0.0)] == pytest.approx(q.loss(x), rel=1e-15)
    other = [torch.randn_like(p) for p in q.params]
    y = flat(other)
    losses = interpolation(q.obj, other, [0.0, 0.3, 1.0])
    assert losses[0] == q.obj.loss() and losses[2] == pytest.approx(q.loss(y), rel=1e-12)
    assert losses[1] == pytest.approx(q.loss(0.7 * x + 0.3 * y), rel=1e-12)
    assert identical(q.params, saved)


def test_weights_are_restored_bit_for_bit_and_in_place_even_after_an_error() -> None:
    """float32 weights, where w + a d - a d != w: a restore by subtraction would fail these checks."""
    params = layered_params()
    ptrs = [p.data_ptr() for p in params]
    obj = Objective(params, lambda: [sum((p**2).sum() for p in params) + (params[0] ** 3).sum()])
    saved = snapshot(params)
    d = filter_normalized_direction(params, torch.Generator().manual_seed(1))
    d[1] = torch.randn_like(params[1])  # move the 1-D tensors too
    line(obj, d, [0.37, -1.3, 2.9])
    plane(obj, d, d, [0.37, 2.9], [-1.3])
    interpolation(obj, [p.detach() * 3 for p in params], [0.37])
    sam_sharpness(obj, 0.3, steps=3)
    assert identical(params, saved) and [p.data_ptr() for p in params] == ptrs

    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the second evaluation")
        yield sum((p**2).sum() for p in params)

    with pytest.raises(RuntimeError, match="second evaluation"):
        line(Objective(params, failing), d, [0.5, 1.5])
    assert identical(params, saved)
    # planted: the subtractive restore really does differ in float32 for these shifts
    drift = [(s + 2.9 * di) - 2.9 * di for s, di in zip(saved, d, strict=True)]
    assert not identical(drift, saved)


def test_the_module_mode_is_left_alone() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1)).eval()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    obj = Objective(list(net.parameters()), lambda: [net(x).pow(2).mean()])
    d = filter_normalized_direction(obj.params, torch.Generator().manual_seed(0))
    losses = line(obj, d, [0.0, 0.0])
    assert not net.training and losses[0] == losses[1]  # eval: dropout off, deterministic


def test_a_sharper_objective_rises_faster_along_lines_and_planes() -> None:
    base, sharp = quadratic(), quadratic(factor=4.0)  # same w; A and b four times larger
    d1 = filter_normalized_direction(base.params, torch.Generator().manual_seed(1))
    d2 = filter_normalized_direction(base.params, torch.Generator().manual_seed(2))
    rises = []
    for q in (base, sharp):
        at_w = q.obj.loss()
        lines = [loss - at_w for loss in line(q.obj, d1, ALPHAS)]
        planes = [loss - at_w for row in plane(q.obj, d1, d2, ALPHAS, BETAS) for loss in row]
        rises.append((max(lines), max(planes)))
    assert rises[1][0] > 2 * rises[0][0] > 0 and rises[1][1] > 2 * rises[0][1] > 0


def test_shape_mismatch_names_the_fix() -> None:
    q = quadratic()
    with pytest.raises(FlatlmError, match="same params"):
        line(q.obj, [torch.zeros(3)], [0.0])


# ------------------------------------------------------------------------------------------ plots


def _png(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_pngs_with_labels_a_legend_and_a_colorbar(tmp_path) -> None:
    fig = plot_line(
        tmp_path / "figs" / "line.png",
        ALPHAS,
        {"adamw": [1, 2, 3, 2, 1], "sam": [1, 1.5, 2, 1.5, 1]},
        xlabel="α",
        title="loss along a filter-normalised direction",
    )
    assert _png(tmp_path / "figs" / "line.png")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "α" and ax.get_ylabel() == "loss" and ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["adamw", "sam"]
    single = plot_line(tmp_path / "one.png", [0, 1], {"only": [1, 2]}, xlabel="a", title="t")
    assert single.axes[0].get_legend() is None

    grid = [[a * a + b * b for a in ALPHAS] for b in BETAS]
    fig = plot_plane(tmp_path / "plane.png", ALPHAS, BETAS, grid, title="loss plane")
    assert _png(tmp_path / "plane.png")
    main, bar = fig.axes  # the colorbar is an axes of its own
    assert main.get_xlabel() and main.get_ylabel() and main.get_title() == "loss plane"
    assert bar.get_ylabel() == "loss"
    with pytest.raises(FlatlmError, match="len\\(betas\\)"):
        plot_plane(tmp_path / "bad.png", ALPHAS, BETAS, grid[:2], title="t")
