"""Flatness and robustness columns in the ablation report, from hand-written analysis JSON (no torch, no training):
discovered columns, the per-optimizer aggregate, the old report unchanged without analysis, the adversarial method,
the sharpness-vs-robustness scatter and a failed analysis."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest

from flatlm.experiments import report, report_flatness, report_plots, report_summary
from flatlm.experiments.report_cells import PROVIDERS, config_columns
from flatlm.experiments.report_flatness import FLATNESS
from tests.experiments.test_report import _row, make_grid

LION_BEST = "lion-lr0.0003-s{}"  # lion's best lr (test_report's numbers)
ADAMW_BEST = "adamw-lr0.003-s{}"


def landscape(lam: float, sam: dict[float, float], trace: float = 100.0) -> dict[str, Any]:
    return {
        "version": 1, "checkpoint": "checkpoints/step-40", "step": 40, "seed": 0, "batches": 1, "tokens": 512,
        "loss": 3.8,
        "hessian": {"lambda_max": {"value": lam, "iterations": 10, "rel_change": 1e-3, "converged": True,
                                   "history": [lam / 2, lam]},
                    "top_k": {"values": [lam * 1.01, lam / 2], "iterations": 8, "residuals": [0.1, 0.2]},
                    "trace": {"value": trace, "samples": 4, "stderr": 1.0, "rel_change": 0.1, "history": [trace]}},
        "sam_sharpness": [{"rho": rho, "value": v, "steps": 2, "history": [v]} for rho, v in sam.items()],
        "line": None, "interpolation": None, "plane": None,
    }  # fmt: skip


def robustness(clean: float, corrupt: dict[str, float], noise: dict[float, float], quant: dict[int, float]) -> dict:
    corruptions = [{"name": n, "kind": n.split(":")[0], "rate": float(n.split(":")[1]), "loss": x, "ppl": math.exp(x),
                    "gap": x - clean} for n, x in corrupt.items()]  # fmt: skip
    return {
        "version": 1, "checkpoint": "checkpoints/step-40", "step": 40, "seed": 0, "batches": 1,
        "clean": {"loss": clean, "ppl": math.exp(clean), "tokens": 512},
        "corruptions": corruptions,
        "corruption_gap_mean": sum(c["gap"] for c in corruptions) / len(corruptions),
        "weight_noise": [{"sigma": s, "draws": 2, "loss": x, "loss_std": 0.01, "gap": x - clean}
                         for s, x in noise.items()],
        "quantize": [{"bits": b, "loss": x, "gap": x - clean, "rel_error": 0.01} for b, x in quant.items()],
    }  # fmt: skip


def _write_analysis(cell_dir: Path, name: str, data: dict[str, Any]) -> None:
    (cell_dir / "analysis").mkdir(parents=True, exist_ok=True)
    (cell_dir / "analysis" / name).write_text(json.dumps(data))


def analysed_grid(root: Path) -> Path:
    """test_report's grid with both analyses on the best-lr cells of lion and adamw (3 seeds each)."""
    make_grid(root)
    for seed in (0, 1, 2):
        for pattern, lam in ((LION_BEST, 10.0), (ADAMW_BEST, 40.0)):
            cell_dir = root / "cells" / pattern.format(seed)
            _write_analysis(cell_dir, "landscape.json", landscape(lam + 2 * seed, {0.01: 0.001 * (seed + 1),
                            0.05: 0.02 + seed * 0.01, 0.1: 0.2}))  # fmt: skip
            clean = 3.8 + 0.1 * seed
            corrupt = {"typo:0.05": clean + 0.3 + 0.1 * seed, "drop:0.1": clean + 0.1}
            _write_analysis(cell_dir, "robustness.json", robustness(clean, corrupt, {0.01: clean + 0.01,
                            0.05: clean + 0.5}, {8: clean + 0.001, 4: clean + 0.7}))  # fmt: skip
    return root


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_plots, "write_plots", lambda *args: {})


def _csv(root: Path) -> dict[str, dict[str, str]]:
    with (root / "results.csv").open(newline="") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def test_flatness_is_a_default_provider() -> None:
    assert FLATNESS in PROVIDERS and sum(p.name == "flatness" for p in PROVIDERS) == 1


