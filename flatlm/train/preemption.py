"""Preemption: SIGTERM or SIGINT (how SLURM and schedulers preempt, or Ctrl-C) finishes the current step,
saves a checkpoint and exits 0; rerunning the same command resumes from it.

The handler only records the request (``requested``: this rank's flag, no communication). After every step the
loop folds the flags of all ranks into the step's one all-reduce (``flatlm.train.loop.read_step``): any rank
signalled -> all stop after the same step.
A second signal stops at once (the default action), except while a checkpoint is being written
(``saving()``): then it is ignored with a message, so a double Ctrl-C never kills the save it asked for. The same
request often arrives twice (SLURM signals every process of a job step, launchers forward their own copy): such a
relayed copy (``_relayed``) is ignored with a message, never taken as the second signal. A run
stopped at once before any checkpoint exists says so when rerun (it starts from step 0, with a warning).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELAY_WINDOW_S = 0.5
"""A second signal this soon after the first is the same request relayed, unless it is a SIGINT after a SIGTERM
(see ``_relayed``); a human's second Ctrl-C comes later."""


def _relayed(first: int, second: int, after_s: float) -> bool:
    """Whether ``second``, ``after_s`` seconds after ``first``, is the same stop request arriving again.

    A SIGTERM after a SIGTERM always is: SLURM signals every process of a job step, srun and torchrun's agent forward
    their copies, a second ``scancel`` repeats it; none of them means "now". Within ``RELAY_WINDOW_S``, a repeat of the
    same signal or a SIGTERM after a SIGINT also is: the DeepSpeed launcher's workers share the terminal's process
    group, so a Ctrl-C reaches them directly and then as the launcher's SIGTERM, milliseconds apart. A SIGINT after
    a SIGTERM is a person asking for an immediate stop.
    """
    if first == second == signal.SIGTERM:
        return True
    return after_s < RELAY_WINDOW_S and (second == first or (first, second) == (signal.SIGINT, signal.SIGTERM))


class Preemption:
    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}
        self._saving = False
        self._repeated = False
        self._first_at = 0.0

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            # After a stop request the process is on its way out with its checkpoint saved: a relayed SIGTERM that
            # arrives late (srun, a second scancel) must not turn that exit 0 into a death by signal.
            late = signal.SIG_IGN if sig == signal.SIGTERM and self.signal is not None else handler
            signal.signal(sig, late)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        now = time.monotonic()
        if self.signal is None:
            self.signal, self._first_at = signum, now
            return
        if self._saving:  # the checkpoint the first signal asked for is being written: let it finish
            os.write(2, b"[flatlm] still writing the checkpoint; the run stops as soon as it is complete\n")
            return
        if _relayed(self.signal, signum, now - self._first_at):
            if not self._repeated:  # the same request relayed (launcher, srun, the terminal's process group)
                os.write(2, b"[flatlm] the stop request arrived again; still stopping after this step\n")
            self._repeated = True
            return
        signal.signal(signum, signal.SIG_DFL)  # a second signal outside a save acts at once
        os.kill(os.getpid(), signum)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """While the body runs (a checkpoint save), repeated signals are recorded, never acted on."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    @property
    def requested(self) -> bool:
        """Whether this rank was signalled (local: no communication)."""
        return self.signal is not None
