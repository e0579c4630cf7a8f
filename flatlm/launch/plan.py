"""From ``flatlm launch`` arguments and the environment to one launcher command line (pure: nothing runs here).

Two launchers start ``python -m flatlm.train`` on every GPU of every node, one launcher per node:

* ``accelerate launch --config_file configs/accelerate/[multinode/]<backend>.yaml`` (torchrun inside). accelerate
  1.16 takes the file's values only where a flag has no default: ``--num_processes`` (the total over all nodes),
  ``--num_machines``, ``--machine_rank``, ``--main_process_ip`` and ``--main_process_port`` are always passed, so
  the file's placeholders never apply; ``--rdzv_backend`` (static), ``--same_network`` and ``--max_restarts`` (0)
  have defaults that shadow the file, so only ``--max_restarts`` is passed, when asked. Static rendezvous at
  ``main_addr:port`` (accelerate hands torchrun ``--rdzv_endpoint``) with the node rank fixed per node.
* DeepSpeed's ``deepspeed`` runner (ZeRO stages only), ``--no_ssh``: every node starts its own local launcher with
  its ``--node_rank`` (no pdsh, no ssh between nodes); the hostfile only tells it the slots of each node. flatlm
  reads the backend from the variables accelerate would have exported (``ACCELERATE_USE_DEEPSPEED``,
  ``ACCELERATE_DEEPSPEED_ZERO_STAGE``: see ``flatlm.parallel.distributed.launcher_backend``); ``--no_local_rank``
  because flatlm reads ``LOCAL_RANK`` from the environment and would refuse a ``--local_rank`` argument.

Environment additions are few and printed by ``--dry-run``: ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` (torchrun's agent,
on a stop signal, waits this long for the workers to save before it SIGKILLs them; its default of 30 s is shorter
than a large checkpoint save), and ``DS_ACCELERATOR=cpu`` for ZeRO on a machine without GPUs. A value already in
the environment is kept.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flatlm.errors import FlatlmError, did_you_mean
from flatlm.launch.slurm import SlurmJob

BACKENDS = ("ddp", "fsdp2", "zero1", "zero2", "zero3")
LAUNCHERS = ("accelerate", "deepspeed")
DEFAULT_ADDR, DEFAULT_PORT = "127.0.0.1", 29500
REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout flatlm runs from: configs/accelerate/ lives beside the package."""


@dataclass(frozen=True)
class Request:
    """What the user asked for; None: not given (SLURM's value or the default applies)."""

    backend: str = "ddp"
    nodes: int | None = None
    gpus_per_node: int | None = None
    node_rank: int | None = None
    main_addr: str | None = None
    main_port: int | None = None
    launcher: str = "accelerate"
    hostfile: str | None = None
    max_restarts: int = 0
    train_args: tuple[str, ...] = ()
    """What follows ``-m flatlm.train``: ``--config FILE`` and the dotted overrides."""
    timeout_s: float = 600.0
    """The run's ``parallel.timeout_s``: bounds a step and a save, so it sizes the launcher's shutdown wait."""


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int
    node_rank: int
    main_addr: str
    port: int
    hosts: tuple[str, ...] = ()
    """Host names when known (SLURM): the DeepSpeed hostfile lists them."""
    source: str = "defaults"
    """Where the defaults came from, for the dry run's first line."""

    @property
    def processes(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Plan:
    argv: list[str]
    env: dict[str, str]
    """Added to the launcher's environment."""
    layout: Layout
    hostfile: tuple[Path, str] | None = None
    """(path, text): the DeepSpeed hostfile to write before starting (``write_hostfile``)."""
    stop_statuses: frozenset[int] = field(default_factory=frozenset)
    """The launcher's own exit statuses after a stop signal it was sent (its workers saved): ``flatlm.launch.run``."""

    def line(self) -> str:
        """The environment additions and the command as one copy-pasteable shell line."""
        assignments = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*assignments, *(shlex.quote(a) for a in self.argv)])


