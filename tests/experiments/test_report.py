"""The ablation report, on a fabricated grid (no training): 2 optimizers x 2 learning rates x 3 seeds + a failed cell.

The synthetic numbers are built so that each rule is visible: a large seed effect shared by both optimizers (so only
a paired comparison sees the small optimizer effect), lion's cells listed in a different seed order than adamw's (so
pairing by position gives a different answer), a best validation loss that is not the final one, a first step whose
throughput is 10x lower (warm-up), and final training losses whose last-5% mean differs from the last value.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from flatlm.errors import FlatlmError
from flatlm.experiments import report, report_summary
from flatlm.experiments.report import write_report
from flatlm.experiments.stats import PairedDifference, t_interval

STEPS = 40  # last 5% = 2 steps
EVAL_STEPS = (10, 20, 30, 40)
LRS = {"adamw": (1e-3, 3e-3), "lion": (1e-4, 3e-4)}
SEED_ORDER = {"adamw": (0, 1, 2), "lion": (2, 0, 1)}
BASE_VAL = {("adamw", 1e-3): 4.0, ("adamw", 3e-3): 3.8, ("lion", 1e-4): 3.9, ("lion", 3e-4): 3.75}
SEED_EFFECT = {0: 0.0, 1: 0.3, 2: -0.2}
NOISE = {("adamw", 0): 0.004, ("adamw", 1): -0.003, ("adamw", 2): 0.001, ("lion", 0): -0.002, ("lion", 1): 0.003,
         ("lion", 2): -0.004}  # fmt: skip
STATE_BYTES = {"adamw": 2 * 2**20, "lion": 2**20}
FAILED_TAIL = "Traceback (most recent call last):\nRuntimeError: planted failure at step 7"


def best_val(optim: str, lr: float, seed: int) -> float:
    """The best validation loss of a cell (its third eval; the fourth is a little worse)."""
    return BASE_VAL[(optim, lr)] + SEED_EFFECT[seed] + NOISE[(optim, seed)]


def final_val(optim: str, lr: float, seed: int) -> float:
    """The final validation loss of a done cell (its fourth eval): what the best lr is chosen on."""
    return best_val(optim, lr, seed) + 0.02


def train_losses(optim: str, lr: float, seed: int) -> list[float]:
    """Decreasing to about the best validation loss, with a zig-zag so the last-5% mean differs from the last."""
    end = best_val(optim, lr, seed)
    return [end + 4.0 * math.exp(-s / 8) + (0.01 if s % 2 else -0.01) for s in range(1, STEPS + 1)]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _config(optim: str, lr: float, seed: int) -> dict[str, Any]:
    hparams = {"betas": [0.9, 0.99]} if optim == "lion" else {}
    return {
        "seed": seed,
        "train": {"max_steps": STEPS},
        "optim": {"name": optim, "lr": lr, "weight_decay": 0.1, "hparams": hparams},
        "schedule": {"name": "cosine", "warmup_steps": 20, "warmup_fraction": 0.1},
    }


def make_grid(root: Path, diverge: tuple[str, float, int] | None = None) -> Path:
    """Write grid.json and the cell directories; ``diverge`` makes one cell diverged (NaN, no finished eval)."""
    cells = []
    for optim in ("adamw", "lion"):
        for lr in LRS[optim]:
            for seed in SEED_ORDER[optim]:
                name = f"{optim}-lr{lr:g}-s{seed}"
                cells.append((name, optim, lr, seed))
                cell_dir = root / "cells" / name
                losses = train_losses(optim, lr, seed)
                status = "done"
                if diverge == (optim, lr, seed):
                    losses[-5:] = [math.nan] * 5
                    status = "diverged"
                records = [
                    {"step": s, "loss": loss, "lr": lr, "tokens_per_s": 100.0 if s == 1 else 1000.0 + s,
                     "step_time_s": 0.5, "optim_state_bytes": STATE_BYTES[optim], "peak_mem_bytes": (100 + s) * 2**20}
                    for s, loss in enumerate(losses, start=1)
                ]  # fmt: skip
                _write(cell_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
                v = best_val(optim, lr, seed)
                vals = [v + 0.5, v + 0.1, v, v + 0.02] if status == "done" else [v + 0.5, math.nan]
                evals = [
                    {"eval": True, "step": s, "val_loss": x, "val_ppl": math.exp(x)}
                    for s, x in zip(EVAL_STEPS, vals, strict=False)
                ]
                _write(cell_dir / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in evals))
                _write(cell_dir / "config.yaml", yaml.safe_dump(_config(optim, lr, seed)))
                cell = {"name": name, "status": status, "returncode": 0 if status == "done" else 3, "attempts": 1,
                        "wall_s": 20.0 + seed, "max_steps": STEPS, "flops_per_step": 1e9, "log_tail": ""}  # fmt: skip
                _write(cell_dir / "cell.json", json.dumps(cell))
    # One more cell that failed early: a config and a few steps, no eval, its log tail in cell.json.
    failed = "lion-lr0.001-s0"
    cells.append((failed, "lion", 1e-3, 0))
    _write(root / "cells" / failed / "config.yaml", yaml.safe_dump(_config("lion", 1e-3, 0)))
    _write(root / "cells" / failed / "metrics.jsonl", json.dumps({"step": 1, "loss": 9.0, "tokens_per_s": 10.0}) + "\n")
    _write(root / "cells" / failed / "cell.json", json.dumps({"name": failed, "status": "failed", "returncode": 1,
           "attempts": 1, "wall_s": 3.0, "log_tail": FAILED_TAIL}))  # fmt: skip
    grid = {
        "version": 1,
        "grid_file": "configs/ablations/synthetic.yaml",
        "fingerprint": "abc123",
        "baseline": "adamw",
        "budget": "steps",
        "axes": ["optim.name", "optim.lr", "seed"],
        "base": {"seed": 0, "optim": {"name": "adamw", "lr": 3e-3, "hparams": {}}},
        "cells": [
            {"name": name, "values": {"optim.name": optim, "optim.lr": lr, "seed": seed},
             "overrides": {"optim.name": optim, "optim.lr": lr, "seed": seed}, "max_steps": STEPS,
             "flops_per_step": 1e9}
            for name, optim, lr, seed in cells
        ],
    }  # fmt: skip
    _write(root / "grid.json", json.dumps(grid))
    return root


@pytest.fixture
def grid_dir(tmp_path: Path) -> Path:
    return make_grid(tmp_path / "grid")


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests of the numbers skip the PNGs (a second each on 2 busy cores); the plot tests draw them."""
    from flatlm.experiments import report_plots

    monkeypatch.setattr(report_plots, "write_plots", lambda *args: {})


