"""Run a test body on several gloo ranks in one pytest process (torch.multiprocessing.spawn).

The body is a module-level function ``fn(rank, world_size, *args)``; it asserts inside the ranks, and a
failure on any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 120


def _entry(rank: int, fn: Callable[..., None], world_size: int, init_file: str, args: tuple[Any, ...]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))  # as a launcher sets
    torch.set_num_threads(1)
    # A collective that one rank never joins fails after COLLECTIVE_TIMEOUT_S instead of gloo's 30 minutes.
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timeout
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without running interpreter teardown: gloo's background threads occasionally abort it
    # ("terminate called without an active exception") after the body has passed.
    os._exit(0)


def run_ranks(fn: Callable[..., None], *args: Any, world_size: int = 2) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` CPU processes joined by gloo."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, world_size, os.path.join(tmp, "init"), args), nprocs=world_size, join=True)
