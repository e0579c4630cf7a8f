"""FSDP2: ``fully_shard`` on every transformer block, then the root (torchtitan's order), and the ``Parallel``
that drives it: SAM views over the DTensor parameters (global) or this step's unsharded copies (replica)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from flatlm.optim.views import ParamView
from flatlm.parallel.backend import Parallel


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class is in transformers' ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_fsdp2(model: torch.nn.Module, *, reshard_after_forward: bool, bf16: bool) -> torch.nn.Module:
    """``fully_shard`` each transformer block, then the root (torchtitan's order). bf16: compute in bf16 with
    fp32 master weights and fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules) to shard")
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(model, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    return model


class FSDP2Parallel(Parallel):
    """``Parallel`` over a ``fully_shard``-ed model, with replica SAM's local first pass.

    Global perturbation: the SAM views are the optimizer's DTensor parameters (the base ``sam_views``); norms are
    global through the optimizer's ``sum_across_ranks``.

    Replica SAM needs each rank's *whole* weights moved by its own eps, but FSDP2 gathers every forward's
    weights from shards that all ranks share. So for replica steps the blocks are unsharded once (one
    all-gather) and kept unsharded through both passes: pass 1 takes this rank's gradient with
    ``torch.autograd.grad`` w.r.t. the unsharded weights (``set_requires_gradient_sync(False)``; nothing is
    reduced), eps is added to this rank's unsharded copy (transient views, keyed by name: nothing is kept aside),
    pass 2 reduce-scatters the gradients into the shards as usual, and ``end_local_pass`` drops the unsharded
    copies (the shards, w, were never touched). Cost: DDP's memory for the step (whole weights, whole local
    gradient) and one all-gather instead of one per pass. The step reads sharded gradients, unlike pass 1's
    whole local ones (``replica_grads_like_first_pass`` False): variants whose final gradient uses pass 1 run
    with global perturbation here.
    """

    replica_grads_like_first_pass: ClassVar[bool] = False

    def __init__(self, model: torch.nn.Module, reshard_after_forward: bool) -> None:
        super().__init__("fsdp2", model, model, grads_sharded=True)
        self.reshard_after_forward = reshard_after_forward
        self._local_mode = False
        self._local_grads: list[torch.Tensor] | None = None
        self._replica_views: list[ParamView] | None = None  # keys and flags, built once; tensors per step

    def _fsdp_modules(self) -> list[Any]:
        from torch.distributed.fsdp import FSDPModule

        return [m for m in self.model.modules() if isinstance(m, FSDPModule)]

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.forward_module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.forward_module.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def local_pass(self) -> Iterator[None]:
        self._replica_step = True
        if self._local_grads is None:  # first micro-batch of pass 1: gather whole weights and keep them
            for m in self._fsdp_modules():
                m.set_reshard_after_forward(False)
                m.set_reshard_after_backward(False)
                m.set_requires_gradient_sync(False)
                m.unshard()
        self._local_mode = True
        try:
            yield
        finally:
            self._local_mode = False

    def backward(self, loss: torch.Tensor) -> None:
        if not self._local_mode:
            loss.backward()
            return
        self._accumulate_local(loss, self._trainable())  # unsharded now

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def sam_views(self, optimizer: Any, local: bool) -> list[ParamView]:
        if not local:
            return super().sam_views(optimizer, local)
        tensors = [p.detach() for p in self._trainable()]  # this step's unsharded copies
        if self._replica_views is None:
            names = [n for n, p in self.model.named_parameters() if p.requires_grad]
            self._replica_views = [
                ParamView(f"unsharded.{n}", t, t.shape, swappable=False, whole=True, transient=True)
                for n, t in zip(names, tensors, strict=True)
            ]
        return [v.with_tensor(t) for v, t in zip(self._replica_views, tensors, strict=True)]

    def sam_grads(self, views: list[ParamView], local: bool) -> list[torch.Tensor | None]:
        if not local:
            return super().sam_grads(views, local)
        return list(self._local_grads or [None] * len(views))

    def drop_gradients(self, views: list[ParamView], local: bool) -> None:
        if not local:
            super().drop_gradients(views, local)
            return
        self._local_grads = None
        for m in self._fsdp_modules():  # pass 2 reduces its gradients into the shards as usual
            m.set_requires_gradient_sync(True)

    def second_pass_grads(self, views: list[ParamView], local: bool) -> list[torch.Tensor] | None:
        return None if local else super().second_pass_grads(views, local)

    def end_local_pass(self) -> None:
        for m in self._fsdp_modules():
            m.reshard()
            m.set_reshard_after_forward(self.reshard_after_forward)
            m.set_reshard_after_backward(True)
