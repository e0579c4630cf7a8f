"""Read the process layout that a launcher (torchrun, ``accelerate launch``, SLURM) exports."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Environment:
    rank: int = 0
    """Global rank of this process."""
    world_size: int = 1
    """Number of processes in the job."""
    local_rank: int = 0
    """Rank of this process on its node."""
    local_world_size: int = 1
    """Processes on this node."""

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def _int(env: dict[str, str], *names: str, default: int) -> int:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return default


def environment(env: dict[str, str] | None = None) -> Environment:
    """The layout from torchrun/accelerate variables, falling back to SLURM's, then one process."""
    env = dict(os.environ if env is None else env)
    world = _int(env, "WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _int(env, "RANK", "SLURM_PROCID", default=0)
    local_world = _int(env, "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=world)
    local_rank = _int(env, "LOCAL_RANK", "SLURM_LOCALID", default=rank % max(local_world, 1))
    return Environment(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)
