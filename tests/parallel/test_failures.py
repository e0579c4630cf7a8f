"""The fail-fast watchdog (``flatlm.parallel.failures``) and the relayed-signal rule of ``flatlm.train.preemption``.

In-process against torch's in-memory ``HashStore``: a peer's posted failure ends this rank within one poll plus
``grace_s``; a rank whose own main thread fails within the grace says its own error instead (no exit from the
watchdog); a watched phase that outlasts ``timeout_s`` ends the rank naming the phase, an unwatched one never does;
the first failure is the root cause. Then for real, on two gloo processes: a rank blocked in an all-reduce that its
peer never joins exits within seconds once the peer posts its failure, and, the control, stays blocked when nothing
is posted (so it is the watchdog that ends it, not gloo noticing a dead peer: the peer stays alive).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from flatlm.parallel.failures import Failure, Watchdog, describe
from flatlm.train.preemption import RELAY_WINDOW_S, Preemption, _relayed


class Exits:
    """Records the watchdog's exit instead of leaving the test process."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.event = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.event.set()


def watchdogs(n: int, exits: Exits, **kwargs: object) -> list[Watchdog]:
    store = dist.HashStore()
    options = {"poll_s": 0.02, "grace_s": 0.2, **kwargs}
    return [Watchdog(r, n, 30.0, store=store, exit=exits, **options).start() for r in range(n)]  # type: ignore[arg-type]


def test_a_peers_failure_ends_this_rank_naming_the_peer(capfd: pytest.CaptureFixture[str]) -> None:
    exits = Exits()
    w0, w1 = watchdogs(2, exits)
    w0.enter("step 5")
    w1.enter("step 5")
    t0 = time.monotonic()
    assert w1.fail(ValueError("bad batch")) is True  # the first failure: the root cause
    assert exits.event.wait(5), "rank 0 did not stop after rank 1 posted its failure"
    took = time.monotonic() - t0
    w0.stop()
    assert exits.codes == [1]
    assert 0.2 <= took < 2.0, took  # after the grace (0.2 s), within a few polls
    err = capfd.readouterr().err
    assert "[flatlm rank 0] stopping in step 5: rank 1 (" in err and "failed in step 5: ValueError: bad batch" in err


def test_a_rank_that_fails_within_the_grace_reports_itself() -> None:
    exits = Exits()
    w0, w1 = watchdogs(2, exits, grace_s=1.0)
    w1.fail(RuntimeError("the same check"))
    time.sleep(0.1)
    assert w0.fail(RuntimeError("the same check")) is False  # not the first
    time.sleep(1.2)
    w0.stop()
    w1.stop()
    assert exits.codes == [], "the watchdog exited although its own rank was reporting its error"


def test_a_watched_phase_that_outlasts_the_timeout_ends_the_rank(capfd: pytest.CaptureFixture[str]) -> None:
    exits = Exits()
    (w0, w1) = watchdogs(2, exits, grace_s=0.0)
    w0.timeout_s = w1.timeout_s = 0.3
    w1.enter("checkpoint after step 4", watched=False)  # unwatched: only rank 0 can stall
    w0.enter("step 7")
    deadline = time.monotonic() + 5
    while len(exits.codes) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert exits.codes == [1, 1], "the stalled rank exits, and the other learns it from the store"
    err = capfd.readouterr().err
    assert "[flatlm rank 0] no progress for 0.27 s (parallel.timeout_s=0.3) in step 7" in err
    assert "[flatlm rank 1] stopping in checkpoint after step 4: rank 0 (" in err, err
    posted = w1.posted()
    assert posted is not None and posted.rank == 0 and posted.phase == "step 7"


def test_the_stall_message_names_the_silent_and_the_lagging_rank(capfd: pytest.CaptureFixture[str]) -> None:
    """From the heartbeats: a rank whose watchdog went quiet (stopped process) and one still in an earlier step."""
    exits = Exits()
    w0, w1, w2 = watchdogs(3, exits, grace_s=5.0, beat_s=0.05)
    w0.timeout_s = 0.6
    for w in (w1, w2):
        w.timeout_s = 30.0
    w0.enter("step 8")
    w1.enter("step 8", watched=False)
    w2.enter("step 7", watched=False)  # alive, beating, but a step behind
    time.sleep(0.15)
    w1.stop()  # rank 1's process "stops": no more heartbeats
    assert exits.event.wait(5)
    err = capfd.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("[flatlm rank 0] no progress"))
    assert "; rank 1 not heard from for " in line and "(last in step 8)" in line, line
    assert "; rank 2 in step 7" in line, line
    assert "rank 0 " not in line.split("slow", 1)[1], line  # never blames itself
    w2.stop()


def test_time_spent_suspended_is_not_a_stall() -> None:
    """The whole job stopped (SIGSTOP, scontrol suspend) and resumed: the clock jumps while the watchdog thread
    sleeps; that time is not counted. The control: the same watchdog still ends a phase that then truly lasts."""
    exits = Exits()
    offset = [0.0]
    w0, w1 = watchdogs(2, exits, grace_s=5.0, clock=lambda: time.monotonic() + offset[0])
    w0.timeout_s = 1.0
    w0.enter("step 3")
    time.sleep(0.1)
    offset[0] += 100.0  # 100 s suspended, far beyond the timeout
    time.sleep(0.5)
    assert exits.codes == [], "the watchdog counted a suspension as a stall"
    assert w0._suspended_s > 99
    assert exits.event.wait(5), "after resuming, a phase that outlasts the timeout still ends the rank"
    w0.stop()
    w1.stop()