def resolve_layout(request: Request, slurm: SlurmJob | None, gpus_found: int | None) -> Layout:
    """Explicit flags, else SLURM's allocation, else one node on this machine. ``gpus_found``: this machine's visible
    GPUs (None: unknown)."""
    nodes = request.nodes if request.nodes is not None else slurm.nodes if slurm else 1
    node_rank = request.node_rank if request.node_rank is not None else slurm.node_rank if slurm else 0
    gpus = request.gpus_per_node
    if gpus is None:
        gpus = (slurm.gpus_per_node if slurm else None) or gpus_found or 1
    if nodes < 1 or gpus < 1:
        raise FlatlmError(f"--nodes {nodes} and --gpus-per-node {gpus}: both must be at least 1")
    if not 0 <= node_rank < nodes:
        raise FlatlmError(
            f"--node-rank {node_rank} with {nodes} node(s): the node rank counts from 0 to {nodes - 1} "
            "(pass --node-rank R with R < --nodes, a different R on every node)"
        )
    main_addr = request.main_addr or (slurm.main_addr if slurm else None)
    if main_addr is None:
        if nodes > 1:
            raise FlatlmError(
                f"--nodes {nodes} outside a SLURM allocation needs --main-addr HOST: the first node's address, "
                "the same on every node"
            )
        main_addr = DEFAULT_ADDR
    port = request.main_port or (slurm.port if slurm else DEFAULT_PORT)
    if not 1 <= port <= 65535:
        raise FlatlmError(f"--main-port {port} is not a TCP port (1-65535)")
    source = f"SLURM job {slurm.job_id}" if slurm else "this machine"
    return Layout(nodes, gpus, node_rank, main_addr, port, slurm.hosts if slurm else (), source)


def accelerate_config(backend: str, nodes: int, root: Path = REPO_ROOT) -> Path:
    """configs/accelerate/<backend>.yaml for one node, configs/accelerate/multinode/<backend>.yaml for several."""
    path = root / "configs" / "accelerate" / ("multinode" if nodes > 1 else "") / f"{backend}.yaml"
    if not path.is_file():
        raise FlatlmError(
            f"the accelerate config {path} is missing: flatlm launch reads configs/accelerate/ from the flatlm "
            f"checkout it runs from ({root}); install flatlm from a checkout (pip install -e .) or restore the file"
        )
    return path


def _check(request: Request) -> None:
    if request.backend not in BACKENDS:
        raise FlatlmError(f"--backend {request.backend!r}: choose one of {', '.join(BACKENDS)}")
    if request.launcher not in LAUNCHERS:
        hint = did_you_mean(request.launcher, LAUNCHERS)
        raise FlatlmError(f"--launcher {request.launcher!r}: choose accelerate or deepspeed{hint}")
    if request.max_restarts < 0:
        raise FlatlmError(f"--max-restarts {request.max_restarts}: give 0 or more restarts")
    if request.launcher == "deepspeed":
        if not request.backend.startswith("zero"):
            raise FlatlmError(
                f"--launcher deepspeed runs DeepSpeed ZeRO (--backend zero1, zero2 or zero3), not {request.backend}: "
                "use --launcher accelerate for ddp and fsdp2"
            )
        if request.max_restarts:
            raise FlatlmError("--max-restarts needs --launcher accelerate: DeepSpeed's launcher restarts nothing")
    elif request.hostfile is not None:
        raise FlatlmError("--hostfile is for --launcher deepspeed; accelerate takes --nodes, --node-rank, --main-addr")


def _env(request: Request, environ: Mapping[str, str], gpus_found: int | None) -> dict[str, str]:
    env: dict[str, str] = {}
    if request.launcher == "accelerate":
        # a step and a save, each bounded by parallel.timeout_s, plus a margin for the workers' exit
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(int(2 * request.timeout_s + 60))
    else:
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = request.backend.removeprefix("zero")
    if request.backend.startswith("zero") and not gpus_found:
        env["DS_ACCELERATOR"] = "cpu"
    return {k: v for k, v in env.items() if k not in environ or k.startswith("ACCELERATE_")}


def _accelerate_argv(request: Request, layout: Layout) -> list[str]:
    config = accelerate_config(request.backend, layout.nodes)
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    argv += ["--num_processes", str(layout.processes), "--num_machines", str(layout.nodes)]
    argv += ["--machine_rank", str(layout.node_rank), "--main_process_ip", layout.main_addr]
    argv += ["--main_process_port", str(layout.port)]
    if request.max_restarts:
        argv += ["--max_restarts", str(request.max_restarts)]
    return [*argv, "-m", "flatlm.train", *request.train_args]


_HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")


def hostfile_hosts(text: str) -> list[str]:
    """The hosts of a DeepSpeed hostfile (``host slots=N`` lines; ``#`` comments and blank lines skipped)."""
    lines = [line.strip() for line in text.splitlines()]
    return [m.group(1) for line in lines if line and not line.startswith("#") and (m := _HOSTFILE_LINE.match(line))]


def _hostfile(request: Request, layout: Layout, tmp: Path) -> tuple[Path, tuple[Path, str] | None]:
    """The hostfile to pass: the user's (checked), or one to write (``host slots=G`` per node)."""
    if request.hostfile is not None:
        path = Path(request.hostfile)
        if not path.is_file():
            raise FlatlmError(f"--hostfile {path}: no such file (lines like 'node01 slots=8'; or drop --hostfile)")
        hosts = hostfile_hosts(path.read_text())
        if len(hosts) < layout.nodes:
            raise FlatlmError(
                f"--hostfile {path} lists {len(hosts)} host(s) for --nodes {layout.nodes}: one 'host slots=N' line "
                "per node"
            )
        return path, None
    hosts = list(layout.hosts[: layout.nodes])
    if len(hosts) < layout.nodes:  # names are labels under --no_ssh: each node runs its own launcher
        hosts = ["localhost"] if layout.nodes == 1 else [f"node{r}" for r in range(layout.nodes)]
    text = "# written by flatlm launch; with --no_ssh every node starts its own launcher\n"
    text += "".join(f"{host} slots={layout.gpus_per_node}\n" for host in hosts)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]  # the same layout, the same file: reruns reuse it
    path = tmp / f"flatlm-hostfile-{digest}"
    return path, (path, text)


def _deepspeed_argv(request: Request, layout: Layout, hostfile: Path) -> list[str]:
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile)]
    argv += ["--num_nodes", str(layout.nodes), "--num_gpus", str(layout.gpus_per_node)]
    argv += ["--no_ssh", "--node_rank", str(layout.node_rank)]
    argv += ["--master_addr", layout.main_addr, "--master_port", str(layout.port)]
    return [*argv, "--no_local_rank", "--module", "flatlm.train", *request.train_args]


# What a launcher returns after it was sent a stop signal and its workers saved and returned 0 (the signal handling
# of accelerate 1.16 / torch 2.13 and deepspeed 0.19.8): torchrun's agent re-raises the signal, and accelerate
# exits 128 + its number; DeepSpeed's runner (no handler) dies of it, its per-node launcher exits 1.
_SIGNAL_STATUSES = frozenset({0, 130, 143, -2, -15})
STOP_STATUSES = {"accelerate": _SIGNAL_STATUSES, "deepspeed": _SIGNAL_STATUSES | {1}}


def build_plan(
    request: Request, environ: Mapping[str, str], slurm: SlurmJob | None, gpus_found: int | None, tmp: Path
) -> Plan:
    """The launcher line for this node. ``tmp``: where a generated hostfile goes."""
    _check(request)
    layout = resolve_layout(request, slurm, gpus_found)
    env = _env(request, environ, gpus_found)
    if request.launcher == "accelerate":
        argv, hostfile = _accelerate_argv(request, layout), None
    else:
        path, hostfile = _hostfile(request, layout, tmp)
        argv = _deepspeed_argv(request, layout, path)
    return Plan(argv, env, layout, hostfile, STOP_STATUSES[request.launcher])


def describe(plan: Plan) -> str:
    """The dry run's text: comment lines (layout, hostfile), then the command line."""
    lay = plan.layout
    head = (
        f"# flatlm launch: {lay.nodes} node(s) x {lay.gpus_per_node} process(es), node rank {lay.node_rank}, "
        f"rendezvous {lay.main_addr}:{lay.port} (defaults from {lay.source})"
    )
    lines = [head]
    if plan.hostfile is not None:
        path, text = plan.hostfile
        lines.append(f"# hostfile {path}:")
        lines += [f"#   {line}" for line in text.splitlines() if not line.startswith("#")]
    return "\n".join([*lines, plan.line()])
