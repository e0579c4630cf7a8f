"""Adafactor as DeepSpeed ZeRO's client optimizer, still factored on DeepSpeed's flat partitions.

An unaware Adafactor stepping a flat partition sees a 1-D tensor and keeps a full second moment for it
(no memory saved). Here each flat partition is read as pieces of whole parameters (``zero_layout``): a piece
of an n x m matrix is a run of row-major elements, possibly starting and ending mid-row, and may sit on
several ranks. The update is ``flatlm.optim.adafactor``'s (same order, same eps handling), with every
whole-parameter quantity summed over the ranks' pieces:

    per flat partition and step, in this order, three all-reduces for all its parameters at once
    1. RMS(X) per parameter                 (scale_parameter)   one number per parameter
    2. row and column sums of G^2 + eps1     per matrix          n + m numbers per matrix -> R, C (whole)
    3. RMS(U) per parameter, for clipping                        one number per parameter

State per matrix: R [n] and C [m] (the same on every rank: O(n + m), never a matrix); per vector parameter
V for this rank's piece; ``exp_avg`` (beta1) shaped like the flat partition, sharded like the weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flatlm.optim.adafactor import Adafactor, _relative_step
from flatlm.parallel.collectives import all_reduce_sum, world
from flatlm.parallel.zero_layout import FlatLayout


class ZeroAdafactor(Adafactor):
    """``Adafactor`` whose parameters are DeepSpeed flat partitions described by ``layouts`` (id(flat) -> layout).

    Made from a built ``Adafactor`` by ``on_zero_partitions`` (class swapped, as ``fully_shard`` does).
    """

    layouts: dict[int, FlatLayout]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for flat in group["params"]:
                if flat.grad is not None:
                    self._step_flat(group, flat)
        return loss

    def _step_flat(self, group: dict[str, Any], flat: Tensor) -> None:
        rank, _ = world()
        layout = self.layouts[id(flat)]
        eps1, eps2 = group["eps"]
        n_params = len(layout.names)
        state = self.state[flat]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg_sq_row"] = {i: flat.new_zeros(s[0]) for i, s in enumerate(layout.shapes) if len(s) == 2}
            state["exp_avg_sq_col"] = {i: flat.new_zeros(s[1]) for i, s in enumerate(layout.shapes) if len(s) == 2}
            state["exp_avg_sq"] = {
                i: flat.new_zeros(layout.pieces[i][rank].numel) for i, s in enumerate(layout.shapes) if len(s) != 2
            }
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(flat)
        state["step"] += 1
        t = state["step"].item()
        rho = _relative_step(t, lr=group["lr"], relative_step=group["relative_step"], warmup_init=group["warmup_init"])
        one_minus_beta2 = t ** group["decay_rate"]
        xs = [layout.local(i, flat, rank) for i in range(n_params)]
        gs = [layout.local(i, flat.grad, rank) for i in range(n_params)]
        numels = [float(torch.Size(s).numel()) for s in layout.shapes]

        # 1. alpha = max(RMS(X), eps2) rho per parameter
        if group["scale_parameter"]:
            sumsq = all_reduce_sum(torch.stack([x.square().sum() for x in xs]) if xs else flat.new_zeros(0))
            alphas = [(sumsq[i] / numels[i]).sqrt().clamp(min=eps2) * rho for i in range(n_params)]
        else:
            alphas = [rho] * n_params

        # 2. factored statistics from every rank's pieces: row and column sums of G^2 + eps1, one all-reduce
        rows, cols = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        matrices = sorted(rows)
        g2 = [g * g + eps1 for g in gs]
        sums = []
        for i in matrices:
            n, m = layout.shapes[i]
            r_idx, c_idx = self._indices(layout, i, rank, m)
            sums.append(flat.new_zeros(n).index_add_(0, r_idx, g2[i]))
            sums.append(flat.new_zeros(m).index_add_(0, c_idx, g2[i]))
        total = all_reduce_sum(torch.cat(sums)) if sums else flat.new_zeros(0)
        updates: list[Tensor] = [None] * n_params  # type: ignore[list-item]
        offset = 0
        for i in matrices:
            n, m = layout.shapes[i]
            rows[i].lerp_(total[offset : offset + n] / m, one_minus_beta2)  # R
            cols[i].lerp_(total[offset + n : offset + n + m] / n, one_minus_beta2)  # C
            offset += n + m
            r = (rows[i] / cols[i].mean()).rsqrt()
            r_idx, c_idx = self._indices(layout, i, rank, m)
            updates[i] = gs[i] * r[r_idx] * cols[i].rsqrt()[c_idx]  # G / sqrt(V) on this piece
        for i, v in state["exp_avg_sq"].items():
            v.lerp_(g2[i], one_minus_beta2)
            updates[i] = gs[i] * v.rsqrt()

        # 3. clip each parameter's update RMS to clip_threshold, one all-reduce; then the step
        usq = all_reduce_sum(torch.stack([u.square().sum() for u in updates]) if updates else flat.new_zeros(0))
        for i in range(n_params):
            rms = (usq[i] / numels[i]).sqrt()
            updates[i].mul_(alphas[i] / (rms / group["clip_threshold"]).clamp(min=1.0))
        beta1, wd = group["beta1"], group["weight_decay"]
        for i in range(n_params):
            if not xs[i].numel():
                continue
            update = updates[i]
            if beta1 is not None:
                m_i = layout.local(i, state["exp_avg"], rank)
                m_i.lerp_(update, 1.0 - beta1)
                update = m_i
            if wd != 0:
                xs[i].mul_(1.0 - wd * alphas[i])
            xs[i].sub_(update)

    def _indices(self, layout: FlatLayout, i: int, rank: int, m: int) -> tuple[Tensor, Tensor]:
        """Row and column index of each element of this rank's piece of matrix i (cached)."""
        cache = self.__dict__.setdefault("_index_cache", {})
        key = (id(layout), i)
        if key not in cache:
            piece = layout.pieces[i][rank]
            flat_idx = torch.arange(piece.start, piece.start + piece.numel)
            cache[key] = (flat_idx // m, flat_idx % m)
        return cache[key]


def on_zero_partitions(optimizer: Adafactor, layouts: dict[int, FlatLayout]) -> ZeroAdafactor:
    """Turn an ``Adafactor`` whose parameters DeepSpeed replaced by flat partitions into a ``ZeroAdafactor``."""
    if any(len(s) > 2 for lay in layouts.values() for s in lay.shapes):
        raise ValueError("Adafactor on ZeRO partitions supports 1-D and 2-D parameters")
    optimizer.__class__ = ZeroAdafactor
    optimizer.layouts = layouts
    return optimizer  # type: ignore[return-value]