def _results(grid_dir: Path) -> dict[str, Any]:
    write_report(grid_dir)
    return json.loads((grid_dir / "results.json").read_text())


def _optimizer(results: dict[str, Any], label: str) -> dict[str, Any]:
    return next(o for o in results["optimizers"] if o["optimizer"] == label)


def _cell(results: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in results["cells"] if c["name"] == name)


@pytest.mark.timeout(60)
def test_per_cell_numbers(grid_dir: Path, no_plots: None) -> None:
    results = _results(grid_dir)
    assert len(results["cells"]) == 13
    cell = _cell(results, "lion-lr0.0003-s1")
    losses = train_losses("lion", 3e-4, 1)
    assert cell["final_train_loss"] == pytest.approx(np.mean(losses[-2:]))  # last 5% of 40 steps: 2
    assert cell["final_train_loss"] != pytest.approx(losses[-1])
    v = best_val("lion", 3e-4, 1)
    assert cell["best_val_loss"] == pytest.approx(v)
    assert cell["final_val_loss"] == pytest.approx(v + 0.02)
    assert cell["best_val_ppl"] == pytest.approx(math.exp(v))
    assert cell["final_val_ppl"] == pytest.approx(math.exp(v + 0.02))
    assert cell["tokens_per_s"] == pytest.approx(np.mean([1000.0 + s for s in range(2, STEPS + 1)]))  # step 1 left out
    assert cell["peak_mem_bytes"] == (100 + STEPS) * 2**20
    assert cell["optim_state_bytes"] == 2**20
    assert (cell["steps_done"], cell["max_steps"], cell["flops"]) == (STEPS, STEPS, STEPS * 1e9)
    assert (cell["status"], cell["wall_s"], cell["optimizer"], cell["lr"], cell["seed"]) == (
        "done",
        21.0,
        "lion",
        3e-4,
        1,
    )
    assert cell["hparams"] == "weight_decay=0.1, betas=[0.9, 0.99]"
    assert cell["schedule"] == "cosine, warmup 10%"
    failed = _cell(results, "lion-lr0.001-s0")
    assert failed["status"] == "failed"
    assert failed["best_val_loss"] is None and failed["final_val_loss"] is None
    assert failed["optimizer"] == "lion" and failed["lr"] == 1e-3


