"""The training loop: validate everything, then build data, model and optimizer, then step.

Every check that can fail on user input runs before the first byte is written to ``output_dir``.
One optimizer step = ``accum`` micro-batches of ``micro_batch_size`` sequences on each of
``world_size`` processes, where ``accum = global_batch_size / (micro_batch_size * world_size)``;
the loss of each micro-batch is divided by ``accum`` so gradients are those of the global mean.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from flatlm.config import RunConfig, TrainConfig, dump_yaml
from flatlm.data import (
    GlobalBatchSampler,
    PackedSequences,
    load_or_build,
    require_sequences,
    split_documents,
)
from flatlm.data.cache import resume_tokenizer
from flatlm.data.tokenizer import Tokenizer, save_run_tokenizer
from flatlm.errors import FlatlmError
from flatlm.models import build_model, count_parameters, load_pretrained_weights, max_positions, model_config
from flatlm.optim import build_scheduler
from flatlm.optim.state_size import optimizer_state_bytes
from flatlm.parallel import Environment, environment
from flatlm.parallel.distributed import (
    barrier,
    destroy_process_group,
    init_process_group,
    launcher_bf16,
    local_main_first,
    mean_across_ranks,
    resolve_backend,
)
from flatlm.train.backend import check_parallel, setup_parallel
from flatlm.train.checkpoint import (
    UnsafeCheckpointError,
    agree_on_errors,
    recover_interrupted_swap,
    remove_partial_saves,
    resumable_checkpoints,
    save_checkpoint,
    unreadable_reason,
)
from flatlm.train.checks import check_static
from flatlm.train.checks import schedule_kwargs as _schedule_kwargs
from flatlm.train.metrics import EVAL_FILE, METRICS_FILE, MetricsLogger, Progress, read_jsonl
from flatlm.train.plots import plot_loss
from flatlm.train.preemption import Preemption
from flatlm.train.rundir import PLOT_FILE, TOKENIZER_FILE, check_output_dir, continue_run_dir, start_run_dir
from flatlm.train.step import evaluate_loss, train_step

log = logging.getLogger("flatlm")


@dataclass
class RunResult:
    output_dir: Path
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None


def grad_accumulation(train: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each process; the batch layout must divide evenly."""
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise FlatlmError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"train.micro_batch_size={train.micro_batch_size} x world size {world_size} = {per_step}; "
            f"choose a global batch that is a multiple of {per_step} or change the micro-batch"
        )
    return train.global_batch_size // per_step


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _check_positions(cfg: RunConfig, config: Any) -> None:
    limit = max_positions(config)
    if limit is not None and cfg.data.seq_len > limit:
        raise FlatlmError(
            f"data.seq_len={cfg.data.seq_len} is above the model's maximum positions ({limit}, "
            f"model.name={cfg.model.name!r}); lower data.seq_len or set "
            f"model.overrides.max_position_embeddings={cfg.data.seq_len}"
        )


@dataclass
class Data:
    train: PackedSequences
    val: PackedSequences | None
    vocab_size: int
    bos_id: int
    eos_id: int
    tokenizer: Tokenizer


def load_data(cfg: RunConfig, run_tokenizer: Path | None = None) -> Data:
    """The token cache of ``cfg.data``. ``run_tokenizer``: a resumed run's own tokenizer.model; the data are
    encoded with it (a new one would renumber the pieces under the model's embedding), whatever the corpus."""
    tokenizer = None
    if run_tokenizer is not None and run_tokenizer.is_file():
        tokenizer = resume_tokenizer(cfg.data, run_tokenizer, warn=log.warning)
    elif run_tokenizer is not None:
        log.warning(f"resuming a run without its {run_tokenizer.name}; the data's tokenizer is used and saved there")
    cache = load_or_build(cfg.data, log=log.info, tokenizer=tokenizer, warn=log.warning)
    train_ids, val_ids = split_documents(cache.num_documents, cfg.data.val_fraction, cfg.seed)
    train = PackedSequences(cache.tokens, cache.offsets, train_ids, cfg.data.seq_len)
    require_sequences(train, "training", 1)
    val = PackedSequences(cache.tokens, cache.offsets, val_ids, cfg.data.seq_len) if len(val_ids) else None
    if val is not None and len(val) == 0:
        log.warning("the validation split is shorter than one sequence; evaluation is skipped")
        val = None
    tok = cache.tokenizer
    return Data(train, val, tok.vocab_size, tok.bos_id, tok.eos_id, tok)


