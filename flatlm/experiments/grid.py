"""Ablation grids: a base config plus axes, expanded into cells (one resolved run config each).

A grid file::

    base: ../default.yaml        # a config file (relative to this file), or an inline mapping; absent: defaults
    output_dir: runs/ablate-x    # optional; `flatlm ablate G.yaml output_dir=D` overrides it; absent:
                                 # runs/ablate-<grid file stem>
    baseline: adamw              # optional (default adamw): the optimizer the report compares against
    budget: steps                # steps (default: every cell runs its train.max_steps) | flops (equal compute)
    overrides:                   # dotted keys set in every cell
      train.max_steps: 60
      schedule.warmup_fraction: 0.1
    axes:                        # crossed as a product, in this order
      optim.name:                # a mapping: value -> that value's own overrides
        adamw: {optim.lr: [1.0e-3, 3.0e-3]}         # a list inside is a sub-axis (crossed within this value)
        lion: {optim.lr: [1.0e-4, 3.0e-4], optim.weight_decay: 1.0}   # a scalar (or mapping) is a fixed override
        sam: {optim.lr: [1.0e-3, 3.0e-3], optim.hparams.rho: [0.02, 0.05]}
      seed: [0, 1]               # a list: plain values
    zip:                         # groups of axis keys whose lists advance together instead of crossing
      - [optim.lr, optim.hparams.rho]   # sam: (1e-3, 0.02), (3e-3, 0.05); adamw's and lion's lr cross as usual
    analysis:                    # optional: after a cell is done, flatlm landscape / flatlm eval on it, with these args
      landscape: [--batches, "1", --rho, "0.01,0.05,0.1", --no-plane]
      eval: [--corrupt, default, --weights-noise, "0.01,0.03", --quantize, "8,4"]

The optional ``analysis`` and ``finetune`` (``{config: ../sft-tiny.yaml, overrides: {...}}``: the forgetting column)
stages are :mod:`flatlm.experiments.analysis`'s; they are not part of a cell's identity.

A list-valued config value is one value of a list axis: ``optim.hparams.betas: [[0.9, 0.95], [0.9, 0.99]]`` is an
axis with two values; a fixed list-valued override inside a per-value mapping is written as a one-value axis
(``[[0.9, 0.99]]``). A zip group applies wherever its keys are list axes side by side (at the top, or inside one
value's mapping); a group whose keys sit at different levels (one at the top, one inside a value's mapping) is
refused. Command-line overrides apply to every cell, on top of its axis values; ``output_dir=``,
``budget=`` and ``baseline=`` among them replace the grid's own keys; an override of an axis key is refused (it
would give every cell the axis's one value).

Every cell sees the same data order unless an axis changes it: a ``seed`` axis changes the initialisation and the
data order together; set ``data.seed`` in the base (or make it an axis of its own) to vary only the initialisation.

Cells are named from their axis values, in axis order (``adamw-lr3e-3-seed0``): the value alone for ``*.name`` keys,
else a short form of the key's last part and the value. Every mistake in a grid is one ``FlatlmError`` raised
before anything is written (``load_grid`` parses and expands, ``resolve_cells`` validates every cell).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatlm.config import (
    NOT_RUN_IDENTITY,
    RunConfig,
    describe_keys,
    flatten,
    load_yaml,
    parse_override,
    set_dotted,
    to_dict,
    validate,
)
from flatlm.errors import FlatlmError, did_you_mean
from flatlm.experiments.analysis import Finetune, parse_analysis, parse_finetune

GRID_KEYS = ("base", "output_dir", "baseline", "budget", "overrides", "axes", "zip", "analysis", "finetune")
BUDGETS = ("steps", "flops")
FREE_FORM = ("optim.hparams.", "model.overrides.")  # dict-valued config keys: anything below them is allowed
SHORT = {"warmup_fraction": "wu", "weight_decay": "wd", "num_hidden_layers": "L", "hidden_size": "d"}
"""Short forms of a key's last part in cell names (the rest use the last part as written)."""
SHORT_KEYS = {"train.adversarial.steps": "adv"}
"""Short forms of whole keys, before SHORT (``adamw-adv2``: adversarial training with 2 ascent steps)."""


