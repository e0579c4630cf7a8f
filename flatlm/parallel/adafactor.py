"""Adafactor's three whole-parameter reductions when each rank holds some rows of every parameter.

Under FSDP2 every parameter is sharded on dim 0, so a rank holds whole rows: the row statistic R is local,
the column statistic C and the two RMS values are sums over all rows. Each reduction here all-reduces
the local partial sums *together with the local element count* (one all-reduce per call: m + 1 numbers
for C, 2 for an RMS), then divides by the global count, so uneven shards and ranks with no rows need
no special case. Order per matrix and step: rms(X) (scale_parameter), col_mean(G^2), rms(U).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flatlm.optim.adafactor import Reductions
from flatlm.parallel.collectives import all_reduce_sum


class RowShardedReductions(Reductions):
    """``Adafactor.reductions`` for parameters sharded by rows across the default process group."""

    def col_mean(self, x: Tensor) -> Tensor:
        rows = math.prod(x.shape[:-1]) // max(1, math.prod(x.shape[:-2]))  # local rows of each matrix
        local = torch.cat([x.sum(dim=-2).reshape(-1), x.new_full((1,), float(rows))])  # [.. m] sums, row count
        total = all_reduce_sum(local)
        return (total[:-1] / total[-1]).view(x.shape[:-2] + x.shape[-1:])

    def rms(self, x: Tensor) -> Tensor:
        local = torch.stack([torch.linalg.vector_norm(x).square(), x.new_tensor(float(x.numel()))])
        total = all_reduce_sum(local)
        return (total[0] / total[1]).sqrt()
