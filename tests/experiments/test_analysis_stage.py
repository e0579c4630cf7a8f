"""The grid's analysis stage: parsing the ``analysis:`` / ``finetune:`` keys, --dry-run listing the commands, and the
runner calling the analyses after a done cell, skipping them on a rerun, rerunning a missing one and recording a
failure without failing the grid. Training and analyses are tiny fake processes (python -c), no torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from flatlm.errors import FlatlmError
from flatlm.experiments import analysis as analysis_mod
from flatlm.experiments import runner
from flatlm.experiments.ablate import ablate, summary
from flatlm.experiments.budget import apply_budget
from flatlm.experiments.grid import load_grid, resolve_cells
from flatlm.experiments.runner import cell_runs, run_cells

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "model.overrides.num_hidden_layers=1",
    "model.overrides.hidden_size=32",
    "model.overrides.intermediate_size=64",
]
ANALYSIS = {"landscape": ["--batches", 1, "--rho", "0.01,0.05", "--no-plane"], "eval": ["--corrupt", "default"]}
BODY = {"overrides": {"train.max_steps": 3}, "axes": {"optim.name": ["adamw", "lion", "sgd"]}, "analysis": ANALYSIS}

FAKE_TRAIN = """
import json, pathlib, sys, yaml
config = pathlib.Path(sys.argv[1])
tree = yaml.safe_load(config.read_text())
if tree["optim"]["name"] == "sgd":
    sys.exit("planted training failure")
records = [{"step": s, "loss": 5.0 - 0.1 * s} for s in range(1, tree["train"]["max_steps"] + 1)]
(config.parent / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in records))
"""
FAKE_ANALYSIS = """
import json, pathlib, sys
kind, run_dir, out, name = sys.argv[1:5]
run_dir, out = pathlib.Path(run_dir), pathlib.Path(out)
with open(run_dir / "calls.txt", "a") as f:
    f.write(kind + " " + " ".join(sys.argv[5:]) + "\\n")
if (run_dir / ("fail-" + kind)).exists():
    sys.exit("planted analysis failure")
args = sys.argv[5:]
def option(name, default):
    return int(args[args.index(name) + 1]) if name in args else default
batches, batch_size, seed = option("--batches", 8), option("--batch-size", 2), option("--seed", 0)
metrics = run_dir / "metrics.jsonl"
step = max([json.loads(line)["step"] for line in metrics.read_text().splitlines()] or [0]) if metrics.exists() else 0
out.mkdir(parents=True, exist_ok=True)
loss = 3.0 if "--val-of" in sys.argv else 2.5  # the fine-tuned model on the cell's text: worse (forgetting)
header = {"version": 1, "kind": kind, "step": step, "seed": seed, "batches": batches, "batch_size": batch_size,
          "seq_len": 16, "documents": batches * batch_size}
(out / name).write_text(json.dumps({**header, "clean": {"loss": loss, "tokens": batches * batch_size * 16}}))
print(kind, "written")
"""


def write_grid(tmp_path: Path, body: dict[str, Any] = BODY) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training and both analyses become tiny python -c processes (the runner's wrapping, logs and records stay)."""
    monkeypatch.setattr(runner, "cell_command", lambda config, launch: [sys.executable, "-c", FAKE_TRAIN, str(config)])

    def fake_analysis(kind: str, run_dir: Path, out: Path, args: list[str]) -> list[str]:
        return [sys.executable, "-c", FAKE_ANALYSIS, kind, str(run_dir), str(out), analysis_mod.ANALYSES[kind], *args]

    monkeypatch.setattr(analysis_mod, "analysis_command", fake_analysis)


def runs_of(tmp_path: Path, body: dict[str, Any] = BODY) -> list[runner.CellRun]:
    out = tmp_path / "out"
    grid = load_grid(write_grid(tmp_path, body), [f"output_dir={out}", *SMALL])
    cells = resolve_cells(grid)
    apply_budget(grid, cells)
    runs = cell_runs(cells, out, grid.analysis, grid.finetune)
    for run in runs:
        run.dir.mkdir(parents=True, exist_ok=True)
    return runs


def calls(run: runner.CellRun) -> list[str]:
    path = run.dir / "calls.txt"
    return path.read_text().splitlines() if path.is_file() else []


def record(run: runner.CellRun) -> dict[str, Any]:
    return json.loads((run.dir / "cell.json").read_text())


