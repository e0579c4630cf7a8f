"""Running a launch plan: the launcher as a child in a session of its own, stop signals relayed to all of its
processes, and an exit status a batch script can act on.

* The launcher (accelerate's torchrun agent, or DeepSpeed's runner) starts in its own session, so a terminal's
  Ctrl-C reaches ``flatlm launch`` alone and is relayed once, not delivered to every process by the terminal and
  again by each launcher.
* SIGTERM and SIGINT received here go to the launcher and every process below it (``psutil`` descendants: torchrun
  starts each worker in a session of its own, so a process group would miss them), as SLURM's ``--signal`` and
  ``scancel`` deliver them. SIGUSR1 is relayed as SIGTERM: ``srun`` forwards SIGUSR1 to its tasks as it is, and
  SIGUSR1 would end the workers, while SIGTERM makes them finish the step and save (``flatlm.train.preemption``,
  which also takes the copies arriving twice as one request).
* ``flatlm launch`` is the child subreaper of its tree (Linux): a launcher that dies of the signal (DeepSpeed's
  runner has no handler) leaves its workers to it, and it returns only when every process has ended. Under
  ``srun`` the step ends when its task does, and would kill workers still writing their checkpoint.
* Exit status: the launcher's; after a relayed stop, 75 (``EX_TEMPFAIL``: stopped, resumable) when the launcher
  returned one of the statuses it gives for a stop (``Plan.stop_statuses``), so a batch script requeues the job on
  75 and the rerun resumes from ``output_dir/checkpoints/latest``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from flatlm.launch.plan import Plan

EX_TEMPFAIL = 75
RELAYED = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT, signal.SIGUSR1: signal.SIGTERM}
_PR_SET_CHILD_SUBREAPER = 36


def visible_gpus(environ: Mapping[str, str]) -> int | None:
    """GPUs this process may use, without importing torch: ``CUDA_VISIBLE_DEVICES`` when set, else the lines of
    ``nvidia-smi -L``; None when neither says (no NVIDIA driver: a CPU machine)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in (x.strip() for x in visible.split(",")) if v]
        return 0 if not ids or ids[0] == "-1" else len(ids)
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(line.startswith("GPU ") for line in done.stdout.splitlines()) or None


def write_hostfile(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file beside it, then a rename): launchers on other
    nodes sharing the directory, or a rerun, never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _become_subreaper() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


class _Relay:
    """Signal handlers that relay stop signals to the launcher's whole tree, recording that a stop was asked for."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _Relay:
        for sig in RELAYED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = RELAYED[signal.Signals(signum)]
        self.stopped = self.stopped or signum
        name = signal.Signals(signum).name
        print(f"flatlm launch: {name} received; relaying {sig.name} to the launcher and its workers", file=sys.stderr)
        if self.proc is not None:  # else ``start`` relays it as soon as the launcher exists
            send_tree(self.proc.pid, sig)

    def start(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.proc = subprocess.Popen(argv, env=env, start_new_session=True)
        if self.stopped is not None:
            send_tree(self.proc.pid, RELAYED[signal.Signals(self.stopped)])
        return self.proc


def send_tree(pid: int, sig: int) -> None:
    """``sig`` to ``pid`` and every process below it."""
    import psutil  # a dependency of accelerate and DeepSpeed; imported only when a job runs

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(sig)


def _reap_orphans() -> None:
    """Wait for the processes left to this subreaper once the launcher is gone (workers finishing a save)."""
    import psutil

    while True:
        children = psutil.Process().children(recursive=True)
        if not children:
            return
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG) != (0, 0):  # reap the orphans re-parented here
                pass
        psutil.wait_procs(children, timeout=1.0)
        time.sleep(0.1)


def execute(plan: Plan, environ: Mapping[str, str]) -> int:
    """Run ``plan`` to its end; the exit status as described in the module docstring."""
    _become_subreaper()
    with _Relay() as relay:  # handlers first: a stop that comes while the launcher starts is not lost
        status = relay.start(plan.argv, {**environ, **plan.env}).wait()
        _reap_orphans()
    if relay.stopped is not None and status in plan.stop_statuses:
        print(
            f"flatlm launch: stopped by {signal.Signals(relay.stopped).name} (launcher status {status}); "
            f"exit {EX_TEMPFAIL}: rerun the same command to resume",
            file=sys.stderr,
        )
        return EX_TEMPFAIL
    return status if status >= 0 else 128 - status
