"""Start ``python -m flatlm.train`` on 2 CPU processes, through torchrun or ``accelerate launch``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def launch(args: list[str], accelerate_config: str | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run flatlm.train on ``nproc`` gloo processes; ``accelerate_config`` names configs/accelerate/<name>.yaml."""
    if accelerate_config is not None:
        config = ROOT / "configs" / "accelerate" / f"{accelerate_config}.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
        cmd += ["--num_processes", str(nproc), "-m", "flatlm.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd += ["-m", "flatlm.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
