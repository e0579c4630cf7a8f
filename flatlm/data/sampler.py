"""Which sequences each optimizer step reads: a pure function of (seed, step), hence resumable.

The sampler concatenates seeded permutations of all sequence indices, one per epoch, into one
stream; optimizer step ``s`` takes positions ``[s*G, (s+1)*G)`` of it for a global batch of ``G``.
Rank ``r`` of ``W`` takes the ``r``-th contiguous slice of ``G/W`` and splits it into micro-batches,
so the same global batch is used whatever the world size. The data position is just the step.
"""

from __future__ import annotations

import numpy as np


class GlobalBatchSampler:
    def __init__(self, num_sequences: int, global_batch_size: int, seed: int):
        if num_sequences <= 0:
            raise ValueError("no sequences to sample from")
        self.n = num_sequences
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def global_batch(self, step: int) -> np.ndarray:
        """Sequence indices of optimizer step ``step`` (0-based), all ranks together."""
        pos = np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)
        out = np.empty(len(pos), dtype=np.int64)
        for epoch in np.unique(pos // self.n):
            mask = pos // self.n == epoch
            out[mask] = self._perm(int(epoch))[pos[mask] % self.n]
        return out

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch_size: int) -> list[np.ndarray]:
        """This rank's micro-batches for step ``step``."""
        per_rank = self.global_batch_size // world_size
        mine = self.global_batch(step)[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch_size / self.n
