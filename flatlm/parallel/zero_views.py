"""Per-parameter views of DeepSpeed ZeRO's flat fp32 partitions (stages 1, 2 and 3; checked on DeepSpeed 0.19.8).

Under ZeRO the client optimizer (a torch.optim.Optimizer passed to ``deepspeed.initialize(optimizer=...)``) never
sees the model's parameters. It sees flat 1-D fp32 tensors, each holding this rank's share of many parameters
back to back, and DeepSpeed sets their ``.grad`` right before calling its ``step()``. ``zero_fragments`` maps
such a flat tensor back to the parameters: one ``ParamFragment`` per (parameter, flat tensor) overlap, whose
``value`` is a 1-D view into the flat tensor (writes go to the master weights) and whose ``grad()`` is the
matching view of the flat tensor's gradient (reduced across ranks, averaged, unscaled and clipped).

Layout (read from deepspeed/runtime/zero/stage_1_and_2.py and stage3.py):

* Stage 1/2 (``DeepSpeedZeroOptimizer``): per client param group i, the trainable parameters are laid end to
  end, in ``round_robin_bit16_groups[i]`` order at ``round_robin_bit16_offsets[i]`` (only ``round_robin_gradients``
  reorders, only ``parameter_alignment`` leaves gaps), the whole padded to a multiple of 2 * world size, and cut
  into world-size equal partitions. Rank r's partition is ``single_partition_of_fp32_groups[i]``, which is
  ``param_groups[i]["params"][0]``. A parameter can straddle a partition boundary; the padding sits at the end of
  the last rank's partition.
* Stage 3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is cut on its own: rank r holds elements
  [r * n, (r + 1) * n) of it in ``param.ds_tensor`` (n = ceil(numel / world), the tail of the last ranks is
  padding). Per client param group the ``ds_tensor`` s are split into sub-groups (``sub_group_size``) and each
  sub-group is one flat tensor ``fp32_partitioned_groups_flat[k]``, the ``ds_tensor`` s back to back, padding
  included. It is a copy, not the ``ds_tensor`` storage: DeepSpeed's alias branch for an fp32 model compares
  ``tensor.device == self.device`` with ``self.device`` a string, which is False; step() copies it back.
  ``param_groups[g]["params"]`` is empty except while DeepSpeed steps a sub-group of group g.

DeepSpeed calls the client ``step()`` once per flat tensor: stage 1/2 with ``param_groups`` temporarily replaced
by the one group being stepped, stage 3 with only that group's ``params`` set to the one sub-group tensor. A
step that needs a global quantity (a norm over all parameters) must get it before ``engine.step()`` (see
``pending_grads``) or accumulate across these calls.

Between backward and step: ``pending_grads`` returns this rank's reduced gradient partitions (after a backward
on the gradient-accumulation boundary), ``clear_pending_grads`` drops them so the next backward starts from
zero, and ``push_master_to_model`` makes the model's forward see values written into the fragments (SAM's
w + eps, and the exact w again on restore).

This is the one module that reads DeepSpeed's private attributes (the ZeRO optimizers' partition bookkeeping,
``deepspeed.ops.__compatible_ops__``, the engine's checkpoint writer and recovery-script copy, the classes its
checkpoints pickle). They change between releases without notice, so the ZeRO backends first check the installed
DeepSpeed against ``DEEPSPEED_CHECKED``, the versions these reads were checked on (``check_deepspeed_version``):
another version is one clear error at setup, not a silent misreading. scripts/install.sh installs that version.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
import torch.distributed as dist
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import Tensor, nn

from flatlm.errors import FlatlmError

DEEPSPEED_CHECKED = SpecifierSet("==0.19.8")
"""The DeepSpeed releases flatlm's reads of its internals were checked against (by the test suite): 0.19.8 only."""


@dataclass
class ParamFragment:
    """The part of one parameter that this rank holds in one flat fp32 partition."""

    name: str  # fully qualified parameter name in the model
    shape: torch.Size  # full (unpartitioned) shape of the parameter
    start: int  # offset of this fragment in the flattened full parameter
    value: Tensor  # 1-D view of the fp32 master fragment: flat.detach().narrow(0, offset, numel), writable
    #                (DeepSpeed sets requires_grad on flat, so in-place writes through flat itself need no_grad)
    flat: Tensor  # the flat fp32 partition tensor the client optimizer steps
    offset: int  # where the fragment starts in ``flat``
    group: int  # index of the client optimizer's param group that owns ``flat``

    @property
    def numel(self) -> int:
        return self.value.numel()

    def slice(self, flat_like: Tensor) -> Tensor:
        """This fragment's 1-D view of any tensor laid out like ``flat`` (its grad, an optimizer state)."""
        return flat_like.view(-1).narrow(0, self.offset, self.numel)

    def grad(self) -> Tensor | None:
        """The fragment's gradient while DeepSpeed steps ``flat`` (``flat.grad`` is None outside that call)."""
        return None if self.flat.grad is None else self.slice(self.flat.grad)


