"""``flatlm ablate GRID.yaml``: expand the grid, check everything, write ``grid.json``, run the cells, summarise,
write the report.

Order matters for the user: every check that can refuse the grid (its keys, its cells' configs and static checks,
the budget, an OUTPUT_DIR holding another grid, --jobs, the launch config) runs before anything is written or
started, so a mistake costs a second, not a half-run grid. ``--dry-run`` stops after the checks and lists the cells.

Before the first cell, the data caches are built once per distinct data config (:mod:`flatlm.experiments.prepare`,
logged to OUTPUT_DIR/prepare.log), so that the first cell's wall time and peak memory measure training only.

Exit status: 0 when every cell finished (done, or diverged: a result about its learning rate, not an error); 1 when
one failed, ran out of memory or was interrupted outside ablate; 130 / 143 when ablate itself was stopped by Ctrl-C
/ SIGTERM (its running cells saved a checkpoint; rerun to resume).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from flatlm.config import RunConfig, flatten, to_dict
from flatlm.errors import FlatlmError
from flatlm.experiments.analysis import describe_steps
from flatlm.experiments.budget import apply_budget
from flatlm.experiments.cells import final_loss, read_json, steps_done, write_json
from flatlm.experiments.grid import (
    Grid,
    ResolvedCell,
    differences,
    fingerprint,
    load_grid,
    resolve_base,
    resolve_cells,
)
from flatlm.experiments.prepare import prepare_data
from flatlm.experiments.runner import FINISHED, cell_runs, run_cells

GRID_FILE = "grid.json"
LOCK_FILE = ".ablate.lock"  # one ablate per output_dir: two would run the same cells at once
VERSION = 1


def ablate(
    grid_path: str | Path,
    overrides: Sequence[str] = (),
    *,
    dry_run: bool = False,
    jobs: int = 1,
    launch_config: str | Path | None = None,
    static_check: Callable[[RunConfig], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> int:
    """Run (or, with ``dry_run``, list) the grid at ``grid_path``; returns the exit status (see the module doc)."""
    say = say or _say
    if jobs < 1:
        raise FlatlmError(f"--jobs must be at least 1, got {jobs}")
    launch = Path(launch_config) if launch_config is not None else None
    if launch is not None and not launch.is_file():
        raise FlatlmError(f"--launch-config {str(launch)!r} does not exist; pass an accelerate config file")
    grid = load_grid(grid_path, overrides)
    cells = resolve_cells(grid, static_check)
    _check_baseline(grid)
    apply_budget(grid, cells)
    document = grid_document(grid, cells)
    check_output_dir(grid.output_dir, document)
    if dry_run:
        say(describe(grid, cells, document))
        return 0
    from flatlm.experiments.runner import slot_environments

    slot_environments(jobs, launch)  # --jobs larger than the GPUs: refused before anything is written
    grid.output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(grid.output_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FlatlmError(
            f"another flatlm ablate is running on {str(grid.output_dir)!r}; wait for it, or pass another output_dir=DIR"
        ) from None
    try:
        return _run(grid, cells, document, jobs, launch, say)
    finally:
        lock.release()


def _run(
    grid: Grid,
    cells: list[ResolvedCell],
    document: dict[str, Any],
    jobs: int,
    launch: Path | None,
    say: Callable[[str], None],
) -> int:
    """Write grid.json and the cells' records, run the unfinished cells, summarise, report (under the lock)."""
    write_json(grid.output_dir / GRID_FILE, document)
    runs = cell_runs(cells, grid.output_dir, grid.analysis, grid.finetune)
    for run in runs:
        run.dir.mkdir(parents=True, exist_ok=True)
        run.save()
    say(f"ablate {grid.path}: {len(cells)} cells, budget {grid.budget}, outputs in {grid.output_dir}")
    try:  # the caches built here, not inside the first cell (its wall time and peak memory would include them)
        prepare_data([r.cell.cfg for r in runs if not r.finished()], grid.output_dir, say)
    except KeyboardInterrupt:
        say("stopped while preparing the data: rerun the same command to start the cells")
        return 130
    code = run_cells(runs, jobs=jobs, launch_config=launch, say=say)
    say(summary(runs))
    if code:
        say(f"stopped: rerun the same command to finish the {sum(not r.finished() for r in runs)} unfinished cells")
        return code
    report = _write_report(grid.output_dir, say)
    if report is not None:
        say(f"report: {report}")
    return 0 if all(r.record["status"] in FINISHED for r in runs) else 1


