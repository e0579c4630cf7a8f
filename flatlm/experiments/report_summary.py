"""Per-optimizer summaries of an ablation: group the cells, choose each optimizer's best lr, pair with the baseline.

Works on the rows of :func:`flatlm.experiments.report.cell_rows` (plain dicts, ``_values`` holding the cell's axis
values). The rules are stated in :mod:`flatlm.experiments.report`'s docstring and in every report's header.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flatlm.experiments.report_cells import ADVERSARIAL_SUFFIX
from flatlm.experiments.stats import Interval, PairedDifference, paired_difference, sorted_seeds, t_interval

LR_KEY = "optim.lr"
REPLICATE_KEYS = ("seed", "data.seed")
"""Axes whose values are repetitions of one experiment, not different experiments: the pairing unit."""
OPTIMIZER_PREFIXES = ("optim.", "sam.")
"""Axes that belong to the optimizer (its variant); any other axis (``data.format``) is context, and an optimizer is
compared only with the baseline of the same context."""
METRIC_TEXT = {
    "final_val_loss": "final validation loss (at the last evaluation, not the minimum over training)",
    "final_train_loss": "final training loss (mean of the last 5% of steps; no cell evaluated)",
}
AVERAGED = ("best_val_loss", "final_train_loss", "tokens_per_s", "peak_mem_bytes", "optim_state_bytes", "wall_s")
"""Columns shown per optimizer as their mean over seeds at its best lr (no interval: they are not the question)."""


@dataclass
class LrPoint:
    """One learning rate of one optimizer: its cells and the metric of each finished seed."""

    lr: float | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    values: dict[Hashable, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every cell at this lr finished with a finite metric (a diverged seed disqualifies the lr)."""
        return len(self.values) == len(self.rows)

    @property
    def interval(self) -> Interval | None:
        return t_interval(list(self.values.values()))


@dataclass
class GroupSummary:
    """One optimizer (variant) of the grid: its lr curve, its best lr and the comparison with the baseline."""

    label: str
    optimizer: str
    context: tuple[tuple[str, Any], ...]
    """The axis values that are not the optimizer's (``data.format``): what the baseline must share."""
    variant: tuple[tuple[str, Any], ...] = ()
    """Every axis value but the lr and the seeds (the optimizer's own, like ``rho``, and the context)."""
    points: list[LrPoint] = field(default_factory=list)
    best: LrPoint | None = None
    baseline: str | None = None
    """Label of the baseline group compared against; equal to ``label`` for the baseline itself."""
    paired: PairedDifference | None = None
    means: dict[str, float | None] = field(default_factory=dict)
    extras: dict[str, Interval | None] = field(default_factory=dict)
    max_steps: tuple[int, ...] = ()
    steps_done: tuple[int, ...] = ()
    """The steps the group's done cells actually ran (what the budget text reports; the unfinished ones are listed
    in the report's own section)."""
    flops: tuple[float, ...] = ()
    """FLOPs its done cells actually spent (flops_per_step x steps_done)."""

    @property
    def best_at_edge(self) -> bool:
        """The best lr is the smallest or largest of several tried: the grid may not bracket the optimum."""
        lrs = [p.lr for p in self.points if p.lr is not None]
        return self.best is not None and len(lrs) > 1 and self.best.lr in (min(lrs), max(lrs))

    @property
    def is_baseline(self) -> bool:
        return self.baseline == self.label

    def to_json(self) -> dict[str, Any]:
        """The summary as results.json holds it (the same numbers as the per-optimizer table)."""
        best = self.best
        return {
            "optimizer": self.label,
            "optimizer_name": self.optimizer,
            "best_lr": best.lr if best else None,
            "best_lr_complete": best.complete if best else None,
            "best_lr_at_edge": self.best_at_edge,
            "seeds": [repr(s) for s in sorted_seeds(set(best.values))] if best else [],
            "metric": _interval_json(best.interval if best else None),
            "vs_baseline": None
            if self.paired is None or self.is_baseline
            else _paired_json(self.baseline, self.paired),
            "is_baseline": self.is_baseline,
            "means_at_best_lr": self.means,
            "extras": {k: _interval_json(v) for k, v in self.extras.items()},
            "lr_curve": [
                {"lr": p.lr, "complete": p.complete, **_interval_json(p.interval), "cells": [r["name"] for r in p.rows]}
                for p in self.points
            ],
            "max_steps": list(self.max_steps),
            "steps_done": list(self.steps_done),
        }