def test_tail_mean_takes_at_least_one_step() -> None:
    assert report.tail_mean([5.0, 4.0, 3.0]) == 3.0
    assert report.tail_mean(list(range(100))) == pytest.approx(np.mean(range(95, 100)))
    assert report.tail_mean([]) is None
    # 5% of 30 steps is 1.5: the last 2 steps (ceil), not 1 (int): the lengths above cannot tell the two apart.
    assert report.tail_mean([float(s) for s in range(30)]) == 28.5


def test_planted_tail_mean_with_int_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    from flatlm.experiments import stats

    monkeypatch.setattr(stats.math, "ceil", int)  # the bug: round 1.5 steps down to 1
    with pytest.raises(AssertionError):
        test_tail_mean_takes_at_least_one_step()


@pytest.mark.timeout(60)
def test_best_lr_and_interval_match_hand_computation(grid_dir: Path, no_plots: None) -> None:
    results = _results(grid_dir)
    assert results["selection_metric"] == "final_val_loss"
    for optim, best_lr in (("adamw", 3e-3), ("lion", 3e-4)):
        summary = _optimizer(results, optim)
        assert summary["best_lr"] == best_lr
        values = np.array([final_val(optim, best_lr, s) for s in (0, 1, 2)])
        half = scipy_stats.t.ppf(0.975, 2) * values.std(ddof=1) / math.sqrt(3)
        assert summary["metric"]["mean"] == pytest.approx(values.mean())
        assert summary["metric"]["half_width"] == pytest.approx(half)
        assert summary["metric"]["n"] == 3
    assert results["optimizers"][0]["optimizer"] == "adamw" and results["optimizers"][0]["is_baseline"]
    curve = {p["lr"]: p for p in _optimizer(results, "lion")["lr_curve"]}
    assert curve[1e-3]["complete"] is False and curve[1e-3]["n"] == 0  # the failed lr never competes


@pytest.mark.timeout(60)
def test_diverged_seed_disqualifies_its_learning_rate(tmp_path: Path, no_plots: None) -> None:
    """lion at 3e-4 is best on the seeds that survive, but seed 2 diverged there: 1e-4 is the honest choice."""
    results = _results(make_grid(tmp_path / "grid", diverge=("lion", 3e-4, 2)))
    lion = _optimizer(results, "lion")
    assert lion["best_lr"] == 1e-4 and lion["best_lr_complete"] is True
    assert _cell(results, "lion-lr0.0003-s2")["final_train_loss"] is None  # NaN is written as empty, not 'nan'


def _expected_paired() -> tuple[float, float]:
    diffs = np.array([final_val("lion", 3e-4, s) - final_val("adamw", 3e-3, s) for s in (0, 1, 2)])
    return float(diffs.mean()), float(scipy_stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3))


