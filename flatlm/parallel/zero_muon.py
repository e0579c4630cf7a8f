"""Muon as DeepSpeed ZeRO's client optimizer: momentum on the flat partition, Newton-Schulz on whole matrices.

DeepSpeed hands the client optimizer one flat fp32 partition per step call, holding pieces of many matrices.
The Muon group's step is the single-process math in three stages (``flatlm.optim.muon`` for the math):

    1. elementwise on the flat partition   B <- mu B + (1 - mu) G;  U = (1 - mu) G + mu B (nesterov)
    2. whole matrices                       each matrix's pieces go to its owner (all-to-all), the owner runs
                                            ``orthogonalize`` (batched by shape, once per matrix across all ranks),
                                            the pieces of the result come back (all-to-all): ``parallel.muon``
    3. elementwise per piece                W <- W (1 - lr wd) - lr s(rows, cols) O   with the matrix's full shape

The AdamW group (embeddings, head, norms) is elementwise and runs unchanged on its flat partition. State
(the momentum) is flat-partition-sized: sharded like the weights. Communication per step: two all-to-alls of
the Muon matrices' elements in the NS dtype (bf16 by default).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flatlm.optim.muon import NS_DTYPES, Muon, orthogonalize, update_scale
from flatlm.parallel.collectives import world
from flatlm.parallel.muon import gather_orthogonalize_scatter
from flatlm.parallel.zero_layout import FlatLayout


class ZeroMuon(Muon):
    """``Muon`` whose parameters are DeepSpeed flat partitions described by ``layouts`` (id(flat) -> layout).

    Made from a built ``Muon`` by ``on_zero_partitions`` (the class is swapped, the way ``fully_shard`` swaps a
    module's class); the math of the AdamW group and all hyperparameters are Muon's.
    """

    layouts: dict[int, FlatLayout]
    ns_matrices: int

    def _muon_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        rank, _ = world()
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        ns_kwargs = {"steps": group["ns_steps"], "coefficients": group["ns_coefficients"], "eps": group["eps"]}
        dtype = NS_DTYPES[group["ns_dtype"]]
        for flat in params:
            layout = self.layouts[id(flat)]
            state = self.state[flat]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(flat)
            buf, grad = state["momentum_buffer"], flat.grad
            buf.lerp_(grad, 1 - mu)  # 1. B <- mu B + (1 - mu) G
            update = grad.lerp(buf, mu) if group["nesterov"] else buf
            pieces = [layout.local(i, update, rank) for i in range(len(layout.names))]

            def ns(whole: list[Tensor]) -> list[Tensor]:
                self.ns_matrices += len(whole)
                return orthogonalize(whole, dtype=dtype, **ns_kwargs)

            orths = gather_orthogonalize_scatter(pieces, layout.shapes, layout.pieces, ns, dtype)  # 2.
            flat.mul_(1 - lr * wd)  # 3. decoupled weight decay, then each piece with its matrix's scale
            for i, orth in enumerate(orths):
                if orth.numel():
                    scale = update_scale(layout.shapes[i], group["adjust_lr"])
                    layout.local(i, flat, rank).add_(orth.to(flat.dtype), alpha=-lr * scale)


def on_zero_partitions(optimizer: Muon, layouts: dict[int, FlatLayout]) -> ZeroMuon:
    """Turn a ``Muon`` whose parameters DeepSpeed replaced by flat partitions into a ``ZeroMuon``."""
    for g in optimizer.param_groups:
        if g["use_muon"]:
            for flat in g["params"]:
                if id(flat) in layouts and any(len(s) != 2 for s in layouts[id(flat)].shapes):
                    raise ValueError("a Muon group's partition holds a parameter that is not 2-D")
    optimizer.__class__ = ZeroMuon
    optimizer.layouts = layouts
    optimizer.ns_matrices = 0
    return optimizer  # type: ignore[return-value]