def _interval_json(interval: Interval | None) -> dict[str, Any]:
    if interval is None:
        return {"mean": None, "n": 0, "half_width": None, "low": None, "high": None}
    return {
        "mean": interval.mean,
        "n": interval.n,
        "half_width": interval.half_width,
        "low": interval.low,
        "high": interval.high,
    }


def _paired_json(baseline: str | None, paired: PairedDifference) -> dict[str, Any]:
    interval = paired.interval
    return {
        "baseline": baseline,
        "seeds": [repr(s) for s in paired.seeds],
        "differences": list(paired.differences),
        **_interval_json(interval),
        "excludes_zero": interval.excludes_zero() if interval else None,
    }


def replicate(row: dict[str, Any]) -> Hashable:
    """The seed identity of a cell: its seed-axis values (one value, or a tuple of several), else its config seed."""
    values = row["_values"]
    found = tuple(values[k] for k in REPLICATE_KEYS if k in values)
    if not found:
        return row.get("seed")
    return found[0] if len(found) == 1 else found


METHOD_PREFIXES = ("train.adversarial.",)
"""Axes that make the method itself (adversarial training: its ``optimizer`` is ``adamw+adv``, see
``report_cells.method_name``), not the optimizer's variant nor a context, so ``adamw+adv`` is compared with plain
AdamW. A row with adversarial training off drops them (its epsilon is not an experiment); an adversarial row keeps
those that take several values among the grid's adversarial rows (``adamw+adv steps=4``, see method_axes)."""


def is_adversarial(row: dict[str, Any]) -> bool:
    """The row trains adversarially: its method name is ``<optimizer>+adv`` (train.adversarial.steps > 0)."""
    return str(row.get("optimizer") or "").endswith(ADVERSARIAL_SUFFIX)


def method_axes(rows: Sequence[dict[str, Any]]) -> frozenset[str]:
    """The adversarial axes with more than one value among the adversarial rows: part of each one's identity (a
    grid sweeping ``train.adversarial.steps: [0, 2, 4]`` has two adversarial methods, steps=2 and steps=4)."""
    seen: dict[str, set[str]] = {}
    for row in rows:
        if is_adversarial(row):
            for key, value in row["_values"].items():
                if key.startswith(METHOD_PREFIXES):
                    seen.setdefault(key, set()).add(repr(value))
    return frozenset(k for k, values in seen.items() if len(values) > 1)


def _group_key(row: dict[str, Any], method: frozenset[str] = frozenset()) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """The optimizer (method) name and its variant: every axis value but the lr, the seeds and the adversarial axes,
    of which an adversarial row keeps those in ``method`` (method_axes)."""
    kept = method if is_adversarial(row) else frozenset()
    variant = tuple(
        (k, v)
        for k, v in row["_values"].items()
        if k not in REPLICATE_KEYS
        and k not in (LR_KEY, "optim.name")
        and (not k.startswith(METHOD_PREFIXES) or k in kept)
    )
    return str(row.get("optimizer") or row["_values"].get("optim.name") or "?"), variant


def _label(optimizer: str, variant: tuple[tuple[str, Any], ...]) -> str:
    """``sam rho=0.05``, ``adamw+adv steps=4`` (optimizer and method settings by their last name) or ``adamw
    data.format=chat``."""
    parts = [optimizer]
    for key, value in variant:
        short = key.rsplit(".", 1)[-1] if key.startswith((*OPTIMIZER_PREFIXES, *METHOD_PREFIXES)) else key
        parts.append(f"{short}={value}")
    return " ".join(parts)


def _metric_value(row: dict[str, Any], metric: str) -> float | None:
    value = row.get(metric)
    if row.get("status") != "done" or value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def choose_metric(rows: Sequence[dict[str, Any]]) -> str:
    """The final validation loss when any cell evaluated, else the final training loss.

    Final, not best: the minimum over training rewards an lr that reached a low loss early and then blew up (its
    run ends worse than it started to look); what a run delivers is where it ends. The best is still a column.
    """
    if any(r.get("final_val_loss") is not None for r in rows):
        return "final_val_loss"
    return "final_train_loss"


