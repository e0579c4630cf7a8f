"""The training loop: validate everything, build, resume or start, step, finish.

``train`` runs five stages, one function each:

    setup            every check on user input (nothing is written before they pass), the output directory, the
                     data (flatlm.data.splits), model, backend, optimizer and schedule (``Run``)
    resume_or_start  load the newest checkpoint every rank can read (``resume``), or start the run directory;
                     rank 0 opens the metrics files
    run_steps        the step loop: one ``train_step`` (flatlm.train.step) per optimizer step, its record, then
    after_step       the cadence: evaluation every ``train.eval_every`` steps and at the end, a checkpoint every
                     ``checkpoint.every`` steps, at the end and when preempted
    finish           the loss plot and the closing line

One optimizer step = ``accum`` micro-batches of ``micro_batch_size`` sequences on each of ``world_size``
processes, where ``accum = global_batch_size / (micro_batch_size * world_size)``; the step's loss is the sum of its
counted token losses over the global count (flatlm.train.step), so gradients are those of the global mean.

One host sync per step (``read_step``): the loss sum and this rank's preemption flag travel in one all-reduce, and
the loss, the gradient norm (a tensor until then) and the stop vote are read in one transfer. The optimizer's state
size is measured once, after the run's first step (state is created lazily; its size stays fixed).
"""

from __future__ import annotations

import logging
import math
import random
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flatlm.config import RunConfig, TrainConfig, dump_yaml
from flatlm.data import GlobalBatchSampler
from flatlm.data.batch import Sequences
from flatlm.data.splits import Data, data_fingerprint, data_seed, load_data
from flatlm.data.tokenizer import run_tokenizer_path, save_run_chat_template, save_run_tokenizer
from flatlm.errors import FlatlmError
from flatlm.models import build_model, count_parameters, max_positions, model_config
from flatlm.optim import build_scheduler
from flatlm.optim.state_size import optimizer_state_bytes
from flatlm.parallel import Environment, environment
from flatlm.parallel.backend import Parallel
from flatlm.parallel.collectives import all_reduce_sum
from flatlm.parallel.device import local_device
from flatlm.parallel.distributed import (
    barrier,
    destroy_process_group,
    init_process_group,
    launcher_bf16,
    local_main_first,
    resolve_backend,
)
from flatlm.parallel.failures import Watchdog, next_call
from flatlm.train.adversarial import Adversary
from flatlm.train.backend import check_parallel, setup_parallel
from flatlm.train.checkpoint import (
    agreed_candidates,
    recover_interrupted_swap,
    remove_partial_saves,
    resume,
    save_checkpoint,
)
from flatlm.train.checks import check_same_data, check_static, schedule_warning
from flatlm.train.checks import schedule_kwargs as _schedule_kwargs
from flatlm.train.export import check_init_from_tokenizer, init_weights_from
from flatlm.train.metrics import EVAL_FILE, METRICS_FILE, MetricsLogger, Progress, read_jsonl
from flatlm.train.plots import plot_loss
from flatlm.train.preemption import Preemption
from flatlm.train.rundir import (
    PLOT_FILE,
    check_output_dir,
    check_shared_output_dir,
    continue_run_dir,
    start_run_dir,
)
from flatlm.train.step import StepStats, evaluate_loss, train_step

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


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory so far: CUDA's max allocated on a GPU, the peak resident set size on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _check_positions(cfg: RunConfig, config: Any) -> None:
    limit = max_positions(config)
    if limit is not None and cfg.data.seq_len > limit:
        raise FlatlmError(
            f"data.seq_len={cfg.data.seq_len} is above the model's maximum positions ({limit}, "
            f"model.name={cfg.model.name!r}); lower data.seq_len or set "
            f"model.overrides.max_position_embeddings={cfg.data.seq_len}"
        )


