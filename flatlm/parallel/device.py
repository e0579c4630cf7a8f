"""Which device a process trains on.

A process uses the GPU of its local rank among the GPUs it can see (``CUDA_VISIBLE_DEVICES``): the usual case, one
launcher per node (torchrun, ``accelerate launch``, ``flatlm launch``) starting one process per GPU, each seeing all
of the node's GPUs. When a process sees exactly one GPU, it uses that one whatever its local rank: that is how
``srun --gpus-per-task=1`` (or ``--gpu-bind=single:1``) runs one task per GPU, each task's ``CUDA_VISIBLE_DEVICES``
naming its own. No CUDA: the CPU (gloo).
"""

from __future__ import annotations

import os

import torch

from flatlm.errors import FlatlmError
from flatlm.parallel.environment import Environment


def local_device(env: Environment) -> torch.device:
    """This process's device (see the module docstring). More processes on a node than it has GPUs is one clear error,
    the same on every rank of the node (decided from the local world size, so that rank 0 says it)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if env.local_world_size <= count:
        return torch.device("cuda", env.local_rank)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    raise FlatlmError(
        f"{env.local_world_size} processes on this node but each sees {count} GPUs (CUDA_VISIBLE_DEVICES={visible}): "
        f"start at most {count} processes per node (flatlm launch --gpus-per-node {count}), or give each process "
        "one GPU of its own (srun --gpus-per-task=1)"
    )