# -- parsing -------------------------------------------------------------------------------------------------------


def test_the_analysis_key_is_parsed(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path), SMALL)
    assert grid.analysis == {"landscape": ["--batches", "1", "--rho", "0.01,0.05", "--no-plane"],
                             "eval": ["--corrupt", "default"]}  # fmt: skip
    assert load_grid(write_grid(tmp_path, {**BODY, "analysis": {"eval": None}}), SMALL).analysis == {"eval": []}
    assert load_grid(write_grid(tmp_path, {k: v for k, v in BODY.items() if k != "analysis"}), SMALL).analysis == {}


@pytest.mark.parametrize(
    ("analysis", "message"),
    [
        ({"landscap": []}, r"analysis kind 'landscap' is unknown \(did you mean 'landscape'\?\); valid kinds"),
        ({"eval": "--corrupt default"}, r"analysis 'eval' must be a list of command-line arguments"),
        ({"eval": [["--corrupt"]]}, "must be a list of command-line arguments"),
        ({"eval": [True]}, "must be a list of command-line arguments"),
        ({"eval": ["--out", "x"]}, "sets --out; drop it"),
        ({"eval": ["--out=x"]}, "sets --out; drop it"),
        (["landscape"], "grid 'analysis' must be a mapping"),
    ],
)
def test_analysis_mistakes_are_one_error(tmp_path: Path, analysis: Any, message: str) -> None:
    with pytest.raises(FlatlmError, match=message):
        load_grid(write_grid(tmp_path, {**BODY, "analysis": analysis}), SMALL)


def test_the_finetune_key_is_parsed(tmp_path: Path) -> None:
    sft = str(REPO / "configs" / "sft-tiny.yaml")
    grid = load_grid(write_grid(tmp_path, {**BODY, "finetune": {"config": sft, "overrides": {"train.max_steps": 4}}}))
    assert grid.finetune is not None and grid.finetune.max_steps == 4
    with pytest.raises(FlatlmError, match="finetune config .* does not exist"):
        load_grid(write_grid(tmp_path, {**BODY, "finetune": {"config": "nope.yaml"}}))
    with pytest.raises(FlatlmError, match="finetune config .* is invalid"):
        load_grid(write_grid(tmp_path, {**BODY, "finetune": {"config": sft, "overrides": {"train.max_step": 4}}}))


def test_dry_run_shows_the_analysis_commands(tmp_path: Path) -> None:
    said: list[str] = []
    out = tmp_path / "out"
    assert ablate(write_grid(tmp_path), [f"output_dir={out}", *SMALL], dry_run=True, say=said.append) == 0
    text = "\n".join(said)
    cell = out / "cells" / "<cell>"
    assert f"landscape: {sys.executable} -m flatlm landscape {cell} --out {cell / 'analysis'} --batches 1" in text
    assert f"eval {cell} --out {cell / 'analysis'} --corrupt default  (log: {cell / 'eval.log'})" in text
    assert not out.exists()


# -- running -------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_analyses_run_after_done_cells_skip_on_rerun_and_record_failures(tmp_path: Path, fakes: None) -> None:
    said: list[str] = []
    runs = runs_of(tmp_path)
    assert run_cells(runs, say=said.append) == 0
    adamw, lion, sgd = runs
    for run in (adamw, lion):
        assert record(run)["status"] == "done"
        assert calls(run) == ["landscape --batches 1 --rho 0.01,0.05 --no-plane", "eval --corrupt default"]
        assert (run.dir / "analysis" / "landscape.json").is_file() and (
            run.dir / "analysis" / "robustness.json"
        ).is_file()
        assert "landscape written" in (run.dir / "landscape.log").read_text()  # its own log, beside train.log
        assert {k: v["status"] for k, v in record(run)["analysis"].items()} == {"landscape": "done", "eval": "done"}
    assert record(sgd)["status"] == "failed" and calls(sgd) == [] and "analysis" not in record(sgd)

    # A rerun: nothing to do for the done cells (their JSON exists): no analysis process starts.
    said.clear()
    runs = runs_of(tmp_path)
    assert run_cells(runs, say=said.append) == 0
    assert calls(runs[0]) == calls(adamw) and len(calls(runs[0])) == 2
    assert "skipping 2 finished cells: adamw (done), lion (done)" in said[0]

    # A missing analysis (interrupted, or added later) reruns alone; a failing one is recorded, the cell stays done.
    (runs[0].dir / "analysis" / "robustness.json").unlink()
    (runs[1].dir / "analysis" / "robustness.json").unlink()
    (runs[1].dir / "fail-eval").touch()
    said.clear()
    runs = runs_of(tmp_path)
    assert run_cells(runs, say=said.append) == 0
    assert calls(runs[0])[-1] == "eval --corrupt default" and len(calls(runs[0])) == 3  # only eval ran again
    assert (runs[0].dir / "analysis" / "robustness.json").is_file()
    lion_record = record(runs[1])
    assert lion_record["status"] == "done"
    assert lion_record["analysis"]["eval"]["status"] == "failed" and lion_record["analysis"]["eval"]["returncode"] == 1
    assert "planted analysis failure" in lion_record["analysis"]["eval"]["log_tail"]
    assert lion_record["analysis"]["eval"]["attempts"] == 2 and lion_record["analysis"]["landscape"]["status"] == "done"
    assert any("lion: eval failed" in line and "the cell stays done" in line for line in said)
    assert "done (eval failed)" in summary(runs)


