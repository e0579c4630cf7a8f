"""FSDP2: ``fully_shard`` on every transformer block, then the root (torchtitan's order), and the ``Parallel``
that drives it, with replica SAM's local first pass on unsharded copies."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

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

    Replica SAM needs each rank's *whole* weights moved by its own eps, but FSDP2 gathers every forward's
    weights from shards that all ranks share. So for replica steps the blocks are unsharded once (one
    all-gather) and kept unsharded through both passes: pass 1 takes this rank's gradient with
    ``torch.autograd.grad`` w.r.t. the unsharded weights (``set_requires_gradient_sync(False)``; nothing is
    reduced), eps is added to this rank's unsharded copy, pass 2 reduce-scatters the gradients into the
    shards as usual, and ``restore`` drops the unsharded copies (the shards, w, were never touched). Cost:
    DDP's memory for the step (whole weights, whole local gradient, the copy of w) and one all-gather
    instead of one per pass.
    """

    def __init__(self, model: torch.nn.Module, reshard_after_forward: bool) -> None:
        super().__init__("fsdp2", model, model, grads_sharded=True)
        self.reshard_after_forward = reshard_after_forward
        self._local_mode = False
        self._local_grads: list[torch.Tensor] | None = None
        self._replica_params: list[torch.Tensor] | None = None

    def _fsdp_modules(self) -> list[Any]:
        from torch.distributed.fsdp import FSDPModule

        return [m for m in self.model.modules() if isinstance(m, FSDPModule)]

    @contextlib.contextmanager
    def local_pass(self) -> Iterator[None]:
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
        self._accumulate_local(loss, [p for p in self.model.parameters() if p.requires_grad])  # unsharded now

    def perturb(self, optimizer: Any) -> bool:
        if self._local_grads is None:
            return optimizer.perturb()
        self._replica_params = [p.detach() for p in self.model.parameters() if p.requires_grad]
        with torch.no_grad():
            second = optimizer.perturb_tensors(self._replica_params, self._local_grads)
        self._local_grads = None
        for m in self._fsdp_modules():  # pass 2 reduces its gradients into the shards as usual
            m.set_requires_gradient_sync(True)
        return second

    def restore(self, optimizer: Any) -> None:
        if self._replica_params is None:
            optimizer.restore()
            return
        optimizer.forget_perturbation()  # the perturbed tensors are the unsharded copies, dropped now
        self._replica_params = None
        for m in self._fsdp_modules():
            m.reshard()
            m.set_reshard_after_forward(self.reshard_after_forward)
            m.set_reshard_after_backward(True)