@pytest.mark.timeout(60)
def test_without_analysis_the_report_is_unchanged(tmp_path: Path, no_plots: None) -> None:
    """A grid whose cells have no analysis/ gives exactly the report the providers before flatness gave."""
    root = make_grid(tmp_path / "grid")
    old = [p for p in PROVIDERS if p is not FLATNESS]
    texts = []
    for providers in (old, PROVIDERS):
        text = report.write_report(root, providers).read_text()
        texts.append(
            ([line for line in text.splitlines() if "**written**" not in line], (root / "results.csv").read_text())
        )
    assert texts[0] == texts[1]
    assert "λmax" not in texts[1][0] and "robustness" not in texts[1][1]


@pytest.mark.timeout(60)
def test_columns_from_analysis_json(tmp_path: Path, no_plots: None) -> None:
    root = analysed_grid(tmp_path / "grid")
    text = report.write_report(root).read_text()
    rows = _csv(root)
    cell = rows[LION_BEST.format(1)]
    # λmax is Lanczos's top (algebraic) eigenvalue; power iteration's largest-magnitude one is its own column
    assert float(cell["lambda_max"]) == pytest.approx(12.0 * 1.01) and float(cell["hessian_trace"]) == 100.0
    assert float(cell["lambda_abs_max"]) == 12.0
    assert [float(cell[f"sam_sharpness[rho={r}]"]) for r in ("0.01", "0.05", "0.1")] == pytest.approx(
        [0.002, 0.03, 0.2]
    )
    assert float(cell["clean_loss"]) == pytest.approx(3.9)
    assert float(cell["corrupt_loss[typo:0.05]"]) == pytest.approx(3.9 + 0.4)
    assert float(cell["robustness_gap"]) == pytest.approx((0.4 + 0.1) / 2)
    assert float(cell["noise_loss[sigma=0.05]"]) == pytest.approx(4.4)
    assert float(cell["quant_loss[int4]"]) == pytest.approx(4.6)
    assert rows["adamw-lr0.001-s0"]["lambda_max"] == ""  # not analysed: empty, not an error
    header = list(rows[LION_BEST.format(1)])
    assert header.index("quant_loss[int8]") < header.index("quant_loss[int4]")  # 8 bits before 4
    assert header.index("sam_sharpness[rho=0.01]") < header.index("sam_sharpness[rho=0.1]")
    assert header.index("corrupt_loss[typo:0.05]") < header.index("corrupt_loss[drop:0.1]")  # as the file lists them
    results = json.loads((root / "results.json").read_text())
    lion = next(o for o in results["optimizers"] if o["optimizer"] == "lion")
    assert lion["extras"]["lambda_max"]["mean"] == pytest.approx(12.0 * 1.01)  # mean of 10, 12, 14 at its best lr
    assert lion["extras"]["robustness_gap"]["mean"] == pytest.approx(np.mean([0.2, 0.25, 0.3]))
    assert lion["extras"]["sam_sharpness[rho=0.05]"]["n"] == 3
    assert "corrupt_loss[typo:0.05]" not in lion["extras"]  # per-corruption losses are per cell only
    per_optimizer = text.split("## Per optimizer")[1].split("## Per cell")[0]
    assert "robustness gap" in per_optimizer and "SAM sharpness ρ=0.05" in per_optimizer
    assert "loss typo:0.05" in text.split("## Per cell")[1]


