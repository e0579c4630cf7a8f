"""The ablation report's PNGs: loss curves of every cell, the lr-sensitivity curve, the best loss per optimizer,
and (when the cells were analysed) sharpness against robustness gap.

One colour per optimizer and one line style per learning rate throughout, so a reader matches lines across figures;
the seeds of one (optimizer, lr) share a colour and style and one legend entry, so the legend stays as long as the
grid has (optimizer, lr) pairs, not cells. Curves are EMA-smoothed (the raw per-step loss of a small batch is noise
the eye averages badly), and the y range follows the smoothed curves after their first tenth, where the comparison
is, rather than the start-up loss every run shares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from flatlm.experiments.report_cells import train_records
from flatlm.experiments.report_summary import METRIC_TEXT, GroupSummary

LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))
DPI = 120


def ema(values: Sequence[float], span: float) -> np.ndarray:
    """Exponential moving average with ``alpha = 2 / (span + 1)``, started at the first value (no zero bias)."""
    out = np.empty(len(values))
    alpha = 2.0 / (span + 1.0)
    level = float(values[0]) if len(values) else 0.0
    for i, value in enumerate(values):
        level = alpha * float(value) + (1 - alpha) * level if math.isfinite(value) else level
        out[i] = level
    return out


def _colours(groups: Sequence[GroupSummary]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    return {g.label: cmap(i % cmap.N) for i, g in enumerate(groups)}


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def _legend_below(ax: Any, entries: int) -> None:
    if entries:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(3, entries), fontsize=8, frameon=False)


def plot_train_loss(
    output_dir: Path, groups: Sequence[GroupSummary], path: Path, x: str, ceiling: float | None = None
) -> Path:
    """Smoothed training loss of every cell against optimizer step (``x="step"``) or wall-clock (``x="wall"``).

    The y range stops at ``ceiling`` (the initial loss): a diverged cell leaves the top instead of flattening the rest.
    """
    colours = _colours(groups)
    fig, ax = plt.subplots(figsize=(8, 5))
    entries, tops, bottoms = 0, [], []
    for group in groups:
        for index, point in enumerate(group.points):
            label = f"{group.label}, lr={point.lr:.3g}" if point.lr is not None else group.label
            labelled = False
            for row in point.rows:
                records = train_records(output_dir / "cells" / row["name"])
                if not records:
                    continue
                loss = [float(r["loss"]) for r in records]
                if x == "wall":
                    xs = np.cumsum([float(r.get("step_time_s") or 0.0) for r in records])
                else:
                    xs = np.asarray([r["step"] for r in records])
                smooth = ema(loss, span=min(50.0, max(1.0, len(loss) / 20)))
                seeds = len(point.rows)
                text = f"{label} ({seeds} seed{'s' * (seeds > 1)})" if not labelled else None
                ax.plot(xs, smooth, color=colours[group.label], ls=LINE_STYLES[index % len(LINE_STYLES)], lw=1.3,
                        alpha=0.85, label=text)  # fmt: skip
                entries += not labelled
                labelled = True
                after = smooth[len(smooth) // 10 :]
                finite = after[np.isfinite(after)]
                if len(smooth) >= 3 and finite.size:  # a cell that died at step 1 must not set the range
                    tops.append(float(finite.max()))
                    bottoms.append(float(finite.min()))
    if tops:
        low, high = min(bottoms), max(tops)
        if ceiling is not None and high > ceiling:
            high = ceiling
            ax.text(0.99, 0.98, "curves above the initial loss (diverged) leave the top", ha="right", va="top",
                    fontsize=8, transform=ax.transAxes)  # fmt: skip
        pad = 0.05 * (high - low) or 0.05
        ax.set_ylim(low - pad, high + pad)
    else:
        ax.text(0.5, 0.5, "no cell has training records yet", ha="center", transform=ax.transAxes)
    ax.set_xlabel("wall-clock (s, summed step times)" if x == "wall" else "optimizer step")
    ax.set_ylabel("training loss (nats/token, EMA-smoothed)")
    ax.set_title(f"Training loss vs {'wall-clock' if x == 'wall' else 'step'}, every cell")
    ax.grid(alpha=0.3)
    _legend_below(ax, entries)
    return _save(fig, path)


def plot_lr_sensitivity(groups: Sequence[GroupSummary], metric: str, path: Path, ceiling: float | None) -> Path:
    """Metric against learning rate per optimizer (log x): mean over seeds, 95% interval bars, best lr starred.

    A mean above ``ceiling`` (the initial training loss: worse than the untrained model, a diverged lr) is drawn as a
    triangle along the top instead of stretching the axis until the lrs that matter are one flat line.
    """
    colours = _colours(groups)
    fig, ax = plt.subplots(figsize=(8, 5))
    entries = 0
    top = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for group in groups:
        colour = colours[group.label]
        measured = [p for p in group.points if p.lr is not None and p.interval is not None]
        shown = [p for p in measured if ceiling is None or p.interval.mean <= ceiling]  # type: ignore[union-attr]
        above = [p.lr for p in measured if p not in shown]
        lost = [p.lr for p in group.points if p.lr is not None and p.interval is None]
        if shown:
            means = [p.interval.mean for p in shown]  # type: ignore[union-attr]
            errors = [p.interval.half_width or 0.0 for p in shown]  # type: ignore[union-attr]
            ax.errorbar([p.lr for p in shown], means, yerr=errors, color=colour, marker="o", capsize=4, lw=1.5,
                        label=group.label)  # fmt: skip
            incomplete = [(p.lr, m) for p, m in zip(shown, means, strict=True) if not p.complete]
            if incomplete:
                ax.plot(*zip(*incomplete, strict=True), marker="o", ms=11, mfc="none", mec=colour, ls="none")
        elif above or lost:
            ax.errorbar([], [], yerr=[], color=colour, marker="o", label=group.label)  # its legend entry, in order
        entries += bool(shown or above or lost)
        if above:
            ax.plot(above, [0.97] * len(above), marker="^", ms=10, color=colour, ls="none", transform=top)
        if lost:
            ax.plot(lost, [0.97] * len(lost), marker="x", ms=10, mew=2, color=colour, ls="none", transform=top)
        best = group.best
        if best is not None and best in shown:
            star = best.interval.mean  # type: ignore[union-attr]
            ax.plot([best.lr], [star], marker="*", ms=16, color=colour, mec="black", ls="none")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(METRIC_TEXT[metric].split(" (")[0])
    ax.set_title(
        "Learning-rate sensitivity: mean over seeds, 95% t-interval\n"
        "★ best lr   ○ some seeds missing   ▲ above the initial loss (diverged)   × no seed finished",
        fontsize=10,
    )
    ax.grid(alpha=0.3, which="both")
    if not entries:
        ax.text(0.5, 0.5, "no finished cell yet", ha="center", transform=ax.transAxes)
    _legend_below(ax, entries)
    return _save(fig, path)


def plot_best(groups: Sequence[GroupSummary], metric: str, path: Path) -> Path:
    """Each optimizer's metric at its best lr, mean with its 95% interval; the baseline's mean as a dashed line."""
    colours = _colours(groups)
    shown = [g for g in groups if g.best is not None and g.best.interval is not None]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.6 * len(shown) + 1.5)))
    for y, group in enumerate(shown):
        interval = group.best.interval  # type: ignore[union-attr]
        ax.errorbar([interval.mean], [y], xerr=[interval.half_width or 0.0], color=colours[group.label], marker="o",
                    ms=8, capsize=6, lw=2)  # fmt: skip
        note = f"n={interval.n}" + ("" if interval.half_width is not None else ", no interval")
        ax.annotate(note, (interval.mean, y), xytext=(0, 9), textcoords="offset points", ha="center", fontsize=8)
        if group.is_baseline:
            ax.axvline(interval.mean, color=colours[group.label], ls="--", lw=1, alpha=0.7)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([_best_label(g) for g in shown], fontsize=9)
    ax.set_ylim(-0.7, len(shown) - 0.3)
    ax.invert_yaxis()
    ax.set_xlabel(f"{METRIC_TEXT[metric].split(' (')[0]} at the best lr (lower is better)")
    ax.set_title("Best per optimizer: mean over seeds with 95% t-interval (dashed: baseline)", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    if not shown:
        ax.text(0.5, 0.5, "no finished cell yet", ha="center", transform=ax.transAxes)
    return _save(fig, path)


def initial_loss(output_dir: Path, groups: Sequence[GroupSummary]) -> float | None:
    """The median first-step training loss of the cells (about ln(vocab), the untrained model's), plus 10%.

    A loss above it means training made the model worse than at initialisation: the plots treat it as diverged. The
    median, not the maximum, so that one cell that exploded at step 1 does not set it.
    """
    firsts = []
    for group in groups:
        for point in group.points:
            for row in point.rows:
                records = train_records(output_dir / "cells" / row["name"])
                if records and math.isfinite(float(records[0]["loss"])):
                    firsts.append(float(records[0]["loss"]))
    return float(np.median(firsts)) * 1.1 if firsts else None


def _best_label(group: GroupSummary) -> str:
    """``lion\\nlr=0.001\\nvs adamw: +0.863 ± 0.396 (real)``: the separate intervals overlap where seeds differ
    a lot, so the paired verdict is printed beside them."""
    label = f"{group.label}\nlr={group.best.lr:.3g}"  # type: ignore[union-attr]
    paired = group.paired.interval if group.paired is not None and not group.is_baseline else None
    if group.is_baseline:
        label += "\n(baseline)"
    elif paired is not None:
        verdict = {True: "real", False: "within noise", None: "one seed"}[paired.excludes_zero()]
        spread = f" ± {paired.half_width:.3g}" if paired.half_width is not None else ""
        label += f"\npaired vs {group.baseline}: {paired.mean:+.3g}{spread} ({verdict})"
    return label


GAP_KEY = "robustness_gap"
SHARPNESS_PREFIX = "sam_sharpness[rho="


def sharpness_measures(groups: Sequence[GroupSummary]) -> list[tuple[str, str]]:
    """The (column key, axis label) pairs of the sharpness measures the flatness scatter draws, each only when at
    least 2 cells have it and a robustness gap: λmax, and SAM sharpness at the middle radius measured."""
    rows = [r for g in groups for p in g.points for r in p.rows]

    def enough(key: str) -> bool:
        return sum(r.get(key) is not None and r.get(GAP_KEY) is not None for r in rows) >= 2

    out = [("lambda_max", "λmax, the top Hessian eigenvalue")] if enough("lambda_max") else []
    radii = sorted({k for r in rows for k in r if k.startswith(SHARPNESS_PREFIX) and r[k] is not None},
                   key=lambda k: float(k[len(SHARPNESS_PREFIX) : -1]))  # fmt: skip
    if radii:
        middle = radii[(len(radii) - 1) // 2]
        if enough(middle):
            out.append((middle, f"SAM sharpness at ρ={middle[len(SHARPNESS_PREFIX) : -1]} (loss increase)"))
    return out


def plot_flatness_vs_robustness(
    groups: Sequence[GroupSummary], measures: Sequence[tuple[str, str]], path: Path
) -> Path:
    """Sharpness against robustness gap, one point per cell (every lr and seed), one colour per optimizer: does a
    flatter minimum degrade less on corrupted text? One panel per sharpness measure."""
    colours = _colours(groups)
    fig, axes = plt.subplots(1, len(measures), figsize=(6 * len(measures), 4.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], measures, strict=True):
        for group in groups:
            cells = [r for p in group.points for r in p.rows if r.get(key) is not None and r.get(GAP_KEY) is not None]
            if cells:
                ax.scatter([float(r[key]) for r in cells], [float(r[GAP_KEY]) for r in cells], s=36, alpha=0.85,
                           color=colours[group.label], label=f"{group.label} ({len(cells)})")  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("robustness gap (corrupted - clean val loss, nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="optimizer (cells)", title_fontsize=8)
    fig.suptitle("Sharpness vs robustness gap, one point per cell (lower-left: flat and robust)", fontsize=10)
    return _save(fig, path)


def write_plots(output_dir: Path, groups: Sequence[GroupSummary], metric: str) -> dict[str, Path]:
    """Write every figure into ``output_dir``; return {title: path} in the order the report shows them."""
    name = METRIC_TEXT[metric].split(" (")[0]
    ceiling = initial_loss(output_dir, groups)
    step, wall = output_dir / "train_loss_vs_step.png", output_dir / "train_loss_vs_wall.png"
    plots = {
        "training loss vs step": plot_train_loss(output_dir, groups, step, "step", ceiling),
        "training loss vs wall-clock": plot_train_loss(output_dir, groups, wall, "wall", ceiling),
        f"{name} vs learning rate": plot_lr_sensitivity(groups, metric, output_dir / "lr_sensitivity.png", ceiling),
        f"{name} per optimizer": plot_best(groups, metric, output_dir / "best_per_optimizer.png"),
    }
    measures = sharpness_measures(groups)
    if measures:  # at least 2 cells with a sharpness and a robustness gap
        scatter = output_dir / "flatness_vs_robustness.png"
        plots["sharpness vs robustness gap"] = plot_flatness_vs_robustness(groups, measures, scatter)
    return plots
