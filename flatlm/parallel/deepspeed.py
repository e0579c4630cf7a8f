"""DeepSpeed ZeRO-1/2/3, applied by flatlm: ``deepspeed.initialize`` with a config built from flatlm's settings.

The DeepSpeed config comes from ``train.*`` (global and micro batch, accumulation, clipping, bf16), so
DeepSpeed's batch checks always agree with flatlm's; a user's DeepSpeed JSON (the launcher's
``deepspeed_config_file``) may add ZeRO options but must not contradict those. flatlm's optimizer is passed as
the *client* optimizer: DeepSpeed hands it flat fp32 partitions (state sharded, ``zero_allow_untested_optimizer``).

One step (the train step drives it through ``Parallel``):
    backward per micro-batch   ``set_gradient_accumulation_boundary(last)`` then ``engine.backward`` (the loss is
                               already divided by the accumulation count: ``scale_wrt_gas=False``)
    step                       ``engine.step()``: DeepSpeed clips by the global norm (``gradient_clipping``), calls
                               the client optimizer once per flat partition, writes the weights back
SAM family (the protocol is ``flatlm.parallel.sam_step``, the same on every backend; this class supplies its
views and gradients). Global perturbation: the views are this rank's flat fp32 master partitions, built once and
keyed by position ("k", the client optimizer's state_dict numbering, so LookSAM's g_v checkpoints with the rest),
the gradients the reduced partitions (``parallel.zero_views.pending_grads``); w + eps uses the global norm (one
scalar all-reduce), is pushed to the model (DeepSpeed's own all-gather / re-partition), the pass-1 gradients are
dropped; after pass 2 the masters come back exactly and are pushed again, and a variant's final gradient (SSAM,
GSAM, LookSAM: rewritten in the pending partitions) is written back where ``engine.step()`` reads it
(``write_pending_grads``; ZeRO-3's are views of that buffer already). ESAM's per-tensor subsets are refused: a
partition is not a parameter (``flatlm.parallel.compat``).
Replica perturbation (ZeRO-1/2, whose ranks hold whole weights): pass 1 runs through the bare module with
``torch.autograd.grad`` (DeepSpeed's reduction hooks never fire, nothing is communicated), each rank moves its
replicated weights (views keyed by name) by its own eps, pass 2 is a normal reduced pass, then the weights are
copied back; the step reads reduced partitions, so only variants whose final gradient is g' run that way.
Muon and Adafactor need whole matrices: they are built with a ``ZeroLayout`` (``parallel.zero_layout``), bound
after ``deepspeed.initialize`` to the map from each flat partition back to every rank's pieces of each matrix; their
own update functions then run on the pieces (Muon: gather -> Newton-Schulz once per matrix -> scatter; Adafactor:
factored, n + m numbers all-reduced per matrix). The optimizer's class never changes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from flatlm.config import RunConfig
from flatlm.errors import FlatlmError
from flatlm.optim.views import ParamView
from flatlm.parallel.backend import Parallel
from flatlm.parallel.zero_views import check_deepspeed_version, keep_client_adagrad, skip_shm_comm_build

ENGINE_DIR, ENGINE_TAG = "deepspeed", "state"  # checkpoints/step-N/deepspeed/state/*.pt


def deepspeed_config(
    cfg: RunConfig, world_size: int, accum: int, environ: dict[str, str] | None = None, model_numel: int | None = None
) -> dict:
    """The DeepSpeed config for this run; a launcher-given JSON may add options but not contradict flatlm's.

    ``model_numel`` caps ZeRO's reduce / all-gather bucket sizes (DeepSpeed's default, 5e8 elements, is allocated
    again and again on CPU: ~1 s per ``torch.empty`` of 2 GB, measured 25-100 s per 8-step run of a 130k-parameter
    model, against 1 s with the cap); a user JSON's bucket sizes win."""
    stage = int(cfg.parallel.backend.removeprefix("zero"))
    ours: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.train.bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    environ = dict(os.environ if environ is None else environ)
    user: dict[str, Any] = {}
    path = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path.lower() != "none":
        try:
            user = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FlatlmError(f"cannot read the DeepSpeed config {path}: {exc}") from None
    value = environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if value is not None and value.lower() not in ("none", "auto"):
        user.setdefault("gradient_accumulation_steps", int(value))
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        if key in user and user[key] != "auto" and float(user[key]) != float(ours[key]):
            raise FlatlmError(
                f"the DeepSpeed config sets {key}={user[key]} but flatlm's settings give {ours[key]} "
                f"(train.global_batch_size={cfg.train.global_batch_size}, train.micro_batch_size="
                f"{cfg.train.micro_batch_size}, {world_size} processes, train.grad_clip={cfg.train.grad_clip}); "
                "remove it from the DeepSpeed config (flatlm derives it) or change the train.* keys"
            )
    buckets = {} if model_numel is None else {"reduce_bucket_size": min(int(5e8), max(model_numel, 1))}
    if buckets:
        buckets["allgather_bucket_size"] = buckets["reduce_bucket_size"]
    zero = {**buckets, **user.get("zero_optimization", {}), "stage": stage}
    if user.get("zero_optimization", {}).get("stage", stage) != stage:
        raise FlatlmError(
            f"the DeepSpeed config asks for ZeRO stage {user['zero_optimization']['stage']} but the backend is "
            f"{cfg.parallel.backend}; make them agree"
        )
    if user.get("optimizer") is not None:
        raise FlatlmError(
            "the DeepSpeed config names an optimizer; flatlm passes its own (optim.name): remove the optimizer block"
        )
    return {**user, **ours, "zero_optimization": zero}


