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
  (with NCCL a timeout aborts without a Python exception). Either way the message names the step, and the ranks
  to blame: every watchdog thread posts a heartbeat (its rank's phase and wall time) every ``beat_s``, so the
  message names a rank not heard from for ``STALE_AFTER_BEATS`` beats (stopped, or its node lost: it assumes the
  nodes' clocks agree to within a second, as NTP keeps them) or one still in an earlier phase (hung).
  A rank that was itself suspended (the whole job stopped with SIGSTOP or ``scontrol suspend``, then resumed) does
  not count the time it was suspended: its watchdog thread notices that it woke up far later than it slept.
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

import datetime
import itertools
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
STALE_AFTER_BEATS = 3
"""A rank whose newest heartbeat is this many beats old is "not heard from" (stopped or lost)."""
SUSPENDED_AFTER_S = 5.0
"""A watchdog poll that returns this much later than it should means this process was suspended meanwhile."""
STORE_TIMEOUT_S = 10.0
"""How long one of the watchdog's store operations may take (its own connection, see ``connect``)."""
LINGER_S = 0.6
"""How long a failed rank waits after posting before it exits: its store may live in this very process (rank 0
hosts it without torchrun's agent), and the others need one poll to read the failure."""
_CALLS = itertools.count()


def next_call() -> int:
    """A number for the next watched call in this process (``Watchdog(call=...)``): a second training run in the same
    processes must not read the first one's failures. Every rank makes the same calls, so the numbers agree."""
    return next(_CALLS)


@dataclass
class _Outcome:
    first: bool = False
    """This process posted its job's first failure: its error is the root cause, said on any rank."""
    cause: Failure | None = None
    """Another rank's failure, posted before this rank's own: this rank's error is its consequence."""
    own: Failure | None = None
    """This rank's failure as posted (its phase, and what a timeout means)."""
    watchdog: Watchdog | None = None
    """The watchdog that posted it (its store answers ``said_by_rank0``)."""


_OUTCOME = _Outcome()


def was_first_failure() -> bool:
    """Whether this process posted its job's first failure (its error is the root cause: say it on any rank)."""
    return _OUTCOME.first


def own_failure() -> Failure | None:
    """This process's failure as it was posted to the other ranks (None: it posted none)."""
    return _OUTCOME.own


def said_by_rank0(wait_s: float = 1.0) -> bool:
    """Whether rank 0 posted the same error as this process (an error every rank raised: rank 0 says it for all),
    waiting up to ``wait_s`` for rank 0's post."""
    watchdog, own = _OUTCOME.watchdog, _OUTCOME.own
    if watchdog is None or own is None:
        return False
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if any(f.rank == 0 and f.error == own.error for f in watchdog.all_posted()):
                return True
        except Exception:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


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


def connect() -> Any:
    """A connection of this process's own to the job's store, with a short timeout.

    The process group's store object is one TCP connection: a blocking ``get``/``wait`` on it (NCCL's unique-id
    exchange for every new communicator, ``new_group``, store-based barriers) holds it for up to the group's timeout,
    and a watchdog polling through it would wait behind them (measured: 3.8 s behind a 4 s ``get``; 0 s on a clone).
    """
    store = dist.distributed_c10d._get_default_store()
    try:
        store = store.clone()
        store.set_timeout(datetime.timedelta(seconds=STORE_TIMEOUT_S))
    except (RuntimeError, AttributeError, NotImplementedError):  # a store without clone: share the group's
        pass
    return store


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
        beat_s: float = 1.0,
        store: Any = None,
        call: int = 0,
        exit: Callable[[int], Any] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.poll_s, self.grace_s, self.beat_s = poll_s, grace_s, beat_s
        self._store = store
        self._exit, self._clock = exit, clock
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._prefix = f"flatlm/failures/attempt{attempt}/call{call}"
        self._suspended_s = 0.0  # the time this process spent suspended (only the watchdog thread adds to it)
        # (label, clock and suspended time at its start, watched); only the main thread replaces it
        self._phase: tuple[str, float, float, bool] = ("set-up", clock(), 0.0, False)
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
            self._store = connect()
        self._thread = threading.Thread(target=self._run, name="flatlm-watchdog", daemon=True)
        self._thread.start()
        return self

    def enter(self, label: str, watched: bool = True) -> None:
        """The main thread starts ``label`` (``"step 7"``); ``watched``: it must end within ``timeout_s``."""
        self._phase = (label, self._clock(), self._suspended_s, watched)

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
        error = describe(exc, self.timeout_s)
        if "parallel.timeout_s" in error:  # a collective timed out: say which ranks it waited for
            error += self._blame()
        failure = Failure(self.rank, socket.gethostname(), self.phase, error)
        self.first = self._post(failure)
        _OUTCOME.first, _OUTCOME.own, _OUTCOME.watchdog = self.first, failure, self
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

    def all_posted(self) -> list[Failure]:
        """Every failure posted so far, in order."""
        count = int(self._store.add(f"{self._prefix}/count", 0))
        keys = [f"{self._prefix}/{i}" for i in range(1, count + 1)]
        return [Failure(**json.loads(self._store.get(k))) for k in keys if self._store.check([k])]

    def _beat(self) -> None:
        label = self._phase[0]
        self._store.set(f"{self._prefix}/beat/{self.rank}", json.dumps({"phase": label, "t": time.time()}))

    def heartbeats(self) -> dict[int, tuple[str, float] | None]:
        """Every rank's newest heartbeat: (phase, seconds since it was posted); None for a rank never heard from."""
        beats: dict[int, tuple[str, float] | None] = {}
        for rank in range(self.world_size):
            key = f"{self._prefix}/beat/{rank}"
            if not self._store.check([key]):
                beats[rank] = None
                continue
            record = json.loads(self._store.get(key))
            beats[rank] = (record["phase"], max(0.0, time.time() - record["t"]))
        return beats

    def _blame(self) -> str:
        """``"; rank 1 not heard from for 4 s (last in step 5)"``: the ranks this one waits for, from their heartbeats
        ("" when the store cannot be read or every rank is alive and in this rank's phase)."""
        try:
            beats = self.heartbeats()
        except Exception:
            return ""
        mine, silent, behind = self.phase, [], []
        for rank, beat in beats.items():
            if rank == self.rank:
                continue
            if beat is None:
                silent.append(f"rank {rank} never heard from")
            elif beat[1] > STALE_AFTER_BEATS * self.beat_s:
                silent.append(f"rank {rank} not heard from for {beat[1]:.0f} s (last in {beat[0]})")
            elif beat[0] != mine:
                behind.append(f"rank {rank} in {beat[0]}")
        return "".join(f"; {item}" for item in silent + behind)

    # -- watchdog thread --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        store_ok = True
        last_beat, woke = float("-inf"), self._clock()
        while not self._stop.wait(self.poll_s):
            now = self._clock()
            if now - woke > self.poll_s + SUSPENDED_AFTER_S:  # this process was suspended: that time is not a stall
                self._suspended_s += now - woke - self.poll_s
            woke = now
            if self._failed.is_set():
                return  # this rank's own failure path reports and exits
            if store_ok and now - last_beat >= self.beat_s:
                last_beat = now
                try:
                    self._beat()
                except Exception:
                    store_ok = False
            if store_ok:
                try:
                    failure = self.posted()
                except Exception:  # the store's host is gone: keep only the progress check
                    store_ok, failure = False, None
                if failure is not None and failure.rank != self.rank:
                    self._peer_failed(failure)
                    return
            label, since, suspended_before, watched = self._phase
            if watched and self._clock() - since - (self._suspended_s - suspended_before) > self.stall_after_s:
                self._stalled(label)
                return

    @property
    def stall_after_s(self) -> float:
        """A watched phase ends the rank after this long: a little before ``timeout_s``, so that the message naming
        the step comes before NCCL's own watchdog aborts the process at the same timeout (without a word)."""
        return self.timeout_s - min(30.0, 0.1 * self.timeout_s)

    def _peer_failed(self, failure: Failure) -> None:
        if self._failed.wait(self.grace_s) or self._stop.is_set():
            return  # this rank failed too (or finished) meanwhile: its own path says so
        self._end(f"stopping in {self.phase}: {failure}")

    def _stalled(self, label: str) -> None:
        error = (
            f"no progress for {self.stall_after_s:g} s (parallel.timeout_s={self.timeout_s:g}) in {label}: another "
            "rank is stopped, hung or much slower; raise parallel.timeout_s if steps are legitimately that slow"
            f"{self._blame()}"
        )
        self._post(Failure(self.rank, socket.gethostname(), label, error))
        self._end(f"{error}")

    def _end(self, message: str) -> None:
        sys.stderr.write(f"[flatlm rank {self.rank}] {message}; exiting\n")
        sys.stderr.flush()
        self._exit(EXIT_PEER_FAILED)
