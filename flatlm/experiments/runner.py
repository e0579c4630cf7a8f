"""Run an ablation's cells, each as its own process, up to ``jobs`` at once, and record how each ended.

A cell is ``python -m flatlm.train --config cells/<name>/cell.yaml`` (or, with a launch config, ``accelerate launch
--config_file FILE -m flatlm.train --config ...``), stdout and stderr appended to ``cells/<name>/train.log``, wrapped
by ``flatlm.experiments.pdeathsig`` so that it gets SIGTERM if ablate dies (even by SIGKILL). Each cell starts in
its own session: a Ctrl-C on the terminal reaches ablate alone, which forwards one SIGTERM to every running cell's
process group (``flatlm train`` finishes its step, saves a checkpoint and exits 0; a second signal would stop it at
once), marks them interrupted and returns 128 + the signal. Not-yet-started cells stay pending.

Scheduling is one loop in the main thread (start while a slot is free, poll, sleep): signal handlers run there and
no thread is alive when a process is forked. On CUDA machines each slot owns ``gpus // jobs`` devices
(CUDA_VISIBLE_DEVICES); on CPU each cell gets OMP_NUM_THREADS = max(1, cores // jobs).

Rerunning: done and diverged cells (a deterministic outcome) are skipped, said in one line; pending, running (ablate
died), interrupted, failed and oom cells run again, and ``flatlm train`` resumes each from its own checkpoint. A done
cell counts as finished only at exactly its max_steps: after a raise (extending the grid) it runs again and ``flatlm
train`` continues it; a cell past its max_steps never reaches here (``flatlm ablate`` refuses the directory).
On CUDA the slots split the devices this process sees: an inherited CUDA_VISIBLE_DEVICES=4,5,6,7 gives two slots
4,5 and 6,7.

The analysis stage (:mod:`flatlm.experiments.analysis`): when a cell's training ends done, its analysis steps whose
output is missing run one after another in the same slot (each wrapped and signalled like a cell, logged to
``CELL/<kind>.log``), recorded under ``analysis`` in cell.json; a finished cell whose analysis is missing (added to
the grid later, failed, or interrupted) runs only those steps on a rerun. A failed step never fails the grid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from flatlm.config import dump_yaml
from flatlm.errors import FlatlmError
from flatlm.experiments.analysis import Finetune, Step, is_done, output_current, prepare
from flatlm.experiments.analysis import steps as analysis_steps
from flatlm.experiments.cells import (
    CELL_FILE,
    CONFIG_FILE,
    LOG_FILE,
    STOPPED_CODES,
    classify,
    log_tail,
    read_json,
    steps_done,
    write_json,
)
from flatlm.experiments.grid import ResolvedCell

FINISHED = ("done", "diverged")
POLL_S = 0.2


@dataclass
class CellRun:
    cell: ResolvedCell
    dir: Path
    record: dict[str, Any]
    steps: list[Step] = field(default_factory=list)
    """Its analysis stage, in order (done or not)."""
    tried: set[str] = field(default_factory=set)
    """The analysis steps this ablate already ran (a failed one is not retried until the next ablate)."""

    @property
    def name(self) -> str:
        return self.cell.spec.name

    @property
    def max_steps(self) -> int:
        return self.cell.cfg.train.max_steps

    def finished(self) -> bool:
        """Done at exactly its max_steps, or diverged. A done cell below a raised max_steps runs again (flatlm train
        continues it); one past a lowered max_steps is not done either (ablate refuses that directory first)."""
        status = self.record.get("status")
        if status == "done":
            return steps_done(self.dir) == self.max_steps
        return status == "diverged"

    def save(self) -> None:
        write_json(self.dir / CELL_FILE, self.record)

    def next_step(self) -> Step | None:
        """Its first analysis step not done and not yet tried by this ablate (the fine-tune's eval only after the
        fine-tune is done); None when nothing is left or the cell is not done."""
        if self.record.get("status") != "done":
            return None
        records = self.record.get("analysis") or {}
        done = {s.kind for s in self.steps if is_done(s, records.get(s.kind))}
        for step in self.steps:
            if step.kind in done or step.kind in self.tried:
                continue
            if step.kind == "finetune-eval" and "finetune" not in done:
                continue
            return step
        return None

    def needs_work(self) -> bool:
        """Training to run or resume, or (done) an analysis step missing."""
        return not self.finished() or (self.record.get("status") == "done" and self.next_step() is not None)


def cell_runs(
    cells: list[ResolvedCell],
    output_dir: Path,
    analysis: dict[str, list[str]] | None = None,
    finetune: Finetune | None = None,
) -> list[CellRun]:
    """Each cell's directory and record (read back from cell.json when a previous ablate left one), and its analysis
    steps (the grid's ``analysis`` and ``finetune``)."""
    runs = []
    for cell in cells:
        directory = output_dir / "cells" / cell.spec.name
        old = read_json(directory / CELL_FILE) or {}
        record = {
            "name": cell.spec.name,
            "values": cell.spec.values,
            "status": old.get("status", "pending"),
            "returncode": old.get("returncode"),
            "attempts": int(old.get("attempts", 0)),
            "wall_s": float(old.get("wall_s", 0.0)),
            "command": old.get("command", []),
            "log_tail": old.get("log_tail", ""),
            "flops_per_step": cell.flops_per_step,
            "max_steps": cell.cfg.train.max_steps,
        }
        if isinstance(old.get("analysis"), dict):
            record["analysis"] = old["analysis"]
        runs.append(CellRun(cell, directory, record, analysis_steps(directory, analysis or {}, finetune)))
    return runs


def cell_command(config: Path, launch_config: Path | None) -> list[str]:
    train = ["-m", "flatlm.train", "--config", str(config)]
    if launch_config is None:
        return [sys.executable, *train]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config), *train]


