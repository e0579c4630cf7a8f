"""Helpers of the checkpoint tests: run arguments, faking an interruption, comparing saved states by name, and
reloading a checkpoint into a fresh run's objects to read back what a resume restored."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from flatlm.train.checkpoint import CHECKPOINT_DIR, LATEST, TRAINER_STATE
from tests.conftest import tiny_overrides

EXTRA = {"adafactor": {"optim.hparams.relative_step": False}}
SAM_VARIANTS = ("sam", "asam", "ssam", "gsam", "looksam", "esam")


def overrides(out: Path, corpus: Path, optim: str, backend: str = "single", **extra: object) -> list[str]:
    """A 6-step run saving at steps 3 and 6; ``backend`` ``ddp-owned`` is ddp with shard_optimizer_state."""
    base: dict[str, object] = {"optim.name": optim, "train.max_steps": 6, "checkpoint.every": 3, "train.eval_every": 3}
    if backend != "single":
        base["train.micro_batch_size"] = 2
        base["parallel.backend"] = "ddp" if backend == "ddp-owned" else backend
        if backend == "ddp-owned":
            base["parallel.shard_optimizer_state"] = True
    return tiny_overrides(out, corpus, **{**base, **EXTRA.get(optim, {}), **extra})


def interrupt_after(out: Path, step: int) -> None:
    """Make ``out`` look like a run killed after saving step ``step``: later checkpoints gone, ``latest`` at
    ``step``; the metrics of the later steps stay (a resume must replace them, not duplicate them)."""
    root = out / CHECKPOINT_DIR
    for path in root.glob("step-*"):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    (root / LATEST).write_text(f"step-{step}\n")


def state_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> list[str]:
    """Every way two ``final_state`` dicts differ: missing keys, shapes, dtypes, values beyond ``atol`` (0: bits)."""
    out = [f"{k}: only in the first" for k in a.keys() - b.keys()]
    out += [f"{k}: only in the second" for k in b.keys() - a.keys()]
    for key in sorted(a.keys() & b.keys()):
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            out.append(f"{key}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
        elif atol == 0.0 and not torch.equal(x, y):
            out.append(f"{key}: max |diff| {(x.double() - y.double()).abs().max().item():.3g} (bit-exact expected)")
        elif atol and not torch.allclose(x.double(), y.double(), rtol=0.0, atol=atol):
            out.append(f"{key}: max |diff| {(x.double() - y.double()).abs().max().item():.3g} > {atol:g}")
    return sorted(out)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    diff = state_differences(a, b, atol)
    assert not diff, f"{len(diff)} of {len(a)} tensors differ:\n" + "\n".join(diff[:20])


def reload_and_resave(args: list[str], checkpoint: str, out: str, load_optimizer: bool = True) -> int:
    """In a fresh run built from ``args`` (this process's share of it), load ``checkpoint`` as a resume does
    (``load_checkpoint``) and save what the model and optimizer now hold, as a DCP checkpoint in ``out``: reading
    ``out`` back by name shows exactly what the resume restored, on this backend and world size.
    ``load_optimizer=False`` plants a bug (a load that drops the optimizer state). Every rank calls this."""
    from flatlm.config import load_config
    from flatlm.parallel import environment
    from flatlm.parallel.distributed import destroy_process_group, init_process_group, resolve_backend

    cfg = load_config(None, args)
    env = environment()
    cfg = cfg.model_copy(update={"parallel": resolve_backend(cfg.parallel, env)})
    init_process_group(env, torch.device("cpu"))
    try:
        _reload_and_resave(cfg, env, checkpoint, out, load_optimizer)  # its frame (the DDP wrapper) ends first
    finally:
        destroy_process_group()  # a DDP reducer alive past its group can hang the rank at exit
    return 0


def _reload_and_resave(cfg: Any, env: Any, checkpoint: str, out: str, load_optimizer: bool) -> None:
    import torch.distributed.checkpoint as dcp

    from flatlm.models import build_model, model_config
    from flatlm.train.backend import setup_parallel
    from flatlm.train.checkpoint import _distributed, load_checkpoint
    from flatlm.train.loop import grad_accumulation, load_data, seed_everything

    device = torch.device("cpu")
    run_dir = Path(checkpoint).parents[1]
    kwargs = {}
    if "run_tokenizer" in inspect.signature(load_data).parameters:
        kwargs["run_tokenizer"] = run_dir / "tokenizer.model"
    data = load_data(cfg, **kwargs)
    seed_everything(cfg.seed, cfg.train.deterministic)
    config = model_config(cfg.model.name, data.vocab_size, cfg.model.overrides, bos_id=data.bos_id, eos_id=data.eos_id)
    model = build_model(config, seed=cfg.seed)
    parallel, optimizer, _ = setup_parallel(model, cfg, device, grad_accumulation(cfg.train, env.world_size))
    load_checkpoint(Path(checkpoint), parallel, optimizer, load_optimizer)
    state = parallel.checkpoint_state(optimizer)
    dcp.save(state, checkpoint_id=Path(out) / "state", no_dist=not _distributed())
    if env.is_main:
        (Path(out) / TRAINER_STATE).write_text(json.dumps({"reloaded_from": checkpoint}))
