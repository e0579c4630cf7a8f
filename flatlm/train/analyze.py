"""``flatlm landscape`` and ``flatlm eval``: flatness and robustness of a checkpoint, measured on fixed documents.

Composition only: the math is ``flatlm.analysis`` (Hessian spectrum, SAM sharpness, landscapes, weight noise and
quantisation) and ``flatlm.data.corrupt`` (text corruption); the documents are ``flatlm.data.eval_text``'s. Both
commands load the checkpoint's model whole in every process (``load_checkpoint_model``: DCP consolidates whatever
the run was sharded as), take a seeded choice of documents (the run's validation split, ``--data`` files or another
run's split) and cut them into windows that count every token once.

The objective. L(w) = (sum of the counted targets' cross entropies over every window of every process) / N, N the
global count: each process's windows are its terms, pre-divided by N, and the Objective's ``reduce`` all-reduces
the sums (identity in one process). Every random draw comes from a generator seeded by ``--seed`` on the host, the
same on every process, so a 2-process run measures the one-process numbers (to the order of the sums).

Attention runs through SDPA's math kernel while measuring: the fused CPU/GPU kernels have no double backward, which
Hessian-vector products need (a 1-D line or noise evaluation is the same function, to rounding).

Outputs, written by rank 0 atomically (a temporary file renamed): ``landscape.json`` and its PNGs, and
``robustness.json`` with its table ``robustness.md``, under ``RUN_DIR/analysis/`` or ``--out``. Their schemas are
``landscape_record`` and ``robustness_record``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from flatlm.analysis.hessian import top_eigenvalue, top_eigenvalues, trace
from flatlm.analysis.landscape import filter_normalized_direction, interpolation, line, plane
from flatlm.analysis.objective import Objective
from flatlm.analysis.plots import plot_line, plot_plane
from flatlm.analysis.sharpness import sam_sharpness
from flatlm.analysis.weights import quantization_error, quantized, relative_noise
from flatlm.config import RunConfig
from flatlm.data.batch import Batch
from flatlm.data.corrupt import Corruption, corrupt_texts, parse_spec
from flatlm.data.eval_text import choose_documents, document_batches, file_documents, validation_documents
from flatlm.data.splits import data_seed
from flatlm.data.tokenizer import AnyTokenizer
from flatlm.errors import FlatlmError
from flatlm.parallel import environment
from flatlm.parallel.collectives import all_reduce_sum, world
from flatlm.parallel.device import local_device
from flatlm.parallel.distributed import barrier, destroy_process_group, init_process_group
from flatlm.train.checkpoint import TRAINER_STATE
from flatlm.train.export import find_checkpoint, load_checkpoint_model
from flatlm.train.step import token_losses

log = logging.getLogger("flatlm")
VERSION = 1
ANALYSIS_DIR = "analysis"


@dataclass
class Subject:
    """The checkpoint under measurement, its model (eval mode, on the device) and the documents chosen."""

    checkpoint: Path
    step: int
    model: torch.nn.Module
    tokenizer: AnyTokenizer
    cfg: RunConfig
    out: Path
    batches: list[Batch]
    """This process's windows of the chosen documents, clean, on the device."""
    documents: list[str]
    batch_size: int
    seq_len: int
    """Tokens per window: the run's data.seq_len (with --val-of, the other run's)."""
    device: torch.device


@contextlib.contextmanager
def _session() -> Iterator[torch.device]:
    """One process, or this process's place in a torchrun / accelerate launch job (gloo on CPU, nccl on CUDA)."""
    env = environment()
    device = local_device(env)
    init_process_group(env, device)
    try:
        yield device
    finally:
        destroy_process_group()


def _math_attention() -> contextlib.AbstractContextManager:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _documents(args: argparse.Namespace, cfg: RunConfig) -> tuple[list[str], RunConfig]:
    """The documents to choose from, and the config whose sequence length and micro-batch size cut them: the run's
    own, or with ``--val-of`` the other run's (so a fine-tuned model is measured on the windows its pretraining run
    is measured on: forgetting compares the same tokens)."""
    if args.data:
        return file_documents(args.data, args.text_field), cfg
    if args.val_of is not None:
        other = find_checkpoint(args.val_of)
        other_cfg = RunConfig.model_validate(yaml.safe_load((other / "config.yaml").read_text()))
        return validation_documents(other_cfg, data_seed(other_cfg)), other_cfg
    return validation_documents(cfg, data_seed(cfg)), cfg


