"""What a SLURM allocation says about the job's layout: nodes, this node's rank, the first node, a port.

Inside ``srun`` (one ``flatlm launch`` task per node) SLURM exports the step's node list and this node's index in
it; the batch script alone sees the job's. The step's values win over the job's, so ``srun --nodes 2`` inside a
4-node allocation launches a 2-node job. Node lists are SLURM's compressed host lists (``gpu[001-004,010],cpu7``):
``scontrol show hostnames`` expands them where ``scontrol`` exists; ``expand_nodelist`` is the same expansion in
Python for machines without it (and for tests).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from flatlm.errors import FlatlmError

PORT_BASE, PORT_SPAN = 20000, 10000
"""Ports derived from the job id fall in [20000, 30000): unprivileged, below Linux's ephemeral range (32768-60999)
that outgoing connections draw from, so a rendezvous port is not taken by some client socket."""


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    nodes: int
    """Nodes of the step (``srun``) or, outside a step, of the job."""
    node_rank: int
    """This node's index in the node list (``SLURM_NODEID``)."""
    hosts: tuple[str, ...]
    """The expanded node list, in SLURM's order; ``hosts[0]`` is the rendezvous node."""
    gpus_per_node: int | None
    """GPUs SLURM gave this node, when it says (``--gpus-per-node``, ``--gres=gpu:N``)."""

    @property
    def main_addr(self) -> str:
        return self.hosts[0]

    @property
    def port(self) -> int:
        return job_port(self.job_id)


def job_port(job_id: str) -> int:
    """A rendezvous port stable for the job (every node and every requeue derives the same one) and different for
    jobs that share a node, unless their ids are a multiple of 10000 apart."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return PORT_BASE + number % PORT_SPAN


# -- node lists ------------------------------------------------------------------------------------------------------

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(text: str) -> list[str]:
    """``"gpu[001-003,010],cpu7"`` -> ``["gpu001", "gpu002", "gpu003", "gpu010", "cpu7"]``.

    Commas outside brackets separate host expressions; inside brackets they separate numbers and ranges. A range
    keeps the zero padding of its first bound (``[08-10]`` -> 08, 09, 10). Several bracket groups in one expression
    expand to every combination (``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2), as SLURM does.
    """
    hosts: list[str] = []
    for expression in _split_top_level(text.strip(), text):
        hosts += _expand_expression(expression, text)
    return hosts


def _split_top_level(text: str, whole: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise FlatlmError(f"SLURM node list {whole!r}: nested '['")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise FlatlmError(f"SLURM node list {whole!r}: ']' without '['")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise FlatlmError(f"SLURM node list {whole!r}: '[' without ']'")
    parts.append(text[start:])
    if any(not p for p in parts):
        raise FlatlmError(f"SLURM node list {whole!r}: an empty host name")
    return parts


def _expand_expression(expression: str, whole: str) -> list[str]:
    head, bracket, rest = expression.partition("[")
    if not bracket:
        return [expression]
    body, _, tail = rest.partition("]")
    numbers: list[str] = []
    for item in body.split(","):
        match = _RANGE.match(item.strip())
        if match is None:
            raise FlatlmError(f"SLURM node list {whole!r}: {item!r} is not a number or a range like 01-04")
        first, last = match.group(1), match.group(2) or match.group(1)
        if int(last) < int(first):
            raise FlatlmError(f"SLURM node list {whole!r}: the range {item!r} runs backwards")
        width = len(first)  # SLURM pads to the width of the first bound
        numbers += [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    return [head + number + host for number in numbers for host in _expand_expression(tail, whole)]


def hostnames(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list: ``scontrol show hostnames`` where it exists, ``expand_nodelist`` otherwise."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            done = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            )
        except (OSError, subprocess.SubprocessError):
            pass  # a broken scontrol (no controller reachable): the expansion is the same
        else:
            if hosts := done.stdout.split():
                return hosts
    return expand_nodelist(nodelist)


# -- the allocation --------------------------------------------------------------------------------------------------


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    return next((environ[n] for n in names if environ.get(n, "").strip()), None)


def _gpus(value: str | None) -> int | None:
    """``SLURM_GPUS_ON_NODE=4`` -> 4; ``SLURM_GPUS_PER_NODE`` may name the type (``a100:4``): the count is last."""
    if value is None:
        return None
    match = re.search(r"(\d+)\s*$", value.split("(")[0])
    return int(match.group(1)) if match else None


def slurm_job(environ: Mapping[str, str]) -> SlurmJob | None:
    """The allocation's layout, or None outside SLURM (no ``SLURM_JOB_ID``)."""
    job_id = _first(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    if job_id is None:
        return None
    nodelist = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if nodelist is None:
        raise FlatlmError(
            f"inside SLURM job {job_id} but SLURM_JOB_NODELIST is not set; pass --nodes, --node-rank and --main-addr"
        )
    hosts = tuple(hostnames(nodelist))
    nodes = int(_first(environ, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or len(hosts))
    return SlurmJob(
        job_id=job_id.strip(),
        nodes=nodes,
        node_rank=int(_first(environ, "SLURM_NODEID") or 0),
        hosts=hosts,
        gpus_per_node=_gpus(_first(environ, "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE")),
    )
