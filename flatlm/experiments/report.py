"""The ablation report: one row per cell, one summary per optimizer, plots; rebuilt from the run directories alone.

``write_report(OUTPUT_DIR)`` reads ``grid.json`` and every ``cells/<name>/`` (the contract is in ``flatlm ablate``'s
``grid.json`` and each cell's ``cell.json``, ``config.yaml``, ``metrics.jsonl``, ``eval.jsonl``) and writes
``report.md``, ``results.csv`` and ``results.json`` (the same per-cell numbers) and the PNGs of
:mod:`flatlm.experiments.report_plots`. It only reads files: no torch, no training, so ``flatlm report`` runs in a
second and a cell that is pending, running or failed is a row with its status and empty numbers, never an error.

How the answer is chosen (also stated in every report):

- An *optimizer* is ``optim.name`` plus any axis other than the learning rate and the seeds (``sam rho=0.1`` and
  ``sam rho=0.05`` are two); the *seeds* are the values of the ``seed`` / ``data.seed`` axes.
- Its best learning rate has the lowest mean, over seeds, of the cells' best validation loss (final training loss
  when no cell evaluated). A learning rate competes only when every one of its cells finished with a finite value,
  so a rate that diverged at one seed is not crowned on the seeds that survived; when none qualifies, the best of
  what finished is shown, marked incomplete.
- The comparison with the baseline (``grid.json`` ``baseline``, AdamW unless named) pairs the two best learning
  rates seed by seed (:mod:`flatlm.experiments.stats`).

Adding measurements (the flatness issue's sharpness, Hessian eigenvalues, corrupted-text loss): a *provider* maps a
cell directory to a dict of columns, and declares those columns once, with their formatting::

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
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from flatlm.errors import FlatlmError
from flatlm.experiments import report_summary as summary
from flatlm.experiments.report_summary import GroupSummary
from flatlm.experiments.stats import Interval, tail_mean

LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class Column:
    """One per-cell measurement: its key in the row, its table header and how it is formatted (see ``FORMATS``)."""

    key: str
    header: str
    kind: str = "float"
    summary: bool = False
    """Also aggregated per optimizer (mean ± interval at its best learning rate) in the per-optimizer table."""


# Formatting of every kind of value, in one place: units live in the headers of COLUMNS, the numbers here.
FORMATS: dict[str, Callable[[Any], str]] = {
    "text": str,
    "int": lambda v: f"{int(v):d}",
    "loss": lambda v: f"{v:.4f}",
    "ppl": lambda v: f"{v:.2f}" if v < 1e5 else f"{v:.3g}",
    "lr": lambda v: f"{v:.3g}",
    "rate": lambda v: f"{v:,.0f}",
    "seconds": lambda v: f"{v:,.1f}",
    "bytes": lambda v: f"{v / 2**20:,.1f}",
    "flops": lambda v: f"{v:.3g}",
    "float": lambda v: f"{v:.4g}",
}
UNITS = {"rate": "tokens/s", "seconds": "s", "bytes": "MiB"}


def format_value(kind: str, value: Any) -> str:
    """``value`` as the report prints it; empty for a missing or non-finite number."""
    if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return FORMATS[kind](value)


def cell_text(column: Column, row: dict[str, Any]) -> str:
    """A per-cell table entry: the formatted value, and steps as ``done/max`` (what a reader checks first)."""
    if column.key == "steps_done":
        done, most = format_value("int", row.get("steps_done")) or "0", format_value("int", row.get("max_steps"))
        return f"{done}/{most}" if most else done
    return format_value(column.kind, row.get(column.key))


def header(column: Column) -> str:
    """The table header, with the unit of its kind."""
    unit = UNITS.get(column.kind)
    return f"{column.header} ({unit})" if unit else column.header


Reader = Callable[[Path], dict[str, Any]]


@dataclass(frozen=True)
class Provider:
    """A named reader of some columns of a cell directory."""

    name: str
    read: Reader
    columns: tuple[Column, ...]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a jsonl file; a torn last line (a cell still writing) is skipped, a missing file is empty."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def train_records(cell_dir: Path) -> list[dict[str, Any]]:
    """The step records of ``metrics.jsonl`` in step order (eval records kept apart in ``eval.jsonl``)."""
    records = [r for r in read_jsonl(cell_dir / "metrics.jsonl") if "step" in r and "loss" in r and not r.get("eval")]
    return sorted(records, key=lambda r: r["step"])


def config_columns(tree: dict[str, Any]) -> dict[str, Any]:
    """The run's optimizer, hyperparameters, schedule and seed from a resolved config tree."""
    optim = tree.get("optim") or {}
    schedule = tree.get("schedule") or {}
    out: dict[str, Any] = {}
    if "name" in optim:
        out["optimizer"] = optim["name"]
    if "lr" in optim:
        out["lr"] = float(optim["lr"])
    hparams = dict(optim.get("hparams") or {})
    if "weight_decay" in optim:
        hparams = {"weight_decay": optim["weight_decay"], **hparams}
    if optim:
        out["hparams"] = json.dumps(hparams, sort_keys=False, separators=(", ", "="))[1:-1].replace('"', "")
    if schedule:
        out["schedule"] = _schedule_text(schedule)
    if "seed" in tree:
        out["seed"] = tree["seed"]
    return out