@pytest.mark.timeout(60)
def test_planted_runner_without_the_done_check_is_caught(
    tmp_path: Path, fakes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage that ignores the JSON it wrote would run every analysis again on a rerun: the call count sees it."""
    runs = runs_of(tmp_path, {**BODY, "axes": {"optim.name": ["adamw"]}})
    run_cells(runs, say=lambda _: None)
    monkeypatch.setattr(runner, "is_done", lambda step, record=None: False)
    runs = runs_of(tmp_path, {**BODY, "axes": {"optim.name": ["adamw"]}})
    run_cells(runs, say=lambda _: None)
    assert len(calls(runs[0])) != 2  # the real stage keeps it at 2 (the test above)


FAKE_FINETUNE = """
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
records = [{"step": s, "loss": 2.0} for s in range(1, int(sys.argv[2]) + 1)]
(out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in records))
"""


def _finetune_grid(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A one-cell grid with an eval analysis and a fine-tune stage whose training is FAKE_FINETUNE."""

    def fake_finetune(finetune: analysis_mod.Finetune, cell_dir: Path) -> list[str]:
        return [sys.executable, "-c", FAKE_FINETUNE, str(cell_dir / "finetune"), str(finetune.max_steps)]

    monkeypatch.setattr(analysis_mod, "finetune_command", fake_finetune)
    sft = str(REPO / "configs" / "sft-tiny.yaml")
    return {**BODY, "axes": {"optim.name": ["adamw"]}, "analysis": {"eval": []},
            "finetune": {"config": sft, "overrides": {"train.max_steps": 4}}}  # fmt: skip