def load_subject(args: argparse.Namespace, device: torch.device) -> Subject:
    checkpoint = find_checkpoint(args.source)
    model, tok, cfg = load_checkpoint_model(checkpoint)
    step = int(json.loads((checkpoint / TRAINER_STATE).read_text()).get("step", 0))
    pool, shape = _documents(args, cfg)
    batch_size = args.batch_size or shape.train.micro_batch_size
    seq_len = shape.data.seq_len
    documents = choose_documents(pool, tok, args.batches * batch_size * seq_len + 1, args.seed)
    rank, size = world()
    batches = [b.to(device) for b in document_batches(documents, tok, seq_len, batch_size, rank, size)]
    out = args.out if args.out is not None else checkpoint.parent.parent / ANALYSIS_DIR
    model = model.to(device).eval()
    return Subject(checkpoint, step, model, tok, cfg, out, batches, documents, batch_size, seq_len, device)


def _count(batches: Sequence[Batch], device: torch.device) -> torch.Tensor:
    """Counted targets over every process's windows (0-d int64)."""
    local = sum((b.counted().sum() for b in batches), torch.zeros((), dtype=torch.int64, device=device))
    return all_reduce_sum(local)


def objective(model: torch.nn.Module, batches: Sequence[Batch], device: torch.device) -> Objective:
    """L(w) on ``batches`` (this process's windows), summed over the processes (see the module docstring)."""
    count = _count(batches, device).clamp(min=1).double()

    def terms() -> Iterator[torch.Tensor]:
        for batch in batches:
            yield token_losses(model, batch, bf16=False).sums.double().sum() / count  # fp64: sharpness is a difference

    params = [p for p in model.parameters() if p.requires_grad]
    return Objective(params=params, terms=terms, reduce=all_reduce_sum)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: Sequence[Batch], device: torch.device) -> tuple[float, int]:
    """(loss per counted target, counted targets) over every process's ``batches``: one all-reduce."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        losses = token_losses(model, batch, bf16=False)
        sums += torch.stack([losses.sums.double().sum(), losses.counts.sum().double()])
    total, count = all_reduce_sum(sums).tolist()
    return total / max(count, 1.0), int(count)


def _generator(seed: int, *salt: int) -> torch.Generator:
    """A host generator for one measure, the same on every process (``seed`` and the measure's own salt)."""
    digest = hashlib.sha256(repr((seed, *salt)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _timed(seconds: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = fn()
    seconds[name] = round(time.perf_counter() - start, 3)
    log.info(f"{name}: {seconds[name]:.1f} s")
    return value


def _header(subject: Subject, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "version": VERSION,
        "checkpoint": str(subject.checkpoint),
        "step": subject.step,
        "seed": args.seed,
        "batches": args.batches,
        "batch_size": subject.batch_size,
        "seq_len": subject.seq_len,
        "documents": len(subject.documents),
        "processes": world()[1],
    }


def _measure(
    args: argparse.Namespace, device: torch.device, record: Callable[[Subject, argparse.Namespace], dict[str, Any]]
) -> tuple[Subject, dict[str, Any]]:
    """The checkpoint and documents ``args`` name, measured by ``record`` (every process; attention on SDPA's math
    kernel)."""
    subject = load_subject(args, device)
    with _math_attention():
        return subject, record(subject, args)


# -- flatlm landscape ----------------------------------------------------------------------------------------------


def _other_params(args: argparse.Namespace, subject: Subject) -> list[torch.Tensor]:
    other, _, _ = load_checkpoint_model(find_checkpoint(args.to))
    mine = dict(subject.model.named_parameters())
    theirs = dict(other.named_parameters())
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        raise FlatlmError(
            f"--to {args.to} holds a different model (parameter names or shapes differ from {subject.checkpoint}); "
            "interpolate between checkpoints of the same architecture and vocabulary"
        )
    return [theirs[name].detach().to(subject.device) for name, p in subject.model.named_parameters() if p.requires_grad]


def landscape_record(subject: Subject, args: argparse.Namespace) -> dict[str, Any]:
    """Every measure of ``flatlm landscape`` (see ``landscape_parser``) as one JSON-ready dict."""
    other = _other_params(args, subject) if args.to is not None else None  # a wrong --to fails before any measure
    obj = objective(subject.model, subject.batches, subject.device)
    seconds: dict[str, float] = {}
    record = _header(subject, args)
    loss, tokens = mean_loss(subject.model, subject.batches, subject.device)
    record.update(tokens=tokens, loss=loss, seconds=seconds)
    hessian: dict[str, Any] = {"lambda_max": None, "top_k": None, "trace": None}
    if not args.no_hessian:
        if args.iters > 0:
            hessian["lambda_max"] = _timed(
                seconds, "lambda_max", lambda: top_eigenvalue(obj, iters=args.iters, tol=args.tol, seed=args.seed)
            ).to_json()
        if args.top_k > 0:
            hessian["top_k"] = _timed(
                seconds, "top_k", lambda: top_eigenvalues(obj, args.top_k, seed=args.seed + 1)
            ).to_json()
        if args.trace_samples > 0:
            hessian["trace"] = _timed(
                seconds, "trace", lambda: trace(obj, samples=args.trace_samples, seed=args.seed + 2)
            ).to_json()
    record["hessian"] = hessian
    record["sam_sharpness"] = [
        _timed(
            seconds, f"sam_sharpness_{rho:g}", lambda rho=rho: sam_sharpness(obj, rho, steps=args.sharpness_steps)
        ).to_json()
        for rho in args.rho
    ]
    alphas = torch.linspace(-args.span, args.span, args.points).tolist()
    record["line"] = None
    if not args.no_line:
        direction = filter_normalized_direction(obj.params, _generator(args.seed, 1))
        record["line"] = {"alphas": alphas, "loss": _timed(seconds, "line", lambda: line(obj, direction, alphas))}
    record["interpolation"] = None
    if other is not None:
        steps = torch.linspace(-0.25, 1.25, args.points).tolist()
        record["interpolation"] = {
            "to": str(find_checkpoint(args.to)),
            "alphas": steps,
            "loss": _timed(seconds, "interpolation", lambda: interpolation(obj, other, steps)),
        }
    record["plane"] = None
    if not args.no_plane:
        d1 = filter_normalized_direction(obj.params, _generator(args.seed, 2))
        d2 = filter_normalized_direction(obj.params, _generator(args.seed, 3))
        grid = torch.linspace(-args.span, args.span, args.plane_points).tolist()
        record["plane"] = {
            "alphas": grid,
            "betas": grid,
            "loss": _timed(seconds, "plane", lambda: plane(obj, d1, d2, grid, grid)),
        }
    return record


def _landscape_plots(record: dict[str, Any], out: Path, name: str) -> list[Path]:
    paths = []
    if record["line"] is not None:
        path = out / "landscape_line.png"
        plot_line(
            path,
            record["line"]["alphas"],
            {"filter-normalised random direction": record["line"]["loss"]},
            xlabel="step along the direction (alpha; 1 = each filter moved by its own norm)",
            title=f"{name}: loss along a random direction",
        )
        paths.append(path)
    if record["interpolation"] is not None:
        path = out / "landscape_interpolation.png"
        other = Path(record["interpolation"]["to"]).parent.parent.name
        plot_line(
            path,
            record["interpolation"]["alphas"],
            {f"(1-a) w + a w', w' = {other}": record["interpolation"]["loss"]},
            xlabel=f"a (0: {name}, 1: {other})",
            title=f"{name} to {other}: linear interpolation",
        )
        paths.append(path)
    if record["plane"] is not None:
        path = out / "landscape_plane.png"
        plot_plane(
            path,
            record["plane"]["alphas"],
            record["plane"]["betas"],
            record["plane"]["loss"],
            title=f"{name}: loss over two filter-normalised directions",
        )
        paths.append(path)
    return paths


def run_landscape(args: argparse.Namespace) -> int:
    with _session() as device:
        subject, record = _measure(args, device, landscape_record)
        if environment().is_main:
            _write(subject.out / "landscape.json", json.dumps(record, indent=1) + "\n")
            name = subject.checkpoint.parent.parent.name
            paths = _landscape_plots(record, subject.out, name)
            print(_landscape_summary(record))
            print(f"wrote {subject.out / 'landscape.json'}" + "".join(f", {p.name}" for p in paths))
        barrier()
    return 0


def _landscape_summary(record: dict[str, Any]) -> str:
    lines = [f"loss {record['loss']:.4f} on {record['tokens']:,} tokens (step {record['step']})"]
    hessian = record["hessian"]
    if hessian["lambda_max"] is not None:
        top = hessian["lambda_max"]
        lines.append(
            f"lambda_max {top['value']:.5g} ({top['iterations']} iterations, rel. change {top['rel_change']:.2g})"
        )
    if hessian["top_k"] is not None:
        lines.append("top-k " + ", ".join(f"{v:.5g}" for v in hessian["top_k"]["values"]))
    if hessian["trace"] is not None:
        tr = hessian["trace"]
        lines.append(f"trace {tr['value']:.5g} ± {tr['stderr']:.2g} ({tr['samples']} samples)")
    for s in record["sam_sharpness"]:
        lines.append(f"SAM sharpness at rho {s['rho']:g}: {s['value']:.5g}")
    return "\n".join(lines)


# -- flatlm eval ---------------------------------------------------------------------------------------------------


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _corrupted_loss(subject: Subject, corruption: Corruption, seed: int) -> tuple[float, int]:
    texts = corrupt_texts(subject.documents, corruption, seed)
    rank, size = world()
    batches = [
        b.to(subject.device)
        for b in document_batches(texts, subject.tokenizer, subject.seq_len, subject.batch_size, rank, size)
    ]
    return mean_loss(subject.model, batches, subject.device)


def robustness_record(subject: Subject, args: argparse.Namespace) -> dict[str, Any]:
    """Every measure of ``flatlm eval`` (see ``eval_parser``) as one JSON-ready dict; gap = loss - clean loss."""
    model, batches, device = subject.model, subject.batches, subject.device
    seconds: dict[str, float] = {}
    record = _header(subject, args)
    clean, tokens = _timed(seconds, "clean", lambda: mean_loss(model, batches, device))
    record.update(clean={"loss": clean, "ppl": _perplexity(clean), "tokens": tokens}, seconds=seconds)
    rows = []
    for corruption in parse_spec(args.corrupt) if args.corrupt else []:
        loss, count = _timed(seconds, corruption.name, lambda c=corruption: _corrupted_loss(subject, c, args.seed))
        rows.append(
            {
                "name": corruption.name,
                "kind": corruption.kind,
                "rate": corruption.rate,
                "loss": loss,
                "ppl": _perplexity(loss),
                "gap": loss - clean,
                "tokens": count,
            }
        )
    record["corruptions"] = rows
    record["corruption_gap_mean"] = sum(r["gap"] for r in rows) / len(rows) if rows else None
    params = [p for p in model.parameters()]
    noise = []
    for i, sigma in enumerate(args.weights_noise or []):

        def draws(i: int = i, sigma: float = sigma) -> list[float]:
            values = []
            for draw in range(args.draws):
                with relative_noise(params, sigma, _generator(args.seed, 10 + i, draw)):
                    values.append(mean_loss(model, batches, device)[0])
            return values

        values = _timed(seconds, f"noise_{sigma:g}", draws)
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
        noise.append({"sigma": sigma, "draws": len(values), "loss": mean, "loss_std": std, "gap": mean - clean})
    record["weight_noise"] = noise
    quant = []
    for bits in args.quantize or []:
        with quantized(params, bits):
            loss = _timed(seconds, f"int{bits}", lambda: mean_loss(model, batches, device)[0])
        quant.append({"bits": bits, "loss": loss, "gap": loss - clean, "rel_error": quantization_error(params, bits)})
    record["quantize"] = quant
    return record


def robustness_table(record: dict[str, Any]) -> str:
    """``robustness.json`` as a markdown table: per measure, loss, perplexity and the gap to clean."""
    rows = [("clean", record["clean"]["loss"], "")]
    rows += [(f"corrupt {r['name']}", r["loss"], r["gap"]) for r in record["corruptions"]]
    rows += [
        (f"weight noise sigma={r['sigma']:g} (mean of {r['draws']})", r["loss"], r["gap"])
        for r in record["weight_noise"]
    ]
    rows += [(f"int{r['bits']} per-channel RTN", r["loss"], r["gap"]) for r in record["quantize"]]
    lines = ["| measure | loss | perplexity | gap to clean |", "| --- | ---: | ---: | ---: |"]
    for name, loss, gap in rows:
        gap_text = "" if gap == "" else f"{gap:+.4f}"
        lines.append(f"| {name} | {loss:.4f} | {_perplexity(loss):.2f} | {gap_text} |")
    if record["corruption_gap_mean"] is not None:
        lines.append(f"\nmean gap over the corruptions: {record['corruption_gap_mean']:+.4f}")
    return "\n".join(lines) + "\n"


def run_eval(args: argparse.Namespace) -> int:
    if args.corrupt:
        parse_spec(args.corrupt)  # a bad spec is one error before the model is loaded
    with _session() as device:
        subject, record = _measure(args, device, robustness_record)
        if environment().is_main:
            _write(subject.out / "robustness.json", json.dumps(record, indent=1) + "\n")
            table = robustness_table(record)
            _write(subject.out / "robustness.md", table)
            print(table, end="")
            print(f"wrote {subject.out / 'robustness.json'} and robustness.md")
        barrier()
    return 0