def slot_environments(jobs: int, launch_config: Path | None) -> list[dict[str, str]]:
    """Environment variables of each job slot: its GPUs, or its share of the CPU cores."""
    gpus = visible_devices(_cuda_devices())
    if gpus:
        if jobs > len(gpus):
            raise FlatlmError(f"--jobs {jobs} is more than the {len(gpus)} GPUs here; use --jobs {len(gpus)} or fewer")
        per = len(gpus) // jobs
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per : (i + 1) * per])} for i in range(jobs)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return [{"OMP_NUM_THREADS": str(max(1, cores // jobs))} for _ in range(jobs)]


def visible_devices(count: int) -> list[str]:
    """The names of the ``count`` devices this process sees, as a child's CUDA_VISIBLE_DEVICES must spell them.

    A child's CUDA_VISIBLE_DEVICES is read against the machine, not against the parent's: under an inherited
    ``CUDA_VISIBLE_DEVICES=4,5,6,7`` the slots must get ``4,5`` and ``6,7``, not ``0,1`` and ``2,3`` (GPUs that
    belong to someone else). Without the variable the devices are ``0..count-1``.
    """
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is None:
        return [str(i) for i in range(count)]
    names = [part.strip() for part in inherited.split(",") if part.strip()]
    return names[:count]  # torch stops at the first invalid entry; count is what it found


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


@dataclass
class _Running:
    run: CellRun
    process: subprocess.Popen[bytes]
    slot: int
    started: float
    log_start: int
    log: IO[bytes]
    step: Step | None = None
    """The analysis step this process is; None for the cell's training."""


@dataclass
class _Stop:
    signal: int | None = None
    forwarded: list[int] = field(default_factory=list)


def run_cells(
    runs: list[CellRun],
    *,
    jobs: int = 1,
    launch_config: Path | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """Run every unfinished cell; returns 0, or 128 + the signal that stopped ablate (130 Ctrl-C, 143 SIGTERM)."""
    finished = [r for r in runs if not r.needs_work()]
    if finished:
        said = ", ".join(f"{r.name} ({r.record['status']})" for r in finished)
        say(f"skipping {len(finished)} finished cell{'s' * (len(finished) != 1)}: {said}")
    queue = [r for r in runs if r.needs_work()]
    envs = slot_environments(jobs, launch_config)
    free = list(range(jobs))
    running: list[_Running] = []
    stop = _Stop()
    total, started_count = sum(not r.finished() for r in queue), 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        stop.signal = stop.signal or signum
        for job in running:  # once per signal: a second Ctrl-C reaches the cells as their second signal
            _signal_group(job.process, signal.SIGTERM)

    in_main = threading.current_thread() is threading.main_thread()  # handlers live in the main thread only
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        while running or (queue and stop.signal is None):
            while queue and free and stop.signal is None:
                run = queue.pop(0)
                slot = free.pop(0)
                if run.finished():  # done before: only analysis steps are missing
                    running.append(_start_step(run, run.next_step(), slot, envs[slot], say))  # type: ignore[arg-type]
                    continue
                started_count += 1
                running.append(_start(run, slot, envs[slot], launch_config))
                say(f"[{started_count}/{total}] {run.name}: started ({_resume_note(run)})")
            for job in list(running):
                if job.process.poll() is None:
                    continue
                running.remove(job)
                if job.step is None:
                    _finish(job, interrupted=stop.signal is not None, say=say)
                else:
                    _finish_step(job, interrupted=stop.signal is not None, say=say)
                step = job.run.next_step() if stop.signal is None else None
                if step is not None:  # the cell's analysis goes on in its slot (its devices, its cores)
                    running.append(_start_step(job.run, step, job.slot, envs[job.slot], say))
                else:
                    free.append(job.slot)
            time.sleep(POLL_S)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if stop.signal is None else 128 + stop.signal


def _resume_note(run: CellRun) -> str:
    done = steps_done(run.dir)
    attempt = f"attempt {run.record['attempts']}"
    return f"{attempt}, resuming at step {done} of {run.max_steps}" if done else f"{attempt}, {run.max_steps} steps"


def _start(run: CellRun, slot: int, env_extra: dict[str, str], launch_config: Path | None) -> _Running:
    run.dir.mkdir(parents=True, exist_ok=True)
    config = run.dir / CONFIG_FILE
    config.write_text(dump_yaml(run.cell.cfg))
    command = cell_command(config, launch_config)
    log_path = run.dir / LOG_FILE
    log = log_path.open("ab")
    log_start = log.tell()
    log.write(f"--- flatlm ablate: attempt {run.record['attempts'] + 1}: {' '.join(command)}\n".encode())
    log.flush()
    run.record.update(status="running", returncode=None, attempts=run.record["attempts"] + 1, command=command)
    run.save()
    return _Running(run, _spawn(command, log, env_extra), slot, time.monotonic(), log_start, log)


def _spawn(command: list[str], log: IO[bytes], env_extra: dict[str, str]) -> subprocess.Popen[bytes]:
    """``command`` under the pdeathsig guard, in its own session, output appended to ``log``."""
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1"}
    guarded = [sys.executable, "-m", "flatlm.experiments.pdeathsig", str(os.getpid()), *command]
    return subprocess.Popen(
        guarded, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
    )


def _start_step(run: CellRun, step: Step, slot: int, env_extra: dict[str, str], say: Callable[[str], None]) -> _Running:
    """Start one analysis step of a done cell, recorded as running under cell.json's ``analysis``."""
    run.tried.add(step.kind)
    prepare(step)
    log = (run.dir / step.log).open("ab")
    log_start = log.tell()
    records = run.record.setdefault("analysis", {})
    attempts = int((records.get(step.kind) or {}).get("attempts", 0)) + 1
    log.write(f"--- flatlm ablate: {step.kind} attempt {attempts}: {' '.join(step.command)}\n".encode())
    log.flush()
    records[step.kind] = {"status": "running", "attempts": attempts, "returncode": None, "log": step.log,
                          "command": step.command, "args": list(step.args)}  # fmt: skip
    run.save()
    say(f"{run.name}: {step.kind} started (log {run.dir / step.log})")
    return _Running(run, _spawn(step.command, log, env_extra), slot, time.monotonic(), log_start, log, step)


def _finish_step(job: _Running, *, interrupted: bool, say: Callable[[str], None]) -> None:
    """Record how an analysis step ended: done (exit 0 and its output there), interrupted, or failed."""
    job.log.close()
    run, step, rc = job.run, job.step, job.process.returncode
    assert step is not None
    wall = time.monotonic() - job.started
    if rc == 0 and output_current(step):
        status = "done"
    elif interrupted and (rc in STOPPED_CODES or rc in (-signal.SIGKILL, 128 + signal.SIGKILL)):
        status = "interrupted"
    else:
        status = "failed"
    tail = "" if status == "done" else log_tail(run.dir / step.log, job.log_start)
    record = run.record.setdefault("analysis", {}).setdefault(step.kind, {})
    record.update(status=status, returncode=rc, wall_s=round(wall, 3), log_tail=tail)
    run.save()
    line = f"{run.name}: {step.kind} {status} (exit {rc}, {wall:.1f} s)"
    if status == "failed":
        indented = "\n".join("    " + t for t in tail.splitlines())
        line += f"; the cell stays done; the end of {run.dir / step.log}:\n{indented}"
    say(line)


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)  # the cell's own session: the launcher and its ranks


def _finish(job: _Running, *, interrupted: bool, say: Callable[[str], None]) -> None:
    job.log.close()
    run, rc = job.run, job.process.returncode
    wall = time.monotonic() - job.started
    text = log_tail(run.dir / LOG_FILE, job.log_start, lines=400)
    status = classify(rc, steps_done(run.dir) == run.max_steps, interrupted, text)
    tail = "" if status == "done" else log_tail(run.dir / LOG_FILE, job.log_start)
    run.record.update(status=status, returncode=rc, wall_s=round(run.record["wall_s"] + wall, 3), log_tail=tail)
    run.save()
    line = f"{run.name}: {status} (exit {rc}, {wall:.1f} s, step {steps_done(run.dir)}/{run.max_steps})"
    if status in ("failed", "oom", "diverged"):
        indented = "\n".join("    " + t for t in tail.splitlines())
        line += f"; the end of {run.dir / LOG_FILE}:\n{indented}"
    say(line)
