"""Per-step records: ``metrics.jsonl`` (one JSON object per optimizer step), ``eval.jsonl``
(evaluation records, marked ``"eval": true``) and TensorBoard scalars under ``tensorboard/``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than invalid
    return value


class MetricsLogger:
    def __init__(self, output_dir: Path, tensorboard: bool = True, append: bool = False):
        mode = "a" if append else "w"  # append: a resumed run continues the records
        self.train_file = open(output_dir / METRICS_FILE, mode)  # noqa: SIM115 - closed in close()
        self.eval_file = open(output_dir / EVAL_FILE, mode)  # noqa: SIM115
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / TENSORBOARD_DIR))

    def _write(self, f: Any, record: dict[str, Any], prefix: str) -> None:
        f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        f.flush()
        if self.writer is not None:
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
