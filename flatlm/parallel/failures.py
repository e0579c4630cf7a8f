"""Fail fast: one rank's failure ends the whole job in seconds, not at the process group's timeout.

A data-parallel job hangs in three ways; this module ends each one.

* **A rank raises while the others wait in a collective.** The failing rank posts its error (rank, host, phase,
  exception) to the job's store, the key-value store the process group was initialised with, which every rank on
  every node reaches; then it exits. A watchdog thread on every rank polls the store every ``poll_s``. A rank that
  finds another rank's failure writes it, naming that rank, and exits with status 1 wherever its main thread is
  blocked. Gloo notices a peer only once its process is gone; NCCL does not notice a dead peer at all. A rank whose
  own main thread fails within ``grace_s`` of the post reports its own error instead: every rank that fails the same
  check says it the same way.
* **A rank stops** (SIGSTOP, a hung kernel, a lost node), so nothing is posted. Each collective the others wait in
  times out after ``parallel.timeout_s``, the process group's timeout. Gloo raises in the main thread; the loop
  posts the error with its step. The watchdog also ends a rank whose step has not advanced within ``timeout_s``
  (with NCCL a timeout aborts without a Python exception). Either way the message names the step.
* **The failing rank itself hangs on its way out** (interpreter teardown waiting on a thread, a communicator that
  does not destroy). A multi-process command leaves with ``os._exit`` after saying its error
  (``flatlm.train.cli``).

Only the step loop is watched for progress. Set-up, the first step (compilation, cache building), evaluation and
checkpoint saves are covered by the process group's own per-collective timeout. A save that a failure interrupts
leaves a temporary directory that the next start removes: ``latest`` always names a complete checkpoint.

Keys are prefixed by the elastic restart count (``TORCHELASTIC_RESTART_COUNT``), so a restarted group never reads
an earlier attempt's failure.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

EXIT_PEER_FAILED = 1


@dataclass
class _Outcome:
    first: bool = False
    """This process posted its job's first failure: its error is the root cause, said on any rank."""
    cause: Failure | None = None
    """Another rank's failure, posted before this rank's own: this rank's error is its consequence."""
    own: Failure | None = None
    """This rank's failure as posted (its phase, and what a timeout means)."""


_OUTCOME = _Outcome()


def was_first_failure() -> bool:
    """Whether this process posted its job's first failure (its error is the root cause: say it on any rank)."""
    return _OUTCOME.first


def own_failure() -> Failure | None:
    """This process's failure as it was posted to the other ranks (None: it posted none)."""
    return _OUTCOME.own


def earlier_failure() -> Failure | None:
    """Another rank's failure that came before this process's own (e.g. the peer whose exit broke a collective)."""
    return _OUTCOME.cause


@dataclass(frozen=True)
class Failure:
    rank: int
    host: str
    phase: str
    error: str

    def __str__(self) -> str:
        return f"rank {self.rank} ({self.host}) failed in {self.phase}: {self.error}"


def describe(exc: BaseException, timeout_s: float) -> str:
    """One line for ``exc``. A collective timeout also names ``parallel.timeout_s`` and what usually causes it."""
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
    if "timed out" in str(exc).lower() or "timeout" in type(exc).__name__.lower():
        text += (
            f" (a collective did not complete within parallel.timeout_s={timeout_s:g} s: another rank is stopped, "
            "hung or much slower; raise parallel.timeout_s if steps are legitimately that slow)"
        )
    return text


