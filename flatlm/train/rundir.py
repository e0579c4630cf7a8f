"""The run directory: refuse to mix two runs in one ``output_dir``; replace only flatlm's files, and say so.

Two invocations are the same run when their configs agree on every key but the run length, logging and
checkpoint cadence (``flatlm.config.NOT_RUN_IDENTITY``), with the optimizer's hyperparameters compared as the
optimizer gets them (defaults filled in), not as written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from flatlm.config import RunConfig, flatten, run_identity_diff, to_dict
from flatlm.data.tokenizer import CHAT_TEMPLATE_FILE
from flatlm.errors import FlatlmError
from flatlm.optim.registry import resolved_hparams
from flatlm.train.checkpoint import CHECKPOINT_DIR, LATEST, write_text_atomic
from flatlm.train.metrics import EVAL_FILE, METRICS_FILE, TENSORBOARD_DIR, purge_tensorboard

CONFIG_FILE = "config.yaml"
PLOT_FILE = "loss.png"
TOKENIZER_FILE = "tokenizer.model"
RUN_FILES = (
    CONFIG_FILE,
    METRICS_FILE,
    EVAL_FILE,
    PLOT_FILE,
    TENSORBOARD_DIR,
    CHECKPOINT_DIR,
    TOKENIZER_FILE,
    "tokenizer",  # a Hugging Face tokenizer run's own (flatlm.data.tokenizer.RUN_TOKENIZER_DIR)
    CHAT_TEMPLATE_FILE,
)
# What `flatlm ablate` keeps beside a cell's run (flatlm.experiments.cells): not foreign, and never replaced.
ABLATE_FILES = ("cell.json", "cell.yaml", "train.log")

log = logging.getLogger("flatlm")


def check_output_dir(cfg: RunConfig) -> Path:
    """Raise unless ``cfg.output_dir`` is writable and new, empty, or holds this same run (writes nothing)."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise FlatlmError(f"output_dir {str(out)!r} is a file; choose a directory")
    _check_writable(out)
    if not out.is_dir() or cfg.overwrite:
        return out
    previous = out / CONFIG_FILE
    if previous.is_file():
        old, new = _identity_view(_read_config(previous)), _identity_view(to_dict(cfg))
        diff = run_identity_diff(old, new)
        if diff:
            raise FlatlmError(
                f"output_dir {str(out)!r} holds a different run ({_show_diff(old, new, diff)}); choose another "
                "output_dir, pass overwrite=true to replace that run's outputs, or (to switch optimizer) "
                "checkpoint.load_optimizer=false to continue from its weights"
            )
        return out
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (*RUN_FILES, *ABLATE_FILES))
    if foreign:
        raise FlatlmError(
            f"output_dir {str(out)!r} is not empty and holds no flatlm run ({', '.join(foreign[:5])}); "
            "choose a new or empty directory"
        )
    return out


def start_run_dir(out: Path, config_yaml: str, overwrite: bool = False) -> None:
    """Clear the previous run's outputs (flatlm's own files only) and write ``config.yaml``. With ``overwrite``
    (``overwrite=true``) the run being replaced is named in a warning first."""
    if overwrite:
        replaced = _describe_replaced(out, config_yaml)
        if replaced:
            log.warning(replaced)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        write_text_atomic(out / CONFIG_FILE, config_yaml)
    except OSError as exc:  # checked before, but the disk may have changed since (or be full)
        raise _write_error(out, exc) from None


def continue_run_dir(out: Path, config_yaml: str, step: int) -> None:
    """Resuming at ``step``: keep the run's files, drop metric records beyond ``step`` (they are replaced, not
    duplicated; TensorBoard is told to hide them too) and write the (possibly longer) run's ``config.yaml``."""
    dropped = 0
    try:
        for name in (METRICS_FILE, EVAL_FILE):
            path = out / name
            if path.is_file():
                lines = [line for line in path.read_text().splitlines() if line.strip()]
                kept = [line for line in lines if json.loads(line)["step"] <= step]
                dropped += len(lines) - len(kept)
                write_text_atomic(path, "".join(line + "\n" for line in kept))
        if dropped:
            purge_tensorboard(out, step)
        write_text_atomic(out / CONFIG_FILE, config_yaml)
    except OSError as exc:
        raise _write_error(out, exc) from None


# --------------------------------------------------------------------------------------------
SHARED_WAIT_S = 10.0
"""How long a rank looks for rank 0's config.yaml before it calls output_dir not shared (a network file system may
show another machine's new file a moment late)."""


