"""Per-step records: ``metrics.jsonl`` (one JSON object per optimizer step), ``eval.jsonl``
(evaluation records, marked ``"eval": true``) and TensorBoard scalars under ``tensorboard/``; and what the user
watches meanwhile (:class:`Progress`).

TensorBoard files are opened on the first scalar, so a rerun with nothing to do adds no empty event file. A
resume that drops records beyond its checkpoint (:func:`purge_tensorboard`) writes TensorBoard's purge marker,
so the steps it runs again are not shown twice.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than invalid
    return value


TENSORBOARD_FLUSH_S = 10
"""TensorBoard's writer reaches the disk this often (its default is 120 s): a rank that the fail-fast watchdog ends
(``os._exit``, no clean-up) loses at most this much of its event file; metrics.jsonl is flushed every record."""


def _summary_writer(log_dir: Path, purge_step: int | None = None) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=TENSORBOARD_FLUSH_S)


def purge_tensorboard(output_dir: Path, step: int) -> None:
    """Hide the TensorBoard events after ``step`` (a resume from an older checkpoint runs them again): a writer
    opened with ``purge_step`` writes the marker on which TensorBoard discards every earlier-written event at or
    after that step."""
    log_dir = output_dir / TENSORBOARD_DIR
    if log_dir.is_dir() and any(log_dir.iterdir()):
        _summary_writer(log_dir, purge_step=step + 1).close()


class MetricsLogger:
    def __init__(self, output_dir: Path, tensorboard: bool = True, append: bool = False):
        mode = "a" if append else "w"  # append: a resumed run continues the records
        self.train_file = open(output_dir / METRICS_FILE, mode)  # noqa: SIM115 - closed in close()
        self.eval_file = open(output_dir / EVAL_FILE, mode)  # noqa: SIM115
        self.tensorboard_dir = output_dir / TENSORBOARD_DIR if tensorboard else None
        self.writer: Any = None  # opened on the first scalar: a run that logs nothing writes no event file

    def _write(self, f: Any, record: dict[str, Any], prefix: str) -> None:
        f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        f.flush()
        if self.tensorboard_dir is not None:
            if self.writer is None:
                self.writer = _summary_writer(self.tensorboard_dir)
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def log_train(self, record: dict[str, Any]) -> None:
        self._write(self.train_file, record, "train")

    def log_eval(self, record: dict[str, Any]) -> None:
        self._write(self.eval_file, {**record, "eval": True}, "eval")

    def close(self) -> None:
        self.train_file.close()
        self.eval_file.close()
        if self.writer is not None:
            self.writer.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """Training progress for a person: on a terminal a tqdm bar, with log lines written above it (through
    ``tqdm.contrib.logging``, never glued to the bar); when the stream is not a terminal (stderr in a file, as in
    every cluster job) no bar, whose carriage returns would make one endless line, but a log line at the first
    step, the last, and every ``interval_s`` seconds in between (0: every step)."""

    def __init__(
        self,
        total: int,
        initial: int,
        *,
        enabled: bool = True,
        interval_s: float = 30.0,
        log: Callable[[str], None] | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        stream = stream if stream is not None else sys.stderr
        terminal = enabled and stream.isatty()
        self.lines = enabled and not terminal
        self.total, self.initial, self.interval_s = total, initial, interval_s
        self.log = log or logging.getLogger("flatlm").info
        self.clock = clock
        self.start = self.last_line = clock()
        self.bar = tqdm(
            total=total, initial=initial, desc="train", disable=not terminal, dynamic_ncols=True, file=stream
        )
        self.redirect = logging_redirect_tqdm(tqdm_class=tqdm) if terminal else None
        if self.redirect is not None:
            self.redirect.__enter__()

    def update(self, record: dict[str, Any]) -> None:
        """One optimizer step's record (``step``, ``loss``, ``lr``, ``tokens_per_s``) is done."""
        step, loss, lr, tok_s = record["step"], record["loss"], record["lr"], record["tokens_per_s"]
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
        self.bar.update(1)
        now = self.clock()
        due = step in (self.initial + 1, self.total) or now - self.last_line >= self.interval_s
        if not (self.lines and due):
            return
        self.last_line = now
        elapsed = now - self.start
        left = elapsed / (step - self.initial) * (self.total - step)
        self.log(
            f"step {step}/{self.total}: loss {loss:.4f}, lr {lr:.2e}, {tok_s:,.0f} tokens/s, "
            f"{timedelta(seconds=round(elapsed))} elapsed, {timedelta(seconds=round(left))} left"
        )

    def close(self) -> None:
        if self.redirect is not None:
            self.redirect.__exit__(None, None, None)
            self.redirect = None
        self.bar.close()
