"""flatlm ablate end to end: cells as processes, statuses, a diverging cell reported with its log while the others
finish, SIGTERM and resume, reruns that skip finished cells; --dry-run of the shipped grids; the orphan guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from flatlm.experiments.ablate import ablate
from flatlm.experiments.cells import classify, steps_done
from flatlm.train.cli import main

REPO = Path(__file__).resolve().parents[2]
GRIDS = REPO / "configs" / "ablations"


# -- the shipped grids ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["cpu-pretrain", "cpu-sft", "gpu-125m"])
def test_shipped_grid_dry_run(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every shipped grid resolves and passes the static checks without data: --dry-run loads none (offline)."""
    path = GRIDS / f"{name}.yaml"
    base = yaml.safe_load(path.read_text()).get("base")
    assert not isinstance(base, str) or (path.parent / base).is_file(), f"{name}: its base {base} is missing"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "out"
    assert main(["ablate", str(path), "--dry-run", f"output_dir={out}"]) == 0
    listing = capsys.readouterr().out
    for optimizer in ("adamw", "adafactor", "lion", "muon", "sam"):
        assert f"\n  {optimizer}-lr" in listing, listing
    lrs = 3 if name == "gpu-125m" else 2
    assert f"{5 * lrs} cells" in listing
    assert not out.exists()  # a dry run writes nothing


def test_report_needs_an_ablation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no grid.json" in capsys.readouterr().err


# -- statuses ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rc", "reached", "ours", "log", "status"),
    [
        (0, True, False, "", "done"),
        (2, False, False, "error: the loss became nan at step 3; lower optim.lr", "diverged"),
        (-9, False, False, "", "oom"),
        (1, False, False, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate", "oom"),
        (0, False, True, "stopped by SIGTERM after step 4", "interrupted"),
        (-15, False, False, "", "interrupted"),
        (2, False, False, "error: data.vocab_size=100000 is more than this corpus supports", "failed"),
        (1, False, False, "Traceback ... KeyError: 'x'", "failed"),
        (1, False, True, "Traceback ... KeyError: 'x'", "failed"),  # crashed by itself while ablate was stopping
        (2, False, True, "error: data.vocab_size=100000 is more than this corpus supports", "failed"),
        (-15, False, True, "", "interrupted"),  # our second signal killed it
        (143, False, True, "", "interrupted"),  # pdeathsig: ablate gone before the cell started
    ],
)
def test_classify(rc: int, reached: bool, ours: bool, log: str, status: str) -> None:
    assert classify(rc, reached, ours, log) == status


# -- end to end ----------------------------------------------------------------------------------------------------

TINY = {
    "data": {"source": "files", "vocab_size": 400, "seq_len": 32, "val_fraction": 0.1},
    "model": {
        "overrides": {
            "num_hidden_layers": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
        }
    },
    "train": {
        "max_steps": 6,
        "global_batch_size": 4,
        "micro_batch_size": 4,
        "eval_every": 0,
        "eval_batches": 1,
        "tensorboard": False,
        "plot": False,
    },
    "schedule": {"warmup_fraction": 0.2},
    "checkpoint": {"every": 0},  # the last step and a SIGTERM save: enough to resume
}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flatlm.train.cli", "ablate", *args]


def cell(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / "cells" / name / "cell.json").read_text())


