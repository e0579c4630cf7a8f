"""Compare two runs' final states and per-step metrics tensor by tensor, with named tolerances.

``final_state`` (flatlm.train.inspect) gives ``{"model.<fqn>": w, "optim.<fqn>.<key>": s}`` for any backend; here
every key of the reference must be present in the run (and no other), every tensor must have the reference's
shape and dtype, and differ from it by at most the tolerance, measured per tensor as

    rel(a, b) = ||a - b|| / max(||b||, 1e-30)        (Frobenius: a few sign flips of Lion do not dominate)

``step`` counters must be equal. The per-step ``grad_norm`` and ``loss`` of metrics.jsonl are compared with
``max_i |a_i - b_i| / |b_i|``. A tolerance of 0 means bit-identical: ``torch.equal`` and ``==``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from flatlm.train.inspect import final_state
from flatlm.train.metrics import read_jsonl


@dataclass(frozen=True)
class Tolerance:
    """Largest allowed relative error of the weights, the optimizer state and the per-step grad norm / loss."""

    model: float
    optim: float
    grad_norm: float
    loss: float


EXACT = Tolerance(0.0, 0.0, 0.0, 0.0)


@dataclass
class Report:
    """What differs between a run and its reference (``problems`` empty: equal within the tolerance)."""

    problems: list[str] = field(default_factory=list)
    worst: dict[str, tuple[float, str]] = field(default_factory=dict)
    """Per kind (model, optim, grad_norm, loss): the largest relative error and where it is."""

    def note(self, kind: str, err: float, where: str) -> None:
        if kind not in self.worst or err > self.worst[kind][0]:
            self.worst[kind] = (err, where)

    def summary(self) -> str:
        worst = ", ".join(f"{k} {e:.3g} ({w})" for k, (e, w) in sorted(self.worst.items()))
        return (
            "; ".join(self.problems[:8])
            + (f" [+{len(self.problems) - 8} more]" if len(self.problems) > 8 else "")
            + (f" | worst: {worst}")
        )


def rel_error(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def compare_states(actual: dict[str, Tensor], expected: dict[str, Tensor], tol: Tolerance, report: Report) -> None:
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    if missing:
        report.problems.append(f"missing in the run: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        report.problems.append(f"not in the reference: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for key in sorted(set(expected) & set(actual)):
        a, b = actual[key], expected[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            report.problems.append(f"{key}: {a.dtype}{list(a.shape)} vs reference {b.dtype}{list(b.shape)}")
            continue
        kind = "model" if key.startswith("model.") else "optim"
        limit = tol.model if kind == "model" else tol.optim
        if key.endswith(".step"):
            limit = 0.0
        if limit == 0.0:
            if not torch.equal(a, b):
                err = rel_error(a, b)
                report.note(kind, err, key)
                report.problems.append(f"{key}: not bit-identical (rel {err:.3g})")
            else:
                report.note(kind, 0.0, key)
            continue
        err = rel_error(a, b)
        report.note(kind, err, key)
        if not err <= limit:  # NaN fails too
            report.problems.append(f"{key}: rel error {err:.3g} > {limit:g}")


def compare_series(actual: list[float], expected: list[float], kind: str, limit: float, report: Report) -> None:
    if len(actual) != len(expected):
        report.problems.append(f"{kind}: {len(actual)} steps vs reference {len(expected)}")
        return
    if limit == 0.0:
        bad = [i + 1 for i, (a, b) in enumerate(zip(actual, expected, strict=True)) if a != b]
        report.note(kind, 0.0 if not bad else float("inf"), f"steps {bad[:4]}" if bad else "all steps")
        if bad:
            report.problems.append(f"{kind}: not bit-identical at steps {bad[:8]}")
        return
    errs = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(actual, expected, strict=True)]
    worst = max(range(len(errs)), key=lambda i: errs[i])
    report.note(kind, errs[worst], f"step {worst + 1}")
    if not errs[worst] <= limit:
        report.problems.append(f"{kind}: rel error {errs[worst]:.3g} > {limit:g} at step {worst + 1}")


def compare_runs(run: Path, reference: Path, tol: Tolerance) -> Report:
    """Compare run directory ``run`` with ``reference``: final state, per-step grad norm and loss."""
    report = Report()
    compare_states(final_state(run), final_state(reference), tol, report)
    got, want = read_jsonl(run / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    compare_series([r["grad_norm"] for r in got], [r["grad_norm"] for r in want], "grad_norm", tol.grad_norm, report)
    compare_series([r["loss"] for r in got], [r["loss"] for r in want], "loss", tol.loss, report)
    return report
