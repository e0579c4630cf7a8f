"""Command line: ``flatlm COMMAND ...``, one entry per subcommand in ``COMMANDS``.

    flatlm train [--config FILE.yaml] [dotted.key=value ...]   train (or resume) a run
    flatlm export SOURCE OUT                                   a checkpoint as a Hugging Face model directory
    flatlm ablate GRID.yaml [--dry-run] [--jobs N] [...]       run an ablation grid, one process per cell
    flatlm report OUTPUT_DIR                                   rebuild an ablation's report from its cells
    flatlm landscape RUN_DIR [--to OTHER] [...]                Hessian spectrum, SAM sharpness, loss landscapes
    flatlm eval RUN_DIR [--corrupt SPEC] [...]                 loss on corrupted text, noisy and quantised weights
    flatlm launch [--backend B] [--nodes N] [--dry-run] [...]  flatlm train on this node's GPUs (multi-node, SLURM)

A command is its help line, a function that builds its argument parser (given the program name) and a function
that runs the parsed arguments and returns the exit status; adding one (``ablate``, ``eval``, ``landscape``,
``launch``) is one entry. Every command runs the same way (``run_command``): parse, set up logging, run; a user
error (``FlatlmError``) is one line ``<prog>: error: ...`` on stderr (from rank 0 only when several processes run
the command) with status 2, Ctrl-C is ``<prog>: interrupted`` with status 130. Heavy imports (torch's model code,
transformers) happen inside the runners, after the arguments are checked.

``python -m flatlm.train`` (what ``accelerate launch -m flatlm.train`` starts) is ``flatlm train`` without the
``train`` word (``run_train``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flatlm.config import describe_keys, load_config
from flatlm.errors import FlatlmError
from flatlm.launch.cli import launch_parser, run_launch  # light: no torch before the launcher starts
from flatlm.train.analysis_args import eval_parser, landscape_parser


@dataclass(frozen=True)
class Command:
    help: str
    """One line for ``flatlm --help``."""
    parser: Callable[[str], argparse.ArgumentParser]
    """Builds the command's parser for a program name (``flatlm train``, ``python -m flatlm.train``)."""
    run: Callable[[argparse.Namespace], int]
    """Runs the parsed arguments; returns the exit status (user errors raise ``FlatlmError``)."""


# -- flatlm train --------------------------------------------------------------------------------------------------


def _keys_help() -> str:
    rows = describe_keys()
    width = max(len(k) for k, _, _ in rows)
    return "config keys (default, meaning):\n" + "\n".join(
        f"  {key:<{width}}  {default:<14} {doc}" for key, default, doc in rows
    )


def _train_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train a language model. Without --config, runs the default tiny pretraining job "
            "(configs/default.yaml). Progress: a bar on a terminal; with stderr in a file (cluster jobs) a log "
            "line (step, loss, lr, tokens/s) every train.log_interval_s seconds and at the first and last step."
        ),
        epilog=_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="a YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=30")
    return parser


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from flatlm.train.checks import check_static

    check_static(cfg)  # seconds before the loop's imports (transformers, checkpointing) are done
    from flatlm.train.loop import train  # heavy imports only once the config is valid

    train(cfg)
    return 0


# -- flatlm export -------------------------------------------------------------------------------------------------


def _export_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Write a flatlm checkpoint as a Hugging Face model.")
    parser.add_argument("source", type=Path, help="a run directory (its latest checkpoint) or checkpoints/step-N")
    parser.add_argument("out", type=Path, help="a new directory for config.json, weights and tokenizer files")
    return parser


def _export(args: argparse.Namespace) -> int:
    from flatlm.train.export import export

    out = export(args.source, args.out)
    print(f"exported to {out}")
    return 0


# -- flatlm ablate, flatlm report ----------------------------------------------------------------------------------


def _ablate_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Run an ablation grid (see configs/ablations/ and flatlm.experiments.grid for the file's shape): every "
            "cell is its own flatlm train process under OUTPUT_DIR/cells/<name>/; a cell that fails, diverges or "
            "runs out of memory is recorded and the others go on. Rerunning skips finished cells and resumes the "
            "rest. Ends with a summary and OUTPUT_DIR/report.md."
        ),
    )
    parser.add_argument("grid", metavar="GRID.yaml", help="the grid file")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their differences; run nothing")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="cells at once (one per GPU on CUDA)")
    parser.add_argument(
        "--launch-config", metavar="FILE", help="start each cell with `accelerate launch --config_file FILE`"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides for every cell; output_dir=DIR names the grid's directory, budget=steps|flops and "
        "baseline=NAME replace the grid's own",
    )
    return parser


def _ablate(args: argparse.Namespace) -> int:
    from flatlm.experiments.ablate import ablate
    from flatlm.train.checks import check_static

    return ablate(
        args.grid,
        args.overrides,
        dry_run=args.dry_run,
        jobs=args.jobs,
        launch_config=args.launch_config,
        static_check=check_static,  # injected: flatlm.experiments never imports flatlm.train
    )


def _report_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Rebuild an ablation's report from its cells.")
    parser.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="a flatlm ablate output directory")
    return parser


