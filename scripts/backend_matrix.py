"""Run the default job on every backend x optimizer with 2 processes and compare with one process.

    python scripts/backend_matrix.py [--steps 4] [--backends ddp,fsdp2,...] [--optims adamw,...] [--out DIR]

Each case is ``accelerate launch --config_file configs/accelerate/<backend>.yaml --num_processes 2 -m
flatlm.train output_dir=... optim.name=<o> train.max_steps=N checkpoint.every=0`` (the default job: the
tiny model on the standard-library corpus); the reference is ``python -m flatlm.train`` with the same
overrides. Prints, per case, the largest relative loss difference over the steps, the backend and world size
recorded in config.yaml, and this rank's optimizer-state bytes against the single process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--backends", default="ddp,fsdp2,zero1,zero2,zero3")
    parser.add_argument("--optims", default="adamw,adafactor,lion,muon,sam")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary dir)")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="flatlm-matrix-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    common = [f"train.max_steps={args.steps}", "checkpoint.every=0", "train.progress_bar=false", "train.plot=false"]
    print(f"{'backend':8} {'optim':10} {'max rel diff':>12} {'recorded':>10} {'world':>5} {'state/single':>12}")
    for optim in args.optims.split(","):
        single = root / f"single-{optim}"
        cmd = [sys.executable, "-m", "flatlm.train", f"output_dir={single}", f"optim.name={optim}", *common]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if r.returncode:
            print(f"{'single':8} {optim:10} failed: {r.stderr.strip().splitlines()[-1]}")
            continue
        ref = _records(single)
        for backend in args.backends.split(","):
            out = root / f"{backend}-{optim}"
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
            cmd += [str(ROOT / "configs" / "accelerate" / f"{backend}.yaml"), "--num_processes", "2"]
            cmd += ["-m", "flatlm.train", f"output_dir={out}", f"optim.name={optim}", *common]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if r.returncode:
                last = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()][-1:]
                print(f"{backend:8} {optim:10} failed: {last}")
                continue
            got = _records(out)
            diff = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(got, ref, strict=True))
            parallel = yaml.safe_load((out / "config.yaml").read_text())["parallel"]
            ratio = got[-1]["optim_state_bytes"] / max(1, ref[-1]["optim_state_bytes"])
            print(
                f"{backend:8} {optim:10} {diff:12.1e} {parallel['backend']:>10} {parallel['world_size']:5d} "
                f"{ratio:12.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
