"""Start ``python -m flatlm.train`` (or a batch of configs, ``tests.train.batch_runner``) on CPU gloo processes,
through torchrun or ``accelerate launch``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _command(module: str, args: list[str], accelerate_config: str | None, nproc: int) -> list[str]:
    if accelerate_config is not None:
        config = ROOT / "configs" / "accelerate" / f"{accelerate_config}.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
        return [*cmd, "--num_processes", str(nproc), "-m", module, *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*cmd, "-m", module, *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def launch(
    args: list[str], accelerate_config: str | None = None, nproc: int = 2, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run flatlm.train on ``nproc`` gloo processes; ``accelerate_config`` names configs/accelerate/<name>.yaml."""
    cmd = _command("flatlm.train", args, accelerate_config, nproc)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env())


def launch_batch(
    cases: list[dict[str, Any]],
    results: Path,
    accelerate_config: str | None = None,
    nproc: int = 2,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run ``cases`` (``{"id", "overrides", "plant"}``) one after another in one launch of ``nproc`` processes
    (``tests.train.batch_runner``); per-case results land in ``results`` (``<id>.json``, or ``<id>.rank<R>.err``)."""
    results.mkdir(parents=True, exist_ok=True)
    spec = results / "spec.json"
    spec.write_text(json.dumps({"results": str(results), "cases": cases}))
    cmd = _command("tests.train.batch_runner", [str(spec)], accelerate_config, nproc)
    return run_in_session(cmd, timeout, "launch_batch")


def run_in_session(
    cmd: list[str], timeout: float, name: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session: on a timeout the launcher and every worker are killed, none is left running."""
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env or _env(),
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\n{name}: killed after {timeout} s"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
