"""Grid files: expansion (product, zip, per-value sub-axes), cell names, and every bad input as one error before
anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from flatlm.errors import FlatlmError
from flatlm.experiments import grid as grid_mod
from flatlm.experiments.ablate import ablate, grid_document
from flatlm.experiments.cells import write_json
from flatlm.experiments.grid import cell_name, format_value, load_grid, resolve_cells


def write_grid(tmp_path: Path, body: dict[str, Any], name: str = "g.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def names(tmp_path: Path, body: dict[str, Any]) -> list[str]:
    return [c.name for c in load_grid(write_grid(tmp_path, body)).cells]


# -- expansion -----------------------------------------------------------------------------------------------------


def test_product_in_axis_order(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path, {"axes": {"optim.name": ["adamw", "lion"], "seed": [0, 1]}}))
    assert [c.name for c in grid.cells] == ["adamw-seed0", "adamw-seed1", "lion-seed0", "lion-seed1"]
    assert grid.axes == ["optim.name", "seed"]
    assert grid.cells[3].values == {"optim.name": "lion", "seed": 1}
    assert grid.cells[3].overrides == {"optim.name": "lion", "seed": 1}


def test_per_value_sub_axes_and_fixed_overrides(tmp_path: Path) -> None:
    body = {
        "axes": {
            "optim.name": {
                "adamw": {"optim.lr": [1e-3, 3e-3]},
                "sam": {"optim.lr": [1e-3], "optim.hparams.rho": 0.05},
                "lion": None,
            },
            "seed": [0],
        }
    }
    grid = load_grid(write_grid(tmp_path, body))
    assert [c.name for c in grid.cells] == [
        "adamw-lr1e-3-seed0",
        "adamw-lr3e-3-seed0",
        "sam-lr1e-3-seed0",
        "lion-seed0",
    ]
    assert grid.axes == ["optim.name", "optim.lr", "seed"]
    sam = grid.cells[2]
    assert sam.values == {"optim.name": "sam", "optim.lr": 1e-3, "seed": 0}  # axis order, rho is not an axis
    assert sam.overrides["optim.hparams.rho"] == 0.05
    assert "optim.hparams.rho" not in grid.cells[0].overrides  # a value's overrides stay with that value


def test_zip_advances_together(tmp_path: Path) -> None:
    body = {
        "axes": {"optim.lr": [1e-3, 3e-3], "schedule.warmup_fraction": [0.1, 0.2], "seed": [0, 1]},
        "zip": [["optim.lr", "schedule.warmup_fraction"]],
    }
    grid = load_grid(write_grid(tmp_path, body))
    assert [(c.values["optim.lr"], c.values["schedule.warmup_fraction"]) for c in grid.cells] == [
        (1e-3, 0.1),
        (1e-3, 0.1),
        (3e-3, 0.2),
        (3e-3, 0.2),
    ]  # 2 (zipped) x 2 seeds, not 2 x 2 x 2
    assert len(grid.cells) == 4


def test_zip_inside_a_value(tmp_path: Path) -> None:
    body = {
        "axes": {"optim.name": {"adamw": {"optim.lr": [1e-3, 3e-3], "optim.weight_decay": [0.0, 0.1]}}},
        "zip": [["optim.lr", "optim.weight_decay"]],
    }
    assert names(tmp_path, body) == ["adamw-lr1e-3-wd0", "adamw-lr3e-3-wd0.1"]


def test_the_module_docstrings_example_loads(tmp_path: Path) -> None:
    """The grid file in flatlm.experiments.grid's docstring is a working grid (it once zipped a non-axis key)."""
    doc = grid_mod.__doc__ or ""
    block = doc.split("A grid file::", 1)[1].split("\n\n")[1]  # the indented block after the blank line
    (tmp_path / "default.yaml").write_text("{}\n")  # its base: ../default.yaml
    (tmp_path / "ablations").mkdir()
    path = tmp_path / "ablations" / "x.yaml"
    path.write_text("\n".join(line[4:] for line in block.splitlines()) + "\n")
    grid = load_grid(path)
    resolve_cells(grid)
    by_name = {c.name: c for c in grid.cells}
    assert "sam-lr1e-3-rho0.02-seed0" in by_name and "sam-lr3e-3-rho0.05-seed1" in by_name
    assert "sam-lr1e-3-rho0.05-seed0" not in by_name  # zipped, not crossed
    assert len(grid.cells) == (2 + 2 + 2) * 2
    assert by_name["lion-lr1e-4-seed0"].overrides["optim.weight_decay"] == 1.0


