"""The data-parallel backends flatlm applies itself, behind one small interface the train step drives.

    single   the model as it is
    ddp      DistributedDataParallel (gradients all-reduced once per pass; replicated state, or ZeRO-1 by
             parameter ownership with parallel.shard_optimizer_state)
    fsdp2    ``fully_shard`` on every transformer block (the model's ``_no_split_modules``), then the root:
             parameters, gradients and optimizer state are DTensors sharded on dim 0
    zero1-3  a DeepSpeed engine (``flatlm.parallel.deepspeed``)

``Parallel`` is what the train step sees: the module to call, how to skip gradient synchronisation for one
backward, backward itself, the global gradient norm and clipping, the optimizer step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from flatlm.parallel.collectives import clip_grad_norm_


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

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside this context accumulates gradients locally, without synchronising them."""
        module = self.forward_module
        if self.backend == "ddp":
            with module.no_sync():
                yield
        elif self.backend == "fsdp2":
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        else:
            yield

    def local_pass(self) -> contextlib.AbstractContextManager:
        """A backward whose gradients stay on this rank for the whole pass (replica SAM's first pass)."""
        self._replica_step = True
        return self.no_sync()

    def local_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run a local pass through (``model``, the one the step would use)."""
        return model

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Average gradients accumulated under ``no_sync`` over the ranks (one flat all-reduce)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.backend != "ddp" or not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, new in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(new)

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

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> float:
        """Clip to ``max_norm`` by the global norm over every shard, step, zero the gradients; returns the norm
        before clipping."""
        norm = clip_grad_norm_(params, max_norm, sharded=self.grads_sharded)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def perturb(self, optimizer: Any) -> bool:
        """SAM family after pass 1: move to w + eps (True: pass 2 must run)."""
        return optimizer.perturb()

    def restore(self, optimizer: Any) -> None:
        """SAM family after pass 2: w back, the final gradient in place. After a replica pass 1 (DDP), a variant's
        final gradient can use this rank's own pass-1 gradient (SSAM, GSAM): the ranks' final gradients are then
        averaged (one flat all-reduce), else each rank would step its whole weights differently (they diverged
        after the first step, unseen: a DDP checkpoint keeps rank 0's copy)."""
        optimizer.restore()
        if self.__dict__.pop("_replica_step", False):
            self.average_gradients([p for p in self.model.parameters() if p.grad is not None])

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


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
