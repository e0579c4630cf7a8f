"""Many short flatlm runs (1 or more gloo processes each) from one warm Python: the checkpoint tests' launcher.

Starting ``python -m flatlm.train`` costs seconds of imports (torch, transformers, deepspeed) per process; the
resume and kill tests need dozens of runs. This driver imports everything once, then forks each run's ranks
(``RANK``/``WORLD_SIZE``/``MASTER_PORT`` set as torchrun would, stderr to a file per rank) and acts as their
launcher: it waits for them, and when one rank ends it gives the others ``grace_s`` seconds before killing
them, reporting that they hung. The parent never runs torch code, so forking is safe.

A job can also be killed on purpose inside saves (``kill_in_save``, see ``_kill_rounds``): the driver polls the
run's checkpoint directory for the ``.step-N.tmp`` directory a save writes into, sleeps a random offset,
SIGKILLs every rank, records where the save was when the kill landed, and restarts the run, many times.
Faults can be planted in one rank's save (``fault``, see ``_plant_fault``).

Usage: ``python -m tests.train.forked JOBS.json RESULTS.json`` (the tests call ``run_jobs``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_jobs(jobs: list[dict[str, Any]], workdir: Path, timeout: float = 600) -> list[dict[str, Any]]:
    """Run ``jobs`` in one fresh driver process; returns one result per job (see ``_run_job``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec, results = workdir / "jobs.json", workdir / "results.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.train.forked", str(spec), str(results)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"driver failed:\n{proc.stderr[-4000:]}"
    return json.loads(results.read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(
    args: list[str],
    nproc: int,
    logs: Path,
    env: dict[str, str],
    fault: dict[str, Any] | None = None,
    call: dict[str, Any] | None = None,
) -> list[int]:
    """Fork ``nproc`` ranks of ``python -m flatlm.train ARGS`` (or of ``call``'s function with ARGS); returns
    their pids."""
    port = str(_free_port())
    pids = []
    for rank in range(nproc):
        log = logs / f"rank{rank}.log"
        pid = os.fork()
        if pid == 0:  # the child: become one rank, never return into the driver
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 2)
                os.dup2(fd, 1)
                os.environ.update(env)
                if nproc > 1:
                    os.environ.update(
                        RANK=str(rank),
                        LOCAL_RANK=str(rank),
                        WORLD_SIZE=str(nproc),
                        LOCAL_WORLD_SIZE=str(nproc),
                        MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port,
                    )
                if fault:
                    _plant_fault(fault, rank)
                if call:
                    import importlib

                    module, name = call["function"].split(":")
                    code = getattr(importlib.import_module(module), name)(args, *call.get("args", []))
                else:
                    from flatlm.train.cli import run_train

                    code = run_train(args, "python -m flatlm.train")
            except BaseException:  # anything: report it in the rank's log and exit non-zero
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    return pids


def _plant_fault(fault: dict[str, Any], rank: int) -> None:
    """Make save number ``fault["save"]`` (1-based) fail on rank ``fault["rank"]`` only, with ENOSPC
    (``"error": "enospc"``) or a plain exception, in ``fault["where"]``: ``dcp`` (DCP's file writes), ``rng`` (the
    RNG file, after DCP), ``engine`` (DeepSpeed's optimizer-state files: torch.save's RuntimeError) or ``recovery``
    (rank 0's copy of DeepSpeed's recovery scripts); or plant a non-atomic save
    (``"where": "early-latest"``, every save of that rank); or make that rank alone refuse its checkpoint load
    with a FlatlmError after loading it (``"where": "refuse-load"``, as DeepSpeed's per-rank load result can)."""
    if rank != fault["rank"]:
        return
    calls = [0]

    def fail_on_nth(real: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if fault["where"] != "engine" or "optim_states" in str(args[-1]):
                calls[0] += 1
                if calls[0] == fault["save"]:
                    if fault["error"] == "enospc" and fault["where"] == "engine":  # torch.save on a full disk
                        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
                    if fault["error"] == "enospc":
                        raise OSError(28, "No space left on device")
                    raise RuntimeError("a planted failure")
            return real(*args, **kwargs)

        return wrapped

    if fault["where"] == "refuse-load":
        import flatlm.train.checkpoint as checkpoint
        from flatlm.errors import FlatlmError

        real_load = checkpoint.load_checkpoint

        def load_then_refuse(*args: Any, **kwargs: Any) -> Any:  # after the load's own collectives, as DeepSpeed
            real_load(*args, **kwargs)
            raise FlatlmError(f"a planted refusal on rank {rank}")

        checkpoint.load_checkpoint = load_then_refuse
    elif fault["where"] == "early-latest":  # a planted non-atomic save: latest names step N before it is written
        import flatlm.train.checkpoint as checkpoint

        real_write_parts = checkpoint._write_parts

        def write_parts_after_latest(tmp: Path, *args: Any) -> None:
            step = tmp.name[len(".step-") : -len(".tmp")]
            (tmp.parent / "latest").write_text(f"step-{step}\n")
            real_write_parts(tmp, *args)

        checkpoint._write_parts = write_parts_after_latest
    elif fault["where"] == "dcp":
        from torch.distributed.checkpoint.filesystem import _FileSystemWriter

        _FileSystemWriter.write_data = fail_on_nth(_FileSystemWriter.write_data)
    elif fault["where"] == "rng":
        import flatlm.train.checkpoint as checkpoint

        checkpoint.rng_state = fail_on_nth(checkpoint.rng_state)
    elif fault["where"] == "recovery":  # rank 0's copy of DeepSpeed's recovery scripts (shutil, not the engine)
        from deepspeed.runtime.engine import DeepSpeedEngine

        DeepSpeedEngine._copy_recovery_script = fail_on_nth(DeepSpeedEngine._copy_recovery_script)
    else:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        TorchCheckpointEngine.save = fail_on_nth(TorchCheckpointEngine.save)


def _wait(pids: list[int], timeout: float, grace_s: float) -> tuple[list[int | None], bool, float]:
    """Wait for every rank; once one has ended, the rest get ``grace_s`` seconds. Returns (exit codes, whether
    some had to be killed, seconds between the first and the last rank ending)."""
    codes: dict[int, int | None] = {}
    start, first_end = time.time(), None
    hung = False
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                first_end = first_end or time.time()
        now = time.time()
        if len(codes) < len(pids) and (now - start > timeout or (first_end and now - first_end > grace_s)):
            hung = True
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    codes[pid] = None
        time.sleep(0.01)
    spread = (time.time() - first_end) if first_end else 0.0
    return [codes[p] for p in pids], hung, spread


def _ended(pids: list[int]) -> bool:
    """Whether some rank has exited, without reaping it (``_wait`` collects the exit codes)."""
    return any(os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None for pid in pids)


def _save_phase(checkpoints: Path, step: int) -> str:
    """Where the save of ``step`` stood: 'writing' (its .tmp directory still there), 'renamed' (step-N in place,
    ``latest`` not yet naming it), 'done'."""
    if (checkpoints / f".step-{step}.tmp").exists():
        return "writing"
    latest = checkpoints / "latest"
    if not latest.is_file() or latest.read_text().strip() != f"step-{step}":
        return "renamed"
    return "done"


def _complete(checkpoints: Path) -> tuple[str | None, bool]:
    """The checkpoint ``latest`` names and whether it is complete (trainer state plus DCP metadata or DeepSpeed's
    engine directory)."""
    latest = checkpoints / "latest"
    if not latest.is_file():
        return None, False
    name = latest.read_text().strip()
    ckpt = checkpoints / name
    done = (ckpt / "trainer_state.json").is_file() and (
        (ckpt / "state" / ".metadata").is_file() or (ckpt / "deepspeed" / "state").is_dir()
    )
    return name, done


def _next_save(checkpoints: Path, pids: list[int], timeout: float) -> int | None:
    """Wait for a new ``.step-N.tmp`` directory (a save starting); returns N (None: the run ended first)."""
    seen = {p.name for p in checkpoints.iterdir()} if checkpoints.is_dir() else set()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if checkpoints.is_dir():
            for p in checkpoints.iterdir():
                if p.name.startswith(".step-") and p.name.endswith(".tmp") and p.name not in seen:
                    return int(p.name[len(".step-") : -len(".tmp")])
        if _ended(pids):
            return None
        time.sleep(0.001)
    return None


def _kill_rounds(job: dict[str, Any], logs: Path, rng: random.Random) -> list[dict[str, Any]]:
    """Start the run, kill every rank at a random moment of a save, restart it (it resumes), until ``kills`` kills
    have landed inside a save (at most ``max_rounds`` rounds).

    The first round first times ``calibrate`` saves (from the .tmp directory appearing to ``latest`` naming the
    new checkpoint); kills then land uniformly in [0, that median] after a save starts. Each round records the
    save's step, the phase the kill landed in (``_save_phase``), the checkpoint ``latest`` names afterwards and
    whether it is complete, and rank 0's log (which says what it resumed from)."""
    kill = job["kill_in_save"]
    checkpoints = Path(kill["output_dir"]) / "checkpoints"
    nproc = job.get("nproc", 1)
    rounds: list[dict[str, Any]] = []
    durations: list[float] = []
    inside = 0
    for i in range(kill["max_rounds"]):
        if inside == kill["kills"]:
            break
        round_logs = logs / f"round{i}"
        round_logs.mkdir(parents=True, exist_ok=True)
        started = time.time()
        pids = _start(job["args"], nproc, round_logs, job.get("env", {}), job.get("fault"))
        while len(durations) < kill.get("calibrate", 3):
            step = _next_save(checkpoints, pids, 300)
            if step is None:
                break
            t0 = time.time()
            while _save_phase(checkpoints, step) != "done" and time.time() - t0 < 60:
                time.sleep(0.0005)
            durations.append(time.time() - t0)
        # 0.8: the kill must land before ``latest`` is replaced, despite the poll's and the sleep's latency
        window = 0.8 * sorted(durations)[len(durations) // 2] if durations else 0.05
        step = _next_save(checkpoints, pids, 300)
        offset = rng.uniform(0.0, window)
        if step is not None:
            time.sleep(offset)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        codes = []
        for pid in pids:
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        latest, complete = _complete(checkpoints)
        phase = _save_phase(checkpoints, step) if step is not None else "no save seen"
        inside += phase in ("writing", "renamed")
        rounds.append(
            {
                "step": step,
                "phase": phase,
                "offset_s": offset,
                "window_s": window,
                "latest": latest,
                "complete": complete,
                "codes": codes,
                "round_s": time.time() - started,
                "log": (round_logs / "rank0.log").read_text(errors="replace"),
            }
        )
    return rounds


def _send_signals(signals: list[dict[str, Any]], pids: list[int]) -> list[str]:
    """Send each ``{"sig", "rank", "when", "delay_s"}`` in turn: ``when`` is ``{"steps": N, "metrics": PATH}``
    (once the run has logged N steps) or ``{"save": CHECKPOINTS_DIR}`` (once a save's .tmp directory appears).
    Returns what was done, for the test's messages."""
    done = []
    for entry in signals:
        when = entry["when"]
        deadline = time.time() + 120
        while time.time() < deadline:
            if _ended(pids):
                return [*done, "a rank ended before the signal"]
            if "steps" in when:
                path = Path(when["metrics"])
                if path.is_file() and len(path.read_text().splitlines()) >= when["steps"]:
                    break
            elif any(p.name.endswith(".tmp") for p in Path(when["save"]).glob(".step-*")):
                break
            time.sleep(0.001)
        time.sleep(entry.get("delay_s", 0.0))  # two identical signals closer than this may arrive as one
        os.kill(pids[entry.get("rank", 0)], entry["sig"])
        done.append(f"signal {entry['sig']} to rank {entry.get('rank', 0)} at {when}")
    return done


def _run_job(job: dict[str, Any], index: int, workdir: Path, rng: random.Random) -> dict[str, Any]:
    """One job: ``args`` (flatlm.train arguments), ``nproc``; optional ``env``, ``grace_s`` (default 20), ``fault``,
    ``call`` ({"function": "module:name", "args": [...]}: run that instead of flatlm.train, with ARGS first),
    ``kill_in_save`` ({"output_dir", "kills", "max_rounds", "calibrate"}). Result: exit codes, hung, spread_s,
    each rank's log text; for kills, one record per round."""
    logs = workdir / f"job{index}"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if "kill_in_save" in job:
        return {"rounds": _kill_rounds(job, logs, rng), "wall_s": time.time() - t0}
    pids = _start(job["args"], job.get("nproc", 1), logs, job.get("env", {}), job.get("fault"), job.get("call"))
    result: dict[str, Any] = {}
    if "signals" in job:
        result["signals"] = _send_signals(job["signals"], pids)
    codes, hung, spread = _wait(pids, job.get("timeout", 300), job.get("grace_s", 20.0))
    result.update(codes=codes, hung=hung, spread_s=spread, wall_s=time.time() - t0)
    result["logs"] = [(logs / f"rank{r}.log").read_text(errors="replace") for r in range(job.get("nproc", 1))]
    return result


def main(spec: str, out: str) -> None:
    import importlib

    # imported once here, before forking: everything the runs import (their own imports are then free)
    for name in (
        "torch",
        "deepspeed",
        "deepspeed.runtime.engine",
        "transformers.models.llama.modeling_llama",
        "torch.distributed.checkpoint.state_dict",
        "torch.distributed.fsdp",
        "flatlm.train.loop",
        "flatlm.train.cli",
        "flatlm.train.inspect",
        "flatlm.optim.sam",
        "tests.train.runs",
    ):
        importlib.import_module(name)

    jobs = json.loads(Path(spec).read_text())
    workdir = Path(spec).parent
    rng = random.Random(0)
    results = [_run_job(job, i, workdir, rng) for i, job in enumerate(jobs)]
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
