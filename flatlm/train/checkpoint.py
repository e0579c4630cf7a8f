"""Checkpoints under ``output_dir/checkpoints/step-N/`` (resumable sharded checkpoints come with issue 6).

A checkpoint holds ``model.safetensors`` (the full model, written by rank 0), the optimizer state
(``optimizer.pt`` when it is replicated, else ``optimizer.rank<R>.pt`` from each rank: tensors only,
loadable with ``weights_only=True``), ``trainer_state.json`` (step, tokens, scheduler) and the resolved
``config.yaml``. It is written into a hidden temporary directory and renamed into place by rank 0 after
every rank has written its part, then the ``latest`` file is replaced atomically, so a crash never
leaves ``latest`` naming a partial save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    output_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep_last: int,
    *,
    optimizer_file: str = "optimizer.pt",
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write step ``step``; every rank calls this (``barrier`` synchronises them).

    ``model_state``: the full model state dict on rank 0 (None elsewhere). ``optimizer_state``: written to
    ``optimizer_file`` by each rank that passes one.
    """
    root = output_dir / CHECKPOINT_DIR
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    if model_state is not None:
        save_file({k: v.detach().contiguous().clone() for k, v in model_state.items()}, tmp / "model.safetensors")
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / optimizer_file)
    barrier()
    if rank != 0:
        return final
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    (tmp / "config.yaml").write_text(config_yaml)
    if final.exists():  # the same step saved again: swap, then drop the old copy
        old = root / f".step-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _write_text_atomic(root / LATEST, final.name + "\n")
    _rotate(root, keep_last)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _rotate(root: Path, keep_last: int) -> None:
    for path in list_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(path)
