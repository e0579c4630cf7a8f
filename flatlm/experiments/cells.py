"""A cell's directory as ablate sees it: ``cell.json`` (status, attempts, wall time), how far its run got, and how
a finished process is classified.

Statuses (``STATUSES``): pending (never started), running (a process is on it now, or ablate died while it was),
done (the run reached train.max_steps), diverged (the loop stopped on a non-finite loss: ``flatlm train`` raises "the
loss became nan at step N", exit status 2), oom (killed by SIGKILL, as the kernel's OOM killer does, or "out of
memory" in its log), interrupted (stopped by a signal before its last step: SIGTERM/SIGINT make ``flatlm train``
save a checkpoint and exit 0, so a rerun resumes it), failed (anything else, also a cell that crashed by itself
while ablate was stopping; its log tail is kept and shown).
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

STATUSES = ("pending", "running", "done", "failed", "diverged", "oom", "interrupted")
CELL_FILE = "cell.json"
CONFIG_FILE = "cell.yaml"
LOG_FILE = "train.log"
TAIL_LINES = 20
STOPPED_CODES = (0, -signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGINT)
"""Exit statuses of a cell stopped by a signal: flatlm train saves and exits 0 on the first, a second one (or one
outside the loop) kills it; the pdeathsig wrapper exits 128 + SIGTERM when its parent is gone before it starts."""
_DIVERGED = re.compile(r"the loss became (nan|inf|-inf) at step \d+")
_OOM = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.IGNORECASE)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a temporary file renamed over the old one): a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def steps_done(run_dir: Path) -> int:
    """How far the run at ``run_dir`` got: its latest checkpoint's step, else the last step record's, else 0."""
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        state = read_json(run_dir / "checkpoints" / latest.read_text().strip() / "trainer_state.json")
        if state and isinstance(state.get("step"), int):
            return state["step"]
    last = 0
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                last = max(last, int(json.loads(line).get("step", 0)))
            except (ValueError, TypeError, AttributeError):
                continue
    return last


def final_loss(run_dir: Path) -> float | None:
    """The last step record's training loss, if any."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    for line in reversed(metrics.read_text().splitlines()):
        try:
            return float(json.loads(line)["loss"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def log_tail(log: Path, start: int = 0, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``log`` written after byte ``start`` (this attempt's)."""
    try:
        with log.open("rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def classify(returncode: int, reached: bool, interrupted: bool, log_text: str) -> str:
    """The status of a cell process that exited with ``returncode``.

    ``reached``: its run is at train.max_steps; ``interrupted``: ablate itself signalled it (Ctrl-C / SIGTERM).
    """
    if returncode == 0 and reached:
        return "done"
    if _DIVERGED.search(log_text):
        return "diverged"
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL) and not interrupted:
        return "oom"  # the kernel's OOM killer sends SIGKILL
    if _OOM.search(log_text):
        return "oom"
    if returncode in STOPPED_CODES or (interrupted and returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)):
        return "interrupted"  # saved (or killed by a signal) before its last step: a rerun resumes it
    return "failed"  # also a cell that crashed by itself (exit 1, a traceback) while ablate was stopping
