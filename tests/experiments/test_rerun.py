"""Rerunning a grid in its OUTPUT_DIR: what counts as the same grid (its cells, its budget, no cell shortened), and
when a done cell is finished. Fabricated directories, no processes: a step record per step is all steps_done reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from flatlm.errors import FlatlmError
from flatlm.experiments import ablate as ablate_mod
from flatlm.experiments.ablate import ablate
from flatlm.experiments.budget import apply_budget
from flatlm.experiments.cells import write_json
from flatlm.experiments.grid import load_grid, resolve_cells
from flatlm.experiments.runner import cell_runs

SMALL = [
    "model.overrides.num_hidden_layers=1",
    "model.overrides.hidden_size=32",
    "model.overrides.intermediate_size=64",
]
BODY = {"overrides": {"train.max_steps": 20}, "axes": {"optim.name": ["adamw", "sam"]}}


def write_grid(tmp_path: Path, body: dict[str, Any] = BODY) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def first_run(tmp_path: Path, overrides: list[str], steps: dict[str, int]) -> Path:
    """The OUTPUT_DIR a first ablate left: grid.json, and each cell done at ``steps[name]`` steps."""
    out = tmp_path / "out"
    grid = load_grid(write_grid(tmp_path), [f"output_dir={out}", *SMALL, *overrides])
    cells = resolve_cells(grid)
    apply_budget(grid, cells)
    out.mkdir()
    write_json(out / "grid.json", ablate_mod.grid_document(grid, cells))
    for name, n in steps.items():
        cell_dir = out / "cells" / name
        cell_dir.mkdir(parents=True)
        records = [{"step": s, "loss": 5.0 - 0.01 * s} for s in range(1, n + 1)]
        (cell_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        write_json(cell_dir / "cell.json", {"name": name, "status": "done", "attempts": 1, "max_steps": n})
    return out


def rerun(tmp_path: Path, out: Path, overrides: list[str]) -> int:
    return ablate(write_grid(tmp_path), [f"output_dir={out}", *SMALL, *overrides], dry_run=True, say=lambda _: None)


def test_another_budget_is_another_grid(tmp_path: Path) -> None:
    """budget=steps ran sam 20 steps; a rerun with budget=flops (sam: 10) used to reuse those 20-step cells."""
    out = first_run(tmp_path, [], {"adamw": 20, "sam": 20})
    assert rerun(tmp_path, out, []) == 0  # the same grid
    with pytest.raises(FlatlmError, match="budget=steps, not budget=flops") as info:
        rerun(tmp_path, out, ["budget=flops"])
    assert "output_dir=" in str(info.value)  # the fix it suggests


def test_lowering_max_steps_is_refused_raising_extends(tmp_path: Path) -> None:
    out = first_run(tmp_path, [], {"adamw": 20, "sam": 20})
    with pytest.raises(FlatlmError, match=r"cell adamw would be shortened \(max_steps 20 -> 10, 20 steps already run"):
        rerun(tmp_path, out, ["train.max_steps=10"])
    assert rerun(tmp_path, out, ["train.max_steps=40"]) == 0  # extending the grid continues its cells


def test_a_cell_past_its_max_steps_is_refused(tmp_path: Path) -> None:
    """Whatever grid.json says (an older one without max_steps), steps on disk beyond max_steps are refused."""
    out = first_run(tmp_path, [], {"adamw": 20, "sam": 30})
    with pytest.raises(FlatlmError, match=r"cell sam would be shortened \(max_steps 20, 30 steps already run"):
        rerun(tmp_path, out, [])


def runs_at(tmp_path: Path, out: Path, max_steps: int) -> dict[str, bool]:
    grid = load_grid(write_grid(tmp_path), [f"output_dir={out}", *SMALL, f"train.max_steps={max_steps}"])
    cells = resolve_cells(grid)
    return {r.name: r.finished() for r in cell_runs(cells, out)}


def test_done_is_finished_only_at_its_max_steps(tmp_path: Path) -> None:
    """CellRun.finished(): a done cell below a raised max_steps runs again; past a lowered one it is not done."""
    out = first_run(tmp_path, [], {"adamw": 20, "sam": 20})
    assert runs_at(tmp_path, out, 20) == {"adamw": True, "sam": True}
    assert runs_at(tmp_path, out, 40) == {"adamw": False, "sam": False}  # extended: flatlm train continues them
    assert runs_at(tmp_path, out, 10) == {"adamw": False, "sam": False}  # never done at a length it did not run