def check_paired(results: dict[str, Any]) -> None:
    """The lion-vs-adamw comparison equals the by-seed hand computation and excludes 0."""
    paired = _optimizer(results, "lion")["vs_baseline"]
    mean, half = _expected_paired()
    assert paired["baseline"] == "adamw"
    assert paired["seeds"] == ["0", "1", "2"]
    assert paired["mean"] == pytest.approx(mean)
    assert paired["half_width"] == pytest.approx(half)
    assert paired["excludes_zero"] is True


@pytest.mark.timeout(60)
def test_paired_difference_is_by_seed(grid_dir: Path, no_plots: None) -> None:
    results = _results(grid_dir)
    check_paired(results)
    assert _optimizer(results, "adamw")["vs_baseline"] is None
    # The data make pairing matter: unpaired, the seed effect swamps the optimizer effect and the interval spans 0.
    lion = [final_val("lion", 3e-4, s) for s in (0, 1, 2)]
    adamw = [final_val("adamw", 3e-3, s) for s in (0, 1, 2)]
    welch = scipy_stats.ttest_ind(lion, adamw, equal_var=False).confidence_interval(0.95)
    assert welch.low < 0 < welch.high
    report_text = (grid_dir / "report.md").read_text()
    mean, half = _expected_paired()
    assert f"{mean:.4f} ± {half:.4f} vs adamw" in report_text


@pytest.mark.timeout(60)
def test_planted_bug_pairing_by_position_is_caught(
    grid_dir: Path, monkeypatch: pytest.MonkeyPatch, no_plots: None
) -> None:
    """A pairing that zips the seeds in listing order (lion's cells are listed 2, 0, 1) must fail check_paired."""

    def by_position(candidate: dict[Any, float], baseline: dict[Any, float]) -> PairedDifference:
        diffs = tuple(c - b for c, b in zip(candidate.values(), baseline.values(), strict=False))
        return PairedDifference(tuple(baseline)[: len(diffs)], diffs, t_interval(diffs))

    monkeypatch.setattr(report_summary, "paired_difference", by_position)
    with pytest.raises(AssertionError):
        check_paired(_results(grid_dir))


@pytest.mark.timeout(60)
def test_csv_and_json_agree(grid_dir: Path, no_plots: None) -> None:
    results = _results(grid_dir)
    with (grid_dir / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results["cells"])
    for row, cell in zip(rows, results["cells"], strict=True):
        assert set(row) == set(cell)
        for key, value in cell.items():
            assert row[key] == ("" if value is None else str(value)), (cell["name"], key)
            if isinstance(value, float):
                assert float(row[key]) == value


@pytest.mark.timeout(60)
def test_report_md_and_plots(grid_dir: Path) -> None:
    path = write_report(grid_dir)
    assert path == grid_dir / "report.md"
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "# Ablation report: configs/ablations/synthetic.yaml"
    assert "equal steps (`budget=steps`): every cell 40 steps" in text
    assert "**baseline**: adamw" in text
    assert "lowest mean final validation loss (at the last evaluation, not the minimum over training)" in text
    assert "| adamw | 0.003 (edge) | 3 |" in text  # the largest lr tried: the optimum may lie beyond
    assert "| lion | 0.0003 | 3 |" in text  # 1e-3 was tried too (and failed)
    assert text.index("## Per optimizer") < text.index("## Per cell") < text.index("## Plots")
    assert "planted failure at step 7" in text and "### `lion-lr0.001-s0`: failed (return code 1)" in text
    pngs = sorted(grid_dir.glob("*.png"))
    assert {p.name for p in pngs} == {
        "train_loss_vs_step.png", "train_loss_vs_wall.png", "lr_sensitivity.png", "best_per_optimizer.png"
    }  # fmt: skip
    for png in pngs:
        assert f"]({png.name})" in text
        assert png.stat().st_size > 15_000, png.name
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 300 and image.shape[1] > 500
        assert float(np.std(image[..., :3])) > 0.05, f"{png.name} is nearly blank"