def _say(line: str) -> None:
    print(line, flush=True)  # progress as it happens, also when stdout is a file or a pipe


def _check_baseline(grid: Grid) -> None:
    from flatlm.optim.registry import get_spec

    try:
        get_spec(grid.baseline)
    except FlatlmError as exc:
        raise FlatlmError(f"the grid's baseline: {exc}") from None


def grid_document(grid: Grid, cells: list[ResolvedCell]) -> dict[str, Any]:
    """grid.json (the contract with the report: /work/helpers/LAYOUT.md)."""
    base = to_dict(resolve_base(grid))
    base.pop("output_dir", None)
    return {
        "version": VERSION,
        "grid_file": str(grid.path),
        "fingerprint": fingerprint(cells),
        "baseline": grid.baseline,
        "budget": grid.budget,
        "axes": grid.axes,
        "base": base,
        "cells": [
            {
                "name": c.spec.name,
                "values": c.spec.values,
                "overrides": differences(base, c.cfg),
                "max_steps": c.cfg.train.max_steps,
                "flops_per_step": c.flops_per_step,
            }
            for c in cells
        ],
    }


def check_output_dir(output_dir: Path, document: dict[str, Any]) -> None:
    """Refuse an OUTPUT_DIR that holds another grid (or other files), naming what differs.

    A grid's identity is its cells' run configs (``fingerprint``), its ``budget`` and each cell's length: a rerun
    with another budget, or with a cell's max_steps lowered (by ``train.max_steps``, or by the budget's arithmetic
    under ``budget=flops``), would otherwise keep cells that ran longer and compare them with cells that ran less.
    Raising max_steps is allowed (extending a grid): a done cell below its new max_steps runs again, and
    ``flatlm train`` continues it from its last checkpoint. A cell whose directory holds more steps than its
    max_steps is refused whatever grid.json says (it cannot be "done" at the shorter length).
    """
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise FlatlmError(f"output_dir {str(output_dir)!r} is a file; pass a directory with output_dir=DIR")
    old = read_json(output_dir / GRID_FILE)
    if old is None:
        if any(p.name != LOCK_FILE for p in output_dir.iterdir()):
            raise FlatlmError(
                f"output_dir {str(output_dir)!r} holds files but no {GRID_FILE} (not an ablation); "
                "pass another output_dir=DIR"
            )
        return
    if old.get("fingerprint") == document["fingerprint"] and old.get("budget", "steps") != document["budget"]:
        raise FlatlmError(
            f"output_dir {str(output_dir)!r} holds this grid run with budget={old.get('budget', 'steps')}, not "
            f"budget={document['budget']}: a different budget is a different grid (other steps per cell); "
            f"pass another output_dir=DIR (e.g. output_dir={output_dir}-{document['budget']})"
        )
    if old.get("fingerprint") == document["fingerprint"]:
        _check_lengths(output_dir, old, document)
        return
    raise FlatlmError(
        f"output_dir {str(output_dir)!r} holds a different grid ({old.get('grid_file')}): "
        f"{_what_differs(old, document)}; "
        f"pass another output_dir=DIR (e.g. output_dir={output_dir}-2) or remove that directory"
    )


