"""The analysis stage of a grid: what runs after a cell is done, as processes, and when each step counts as done.

A grid's optional ``analysis:`` key maps an analysis kind to the extra arguments of its command::

    analysis:
      landscape: [--batches, "1", --rho, "0.01,0.05,0.1", --no-plane]   # flatlm landscape CELL --out CELL/analysis ...
      eval: [--corrupt, default, --weights-noise, "0.01,0.03", --quantize, "8,4"]   # flatlm eval CELL ...

After a cell's training ends with status done, each kind runs as ``python -m flatlm KIND CELL --out
CELL/analysis ARGS`` in the cell's job slot (its GPUs, or its share of the cores), logged to ``CELL/KIND.log``
beside ``train.log``. A step is done when its JSON (``CELL/analysis/landscape.json``,
``CELL/analysis/robustness.json``; the commands write them atomically) is of the cell's current step (its ``step``
equals the cell's steps done: a cell resumed to a raised max_steps is analysed again) and cell.json records it done
with the same argument list, so a rerun skips it and an interrupted, stale or changed one runs again (a stale JSON
moves aside to ``*.stale`` first). The fine-tune is redone (the old one moved to ``finetune.old-N``) when the cell
step it started from (``CELL/finetune-source.json``) is no longer the cell's. A failed step is recorded in
``cell.json`` (``"analysis": {"eval": {"status": "failed", ...}}``) and shown in the report; it never fails the
grid, and the cell stays done.

The optional ``finetune:`` key (``{config: ../sft-tiny.yaml, overrides: {train.max_steps: 20}}``) adds two steps
after the analyses: ``python -m flatlm.train --config CFG model.init_from=CELL data.tokenizer=CELL
output_dir=CELL/finetune OVERRIDES`` (done when its run reached its max_steps, which ``flatlm train`` resumes
otherwise), then ``flatlm eval CELL/finetune --val-of CELL --out CELL/finetune/analysis`` (the fine-tuned model on
the cell's own validation split), with the grid eval's text-choosing arguments (``--batches``, ``--batch-size``,
``--seed``; ``--data``/``--text-field`` in place of --val-of) so that both measure the same documents: the report's
``forgetting`` column is that clean loss minus the cell's own (only where both JSONs name the same text). A grid
with a fine-tune and no ``eval`` analysis gets a clean ``flatlm eval CELL`` step first (the "before").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatlm.errors import FlatlmError, did_you_mean

CLI_MODULE = "flatlm"
"""``python -m flatlm`` is the ``flatlm`` command from the Python ablate runs under (not a PATH lookup)."""
ANALYSIS_DIR = "analysis"
ANALYSES = {"landscape": "landscape.json", "eval": "robustness.json"}
"""Analysis kind -> the JSON its command writes into ANALYSIS_DIR (present: that step is done)."""
RESERVED = ("--out",)
"""Arguments the stage sets itself (each step's outputs go where the report reads them)."""
FINETUNE_DIR = "finetune"
FINETUNE_SOURCE = "finetune-source.json"
"""In the cell directory: ``{"cell_step": N}``, the cell step the fine-tune started from (CELL/finetune itself must
hold only run files: flatlm train refuses a foreign one)."""
FINETUNE_KEYS = ("config", "overrides")
TEXT_OPTIONS = ("--batches", "--batch-size", "--seed", "--text-field")
"""The grid eval's arguments that choose the text (with ``--data``): the fine-tuned model's eval gets them too, so
forgetting compares the same documents and windows (not --corrupt/--weights-noise/--quantize: their cost)."""


def text_arguments(args: list[str]) -> tuple[list[str], bool]:
    """The text-choosing part of an eval argument list (``--batches 4 --batch-size 8 --seed 1``, ``--data A B``),
    and whether it names ``--data`` (then in place of ``--val-of``)."""
    out: list[str] = []
    has_data = False
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in TEXT_OPTIONS:
            out += [args[i]] if eq else args[i : i + 2]
            i += 1 if eq else 2
            continue
        if name == "--data":
            has_data = True
            files = [value] if eq else []
            i += 1
            while not eq and i < len(args) and not args[i].startswith("-"):
                files.append(args[i])
                i += 1
            out += ["--data", *files]
            continue
        i += 1
    return out, has_data


@dataclass(frozen=True)
class Finetune:
    config: Path
    """The fine-tuning config file (resolved against the grid file's directory)."""
    overrides: dict[str, Any]
    max_steps: int
    """The fine-tuning run's train.max_steps (its step is done when the run got there)."""


@dataclass(frozen=True)
class Step:
    """One process of a cell's analysis stage."""

    kind: str
    """landscape, eval, finetune or finetune-eval: its key in cell.json's ``analysis`` record."""
    command: list[str]
    log: str
    """Its log file, relative to the cell directory."""
    done: Path
    """What exists once it succeeded: its JSON (an analysis) or the fine-tuned run's config (finetune, see done())."""
    max_steps: int | None = None
    """finetune: the run's length (it is done at exactly its max_steps)."""
    source: Path | None = None
    """The run it measures (an analysis: its JSON's ``step`` must be this run's steps done) or fine-tunes from."""
    args: tuple[str, ...] = ()
    """Its settings as cell.json's record keeps them (a changed list: not done)."""


def parse_analysis(raw: Any) -> dict[str, list[str]]:
    """The grid's ``analysis:`` mapping as {kind: argument strings}; every mistake is one FlatlmError."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise FlatlmError(
            f"grid 'analysis' must be a mapping of kind -> argument list (kinds: {', '.join(ANALYSES)}), "
            f"not {type(raw).__name__}"
        )
    out: dict[str, list[str]] = {}
    for kind, args in raw.items():
        kind = str(kind)
        if kind not in ANALYSES:
            raise FlatlmError(
                f"grid analysis kind {kind!r} is unknown{did_you_mean(kind, list(ANALYSES))}; "
                f"valid kinds: {', '.join(ANALYSES)}"
            )
        out[kind] = _arguments(f"analysis {kind!r}", args)
    return out


def _arguments(what: str, args: Any) -> list[str]:
    if args is None:
        return []
    if not isinstance(args, list) or not all(
        isinstance(a, str | int | float) and not isinstance(a, bool) for a in args
    ):
        raise FlatlmError(
            f"grid {what} must be a list of command-line arguments (strings or numbers), e.g. "
            f'[--batches, "1"], not {args!r}'
        )
    text = [str(a) for a in args]
    for arg in text:
        if arg.split("=", 1)[0] in RESERVED:
            raise FlatlmError(f"grid {what} sets {arg.split('=', 1)[0]}; drop it: the stage writes into CELL/analysis")
    return text


def parse_finetune(raw: Any, grid_path: Path) -> Finetune | None:
    """The grid's ``finetune:`` mapping (config relative to the grid file, dotted overrides)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or "config" not in raw:
        raise FlatlmError("grid 'finetune' must be a mapping with a 'config' file, e.g. {config: ../sft-tiny.yaml}")
    unknown = sorted(set(map(str, raw)) - set(FINETUNE_KEYS))
    if unknown:
        raise FlatlmError(f"grid 'finetune' has unknown key {unknown[0]!r}; valid keys: {', '.join(FINETUNE_KEYS)}")
    config = (grid_path.parent / str(raw["config"])).resolve()
    if not config.is_file():
        raise FlatlmError(f"grid finetune config {str(config)!r} does not exist; name an existing YAML file")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise FlatlmError("grid finetune 'overrides' must be a mapping of dotted keys to values")
    from flatlm.config import load_config

    sets = {str(k): v for k, v in overrides.items()}
    try:
        cfg = load_config(config, [f"{k}={_value_text(v)}" for k, v in sets.items()])
    except FlatlmError as exc:
        raise FlatlmError(f"grid finetune config {str(config)!r} is invalid: {exc}") from None
    return Finetune(config, sets, cfg.train.max_steps)


def analysis_command(kind: str, run_dir: Path, out: Path, args: list[str]) -> list[str]:
    """``python -m flatlm KIND RUN_DIR --out OUT ARGS``."""
    return [sys.executable, "-m", CLI_MODULE, kind, str(run_dir), "--out", str(out), *args]


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        import json

        return json.dumps(value, separators=(",", ":"))
    return str(value)


def finetune_command(finetune: Finetune, cell_dir: Path) -> list[str]:
    """``python -m flatlm.train --config CFG model.init_from=CELL data.tokenizer=CELL output_dir=CELL/finetune ...``."""
    sets = {
        "model.init_from": str(cell_dir),
        "data.tokenizer": str(cell_dir),
        "output_dir": str(cell_dir / FINETUNE_DIR),
    }
    sets.update({k: _value_text(v) for k, v in finetune.overrides.items()})
    return [
        sys.executable,
        "-m",
        "flatlm.train",
        "--config",
        str(finetune.config),
        *(f"{k}={v}" for k, v in sets.items()),
    ]


def steps(cell_dir: Path, analysis: dict[str, list[str]], finetune: Finetune | None = None) -> list[Step]:
    """Every step of a cell's analysis stage, in order (done or not)."""
    out = [
        Step(
            kind,
            analysis_command(kind, cell_dir, cell_dir / ANALYSIS_DIR, args),
            f"{kind}.log",
            cell_dir / ANALYSIS_DIR / ANALYSES[kind],
            source=cell_dir,
            args=tuple(args),
        )
        for kind, args in analysis.items()
    ]
    if finetune is not None:
        if "eval" not in analysis:  # the "before" of forgetting: the cell's clean loss, on the text its eval reads
            clean = analysis_command("eval", cell_dir, cell_dir / ANALYSIS_DIR, [])
            out.append(Step("eval", clean, "eval.log", cell_dir / ANALYSIS_DIR / ANALYSES["eval"], source=cell_dir))
        tuned = cell_dir / FINETUNE_DIR
        command = finetune_command(finetune, cell_dir)
        out.append(Step("finetune", command, "finetune.log", tuned, finetune.max_steps, cell_dir, tuple(command[1:])))
        text, has_data = text_arguments(analysis.get("eval", []))
        ev_args = text if has_data else [*text, "--val-of", str(cell_dir)]
        ev = analysis_command("eval", tuned, tuned / ANALYSIS_DIR, ev_args)
        json_path = tuned / ANALYSIS_DIR / ANALYSES["eval"]
        out.append(Step("finetune-eval", ev, "finetune-eval.log", json_path, source=tuned, args=tuple(ev_args)))
    return out


def _finetuned_from(cell_dir: Path) -> int | None:
    from flatlm.experiments.cells import read_json

    step = (read_json(cell_dir / FINETUNE_SOURCE) or {}).get("cell_step")
    return step if isinstance(step, int) else None


def output_current(step: Step) -> bool:
    """Its output is of the model there now: an analysis JSON whose ``step`` is its run's steps done; a fine-tune at
    its max_steps, started from the cell's current step."""
    from flatlm.experiments.cells import read_json, steps_done

    if step.source is None:
        return step.done.is_file()
    if step.kind == "finetune":
        return (
            step.max_steps is not None
            and steps_done(step.done) == step.max_steps
            and _finetuned_from(step.source) == steps_done(step.source)
        )
    found = read_json(step.done)
    return found is not None and found.get("step") == steps_done(step.source)


def is_done(step: Step, record: dict[str, Any] | None = None) -> bool:
    """Its output is current (output_current) and cell.json's record of it says done with the same arguments (a
    record from before the arguments were kept: the same command)."""
    if not isinstance(record, dict) or record.get("status") != "done" or not output_current(step):
        return False
    if "args" in record:
        return list(record["args"]) == list(step.args)
    return list(record.get("command") or [])[1:] == step.command[1:]


def prepare(step: Step) -> None:
    """Before a step runs: a stale output moves aside (a failed rerun must not leave an older model's numbers); a
    fine-tune of another cell step moves to ``finetune.old-<N>`` and the step it starts from is recorded."""
    from flatlm.experiments.cells import steps_done, write_json

    if step.source is None:
        return
    if step.kind != "finetune":
        if step.done.is_file():
            step.done.replace(step.done.with_name(step.done.name + ".stale"))
        return
    current = steps_done(step.source)
    if step.done.exists() and _finetuned_from(step.source) != current:
        n = 0
        while (aside := step.done.with_name(f"{step.done.name}.old-{n}")).exists():
            n += 1
        step.done.rename(aside)
    write_json(step.source / FINETUNE_SOURCE, {"cell_step": current})


def describe_steps(analysis: dict[str, list[str]], finetune: Finetune | None, output_dir: Path) -> list[str]:
    """The --dry-run lines: each step's command for a cell ``<cell>``."""
    if not analysis and finetune is None:
        return []
    cell = output_dir / "cells" / "<cell>"
    lines = ["after each done cell (skipped where its output is current; a failure is recorded, not fatal):"]
    for step in steps(cell, analysis, finetune):
        lines.append(f"  {step.kind}: {' '.join(step.command)}  (log: {cell / step.log})")
    return lines