def _schedule_text(schedule: dict[str, Any]) -> str:
    """``cosine, warmup 10%`` or ``wsd, warmup 20 steps, decay 20%``: what decides the lr curve, briefly."""
    parts = [str(schedule.get("name", "?"))]
    if schedule.get("warmup_fraction") is not None:
        parts.append(f"warmup {schedule['warmup_fraction']:.0%}")
    elif schedule.get("warmup_steps") is not None:
        parts.append(f"warmup {schedule['warmup_steps']} steps")
    if schedule.get("name") == "wsd" and schedule.get("decay_fraction") is not None:
        parts.append(f"decay {schedule['decay_fraction']:.0%}")
    return ", ".join(parts)


def read_cell_json(cell_dir: Path) -> dict[str, Any]:
    """Status, attempts, wall time and budget of the cell process (``cell.json``); a cell never started is pending."""
    cell = _read_json(cell_dir / "cell.json")
    out: dict[str, Any] = {"status": cell.get("status", "pending")}
    for key in ("returncode", "attempts", "wall_s", "max_steps", "flops_per_step"):
        if cell.get(key) is not None:
            out[key] = cell[key]
    return out


def read_config(cell_dir: Path) -> dict[str, Any]:
    """The resolved config the cell ran with (``config.yaml``)."""
    try:
        tree = yaml.safe_load((cell_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return config_columns(tree) if isinstance(tree, dict) else {}


def read_train_metrics(cell_dir: Path) -> dict[str, Any]:
    """Final training loss (mean of the last 5% of steps), throughput without the first step, memory, state size."""
    records = train_records(cell_dir)
    if not records:
        return {}
    out: dict[str, Any] = {"steps_done": int(records[-1]["step"])}
    out["final_train_loss"] = tail_mean([float(r["loss"]) for r in records])
    # The first step includes warm-up (allocation, compile): a mean over it measures start-up, not the optimizer.
    rates = [float(r["tokens_per_s"]) for r in records[1:] or records if r.get("tokens_per_s") is not None]
    if rates:
        out["tokens_per_s"] = sum(rates) / len(rates)
    for key in ("peak_mem_bytes", "optim_state_bytes"):
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            out[key] = max(values)
    return out


def read_validation(cell_dir: Path) -> dict[str, Any]:
    """Best and final validation loss and perplexity (``eval.jsonl``)."""
    evals = [r for r in read_jsonl(cell_dir / "eval.jsonl") if r.get("val_loss") is not None]
    evals.sort(key=lambda r: r.get("step", 0))
    finite = [r for r in evals if math.isfinite(float(r["val_loss"]))]
    if not evals:
        return {}
    out: dict[str, Any] = {"final_val_loss": float(evals[-1]["val_loss"]), "final_val_ppl": _ppl(evals[-1])}
    if finite:
        best = min(finite, key=lambda r: float(r["val_loss"]))
        out["best_val_loss"], out["best_val_ppl"] = float(best["val_loss"]), _ppl(best)
    return out


def _ppl(record: dict[str, Any]) -> float:
    if record.get("val_ppl") is not None:
        return float(record["val_ppl"])
    loss = float(record["val_loss"])
    return math.exp(loss) if loss < 700 else math.inf


PROVIDERS: list[Provider] = [
    Provider(
        "config",
        read_config,
        (
            Column("optimizer", "optimizer", "text"),
            Column("lr", "lr", "lr"),
            Column("hparams", "hyperparameters", "text"),
            Column("schedule", "schedule", "text"),
            Column("seed", "seed", "text"),
        ),
    ),
    Provider(
        "train",
        read_train_metrics,
        (
            Column("final_train_loss", "train loss (last 5%)", "loss"),
            Column("tokens_per_s", "throughput", "rate"),
            Column("peak_mem_bytes", "peak mem", "bytes"),
            Column("optim_state_bytes", "optim state", "bytes"),
            Column("steps_done", "steps done/max", "int"),
        ),
    ),
    Provider(
        "validation",
        read_validation,
        (
            Column("best_val_loss", "best val loss", "loss"),
            Column("best_val_ppl", "best val ppl", "ppl"),
            Column("final_val_loss", "final val loss", "loss"),
            Column("final_val_ppl", "final val ppl", "ppl"),
        ),
    ),
    Provider(
        "cell",
        read_cell_json,
        (
            Column("wall_s", "wall", "seconds"),
            Column("max_steps", "max steps", "int"),
            Column("flops", "FLOPs", "flops"),
            Column("status", "status", "text"),
            Column("attempts", "attempts", "int"),
        ),
    ),
]

# Per-cell table order (results.csv adds every other provider column after these); unknown keys are skipped.
CELL_TABLE = (
    "name", "optimizer", "lr", "hparams", "schedule", "seed", "final_train_loss", "best_val_loss", "best_val_ppl",
    "final_val_loss", "final_val_ppl", "tokens_per_s", "wall_s", "peak_mem_bytes", "optim_state_bytes",
    "steps_done", "flops", "status",
)  # fmt: skip
NAME_COLUMN = Column("name", "cell", "text")


def columns(providers: Iterable[Provider] = ()) -> list[Column]:
    """Every column of a row, in CSV order: the cell name, then each provider's."""
    found = [NAME_COLUMN] + [c for p in providers or PROVIDERS for c in p.columns]
    return list({c.key: c for c in found}.values())


def load_grid(output_dir: Path) -> dict[str, Any]:
    """``grid.json`` of an ablation directory, or the one-line error saying how to make one."""
    path = output_dir / "grid.json"
    if not path.is_file():
        raise FlatlmError(
            f"no grid.json in {output_dir}: it is not an ablation directory; run `flatlm ablate GRID.yaml "
            f"output_dir={output_dir}` first, or name the directory that holds grid.json"
        )
    grid = _read_json(path)
    if not isinstance(grid.get("cells"), list):
        raise FlatlmError(f"{path} is not a readable grid (no 'cells' list): rerun `flatlm ablate` to rewrite it")
    return grid


def _grid_defaults(grid: dict[str, Any], cell: dict[str, Any]) -> dict[str, Any]:
    """What the grid says of a cell before it ran: its config columns from base + overrides, its budget."""
    tree = json.loads(json.dumps(grid.get("base") or {}))
    for dotted, value in (cell.get("overrides") or {}).items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict | None) else {}
        node[leaf] = value
    out = config_columns(tree)
    for key in ("max_steps", "flops_per_step"):
        if cell.get(key) is not None:
            out[key] = cell[key]
    return out


def cell_rows(output_dir: Path, grid: dict[str, Any], providers: Iterable[Provider] = ()) -> list[dict[str, Any]]:
    """One row per grid cell, in grid order: every column, None where the cell has no value yet."""
    keys = [c.key for c in columns(providers)]
    rows = []
    for cell in grid["cells"]:
        cell_dir = output_dir / "cells" / cell["name"]
        row: dict[str, Any] = {"name": cell["name"], **_grid_defaults(grid, cell)}
        for provider in providers or PROVIDERS:
            row.update({k: v for k, v in provider.read(cell_dir).items() if v is not None})
        if row.get("flops_per_step") is not None and row.get("steps_done") is not None:
            row["flops"] = float(row["flops_per_step"]) * int(row["steps_done"])
        rows.append({k: _finite(row.get(k)) for k in keys} | {"_values": cell.get("values") or {}})
    return rows


def _finite(value: Any) -> Any:
    """NaN and infinity become None: strict JSON has no NaN, and an empty cell reads better than 'nan'."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def write_report(output_dir: Path, providers: Iterable[Provider] = ()) -> Path:
    """Read the grid's cells and write report.md, results.csv, results.json and the PNGs; return report.md's path."""
    from flatlm.experiments import report_plots  # matplotlib only when writing

    output_dir = Path(output_dir)
    providers = list(providers or PROVIDERS)
    grid = load_grid(output_dir)
    cols = columns(providers)
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
        cell = _read_json(cell_dir / "cell.json")
        tail = cell.get("log_tail") or _log_tail(cell_dir / "train.log")
        parts += [f"### `{row['name']}`: {row['status']} (return code {cell.get('returncode')})", ""]
        fence = "~~~~" if "```" in tail else "```"
        parts += [fence, tail.rstrip() or "(no log)", fence, ""]
    return parts


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
