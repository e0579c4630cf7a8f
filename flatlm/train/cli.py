"""Command line: ``flatlm train [--config FILE.yaml] [dotted.key=value ...]``.

``python -m flatlm.train`` (what ``accelerate launch -m flatlm.train`` starts) takes the same
arguments without the ``train`` word. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from flatlm.config import describe_keys, load_config
from flatlm.errors import FlatlmError


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


def run_train(argv: list[str], prog: str) -> int:
    args = _train_parser(prog).parse_args(argv)
    _setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        from flatlm.train.checks import check_static

        check_static(cfg)  # seconds before the loop's imports (transformers, checkpointing) are done
        from flatlm.train.loop import train  # heavy imports only once the config is valid

        train(cfg)
    except FlatlmError as exc:
        from flatlm.parallel import environment

        if environment().is_main:  # every rank fails the same check; say it once
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="flatlm", description="flatlm: LM training with sharded optimizers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="train a model (flatlm train --help lists every config key)", add_help=False)
    sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory", add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] == "train":
        return run_train(argv[1:], "flatlm train")
    if argv[0] == "export":
        return run_export(argv[1:], "flatlm export")
    parser.error(f"unknown command {argv[0]!r}; commands: train, export")
    return 2


def run_export(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Write a flatlm checkpoint as a Hugging Face model.")
    parser.add_argument("source", type=Path, help="a run directory (its latest checkpoint) or checkpoints/step-N")
    parser.add_argument("out", type=Path, help="a new directory for config.json, weights and tokenizer files")
    args = parser.parse_args(argv)
    _setup_logging()
    from flatlm.train.export import export

    try:
        out = export(args.source, args.out)
    except FlatlmError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
