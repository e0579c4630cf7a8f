"""``python -m tests.launch.faulty [flatlm train arguments]``: flatlm.train with a planted fault, for launcher tests.

``FLATLM_TEST_FAULT=RANK:STEP:KIND`` makes global rank RANK, as step STEP (1-based) starts, on the first attempt only
(``TORCHELASTIC_RESTART_COUNT`` 0):

    raise    raise an exception (the others are then waiting in that step's collectives)
    linger   raise, and keep a non-daemon thread alive, so that the process cannot end by returning normally
    stop     SIGSTOP itself (a hung rank: no error, no exit)
    kill     SIGKILL itself (a worker lost mid-run: no error, no cleanup)

``FLATLM_TEST_EXITS=DIR`` records each rank's exit status as ``DIR/rank<R>.attempt<A>`` (a normal return only),
and the moment the fault was planted (``time.time()``) as ``DIR/fault-at``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import flatlm.train.loop as loop
from flatlm.train.cli import run_train

_train_step = loop.train_step


def _planted(*args: object, step: int, **kwargs: object) -> object:
    spec = os.environ.get("FLATLM_TEST_FAULT", "")
    if spec and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        rank, at, kind = spec.split(":")
        if int(os.environ.get("RANK", "0")) == int(rank) and step + 1 == int(at):
            if exits := os.environ.get("FLATLM_TEST_EXITS"):
                Path(exits).mkdir(parents=True, exist_ok=True)
                (Path(exits) / "fault-at").write_text(repr(time.time()))
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                if kind == "linger":
                    threading.Thread(target=time.sleep, args=(600,), daemon=False).start()
                raise RuntimeError(f"planted failure on rank {rank} at step {at}")
    return _train_step(*args, step=step, **kwargs)


def main() -> int:
    loop.train_step = _planted  # type: ignore[assignment]
    status = run_train(sys.argv[1:], "faulty")
    if exits := os.environ.get("FLATLM_TEST_EXITS"):
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        Path(exits).mkdir(parents=True, exist_ok=True)
        (Path(exits) / f"rank{os.environ.get('RANK', '0')}.attempt{attempt}").write_text(str(status))
    return status


if __name__ == "__main__":
    sys.exit(main())