def _file_sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def check_shared_output_dir(out: Path, wait_s: float = SHARED_WAIT_S) -> None:
    """Every rank sees the run directory rank 0 wrote (call after rank 0 wrote config.yaml, behind a barrier).

    Checkpoints need it: each rank writes its own shards into ``output_dir`` and rank 0 renames the whole directory
    into place, so an output_dir on each node's local disk fails only at the first save, after hours of steps.
    Here it fails at the start, naming the ranks and hosts that do not see rank 0's config.yaml."""
    from flatlm.parallel.collectives import all_gather_object, broadcast_object, world

    if world()[1] == 1:
        return
    expected = broadcast_object(_file_sha(out / CONFIG_FILE))
    deadline = time.monotonic() + wait_s
    while (seen := _file_sha(out / CONFIG_FILE)) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    views = all_gather_object((seen == expected, socket.gethostname()))
    blind = [f"{rank} ({host})" for rank, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise FlatlmError(
            f"output_dir {out} is not shared: rank(s) {', '.join(blind)} do not see the config.yaml rank 0 "
            f"({views[0][1]}) wrote there. Checkpoints gather every rank's shards in output_dir: put it on a file "
            "system every node mounts (NFS, Lustre, GPFS), the same path on every node"
        )


def _write_error(out: Path, exc: OSError) -> FlatlmError:
    where = exc.filename or out
    return FlatlmError(
        f"cannot write to output_dir {str(out)!r} ({exc.strerror or exc} : {where}); choose a directory you can "
        "write to, or free space / fix its permissions"
    )


def _check_writable(out: Path) -> None:
    """The run writes into ``out`` (created with its parents), ``checkpoints/`` and ``tensorboard/``: each that
    exists, or the nearest existing parent, must let this user create and remove entries."""
    nearest = out
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise FlatlmError(f"output_dir {str(out)!r} cannot be created: {str(nearest)!r} is a file")
    targets = [nearest] + [out / name for name in (CHECKPOINT_DIR, TENSORBOARD_DIR) if (out / name).is_dir()]
    for target in targets:
        if not os.access(target, os.W_OK | os.X_OK):
            what = "it" if target == out else f"{str(target)!r}"
            raise FlatlmError(
                f"output_dir {str(out)!r} is not writable ({what} is read-only for this user); choose a "
                "directory you can write to, or fix its permissions"
            )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        tree = {}
    return tree if isinstance(tree, dict) else {}


def _identity_view(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with ``optim.hparams`` as the optimizer gets them (defaults filled in)."""
    optim = tree.get("optim")
    if not isinstance(optim, dict) or not isinstance(optim.get("hparams", {}), dict):
        return tree
    resolved = resolved_hparams(str(optim.get("name", "adamw")), optim.get("hparams") or {})
    return {**tree, "optim": {**optim, "hparams": resolved}}


def _show_diff(old: dict[str, Any], new: dict[str, Any], diff: list[str]) -> str:
    a, b = flatten(old), flatten(new)
    if a.get("optim.name") != b.get("optim.name"):  # another optimizer: its hyperparameters differ by nature
        diff = [k for k in diff if not k.startswith("optim.hparams.")] or diff
    shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
    return shown + (f" (and {len(diff) - 6} more)" if len(diff) > 6 else "")


def _describe_replaced(out: Path, config_yaml: str) -> str | None:
    """One line naming the run ``overwrite=true`` replaces in ``out`` and what goes, or None if nothing does."""
    present = [name + ("/" if (out / name).is_dir() else "") for name in RUN_FILES if (out / name).exists()]
    if not present:
        return None
    facts = []
    previous = out / CONFIG_FILE
    if previous.is_file():
        old, new = _identity_view(_read_config(previous)), _identity_view(yaml.safe_load(config_yaml) or {})
        diff = run_identity_diff(old, new)
        facts.append(f"a different run: {_show_diff(old, new, diff)}" if diff else "the same config")
    latest = out / CHECKPOINT_DIR / LATEST
    if latest.is_file():
        facts.append(f"latest checkpoint {latest.read_text().strip()}")
    metrics = out / METRICS_FILE
    if metrics.is_file():
        with metrics.open() as f:
            facts.append(f"{sum(1 for line in f if line.strip())} step records")
    about = f" ({'; '.join(facts)})" if facts else ""
    return f"overwrite=true: replacing the run in {str(out)!r}{about}; removing {', '.join(present)}"