@pytest.mark.timeout(60)
def test_planted_radius_collapse_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that keys SAM sharpness without its radius keeps one value of three: the column check sees it."""
    root = analysed_grid(tmp_path / "grid")
    monkeypatch.setattr(report_flatness, "sam_key", lambda rho: "sam_sharpness[rho=any]")
    found = report_flatness.read_landscape(root / "cells" / LION_BEST.format(1))
    assert [k for k in found if k.startswith("sam_sharpness")] != [
        f"sam_sharpness[rho={r}]" for r in ("0.01", "0.05", "0.1")
    ]


def test_missing_and_torn_files_give_empty_columns(tmp_path: Path) -> None:
    cell = tmp_path / "cell"
    assert report_flatness.read_landscape(cell) == {} and report_flatness.read_robustness(cell) == {}
    (cell / "analysis").mkdir(parents=True)
    (cell / "analysis" / "landscape.json").write_text('{"hessian": {"lambda_max": {"val')
    (cell / "analysis" / "robustness.json").write_text(json.dumps({"clean": {"loss": 3.0}, "corruptions": None}))
    assert report_flatness.read_landscape(cell) == {}
    assert report_flatness.read_robustness(cell) == {"clean_loss": 3.0}


def test_adversarial_training_is_its_own_method() -> None:
    """adamw with train.adversarial.steps > 0 is ``adamw+adv``, compared with plain adamw (not its own baseline)."""
    tree = {"optim": {"name": "adamw"}, "train": {"adversarial": {"steps": 2, "epsilon": 0.05}}}
    assert config_columns(tree)["optimizer"] == "adamw+adv"
    assert config_columns({"optim": {"name": "adamw"}, "train": {"adversarial": {"steps": 0}}})["optimizer"] == "adamw"
    rows = []
    for seed in (0, 1, 2):
        rows.append(_row(f"adamw-s{seed}", "adamw", 3e-3, seed, 4.0 + seed, **{"train.adversarial.steps": 0}))
        rows.append(_row(f"adv-s{seed}", "adamw+adv", 3e-3, seed, 4.1 + seed, **{"train.adversarial.steps": 2}))
    groups, _ = report_summary.summarize(rows, "adamw")
    by_label = {g.label: g for g in groups}
    assert set(by_label) == {"adamw", "adamw+adv"}
    assert by_label["adamw+adv"].baseline == "adamw" and by_label["adamw"].is_baseline
    assert by_label["adamw+adv"].paired.interval.mean == pytest.approx(0.1)


def _adversarial_sweep() -> list[dict[str, Any]]:
    """train.adversarial.steps in {0, 2, 4} x seeds 0-2 (epsilon a fixed value of the level): loss 4 + 0.01 K + seed."""
    rows = []
    for steps in (0, 2, 4):
        optimizer = "adamw+adv" if steps else "adamw"
        for seed in (0, 1, 2):
            axes = {"train.adversarial.steps": steps, "train.adversarial.epsilon": 0.05}
            rows.append(_row(f"adamw-adv{steps}-s{seed}", optimizer, 3e-3, seed, 4.0 + 0.01 * steps + seed, **axes))
    return rows


def test_each_adversarial_setting_is_its_own_method() -> None:
    """steps=2 and steps=4 are two methods, each complete with its 3 seeds and its own mean, both paired with adamw."""
    groups, _ = report_summary.summarize(_adversarial_sweep(), "adamw")
    by_label = {g.label: g for g in groups}
    assert set(by_label) == {"adamw", "adamw+adv steps=2", "adamw+adv steps=4"}
    for label, steps in (("adamw", 0), ("adamw+adv steps=2", 2), ("adamw+adv steps=4", 4)):
        best = by_label[label].best
        assert best is not None and best.complete and len(best.rows) == 3 and sorted(best.values) == [0, 1, 2]
        assert best.interval.mean == pytest.approx(4.0 + 0.01 * steps + 1.0)
        assert by_label[label].baseline == "adamw"
    assert by_label["adamw+adv steps=4"].paired.differences == pytest.approx((0.04, 0.04, 0.04))
    # Epsilon swept with steps fixed: the adversarial methods are named by epsilon, the baseline is still adamw.
    rows = [_row(f"adamw-s{s}", "adamw", 3e-3, s, 4.0 + s) for s in (0, 1)]
    for eps in (0.05, 0.1):
        rows += [
            _row(f"adv-e{eps}-s{s}", "adamw+adv", 3e-3, s, 4.0 + eps + s, train__adversarial__epsilon=eps)
            for s in (0, 1)
        ]
    groups, _ = report_summary.summarize(rows, "adamw")
    by_label = {g.label: g for g in groups}
    assert set(by_label) == {"adamw", "adamw+adv epsilon=0.05", "adamw+adv epsilon=0.1"}
    assert by_label["adamw+adv epsilon=0.1"].paired.differences == pytest.approx((0.1, 0.1))


def test_planted_key_without_the_adversarial_setting_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old key (every adversarial axis dropped) merges steps=2 and steps=4: same-seed cells overwrite each other,
    the point is incomplete and its mean is wrong; the checks above see it."""

    def old_key(row: dict[str, Any], method: frozenset[str] = frozenset()) -> tuple[str, tuple[tuple[str, Any], ...]]:
        values = row["_values"]
        variant = tuple((k, v) for k, v in values.items() if k not in ("seed", "optim.lr", "optim.name")
                        and not k.startswith("train.adversarial."))  # fmt: skip
        return str(row["optimizer"]), variant

    monkeypatch.setattr(report_summary, "_group_key", old_key)
    groups, _ = report_summary.summarize(_adversarial_sweep(), "adamw")
    merged = next(g for g in groups if g.optimizer == "adamw+adv")
    assert len(groups) == 2 and len(merged.best.rows) == 6 and not merged.best.complete