def evaluate(model: torch.nn.Module, val: PackedSequences, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """Loss and perplexity on the first ``eval_batches`` micro-batches of the validation split."""
    n = min(len(val), cfg.train.eval_batches * cfg.train.micro_batch_size)
    mb = cfg.train.micro_batch_size
    batches = [tuple(t.to(device) for t in val.batch(range(i, min(i + mb, n)))) for i in range(0, n, mb)]
    loss = evaluate_loss(model, batches, cfg.train.bf16)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def _validate(cfg: RunConfig, env: Environment) -> None:
    """Every check on user input that needs no data; runs before anything is written."""
    grad_accumulation(cfg.train, env.world_size)
    check_parallel(cfg)
    _check_positions(cfg, model_config(cfg.model.name, cfg.data.vocab_size, cfg.model.overrides))
    check_static(cfg)  # optimizer (a probe step), schedule, data paths
    if cfg.parallel.shard_optimizer_state and cfg.parallel.backend == "single" and env.is_main:
        log.warning(
            "parallel.shard_optimizer_state=true does nothing in one process (there is no other rank to shard "
            "the optimizer state over); it applies to ddp with 2+ processes"
        )


def train(cfg: RunConfig, env: Environment | None = None) -> RunResult:
    """Run ``cfg`` to ``train.max_steps``; returns the losses and where the outputs are.

    Every process of a data-parallel job runs this; rank 0 writes the outputs.
    """
    env = env or environment()
    parallel_cfg = resolve_backend(cfg.parallel, env)
    cfg = cfg.model_copy(update={"parallel": parallel_cfg})
    if launcher_bf16():  # accelerate's mixed_precision: bf16 (recorded in config.yaml as train.bf16)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"bf16": True})})
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    init_process_group(env, device)
    try:
        return _train(cfg, env, device)
    finally:
        destroy_process_group()


def _train(cfg: RunConfig, env: Environment, device: torch.device) -> RunResult:
    # 1. Checks on user input; nothing is written before they pass (every rank checks the same).
    _validate(cfg, env)
    accum = grad_accumulation(cfg.train, env.world_size)
    out = check_output_dir(cfg)
    if env.is_main and not cfg.overwrite and (recovered := recover_interrupted_swap(out)):
        log.warning(f"a save was interrupted between its two renames: {recovered} put back as the latest checkpoint")
    barrier()
    resume_candidates = [] if cfg.overwrite else resumable_checkpoints(out)
    with local_main_first(env):  # one process per node builds the token cache
        data = load_data(cfg, out / TOKENIZER_FILE if resume_candidates else None)

    # 2. Model, optimizer, schedule.
    seed_everything(cfg.seed, cfg.train.deterministic)
    config = model_config(cfg.model.name, data.vocab_size, cfg.model.overrides, bos_id=data.bos_id, eos_id=data.eos_id)
    model = build_model(config, seed=cfg.seed)
    if cfg.model.init_from:
        load_pretrained_weights(model, cfg.model.init_from)
    model = model.to(device)
    if cfg.model.activation_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    parallel, optimizer, groups = setup_parallel(model, cfg, device, accum)
    scheduler = build_scheduler(cfg.schedule.name, optimizer, **_schedule_kwargs(cfg))
    forward_model = torch.compile(parallel.forward_module) if cfg.model.compile else parallel.forward_module
    params = [p for g in groups for p in g["params"]]

    # 3. Outputs (rank 0 writes).
    config_yaml = dump_yaml(cfg)
    metrics = None
    start_step, resume_from, unreadable = 0, None, []
    for i, candidate in enumerate(resume_candidates):
        error = None
        try:
            trainer_state = parallel.load(candidate, optimizer, env.rank, cfg.checkpoint.load_optimizer)
        except (Exception, CheckpointException) as exc:  # corrupt, partial or unsafe: say so in one line, go back
            if isinstance(exc, FlatlmError) and not isinstance(exc, UnsafeCheckpointError):
                raise  # a request flatlm refuses is said once (every rank refuses alike)
            error = unreadable_reason(candidate, exc)
        # The ranks fall back together or not at all: one rank's unreadable RNG file must not leave it loading an
        # older checkpoint (a collective) while the others train on.
        if failures := agree_on_errors(error):
            reasons = list(dict.fromkeys(msg for _, msg in failures))
            reason = (
                reasons[0]
                if len(reasons) == 1 and len(failures) == env.world_size
                else "; ".join(f"rank {r}: {msg}" for r, msg in failures)
            )
            unreadable.append(f"{candidate.name}: {reason}")
            then = f"trying {resume_candidates[i + 1].name}" if i + 1 < len(resume_candidates) else "no older one"
            log.warning(f"cannot resume from {candidate} ({reason}); {then}")
            continue
        restore_schedule(scheduler, trainer_state["scheduler"], cfg.checkpoint.load_optimizer)
        start_step, resume_from = trainer_state["step"], candidate
        log.info(f"resuming from {resume_from} (step {start_step})")
        break
    if resume_candidates and resume_from is None:
        raise FlatlmError(
            f"no checkpoint in {out / 'checkpoints'} can be read ({'; '.join(unreadable)}); "
            "pass overwrite=true to start the run over"
        )
    if env.is_main:
        if resume_from is not None:
            dropped = remove_partial_saves(out)
            if dropped:
                log.warning(f"removed the partial checkpoint(s) {', '.join(dropped)} an interrupted save left")
            continue_run_dir(out, config_yaml, start_step)
        else:
            dropped = [] if cfg.overwrite else remove_partial_saves(out)
            logged = not cfg.overwrite and (out / METRICS_FILE).is_file() and (out / METRICS_FILE).stat().st_size > 0
            if dropped or logged:  # e.g. a second Ctrl-C stopped the run before its first save: say it starts over
                partial = f" (removed the partial save(s) {', '.join(dropped)})" if dropped else ""
                log.warning(f"{out} has no complete checkpoint{partial}: starting from step 0")
            start_run_dir(out, config_yaml, overwrite=cfg.overwrite)
        save_run_tokenizer(out / TOKENIZER_FILE, data.tokenizer)  # the run's own, never replaced on resume
        metrics = MetricsLogger(out, tensorboard=cfg.train.tensorboard, append=resume_from is not None)
    barrier()
    sampler = GlobalBatchSampler(len(data.train), cfg.train.global_batch_size, cfg.seed)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    log.info(  # only rank 0 logs at INFO (see flatlm.train.cli)
        f"model {cfg.model.name}: {count_parameters(model):,} parameters; backend {cfg.parallel.backend} x "
        f"{env.world_size}; {len(data.train):,} training sequences of {cfg.data.seq_len} tokens; "
        f"{accum} micro-batch(es) of {cfg.train.micro_batch_size} per step and process"
    )
    result = RunResult(out)
    show = cfg.train.progress_bar and env.is_main  # a bar on a terminal, else a log line every log_interval_s
    bar = Progress(cfg.train.max_steps, start_step, enabled=show, interval_s=cfg.train.log_interval_s, log=log.info)
    model.train()
    preemption = Preemption().__enter__()
    try:
        for step in range(start_step, cfg.train.max_steps):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            micro = sampler.micro_batches(step, env.rank, env.world_size, cfg.train.micro_batch_size)
            batches = [tuple(t.to(device) for t in data.train.batch(m)) for m in micro]
            stats = train_step(
                parallel,
                optimizer,
                batches,
                params,
                grad_clip=cfg.train.grad_clip,
                bf16=cfg.train.bf16,
                model=forward_model,
                replica_perturbation=cfg.sam.perturbation == "replica",
            )
            scheduler.step()
            loss_value = mean_across_ranks(stats.loss).item()
            dt = time.perf_counter() - t0
            record = {
                "step": step + 1,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": float(stats.grad_norm),
                "tokens_per_s": tokens_per_step / dt,
                "tokens": (step + 1) * tokens_per_step,
                "epoch": sampler.epoch_of(step + 1),
                "step_time_s": dt,
                "optim_state_bytes": optimizer_state_bytes(optimizer),
            }
            result.losses.append(loss_value)
            if metrics is not None:
                metrics.log_train(record)
            bar.update(record)
            if not math.isfinite(loss_value):
                raise FlatlmError(
                    f"the loss became {loss_value} at step {step + 1}; lower optim.lr or enable train.grad_clip"
                )
            stop = preemption.should_stop()
            last = step + 1 == cfg.train.max_steps
            if data.val is not None and ((cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0) or last):
                # Every rank evaluates the same batches on its (replicated) module: no collective needed.
                ev = {"step": step + 1, **evaluate(model, data.val, cfg, device)}
                result.evals.append(ev)
                if metrics is not None:
                    metrics.log_eval(ev)
                log.info(f"step {step + 1}: val_loss {ev['val_loss']:.4f}, val_ppl {ev['val_ppl']:.2f}")
            if last or stop or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0):
                trainer_state = {
                    "tokens": (step + 1) * tokens_per_step,
                    "epoch": sampler.epoch_of(step + 1),  # the data position is a function of (seed, step)
                    "scheduler": scheduler.state_dict(),
                    "backend": cfg.parallel.backend,
                    "world_size": env.world_size,
                }
                with preemption.saving():  # a second Ctrl-C now would kill the save it asked for: ignored
                    result.checkpoint = save_checkpoint(
                        out,
                        step + 1,
                        parallel.checkpoint_state(optimizer),
                        trainer_state,
                        config_yaml,
                        cfg.checkpoint.keep_last,
                        rank=env.rank,
                        legacy_files=parallel.legacy_files(optimizer, env.rank),
                        save_engine=parallel.save_engine,
                    )
            if stop:
                name = signal.Signals(preemption.signal).name if preemption.signal else "a signal on another rank"
                log.info(f"stopped by {name} after step {step + 1}; checkpoint saved, rerun to resume")
                break
    finally:
        preemption.__exit__()
        bar.close()
        if metrics is not None:
            metrics.close()
    if env.is_main:
        if cfg.train.plot:
            plot_loss(
                read_jsonl(out / METRICS_FILE),
                read_jsonl(out / EVAL_FILE),
                out / PLOT_FILE,
                f"{cfg.model.name} · {cfg.optim.name} lr={cfg.optim.lr:g} · {out.name}",
            )
        if result.losses:
            log.info(
                f"done: {len(result.losses)} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; "
                f"outputs in {out}"
            )
        else:
            log.info(f"nothing to do: the run is at step {start_step} of train.max_steps={cfg.train.max_steps}")
    return result


def restore_schedule(scheduler: Any, saved: dict[str, Any], same_optimizer: bool) -> None:
    """Put the schedule at the saved step. With a new optimizer (``checkpoint.load_optimizer=false``) only the
    position is kept: the learning rates come from the new optimizer's lr, not the saved base lrs."""
    if same_optimizer:
        scheduler.load_state_dict(saved)
        return
    scheduler.last_epoch = saved["last_epoch"] - 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