def test_an_unwatched_or_advancing_phase_is_never_ended() -> None:
    exits = Exits()
    (w0,) = watchdogs(1, exits)  # one process: no thread at all
    assert w0._thread is None
    w0, w1 = watchdogs(2, exits)
    w0.timeout_s = 0.2
    for step in range(10):  # each phase is shorter than the timeout
        w0.enter(f"step {step}")
        time.sleep(0.05)
    w0.enter("evaluation", watched=False)
    time.sleep(0.4)
    w0.stop()
    w1.stop()
    assert exits.codes == []


def test_describe_names_the_timeout_setting() -> None:
    text = describe(RuntimeError("[gloo] Timed out waiting 6000ms for recv operation to complete"), 6)
    assert text.startswith("RuntimeError: [gloo] Timed out") and "parallel.timeout_s=6 s" in text
    assert describe(ValueError("x\nsecond line"), 6) == "ValueError: x"
    assert str(Failure(1, "node7", "step 3", "ValueError: x")) == "rank 1 (node7) failed in step 3: ValueError: x"


SCRIPT = textwrap.dedent(
    """
    import os, sys, time, datetime
    import torch, torch.distributed as dist
    from flatlm.parallel.failures import Watchdog
    rank, init, post = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "post"
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    watchdog = Watchdog(rank, 2, 120.0, poll_s=0.1, grace_s=0.5).start()
    watchdog.enter("step 3")
    if rank == 1:
        if post:
            watchdog.fail(RuntimeError("planted failure"))
        print("ready", flush=True)
        time.sleep(60)  # alive: gloo's peer-closed error never comes
    else:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    """
)


def _pair(tmp_path: Path, post: bool) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    script = tmp_path / "pair.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "init"), "post" if post else "wait"]
    return tuple(  # type: ignore[return-value]
        subprocess.Popen(
            [sys.executable, str(script), str(r), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )
        for r in (0, 1)
    )


@pytest.mark.timeout(120)
def test_a_blocked_rank_exits_within_seconds_of_its_peers_failure(tmp_path: Path) -> None:
    runs = {}
    for post in (True, False):
        (tmp_path / str(post)).mkdir()
        runs[post] = _pair(tmp_path / str(post), post)
    try:
        for _, rank1 in runs.values():
            assert rank1.stdout is not None and rank1.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        rank0, _ = runs[True]
        code = rank0.wait(timeout=30)
        took = time.monotonic() - t0
        err = rank0.stderr.read() if rank0.stderr else ""
        assert code == 1, err
        assert took < 5, f"rank 0 took {took:.1f} s to stop"
        assert "[flatlm rank 0] stopping in step 3: rank 1 (" in err and "RuntimeError: planted failure" in err, err
        control, _ = runs[False]  # the same pair with nothing posted: still blocked (the watchdog ended the first)
        time.sleep(max(0.0, 3 - (time.monotonic() - t0)))
        assert control.poll() is None, control.stderr.read() if control.stderr else ""
    finally:
        for pair in runs.values():
            for proc in pair:
                proc.kill()
                proc.communicate()


def test_a_relayed_stop_request_is_not_a_second_signal() -> None:
    """SIGTERM twice (srun plus torchrun's forwarding), SIGINT twice at once, and SIGINT then SIGTERM at once (the
    DeepSpeed launcher's workers get the terminal's Ctrl-C and then its SIGTERM) are one request; a SIGTERM repeated
    late still is; a SIGINT after a SIGTERM, or a SIGINT well after a SIGINT, is a real second signal."""
    assert _relayed(signal.SIGTERM, signal.SIGTERM, 60.0)
    assert _relayed(signal.SIGINT, signal.SIGINT, 0.01) and not _relayed(signal.SIGINT, signal.SIGINT, 2.0)
    assert _relayed(signal.SIGINT, signal.SIGTERM, 0.01) and not _relayed(signal.SIGINT, signal.SIGTERM, 2.0)
    assert not _relayed(signal.SIGTERM, signal.SIGINT, 0.0)
    pairs = ((signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT), (signal.SIGINT, signal.SIGTERM))
    for first, second in pairs:
        with Preemption() as p:
            os.kill(os.getpid(), first)
            time.sleep(0.05)
            os.kill(os.getpid(), second)  # would kill the test process if taken as a second signal
            time.sleep(0.05)
            assert p.signal == first and p.requested
    acted: list[int] = []
    with Preemption() as p:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(RELAY_WINDOW_S + 0.1)
        previous = signal.getsignal(signal.SIGINT)
        import flatlm.train.preemption as preemption

        real_kill = preemption.os.kill
        preemption.os.kill = lambda pid, s: acted.append(s)  # type: ignore[assignment]
        try:
            p._handle(signal.SIGINT, None)  # a second Ctrl-C a while later: acts at once
        finally:
            preemption.os.kill = real_kill  # type: ignore[assignment]
            signal.signal(signal.SIGINT, previous)
    assert acted == [signal.SIGINT]
