"""The data-parallel backends flatlm applies itself, behind one small interface the train step drives.

    single   the model as it is
    ddp      DistributedDataParallel (gradients all-reduced once per pass; replicated state, or ZeRO-1 by
             parameter ownership with parallel.shard_optimizer_state)
    fsdp2    ``fully_shard`` on every transformer block (the model's ``_no_split_modules``), then the root:
             parameters, gradients and optimizer state are DTensors sharded on dim 0
    zero1-3  a DeepSpeed engine (``flatlm.parallel.deepspeed``)

``Parallel`` is what the train step sees: the module to call, how to skip gradient synchronisation for one
backward, backward itself, the global gradient norm and clipping, the optimizer step (returning the pre-clip norm
as a 0-d tensor: no host sync). One class per backend (``Parallel`` for one process, ``DDPParallel``,
``FSDP2Parallel``, ``DeepSpeedParallel`` / ``Zero3Parallel``; ``flatlm.parallel.compat.BACKENDS`` maps the names).

SAM family. ``perturb`` / ``restore`` are written once (``flatlm.parallel.sam_step``) over a few members each
backend provides: ``sam_views`` (the weights to perturb as ``ParamView`` s with stable keys, built once),
``sam_grads`` / ``second_pass_grads`` (the gradients where the step reads them), ``drop_gradients``,
``publish_weights`` (ZeRO's push of master partitions to the model), ``commit_gradients`` (a rewritten final
gradient back where the step reads it) and ``end_local_pass``. What a backend allows is declared as class
attributes (``whole_weights``, ``tensors_are_parameters``, ``replica_grads_like_first_pass``);
``flatlm.parallel.compat`` computes the impossible pairs from them and the variants' declared needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from flatlm.optim.views import ParamView, plain_views
from flatlm.parallel.collectives import average_, clip_grad_norm_


@dataclass
class Parallel:
    backend: str
    model: torch.nn.Module
    """The model whose parameters the optimizer holds (FSDP2: sharded in place)."""
    forward_module: torch.nn.Module
    """What forward/backward run through (the DDP wrapper, the FSDP2 root, the DeepSpeed engine)."""
    grads_sharded: bool = False
    """Each rank holds a different part of the gradients (norms need an all-reduce)."""
    extra: dict[str, Any] = field(default_factory=dict)

    # -- capabilities: what may run here (flatlm.parallel.compat computes the impossible pairs from them) --------

    whole_weights: ClassVar[bool] = True
    """Every rank can hold every parameter's whole values for a step (replica perturbation is possible)."""
    tensors_are_parameters: ClassVar[bool] = True
    """The optimizer's tensors are whole parameters (a per-tensor choice is a per-parameter choice)."""
    replica_grads_like_first_pass: ClassVar[bool] = True
    """Under replica perturbation the gradients the step reads have the layout of this rank's pass-1 gradient (a
    final gradient built from pass 1, or a skipped pass 2, can be averaged into them)."""

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside this context accumulates gradients locally, without synchronising them."""
        yield

    def local_pass(self) -> contextlib.AbstractContextManager:
        """A backward whose gradients stay on this rank for the whole pass (replica SAM's first pass)."""
        self._replica_step = True
        return self.no_sync()

    def local_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run a local pass through (``model``, the one the step would use)."""
        return model

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Average gradients accumulated under ``no_sync`` over the ranks (nothing to do in one process)."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _accumulate_local(self, loss: torch.Tensor, params: list[torch.Tensor]) -> None:
        """Add d loss / d params to ``self._local_grads`` with ``torch.autograd.grad``: no ``.grad`` is written,
        so no backend's reduction hook fires (replica SAM's local first pass)."""
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        if getattr(self, "_local_grads", None) is None:
            self._local_grads = [torch.zeros_like(p) for p in params]
        for acc, g in zip(self._local_grads, grads, strict=True):
            if g is not None:
                acc.add_(g)

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` by the global norm over every shard, step, zero the gradients; returns the norm
        before clipping as a 0-d tensor (no host sync)."""
        norm = clip_grad_norm_(params, max_norm, sharded=self.grads_sharded)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # -- the SAM family between the passes, written once (``flatlm.parallel.sam_step``) over the members below ------

    def perturb(self, optimizer: Any) -> bool:
        """SAM family after pass 1: move to w + eps (True: pass 2 must run)."""
        from flatlm.parallel.sam_step import perturb

        return perturb(self, optimizer)

    def restore(self, optimizer: Any) -> None:
        """SAM family after pass 2: w back, the final gradient where the step reads it."""
        from flatlm.parallel.sam_step import restore

        restore(self, optimizer)

    def first_pass_was_local(self) -> bool:
        """Whether this step's pass 1 ran under ``local_pass`` (asked once, by ``perturb``)."""
        return bool(self.__dict__.pop("_replica_step", False))

    def sam_views(self, optimizer: Any, local: bool) -> list[ParamView]:
        """The weight views to perturb for this pass, built once: here the optimizer's own tensors (whole
        parameters or FSDP2's DTensors), keyed by their position in its param groups (its state_dict numbering)."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        ids = tuple(id(p) for p in params)
        cached = self.__dict__.get("_views")
        if cached is None or cached[0] != ids:
            cached = self.__dict__["_views"] = (ids, plain_views([(str(i), p) for i, p in enumerate(params)]))
        return cached[1]

    def sam_grads(self, views: list[ParamView], local: bool) -> list[torch.Tensor | None]:
        """This pass's gradients of ``views`` (None: no gradient), where the step reads them."""
        return [v.tensor.grad for v in views]

    def drop_gradients(self, views: list[ParamView], local: bool) -> None:
        """Pass 2 starts from no gradient (torch's ``zero_grad(set_to_none=True)``)."""
        for v in views:
            v.tensor.grad = None

    def second_pass_grads(self, views: list[ParamView], local: bool) -> list[torch.Tensor] | None:
        """Pass 2's synchronised gradients laid out like ``views`` (None: another layout, so no variant may
        rewrite them from pass-1 values). A view without one gets zeros (a parameter pass 2 did not use)."""
        for v in views:
            if v.tensor.grad is None:
                v.tensor.grad = torch.zeros_like(v.tensor)
        return [v.tensor.grad for v in views]

    def publish_weights(self, local: bool) -> None:
        """Make the next forward see the values written into the views (ZeRO pushes its master partitions)."""

    def commit_gradients(self, views: list[ParamView], grads: list[torch.Tensor], local: bool) -> None:
        """Put gradients a variant rewrote (from ``sam_grads`` / ``second_pass_grads``) where the step reads them,
        ``grads[i]`` being ``views[i]``'s (matched by view, never by position in another list); nothing where those
        already are the step's tensors. Called only for variants that ``writes_final_grad``."""

    def end_local_pass(self) -> None:
        """After a replica step's restore: put the backend back in its usual mode (FSDP2 reshards)."""

    # -- checkpoint format: what the checkpoint module (flatlm.train.checkpoint) saves and loads -----------------

    checkpoint_format: ClassVar[str] = "dcp"
    """How this backend's state is checkpointed. "dcp": ``checkpoint_state`` is saved with
    torch.distributed.checkpoint, read back by name into the same structure (resharded: any DCP backend and world
    size resumes it) and handed to ``load_state``. "engine": the backend writes and reads a directory of its own
    (``save_engine`` / ``load_engine``), resumable only by the same backend and world size. File checks, the
    trainer state and RNG states are the checkpoint module's, never the backend's."""

    def checkpoint_state(
        self, optimizer: torch.optim.Optimizer, *, with_optimizer: bool = True
    ) -> dict[str, Any] | None:
        """Model (and unless ``with_optimizer`` is False, optimizer) state keyed by parameter name for
        torch.distributed.checkpoint, each rank its shards: ``{"model": ..., "optim": ...}``. None for an "engine"
        format. Loading fills this same structure in place, then calls ``load_state``."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if not with_optimizer:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Put a loaded ``checkpoint_state`` back into the model and, when it holds ``"optim"``, the optimizer."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

        if "optim" not in state:
            set_model_state_dict(self.model, state["model"])
            return
        from flatlm.optim.registry import inner_optimizers
        from flatlm.parallel.ownership import OwnedParamsOptimizer

        # Ownership (parallel.shard_optimizer_state): a rank holds state for the parameters it owns only, so torch's
        # check that every parameter has state cannot hold; DCP has already refused a checkpoint missing an owned one.
        owned = any(isinstance(o, OwnedParamsOptimizer) for o in inner_optimizers(optimizer))
        set_state_dict(
            self.model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(strict=not owned),
        )

    def legacy_files(self, optimizer: torch.optim.Optimizer, rank: int) -> dict[str, Any]:
        """Files a backend without DCP support writes beside its own checkpoint ({name: tensors}); none here."""
        return {}

    def save_engine(self, directory: Path) -> None:
        """Write an "engine" format's own files into checkpoint ``directory``; nothing here. Collective."""

    def engine_pickles(self, directory: Path) -> tuple[list[Path], list[type]]:
        """The pickled files ``load_engine`` would read from checkpoint ``directory``, and the plain data classes
        they may hold beyond tensors (the checkpoint module refuses anything else before loading)."""
        return [], []

    def load_engine(self, directory: Path, load_optimizer: bool) -> None:
        """Load an "engine" format's files from checkpoint ``directory``. Collective."""
        raise TypeError(f"the {self.backend} backend checkpoints with DCP (checkpoint_state / load_state)")


class DDPParallel(Parallel):
    """DistributedDataParallel: whole weights, gradients and (unless owned) optimizer state on every rank."""

    def __init__(self, model: torch.nn.Module, forward_module: torch.nn.Module) -> None:
        super().__init__("ddp", model, forward_module)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        with self.forward_module.no_sync():
            yield

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Average gradients accumulated under ``no_sync`` over the ranks (one flat all-reduce)."""
        average_([p.grad for p in params if p.grad is not None])


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