def evaluate(model: torch.nn.Module, val: Sequences, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """Loss and perplexity on the first ``eval_batches`` micro-batches of the validation split."""
    n = min(len(val), cfg.train.eval_batches * cfg.train.micro_batch_size)
    mb = cfg.train.micro_batch_size
    batches = [val.batch(range(i, min(i + mb, n))).to(device) for i in range(0, n, mb)]
    loss = evaluate_loss(model, batches, cfg.train.bf16)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def _validate(cfg: RunConfig, env: Environment) -> None:
    """Every check on user input that needs no data; runs before anything is written."""
    grad_accumulation(cfg.train, env.world_size)
    check_parallel(cfg)
    _check_positions(cfg, model_config(cfg.model.name, cfg.data.vocab_size, cfg.model.overrides))
    check_static(cfg)  # optimizer (a probe step), schedule, data paths
    if (warning := check_init_from_tokenizer(cfg)) and env.is_main:  # its tokenizer, before any data are read
        log.warning(warning)
    if (warning := schedule_warning(cfg)) and env.is_main:
        log.warning(warning)
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
    device = local_device(env)
    init_process_group(env, device, cfg.parallel.timeout_s)
    watchdog = Watchdog(env.rank, env.world_size, cfg.parallel.timeout_s, call=next_call()).start()
    try:
        result = _train(cfg, env, device, watchdog)
    except BaseException as exc:
        # Tell the other ranks (they exit within seconds instead of waiting out parallel.timeout_s) and leave the
        # group as it is: destroying it can wait on the very collective that failed.
        if env.world_size > 1 and threading.current_thread() is threading.main_thread():
            # This rank is leaving with an error; the launcher's SIGTERM, sent the moment a peer exits, would end
            # it (the stop handler is gone with the loop) before it says why. It exits within a second anyway.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        watchdog.fail(exc)
        raise
    finally:
        watchdog.stop()
    destroy_process_group()
    return result


def _train(cfg: RunConfig, env: Environment, device: torch.device, watchdog: Watchdog) -> RunResult:
    """The stages, in their own frame: what they build (the DDP wrapper and its reducer, engines) is freed when this
    returns, before ``train`` destroys the process group (a reducer freed after its group can hang the rank)."""
    run = setup(cfg, env, device)
    start_step, metrics = resume_or_start(run)
    result = RunResult(run.out)
    try:
        run_steps(run, start_step, metrics, result, watchdog)
    finally:
        if metrics is not None:
            metrics.close()
    finish(run, result, start_step)
    return result


# -- setup ---------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything ``setup`` builds and the later stages use."""

    cfg: RunConfig
    env: Environment
    device: torch.device
    out: Path
    data: Data
    model: torch.nn.Module
    parallel: Parallel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    forward_model: torch.nn.Module
    """What the step runs forward through (``torch.compile`` of the backend's module with ``model.compile``)."""
    params: list[torch.nn.Parameter]
    accum: int
    resume_candidates: list[Path]
    """Checkpoints to try, newest first (rank 0's list on every rank); empty with ``overwrite=true``."""
    config_yaml: str
    sampler: GlobalBatchSampler
    tokens_per_step: int
    """Input positions of one step (global batch x seq_len), padding included: an upper bound of ``tokens_seen``'s
    growth."""
    tokens_seen: int = 0
    """Real input tokens the run has trained on (padding excluded: ``Sequences.input_tokens``), through the last
    step done; a resume takes it from the checkpoint."""


def setup(cfg: RunConfig, env: Environment, device: torch.device) -> Run:
    """Checks, output directory, data, model, backend, optimizer, schedule; writes nothing but the token cache."""
    # Checks on user input; nothing is written before they pass (every rank checks the same).
    _validate(cfg, env)
    accum = grad_accumulation(cfg.train, env.world_size)
    out = check_output_dir(cfg)
    if env.is_main and not cfg.overwrite and (recovered := recover_interrupted_swap(out)):
        log.warning(f"a save was interrupted between its two renames: {recovered} put back as the latest checkpoint")
    barrier()
    resume_candidates = [] if cfg.overwrite else agreed_candidates(out)
    with local_main_first(env):  # one process per node builds the token cache
        data = load_data(cfg, run_tokenizer_path(out) if resume_candidates else None)
    check_same_data(data_fingerprint(data), socket.gethostname())  # one cache per node: the same on every node?

    seed_everything(cfg.seed, cfg.train.deterministic)
    config = model_config(cfg.model.name, data.vocab_size, cfg.model.overrides, bos_id=data.bos_id, eos_id=data.eos_id)
    model = build_model(config, seed=cfg.seed)
    if cfg.model.init_from:
        init_weights_from(model, cfg.model.init_from)  # a flatlm run or checkpoint, or a Hugging Face model
    model = model.to(device)
    if cfg.model.activation_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    parallel, optimizer, groups = setup_parallel(model, cfg, device, accum)
    scheduler = build_scheduler(cfg.schedule.name, optimizer, **_schedule_kwargs(cfg))
    forward_model = torch.compile(parallel.forward_module) if cfg.model.compile else parallel.forward_module
    return Run(
        cfg=cfg,
        env=env,
        device=device,
        out=out,
        data=data,
        model=model,
        parallel=parallel,
        optimizer=optimizer,
        scheduler=scheduler,
        forward_model=forward_model,
        params=[p for g in groups for p in g["params"]],
        accum=accum,
        resume_candidates=resume_candidates,
        config_yaml=dump_yaml(cfg),
        sampler=GlobalBatchSampler(len(data.train), cfg.train.global_batch_size, data_seed(cfg)),
        tokens_per_step=cfg.train.global_batch_size * cfg.data.seq_len,
    )


# -- resume or start -----------------------------------------------------------------------------------------------


def resume_from_checkpoint(run: Run) -> tuple[int, Path | None]:
    """(step, checkpoint) of the newest checkpoint every rank loaded, with the schedule put at that step; (0, None)
    when there is none to resume. Collective."""
    cfg = run.cfg
    if resumed := resume(run.resume_candidates, run.parallel, run.optimizer, cfg.checkpoint.load_optimizer):
        restore_schedule(run.scheduler, resumed.trainer_state["scheduler"], cfg.checkpoint.load_optimizer)
        start_step, resume_from = resumed.trainer_state["step"], resumed.path
        run.tokens_seen = int(resumed.trainer_state.get("tokens", start_step * run.tokens_per_step))
        log.info(f"resuming from {resume_from} (step {start_step})")
        return start_step, resume_from
    return 0, None


def resume_or_start(run: Run) -> tuple[int, MetricsLogger | None]:
    """Resume (``resume_from_checkpoint``) or start the run directory; rank 0 writes it and opens the metrics
    files (returned; None on the other ranks). Returns the first step to run."""
    cfg, env, out = run.cfg, run.env, run.out
    start_step, resume_from = resume_from_checkpoint(run)
    metrics = None
    if env.is_main:
        if resume_from is not None:
            dropped = remove_partial_saves(out)
            if dropped:
                log.warning(f"removed the partial checkpoint(s) {', '.join(dropped)} an interrupted save left")
            continue_run_dir(out, run.config_yaml, start_step)
        else:
            dropped = [] if cfg.overwrite else remove_partial_saves(out)
            logged = not cfg.overwrite and (out / METRICS_FILE).is_file() and (out / METRICS_FILE).stat().st_size > 0
            if dropped or logged:  # e.g. a second Ctrl-C stopped the run before its first save: say it starts over
                partial = f" (removed the partial save(s) {', '.join(dropped)})" if dropped else ""
                log.warning(f"{out} has no complete checkpoint{partial}: starting from step 0")
            start_run_dir(out, run.config_yaml, overwrite=cfg.overwrite)
        save_run_tokenizer(out, run.data.tokenizer)  # the run's own (tokenizer.model or tokenizer/), never replaced
        if run.data.chat_template is not None:  # what the chat examples were rendered with, never replaced
            save_run_chat_template(out, run.data.chat_template)
        metrics = MetricsLogger(out, tensorboard=cfg.train.tensorboard, append=resume_from is not None)
    barrier()
    check_shared_output_dir(out)  # every node sees rank 0's files (checkpoints gather every rank's shards there)
    return start_step, metrics


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


# -- the step loop -------------------------------------------------------------------------------------------------


def read_step(stats: StepStats, stop_requested: bool) -> tuple[float, float, bool]:
    """(global loss, gradient norm, whether any rank was asked to stop): the step's one host sync.

    The loss sum and this rank's stop flag share one all-reduce (sums: the vote is the number of ranks asked to
    stop); the loss over the global count, the norm and the vote then come to the host in one transfer."""
    flag = stats.loss_sum.new_full((), 1.0 if stop_requested else 0.0)
    summed = all_reduce_sum(torch.stack([stats.loss_sum.float(), flag]))  # [global loss sum, stop votes]
    loss = summed[0] / stats.counted.clamp(min=1)
    loss_value, grad_norm, votes = torch.stack([loss, stats.grad_norm.to(loss), summed[1]]).tolist()
    return loss_value, grad_norm, votes > 0


def run_steps(
    run: Run, start_step: int, metrics: MetricsLogger | None, result: RunResult, watchdog: Watchdog | None = None
) -> None:
    """Steps ``start_step`` .. ``train.max_steps`` (or until preempted), each logged, then ``after_step``.

    ``watchdog`` learns each phase: a step after this process's first must end within ``parallel.timeout_s``.
    """
    watchdog = watchdog or Watchdog(0, 1, run.cfg.parallel.timeout_s)
    cfg, env = run.cfg, run.env
    log.info(  # only rank 0 logs at INFO (see flatlm.train.cli)
        f"model {cfg.model.name}: {count_parameters(run.model):,} parameters; backend {cfg.parallel.backend} x "
        f"{env.world_size}; {len(run.data.train):,} training sequences of {cfg.data.seq_len} tokens; "
        f"{run.accum} micro-batch(es) of {cfg.train.micro_batch_size} per step and process"
    )
    show = cfg.train.progress_bar and env.is_main  # a bar on a terminal, else a log line every log_interval_s
    bar = Progress(cfg.train.max_steps, start_step, enabled=show, interval_s=cfg.train.log_interval_s, log=log.info)
    run.model.train()
    state_bytes: int | None = None
    adversarial = cfg.train.adversarial
    seed = adversarial.seed if adversarial.seed is not None else cfg.seed
    adversary = Adversary(adversarial, seed) if adversarial.enabled else None  # None: plain steps, no hook
    preemption = Preemption().__enter__()
    try:
        for step in range(start_step, cfg.train.max_steps):
            watchdog.enter(f"step {step + 1}", watched=step > start_step)  # the first: compilation, warm-up
            t0 = time.perf_counter()
            lr = run.optimizer.param_groups[0]["lr"]
            micro = run.sampler.micro_batches(step, env.rank, env.world_size, cfg.train.micro_batch_size)
            step_tokens = run.data.train.input_tokens(run.sampler.global_batch(step))  # all ranks', no padding
            stats = train_step(
                run.parallel,
                run.optimizer,
                [run.data.train.batch(m).to(run.device) for m in micro],
                run.params,
                grad_clip=cfg.train.grad_clip,
                bf16=cfg.train.bf16,
                model=run.forward_model,
                replica_perturbation=cfg.sam.perturbation == "replica",
                adversary=adversary,
                step=step,
            )
            run.scheduler.step()
            loss_value, grad_norm, stop = read_step(stats, preemption.requested)
            dt = time.perf_counter() - t0
            run.tokens_seen += step_tokens
            if state_bytes is None:  # the state exists after the first step; its size does not change
                state_bytes = optimizer_state_bytes(run.optimizer)
            record = {
                "step": step + 1,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": step_tokens / dt,
                "tokens": run.tokens_seen,
                "epoch": run.sampler.epoch_of(step + 1),
                "step_time_s": dt,
                "optim_state_bytes": state_bytes,
                "peak_mem_bytes": peak_memory_bytes(run.device),
            }
            if adversary is not None:  # the ascent's cost (train.adversarial)
                record.update(adv_time_s=stats.adv_time_s, adv_passes=stats.adv_passes)
            result.losses.append(loss_value)
            if metrics is not None:
                metrics.log_train(record)
            bar.update(record)
            if not math.isfinite(loss_value):
                raise FlatlmError(
                    f"the loss became {loss_value} at step {step + 1}; lower optim.lr or enable train.grad_clip"
                )
            watchdog.enter(f"evaluation and checkpoint after step {step + 1}", watched=False)
            after_step(run, step + 1, stop, preemption, metrics, result)
            if stop:
                name = signal.Signals(preemption.signal).name if preemption.signal else "a signal on another rank"
                log.info(f"stopped by {name} after step {step + 1}; checkpoint saved, rerun to resume")
                break
    finally:
        preemption.__exit__()
        bar.close()


def after_step(
    run: Run, done: int, stop: bool, preemption: Preemption, metrics: MetricsLogger | None, result: RunResult
) -> None:
    """The cadence after ``done`` steps: evaluation (every ``eval_every`` steps, and the last), then a checkpoint
    (every ``checkpoint.every`` steps, the last, and when stopping)."""
    cfg = run.cfg
    last = done == cfg.train.max_steps
    if run.data.val is not None and ((cfg.train.eval_every and done % cfg.train.eval_every == 0) or last):
        # Every rank evaluates the same batches on its (replicated) module: no collective needed.
        ev = {"step": done, **evaluate(run.model, run.data.val, cfg, run.device)}
        result.evals.append(ev)
        if metrics is not None:
            metrics.log_eval(ev)
        log.info(f"step {done}: val_loss {ev['val_loss']:.4f}, val_ppl {ev['val_ppl']:.2f}")
    if last or stop or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
        trainer_state = {
            "tokens": run.tokens_seen,
            "epoch": run.sampler.epoch_of(done),  # the data position is a function of (seed, step)
            "scheduler": run.scheduler.state_dict(),
            "backend": cfg.parallel.backend,
            "world_size": run.env.world_size,
        }
        with preemption.saving():  # a second Ctrl-C now would kill the save it asked for: ignored
            result.checkpoint = save_checkpoint(
                run.out,
                done,
                run.parallel.checkpoint_state(run.optimizer),
                trainer_state,
                run.config_yaml,
                cfg.checkpoint.keep_last,
                rank=run.env.rank,
                legacy_files=run.parallel.legacy_files(run.optimizer, run.env.rank),
                save_engine=run.parallel.save_engine,
            )


# -- finish --------------------------------------------------------------------------------------------------------


def finish(run: Run, result: RunResult, start_step: int) -> None:
    """Rank 0: the loss plot and the closing line."""
    cfg, out = run.cfg, run.out
    if not run.env.is_main:
        return
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