@pytest.mark.timeout(60)
def test_pending_cells_and_missing_grid(tmp_path: Path) -> None:
    """A grid whose cells never started still reports (rows with status pending); no grid.json is one clear error."""
    root = make_grid(tmp_path / "grid")
    for cell_dir in (root / "cells").iterdir():
        for file in cell_dir.iterdir():
            file.unlink()
        cell_dir.rmdir()
    results = _results(root)
    assert {c["status"] for c in results["cells"]} == {"pending"}
    assert _cell(results, "lion-lr0.0003-s1")["optimizer"] == "lion"  # from the grid's overrides
    assert "Not finished yet" in (root / "report.md").read_text()
    with pytest.raises(FlatlmError, match="no grid.json"):
        write_report(tmp_path / "elsewhere")


@pytest.mark.timeout(60)
def test_a_provider_adds_columns(grid_dir: Path, no_plots: None) -> None:
    """The flatness issue's route: a provider's columns reach the CSV, both tables and results.json."""

    def read_sharpness(cell_dir: Path) -> dict[str, Any]:
        path = cell_dir / "sharpness.json"
        return json.loads(path.read_text()) if path.exists() else {}

    for seed, value in ((0, 10.0), (1, 12.0), (2, 14.0)):
        _write(grid_dir / "cells" / f"lion-lr0.0003-s{seed}" / "sharpness.json", json.dumps({"lambda_max": value}))
    column = report.Column("lambda_max", "λmax", "float", summary=True)
    providers = [*report.PROVIDERS, report.Provider("sharpness", read_sharpness, (column,))]
    text = write_report(grid_dir, providers).read_text()
    with (grid_dir / "results.csv").open(newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["lion-lr0.0003-s2"]["lambda_max"] == "14.0" and rows["adamw-lr0.001-s0"]["lambda_max"] == ""
    results = json.loads((grid_dir / "results.json").read_text())
    extra = _optimizer(results, "lion")["extras"]["lambda_max"]
    assert extra["mean"] == pytest.approx(12.0)
    assert extra["half_width"] == pytest.approx(scipy_stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3))
    per_optimizer = text.split("## Per optimizer")[1].split("## Per cell")[0]
    assert "λmax" in per_optimizer and "12 ± 4.968" in per_optimizer
    assert "λmax" in text.split("## Per cell")[1].split("## Plots")[0]


def _row(name: str, optimizer: str, lr: float, seed: int, loss: float, **axes: Any) -> dict[str, Any]:
    values = {
        "optim.name": optimizer,
        "optim.lr": lr,
        **{k.replace("__", "."): v for k, v in axes.items()},
        "seed": seed,
    }
    return {"name": name, "optimizer": optimizer, "lr": lr, "seed": seed, "status": "done", "best_val_loss": loss,
            "final_val_loss": loss, "max_steps": 10, "steps_done": 10, "_values": values}  # fmt: skip


def test_variants_are_optimizers_and_other_axes_are_context() -> None:
    """sam at two rho values is two optimizers; each data.format compares with adamw of the same format."""
    rows = []
    for fmt, shift in (("text", 0.0), ("chat", 1.0)):
        for seed in (0, 1):
            rows.append(_row(f"adamw-{fmt}-{seed}", "adamw", 1e-3, seed, 3.0 + shift + seed, data__format=fmt))
            for rho, gain in ((0.05, 0.1), (0.1, 0.2)):
                loss = 3.0 + shift + seed - gain
                rows.append(_row(f"sam-{rho}-{fmt}-{seed}", "sam", 1e-3, seed, loss, optim__hparams__rho=rho,
                                 data__format=fmt))  # fmt: skip
    groups, metric = report_summary.summarize(rows, "adamw")
    assert metric == "final_val_loss"
    by_label = {g.label: g for g in groups}
    assert set(by_label) == {
        "adamw data.format=text", "adamw data.format=chat", "sam rho=0.05 data.format=text",
        "sam rho=0.1 data.format=text", "sam rho=0.05 data.format=chat", "sam rho=0.1 data.format=chat",
    }  # fmt: skip
    assert [g.optimizer for g in groups][:2] == ["adamw", "adamw"]  # baselines first
    chat = by_label["sam rho=0.1 data.format=chat"]
    assert chat.baseline == "adamw data.format=chat"
    assert chat.paired is not None and chat.paired.differences == pytest.approx((-0.2, -0.2))
    assert chat.paired.interval.half_width == pytest.approx(0.0)


