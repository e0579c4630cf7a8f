"""Flatness and robustness columns of the ablation report, read from each cell's ``analysis/`` directory.

``flatlm landscape CELL`` writes ``CELL/analysis/landscape.json`` and ``flatlm eval CELL`` writes
``CELL/analysis/robustness.json`` (the grid's ``analysis:`` stage runs both after a cell is done). Their columns:

- ``lambda_max``: the Hessian's largest (algebraic) eigenvalue: Lanczos's first value when top-k was measured, else
  power iteration's; ``lambda_abs_max`` power iteration's value, the eigenvalue of largest magnitude with its sign
  (a large negative one is a direction of strong negative curvature, not flatness); ``hessian_trace`` Hutchinson's
  estimate of tr(H);
- ``sam_sharpness[rho=R]``: max_{||e|| <= R} L(w + e) - L(w), approximated by a few ascent steps (Foret et al. 2021),
  one column per radius the analysis measured;
- ``clean_loss``: validation loss on clean text; ``corrupt_loss[NAME]``: on text corrupted by NAME (``typo:0.05``);
  ``robustness_gap``: the mean over corruptions of (corrupted loss - clean loss);
- ``noise_loss[sigma=S]``: mean loss with Gaussian noise of relative scale S on the weights;
  ``quant_loss[intB]``: loss after B-bit weight quantisation;
- ``forgetting``: the clean loss of the cell's fine-tuned model on the cell's own validation split minus the cell's
  clean loss, where both were measured on the same text (written by the grid's ``finetune:`` stage, when the grid
  has one);
- ``analysis``: which analyses failed (``eval failed``), when the grid's analysis stage recorded any.

Columns are *discovered*: only those some cell has appear, so a grid without analysis gives the report it always
gave. Missing or torn files give empty columns, never an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flatlm.experiments.report_cells import PROVIDERS, Column, Provider, read_json

ANALYSIS_DIR = "analysis"
LANDSCAPE_FILE = "landscape.json"
ROBUSTNESS_FILE = "robustness.json"
FINETUNE_DIR = "finetune"


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _get(tree: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _g(value: float) -> str:
    return f"{value:g}"


def sam_key(rho: float) -> str:
    return f"sam_sharpness[rho={_g(rho)}]"


def noise_key(sigma: float) -> str:
    return f"noise_loss[sigma={_g(sigma)}]"


def quant_key(bits: int) -> str:
    return f"quant_loss[int{bits}]"


def corrupt_key(name: str) -> str:
    return f"corrupt_loss[{name}]"


def read_landscape(cell_dir: Path) -> dict[str, Any]:
    """λmax (Lanczos, else power iteration), the largest-magnitude eigenvalue, the trace and SAM sharpness per radius
    from ``analysis/landscape.json``."""
    data = read_json(cell_dir / ANALYSIS_DIR / LANDSCAPE_FILE)
    hessian = data.get("hessian")
    power = _number(_get(hessian, "lambda_max", "value"))
    top = _list(_get(hessian, "top_k", "values"))
    out: dict[str, Any] = {
        "lambda_max": _number(top[0]) if top else power,
        "lambda_abs_max": power,
        "hessian_trace": _number(_get(hessian, "trace", "value")),
    }
    for entry in _list(data.get("sam_sharpness")):
        rho = _number(_get(entry, "rho"))
        if rho is not None:
            out[sam_key(rho)] = _number(_get(entry, "value"))
    return {k: v for k, v in out.items() if v is not None}


def read_robustness(cell_dir: Path) -> dict[str, Any]:
    """Clean loss, loss per corruption, the robustness gap, loss under weight noise and after quantisation."""
    data = read_json(cell_dir / ANALYSIS_DIR / ROBUSTNESS_FILE)
    out: dict[str, Any] = {"clean_loss": _number(_get(data, "clean", "loss"))}
    for entry in _list(data.get("corruptions")):
        name = _get(entry, "name")
        if isinstance(name, str) and name:
            out[corrupt_key(name)] = _number(_get(entry, "loss"))
    gap = _number(data.get("corruption_gap_mean"))
    if gap is None:  # an older writer: the mean of the per-corruption gaps
        gaps = [_number(_get(e, "gap")) for e in _list(data.get("corruptions"))]
        finite = [g for g in gaps if g is not None]
        gap = sum(finite) / len(finite) if finite else None
    out["robustness_gap"] = gap
    for entry in _list(data.get("weight_noise")):
        sigma = _number(_get(entry, "sigma"))
        if sigma is not None:
            out[noise_key(sigma)] = _number(_get(entry, "loss"))
    for entry in _list(data.get("quantize")):
        bits = _number(_get(entry, "bits"))
        if bits is not None:
            out[quant_key(int(bits))] = _number(_get(entry, "loss"))
    return {k: v for k, v in out.items() if v is not None}


SAME_TEXT = ("seq_len", "batch_size", "batches", "seed", "documents")
"""What both robustness.json files must agree on (with clean.tokens) for their clean losses to be compared."""


def read_forgetting(cell_dir: Path) -> dict[str, Any]:
    """The fine-tuned model's clean loss on this cell's validation text minus the cell's own clean loss.

    Both from robustness.json (the cell's ``analysis/`` and its ``finetune/analysis/``), and only when they measured
    the same text: the same windows (seq_len, batch_size), batches, seed, documents and clean token count. No
    fallback to ``eval.jsonl``: the training run's evaluation reads other windows (and maybe in bf16).
    """
    after = read_json(cell_dir / FINETUNE_DIR / ANALYSIS_DIR / ROBUSTNESS_FILE)
    before = read_json(cell_dir / ANALYSIS_DIR / ROBUSTNESS_FILE)
    loss_after, loss_before = _number(_get(after, "clean", "loss")), _number(_get(before, "clean", "loss"))
    if loss_after is None or loss_before is None:
        return {}
    shape = [(after.get(k), before.get(k)) for k in SAME_TEXT] + [(_get(after, "clean", "tokens"),
             _get(before, "clean", "tokens"))]  # fmt: skip
    if any(a is None or a != b for a, b in shape):
        return {}
    return {"forgetting": loss_after - loss_before}


def read_analysis_status(cell_dir: Path) -> dict[str, Any]:
    """``eval failed`` / ``landscape interrupted``: the analyses the grid's stage did not finish (cell.json)."""
    stages = read_json(cell_dir / "cell.json").get("analysis")
    if not isinstance(stages, dict) or not stages:
        return {}
    bad = [f"{kind} {_get(r, 'status')}" for kind, r in stages.items() if _get(r, "status") not in ("done", None)]
    return {"analysis": ", ".join(bad) if bad else "done"}


def _read_all(cell_dir: Path) -> dict[str, Any]:
    return {
        **read_landscape(cell_dir),
        **read_robustness(cell_dir),
        **read_forgetting(cell_dir),
        **read_analysis_status(cell_dir),
    }


# Fixed columns in table order; the per-radius, per-corruption, per-sigma and per-bits ones are made as found.
_FIXED = {
    "lambda_max": Column("lambda_max", "λmax", "float", summary=True),
    "lambda_abs_max": Column("lambda_abs_max", "λ of max |λ|", "float"),
    "hessian_trace": Column("hessian_trace", "tr(H)", "float", summary=True),
    "clean_loss": Column("clean_loss", "clean val loss", "loss", summary=True),
    "robustness_gap": Column("robustness_gap", "robustness gap", "loss", summary=True),
    "forgetting": Column("forgetting", "forgetting", "loss", summary=True),
    "analysis": Column("analysis", "analysis", "text"),
}
_ORDER = ("lambda_max", "lambda_abs_max", "hessian_trace", "sam_sharpness[", "clean_loss", "corrupt_loss[",
          "robustness_gap", "noise_loss[", "quant_loss[", "forgetting", "analysis")  # fmt: skip


def _dynamic(key: str) -> Column:
    inner = key[key.index("[") + 1 : -1]
    if key.startswith("sam_sharpness["):
        return Column(key, f"SAM sharpness ρ={inner.split('=', 1)[1]}", "float", summary=True)
    if key.startswith("corrupt_loss["):
        return Column(key, f"loss {inner}", "loss")
    if key.startswith("noise_loss["):
        return Column(key, f"loss σ={inner.split('=', 1)[1]}", "loss", summary=True)
    return Column(key, f"loss {inner}", "loss", summary=True)  # quant_loss[int8]


def _sort_key(key: str, seen: int) -> tuple[int, float, int]:
    """Kind of measure, then its radius / sigma (ascending) or bits (descending), then the order the files list them
    (corruptions as the suite orders them)."""
    rank = next(i for i, p in enumerate(_ORDER) if key == p or (p.endswith("[") and key.startswith(p)))
    number = _number(key.rsplit("=", 1)[-1].rstrip("]")) if "=" in key else None
    if key.startswith("quant_loss[int"):
        number = -(_number(key[len("quant_loss[int") : -1]) or 0.0)  # int8 before int4
    return rank, number if number is not None else 0.0, seen


def discover(cell_dirs: Sequence[Path]) -> tuple[Column, ...]:
    """The flatness columns some cell of ``cell_dirs`` has a value for, in table order."""
    found: dict[str, int] = {}
    for cell_dir in cell_dirs:
        for key in _read_all(cell_dir):
            found.setdefault(key, len(found))
    return tuple(_FIXED.get(k) or _dynamic(k) for k in sorted(found, key=lambda k: _sort_key(k, found[k])))


FLATNESS = Provider("flatness", _read_all, (), discover=discover)
"""The report's provider of every column above (registered in report_cells.PROVIDERS)."""

if FLATNESS not in PROVIDERS:  # the report's default providers (a reload must not add it twice)
    PROVIDERS.append(FLATNESS)