class DeepSpeedParallel(Parallel):
    """``Parallel`` over a DeepSpeed engine (see the module docstring for the order of one step).

    Capabilities: the optimizer's tensors are flat partitions holding pieces of many parameters
    (``tensors_are_parameters`` False); the reduced gradient partitions can be rewritten before ``engine.step()``
    (``commit_gradients``); ZeRO-1/2 ranks hold whole weights (replica perturbation), but the step reads reduced
    partitions, not pass 1's whole local gradients."""

    tensors_are_parameters: ClassVar[bool] = False
    replica_grads_like_first_pass: ClassVar[bool] = False

    def __init__(self, backend: str, model: torch.nn.Module, engine: Any) -> None:
        super().__init__(backend, model, engine, grads_sharded=True)
        self.engine = engine
        self._boundary = True
        self._local_mode = False  # replica SAM's pass 1: gradients by autograd.grad, never reduced
        self._local_grads: list[torch.Tensor] | None = None
        self._flat_views: tuple[tuple[int, ...], list[ParamView]] | None = None
        self._replica_views: list[ParamView] | None = None

    @contextlib.contextmanager
    def local_pass(self) -> Iterator[None]:
        """Pass 1 of replica SAM (ZeRO-1/2): ``torch.autograd.grad`` on the bare module keeps this rank's
        gradient to itself (DeepSpeed reduces through post-accumulate-grad hooks, which autograd.grad never
        fires, and ``engine.no_sync`` asserts under ZeRO-2/3)."""
        self._replica_step = True
        self._local_mode = True
        try:
            yield
        finally:
            self._local_mode = False

    def local_module(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.model

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Not the last micro-batch: DeepSpeed accumulates (ZeRO-2/3 still reduce-scatter every backward)."""
        self._boundary = False
        try:
            yield
        finally:
            self._boundary = True

    def backward(self, loss: torch.Tensor) -> None:
        if self._local_mode:
            self._accumulate_local(loss, [p for p in self.model.parameters() if p.requires_grad])
            return
        self.engine.set_gradient_accumulation_boundary(self._boundary)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """DeepSpeed clips (gradient_clipping) and steps; returns its global gradient norm before clipping (0-d)."""
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(norm if norm is not None else float("nan"))

    # -- SAM's views and gradients (the protocol is flatlm.parallel.sam_step) -------------------------------------

    def sam_views(self, optimizer: Any, local: bool) -> list[ParamView]:
        """Global: this rank's flat fp32 master partitions, partition k keyed "k" (its position in the client
        optimizer's state_dict); replica (ZeRO-1/2): the model's replicated weights by name. Built once (the flat
        tensors are checked: a reload that replaced them gets new views under the same keys)."""
        from flatlm.parallel.zero_views import flat_partitions

        if local:
            if self._replica_views is None:
                self._replica_views = [
                    ParamView(f"replica.{n}", p.detach(), p.shape, swappable=False, whole=True)
                    for n, p in self.model.named_parameters()
                    if p.requires_grad
                ]
            return self._replica_views
        flats = flat_partitions(self.engine)
        ids = tuple(id(f) for f in flats)
        if self._flat_views is None or self._flat_views[0] != ids:
            views = [ParamView(str(k), f.detach(), f.shape, swappable=False, whole=False) for k, f in enumerate(flats)]
            self._flat_views = (ids, views)
        return self._flat_views[1]

    def sam_grads(self, views: list[ParamView], local: bool) -> list[torch.Tensor | None]:
        from flatlm.parallel.zero_views import pending_grads

        if local:
            return list(self._local_grads or [None] * len(views))
        return list(pending_grads(self.engine))

    def drop_gradients(self, views: list[ParamView], local: bool) -> None:
        from flatlm.parallel.zero_views import clear_pending_grads

        if local:
            self._local_grads = None
        else:
            clear_pending_grads(self.engine)

    def second_pass_grads(self, views: list[ParamView], local: bool) -> list[torch.Tensor] | None:
        from flatlm.parallel.zero_views import pending_grads

        return None if local else list(pending_grads(self.engine))

    def publish_weights(self, local: bool) -> None:
        """Global: the master partitions moved, push them to the model (DeepSpeed's own all-gather or
        re-partition); replica: the model's weights themselves moved."""
        from flatlm.parallel.zero_views import push_master_to_model

        if not local:
            push_master_to_model(self.engine)

    def commit_gradients(self, views: list[ParamView], grads: list[torch.Tensor], local: bool) -> None:
        from flatlm.parallel.zero_views import write_pending_grads

        if not local:  # view "k" is flat partition k
            write_pending_grads(self.engine, {int(v.key): g for v, g in zip(views, grads, strict=True)})

    checkpoint_format: ClassVar[str] = "engine"  # DeepSpeed's own checkpoint (save_engine / load_engine), not DCP

    def checkpoint_state(
        self, optimizer: torch.optim.Optimizer, *, with_optimizer: bool = True
    ) -> dict[str, Any] | None:
        return None  # DeepSpeed's own engine checkpoint instead (save_engine)

    def save_engine(self, directory: Path) -> None:
        """DeepSpeed's engine checkpoint: each rank its partitions of weights, gradients' fp32 master and the
        client optimizer's state (resumable with the same ZeRO stage and number of processes).

        A file write that fails on this rank (disk full: ``torch.save`` raises RuntimeError, ``shutil`` OSError) is
        recorded and re-raised after DeepSpeed's save returns: raising inside it would leave the other ranks at one
        of DeepSpeed's barriers; this way every rank reaches them and the checkpoint module's agreement fails the
        save everywhere. The writes that can fail on one rank only: the state files (``checkpoint_engine.save``),
        rank 0's directory (``checkpoint_engine.makedirs``) and rank 0's copy of DeepSpeed's recovery scripts
        (``zero_views.recorded_write_failures``)."""
        from flatlm.parallel.zero_views import recorded_write_failures

        with recorded_write_failures(self.engine) as failures:
            self.engine.save_checkpoint(str(directory / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False)
        if failures:
            raise failures[0]

    def engine_pickles(self, directory: Path) -> tuple[list[Path], list[type]]:
        """DeepSpeed's state files (``torch.save`` pickles) and the plain data classes DeepSpeed puts in them."""
        from flatlm.parallel.zero_views import pickled_classes

        return sorted((directory / ENGINE_DIR / ENGINE_TAG).glob("*.pt")), pickled_classes()

    def load_engine(self, directory: Path, load_optimizer: bool) -> None:
        """``engine.load_checkpoint`` of the engine checkpoint in ``directory`` (same ZeRO stage and world size: the
        checkpoint module has checked that, and the files' safety, before)."""
        engine_dir = directory / ENGINE_DIR
        loaded, _ = self.engine.load_checkpoint(
            str(engine_dir), tag=ENGINE_TAG, load_optimizer_states=load_optimizer, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise FlatlmError(f"DeepSpeed could not load {engine_dir}")

    def legacy_files(self, optimizer: torch.optim.Optimizer, rank: int) -> dict[str, Any]:
        """The whole model for export (rank 0, gathered under ZeRO-3)."""
        files: dict[str, Any] = {}
        params = list(self.model.parameters())
        if self.backend == "zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                model = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if rank == 0 else None
        else:
            model = self.model.state_dict() if rank == 0 else None
        if model is not None:
            files["model.safetensors"] = model
        return files


class Zero3Parallel(DeepSpeedParallel):
    """ZeRO-3: the weights themselves are partitioned; no rank holds them whole (no replica perturbation)."""

    whole_weights: ClassVar[bool] = False


def deepspeed_parallel(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, accum: int, layout: Any = None
) -> tuple[DeepSpeedParallel, torch.optim.Optimizer]:
    """Initialise the DeepSpeed engine around ``model`` with ``optimizer`` as its client optimizer; then bind
    ``layout`` (the ``ZeroLayout`` the optimizer was built with, if any) to the engine's flat partitions."""
    check_deepspeed_version()  # before anything of DeepSpeed runs: its internals are read as checked
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import deepspeed

    numel = sum(p.numel() for p in model.parameters())
    config = deepspeed_config(cfg, cfg.parallel.world_size, accum, model_numel=numel)
    skip_shm_comm_build()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    keep_client_adagrad(engine, optimizer)
    _shape_aware_on_partitions(layout, engine, model)
    cls = Zero3Parallel if cfg.parallel.backend == "zero3" else DeepSpeedParallel
    return cls(cfg.parallel.backend, model, engine), optimizer


def _shape_aware_on_partitions(layout: Any, engine: Any, model: torch.nn.Module) -> None:
    """Bind the layout Muon and Adafactor were built with to DeepSpeed's flat partitions (the map from each flat
    partition back to every rank's pieces of each matrix). Collective: one all_gather_object at setup."""
    if layout is not None and hasattr(layout, "bind"):
        layout.bind(engine, model)