def _zero_optimizer(engine: Any) -> Any:
    stage = int(engine.zero_optimization_stage())
    if stage not in (1, 2, 3):
        raise ValueError(f"zero_fragments needs ZeRO stage 1, 2 or 3, got {stage}")
    return engine.optimizer


def _stage12_fragments(zero: Any, names: dict[int, str]) -> list[list[ParamFragment]]:
    out = []
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        group_pg = zero.real_dp_process_group[i]
        rank, world = dist.get_rank(group_pg), dist.get_world_size(group_pg)
        size = zero.bit16_groups_flat[i].numel() // world  # == flat.numel(): equal partitions
        lo_part = rank * size
        frags = []
        for p, meta, off in zip(
            zero.round_robin_bit16_groups[i],
            zero.round_robin_bit16_meta[i],
            zero.round_robin_bit16_offsets[i],
            strict=True,
        ):
            lo, hi = max(off, lo_part), min(off + meta.numel(), lo_part + size)
            if lo < hi:
                frags.append(
                    ParamFragment(
                        names[id(p)],
                        meta.shape,
                        lo - off,
                        flat.detach().narrow(0, lo - lo_part, hi - lo),
                        flat,
                        lo - lo_part,
                        i,
                    )
                )
        out.append(frags)
    return out


def _stage3_fragments(zero: Any, names: dict[int, str]) -> list[list[ParamFragment]]:
    out = []
    for k, (params, flat) in enumerate(zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat, strict=True)):
        group = zero.sub_group_to_group_id[k]
        frags, offset = [], 0
        for p in params:
            n = p.ds_tensor.ds_numel  # per-rank partition size of p, padding included
            start = dist.get_rank(getattr(p, "ds_process_group", None)) * n
            real = max(0, min(n, p.ds_numel - start))
            if real > 0:
                frags.append(
                    ParamFragment(
                        names[id(p)],
                        torch.Size(p.ds_shape),
                        start,
                        flat.detach().narrow(0, offset, real),
                        flat,
                        offset,
                        group,
                    )
                )
            offset += n
        if offset != flat.numel():
            raise RuntimeError(f"sub-group {k}: ds_tensors cover {offset} elements, flat has {flat.numel()}")
        out.append(frags)
    return out


def zero_fragments(engine: Any, model: nn.Module) -> list[list[ParamFragment]]:
    """This rank's fragments, one list per flat fp32 tensor, each in flat order.

    Stage 1/2: one flat tensor per client param group (outer index == group index). Stage 3: one per sub-group,
    in DeepSpeed's order (groups in order, sub-groups within); ``ParamFragment.group`` names the client group.
    The views stay valid while DeepSpeed keeps the same flat tensors (not across ``load_checkpoint``, CPU/NVMe
    offload or ``offload_states``; call again after those).
    """
    zero = _zero_optimizer(engine)
    names = {id(p): n for n, p in model.named_parameters()}
    if int(engine.zero_optimization_stage()) == 3:
        return _stage3_fragments(zero, names)
    return _stage12_fragments(zero, names)


def pending_grads(engine: Any) -> list[Tensor]:
    """This rank's reduced, averaged gradient partitions, laid out like the flat fp32 tensors of
    ``zero_fragments`` (use ``fragment.slice``), after a backward on the gradient-accumulation boundary and
    before ``engine.step()``. Not yet unscaled or clipped (the same for fp32 without clipping).

    Stage 1/2: a fresh copy of ``averaged_gradients[i]`` (writes do not reach DeepSpeed). Stage 3: views of
    ``grad_partitions_flat_buffer``, the accumulation buffer itself (writes do reach the step; clone what must
    outlive ``clear_pending_grads`` or the next backward).
    """
    zero = _zero_optimizer(engine)
    stage3 = int(engine.zero_optimization_stage()) == 3
    out, offset = [], 0
    for k, flat in enumerate(flat_partitions(engine)):
        if zero.averaged_gradients.get(k) is None:
            raise RuntimeError("no reduced gradients: call after engine.backward on the accumulation boundary")
        if stage3:  # one buffer, the sub-groups' ds_tensor partitions back to back (_setup_for_real_optimizer)
            out.append(zero.grad_partitions_flat_buffer.narrow(0, offset, flat.numel()))
            offset += flat.numel()
        else:  # a list of per-parameter pieces and zero padding covering the partition (get_flat_partition)
            out.append(torch.cat([t.reshape(-1) for t in zero.averaged_gradients[k]]).to(flat.dtype))
        if out[-1].numel() != flat.numel():
            raise RuntimeError(f"flat {k}: reduced gradient has {out[-1].numel()} elements, partition {flat.numel()}")
    return out


