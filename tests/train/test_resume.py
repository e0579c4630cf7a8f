"""Auto-resume from checkpoints: an interrupted run continues bit-identically (losses, final parameters and
every optimizer-state tensor, compared by name with ``flatlm.train.inspect.final_state``), on every backend and
for every optimizer family; resharding restores exactly the saved state.

Multi-process runs go through ``tests.train.forked`` (one warm interpreter forks each run's ranks), several
cases per driver, each case checked and reported on its own.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from flatlm.config import load_config
from flatlm.errors import FlatlmError
from flatlm.train.checkpoint import CHECKPOINT_DIR, LATEST
from flatlm.train.inspect import final_state
from flatlm.train.loop import train
from flatlm.train.metrics import read_jsonl
from tests.train.forked import run_jobs
from tests.train.runs import SAM_VARIANTS, assert_same_state, interrupt_after, overrides, state_differences


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]


def _check_resumed(full: Path, resumed: Path) -> list[str]:
    """What differs between an uninterrupted run and the same run resumed from step 3 (empty: identical)."""
    problems = []
    got = read_jsonl(resumed / "metrics.jsonl")
    if [r["step"] for r in got] != [1, 2, 3, 4, 5, 6]:
        problems.append(f"steps {[r['step'] for r in got]}")
    if _losses(resumed) != _losses(full):
        problems.append(f"losses {_losses(full)} vs {_losses(resumed)}")
    if [r["grad_norm"] for r in got] != [r["grad_norm"] for r in read_jsonl(full / "metrics.jsonl")]:
        problems.append("grad norms differ")
    diff = state_differences(final_state(full), final_state(resumed))
    if diff:
        problems.append(f"{len(diff)} state tensors differ: {diff[:5]}")
    return problems


def test_state_comparison_catches_a_dropped_or_changed_tensor(tmp_path: Path, text_corpus: Path) -> None:
    """The comparison the resume tests rely on fails on a missing optimizer tensor, a one-ulp change of one
    parameter element, and a state that lost its optimizer entries (planted bugs)."""
    out = tmp_path / "run"
    train(load_config(None, overrides(out, text_corpus, "adamw", **{"train.max_steps": 3})))
    state = final_state(out)
    assert_same_state(state, dict(state))
    dropped = {k: v for k, v in state.items() if k != "optim.model.norm.weight.exp_avg"}
    assert state_differences(state, dropped) == ["optim.model.norm.weight.exp_avg: only in the first"]
    nudged = dict(state)
    weight = state["model.model.layers.0.mlp.up_proj.weight"].clone()
    weight.view(-1)[7] = torch.nextafter(weight.view(-1)[7], torch.tensor(float("inf")))
    nudged["model.model.layers.0.mlp.up_proj.weight"] = weight
    assert len(state_differences(state, nudged)) == 1
    fresh = {k: (torch.zeros_like(v) if k.startswith("optim.") and "exp_avg" in k else v) for k, v in state.items()}
    assert len(state_differences(state, fresh)) == sum("exp_avg" in k for k in state)


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw", "adafactor", "lion", "muon", *SAM_VARIANTS])
def test_interrupted_run_resumes_bit_identical(tmp_path: Path, text_corpus: Path, optim: str) -> None:
    full = tmp_path / "full"
    train(load_config(None, overrides(full, text_corpus, optim)))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    interrupt_after(resumed, 3)
    result = train(load_config(None, overrides(resumed, text_corpus, optim)))
    assert len(result.losses) == 3  # steps 4-6 only
    assert _check_resumed(full, resumed) == []
    assert [r["lr"] for r in read_jsonl(resumed / "metrics.jsonl")] == [
        r["lr"] for r in read_jsonl(full / "metrics.jsonl")
    ]
    assert [r["step"] for r in read_jsonl(resumed / "eval.jsonl")] == [3, 6]
    if optim == "looksam":  # its reused gradient component is part of the saved, compared state
        assert any(k.endswith(".sam_g_v") for k in final_state(resumed))


@pytest.mark.slow
def test_raising_max_steps_continues_a_finished_run(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, overrides(out, text_corpus, "adamw", **{"train.max_steps": 3})))
    result = train(load_config(None, overrides(out, text_corpus, "adamw", **{"train.max_steps": 5})))
    assert len(result.losses) == 2
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    again = train(load_config(None, overrides(out, text_corpus, "adamw", **{"train.max_steps": 5})))
    assert again.losses == []  # already done: nothing to run, nothing rewritten
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]


TWO_PROCESS = {
    "ddp": ["muon", "looksam"],
    "ddp-owned": ["adamw", "adafactor", "muon", "looksam", "gsam"],
    "fsdp2": ["adamw", "adafactor", "lion", "muon", "sam", "asam", "ssam", "gsam", "looksam", "esam"],
    # a SAM variant that rewrites the final gradient or keeps state per ZeRO stage (gsam, looksam, ssam): their
    # gradients go back through write_pending_grads, LookSAM's g_v checkpoints with the partitions (also run by
    # hand, bit-identical: zero1 looksam, zero2 ssam, zero3 gsam; ~16 s a case, so 3 are kept here)
    "zero1": ["adamw", "sam", "gsam"],
    "zero2": ["adamw", "adafactor", "lion", "muon", "sam", "looksam"],
    "zero3": ["adamw", "asam", "ssam"],
}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", list(TWO_PROCESS))
def test_two_process_runs_resume_bit_identical(tmp_path: Path, text_corpus: Path, backend: str) -> None:
    """2 processes, each optimizer: uninterrupted vs resumed from step 3, losses, grad norms and the whole final
    state (weights and optimizer state by name) bit-identical."""
    optims = TWO_PROCESS[backend]
    full = [tmp_path / f"{o}-full" for o in optims]
    results = run_jobs(
        [{"args": overrides(f, text_corpus, o, backend), "nproc": 2} for f, o in zip(full, optims, strict=True)],
        tmp_path / "driver-full",
    )
    for o, r in zip(optims, results, strict=True):
        assert r["codes"] == [0, 0], f"{backend} {o}:\n{r['logs'][0][-3000:]}\n{r['logs'][1][-2000:]}"
    resumed = [tmp_path / f"{o}-resumed" for o in optims]
    for f, r in zip(full, resumed, strict=True):
        shutil.copytree(f, r)
        interrupt_after(r, 3)
    results = run_jobs(
        [{"args": overrides(r, text_corpus, o, backend), "nproc": 2} for r, o in zip(resumed, optims, strict=True)],
        tmp_path / "driver-resumed",
    )
    problems = {}
    for o, f, res, r in zip(optims, full, resumed, results, strict=True):
        if r["codes"] != [0, 0]:
            problems[o] = r["logs"][0][-2000:]
        elif f"resuming from {res / CHECKPOINT_DIR / 'step-3'} (step 3)" not in r["logs"][0]:
            problems[o] = "did not resume from step-3: " + r["logs"][0][-1000:]
        elif found := _check_resumed(f, res):
            problems[o] = "; ".join(found)
    assert not problems, f"{backend}: " + "\n".join(f"{o}: {p}" for o, p in problems.items())


RESHARD = [
    ("fsdp2", "single", "adafactor"),
    ("single", "fsdp2", "muon"),
    ("ddp", "single", "sam"),
    ("ddp-owned", "fsdp2", "looksam"),
    ("fsdp2", "ddp-owned", "adamw"),
]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resharded_resume_restores_exactly_the_saved_state(tmp_path: Path, text_corpus: Path) -> None:
    """A checkpoint written by one backend and number of processes, loaded by another as a resume loads it
    (``load_checkpoint``): the weights and optimizer state it then holds, read back by name, equal the saved ones
    bit for bit. Planted bug: the same load without the optimizer state must fail that comparison."""
    nproc = {"single": 1}
    runs = [tmp_path / f"{a}-to-{b}-{o}" for a, b, o in RESHARD]
    first = [
        {"args": overrides(r, text_corpus, o, a), "nproc": nproc.get(a, 2)}
        for r, (a, _, o) in zip(runs, RESHARD, strict=True)
    ]
    for run, r in zip(runs, run_jobs(first, tmp_path / "driver-first"), strict=True):
        assert r["codes"] == [0] * len(r["codes"]), f"{run.name}: {r['logs'][0][-3000:]}"

    def reload(run: Path, backend: str, optim: str, out: Path, load_optimizer: bool = True) -> dict:
        ckpt = str(run / CHECKPOINT_DIR / "step-6")
        call = {"function": "tests.train.runs:reload_and_resave", "args": [ckpt, str(out), load_optimizer]}
        return {"args": overrides(run, text_corpus, optim, backend), "nproc": nproc.get(backend, 2), "call": call}

    jobs = [reload(r, b, o, tmp_path / f"{r.name}-reloaded") for r, (_, b, o) in zip(runs, RESHARD, strict=True)]
    jobs.append(reload(runs[0], "single", "adafactor", tmp_path / "planted", load_optimizer=False))
    results = run_jobs(jobs, tmp_path / "driver-reload")
    problems = {}
    for run, r in zip(runs, results[:-1], strict=True):
        if r["codes"] != [0] * len(r["codes"]):
            problems[run.name] = r["logs"][0][-2000:]
        elif diff := state_differences(final_state(run), final_state(tmp_path / f"{run.name}-reloaded")):
            problems[run.name] = f"{len(diff)} tensors differ: {diff[:5]}"
    assert not problems, "\n".join(f"{k}: {v}" for k, v in problems.items())
    assert results[-1]["codes"] == [0], results[-1]["logs"][0][-2000:]
    planted = state_differences(final_state(runs[0]), final_state(tmp_path / "planted"))
    assert planted and all(d.startswith("optim.") for d in planted), planted[:5]


@pytest.mark.slow
def test_corrupt_checkpoint_falls_back_with_one_line(tmp_path: Path, text_corpus: Path) -> None:
    """A truncated newest checkpoint: one warning line naming the file and what is wrong, the older one used
    (bit-identical continuation); a sole unreadable checkpoint: only the clear error, no DCP internals."""
    full, broken, sole = tmp_path / "full", tmp_path / "broken", tmp_path / "sole"
    train(load_config(None, overrides(full, text_corpus, "adamw")))
    shutil.copytree(full, broken)
    train(load_config(None, overrides(sole, text_corpus, "adamw", **{"train.max_steps": 3})))
    for run, step in ((broken, 6), (sole, 3)):
        for shard in (run / CHECKPOINT_DIR / f"step-{step}" / "state").glob("*.distcp"):
            shard.write_bytes(shard.read_bytes()[:100])  # truncated, as a full disk leaves it
    jobs = [{"args": overrides(broken, text_corpus, "adamw")}]
    jobs.append({"args": overrides(sole, text_corpus, "adamw", **{"train.max_steps": 5})})
    fell_back, refused = run_jobs(jobs, tmp_path / "driver")
    log = fell_back["logs"][0]
    assert fell_back["codes"] == [0], log[-3000:]
    warning = [line for line in log.splitlines() if "cannot resume" in line]
    assert warning == [
        f"[flatlm] cannot resume from {broken / CHECKPOINT_DIR / 'step-6'} (state/__0_0.distcp is truncated "
        f"(100 of {(full / CHECKPOINT_DIR / 'step-6' / 'state' / '__0_0.distcp').stat().st_size:,} bytes)); "
        "trying step-3"
    ], log
    assert "Traceback" not in log
    assert _losses(broken) == _losses(full)
    assert_same_state(final_state(full), final_state(broken))
    assert (broken / CHECKPOINT_DIR / LATEST).read_text().strip() == "step-6"  # rewritten, readable again
    log = refused["logs"][0]
    assert refused["codes"] == [2], log[-3000:]
    errors = [line for line in log.splitlines() if "error:" in line]
    assert errors == [
        f"python -m flatlm.train: error: no checkpoint in {sole / CHECKPOINT_DIR} can be read (step-3: "
        "state/__0_0.distcp is truncated (100 of "
        f"{(full / CHECKPOINT_DIR / 'step-3' / 'state' / '__0_0.distcp').stat().st_size:,} bytes)); "
        "pass overwrite=true to start the run over"
    ], log
    assert "Traceback" not in log and "torch/distributed" not in log, log


@pytest.mark.slow
def test_latest_or_files_missing(tmp_path: Path, text_corpus: Path) -> None:
    """``latest`` naming a directory that is gone, a checkpoint without trainer_state.json, one without an RNG
    file: each resumes from the newest complete checkpoint, bit-identically."""
    full = tmp_path / "full"
    train(load_config(None, overrides(full, text_corpus, "adamw")))
    cases = {
        "latest-missing": lambda ck: (shutil.rmtree(ck / "step-6"), (ck / LATEST).write_text("step-6\n")),
        "no-trainer-state": lambda ck: (ck / "step-6" / "trainer_state.json").unlink(),
        "no-rng": lambda ck: (ck / "step-6" / "rng-rank0.json").unlink(),
    }
    for name, damage in cases.items():
        run = tmp_path / name
        shutil.copytree(full, run)
        damage(run / CHECKPOINT_DIR)
        result = train(load_config(None, overrides(run, text_corpus, "adamw")))
        assert len(result.losses) == 3, name  # from step 3
        assert _losses(run) == _losses(full), name
        assert_same_state(final_state(full), final_state(run))


class _Exploit:
    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(tempfile.gettempdir()) / "flatlm-pickle-ran"


@pytest.mark.slow
def test_checkpoint_with_a_malicious_pickle_is_refused(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, overrides(out, text_corpus, "adamw", **{"train.max_steps": 3})))
    MARKER.unlink(missing_ok=True)
    (out / "checkpoints" / "step-3" / "state" / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(FlatlmError, match=r"no checkpoint in .* can be read \(step-3: .*asks to load posix.system"):
        train(load_config(None, overrides(out, text_corpus, "adamw", **{"train.max_steps": 5})))
    assert not MARKER.exists()  # the pickle never ran


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deepspeed_checkpoint_refusals_and_weights_only_check(tmp_path: Path, text_corpus: Path) -> None:
    """A ZeRO-2 checkpoint resumed with another stage or number of processes is refused with the reason; a
    malicious ``.pt`` in the newest one is refused unrun and the run falls back to the older one."""
    run = tmp_path / "run"
    (r,) = run_jobs([{"args": overrides(run, text_corpus, "adamw", "zero2"), "nproc": 2}], tmp_path / "d1")
    assert r["codes"] == [0, 0], r["logs"][0][-3000:]
    other_stage, other_world = tmp_path / "stage", tmp_path / "world"
    shutil.copytree(run, other_stage)
    shutil.copytree(run, other_world)
    evil = tmp_path / "evil"
    shutil.copytree(run, evil)
    interrupt_after(evil, 6)
    pt = evil / CHECKPOINT_DIR / "step-6" / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"x": _Exploit()}, pt)
    MARKER.unlink(missing_ok=True)
    max8 = {"train.max_steps": 8}
    jobs = [
        {"args": overrides(other_stage, text_corpus, "adamw", "zero1", **max8), "nproc": 2},
        {
            "args": overrides(other_world, text_corpus, "adamw", "zero2", **max8),
            "nproc": 4,
        },
        {"args": overrides(evil, text_corpus, "adamw", "zero2", **max8), "nproc": 2},
    ]
    stage, world, fell_back = run_jobs(jobs, tmp_path / "d2")
    for result, want in ((stage, "zero2 with 2 processes"), (world, "zero2 with 2 processes")):
        errors = [line for line in result["logs"][0].splitlines() if "error:" in line]
        assert result["codes"] == [2] * len(result["codes"]), result["logs"][0][-3000:]
        assert len(errors) == 1 and want in errors[0] and "same ZeRO stage and number of processes" in errors[0], errors
    assert "zero1 x 2 here" in stage["logs"][0] and "zero2 x 4 here" in world["logs"][0]
    assert fell_back["codes"] == [0, 0], fell_back["logs"][0][-3000:]
    assert "needs more than tensors to load" in fell_back["logs"][0] and "trying step-3" in fell_back["logs"][0]
    assert not MARKER.exists()  # never unpickled
    assert [r["step"] for r in read_jsonl(evil / "metrics.jsonl")] == list(range(1, 9))


@pytest.mark.slow
def test_switching_optimizer_needs_load_optimizer_false(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, overrides(out, text_corpus, "adamw", **{"train.max_steps": 3})))
    with pytest.raises(FlatlmError, match=r"holds a different run \(optim.name: 'adamw' -> 'lion'\).*load_optimizer"):
        train(load_config(None, overrides(out, text_corpus, "lion", **{"train.max_steps": 5})))
    with pytest.raises(FlatlmError, match=r"model.overrides.hidden_size: 64 -> 32"):
        train(load_config(None, overrides(out, text_corpus, "adamw", **{"model.overrides.hidden_size": 32})))
    extra = {"train.max_steps": 5, "checkpoint.load_optimizer": False, "optim.lr": 3e-4}
    result = train(load_config(None, overrides(out, text_corpus, "lion", **extra)))
    assert len(result.losses) == 2  # continued from step 3's weights with a fresh Lion
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[3]["lr"] < 3e-4  # the new optimizer's lr on the resumed schedule, not AdamW's 3e-3


@pytest.mark.slow
def test_keep_last_rotates_and_nan_loss_aborts(tmp_path: Path, text_corpus: Path) -> None:
    out = tmp_path / "run"
    extra = {"train.max_steps": 5, "checkpoint.every": 1, "checkpoint.keep_last": 2}
    train(load_config(None, overrides(out, text_corpus, "adamw", **extra)))
    assert sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir()) == ["latest", "step-4", "step-5"]
    assert (out / CHECKPOINT_DIR / LATEST).read_text().strip() == "step-5"
    nan = tmp_path / "nan"
    bad = {"optim.name": "sgd", "optim.lr": 1e12, "train.grad_clip": 0, "schedule.name": "constant"}
    with pytest.raises(FlatlmError, match=r"the loss became (nan|inf) at step (\d+); lower optim.lr"):
        train(load_config(None, overrides(nan, text_corpus, "sgd", **{**bad, "train.max_steps": 20})))
    assert not (nan / CHECKPOINT_DIR).exists() or not list((nan / CHECKPOINT_DIR).glob("step-*"))


@pytest.mark.slow
def test_failed_save_keeps_the_previous_checkpoint(
    tmp_path: Path, text_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed.checkpoint as dcp

    real_save, calls = dcp.save, []

    def save_until_disk_full(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", save_until_disk_full)
    out = tmp_path / "run"
    with pytest.raises(FlatlmError, match="saving checkpoint step-6 .* failed .*No space left.* are intact"):
        train(load_config(None, overrides(out, text_corpus, "adamw")))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-3"
    assert not list((out / "checkpoints").glob(".step-*"))  # nothing half-written left behind
    monkeypatch.setattr(dcp, "save", real_save)
    result = train(load_config(None, overrides(out, text_corpus, "adamw")))
    assert len(result.losses) == 3  # resumed from the intact step 3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ranks_fall_back_together_when_one_rank_cannot_load(tmp_path: Path, text_corpus: Path) -> None:
    """Rank 1's RNG file of step-6 is garbled (rank 0's is fine): each rank used to decide alone, rank 1 falling
    back to step-3 (a collective load) while rank 0 trained on from step 6. Both must fall back, bit-identically."""
    full = tmp_path / "full"
    (r,) = run_jobs([{"args": overrides(full, text_corpus, "adamw", "fsdp2"), "nproc": 2}], tmp_path / "d1")
    assert r["codes"] == [0, 0], r["logs"][0][-3000:]
    run = tmp_path / "run"
    shutil.copytree(full, run)
    (run / CHECKPOINT_DIR / "step-6" / "rng-rank1.json").write_text('{"python": ')
    (run / CHECKPOINT_DIR / LATEST).write_text("step-6\n")
    (r,) = run_jobs([{"args": overrides(run, text_corpus, "adamw", "fsdp2"), "nproc": 2}], tmp_path / "d2")
    assert r["codes"] == [0, 0] and not r["hung"], r["logs"][0][-3000:] + r["logs"][1][-2000:]
    log = r["logs"][0]
    assert f"cannot resume from {run / CHECKPOINT_DIR / 'step-6'} (rank 1: " in log, log[-3000:]
    assert f"resuming from {run / CHECKPOINT_DIR / 'step-3'} (step 3)" in log, log[-3000:]
    assert [x["step"] for x in read_jsonl(run / "metrics.jsonl")] == list(range(1, 7))  # steps 4-6 trained again
    assert _losses(run) == _losses(full)
    assert_same_state(final_state(full), final_state(run))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_refusal_on_one_rank_stops_every_rank(tmp_path: Path, text_corpus: Path) -> None:
    """Rank 1 alone refuses the checkpoint (a FlatlmError, as DeepSpeed's per-rank load result can raise): it used
    to raise at once, leaving rank 0 in the exchange of errors until the collective timeout. Both ranks must stop
    after the same exchange with the refusal's one-line error (exit 2), and nothing may be trained or written."""
    run = tmp_path / "run"
    (r,) = run_jobs([{"args": overrides(run, text_corpus, "adamw", "ddp"), "nproc": 2}], tmp_path / "d1")
    assert r["codes"] == [0, 0], r["logs"][0][-3000:]
    before = (run / "metrics.jsonl").read_text()
    fault = {"rank": 1, "where": "refuse-load"}
    (r,) = run_jobs(
        [{"args": [*overrides(run, text_corpus, "adamw", "ddp"), "train.max_steps=8"], "nproc": 2, "fault": fault}],
        tmp_path / "d2",
    )
    assert not r["hung"] and r["codes"] == [2, 2], (r["codes"], r["logs"][0][-2000:], r["logs"][1][-2000:])
    assert "error: a planted refusal on rank 1" in r["logs"][0], r["logs"][0][-2000:]  # rank 0 speaks for all
    assert (run / "metrics.jsonl").read_text() == before
