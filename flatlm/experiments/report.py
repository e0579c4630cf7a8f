"""The ablation report: one row per cell, one summary per optimizer, plots; rebuilt from the run directories alone.

``write_report(OUTPUT_DIR)`` reads ``grid.json`` and every ``cells/<name>/`` (the contract is in ``flatlm ablate``'s
``grid.json`` and each cell's ``cell.json``, ``config.yaml``, ``metrics.jsonl``, ``eval.jsonl``) and writes
``report.md``, ``results.csv`` and ``results.json`` (the same per-cell numbers) and the PNGs of
:mod:`flatlm.experiments.report_plots`. It only reads files: no torch, no training, so ``flatlm report`` runs in a
second and a cell that is pending, running or failed is a row with its status and empty numbers, never an error.

How the answer is chosen (also stated in every report):

- An *optimizer* is ``optim.name`` plus any axis other than the learning rate and the seeds (``sam rho=0.1`` and
  ``sam rho=0.05`` are two); the *seeds* are the values of the ``seed`` / ``data.seed`` axes.
- Its best learning rate has the lowest mean, over seeds, of the cells' final validation loss (at the last
  evaluation, not the minimum over training: an lr that blows up late must not win on its early best; the final
  training loss when no cell evaluated). The best validation loss stays a column. A learning rate competes only
  when every one of its cells finished with a finite value, so a rate that diverged at one seed is not crowned on
  the seeds that survived; when none qualifies, the best of what finished is shown, marked incomplete.
- The comparison with the baseline (``grid.json`` ``baseline``, AdamW unless named) pairs the two best learning
  rates seed by seed (:mod:`flatlm.experiments.stats`), against the baseline of the same context (``data.format``)
  and, when the baseline has axes of its own (AdamW's betas), against its best variant.

Adding measurements (the flatness issue's sharpness, Hessian eigenvalues, corrupted-text loss): a *provider*
(:mod:`flatlm.experiments.report_cells`) maps a cell directory to a dict of columns, and declares those columns once,
with their formatting (``FORMATS`` and ``UNITS`` there, the one place numbers are formatted)::

    def read_flatness(cell_dir: Path) -> dict[str, Any]:
        path = cell_dir / "flatness.json"
        return json.loads(path.read_text()) if path.exists() else {}

    PROVIDERS.append(Provider("flatness", read_flatness, (Column("lambda_max", "λmax", "float", summary=True),)))

Its columns then appear in ``results.csv``, ``results.json`` and the per-cell table; ``summary=True`` also puts them,
as mean ± 95% interval at the optimizer's best learning rate, in the per-optimizer table. A provider returns ``{}``
(or leaves keys out) for a cell without the data; it must never raise for a missing file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flatlm.experiments import report_flatness  # noqa: F401  (registers the flatness columns in PROVIDERS)
from flatlm.experiments import report_summary as summary
from flatlm.experiments.report_cells import (
    PROVIDERS,
    Column,
    Provider,
    cell_dirs,
    cell_rows,
    cell_text,
    columns,
    format_value,
    header,
    load_grid,
    read_json,
    read_jsonl,
    tail_mean,
    train_records,
)
from flatlm.experiments.report_summary import GroupSummary
from flatlm.experiments.stats import Interval

__all__ = [
    "PROVIDERS",
    "Column",
    "Provider",
    "cell_rows",
    "format_value",
    "interval_text",
    "load_grid",
    "read_jsonl",
    "tail_mean",
    "train_records",
    "write_report",
]

LOG_TAIL_LINES = 20

# Per-cell table order (results.csv adds every other provider column after these); unknown keys are skipped.
CELL_TABLE = (
    "name", "optimizer", "lr", "hparams", "schedule", "seed", "final_train_loss", "best_val_loss", "best_val_ppl",
    "final_val_loss", "final_val_ppl", "tokens_per_s", "wall_s", "peak_mem_bytes", "optim_state_bytes",
    "steps_done", "flops", "status",
)  # fmt: skip


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def write_report(output_dir: Path, providers: Iterable[Provider] = ()) -> Path:
    """Read the grid's cells and write report.md, results.csv, results.json and the PNGs; return report.md's path."""
    from flatlm.experiments import report_plots  # matplotlib only when writing

    output_dir = Path(output_dir)
    providers = list(providers or PROVIDERS)
    grid = load_grid(output_dir)
    cols = columns(providers, cell_dirs(output_dir, grid))
    rows = cell_rows(output_dir, grid, providers)
    baseline = str(grid.get("baseline") or "adamw")
    groups, metric = summary.summarize(rows, baseline, [c for c in cols if c.summary])
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    _atomic_write(output_dir / "results.csv", _csv_text(rows, cols))
    results = {
        "version": 1,
        "grid_file": grid.get("grid_file"),
        "fingerprint": grid.get("fingerprint"),
        "budget": grid.get("budget", "steps"),
        "baseline": baseline,
        "selection_metric": metric,
        "written": written,
        "cells": [_public(r) for r in rows],
        "optimizers": [g.to_json() for g in groups],
    }
    _atomic_write(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    plots = report_plots.write_plots(output_dir, groups, metric)
    text = _markdown(output_dir, grid, rows, cols, groups, metric, baseline, written, plots)
    return _atomic_write(output_dir / "report.md", text)


def _csv_text(rows: list[dict[str, Any]], cols: list[Column]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[c.key for c in cols], lineterminator="\n")
    writer.writeheader()
    writer.writerows(_public(r) for r in rows)
    return buffer.getvalue()


def _atomic_write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _table(headers: list[str], lines: list[list[str]]) -> str:
    def clean(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(clean(x) for x in line) + " |" for line in lines]
    return "\n".join(out)


def _markdown(
    output_dir: Path,
    grid: dict[str, Any],
    rows: list[dict[str, Any]],
    cols: list[Column],
    groups: list[GroupSummary],
    metric: str,
    baseline: str,
    written: str,
    plots: dict[str, Path],
) -> str:
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    metric_text = summary.METRIC_TEXT[metric]
    parts = [
        f"# Ablation report: {grid.get('grid_file') or output_dir.name}",
        "",
        f"- **cells**: {len(rows)} ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}); "
        f"fingerprint `{grid.get('fingerprint', '?')}`; axes: {', '.join(f'`{a}`' for a in grid.get('axes', []))}",
        f"- **budget**: {summary.budget_text(grid, groups)}",
        f"- **baseline**: {baseline}",
        f"- **best learning rate**: per optimizer, the lowest mean {metric_text} over seeds; a learning rate "
        "competes only when all its cells finished with a finite value (else marked *incomplete*),",
        "  and *(edge)* when it is the smallest or largest lr tried (the optimum may lie beyond: extend that axis)",
        "- **intervals**: 95% Student-t across seeds; *vs baseline* is the per-seed difference optimizer − baseline "
        "(same seeds, each at its best lr; lower is better), *real* when its interval excludes 0",
        f"- **written**: {written}; rebuild with `flatlm report {output_dir}`",
        "",
        "## Per optimizer (at its best learning rate; costs are means over its seeds there)",
        "",
        _optimizer_table(groups, metric, cols),
        "",
        "## Per cell",
        "",
    ]
    shown = [c for key in CELL_TABLE for c in cols if c.key == key] + [
        c for c in cols if c.key not in CELL_TABLE and c.key not in ("attempts", "max_steps")
    ]
    parts.append(_table([header(c) for c in shown], [[cell_text(c, r) for c in shown] for r in rows]))
    parts += ["", "## Plots", ""]
    for title, path in plots.items():
        parts += [f"![{title}]({path.relative_to(output_dir).as_posix()})", ""]
    parts += _failures(output_dir, rows)
    parts += _analysis_failures(output_dir, rows)
    return "\n".join(parts).rstrip() + "\n"


def _failures(output_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """The section on cells that did not finish: their status, return code and the end of their log."""
    unfinished = [r for r in rows if r["status"] in ("pending", "running")]
    failed = [r for r in rows if r["status"] not in ("done", "pending", "running")]
    if not failed and not unfinished:
        return []
    parts = ["## Cells that did not finish", ""]
    if unfinished:
        parts += ["Not finished yet: " + ", ".join(f"`{r['name']}` ({r['status']})" for r in unfinished), ""]
    for row in failed:
        cell_dir = output_dir / "cells" / row["name"]
        cell = read_json(cell_dir / "cell.json")
        tail = cell.get("log_tail") or _log_tail(cell_dir / "train.log")
        parts += [f"### `{row['name']}`: {row['status']} (return code {cell.get('returncode')})", ""]
        fence = "~~~~" if "```" in tail else "```"
        parts += [fence, tail.rstrip() or "(no log)", fence, ""]
    return parts


def _analysis_failures(output_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """The section on done cells whose analysis (landscape, eval, finetune) failed or was interrupted: the cell stays
    done and compared; its flatness columns stay empty."""
    parts: list[str] = []
    for row in rows:
        if row.get("analysis") in (None, "done"):
            continue
        cell_dir = output_dir / "cells" / row["name"]
        for kind, record in (read_json(cell_dir / "cell.json").get("analysis") or {}).items():
            if not isinstance(record, dict) or record.get("status") in ("done", None):
                continue
            log = str(record.get("log") or f"{kind}.log")
            tail = record.get("log_tail") or _log_tail(cell_dir / log)
            parts += [f"### `{row['name']}`: {kind} {record['status']} (return code {record.get('returncode')}, "
                      f"log `cells/{row['name']}/{log}`)", ""]  # fmt: skip
            fence = "~~~~" if "```" in tail else "```"
            parts += [fence, tail.rstrip() or "(no log)", fence, ""]
    return ["## Analyses that did not finish (the cells are done and compared)", "", *parts] if parts else []


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def interval_text(kind: str, interval: Interval | None, signed: bool = False) -> str:
    """``3.2145 ± 0.0123`` with the value's format; ``3.2145 (n=1)`` without an interval."""
    if interval is None:
        return ""
    mean = format_value(kind, interval.mean)
    if signed and interval.mean >= 0:
        mean = "+" + mean
    if interval.half_width is None:
        return f"{mean} (n=1)"
    return f"{mean} ± {format_value(kind, interval.half_width)}"