def test_seed_pairs_skip_missing_seeds_and_n1_has_no_interval() -> None:
    paired = report_summary.paired_difference({0: 1.0, 1: 2.0, 2: 3.5}, {2: 3.0, 0: 0.5})
    assert paired.seeds == (0, 2) and paired.differences == (0.5, 0.5)
    one = t_interval([4.2])
    assert one is not None and one.half_width is None and one.excludes_zero() is None
    assert report.interval_text("loss", one) == "4.2000 (n=1)"
    assert t_interval([]) is None


def test_budget_text_names_flops_and_steps() -> None:
    rows = [_row("adamw-0", "adamw", 1e-3, 0, 3.0), _row("sam-0", "sam", 1e-3, 0, 2.9)]
    rows[1]["max_steps"] = rows[1]["steps_done"] = 5
    rows[0]["flops"], rows[1]["flops"] = 2e9 * 10, 4e9 * 5
    groups, _ = report_summary.summarize(rows, "adamw")
    grid = {
        "budget": "flops",
        "cells": [{"flops_per_step": 2e9, "max_steps": 10}, {"flops_per_step": 4e9, "max_steps": 5}],
    }
    assert report_summary.budget_text(grid, groups) == (
        "equal compute (`budget=flops`): ≈ 2e+10 FLOPs per cell; steps done per cell: adamw 10; sam 5"
    )
    assert (
        report_summary.budget_text({"budget": "steps"}, groups)
        == "equal steps (`budget=steps`); steps done per cell: adamw 10; sam 5"
    )
    # From the steps the cells ran, not their max_steps: sam ran 8 of its 5 (a rerun that kept a longer cell).
    rows[1]["steps_done"], rows[1]["flops"] = 8, 4e9 * 8
    groups, _ = report_summary.summarize(rows, "adamw")
    assert report_summary.budget_text(grid, groups) == (
        "equal compute (`budget=flops`): 2e+10 to 3.2e+10 FLOPs per cell (the cells ran unequal compute); "
        "steps done per cell: adamw 10; sam 8"
    )


def test_best_lr_is_chosen_on_the_final_validation_loss() -> None:
    """An lr whose validation loss was lowest mid-run and then blew up must not win on that early best."""
    rows = [_row(f"adamw-{lr}-{seed}", "adamw", lr, seed, 3.2 + 0.01 * seed) for lr in (1e-3,) for seed in (0, 1)]
    for seed in (0, 1):
        late = _row(f"adamw-1e-2-{seed}", "adamw", 1e-2, seed, 2.9)
        late["final_val_loss"] = 6.0  # best 2.9 at mid-run, 6.0 at the end
        rows.append(late)
    groups, metric = report_summary.summarize(rows, "adamw")
    assert metric == "final_val_loss" and groups[0].best is not None and groups[0].best.lr == 1e-3
    assert groups[0].means["best_val_loss"] == pytest.approx(3.205)  # the best stays a column