def summarize(
    rows: Sequence[dict[str, Any]], baseline: str, extra_columns: Sequence[Any] = ()
) -> tuple[list[GroupSummary], str]:
    """Group rows into optimizers, choose each one's best lr, pair each with its baseline; baseline groups first."""
    metric = choose_metric(rows)
    groups: dict[tuple[str, tuple[tuple[str, Any], ...]], GroupSummary] = {}
    method = method_axes(rows)
    for row in rows:
        optimizer, variant = _group_key(row, method)
        context = tuple((k, v) for k, v in variant if not k.startswith((*OPTIMIZER_PREFIXES, *METHOD_PREFIXES)))
        group = groups.setdefault(
            (optimizer, variant), GroupSummary(_label(optimizer, variant), optimizer, context, variant)
        )
        point = next((p for p in group.points if p.lr == row.get("lr")), None)
        if point is None:
            point = LrPoint(row.get("lr"))
            group.points.append(point)
        point.rows.append(row)
        value = _metric_value(row, metric)
        if value is not None:
            point.values[replicate(row)] = value
    for group in groups.values():
        group.points.sort(key=lambda p: (p.lr is None, p.lr or 0.0))
        group.best = _best_point(group.points)
        group.max_steps = tuple(
            sorted({int(r["max_steps"]) for p in group.points for r in p.rows if r.get("max_steps")})
        )
        done_rows = [r for p in group.points for r in p.rows if r.get("status") == "done"]
        group.steps_done = tuple(sorted({int(r["steps_done"]) for r in done_rows if r.get("steps_done") is not None}))
        group.flops = tuple(sorted({float(r["flops"]) for r in done_rows if r.get("flops")}))
        if group.best is not None:
            done = [r for r in group.best.rows if _metric_value(r, metric) is not None]
            group.means = {k: _mean([r.get(k) for r in done]) for k in AVERAGED}
            group.extras = {c.key: t_interval(_finite([r.get(c.key) for r in done])) for c in extra_columns}
    ordered = sorted(groups.values(), key=lambda g: g.optimizer != baseline)
    for group in ordered:
        partner = _baseline_for(group, ordered, baseline)
        if partner is None:
            continue
        group.baseline = partner.label
        if partner is not group and group.best is not None and partner.best is not None:
            group.paired = paired_difference(group.best.values, partner.best.values)
    return ordered, metric


def _best_point(points: list[LrPoint]) -> LrPoint | None:
    """Lowest mean metric among complete lrs; among lrs with any finished seed when none is complete."""
    for candidates in ([p for p in points if p.complete and p.values], [p for p in points if p.values]):
        if candidates:
            return min(candidates, key=lambda p: p.interval.mean)  # type: ignore[union-attr]
    return None


def _baseline_for(group: GroupSummary, groups: list[GroupSummary], baseline: str) -> GroupSummary | None:
    """The baseline group of the same context: the plain one (no axes of its own), else its best-tuned variant.

    Against the best baseline variant (lowest mean at its best lr), so that tuning the baseline's own axes (AdamW's
    betas) makes the comparison harder, never easier.
    """
    matches = [g for g in groups if g.optimizer == baseline and g.context == group.context]
    plain = [g for g in matches if g.variant == g.context]
    if plain or not matches:
        return (plain or [None])[0]
    return min(matches, key=lambda g: (g.best is None, g.best.interval.mean if g.best and g.best.interval else 0.0))


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean(values: Sequence[Any]) -> float | None:
    finite = _finite(values)
    return sum(finite) / len(finite) if finite else None


def budget_text(grid: dict[str, Any], groups: Sequence[GroupSummary]) -> str:
    """What was held equal: the same number of steps, or the same FLOPs, from the steps the done cells actually ran
    (one that ran longer than this grid asks shows as it is, not as its max_steps says)."""
    steps = {g.label: g.steps_done for g in groups}
    all_steps = {s for v in steps.values() for s in v}
    per_group = "; ".join(f"{label} {'/'.join(map(str, s)) or '?'}" for label, s in steps.items())
    if grid.get("budget", "steps") == "flops":
        flops = sorted({f for g in groups for f in g.flops})
        if not flops:
            spread = "FLOPs per cell unknown (no cell done)"
        elif flops[-1] <= 1.01 * flops[0]:
            spread = f"≈ {flops[-1]:.3g} FLOPs per cell"
        else:
            spread = f"{flops[0]:.3g} to {flops[-1]:.3g} FLOPs per cell (the cells ran unequal compute)"
        return f"equal compute (`budget=flops`): {spread}; steps done per cell: {per_group}"
    if len(all_steps) == 1:
        return f"equal steps (`budget=steps`): every cell {next(iter(all_steps))} steps"
    return f"equal steps (`budget=steps`); steps done per cell: {per_group}"