def wait_for_steps(run_dir: Path, n: int, process: subprocess.Popen[str], timeout: float = 90.0) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} did not reach {n} steps (ablate exit {process.poll()})")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ablate_end_to_end(corpus: Path, tmp_path: Path) -> None:
    """adamw finishes; an sgd cell diverges (status and log tail shown) and the others go on; SIGTERM while the
    lion cell runs stops it with a checkpoint (exit 143); a rerun skips the finished cells and resumes lion from
    its checkpoint; a third run starts nothing."""
    base = json.loads(json.dumps(TINY))
    base["data"]["paths"] = [f"{corpus}/*.txt"]
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "base": base,
                "axes": {
                    "optim.name": {
                        "adamw": None,
                        "sgd": {"optim.lr": 1.0e6, "train.grad_clip": 0.0, "schedule.name": "constant"},
                        "lion": {"optim.lr": [3.0e-4], "train.max_steps": 40},
                    }
                },
            },
            sort_keys=False,  # the cells run in this order
        )
    )
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # 1. run, and stop ablate while the lion cell is training
    first = subprocess.Popen(
        cli(str(grid), f"output_dir={out}"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lion_dir = out / "cells" / "lion-lr3e-4"
    wait_for_steps(lion_dir, 3, first)
    first.send_signal(signal.SIGTERM)
    said, _ = first.communicate(timeout=60)
    assert first.returncode == 143, said
    assert "adamw: done" in said
    assert "sgd: diverged" in said and "the loss became nan" in said  # the cell's own log lines, shown
    assert cell(out, "adamw")["status"] == "done"
    sgd = cell(out, "sgd")
    assert sgd["status"] == "diverged" and sgd["returncode"] == 2 and "the loss became nan" in sgd["log_tail"]
    lion = cell(out, "lion-lr3e-4")
    assert lion["status"] == "interrupted" and lion["attempts"] == 1
    stopped_at = steps_done(lion_dir)
    assert 2 <= stopped_at < 40  # a checkpoint from the SIGTERM (or the cadence), short of the end

    document = json.loads((out / "grid.json").read_text())
    assert document["axes"] == ["optim.name", "optim.lr"] and document["budget"] == "steps"
    by_name = {c["name"]: c for c in document["cells"]}
    assert by_name["lion-lr3e-4"]["max_steps"] == 40 and by_name["lion-lr3e-4"]["flops_per_step"] > 0
    assert by_name["sgd"]["overrides"]["optim.lr"] == 1.0e6
    assert set(lion) >= {"name", "values", "returncode", "wall_s", "command", "log_tail", "flops_per_step"}

    # 2. rerun: finished cells skipped, lion resumes from its checkpoint (not step 0) and finishes
    adamw_log = (out / "cells" / "adamw" / "train.log").stat()
    second = subprocess.run(cli(str(grid), f"output_dir={out}"), capture_output=True, text=True, env=env, timeout=180)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "skipping 2 finished cells: adamw (done), sgd (diverged)" in second.stdout
    assert f"lion-lr3e-4: started (attempt 2, resuming at step {stopped_at} of 40)" in second.stdout
    log = (lion_dir / "train.log").read_text().split("--- flatlm ablate: attempt 2")[1]
    assert f"resuming from {lion_dir / 'checkpoints' / f'step-{stopped_at}'}" in log
    assert cell(out, "lion-lr3e-4")["status"] == "done" and cell(out, "lion-lr3e-4")["attempts"] == 2
    steps = [json.loads(line)["step"] for line in (lion_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # one clean history across the two attempts
    assert cell(out, "adamw")["attempts"] == 1 and cell(out, "sgd")["attempts"] == 1
    assert (out / "cells" / "adamw" / "train.log").stat().st_mtime_ns == adamw_log.st_mtime_ns

    # 3. a third run does nothing (no process started: in-process, seconds)
    lines: list[str] = []
    assert ablate(grid, [f"output_dir={out}"], say=lines.append) == 0
    assert not any(": started" in line for line in lines), lines
    assert lines[1].startswith("skipping 3 finished cells")
    assert all(cell(out, n)["attempts"] == a for n, a in [("adamw", 1), ("sgd", 1), ("lion-lr3e-4", 2)])


# -- the orphan guard ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_cells_die_with_a_killed_ablate(tmp_path: Path) -> None:
    """A parent killed by SIGKILL (no chance to forward anything) still takes its guarded child down (SIGTERM)."""
    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'flatlm.experiments.pdeathsig', str(os.getpid()), "
        "sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    deadline = time.monotonic() + 20
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    time.sleep(0.5)  # the guard has exec'd into the sleeper
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the child outlived its killed parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reaped if it is ours (it is not: it was the parent's)
    except ChildProcessError:
        waited = 0
    if waited:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is dead


# -- job slots -----------------------------------------------------------------------------------------------------


def test_job_slots_share_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs N: on CPU each cell gets cores // N threads; on CUDA each slot its own GPUs (no more slots than GPUs)."""
    from flatlm.errors import FlatlmError
    from flatlm.experiments import runner

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(runner, "_cuda_devices", lambda: 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert runner.slot_environments(3, None) == [{"OMP_NUM_THREADS": "2"}] * 3
    assert runner.slot_environments(16, None) == [{"OMP_NUM_THREADS": "1"}] * 16
    monkeypatch.setattr(runner, "_cuda_devices", lambda: 4)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in runner.slot_environments(4, None)] == ["0", "1", "2", "3"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in runner.slot_environments(2, None)] == ["0,1", "2,3"]
    with pytest.raises(FlatlmError, match="--jobs 5 is more than the 4 GPUs"):
        runner.slot_environments(5, None)


def test_job_slots_split_an_inherited_device_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CUDA_VISIBLE_DEVICES=4,5,6,7 the slots get 4,5 and 6,7 (not 0,1 and 2,3: someone else's GPUs)."""
    from flatlm.experiments import runner

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setattr(runner, "_cuda_devices", lambda: 4)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in runner.slot_environments(2, None)] == ["4,5", "6,7"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in runner.slot_environments(4, None)] == ["4", "5", "6", "7"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in runner.slot_environments(3, None)] == ["4", "5", "6"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a1, GPU-b2")  # UUIDs pass through as spelled
    monkeypatch.setattr(runner, "_cuda_devices", lambda: 2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in runner.slot_environments(2, None)] == ["GPU-a1", "GPU-b2"]


@pytest.mark.timeout(120)
def test_one_ablate_per_output_dir(corpus: Path, tmp_path: Path) -> None:
    """A second ablate on a directory another one is running on would run the same cells twice: refused."""
    from filelock import FileLock

    from flatlm.errors import FlatlmError

    base = json.loads(json.dumps(TINY))
    base["data"]["paths"] = [f"{corpus}/*.txt"]
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": base, "axes": {"seed": [0]}}))  # without the lock: one tiny cell runs
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / ".ablate.lock")), pytest.raises(FlatlmError, match="another flatlm ablate is running"):
        ablate(grid, [f"output_dir={out}"], say=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == [".ablate.lock"]  # nothing written