def test_planted_selection_on_the_best_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old rule (minimum over training) picks the lr that blew up: the test above would fail on it."""
    monkeypatch.setattr(report_summary, "choose_metric", lambda rows: "best_val_loss")
    with pytest.raises(AssertionError):
        test_best_lr_is_chosen_on_the_final_validation_loss()


@pytest.mark.timeout(60)
def test_a_diverged_cell_does_not_set_the_plot_range(grid_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finite but exploded cell (loss 1e4, worse than at init) must not flatten every other curve to a line."""
    from flatlm.experiments import report_plots

    records = report.read_jsonl(grid_dir / "cells" / "adamw-lr0.001-s0" / "metrics.jsonl")
    for r in records[5:]:
        r["loss"] = 1e4
    _write(grid_dir / "cells" / "adamw-lr0.001-s0" / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    evals = [{"eval": True, "step": 40, "val_loss": 2e4, "val_ppl": math.inf}]
    for seed in (0, 1, 2):
        _write(grid_dir / "cells" / f"adamw-lr0.001-s{seed}" / "eval.jsonl", json.dumps(evals[0]) + "\n")
    limits: dict[str, tuple[float, float]] = {}
    save = report_plots._save

    def capture(fig: Any, path: Path) -> Path:
        limits[path.name] = fig.axes[0].get_ylim()
        return save(fig, path)

    monkeypatch.setattr(report_plots, "_save", capture)
    write_report(grid_dir)
    first = max(train_losses(o, lr, s)[0] for o in LRS for lr in LRS[o] for s in (0, 1, 2))
    assert limits["train_loss_vs_step.png"][1] < first * 1.2
    assert limits["lr_sensitivity.png"][1] < 10.0  # the lr whose loss is 2e4 is a marker along the top


@pytest.mark.timeout(60)
def test_failed_cell_without_a_tail_in_cell_json_shows_the_end_of_its_log(grid_dir: Path, no_plots: None) -> None:
    cell_dir = grid_dir / "cells" / "lion-lr0.001-s0"
    cell = json.loads((cell_dir / "cell.json").read_text())
    cell["log_tail"] = ""
    (cell_dir / "cell.json").write_text(json.dumps(cell))
    (cell_dir / "train.log").write_text("".join(f"log line {i}\n" for i in range(1, 31)) + "MemoryError: planted oom\n")
    text = write_report(grid_dir).read_text()
    section = text.split("## Cells that did not finish")[1]
    assert "MemoryError: planted oom" in section and "log line 12\n" in section
    assert "log line 11\n" not in section  # the last 20 lines only


@pytest.mark.timeout(60)
def test_without_evaluation_the_choice_falls_back_to_training_loss(grid_dir: Path, no_plots: None) -> None:
    for path in grid_dir.glob("cells/*/eval.jsonl"):
        path.unlink()
    results = _results(grid_dir)
    assert results["selection_metric"] == "final_train_loss"
    lion = _optimizer(results, "lion")
    assert lion["best_lr"] == 3e-4
    expected = np.mean([np.mean(train_losses("lion", 3e-4, s)[-2:]) for s in (0, 1, 2)])
    assert lion["metric"]["mean"] == pytest.approx(expected)
    assert "final training loss" in (grid_dir / "report.md").read_text()


def test_a_tuned_baseline_is_compared_at_its_best_variant() -> None:
    """adamw at two beta2 values is two baseline variants: lion is compared with the better one (beta2=0.95)."""
    rows = []
    for seed in (0, 1):
        rows.append(_row(f"adamw-b99-{seed}", "adamw", 1e-3, seed, 3.0 + seed, optim__hparams__beta2=0.99))
        rows.append(_row(f"adamw-b95-{seed}", "adamw", 1e-3, seed, 2.9 + seed, optim__hparams__beta2=0.95))
        rows.append(_row(f"lion-{seed}", "lion", 1e-4, seed, 2.95 + seed))
    groups, _ = report_summary.summarize(rows, "adamw")
    lion = next(g for g in groups if g.optimizer == "lion")
    assert lion.baseline == "adamw beta2=0.95"
    assert lion.paired is not None and lion.paired.differences == pytest.approx((0.05, 0.05))