def _report(args: argparse.Namespace) -> int:
    if not (args.output_dir / "grid.json").is_file():
        raise FlatlmError(f"{str(args.output_dir)!r} holds no grid.json; pass the output_dir of a flatlm ablate run")
    try:
        from flatlm.experiments.report import write_report
    except ModuleNotFoundError as exc:
        if exc.name != "flatlm.experiments.report":
            raise
        raise FlatlmError("this flatlm has no report module (flatlm.experiments.report); update flatlm") from None
    print(f"report: {write_report(args.output_dir)}")
    return 0


# -- flatlm landscape, flatlm eval (flatlm.train.analyze) ------------------------------------------------------------


def _landscape(args: argparse.Namespace) -> int:
    from flatlm.train.analyze import run_landscape

    return run_landscape(args)


def _eval(args: argparse.Namespace) -> int:
    from flatlm.train.analyze import run_eval

    return run_eval(args)


COMMANDS: dict[str, Command] = {
    "train": Command("train a model (flatlm train --help lists every config key)", _train_parser, _train),
    "export": Command("write a checkpoint as a Hugging Face model directory", _export_parser, _export),
    "ablate": Command("run an ablation grid of training runs (configs/ablations/)", _ablate_parser, _ablate),
    "report": Command("rebuild an ablation's report from its cells", _report_parser, _report),
    "landscape": Command(
        "sharpness and loss landscapes of a checkpoint (Hessian, SAM sharpness, 1-D/2-D plots)",
        landscape_parser,
        _landscape,
    ),
    "eval": Command("loss on clean and corrupted text, under weight noise and after quantisation", eval_parser, _eval),
    "launch": Command(
        "start flatlm train on every GPU of this node, one node of a job (accelerate or DeepSpeed launcher, SLURM)",
        launch_parser,
        run_launch,
    ),
}


# -- running a command ---------------------------------------------------------------------------------------------


def _setup_logging() -> None:
    """flatlm's INFO from rank 0, warnings and errors from every rank (tagged with the rank when there are several).

    Other libraries only reach the user with warnings: their INFO lines (matplotlib's "generated new
    fontManager", torch.distributed's set-up) are noise for someone training a model (and see _quiet_warnings).
    """
    from flatlm.parallel import environment

    env = environment()
    tag = f"[flatlm rank {env.rank}]" if env.world_size > 1 else "[flatlm]"
    logging.basicConfig(level=logging.WARNING, format=f"{tag} %(message)s", stream=sys.stderr)
    logging.getLogger("flatlm").setLevel(logging.INFO if env.is_main else logging.WARNING)
    _quiet_warnings()


def _quiet_warnings() -> None:
    """Hide the FutureWarnings one library's calls raise in another (DeepSpeed's ``all_gather_into_tensor`` in
    torch, once per rank): they are for those libraries' authors; the user can do nothing about them."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(?!flatlm(\.|$))")


def run_command(name: str, argv: list[str], prog: str) -> int:
    """Parse ``argv`` for command ``name``, run it; user errors are one line and status 2 (see the module doc)."""
    command = COMMANDS[name]
    # argparse's own errors: usage + one line, status 2; intermixed: options may follow the dotted overrides
    args = command.parser(prog).parse_intermixed_args(argv)
    _setup_logging()
    try:
        return command.run(args)
    except FlatlmError as exc:
        from flatlm.parallel import environment
        from flatlm.parallel.failures import said_by_rank0, was_first_failure

        env = environment()
        # Every rank fails the same check: rank 0 says it for all. Another rank speaks only for an error of its own
        # (it failed first, and rank 0 did not post the same error).
        if env.is_main or (was_first_failure() and not said_by_rank0()):
            where = "" if env.is_main else f"rank {env.rank}: "
            print(f"{prog}: error: {where}{exc}", file=sys.stderr)
        _leave_if_failed(2)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        _leave_if_failed(130)
        return 130
    except SystemExit:
        raise
    except BaseException as exc:
        if not _several_processes():
            raise  # one process: Python prints the traceback, once
        from flatlm.parallel import environment
        from flatlm.parallel.failures import earlier_failure, own_failure

        if (cause := earlier_failure()) is not None:  # this rank's error only follows another rank's failure
            here = f"{type(exc).__name__}: {str(exc)[:160]}"
            print(f"{prog}: error: rank {environment().rank} stopped: {cause} (here: {here})", file=sys.stderr)
        else:
            import traceback

            traceback.print_exc()
            if (own := own_failure()) is not None:  # the summary the other ranks got, with the step
                print(f"{prog}: error: {own}", file=sys.stderr)
        _leave_if_failed(1)
        raise


def _several_processes() -> bool:
    """Whether a multi-process job's process group was left standing by a failure (flatlm.train.loop.train)."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _leave_if_failed(status: int) -> None:
    """After a failure in a multi-process job, exit at once: interpreter teardown can wait forever on a communicator
    or thread that the failure left behind. First a moment for the others to read the posted failure: the job's
    store may live in this process."""
    if _several_processes():
        from flatlm.parallel.failures import LINGER_S

        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(LINGER_S)
        os._exit(status)


def run_train(argv: list[str], prog: str) -> int:
    """``flatlm train`` under another program name (``python -m flatlm.train``)."""
    return run_command("train", argv, prog)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="flatlm", description="flatlm: LM training with sharded optimizers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():  # listed in --help; each command parses its own arguments
        sub.add_parser(name, help=command.help, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] in COMMANDS:
        return run_command(argv[0], argv[1:], f"flatlm {argv[0]}")
    parser.error(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