def _check_lengths(output_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse a rerun that shortens a cell (grid.json's max_steps, or the steps its directory already holds)."""
    before = {c["name"]: c.get("max_steps") for c in old.get("cells", [])}
    for cell in new["cells"]:
        name, steps = cell["name"], int(cell["max_steps"])
        was = before.get(name)
        done = steps_done(output_dir / "cells" / name)
        if (isinstance(was, int) and steps < was) or done > steps:
            said = f"max_steps {was} -> {steps}" if isinstance(was, int) and steps < was else f"max_steps {steps}"
            raise FlatlmError(
                f"output_dir {str(output_dir)!r}: cell {name} would be shortened ({said}, {done} steps already run); "
                "a shorter grid is a different grid (its cells would not be comparable): pass another "
                f"output_dir=DIR (e.g. output_dir={output_dir}-{steps}), or raise train.max_steps instead"
            )


def _what_differs(old: dict[str, Any], new: dict[str, Any]) -> str:
    from flatlm.config import NOT_RUN_IDENTITY

    said = []
    if old.get("budget", "steps") != new["budget"]:
        said.append(f"budget {old.get('budget', 'steps')} -> {new['budget']}")
    a, b = flatten(old.get("base", {})), flatten(new["base"])
    base_keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k) and not k.startswith(NOT_RUN_IDENTITY)]
    if base_keys:
        said.append("base config differs in " + ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in base_keys[:5]))
    old_cells = {c["name"]: c for c in old.get("cells", [])}
    new_cells = {c["name"]: c for c in new["cells"]}
    if gone := [n for n in old_cells if n not in new_cells]:
        said.append(f"cells only in the old grid: {', '.join(gone[:5])}")
    if added := [n for n in new_cells if n not in old_cells]:
        said.append(f"cells only in the new grid: {', '.join(added[:5])}")
    for name in new_cells.keys() & old_cells.keys():
        x, y = old_cells[name].get("overrides", {}), new_cells[name]["overrides"]
        keys = [k for k in sorted(x.keys() | y.keys()) if x.get(k) != y.get(k) and not k.startswith(NOT_RUN_IDENTITY)]
        if keys:
            said.append(f"cell {name} differs in {', '.join(keys[:5])}")
            break
    return "; ".join(said) or "its cells' configs differ"


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(grid: Grid, cells: list[ResolvedCell], document: dict[str, Any]) -> str:
    """The --dry-run listing: each cell's steps, compute and resolved differences from the base."""
    head = (
        f"grid {grid.path}: {len(cells)} cells, budget {grid.budget}, baseline {grid.baseline}, "
        f"output_dir {grid.output_dir} (dry run: nothing written, nothing started)"
    )
    width = max(len(c.spec.name) for c in cells)
    rows = [f"  {'cell':<{width}}  {'steps':>6}  {'GFLOP/step':>10}  differences from the base"]
    for cell, entry in zip(cells, document["cells"], strict=True):
        diffs = " ".join(f"{k}={_short(v)}" for k, v in entry["overrides"].items()) or "(the base)"
        rows.append(
            f"  {cell.spec.name:<{width}}  {cell.cfg.train.max_steps:>6}  {cell.flops_per_step / 1e9:>10.4g}  {diffs}"
        )
    return "\n".join([head, *rows, *describe_steps(grid.analysis, grid.finetune, grid.output_dir)])


def summary(runs: list[Any]) -> str:
    """The closing table: cell, status, steps, final training loss, wall time."""
    width = max([len(r.name) for r in runs] + [4])
    statuses = [_status_text(r.record) for r in runs]
    wide = max([len(t) for t in statuses] + [11])
    rows = [f"  {'cell':<{width}}  {'status':<{wide}}  {'steps':>11}  {'loss':>8}  {'wall_s':>8}"]
    for r, status in zip(runs, statuses, strict=True):
        loss = final_loss(r.dir)
        steps = f"{steps_done(r.dir)}/{r.max_steps}"
        loss_text = f"{loss:.4f}" if loss is not None else "-"
        rows.append(f"  {r.name:<{width}}  {status:<{wide}}  {steps:>11}  {loss_text:>8}  {r.record['wall_s']:>8.1f}")
    return "\n".join(["summary:", *rows])


def _status_text(record: dict[str, Any]) -> str:
    """``done``, or ``done (eval failed)`` when an analysis step did not finish."""
    analysis = record.get("analysis") or {}
    bad = [f"{k} {v.get('status')}" for k, v in analysis.items() if isinstance(v, dict) and v.get("status") != "done"]
    return f"{record['status']} ({', '.join(bad)})" if bad else str(record["status"])


def _write_report(output_dir: Path, say: Callable[[str], None]) -> Path | None:
    try:
        from flatlm.experiments.report import write_report
    except ModuleNotFoundError as exc:
        if exc.name != "flatlm.experiments.report":
            raise
        say("report: flatlm.experiments.report is not available in this checkout; skipped")
        return None
    return write_report(output_dir)
