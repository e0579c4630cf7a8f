"""Process groups and the data-parallel backend flatlm applies itself.

The backend comes from the config (``parallel.backend``) or from the launcher: ``accelerate launch``
exports ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` for its FSDP and DeepSpeed configs.
A request flatlm cannot honour is an error, never a silent fallback; the backend actually applied is
written to the resolved config. One code path on CPU (gloo) and GPU (nccl).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from flatlm.errors import FlatlmError
from flatlm.launch.environment import Environment

log = logging.getLogger("flatlm")

AVAILABLE_BACKENDS = ("single", "ddp")


def _truthy(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def launcher_backend(environ: dict[str, str] | None = None) -> str | None:
    """The backend an ``accelerate launch`` config asked for, if any."""
    environ = dict(os.environ if environ is None else environ)
    if _truthy(environ.get("ACCELERATE_USE_DEEPSPEED")):
        return f"zero{environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    if _truthy(environ.get("ACCELERATE_USE_FSDP")):
        return "fsdp2"
    return None


def resolve_backend(configured: str, env: Environment, environ: dict[str, str] | None = None) -> str:
    """The backend this run applies: the launcher's request, else the config's; checked against the world."""
    requested = launcher_backend(environ) or configured
    if requested not in AVAILABLE_BACKENDS:
        raise FlatlmError(
            f"backend {requested!r} was requested (by the launcher or parallel.backend) but this flatlm "
            f"release applies only {', '.join(AVAILABLE_BACKENDS)}; launch with configs/accelerate/ddp.yaml "
            "or set parallel.backend=ddp"
        )
    if env.world_size > 1 and requested == "single":
        return "ddp"  # several processes and no explicit request: plain data parallel
    if env.world_size == 1 and requested != "single":
        log.warning(f"parallel.backend={requested} with 1 process: running single-process")
        return "single"
    return requested


def init_process_group(env: Environment, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the job's process group (nccl on CUDA, gloo on CPU) when there is more than one process."""
    if env.world_size == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (the tensor itself in one process)."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


@contextlib.contextmanager
def local_main_first(env: Environment) -> Iterator[None]:
    """Run the body on each node's first process, then on the others (per-node caches)."""
    if not env.is_local_main:
        barrier()
    try:
        yield
    finally:
        if env.is_local_main:
            barrier()


def apply_backend(model: torch.nn.Module, backend: str, device: torch.device) -> torch.nn.Module:
    """Wrap ``model`` for ``backend``; returns the module to run forward/backward through."""
    if backend == "single":
        return model
    if backend == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    raise FlatlmError(f"backend {backend!r} is not available; valid: {', '.join(AVAILABLE_BACKENDS)}")


def no_sync_factory(wrapped: torch.nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """A context that skips gradient synchronisation (DDP's ``no_sync``), or does nothing."""
    no_sync = getattr(wrapped, "no_sync", None)
    return no_sync if no_sync is not None else contextlib.nullcontext
