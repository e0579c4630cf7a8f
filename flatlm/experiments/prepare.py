"""Build the cells' data caches (tokenizer, token cache, SFT examples) once, before the first cell starts.

Without this the first cell of each data config trains its tokenizer and encodes the corpus inside its own run, and
its cost columns say so: its wall time and its peak RSS (the encoder's memory, not the optimizer's) are inflated,
and with ``--jobs 2`` two cells may build the same cache at once (one waits on the other's lock). ``flatlm ablate``
therefore loads each distinct data config once, in a child process (``python -m flatlm.experiments.prepare
CONFIG.yaml``: this process keeps no corpus in memory, and a crash in the data code is a log, not a traceback), and
the cells then find the cache built. A failure is said and the cells still run: each then reports the same error
in its own log, as a cell would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from flatlm.config import RunConfig, dump_yaml, load_config, to_dict
from flatlm.errors import FlatlmError
from flatlm.experiments.cells import log_tail

PREPARE_DIR = ".prepare"
LOG_FILE = "prepare.log"


def data_key(cfg: RunConfig) -> str:
    """What decides a cell's data caches: its data section and (for a chat template from the model's tokenizer) the
    model's name. Two cells with one key share every cache file."""
    return json.dumps({"data": to_dict(cfg)["data"], "model": cfg.model.name}, sort_keys=True, default=str)


def distinct_data(configs: Sequence[RunConfig]) -> list[RunConfig]:
    """One config per distinct data key, in first-seen order."""
    seen: dict[str, RunConfig] = {}
    for cfg in configs:
        seen.setdefault(data_key(cfg), cfg)
    return list(seen.values())


Runner = Callable[[list[str], Path], int]


def _run_logged(command: list[str], log: Path) -> int:
    with log.open("ab") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode


def prepare_data(
    configs: Sequence[RunConfig],
    output_dir: Path,
    say: Callable[[str], None],
    run: Runner = _run_logged,
) -> None:
    """Load each distinct data config of ``configs`` once, each in a child process logged to OUTPUT_DIR/prepare.log."""
    distinct = distinct_data(configs)
    if not distinct:
        return
    folder = output_dir / PREPARE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    log = output_dir / LOG_FILE
    for index, cfg in enumerate(distinct):
        config = folder / f"data-{index}.yaml"
        config.write_text(dump_yaml(cfg))
        start = log.stat().st_size if log.exists() else 0
        say(f"preparing the data ({index + 1}/{len(distinct)}: {cfg.data.source}, vocab {cfg.data.vocab_size})")
        guard = [sys.executable, "-m", "flatlm.experiments.pdeathsig", str(os.getpid())]  # dies with ablate
        code = run([*guard, sys.executable, "-m", "flatlm.experiments.prepare", str(config)], log)
        if code != 0:
            tail = "\n".join("    " + line for line in log_tail(log, start).splitlines())
            say(f"preparing the data failed (exit {code}); the cells will say why in their logs. {log}:\n{tail}")


def main(argv: list[str]) -> int:
    """``python -m flatlm.experiments.prepare CONFIG.yaml``: build that config's data caches."""
    import logging

    from flatlm.data.splits import load_data

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        load_data(load_config(argv[0]))
    except FlatlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