def test_zip_across_levels_is_refused(tmp_path: Path) -> None:
    """A zip group with one key at the top and one inside a value's mapping used to be silently crossed."""
    body = {
        "axes": {"optim.name": {"adamw": {"optim.lr": [1e-3, 3e-3]}}, "seed": [0, 1]},
        "zip": [["optim.lr", "seed"]],
    }
    refuse(tmp_path, body, "zip group ['optim.lr', 'seed']", "side by side")
    apart = {"adamw": {"optim.lr": [1e-3]}, "sam": {"seed": [0]}}
    body = {"axes": {"optim.name": apart}, "zip": [["optim.lr", "seed"]]}
    refuse(tmp_path, body, "never has its keys side by side")


def test_command_line_override_of_an_axis_is_refused(tmp_path: Path) -> None:
    """`flatlm ablate G.yaml optim.lr=0.05` used to give every cell lr 0.05 (the axis collapsed, silently)."""
    body = {"axes": {"optim.name": {"adamw": {"optim.lr": [1e-3, 3e-3]}}, "seed": [0, 1]}}
    refuse(tmp_path, body, "'optim.lr'", "axis of the grid", overrides=("optim.lr=0.05",))
    refuse(tmp_path, body, "'seed'", "axis of the grid", overrides=("seed=3",))
    assert len(load_grid(write_grid(tmp_path, body), ["optim.weight_decay=0.0"]).cells) == 4  # other keys pass


def test_cells_resolve_with_overrides_on_top(tmp_path: Path) -> None:
    body = {"overrides": {"train.max_steps": 7}, "axes": {"optim.lr": [1e-3, 3e-3]}}
    grid = load_grid(write_grid(tmp_path, body), ["optim.weight_decay=0.0", f"output_dir={tmp_path / 'out'}"])
    cells = resolve_cells(grid)
    assert [c.cfg.train.max_steps for c in cells] == [7, 7]
    assert [c.cfg.optim.weight_decay for c in cells] == [0.0, 0.0]
    assert cells[0].cfg.output_dir == str(tmp_path / "out" / "cells" / "lr1e-3")
    assert grid.output_dir == tmp_path / "out"


def test_base_path_is_relative_to_the_grid_file(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text("train: {max_steps: 11}\n")
    (tmp_path / "configs" / "ablations").mkdir()
    path = write_grid(tmp_path / "configs" / "ablations", {"base": "../base.yaml", "axes": {"seed": [0]}})
    grid = load_grid(path)
    assert resolve_cells(grid)[0].cfg.train.max_steps == 11
    assert grid.output_dir == Path("runs/ablate-g")  # absent: runs/ablate-<stem>


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3e-3, "3e-3"),
        (1.5e-4, "1.5e-4"),
        (0.01, "1e-2"),
        (0.05, "0.05"),
        (0.1, "0.1"),
        (1.0, "1"),
        (0, "0"),
        (True, "true"),
        ([0.9, 0.95], "0.9-0.95"),
    ],
)
def test_value_spelling(value: Any, text: str) -> None:
    assert format_value(value) == text


def test_names_are_readable_and_filesystem_safe() -> None:
    assert cell_name({"optim.name": "adamw", "optim.lr": 3e-3, "seed": 0}) == "adamw-lr3e-3-seed0"
    assert cell_name({"data.chat_template": "a/b c.jinja"}) == "chat_templatea_b_c.jinja"
    assert cell_name({"optim.hparams.betas": [0.9, 0.99], "schedule.warmup_fraction": 0.1}) == "betas0.9-0.99-wu0.1"


# -- bad input: one error each, nothing written ----------------------------------------------------------------------


def refuse(tmp_path: Path, body: dict[str, Any], *needles: str, overrides: tuple[str, ...] = ()) -> str:
    """ablate (not a dry run) refuses the grid with one error mentioning ``needles``, and writes nothing."""
    out = tmp_path / "out"
    path = write_grid(tmp_path, body)
    with pytest.raises(FlatlmError) as info:
        ablate(path, [f"output_dir={out}", *overrides], say=lambda _: None)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert not out.exists()
    return message