def _optimizer_table(groups: list[GroupSummary], metric: str, cols: list[Column]) -> str:
    """Optimizer, best lr, metric mean ± CI, paired difference with the baseline, then cost columns."""
    by_key = {c.key: c for c in cols}
    extras = [c for c in cols if c.summary]
    means = [by_key[k] for k in summary.AVERAGED if k in by_key]
    headers = ["optimizer", "best lr", "seeds", f"{summary.METRIC_TEXT[metric].split(' (')[0]} (mean ± 95% CI)"]
    headers += ["vs baseline (paired diff ± 95% CI)", "interval excludes 0"]
    headers += [header(c) for c in means] + [header(c) for c in extras]
    lines = []
    for group in groups:
        best = group.best
        interval = best.interval if best else None
        lr = format_value("lr", best.lr) if best else ""
        if best is not None and not best.complete:
            lr += " (incomplete)"
        if group.best_at_edge:
            lr += " (edge)"
        line = [group.label, lr, str(interval.n if interval else 0), interval_text("loss", interval)]
        line += _vs_baseline(group)
        line += [format_value(c.kind, group.means.get(c.key)) for c in means]
        line += [interval_text(c.kind, group.extras.get(c.key)) for c in extras]
        lines.append(line)
    return _table(headers, lines)


def _vs_baseline(group: GroupSummary) -> list[str]:
    """The two comparison cells of a group's line."""
    if group.best is None:
        return ["no finished cell", ""]
    if group.is_baseline:
        return ["(baseline)", ""]
    if group.baseline is None:
        return ["no baseline in this context", ""]
    paired = group.paired
    if paired is None or paired.interval is None:
        return ["no shared finished seeds", ""]
    excludes = paired.interval.excludes_zero()
    verdict = "n=1" if excludes is None else ("yes: real" if excludes else "no")
    return [f"{interval_text('loss', paired.interval, signed=True)} vs {group.baseline}", verdict]
