"""A failing or hung rank ends the whole job: in seconds after an exception, within ``parallel.timeout_s`` when a
rank hangs, each time with a message naming the rank and the step, and with ``latest`` naming a complete checkpoint.

Both jobs run 2 gloo processes under ``accelerate launch`` with a planted fault (``tests.launch.faulty``).

* Rank 1 raises as step 4 starts and keeps a non-daemon thread alive, so its process does not end by returning.
  gloo sees nothing wrong while the process lives; before flatlm's fail-fast, rank 0 waited in that step's
  all-reduce for the whole process-group timeout (120 s here; 600 s by default). Measured on 2 cores: the launcher
  exits about 1-3 s after the raise. The bound is 15 s, far below the 120 s the old behaviour would take.
* Rank 1 SIGSTOPs itself as the checkpoint of step 4 starts being written: rank 0 waits in the save's collectives
  and ends within the timeout naming "after step 4"; ``latest`` still names step 2, complete, and no step-4
  directory exists (the partial save's temporary directory is removed by the next start).
* Rank 1 SIGSTOPs itself as step 5 starts, so it neither errs nor exits. Rank 0 must say so, naming step 5 and
  ``parallel.timeout_s``, within that timeout (6 s, plus 5 s of slack), and then exit. The launcher then reaps the
  stopped worker. torch 2.13's agent sends SIGTERM (which a stopped process cannot act on) and SIGKILL 30 s later;
  ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` does not shorten this path. Across nodes, ``srun --kill-on-bad-exit=1`` (in
  the SLURM template) ends the other nodes' launchers. ``latest`` names step 4, the last checkpoint written before
  the hang, and it loads whole.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flatlm.train.checkpoint import CHECKPOINT_DIR, LATEST
from flatlm.train.inspect import final_state
from tests.launch.jobs import run_args, start

TIMEOUT_S = 6
REAP_S = 30  # torch 2.13's elastic agent gives a failed group's other workers 30 s before SIGKILL (not configurable)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_ranks_exception_or_hang_ends_the_job_naming_rank_and_step(tmp_path: Path, corpus: Path) -> None:
    common = {"train.max_steps": 8, "checkpoint.every": 2}
    raised = start(
        "raise",
        tmp_path,
        run_args(tmp_path / "raise", corpus, **common, **{"parallel.timeout_s": 120}),
        fault="1:4:linger",
    )
    hung = start(
        "stop",
        tmp_path,
        run_args(tmp_path / "stop", corpus, **common, **{"parallel.timeout_s": TIMEOUT_S}),
        fault="1:5:stop",
    )
    in_save = start(
        "savestop",
        tmp_path,
        run_args(tmp_path / "savestop", corpus, **common, **{"parallel.timeout_s": TIMEOUT_S}),
        fault="1:4:savestop",
    )
    said: float | None = None  # when rank 0 said the hang (the stopped worker is reaped later, see above)
    try:
        deadline = time.time() + 150
        while any(j.proc.poll() is None for j in (raised, hung, in_save)) and time.time() < deadline:
            if said is None and "parallel.timeout_s" in hung.text():
                said = time.time()
            for job in (raised, hung, in_save):
                if job.ended is None and job.proc.poll() is not None:
                    job.ended = time.time()
            time.sleep(0.1)
        codes = {"raise": raised.wait(1), "stop": hung.wait(1), "savestop": in_save.wait(1)}
    finally:
        for job in (raised, hung, in_save):
            job.kill()

    text = raised.text()
    assert codes["raise"] != 0, text[-3000:]
    took = raised.ended - raised.fault_at()  # type: ignore[operator]
    assert took < 15, f"the job ended {took:.1f} s after rank 1 raised:\n{text[-3000:]}"
    assert "RuntimeError: planted failure on rank 1 at step 4" in text  # rank 1's own traceback
    assert "rank 0 stopped: rank 1 (" in text or "[flatlm rank 0] stopping in step 4: rank 1 (" in text, text[-3000:]
    assert "failed in step 4: RuntimeError: planted failure on rank 1 at step 4" in text

    text = hung.text()
    assert codes["stop"] != 0, text[-3000:]
    assert said is not None, text[-3000:]
    took = said - hung.fault_at()
    assert TIMEOUT_S - 1 < took < TIMEOUT_S + 5, f"rank 0 said the hang {took:.1f} s after rank 1 stopped"
    took = hung.ended - hung.fault_at()  # type: ignore[operator]
    assert took < TIMEOUT_S + REAP_S + 10, f"the job ended {took:.1f} s after rank 1 stopped:\n{text[-3000:]}"
    assert "in step 5" in text and "parallel.timeout_s" in text, text[-3000:]
    assert "rank 1 not heard from for " in text, text[-3000:]  # the heartbeats name the stopped rank
    root = tmp_path / "stop" / CHECKPOINT_DIR
    assert (root / LATEST).read_text().strip() == "step-4"
    assert final_state(tmp_path / "stop")  # complete: weights and optimizer state load (what a resume reads)

    text = in_save.text()  # rank 1 stopped inside the save of step 4: rank 0 waits in the save's collectives
    assert codes["savestop"] != 0, text[-3000:]
    took = in_save.ended - in_save.fault_at()  # type: ignore[operator]
    assert took < TIMEOUT_S + REAP_S + 10, f"the job ended {took:.1f} s after rank 1 stopped in its save"
    assert "after step 4" in text and "parallel.timeout_s" in text, text[-3000:]
    root = tmp_path / "savestop" / CHECKPOINT_DIR
    assert (root / LATEST).read_text().strip() == "step-2", "latest moved to the save that never completed"
    assert not (root / "step-4").exists()
    assert final_state(tmp_path / "savestop")
