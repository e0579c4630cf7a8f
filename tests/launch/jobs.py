"""Start ``tests.launch.faulty`` (flatlm.train with a planted fault) under ``accelerate launch`` on CPU gloo processes,
in its own session, its output in a file, so that a test can watch the run, signal it and time its end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from flatlm.train.metrics import read_jsonl
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nothing listens on now (jobs that run at once must not share torchrun's default 29500)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_args(out: Path, corpus: Path, **extra: object) -> list[str]:
    """The tiny model on ``corpus``; no evaluation unless asked."""
    return tiny_overrides(out, corpus, **{"train.eval_every": 0, **extra})


@dataclass
class Job:
    """One launcher and its workers (a process group of their own)."""

    proc: subprocess.Popen[bytes]
    out: Path
    log: Path
    exits: Path
    started: float = field(default_factory=time.time)
    ended: float | None = None

    def wait(self, timeout: float) -> int:
        """The launcher's exit status; on a timeout every process of the job is killed and -9 returned."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = -9
        self.ended = self.ended or time.time()
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def signal(self, sig: int, group: bool) -> None:
        """``sig`` to the launcher alone, or to every process of the job, workers included, as SLURM delivers it
        (torchrun starts each worker in a session of its own, so the launcher's process group alone misses them)."""
        if not group:
            self.proc.send_signal(sig)
            return
        for proc in [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)

    def steps(self) -> int:
        path = self.out / "metrics.jsonl"
        return len(read_jsonl(path)) if path.is_file() else 0

    def wait_for_step(self, step: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while self.steps() < step:
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the run never reached step {step}:\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def status(self, rank: int, attempt: int = 0) -> str | None:
        """What ``tests.launch.faulty`` recorded for ``rank``'s normal return (None: it never returned)."""
        path = self.exits / f"rank{rank}.attempt{attempt}"
        return path.read_text() if path.is_file() else None

    def fault_at(self) -> float:
        return float((self.exits / "fault-at").read_text())


def start(
    name: str,
    tmp: Path,
    args: list[str],
    *,
    fault: str = "",
    backend: str = "ddp",
    nproc: int = 2,
    launcher: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Job:
    """``accelerate launch --config_file configs/accelerate/<backend>.yaml --num_processes N [launcher] -m
    tests.launch.faulty ARGS`` with ``FLATLM_TEST_FAULT=fault``."""
    config = ROOT / "configs" / "accelerate" / f"{backend}.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--num_processes", str(nproc), "--main_process_port", str(free_port()), *launcher]
    cmd += ["-m", "tests.launch.faulty", *args]
    return _spawn(tmp / f"{name}-launch", cmd, args, {"FLATLM_TEST_FAULT": fault, **(env or {})})


def _spawn(work: Path, cmd: list[str], args: list[str], env: dict[str, str]) -> Job:
    """``cmd`` in a session of its own, CPU-only, its output in ``work/log``; ``env`` on top of this environment."""
    work.mkdir(parents=True, exist_ok=True)
    log, exits = work / "log", work / "exits"
    environ = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "FLATLM_TEST_FAULT": "",
        "FLATLM_TEST_EXITS": str(exits),
        **env,
    }
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=environ, start_new_session=True)
    return Job(proc, Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1]), log, exits)


def start_node(
    name: str,
    tmp: Path,
    args: list[str],
    *,
    machine_rank: int,
    port: int,
    cache: Path,
    backend: str = "ddp",
    machines: int = 2,
    nproc: int = 2,
    module: str = "tests.launch.faulty",
    env: dict[str, str] | None = None,
) -> Job:
    """One "node" of a multi-node job simulated on this machine: ``accelerate launch --config_file
    configs/accelerate/multinode/<backend>.yaml --num_machines M --machine_rank R --main_process_ip 127.0.0.1
    --main_process_port PORT --num_processes N -m MODULE ARGS``, N the processes over all nodes, MODULE
    ``tests.launch.faulty`` or one that wraps its ``main``. The node's ``FLATLM_CACHE`` is ``cache`` (a directory of
    its own, as a machine has; or one that every node shares, as a shared file system is); every node of the job gets
    the same ``port`` (the first node's rendezvous), ``args`` and so ``output_dir`` (a shared file system)."""
    config = ROOT / "configs" / "accelerate" / "multinode" / f"{backend}.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += ["--num_machines", str(machines), "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    cmd += ["--main_process_port", str(port), "--num_processes", str(nproc), "-m", module, *args]
    return _spawn(tmp / f"{name}-node{machine_rank}-launch", cmd, args, {"FLATLM_CACHE": str(cache), **(env or {})})


def start_nodes(
    name: str,
    tmp: Path,
    args: list[str],
    caches: list[Path],
    *,
    backend: str = "ddp",
    per_node: int = 1,
    module: str = "tests.launch.faulty",
    env: dict[str, str] | None = None,
) -> list[Job]:
    """A job of ``len(caches)`` simulated nodes (``start_node``), node i with ``FLATLM_CACHE=caches[i]`` and
    ``per_node`` processes, rendezvous on a free port of 127.0.0.1."""
    port, machines = free_port(), len(caches)
    return [
        start_node(
            name,
            tmp,
            args,
            machine_rank=r,
            port=port,
            cache=cache,
            backend=backend,
            machines=machines,
            nproc=machines * per_node,
            module=module,
            env=env,
        )
        for r, cache in enumerate(caches)
    ]
