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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


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
