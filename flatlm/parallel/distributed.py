"""Process groups and the data-parallel backend flatlm applies itself.

The backend comes from the config (``parallel.backend``) or from the launcher: ``accelerate launch``
exports ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` for its FSDP and DeepSpeed configs.
A request flatlm cannot honour is an error, never a silent fallback; the backend actually applied is
written to the resolved config. One code path on CPU (gloo) and GPU (nccl).

This module joins and leaves the process group; what crosses ranks goes through ``flatlm.parallel.collectives``
(``barrier`` here is the default group's, for the loop).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from flatlm.config import ParallelConfig
from flatlm.errors import FlatlmError
from flatlm.parallel import collectives
from flatlm.parallel.environment import Environment
from flatlm.parallel.failures import connect

log = logging.getLogger("flatlm")


def _truthy(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def launcher_backend(environ: dict[str, str] | None = None) -> str | None:
    """The backend an ``accelerate launch`` config asked for, if any."""
    environ = dict(os.environ if environ is None else environ)
    if _truthy(environ.get("ACCELERATE_USE_DEEPSPEED")):
        stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if stage not in ("1", "2", "3"):
            raise FlatlmError(
                f"the launcher asked for DeepSpeed ZeRO stage {stage!r}; flatlm applies stages 1, 2 and 3 "
                "(set zero_stage in the accelerate config's deepspeed_config)"
            )
        return f"zero{stage}"
    if _truthy(environ.get("ACCELERATE_USE_FSDP")):
        version = environ.get("FSDP_VERSION", "2")
        if version != "2":
            raise FlatlmError(
                f"the launcher asked for FSDP version {version}; flatlm applies FSDP2 (fully_shard) only: "
                "set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp2.yaml)"
            )
        return "fsdp2"
    return None


def launcher_options(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """parallel.* values the launcher's FSDP config sets (reshard-after-forward)."""
    environ = dict(os.environ if environ is None else environ)
    out: dict[str, Any] = {}
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD")
    if reshard is not None:  # accelerate exports true/false (FSDP2) or a strategy name (FSDP1 style)
        out["reshard_after_forward"] = _truthy(reshard) or reshard.upper() in ("FULL_SHARD", "1")
    return out


def launcher_bf16(environ: dict[str, str] | None = None) -> bool | None:
    """The launcher's mixed precision: True for bf16, None when it sets none; fp16/fp8 are refused."""
    environ = dict(os.environ if environ is None else environ)
    value = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if value == "bf16":
        return True
    if value not in ("no", ""):
        raise FlatlmError(
            f"the launcher asked for mixed_precision={value}; flatlm trains in fp32 or bf16 (fp32 master weights "
            "and optimizer state): set mixed_precision: bf16 or 'no' in the accelerate config"
        )
    return None


def resolve_backend(
    parallel: ParallelConfig, env: Environment, environ: dict[str, str] | None = None
) -> ParallelConfig:
    """The parallel settings this run applies: the launcher's request, else the config's; checked against the
    world size. Returns a copy with ``backend`` and ``world_size`` as applied."""
    requested = launcher_backend(environ) or parallel.backend
    backend = requested
    if env.world_size > 1 and requested == "single":
        backend = "ddp"  # several processes and no explicit request: plain data parallel
    if env.world_size == 1 and requested != "single":
        log.warning(f"parallel.backend={requested} with 1 process: running single-process")
        backend = "single"
    if parallel.shard_optimizer_state and backend not in ("ddp", "single"):
        raise FlatlmError(
            f"parallel.shard_optimizer_state=true is for ddp; {backend} already shards the optimizer state "
            "(drop the option)"
        )
    return parallel.model_copy(update={**launcher_options(environ), "backend": backend, "world_size": env.world_size})


def init_process_group(env: Environment, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the job's process group (nccl on CUDA, gloo on CPU) when there is more than one process."""
    if env.world_size == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        store=_attempt_store(env, timeout),
    )


def _attempt_store(env: Environment, timeout: datetime.timedelta) -> dist.Store | None:
    """The store for this elastic attempt, or None to let torch make it (``env://``).

    Under torchrun's static rendezvous the agent hosts one store for the whole job and hands it to every restart.
    A restarted group would then read the previous attempt's keys, such as the gloo addresses of workers that are
    gone, and fail to connect (measured with torch 2.13, ``--max_restarts 1``: 2 of 3 restarts failed). On one node
    there is one agent, so its restart count names the attempt for every worker, and each attempt gets its own
    namespace. Across nodes the agents count restarts separately (a healthy node's agent restarts without counting),
    so no count is shared. There flatlm changes nothing, and elastic restarts need dynamic rendezvous with a store
    per round: ``--rdzv_backend c10d`` with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (``flatlm launch`` sets it), so
    rank 0 hosts a fresh store each round.
    """
    if not _truthy(os.environ.get("TORCHELASTIC_USE_AGENT_STORE")) or "MASTER_ADDR" not in os.environ:
        return None
    if env.local_world_size != env.world_size:  # several nodes: see above
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"flatlm/attempt{attempt}", agent)


def destroy_process_group() -> None:
    """Destroy the default group, after collecting garbage: a DDP reducer (or an engine) still alive in a reference
    cycle when its group goes can hang the rank at exit. Callers let their own frames holding such objects end
    first (``train.loop.train`` runs the stages in an inner frame)."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank of the default group (nothing in one process)."""
    collectives.barrier()


_LOCAL_MAIN_CALLS = itertools.count()


def node_index(env: Environment, environ: dict[str, str] | None = None) -> int:
    """This process's node, as its launcher numbers it: torchrun's ``GROUP_RANK`` (the agent's rank, under static
    and dynamic rendezvous), else ``SLURM_NODEID`` (tasks started by ``srun`` itself), else ``rank //
    local_world_size``. The last holds only when each node's ranks are consecutive: ``srun --distribution=cyclic``
    deals ranks 0, 2 to the first node and 1, 3 to the second, and by it a node's local rank 0 and its other ranks
    would use different nodes' keys (the others waiting forever)."""
    environ = dict(os.environ if environ is None else environ)
    for name in ("GROUP_RANK", "SLURM_NODEID"):
        if environ.get(name, "") != "":
            return int(environ[name])
    return env.node_rank


@contextlib.contextmanager
def local_main_first(env: Environment) -> Iterator[None]:
    """Run the body on each node's first process, then on the others (per-node caches).

    The others wait on a key in the job's store, not in a collective: building a large token cache may take longer
    than ``parallel.timeout_s``, which bounds collectives. If the first process fails instead, it posts the failure
    and the others' watchdog ends them (``flatlm.parallel.failures``); they never read a cache that was not built.
    """
    if env.world_size == 1 or not dist.is_initialized():
        yield
        return
    key = f"flatlm/local-main-first/{next(_LOCAL_MAIN_CALLS)}/node{node_index(env)}"
    store = connect()
    if env.is_local_main:
        yield
        store.set(key, "done")
        return
    while not store.check([key]):
        time.sleep(0.1)
    yield