@torch.no_grad()
def write_pending_grads(engine: Any, grads: dict[int, Tensor]) -> None:
    """Put rewritten ``pending_grads`` back where ``engine.step()`` reads them (SAM variants' final gradients),
    ``grads[k]`` being flat partition k's (keyed, so a partition left out cannot shift the others).

    Stage 1/2: copied into the per-parameter pieces of ``averaged_gradients[k]``, which step() flattens (and
    takes the clipping norm of). Stage 3: ``pending_grads`` are views of the buffer step() reads; copied only
    where a caller passes other tensors."""
    zero = _zero_optimizer(engine)
    if int(engine.zero_optimization_stage()) == 3:
        own = pending_grads(engine)
        for k, new in grads.items():
            if own[k].data_ptr() != new.data_ptr():
                own[k].copy_(new)
        return
    for k, new in grads.items():
        offset = 0
        for piece in zero.averaged_gradients[k]:
            piece.copy_(new.narrow(0, offset, piece.numel()).view_as(piece))
            offset += piece.numel()
        if offset != new.numel():
            raise RuntimeError(f"flat {k}: pieces cover {offset} elements, the gradient has {new.numel()}")


def clear_pending_grads(engine: Any) -> None:
    """Forget the reduced gradients so the next backward (on the boundary) yields its own gradient alone."""
    zero = _zero_optimizer(engine)
    if int(engine.zero_optimization_stage()) == 3:
        # The reduce-scatter copies into this buffer on the first micro step and adds after; zeroed, both give
        # the new gradient. Partitions of a parameter that hold only padding are never written: they stay 0.
        zero.grad_partitions_flat_buffer.zero_()
    else:
        zero.zero_grad(set_to_none=True)  # model .grad (and .grad_accum) of a pass that was not reduced
        for k in list(zero.averaged_gradients):
            zero.averaged_gradients[k] = None
            zero.all_grad_tensors[k] = None  # stage 2 sums reduced micro-batch grads here until the boundary


@torch.no_grad()
def push_master_to_model(engine: Any) -> None:
    """Make the next forward see the current fp32 master values (after writing into fragment values).

    Stage 1/2: copies this rank's master partition into its share of the replicated model weights and
    all-gathers them (DeepSpeed's ``update_lp_params``, what ``step()`` ends with). Stage 3: copies the master
    sub-groups into the flat ``ds_tensor`` storage (what ``step()`` does; skipped where they are one tensor),
    releases every gathered parameter and gathers again those DeepSpeed keeps gathered
    (``stage3_param_persistence_threshold``); the others are gathered from ``ds_tensor`` by the next forward.
    Collective: every rank must call it.
    """
    zero = _zero_optimizer(engine)
    if int(engine.zero_optimization_stage()) != 3:
        zero.update_lp_params()
        return
    for k, flat in enumerate(zero.fp32_partitioned_groups_flat):
        lp = zero.fp16_partitioned_groups_flat[k]
        if lp.data_ptr() != flat.data_ptr():
            lp.copy_(flat)
    # Gathered copies (persistent parameters, anything still held) would hide the new ds_tensor values, and a
    # gather skips a parameter already AVAILABLE: release all, as step() does first, then re-gather the persistent.
    zero.parameter_offload.partition_all_parameters()
    if zero.persistent_parameters:
        zero.persistent_parameters[0].all_gather(zero.persistent_parameters)


def flat_partitions(engine: Any) -> list[Tensor]:
    """This rank's flat fp32 master partitions, the tensors the client optimizer steps (stage 1/2: one per
    param group; stage 3: one per sub-group), in the order of ``zero_fragments``."""
    zero = _zero_optimizer(engine)
    if int(engine.zero_optimization_stage()) == 3:
        return list(zero.fp32_partitioned_groups_flat)
    return list(zero.single_partition_of_fp32_groups)


