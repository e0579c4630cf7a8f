"""The run directory: refuse to mix two runs in one ``output_dir``; replace only flatlm's files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from flatlm.config import RunConfig, flatten, run_identity_diff, to_dict
from flatlm.errors import FlatlmError
from flatlm.train.checkpoint import CHECKPOINT_DIR
from flatlm.train.metrics import EVAL_FILE, METRICS_FILE, TENSORBOARD_DIR

CONFIG_FILE = "config.yaml"
PLOT_FILE = "loss.png"
TOKENIZER_FILE = "tokenizer.model"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, EVAL_FILE, PLOT_FILE, TENSORBOARD_DIR, CHECKPOINT_DIR, TOKENIZER_FILE)


def check_output_dir(cfg: RunConfig) -> Path:
    """Raise unless ``cfg.output_dir`` is new, empty, or holds this same run (writes nothing)."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise FlatlmError(f"output_dir {str(out)!r} is a file; choose a directory")
    if not out.is_dir() or cfg.overwrite:
        return out
    previous = out / CONFIG_FILE
    if previous.is_file():
        try:
            old = yaml.safe_load(previous.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        diff = run_identity_diff(old, to_dict(cfg))
        if diff:
            a, b = flatten(old), flatten(to_dict(cfg))
            shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
            more = f" (and {len(diff) - 6} more)" if len(diff) > 6 else ""
            raise FlatlmError(
                f"output_dir {str(out)!r} holds a different run ({shown}{more}); choose another "
                "output_dir, pass overwrite=true to replace that run's outputs, or (to switch optimizer) "
                "checkpoint.load_optimizer=false to continue from its weights"
            )
        return out
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES)
    if foreign:
        raise FlatlmError(
            f"output_dir {str(out)!r} is not empty and holds no flatlm run ({', '.join(foreign[:5])}); "
            "choose a new or empty directory"
        )
    return out


def start_run_dir(out: Path, config_yaml: str) -> None:
    """Clear the previous run's outputs (flatlm's own files only) and write ``config.yaml``."""
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    tmp = out / f".{CONFIG_FILE}.tmp"
    tmp.write_text(config_yaml)
    os.replace(tmp, out / CONFIG_FILE)


def continue_run_dir(out: Path, config_yaml: str, step: int) -> None:
    """Resuming at ``step``: keep the run's files, drop metric records beyond ``step`` (they are replaced, not
    duplicated) and write the (possibly longer) run's ``config.yaml``."""
    for name in (METRICS_FILE, EVAL_FILE):
        path = out / name
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
    tmp = out / f".{CONFIG_FILE}.tmp"
    tmp.write_text(config_yaml)
    os.replace(tmp, out / CONFIG_FILE)
