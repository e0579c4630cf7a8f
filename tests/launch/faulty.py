"""``python -m tests.launch.faulty [flatlm train arguments]``: flatlm.train with a planted fault, for launcher tests.

``FLATLM_TEST_FAULT=RANK:STEP:KIND`` makes global rank RANK, as step STEP (1-based) starts, on the first attempt only
(``TORCHELASTIC_RESTART_COUNT`` 0):

    raise    raise an exception (the others are then waiting in that step's collectives)
    linger   raise, and keep a non-daemon thread alive, so that the process cannot end by returning normally
    stop     SIGSTOP itself (a hung rank: no error, no exit)
    kill     SIGKILL itself (a worker lost mid-run: no error, no cleanup)
    savestop SIGSTOP itself as the checkpoint of step STEP starts being written (hung inside a save)

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
_save_checkpoint = loop.save_checkpoint


def _fault(kind: str, step: int) -> bool:
    """Whether this rank plants ``kind`` at ``step`` (1-based) on this attempt; records the moment if so."""
    spec = os.environ.get("FLATLM_TEST_FAULT", "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    rank, at, planted = spec.split(":")
    if (planted == "savestop") != (kind == "savestop"):
        return False
    if int(os.environ.get("RANK", "0")) != int(rank) or step != int(at):
        return False
    if exits := os.environ.get("FLATLM_TEST_EXITS"):
        Path(exits).mkdir(parents=True, exist_ok=True)
        (Path(exits) / "fault-at").write_text(repr(time.time()))
    return True


def _planted_save(out: Path, step: int, *args: object, **kwargs: object) -> object:
    if _fault("savestop", step):
        os.kill(os.getpid(), signal.SIGSTOP)
    return _save_checkpoint(out, step, *args, **kwargs)


def _planted(*args: object, step: int, **kwargs: object) -> object:
    kind = (os.environ.get("FLATLM_TEST_FAULT") or "::").split(":")[2]
    if _fault(kind, step + 1):
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        if kind in ("raise", "linger"):
            if kind == "linger":
                threading.Thread(target=time.sleep, args=(600,), daemon=False).start()
            raise RuntimeError(f"planted failure on rank {os.environ.get('RANK')} at step {step + 1}")
    return _train_step(*args, step=step, **kwargs)


def main() -> int:
    loop.train_step = _planted  # type: ignore[assignment]
    loop.save_checkpoint = _planted_save  # type: ignore[assignment]
    status = run_train(sys.argv[1:], "faulty")
    if exits := os.environ.get("FLATLM_TEST_EXITS"):
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        Path(exits).mkdir(parents=True, exist_ok=True)
        (Path(exits) / f"rank{os.environ.get('RANK', '0')}.attempt{attempt}").write_text(str(status))
    return status


if __name__ == "__main__":
    sys.exit(main())