@pytest.mark.timeout(120)
def test_finetune_then_its_eval_give_the_forgetting_column(
    tmp_path: Path, fakes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flatlm.experiments.report_flatness import read_forgetting

    body = _finetune_grid(monkeypatch)
    runs = runs_of(tmp_path, body)
    assert run_cells(runs, say=lambda _: None) == 0
    cell = runs[0].dir
    assert calls(runs[0]) == ["eval "]
    assert (cell / "finetune" / "calls.txt").read_text().splitlines() == [f"eval --val-of {cell}"]
    assert {k: v["status"] for k, v in record(runs[0])["analysis"].items()} == {
        "eval": "done", "finetune": "done", "finetune-eval": "done"
    }  # fmt: skip
    assert read_forgetting(cell) == {"forgetting": pytest.approx(0.5)}
    runs = runs_of(tmp_path, body)
    assert not runs[0].needs_work()  # a rerun: the fine-tune is at its max_steps, its eval's JSON exists


def test_finetune_steps_follow_the_analyses(tmp_path: Path) -> None:
    sft = REPO / "configs" / "sft-tiny.yaml"
    finetune = analysis_mod.Finetune(sft, {"train.max_steps": 4, "optim.hparams.betas": [0.9, 0.95]}, 4)
    cell = tmp_path / "cells" / "adamw"
    steps = analysis_mod.steps(cell, {"eval": []}, finetune)
    assert [s.kind for s in steps] == ["eval", "finetune", "finetune-eval"]
    command = steps[1].command
    assert command[1:5] == ["-m", "flatlm.train", "--config", str(sft)]
    assert f"model.init_from={cell}" in command and f"output_dir={cell / 'finetune'}" in command
    assert "optim.hparams.betas=[0.9,0.95]" in command
    assert steps[2].command[-2:] == ["--val-of", str(cell)] and str(cell / "finetune" / "analysis") in steps[2].command
    record = {"status": "done", "analysis": {"eval": {"status": "done", "args": []}}}
    run = runner.CellRun(None, cell, record, steps)  # type: ignore[arg-type]
    (cell / "analysis").mkdir(parents=True)
    (cell / "analysis" / "robustness.json").write_text('{"step": 0}')  # the cell's step (no run yet: 0)
    assert run.next_step() is steps[1]  # eval done: the fine-tune next
    run.tried.add("finetune")
    assert run.next_step() is None  # its eval waits for the fine-tune to be done


@pytest.mark.timeout(120)
def test_the_finetune_eval_reads_the_grid_evals_text(
    tmp_path: Path, fakes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--batches/--batch-size/--seed of the grid's eval go to the fine-tuned model's eval (not --corrupt): forgetting
    compares the same documents. Planted: the old command (--val-of alone) measures other text, and no forgetting is
    reported for it."""
    from flatlm.experiments.report_flatness import read_forgetting

    sft = str(REPO / "configs" / "sft-tiny.yaml")
    grid_eval = ["--batches", "4", "--batch-size=8", "--seed", "3", "--corrupt", "default", "--quantize", "8,4"]
    body = {**BODY, "axes": {"optim.name": ["adamw"]}, "analysis": {"eval": grid_eval},
            "finetune": {"config": sft, "overrides": {"train.max_steps": 4}}}  # fmt: skip

    def fake_finetune(finetune: analysis_mod.Finetune, cell_dir: Path) -> list[str]:
        return [sys.executable, "-c", FAKE_FINETUNE, str(cell_dir / "finetune"), str(finetune.max_steps)]

    monkeypatch.setattr(analysis_mod, "finetune_command", fake_finetune)
    runs = runs_of(tmp_path, body)
    assert run_cells(runs, say=lambda _: None) == 0
    cell = runs[0].dir
    tuned_calls = (cell / "finetune" / "calls.txt").read_text().splitlines()
    assert tuned_calls == [f"eval --batches 4 --batch-size=8 --seed 3 --val-of {cell}"]
    assert read_forgetting(cell) == {"forgetting": pytest.approx(0.5)}
    # planted: the fine-tuned model measured with the eval's defaults (the old step) reads other documents
    tuned_json = cell / "finetune" / "analysis" / "robustness.json"
    old = json.loads(tuned_json.read_text())
    tuned_json.write_text(json.dumps({**old, "batches": 8, "batch_size": 2, "seed": 0, "documents": 16}))
    assert read_forgetting(cell) == {}


def test_text_arguments_and_the_clean_eval_before_a_finetune(tmp_path: Path) -> None:
    args = ["--data", "a.txt", "b.txt", "--text-field", "body", "--corrupt", "default", "--weights-noise", "0.01"]
    assert analysis_mod.text_arguments(args) == (["--data", "a.txt", "b.txt", "--text-field", "body"], True)
    assert analysis_mod.text_arguments(["--corrupt", "--batches", "2"]) == (["--batches", "2"], False)
    finetune = analysis_mod.Finetune(REPO / "configs" / "sft-tiny.yaml", {}, 4)
    cell = tmp_path / "cells" / "adamw"
    steps = analysis_mod.steps(cell, {"landscape": []}, finetune)  # no eval analysis: a clean one first
    assert [s.kind for s in steps] == ["landscape", "eval", "finetune", "finetune-eval"]
    assert steps[1].command[-4:] == ["eval", str(cell), "--out", str(cell / "analysis")]
    data = analysis_mod.steps(cell, {"eval": args}, finetune)[-1].command
    assert "--val-of" not in data and data[-5:] == ["--data", "a.txt", "b.txt", "--text-field", "body"]


def test_forgetting_needs_both_jsons_on_the_same_text(tmp_path: Path) -> None:
    """No fallback to eval.jsonl's final_val_loss (other windows); any disagreement of the text gives no value."""
    from flatlm.experiments.report_flatness import SAME_TEXT, read_forgetting

    header = {"seq_len": 16, "batch_size": 8, "batches": 4, "seed": 0, "documents": 32}
    cell = tmp_path / "cell"
    (cell / "finetune" / "analysis").mkdir(parents=True)
    (cell / "analysis").mkdir()
    (cell / "eval.jsonl").write_text(json.dumps({"eval": True, "step": 3, "val_loss": 2.0}) + "\n")
    after = {**header, "clean": {"loss": 3.0, "tokens": 512}}
    (cell / "finetune" / "analysis" / "robustness.json").write_text(json.dumps(after))
    assert read_forgetting(cell) == {}  # no robustness.json of the cell: no fallback
    for key in (*SAME_TEXT, "tokens"):
        before = {**header, "clean": {"loss": 2.5, "tokens": 512}}
        if key == "tokens":
            before["clean"]["tokens"] = 500
        else:
            before[key] = header[key] + 1
        (cell / "analysis" / "robustness.json").write_text(json.dumps(before))
        assert read_forgetting(cell) == {}, key
    (cell / "analysis" / "robustness.json").write_text(json.dumps({**header, "clean": {"loss": 2.5, "tokens": 512}}))
    assert read_forgetting(cell) == {"forgetting": pytest.approx(0.5)}


def _with_steps(body: dict[str, Any], max_steps: int) -> dict[str, Any]:
    return {**body, "overrides": {**body["overrides"], "train.max_steps": max_steps}}


@pytest.mark.timeout(120)
def test_stale_or_changed_analyses_run_again(tmp_path: Path, fakes: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JSON of an older step (max_steps raised, the cell resumed) reruns and the old one moves aside; the same step
    skips; a changed argument list reruns that analysis alone. Planted: the old existence check keeps the stale JSON."""
    body = {**BODY, "axes": {"optim.name": ["adamw"]}}
    run_cells(runs_of(tmp_path, body), say=lambda _: None)
    runs = runs_of(tmp_path, body)
    assert not runs[0].needs_work() and len(calls(runs[0])) == 2  # same step, same args: skipped
    assert record(runs[0])["analysis"]["eval"]["args"] == ["--corrupt", "default"]
    raised = _with_steps(body, 5)
    run_cells(runs_of(tmp_path, raised), say=lambda _: None)
    cell = runs[0].dir
    assert len(calls(runs[0])) == 4
    assert json.loads((cell / "analysis" / "landscape.json").read_text())["step"] == 5
    assert json.loads((cell / "analysis" / "landscape.json.stale").read_text())["step"] == 3
    changed = {**raised, "analysis": {**ANALYSIS, "landscape": ["--batches", 2]}}
    runs = runs_of(tmp_path, changed)
    assert [s.kind for s in runs[0].steps if not analysis_mod.is_done(s, record(runs[0])["analysis"].get(s.kind))] == [
        "landscape"
    ]
    run_cells(runs, say=lambda _: None)
    assert calls(runs[0])[4:] == ["landscape --batches 2"]
    # planted: a JSON that merely exists counts as done, so the next raise leaves the step-5 analyses in place
    monkeypatch.setattr(analysis_mod, "output_current", lambda step: step.done.exists())
    run_cells(runs_of(tmp_path, {**_with_steps(changed, 7)}), say=lambda _: None)
    assert json.loads((cell / "analysis" / "landscape.json").read_text())["step"] != 7


@pytest.mark.timeout(120)
def test_a_finetune_of_an_older_cell_step_is_redone(
    tmp_path: Path, fakes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = _finetune_grid(monkeypatch)
    run_cells(runs_of(tmp_path, body), say=lambda _: None)
    cell = runs_of(tmp_path, body)[0].dir
    assert json.loads((cell / analysis_mod.FINETUNE_SOURCE).read_text()) == {"cell_step": 3}
    assert not runs_of(tmp_path, body)[0].needs_work()
    run_cells(runs_of(tmp_path, _with_steps(body, 5)), say=lambda _: None)
    assert json.loads((cell / analysis_mod.FINETUNE_SOURCE).read_text()) == {"cell_step": 5}
    assert (cell / "finetune.old-0" / "analysis" / "robustness.json").is_file()  # the old one, moved aside
    assert {k: v["status"] for k, v in record(runs_of(tmp_path, body)[0])["analysis"].items()} == {
        "eval": "done", "finetune": "done", "finetune-eval": "done"
    }  # fmt: skip
    assert not runs_of(tmp_path, _with_steps(body, 5))[0].needs_work()
