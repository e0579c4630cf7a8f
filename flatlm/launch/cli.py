"""``flatlm launch``: its parser and runner (``flatlm.train.cli.COMMANDS`` holds the entry).

No torch here: the arguments, the run's config and the plan are checked, and a dry run printed, in a fraction of a
second; only the launcher imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from flatlm.config import load_config
from flatlm.errors import FlatlmError
from flatlm.launch.plan import BACKENDS, LAUNCHERS, Request, build_plan, describe
from flatlm.launch.run import EX_TEMPFAIL, execute, visible_gpus, write_hostfile
from flatlm.launch.slurm import slurm_job

EPILOG = f"""\
defaults: inside a SLURM allocation (SLURM_JOB_ID set) nodes, node rank, the first node (rendezvous) and GPUs per
node come from SLURM's variables and the port from the job id; elsewhere 1 node, rank 0, 127.0.0.1:29500 and the
visible GPUs (CUDA_VISIBLE_DEVICES, nvidia-smi), else 1. Explicit flags win.

Run one flatlm launch per node (srun --ntasks-per-node=1: configs/slurm/flatlm.sbatch). SIGTERM, SIGINT (and SIGUSR1,
relayed as SIGTERM) reach every worker: they finish the step, save and exit; flatlm launch then exits {EX_TEMPFAIL}
(stopped, resumable) and rerunning the same command resumes from output_dir/checkpoints/latest."""


def launch_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Start flatlm.train on every GPU of this node, as one node of a job: composes and runs the accelerate "
            "launch line (or DeepSpeed's launcher line) for the backend and layout. --dry-run prints it."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--backend", choices=BACKENDS, help="data-parallel backend (default: the config's parallel.backend, else ddp)")
    add("--nodes", type=int, metavar="N", help="nodes in the job")
    add("--gpus-per-node", type=int, metavar="G", help="processes per node, one per GPU")
    add("--node-rank", type=int, metavar="R", help="this node's index, 0 to N-1")
    add("--main-addr", metavar="HOST", help="the first node's address (rendezvous); needed for N > 1 outside SLURM")
    add("--main-port", type=int, metavar="P", help="the rendezvous port, the same on every node")
    add("--launcher", choices=LAUNCHERS, default="accelerate", help="accelerate (default) or deepspeed (ZeRO only)")
    add("--hostfile", metavar="PATH", help="deepspeed: 'host slots=N' lines (default: written from the node list)")
    add("--max-restarts", type=int, default=0, metavar="K", help="accelerate: restart failed workers up to K times")
    add("--dry-run", action="store_true", help="print the environment additions and the command; start nothing")
    add("--config", metavar="FILE.yaml", help="the run's YAML config, passed to flatlm.train")
    add("overrides", nargs="*", metavar="key=value", help="dotted overrides, passed to flatlm.train")
    parser.set_defaults(prog=prog)
    return parser


def run_launch(args: argparse.Namespace) -> int:
    """Plan, then print (``--dry-run``) or run. Errors are said here, on every node: ``run_command`` lets only global
    rank 0 speak, and under srun each node's launcher has a SLURM_PROCID of its own."""
    try:
        return _launch(args)
    except FlatlmError as exc:
        print(f"{args.prog}: error: {exc}", file=sys.stderr)
        return 2


def _launch(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # a typo fails here, before any node starts a process
    backend = args.backend or (cfg.parallel.backend if cfg.parallel.backend != "single" else "ddp")
    if cfg.parallel.backend not in ("single", backend):
        raise FlatlmError(
            f"--backend {backend} but the config sets parallel.backend={cfg.parallel.backend}: the launcher's "
            "backend would win silently; drop one of them"
        )
    train_args = (*(["--config", args.config] if args.config else []), *args.overrides)
    request = Request(
        backend=backend,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        node_rank=args.node_rank,
        main_addr=args.main_addr,
        main_port=args.main_port,
        launcher=args.launcher,
        hostfile=args.hostfile,
        max_restarts=args.max_restarts,
        train_args=train_args,
        timeout_s=cfg.parallel.timeout_s,
    )
    environ = dict(os.environ)
    gpus = visible_gpus(environ)
    plan = build_plan(request, environ, slurm_job(environ), gpus, Path(tempfile.gettempdir()))
    if plan.hostfile is not None:  # written by the dry run too: its line is then ready to paste
        write_hostfile(*plan.hostfile)
    if args.dry_run:
        print(describe(plan))
        return 0
    print(describe(plan), file=sys.stderr, flush=True)  # the job's log says what ran
    return execute(plan, environ)
