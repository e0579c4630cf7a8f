"""Reading an ablation's cell directories into rows: the column providers and the formatting of every column.

A *provider* maps a cell directory to a dict of columns and declares those columns (:class:`Column`: key, header,
kind). Formatting lives in one place, ``FORMATS`` (numbers by kind) and ``UNITS`` (the unit a kind's header names).
Every reader tolerates missing and partial files: a cell that is pending, running or failed still gives a row. How
to add measurements is in :mod:`flatlm.experiments.report`'s docstring.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flatlm.errors import FlatlmError
from flatlm.experiments.stats import tail_mean


@dataclass(frozen=True)
class Column:
    """One per-cell measurement: its key in the row, its table header and how it is formatted (see ``FORMATS``)."""

    key: str
    header: str
    kind: str = "float"
    summary: bool = False
    """Also aggregated per optimizer (mean ± interval at its best learning rate) in the per-optimizer table."""


# Formatting of every kind of value, in one place: the numbers here, the unit each kind's header names in UNITS.
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
    try:
        return FORMATS.get(kind, str)(value)
    except (TypeError, ValueError):  # a provider's odd value (text in a number column) is shown, not fatal
        return str(value)


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
    discover: Callable[[Sequence[Path]], tuple[Column, ...]] | None = None
    """Columns that depend on the data (one per SAM radius measured), found in the grid's cell directories: only
    those some cell has appear (:mod:`flatlm.experiments.report_flatness`)."""


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


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or ``{}`` when it is missing, torn or not an object."""
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
        out["optimizer"] = method_name(str(optim["name"]), tree)
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


ADVERSARIAL_SUFFIX = "+adv"


def method_name(optimizer: str, tree: dict[str, Any]) -> str:
    """The optimizer as the report groups it: ``adamw+adv`` for adversarial training (train.adversarial.steps > 0,
    a method of its own compared with plain AdamW), else the optimizer's name."""
    adversarial = (tree.get("train") or {}).get("adversarial") or {}
    try:
        steps = int(adversarial.get("steps") or 0) if isinstance(adversarial, dict) else 0
    except (TypeError, ValueError):
        steps = 0
    return optimizer + ADVERSARIAL_SUFFIX if steps > 0 else optimizer


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
    cell = read_json(cell_dir / "cell.json")
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

NAME_COLUMN = Column("name", "cell", "text")


def columns(providers: Iterable[Provider] = (), cell_dirs: Sequence[Path] = ()) -> list[Column]:
    """Every column of a row, in CSV order: the cell name, then each provider's (its discovered ones from
    ``cell_dirs`` after its fixed ones)."""
    found = [NAME_COLUMN]
    for provider in providers or PROVIDERS:
        found += provider.columns
        if provider.discover is not None:
            found += provider.discover(cell_dirs)
    return list({c.key: c for c in found}.values())


def cell_dirs(output_dir: Path, grid: dict[str, Any]) -> list[Path]:
    """The directories of the grid's cells, in grid order."""
    return [output_dir / "cells" / cell["name"] for cell in grid["cells"]]


def load_grid(output_dir: Path) -> dict[str, Any]:
    """``grid.json`` of an ablation directory, or the one-line error saying how to make one."""
    path = output_dir / "grid.json"
    if not path.is_file():
        raise FlatlmError(
            f"no grid.json in {output_dir}: it is not an ablation directory; run `flatlm ablate GRID.yaml "
            f"output_dir={output_dir}` first, or name the directory that holds grid.json"
        )
    grid = read_json(path)
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
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    out = config_columns(tree)
    for key in ("max_steps", "flops_per_step"):
        if cell.get(key) is not None:
            out[key] = cell[key]
    return out


def cell_rows(output_dir: Path, grid: dict[str, Any], providers: Iterable[Provider] = ()) -> list[dict[str, Any]]:
    """One row per grid cell, in grid order: every column, None where the cell has no value yet."""
    keys = [c.key for c in columns(providers, cell_dirs(output_dir, grid))]
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
