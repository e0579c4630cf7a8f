"""PNG figures of loss landscapes (matplotlib's Agg canvas; no pyplot, no global figure state).

Every figure has axis labels and a title; a line plot with several curves has a legend; a plane has filled
contours, contour lines, a colorbar and a marker at the weights themselves (0, 0). Each function writes the
file (creating its folder) and returns the :class:`~matplotlib.figure.Figure`, for tests to inspect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flatlm.errors import FlatlmError


def _save(fig: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)


def plot_line(
    path: str | Path,
    alphas: Sequence[float],
    losses: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    title: str,
) -> Figure:
    """One curve of loss against ``alphas`` per label in ``losses``."""
    if not losses:
        raise FlatlmError("plot_line got no curves; pass losses as {label: [loss per alpha]}")
    for label, ys in losses.items():
        if len(ys) != len(alphas):
            raise FlatlmError(f"curve '{label}' has {len(ys)} losses for {len(alphas)} alphas; pass one per alpha")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, ys in losses.items():
        ax.plot(list(alphas), list(ys), marker=".", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(losses) > 1:
        ax.legend()
    _save(fig, path)
    return fig


def plot_plane(
    path: str | Path,
    alphas: Sequence[float],
    betas: Sequence[float],
    losses: Sequence[Sequence[float]],
    *,
    title: str,
) -> Figure:
    """Filled contours of ``losses[j][i]`` = L(w + alphas[i] d1 + betas[j] d2), with lines and a colorbar."""
    if len(losses) != len(betas) or any(len(row) != len(alphas) for row in losses):
        raise FlatlmError(
            f"plot_plane needs losses shaped [len(betas)={len(betas)}][len(alphas)={len(alphas)}], as plane() returns"
        )
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.add_subplot()
    z = [list(row) for row in losses]
    filled = ax.contourf(list(alphas), list(betas), z, levels=20, cmap="viridis")
    ax.contour(list(alphas), list(betas), z, levels=10, colors="white", linewidths=0.5, alpha=0.7)
    fig.colorbar(filled, ax=ax, label="loss")
    ax.plot([0.0], [0.0], marker="*", color="red", markersize=12, linestyle="none", label="w")
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_title(title)
    ax.legend(loc="upper right")
    _save(fig, path)
    return fig