def test_unknown_axis_key_names_the_closest(tmp_path: Path) -> None:
    refuse(tmp_path, {"axes": {"optim.lrr": [1e-3]}}, "'optim.lrr'", "did you mean 'optim.lr'")
    refuse(tmp_path, {"axes": {"optim.name": {"adamw": {"trian.max_steps": [3]}}}}, "'trian.max_steps'")
    refuse(tmp_path, {"axes": {"seed": [0]}}, "'train.max_stepz'", overrides=("train.max_stepz=3",))


def test_free_form_keys_are_allowed(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path, {"axes": {"optim.hparams.betas": [[0.9, 0.95]], "model.overrides.x": [1]}}))
    assert grid.cells[0].values["optim.hparams.betas"] == [0.9, 0.95]


def test_empty_axis(tmp_path: Path) -> None:
    refuse(tmp_path, {"axes": {"seed": []}}, "'seed' has no values")
    refuse(tmp_path, {"axes": {"optim.name": {}}}, "'optim.name' has no values")
    refuse(tmp_path, {"axes": {"optim.name": {"adamw": {"optim.lr": []}}}}, "'optim.lr' has no values")


def test_zip_of_different_lengths(tmp_path: Path) -> None:
    body = {"axes": {"optim.lr": [1e-3, 3e-3], "seed": [0, 1, 2]}, "zip": [["optim.lr", "seed"]]}
    refuse(tmp_path, body, "one length", "optim.lr has 2", "seed has 3")
    refuse(tmp_path, {"axes": {"seed": [0]}, "zip": [["seed", "optim.lr"]]}, "'optim.lr', which is not an axis")


def test_two_cells_with_one_name(tmp_path: Path) -> None:
    refuse(tmp_path, {"axes": {"optim.lr": [1.0e-3, 1.0001e-3]}}, "two cells resolve to the name 'lr1e-3'")


def test_invalid_cell_is_named(tmp_path: Path) -> None:
    body = {"axes": {"optim.name": {"adamw": {"optim.lr": [1e-3]}, "lion": {"optim.lr": [-1.0]}}}}
    refuse(tmp_path, body, "cell 'lion-lr-1' is invalid", "optim.lr")


def test_static_check_runs_on_every_cell(tmp_path: Path) -> None:
    """The CLI injects flatlm.train.checks.check_static: an optimizer hyperparameter only the probe step refuses."""
    from flatlm.train.checks import check_static

    body = {"axes": {"optim.name": {"adamw": None, "sam": {"optim.hparams.rho": -0.5}}}}
    grid = load_grid(write_grid(tmp_path, body))
    resolve_cells(grid)  # the config alone is valid
    with pytest.raises(FlatlmError, match=r"cell 'sam' is invalid: .*rho"):
        resolve_cells(grid, check_static)


def test_output_dir_holding_another_grid(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = load_grid(write_grid(tmp_path, {"axes": {"optim.lr": [1e-3, 3e-3]}}, "a.yaml"), [f"output_dir={out}"])
    out.mkdir()
    write_json(out / "grid.json", grid_document(first, resolve_cells(first)))
    before = sorted(p.name for p in out.iterdir())
    other = write_grid(tmp_path, {"axes": {"optim.lr": [1e-3, 1e-2]}}, "b.yaml")
    with pytest.raises(FlatlmError) as info:
        ablate(other, [f"output_dir={out}"], say=lambda _: None)
    message = str(info.value)
    assert "holds a different grid" in message and "lr3e-3" in message and "lr1e-2" in message, message
    assert "output_dir=" in message  # the fix
    assert sorted(p.name for p in out.iterdir()) == before
    # the same grid with a longer run is the same grid (a rerun extends it)
    same = write_grid(tmp_path, {"axes": {"optim.lr": [1e-3, 3e-3]}}, "a.yaml")
    assert ablate(same, [f"output_dir={out}", "train.max_steps=400"], dry_run=True, say=lambda _: None) == 0


def test_output_dir_with_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    path = write_grid(tmp_path, {"axes": {"seed": [0]}})
    with pytest.raises(FlatlmError, match="holds files but no grid.json"):
        ablate(path, [f"output_dir={tmp_path / 'out'}"], say=lambda _: None)


def test_planted_name_collision_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A naming bug that drops the values (every cell one name) must be an error, never cells sharing a directory."""
    monkeypatch.setattr(grid_mod, "cell_name", lambda values: "cell")
    with pytest.raises(FlatlmError, match="two cells resolve to the name 'cell'"):
        load_grid(write_grid(tmp_path, {"axes": {"seed": [0, 1]}}))