def pickled_classes() -> list[type]:
    """The plain data classes DeepSpeed's engine checkpoint files pickle beside tensors (its loss scaler, ZeRO
    stage enum and fragment addresses): what a weights-only load must allow, and nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def check_deepspeed_version(installed: str | None = None) -> None:
    """Refuse a DeepSpeed outside ``DEEPSPEED_CHECKED`` (``installed``: the version to judge, default the installed
    one), with one line naming both and the fix; a missing DeepSpeed is the same kind of error."""
    if installed is None:
        try:
            installed = metadata.version("deepspeed")
        except metadata.PackageNotFoundError:
            raise FlatlmError(
                "the ZeRO backends need DeepSpeed, which is not installed: run scripts/install.sh (it installs "
                f"deepspeed{DEEPSPEED_CHECKED}), or choose parallel.backend=ddp or fsdp2"
            ) from None
    if Version(installed) not in DEEPSPEED_CHECKED:
        raise FlatlmError(
            f"DeepSpeed {installed} is installed, but flatlm's ZeRO backends read DeepSpeed internals checked only "
            f"against deepspeed{DEEPSPEED_CHECKED}: install that (DS_BUILD_OPS=0 pip install --no-build-isolation "
            f"'deepspeed{DEEPSPEED_CHECKED}', as scripts/install.sh does), or choose parallel.backend=ddp or fsdp2"
        )


def skip_shm_comm_build() -> None:
    """On the CPU accelerator DeepSpeed compiles its shared-memory all-reduce extension (``deepspeed_shm_comm``,
    one to two minutes of g++ in every fresh environment) when its communication backend starts. That kernel only
    serves ``inference_all_reduce``, which training never calls (ZeRO's reductions go through torch.distributed),
    so flatlm marks it unavailable instead of compiling it."""
    import deepspeed.ops

    if os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def keep_client_adagrad(engine: Any, optimizer: torch.optim.Optimizer) -> None:
    """DeepSpeed's ZeRO optimizers replace a ``torch.optim.Adagrad`` client by a new Adagrad over all flat partitions
    in one param group with the defaults (``initialize_optimizer_states``, because Adagrad creates its state eagerly):
    flatlm's groups (no weight decay for norms and embeddings) and the scheduler's optimizer are lost, and ZeRO-1/2
    fail in the first backward (IndexError on the second group). Put the client back on its partitions, with the
    state Adagrad would have created for them."""
    zero = engine.optimizer
    if not isinstance(optimizer, torch.optim.Adagrad) or getattr(zero, "optimizer", optimizer) is optimizer:
        return
    init = optimizer.defaults["initial_accumulator_value"]
    optimizer.state.clear()  # keyed by the model's parameters, which DeepSpeed's client never steps
    for flat in flat_partitions(engine):
        optimizer.state[flat] = {"step": torch.tensor(0.0), "sum": torch.full_like(flat.detach(), init)}
    zero.optimizer = optimizer
    if hasattr(zero, "_create_param_mapping"):  # ZeRO-1/2 linked the weights of the replacement's one group only
        zero._link_all_hp_params()
        zero._param_slice_mappings = zero._create_param_mapping()  # saved in its checkpoints


@contextlib.contextmanager
def recorded_write_failures(engine: Any) -> Iterator[list[Exception]]:
    """Inside the body (an ``engine.save_checkpoint``), the writes that can fail on one rank only record their
    exception in the yielded list instead of raising, and once one failed this rank's remaining writes are
    skipped: the state files (``checkpoint_engine.save``), rank 0's directory (``checkpoint_engine.makedirs``)
    and rank 0's copy of DeepSpeed's recovery scripts (``_copy_recovery_script``). Raising inside DeepSpeed's save
    would leave the other ranks at one of its barriers."""
    failures: list[Exception] = []

    def record(real: Any) -> Any:
        def call_or_record(*args: Any, **kwargs: Any) -> None:
            if failures:  # this rank's save has failed already: skip its remaining files
                return
            try:
                real(*args, **kwargs)
            except Exception as exc:
                failures.append(exc)

        return call_or_record

    writer = engine.checkpoint_engine
    patched = [(writer, "save"), (writer, "makedirs"), (engine, "_copy_recovery_script")]
    for obj, name in patched:
        setattr(obj, name, record(getattr(obj, name)))
    try:
        yield failures
    finally:
        for obj, name in patched:
            delattr(obj, name)  # the class's method again
