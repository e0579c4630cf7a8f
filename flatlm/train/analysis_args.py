"""The arguments of ``flatlm landscape`` and ``flatlm eval`` (light: the command line parses them before torch is
imported); the commands themselves are ``flatlm.train.analyze``."""

from __future__ import annotations

import argparse
from pathlib import Path

_SOURCE = "a run directory (its latest checkpoint) or one of its checkpoints/step-N directories"
_DISTRIBUTED = (
    "Under torchrun or accelerate launch (DDP or FSDP2 configs) every process holds the whole model (a gather: one "
    "replica, its gradients and the double-backward graph of one micro-batch per process, as in one process), the "
    "windows are split over the processes and every sum is all-reduced, so the numbers are the one-process ones."
)


def floats(text: str) -> list[float]:
    """``0.01,0.05`` -> [0.01, 0.05] (argparse type)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.01,0.05; got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers like 0.01,0.05; got {text!r}")
    return values


def radii(text: str) -> list[float]:
    """``0.01,0.05`` -> [0.01, 0.05] (argparse type): positive radii."""
    values = floats(text)
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"SAM sharpness radii are positive, like 0.01,0.05; got {text!r}")
    return values


def bit_widths(text: str) -> list[int]:
    """``8,4`` -> [8, 4] (argparse type): weight widths from 2 to 16 bits."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bit widths like 8,4; got {text!r}") from None
    if not values or any(not 2 <= v <= 16 for v in values):
        raise argparse.ArgumentTypeError(f"bit widths are integers from 2 to 16, like 8,4; got {text!r}")
    return values


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0; got {text!r}")
    return value


def _common(parser: argparse.ArgumentParser, batches: int) -> None:
    parser.add_argument("source", type=Path, help=_SOURCE)
    parser.add_argument("--out", type=Path, help="directory for the results (default: the run's analysis/)")
    text = parser.add_mutually_exclusive_group()
    text.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="text, jsonl or parquet files (or directories, globs) to measure on, in place of the run's validation "
        "split; tokenized with the run's tokenizer",
    )
    text.add_argument(
        "--val-of", type=Path, metavar="RUN_DIR", help="measure on another run's validation split (e.g. forgetting)"
    )
    parser.add_argument("--text-field", default="text", help="jsonl/parquet column of --data (default: text)")
    parser.add_argument(
        "--batches",
        type=positive,
        default=batches,
        help=f"text to measure on, in micro-batches of clean text (default {batches}); the same documents are used "
        "for every measure and every corruption",
    )
    parser.add_argument(
        "--batch-size", type=positive, help="sequences per micro-batch (default: train.micro_batch_size)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the documents chosen and every random draw")


def landscape_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Sharpness of a checkpoint on a fixed, seeded set of documents: the Hessian's top eigenvalue (power "
            "iteration on Hessian-vector products), its top-k (Lanczos), its trace (Hutchinson), SAM sharpness for "
            "several rho, and loss landscapes: a 1-D line and a 2-D plane along filter-normalised random directions "
            "(Li et al. 2018) and, with --to, the linear interpolation to another checkpoint. Writes landscape.json "
            "and PNGs. " + _DISTRIBUTED
        ),
    )
    _common(parser, batches=2)
    parser.add_argument(
        "--iters",
        type=nonnegative,
        default=20,
        help="power-iteration steps at most (default 20; 0 skips it). Power iteration finds the eigenvalue of "
        "largest magnitude, which can be negative; --top-k's Lanczos finds the largest ones",
    )
    parser.add_argument("--tol", type=float, default=1e-3, help="power iteration stops at this relative change")
    parser.add_argument("--top-k", type=nonnegative, default=3, help="Lanczos eigenvalues (0: skip; default 3)")
    parser.add_argument("--trace-samples", type=nonnegative, default=30, help="Hutchinson samples at most (0: skip)")
    parser.add_argument(
        "--rho", type=floats, default=[0.01, 0.05, 0.1], help="SAM sharpness radii (default 0.01,0.05,0.1)"
    )
    parser.add_argument("--sharpness-steps", type=positive, default=5, help="ascent steps per rho (default 5)")
    parser.add_argument("--points", type=positive, default=21, help="points of the 1-D line and interpolation")
    parser.add_argument("--span", type=float, default=1.0, help="the line and plane cover [-span, span] (default 1)")
    parser.add_argument("--plane-points", type=positive, default=11, help="points per axis of the 2-D plane")
    parser.add_argument("--no-line", action="store_true", help="skip the 1-D line")
    parser.add_argument("--no-plane", action="store_true", help="skip the 2-D plane")
    parser.add_argument("--no-hessian", action="store_true", help="skip the eigenvalues and the trace")
    parser.add_argument(
        "--to", type=Path, metavar="OTHER", help="another checkpoint of the same model: the loss along (1-a) w + a w'"
    )
    return parser


def eval_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Loss and perplexity of a checkpoint on clean text and on the same documents corrupted before "
            "tokenization (typos, deletions, insertions, swaps, case flips, dropped words), under random relative "
            "weight noise and after round-to-nearest weight quantisation. Writes robustness.json and robustness.md. "
            + _DISTRIBUTED
        ),
    )
    _common(parser, batches=8)
    parser.add_argument(
        "--corrupt",
        nargs="?",
        const="default",
        metavar="SPEC",
        help="corruptions as kind:rate,... (typo, delete, insert, swap, case, drop_word), e.g. "
        "typo:0.05,drop_word:0.1; alone: the default suite",
    )
    parser.add_argument("--weights-noise", type=floats, metavar="SIGMAS", help="relative noise levels, e.g. 0.01,0.05")
    parser.add_argument("--draws", type=positive, default=3, help="noise draws per sigma, averaged (default 3)")
    parser.add_argument("--quantize", type=bit_widths, metavar="BITS", help="per-channel RTN widths, e.g. 8,4")
    return parser