@pytest.mark.timeout(90)
def test_scatter_of_sharpness_against_robustness_gap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = analysed_grid(tmp_path / "grid")
    # only the scatter is drawn here (the other figures are test_report's)
    monkeypatch.setattr(report_plots, "plot_train_loss", lambda output_dir, groups, path, x, ceiling=None: path)
    monkeypatch.setattr(report_plots, "plot_lr_sensitivity", lambda groups, metric, path, ceiling: path)
    monkeypatch.setattr(report_plots, "plot_best", lambda groups, metric, path: path)
    text = report.write_report(root).read_text()
    png = root / "flatness_vs_robustness.png"
    assert png.is_file() and "](flatness_vs_robustness.png)" in text
    image = matplotlib.image.imread(png)
    assert image.shape[1] > 1000  # two panels: λmax and SAM sharpness at the middle radius
    assert float(np.std(image[..., :3])) > 0.05
    groups, _ = report_summary.summarize(report.cell_rows(root, report.load_grid(root)), "adamw")
    assert [k for k, _ in report_plots.sharpness_measures(groups)] == ["lambda_max", "sam_sharpness[rho=0.05]"]


def test_no_scatter_below_two_cells(tmp_path: Path) -> None:
    rows = [_row("a", "adamw", 3e-3, 0, 4.0), _row("b", "lion", 1e-3, 0, 4.0)]
    rows[0].update(lambda_max=3.0, robustness_gap=0.2)
    rows[1].update(lambda_max=5.0)  # no gap: one cell has both
    groups, _ = report_summary.summarize(rows, "adamw")
    assert report_plots.sharpness_measures(groups) == []
    rows[1]["robustness_gap"] = 0.3
    groups, _ = report_summary.summarize(rows, "adamw")
    assert report_plots.sharpness_measures(groups) == [("lambda_max", "λmax, the top Hessian eigenvalue")]


@pytest.mark.timeout(60)
def test_a_failed_analysis_is_shown(tmp_path: Path, no_plots: None) -> None:
    root = analysed_grid(tmp_path / "grid")
    cell_dir = root / "cells" / ADAMW_BEST.format(0)
    (cell_dir / "analysis" / "robustness.json").unlink()
    record = json.loads((cell_dir / "cell.json").read_text())
    record["analysis"] = {"landscape": {"status": "done", "returncode": 0},
                          "eval": {"status": "failed", "returncode": 2, "log": "eval.log",
                                   "log_tail": "flatlm eval: error: planted analysis failure"}}  # fmt: skip
    (cell_dir / "cell.json").write_text(json.dumps(record))
    text = report.write_report(root).read_text()
    assert _csv(root)[ADAMW_BEST.format(0)]["analysis"] == "eval failed"
    assert _csv(root)[ADAMW_BEST.format(0)]["status"] == "done"
    assert "`adamw-lr0.003-s0`: eval failed (return code 2" in text and "planted analysis failure" in text