@dataclass(frozen=True)
class CellSpec:
    name: str
    values: dict[str, Any]
    """The cell's axis values, in axis order."""
    overrides: dict[str, Any]
    """Dotted keys this cell sets: its axis values and its values' fixed overrides."""


@dataclass
class Grid:
    path: Path
    base_tree: dict[str, Any]
    """The base config tree with the grid's and the command line's every-cell overrides (no output_dir)."""
    output_dir: Path
    baseline: str
    budget: str
    axes: list[str]
    cells: list[CellSpec]
    cli_overrides: dict[str, Any] = field(default_factory=dict)
    analysis: dict[str, list[str]] = field(default_factory=dict)
    """Analysis kind -> its extra command-line arguments (the grid's ``analysis:``), run after each done cell."""
    finetune: Finetune | None = None
    """The grid's ``finetune:`` stage (the forgetting column), after the analyses."""


@dataclass
class _Axis:
    key: str
    values: list[Any]
    levels: list[_Level | None]
    """Per value: what that value brings (fixed overrides and sub-axes), None for a plain list axis."""


@dataclass
class _Level:
    fixed: dict[str, Any]
    axes: list[_Axis]


# -- reading -------------------------------------------------------------------------------------------------------


def load_grid(path: str | Path, overrides: Sequence[str] = ()) -> Grid:
    """Parse the grid file at ``path`` with command-line ``overrides`` (``output_dir=`` names the grid's directory)
    and expand its cells; every error is one FlatlmError and nothing is written."""
    path = Path(path)
    raw = _read_mapping(path, "grid file")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise FlatlmError(
            f"grid file {str(path)!r} has unknown key {unknown[0]!r}{did_you_mean(unknown[0], GRID_KEYS)}; "
            f"valid keys: {', '.join(GRID_KEYS)}"
        )
    cli: dict[str, Any] = dict(parse_override(item) for item in overrides)
    output_dir = Path(str(cli.pop("output_dir", raw.get("output_dir") or f"runs/ablate-{path.stem}")))
    for key in ("budget", "baseline"):  # the grid's own keys, given on the command line
        if key in cli:
            raw[key] = cli.pop(key)
    for key in cli:
        check_key(key, "command-line override")

    base_tree = _base_tree(raw.get("base"), path)
    every = raw.get("overrides") or {}
    if not isinstance(every, dict):
        raise FlatlmError(f"grid 'overrides' must be a mapping of dotted keys to values, not {type(every).__name__}")
    for key, value in {**every, **cli}.items():
        check_key(key, "override")
        set_dotted(base_tree, key, value)
    base_tree.pop("output_dir", None)

    budget = str(raw.get("budget", "steps"))
    if budget not in BUDGETS:
        raise FlatlmError(f"grid budget {budget!r} is not one of {', '.join(BUDGETS)}{did_you_mean(budget, BUDGETS)}")
    axes_raw = raw.get("axes")
    if not isinstance(axes_raw, dict) or not axes_raw:
        raise FlatlmError("the grid has no axes; add e.g. 'axes: {optim.name: [adamw, lion]}'")
    top = _Level({}, [_parse_axis(key, spec, top=True) for key, spec in axes_raw.items()])
    order = _axis_order(top)
    for key in cli:
        if key in order:  # it would set every cell's value: the axis collapses to one value, its cells to copies
            raise FlatlmError(
                f"command-line override {key}={cli[key]!r} sets {key!r}, but it is an axis of the grid (every cell "
                f"would run the same {key}); edit the grid's axis, or drop the override"
            )
    zips = _parse_zip(raw.get("zip") or [], order)
    _check_zip_levels(top, zips)
    cells = []
    for values, cell_overrides in _expand(top, zips, ""):
        ordered = dict(sorted(values, key=lambda kv: order.index(kv[0])))
        cells.append(CellSpec(cell_name(ordered), ordered, {**cell_overrides, **ordered}))
    _check_unique_names(cells)
    analysis = parse_analysis(raw.get("analysis"))
    finetune = parse_finetune(raw.get("finetune"), path)
    baseline = str(raw.get("baseline", "adamw"))
    return Grid(path, base_tree, output_dir, baseline, budget, order, cells, cli, analysis, finetune)


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FlatlmError(f"{what} {str(path)!r} does not exist; pass an existing YAML file")
    try:
        tree = load_yaml(path.read_text()) or {}
    except Exception as exc:  # yaml.YAMLError and its subclasses
        raise FlatlmError(f"{what} {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise FlatlmError(f"{what} {str(path)!r} must hold a mapping of keys, not {type(tree).__name__}")
    return tree


def _base_tree(base: Any, grid_path: Path) -> dict[str, Any]:
    if base is None:
        return {}
    if isinstance(base, dict):
        return copy.deepcopy(base)
    if isinstance(base, str):
        return _read_mapping((grid_path.parent / base).resolve(), "grid base config")
    raise FlatlmError(f"grid 'base' must be a config file path or a mapping, not {type(base).__name__}")


def check_key(key: str, what: str) -> None:
    """Refuse a dotted key the run config does not have (free-form ``optim.hparams.*``, ``model.overrides.*`` pass)."""
    leaves = [k for k, _, _ in describe_keys()]
    if key in leaves or key.startswith(FREE_FORM):
        return
    raise FlatlmError(
        f"grid {what} key {key!r} is not a config key{did_you_mean(key, leaves)}; "
        "`flatlm train --help` lists every key (optim.hparams.* and model.overrides.* are free-form)"
    )


def _parse_axis(key: str, spec: Any, *, top: bool) -> _Axis:
    key = str(key)
    check_key(key, "axis")
    if key == "output_dir":
        raise FlatlmError("output_dir cannot be an axis: every cell's output_dir is OUTPUT_DIR/cells/<name>")
    if isinstance(spec, list):
        if not spec:
            raise FlatlmError(f"grid axis {key!r} has no values; give it at least one")
        return _Axis(key, list(spec), [None] * len(spec))
    if isinstance(spec, dict) and top:
        if not spec:
            raise FlatlmError(f"grid axis {key!r} has no values; give it at least one")
        values, levels = [], []
        for value, body in spec.items():
            if body is not None and not isinstance(body, dict):
                raise FlatlmError(
                    f"grid axis {key!r}: the overrides of value {value!r} must be a mapping of dotted keys, "
                    f"not {type(body).__name__}"
                )
            values.append(value)
            levels.append(_parse_level(body or {}))
        return _Axis(key, values, levels)
    raise FlatlmError(f"grid axis {key!r} must be a list of values or a mapping of value -> overrides")


def _parse_level(body: dict[str, Any]) -> _Level:
    fixed: dict[str, Any] = {}
    axes = []
    for key, value in body.items():
        if isinstance(value, list):
            axes.append(_parse_axis(key, value, top=False))
        else:
            check_key(str(key), "per-value override")
            fixed[str(key)] = value
    return _Level(fixed, axes)


def _axis_order(level: _Level) -> list[str]:
    order: list[str] = []
    for axis in level.axes:
        for key in [axis.key] + [k for sub in axis.levels if sub for k in _axis_order(sub)]:
            if key not in order:
                order.append(key)
    return order


def _parse_zip(zips: Any, axes: list[str]) -> list[list[str]]:
    if not isinstance(zips, list) or not all(isinstance(g, list) for g in zips):
        raise FlatlmError("grid 'zip' must be a list of groups, each a list of axis keys, e.g. [[optim.lr, seed]]")
    seen: set[str] = set()
    for group in zips:
        if len(group) < 2:
            raise FlatlmError(f"zip group {group} needs at least two axis keys")
        for key in group:
            if key not in axes:
                raise FlatlmError(f"zip group {group} names {key!r}, which is not an axis{did_you_mean(key, axes)}")
            if key in seen:
                raise FlatlmError(f"axis {key!r} is in two zip groups; put it in one")
            seen.add(key)
    return [list(map(str, g)) for g in zips]


def _keys_below(level: _Level) -> set[str]:
    """Every axis key inside the per-value mappings of ``level``'s axes, at any depth."""
    return {k for axis in level.axes for sub in axis.levels if sub for k in _axis_order(sub)}


def _check_zip_levels(top: _Level, zips: list[list[str]]) -> None:
    """Refuse a zip group split across levels (one key at the top, another inside a value's mapping), and one whose
    keys are never side by side: expansion zips only axes of one level, so either would silently cross instead."""
    met = _zip_meetings(top, zips, frozenset(), "")
    for group in zips:
        if tuple(group) not in met:
            raise FlatlmError(f"zip group {group} never has its keys side by side; put them in the same mapping")


def _zip_meetings(level: _Level, zips: list[list[str]], above: frozenset[str], where: str) -> set[tuple[str, ...]]:
    """The zip groups whose keys are all axes of ``level`` or of a level inside it; raises on a split group."""
    here = {axis.key for axis in level.axes}
    below = _keys_below(level)
    met: set[tuple[str, ...]] = set()
    for group in zips:
        present = here & set(group)
        if present == set(group):
            met.add(tuple(group))
        elif present and (set(group) - present) & (above | below):
            split = sorted(set(group) - present)
            raise FlatlmError(
                f"zip group {group}{where}: {', '.join(sorted(present))} is an axis here but {', '.join(split)} is "
                "an axis at another level (the top, or inside a value's mapping); zipped keys must be side by side: "
                "move them into the same mapping"
            )
    for axis in level.axes:
        for value, sub in zip(axis.values, axis.levels, strict=True):
            if sub is not None:
                met |= _zip_meetings(sub, zips, above | here, f" (under {axis.key}={value})")
    return met


# -- expansion -----------------------------------------------------------------------------------------------------

_Combo = tuple[list[tuple[str, Any]], dict[str, Any]]  # (axis values, fixed overrides)


def _expand(level: _Level, zips: list[list[str]], where: str) -> list[_Combo]:
    """Every combination of ``level``'s axes (zip groups advancing together), each with the level's fixed keys."""
    groups: list[list[_Axis]] = []
    for axis in level.axes:
        group = next((g for g in zips if axis.key in g), None)
        joined = next((g for g in groups if group is not None and g[0].key in group), None)
        if joined is not None:
            joined.append(axis)
        else:
            groups.append([axis])
    choices = [_axis_choices(g[0], zips, where) if len(g) == 1 else _zip_choices(g, where) for g in groups]
    combos = []
    for picked in itertools.product(*choices):
        values = [kv for vals, _ in picked for kv in vals]
        fixed = dict(level.fixed)
        for _, extra in picked:
            fixed.update(extra)
        combos.append((values, fixed))
    return combos


def _axis_choices(axis: _Axis, zips: list[list[str]], where: str) -> list[_Combo]:
    out: list[_Combo] = []
    for value, level in zip(axis.values, axis.levels, strict=True):
        inner = _expand(level, zips, f" (under {axis.key}={value})") if level else [([], {})]
        out.extend(([(axis.key, value), *vals], fixed) for vals, fixed in inner)
    return out


def _zip_choices(group: list[_Axis], where: str) -> list[_Combo]:
    lengths = {a.key: len(a.values) for a in group}
    if any(a.levels[0] is not None for a in group):
        raise FlatlmError(f"zip group {list(lengths)}{where}: zipped axes must be lists, not value -> overrides")
    if len(set(lengths.values())) > 1:
        said = ", ".join(f"{k} has {n}" for k, n in lengths.items())
        raise FlatlmError(f"zip group {list(lengths)}{where}: its lists must have one length ({said} values)")
    n = len(group[0].values)
    return [([(a.key, a.values[i]) for a in group], {}) for i in range(n)]


# -- names ---------------------------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """A short, filesystem-safe spelling: 3e-3, 0.1, true, 0.9-0.95, chat."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        if value != 0 and math.isfinite(value) and (abs(value) <= 1e-2 or abs(value) >= 1e4):
            mantissa, exponent = f"{value:.2e}".split("e")  # 3.00e-03 -> 3e-3
            text = f"{float(mantissa):g}e{int(exponent)}"
        else:
            text = f"{value:g}"
    elif isinstance(value, list | tuple):
        text = "-".join(format_value(v) for v in value)
    elif isinstance(value, dict):
        text = "-".join(f"{k}{format_value(v)}" for k, v in value.items())
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def cell_name(values: dict[str, Any]) -> str:
    """``{"optim.name": "adamw", "optim.lr": 0.003, "seed": 0}`` -> ``adamw-lr3e-3-seed0``."""
    parts = []
    for key, value in values.items():
        last = key.rsplit(".", 1)[-1]
        short = SHORT_KEYS.get(key) or SHORT.get(last, last)
        parts.append(format_value(value) if last == "name" else short + format_value(value))
    return "-".join(parts)


def _check_unique_names(cells: list[CellSpec]) -> None:
    seen: dict[str, CellSpec] = {}
    for cell in cells:
        if cell.name in seen:
            raise FlatlmError(
                f"two cells resolve to the name {cell.name!r} ({seen[cell.name].values} and {cell.values}); "
                "make their axis values differ in how they print (e.g. fewer significant digits apart)"
            )
        seen[cell.name] = cell


# -- resolving -----------------------------------------------------------------------------------------------------


@dataclass
class ResolvedCell:
    spec: CellSpec
    cfg: RunConfig
    flops_per_step: float = 0.0


def cell_tree(grid: Grid, cell: CellSpec) -> dict[str, Any]:
    """The cell's config tree: base, the grid's overrides, the cell's values, the command line; its output_dir."""
    tree = copy.deepcopy(grid.base_tree)
    for key, value in {**cell.overrides, **grid.cli_overrides}.items():
        set_dotted(tree, key, copy.deepcopy(value))
    tree["output_dir"] = str(grid.output_dir / "cells" / cell.name)
    return tree


def resolve_cells(grid: Grid, static_check: Callable[[RunConfig], None] | None = None) -> list[ResolvedCell]:
    """Validate every cell (config, then ``static_check``: the CLI passes flatlm.train.checks.check_static); the
    first invalid one is one FlatlmError naming the cell."""
    resolve_base(grid)  # a base that is itself invalid is said once, not once per cell
    out = []
    for cell in grid.cells:
        try:
            cfg = validate(cell_tree(grid, cell))
            if static_check is not None:
                static_check(cfg)
        except FlatlmError as exc:
            raise FlatlmError(f"cell {cell.name!r} is invalid: {exc}") from None
        out.append(ResolvedCell(cell, cfg))
    return out


def resolve_base(grid: Grid) -> RunConfig:
    try:
        return validate(copy.deepcopy(grid.base_tree))
    except FlatlmError as exc:
        raise FlatlmError(f"the grid's base config is invalid: {exc}") from None


def differences(base: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """Dotted keys where ``cfg`` differs from the resolved base tree ``base`` (output_dir aside)."""
    a, b = flatten(base), flatten(to_dict(cfg))  # an empty dict in one flattens to one key, its items in the other
    return {k: b[k] for k in sorted(b) if a.get(k) != b[k] and k != "output_dir" and b[k] != {}}


def identity(cfg: RunConfig) -> dict[str, Any]:
    """The keys that make a cell's run what it is (as flatlm train's run identity: no run length or cadence)."""
    return {k: v for k, v in sorted(flatten(to_dict(cfg)).items()) if not k.startswith(NOT_RUN_IDENTITY)}


def fingerprint(cells: list[ResolvedCell]) -> str:
    text = json.dumps([[c.spec.name, identity(c.cfg)] for c in cells], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
