"""The SAM family holds constant memory over a long run on every backend (issue 12's leak).

SAM used to key its copy of w (and every variant's state) by tensor object; DeepSpeed's flat partitions read
through ``detach()`` and FSDP2/ZeRO's replica weights were new objects every step, so each step allocated one more
weight-sized buffer that was never freed (and LookSAM's g_v silently reset). Each case here runs ``STEPS`` optimizer
steps on 2 gloo ranks (one torchrun launch for all cases, ``tests.parallel.leak_probe`` recording after every step
on every rank) and checks that after ``WARMUP`` steps

    the number of SAM's scratch buffers and per-view state tensors, and their bytes, never change (exactly), and
    the process RSS grows by less than ``RSS_BOUND`` over the last ``STEPS - WARMUP`` steps.

Cases: sam, asam, looksam with global perturbation on ddp, fsdp2, zero1, zero2, zero3; sam and asam with replica
perturbation on ddp, fsdp2, zero1, zero2. The model is sized so that the old bug's smallest leak (one ZeRO
partition, half the weights, per step) exceeds ``RSS_BOUND`` many times over in those steps, and a planted bug
(fresh view keys every step, ``leak_plant``) fails both checks.

Measured on the 2-core machine (shared with other jobs), ``rss_growth`` over steps 10-50, 2 ranks: clean cases
at most 0.55 MiB (end minus step 10: 1.4 MiB); without ``MALLOC_MMAP_THRESHOLD_`` the same cases swung by up to
21 MiB. The planted bug: +2.0 MiB of SAM buffers per step on zero2 (one fp32 partition), rss_growth 63 MiB (81 MiB
end minus step 10); zero2 replica ASAM +4.0 MiB per step, 128 MiB (fsdp2 replica ASAM measured the same before
its transient views kept nothing). The code before the views (commit a37c84b, the
same probe): zero1/2/3 sam and asam +1 partition per step (+2.0 MiB, RSS +81 MiB over the 40 steps), fsdp2 and
zero1/2 replica sam and asam +1 whole weight copy per step (+4.0 MiB, RSS +163 MiB); ddp was clean.
Transient views (FSDP2's unsharded copies under replica perturbation) must hold nothing at all between steps: a
buffer keyed by a stable ``unsharded.*`` key is a whole weight copy per rank that no one frees (ASAM kept its copy
of w there: 263,168 bytes for a 256x256 Linear, the whole weights; measured by ``test_transient_views_keep_nothing``
against the previous asam.py; the fsdp2 replica cases here assert 0 bytes at every step, measured 0 on both ranks
over the 50 steps, where zero2 replica ASAM holds its kept copy of w, 4,230,144 bytes, constant). The planted
fresh-key bug runs on zero2, whose replica views are kept copies (transient ones keep nothing whatever their keys).
Runtime: the 25 cases take ~100 s in one launch (most of it DeepSpeed and FSDP2 set-up per case).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_documents, tiny_overrides
from tests.train.launching import _command, _env, run_in_session

STEPS, WARMUP, WINDOW = 50, 10, 5
MODEL = {  # one wide layer: 1.06M parameters (4.2 MB fp32), still milliseconds per step
    "model.overrides.num_hidden_layers": 1,
    "model.overrides.hidden_size": 256,
    "model.overrides.intermediate_size": 768,
    "model.overrides.num_attention_heads": 4,
    "model.overrides.num_key_value_heads": 4,
}
# glibc raises its mmap threshold after large frees and then keeps freed weight-sized blocks in the heap, so RSS
# swings by several such blocks from step to step; a fixed threshold returns them at once and RSS follows what is
# live (measured: module docstring).
ENV = {**_env(), "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
RSS_BOUND = 4 * 2**20  # bytes over the last 40 steps (measured: module docstring)

GLOBAL = [(b, o, "global") for b in ("ddp", "fsdp2", "zero1", "zero2", "zero3") for o in ("sam", "asam", "looksam")]
REPLICA = [(b, o, "replica") for b in ("ddp", "fsdp2", "zero1", "zero2") for o in ("sam", "asam")]
CASES = GLOBAL + REPLICA
PLANTED = [("zero2", "sam", "global"), ("zero2", "asam", "replica")]
TRANSIENT = {"fsdp2"}  # replica views there are this step's unsharded copies: nothing may be held between steps


def case_id(case: tuple[str, str, str], planted: bool = False) -> str:
    return "-".join(case) + ("-planted" if planted else "")


def _overrides(root: Path, corpus: Path, case: tuple[str, str, str]) -> list[str]:
    backend, optim, perturbation = case
    extra = {
        **MODEL,
        "parallel.backend": backend,
        "optim.name": optim,
        "optim.lr": 1e-3,
        "sam.perturbation": perturbation,
        "train.max_steps": STEPS,
        "train.global_batch_size": 4,
        "train.micro_batch_size": 2,
        "train.eval_every": 0,
        "data.val_fraction": 0.0,
        "data.seq_len": 16,
    }
    return tiny_overrides(root / "runs" / case_id(case), corpus, **extra)


@pytest.fixture(scope="module")
def leak_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("leaks")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(make_documents(60)):
        (corpus / f"doc{i:03d}.txt").write_text(doc)
    results = root / "results"
    results.mkdir()
    specs: list[dict[str, Any]] = [
        {"id": case_id(c), "overrides": _overrides(root, corpus, c), "plant": None} for c in CASES
    ]
    for c in PLANTED:
        overrides = _overrides(root / "planted", corpus, c)
        specs.append({"id": case_id(c, True), "overrides": overrides, "plant": None, "leak_plant": True})
    spec = results / "spec.json"
    spec.write_text(json.dumps({"results": str(results), "cases": specs}))
    r = run_in_session(_command("tests.parallel.leak_probe", [str(spec)], None, 2), 1200, "leak_probe", ENV)
    return results, (r.stderr or "")[-4000:]


def records(leak_runs: tuple[Path, str], cid: str) -> list[list[dict[str, int]]]:
    """Every rank's per-step records of case ``cid`` (fails with the case's traceback if it did not finish)."""
    results, stderr = leak_runs
    if not (results / f"{cid}.json").is_file():
        errs = sorted(results.glob(f"{cid}.rank*.err"))
        pytest.fail(f"{cid} did not finish:\n" + (errs[0].read_text()[-4000:] if errs else stderr))
    out = []
    for rank in (0, 1):
        lines = (results / f"{cid}.leak-rank{rank}.jsonl").read_text().splitlines()
        out.append([json.loads(line) for line in lines])
    return out


def rss_growth(recs: list[dict[str, int]]) -> int:
    """RSS growth over the last STEPS - WARMUP steps, robust to the allocator's step-to-step swings: the lowest RSS
    of the last WINDOW steps above the highest of the WINDOW steps after warm-up (a leak only grows)."""
    start = max(r["rss"] for r in recs[WARMUP : WARMUP + WINDOW])
    return min(r["rss"] for r in recs[-WINDOW:]) - start


def check_constant(per_rank: list[list[dict[str, int]]]) -> dict[str, int]:
    """Assert the held buffers are constant after warm-up and RSS growth is bounded; returns the worst growth."""
    worst = {"rss_growth": 0}
    for rank, recs in enumerate(per_rank):
        assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), f"rank {rank}: steps {len(recs)}"
        base = recs[WARMUP - 1]
        for r in recs[WARMUP:]:
            for key in ("buffers", "bytes", "state_tensors", "state_bytes"):
                assert r[key] == base[key], (
                    f"rank {rank}: SAM holds {key}={r[key]} after step {r['step']}, {base[key]} after step {WARMUP}"
                )
        growth = rss_growth(recs)
        worst["rss_growth"] = max(worst["rss_growth"], growth)
        assert growth < RSS_BOUND, f"rank {rank}: RSS grew by {growth / 2**20:.1f} MiB over the last {STEPS - WARMUP}"
    return worst


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_sam_memory_is_constant(leak_runs: tuple[Path, str], case: tuple[str, str, str]) -> None:
    per_rank = records(leak_runs, case_id(case))
    check_constant(per_rank)
    if case[1] == "looksam":  # its g_v lives from step to step (one per view) and is never reset
        assert all(recs[-1]["state_tensors"] > 0 for recs in per_rank)
    if case[2] == "replica" and case[0] in TRANSIENT:  # a kept copy would be the whole weights on every rank
        for rank, recs in enumerate(per_rank):
            held = [(r["step"], r["buffers"], r["bytes"]) for r in recs if r["buffers"] or r["bytes"]]
            assert not held, f"rank {rank}: SAM holds (step, buffers, bytes) {held[:3]} between steps"


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("case", PLANTED, ids=[case_id(c, True) for c in PLANTED])
def test_planted_fresh_keys_fail(leak_runs: tuple[Path, str], case: tuple[str, str, str]) -> None:
    """Fresh view keys every step (the old bug, reintroduced) make SAM's buffers grow: the check fails, and the
    leak (at least one copy of this rank's part of the weights per step) shows in RSS beyond the bound too."""
    per_rank = records(leak_runs, case_id(case, True))
    with pytest.raises(AssertionError, match="SAM holds"):
        check_constant(per_rank)
    grown = [recs[-1]["bytes"] - recs[WARMUP - 1]["bytes"] for recs in per_rank]
    assert min(grown) > 5 * RSS_BOUND, f"the planted leak held {grown} more bytes, not >> the RSS bound"
    rss = [rss_growth(recs) for recs in per_rank]
    assert min(rss) > 5 * RSS_BOUND, f"the planted leak grew RSS by only {rss} bytes"


@pytest.mark.parametrize("name", ["sam", "asam", "esam"])  # what compat runs with replica perturbation on fsdp2
def test_transient_views_keep_nothing(name: str) -> None:
    """In one process: transient views of a 256x256 Linear over 3 perturb/restore steps hold 0 scratch bytes after
    each restore, and move the weights exactly as the same views kept (non-transient) do. Fails on the previous
    ASAM (its copy of w, 263,168 bytes, stayed keyed by the view)."""
    import dataclasses

    import torch

    from flatlm.optim.registry import get_spec
    from flatlm.optim.views import plain_views

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256)
    cls = get_spec(name).cls()
    kwargs = {"beta": 1.0} if name == "esam" else {}  # every tensor moved, so the two runs compare every tensor

    def run(transient: bool) -> list[list[torch.Tensor]]:
        opt = cls(layer.parameters(), **kwargs)
        moved = []
        for step in range(3):
            copies = [p.detach().clone() for p in layer.parameters()]  # a backend's fresh copies, every step
            views = [
                dataclasses.replace(v, swappable=False, transient=transient)
                for v in plain_views([(f"unsharded.{i}", c) for i, c in enumerate(copies)])
            ]
            gen = torch.Generator().manual_seed(step)
            grads = [torch.randn(c.shape, generator=gen) for c in copies]
            assert opt.perturb_views(views, grads)
            moved.append([c.clone() for c in copies])
            opt.restore_views(views, [torch.randn(c.shape, generator=gen) for c in copies])
            if transient:
                assert opt.scratch_bytes() == (0, 0), f"{name} holds {opt.scratch_bytes()} after step {step}"
        return moved

    kept = run(False)
    for step, (a, b) in enumerate(zip(run(True), kept, strict=True)):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"{name} step {step}: transient w + eps differs")
        assert any(not torch.equal(x, w) for x, w in zip(a, layer.parameters(), strict=True))  # it did move