class Watchdog:
    """Posts this rank's failure and watches for the others'; see the module docstring.

    ``enter(label, watched)`` says what the main thread is doing ("step 7"); a watched phase that lasts longer than
    ``timeout_s`` ends the rank. ``fail(exc)`` posts this rank's exception and returns whether it was the first
    failure of the job (the root cause, which the command line says even on a rank other than 0).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float,
        *,
        poll_s: float = 0.25,
        grace_s: float = 2.0,
        store: Any = None,
        exit: Callable[[int], Any] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.poll_s, self.grace_s = poll_s, grace_s
        self._store = store
        self._exit, self._clock = exit, clock
        self._prefix = f"flatlm/failures/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._phase: tuple[str, float, bool] = ("set-up", clock(), False)
        self._failed = threading.Event()  # this rank's main thread failed (it reports and exits itself)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.first = False

    # -- main thread ----------------------------------------------------------------------------------------------

    def start(self) -> Watchdog:
        """Start polling (several processes in an initialised group only; otherwise nothing to watch)."""
        if self.world_size == 1:
            return self
        if self._store is None:
            if not dist.is_initialized():
                return self
            self._store = dist.distributed_c10d._get_default_store()
        self._thread = threading.Thread(target=self._run, name="flatlm-watchdog", daemon=True)
        self._thread.start()
        return self

    def enter(self, label: str, watched: bool = True) -> None:
        """The main thread starts ``label`` (``"step 7"``); ``watched``: it must end within ``timeout_s``."""
        self._phase = (label, self._clock(), watched)

    @property
    def phase(self) -> str:
        return self._phase[0]

    def fail(self, exc: BaseException) -> bool:
        """Post this rank's exception (first failure wins the root-cause slot); True if it was the first."""
        self._failed.set()
        if self._store is None:
            return False
        try:
            earlier = self.posted()
        except Exception:
            earlier = None
        failure = Failure(self.rank, socket.gethostname(), self.phase, describe(exc, self.timeout_s))
        self.first = self._post(failure)
        _OUTCOME.first, _OUTCOME.own = self.first, failure
        _OUTCOME.cause = earlier if earlier is not None and earlier.rank != self.rank else None
        return self.first

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.poll_s + 1)

    # -- store ------------------------------------------------------------------------------------------------------

    def _post(self, failure: Failure) -> bool:
        try:
            index = int(self._store.add(f"{self._prefix}/count", 1))
            self._store.set(f"{self._prefix}/{index}", json.dumps(failure.__dict__))
        except Exception:  # the store is gone (its host died): the collectives' own errors remain
            return False
        return index == 1

    def posted(self) -> Failure | None:
        """The job's first posted failure, if any (one store read when there is none)."""
        if int(self._store.add(f"{self._prefix}/count", 0)) == 0:
            return None
        key = f"{self._prefix}/1"
        if not self._store.check([key]):  # counted, not yet written: the next poll reads it
            return None
        return Failure(**json.loads(self._store.get(key)))

    # -- watchdog thread --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        store_ok = True
        while not self._stop.wait(self.poll_s):
            if self._failed.is_set():
                return  # this rank's own failure path reports and exits
            if store_ok:
                try:
                    failure = self.posted()
                except Exception:  # the store's host is gone: keep only the progress check
                    store_ok, failure = False, None
                if failure is not None and failure.rank != self.rank:
                    self._peer_failed(failure)
                    return
            label, since, watched = self._phase
            if watched and self._clock() - since > self.timeout_s:
                self._stalled(label)
                return

    def _peer_failed(self, failure: Failure) -> None:
        if self._failed.wait(self.grace_s) or self._stop.is_set():
            return  # this rank failed too (or finished) meanwhile: its own path says so
        self._end(f"stopping in {self.phase}: {failure}")

    def _stalled(self, label: str) -> None:
        error = (
            f"no progress for {self.timeout_s:g} s (parallel.timeout_s) in {label}: another rank is stopped, hung "
            "or much slower; raise parallel.timeout_s if steps are legitimately that slow"
        )
        self._post(Failure(self.rank, socket.gethostname(), label, error))
        self._end(f"{error}")

    def _end(self, message: str) -> None:
        sys.stderr.write(f"[flatlm rank {self.rank}] {message}; exiting\n")
        sys.stderr.flush()
        self._exit(EXIT_PEER_FAILED)
