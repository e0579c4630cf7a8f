"""The training options that could silently do nothing, each observed from inside the loop as users run it.

Every test drives ``flatlm.train.loop.train`` from a config (the user's path) and looks at the real steps through
``tests.train.step_probe`` (parameters before/after, the pre-clip gradient, matmul dtypes, sublayer calls, saved
activations, optimizer state). Each docstring names the bug it catches; each was checked by planting that bug
(the option made a no-op) and seeing the test fail.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from flatlm.config import load_config
from flatlm.train.loop import RunResult, train
from flatlm.train.metrics import read_jsonl
from tests.conftest import tiny_overrides
from tests.train.step_probe import Probe, StepRecord, launch_probed, load_records, probing

ONE_STEP = {"train.max_steps": 1, "train.eval_every": 0}
# One SGD step without momentum or weight decay at a constant lr: the update is exactly -lr * (clipped) gradient,
# so clipping is visible in it. (Adam's first step is lr * g / |g|: invariant to any rescaling of g, clipping
# included, so AdamW cannot show whether clipping ran.)
SGD = {
    "optim.name": "sgd",
    "optim.lr": 0.1,
    "optim.weight_decay": 0.0,
    "schedule.name": "constant",
    "schedule.warmup_steps": 0,
    "train.max_steps": 1,
    "train.eval_every": 0,
}


CLIP_LIMIT = 0.1  # below the tiny model's first-step global gradient norm (~1.2; asserted where it matters)
SHARDED = {"train.micro_batch_size": 2}  # 2 ranks x 2 micro-batches of 2 = the global batch of 8, as one process


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, Path]:
    """The 2-process cases of this module, run in one launch (one start-up): clipping under fsdp2 and zero2,
    bf16 under fsdp2. Returns each case's output directory; a case that failed left no records there."""
    root = tmp_path_factory.mktemp("sharded")
    cases = {
        "clip-fsdp2": ({**SGD, **SHARDED, "train.grad_clip": CLIP_LIMIT, "parallel.backend": "fsdp2"}, []),
        "clip-zero2": ({**SGD, **SHARDED, "train.grad_clip": CLIP_LIMIT, "parallel.backend": "zero2"}, []),
        "bf16-fsdp2": ({**ONE_STEP, **SHARDED, "train.bf16": True, "parallel.backend": "fsdp2"}, ["dispatch"]),
    }
    r = launch_probed([(tiny_overrides(root / name, corpus, **args), probe) for name, (args, probe) in cases.items()])
    (root / "launch.stderr").write_text(r.stderr[-3000:])  # for the failure message of a case that did not finish
    return {name: root / name for name in cases}


def _sharded_records(runs: dict[str, Path], case: str) -> list[StepRecord]:
    """Both ranks' single step of ``case``."""
    out = runs[case]
    assert (out / "probe-rank1.pt").is_file(), (
        f"case {case} did not finish:\n{(out.parent / 'launch.stderr').read_text()}"
    )
    return [load_records(out, rank)[0] for rank in (0, 1)]


def _run(out: Path, corpus: Path, probe: Probe, **extra: object) -> tuple[RunResult, list[StepRecord]]:
    """``train`` from config overrides (one step, evaluation only at the end, unless ``extra`` says otherwise)."""
    with probing(probe):
        result = train(load_config(None, tiny_overrides(out, corpus, **{**ONE_STEP, **extra})))
    assert probe.steps, "the probe saw no step: does flatlm.train.loop still call its train_step by that name?"
    return result, probe.steps


def _delta(step: StepRecord) -> dict[str, torch.Tensor]:
    return {n: step.after[n] - step.before[n] for n in step.before}


def _global_norm(grads: dict[str, torch.Tensor]) -> float:
    """The L2 norm over every gradient, in float64 (independent of flatlm's foreach norm)."""
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))


def _assert_update(delta: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert delta.keys() == expected.keys()
    for name in delta:
        torch.testing.assert_close(delta[name], expected[name].float(), rtol=1e-4, atol=atol, msg=name)


def _differs(delta: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> bool:
    try:
        _assert_update(delta, expected, atol)
    except AssertionError:
        return True
    return False


# An SGD update is p - lr g rounded to fp32: the difference after - before carries up to ~1 ulp of |p| <= ~1.
UPDATE_ATOL = 3e-7


# ---- gradient clipping --------------------------------------------------------------------------------------
def test_grad_clip_scales_the_update_by_limit_over_global_norm(tmp_path: Path, corpus: Path) -> None:
    """Catches: clipping that does nothing (or clips per tensor, or logs the post-clip norm).

    With ``train.grad_clip`` below the measured global norm n, one SGD step moves every parameter by
    -lr * (c / (n + 1e-6)) * g, with n computed here in float64 from the step's own pre-clip gradient; the
    logged grad_norm is n; a limit above n leaves the update bit-identical to no clipping at all.
    """
    _, (free,) = _run(tmp_path / "free", corpus, Probe(), **SGD, **{"train.grad_clip": 0})
    norm = _global_norm(free.grads)
    assert free.grad_norm == pytest.approx(norm, rel=1e-6)
    g, lr = free.grads, SGD["optim.lr"]
    _assert_update(_delta(free), {n: -lr * g[n] for n in g}, UPDATE_ATOL)  # the baseline: SGD is -lr g

    limit = norm / 8
    _, (clipped,) = _run(tmp_path / "clipped", corpus, Probe(), **SGD, **{"train.grad_clip": limit})
    for name in g:  # same weights, same batch: the same gradient before clipping
        torch.testing.assert_close(clipped.grads[name], g[name], rtol=0, atol=0)
    coef = limit / (norm + 1e-6)
    expected = {n: -lr * coef * g[n].double() for n in g}
    _assert_update(_delta(clipped), expected, UPDATE_ATOL)
    assert _differs(_delta(free), expected, UPDATE_ATOL)  # the comparison tells clipped from unclipped
    logged = read_jsonl(tmp_path / "clipped" / "metrics.jsonl")[0]["grad_norm"]
    assert logged == pytest.approx(norm, rel=1e-6) and logged > 7 * limit  # the pre-clip norm

    _, (loose,) = _run(tmp_path / "loose", corpus, Probe(), **SGD, **{"train.grad_clip": 8 * norm})
    for name in g:
        assert torch.equal(loose.after[name], free.after[name]), name


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["fsdp2", "zero2"])
def test_grad_clip_uses_the_global_norm_when_gradients_are_sharded(
    tmp_path: Path, corpus: Path, sharded_runs: dict[str, Path], backend: str
) -> None:
    """Catches: clipping by each rank's own shard norm, or not at all, when the gradients are sharded (FSDP2: half
    of every gradient per rank; ZeRO-2: DeepSpeed's own clipping of flat partitions, its norm read back).

    2 gloo processes: the step must still scale every gradient by c / (n + 1e-6) with n the norm of the whole
    global-batch gradient, which one process measures on the same global batch; both ranks see that n.
    """
    _, (single,) = _run(tmp_path / "single", corpus, Probe(), **SGD, **{"train.grad_clip": 0})
    norm, g, lr = _global_norm(single.grads), single.grads, SGD["optim.lr"]
    assert norm > 4 * CLIP_LIMIT
    ranks = _sharded_records(sharded_runs, f"clip-{backend}")
    for step in ranks:
        assert step.grad_norm == pytest.approx(norm, rel=1e-5)  # a per-shard norm is ~n / sqrt(2)
    expected = {n: -lr * (CLIP_LIMIT / (norm + 1e-6)) * g[n].double() for n in g}
    for step in ranks:  # the whole parameters each rank holds after the step (FSDP2: gathered from both shards)
        _assert_update(_delta(step), expected, UPDATE_ATOL)
    assert _differs({n: -lr * g[n] for n in g}, expected, UPDATE_ATOL)
    logged = read_jsonl(sharded_runs[f"clip-{backend}"] / "metrics.jsonl")[0]["grad_norm"]
    assert logged == pytest.approx(norm, rel=1e-5)


# ---- bf16 autocast ------------------------------------------------------------------------------------------
def _matmul_dtypes(step: StepRecord) -> set[torch.dtype]:
    return {d for _, dtypes in step.matmuls for d in dtypes}


def _min_matmuls(step: StepRecord, layers: int = 2) -> int:
    """Forward matmuls per step at least: 7 projections per block and the head, per micro-batch."""
    return step.num_micro_batches * (7 * layers + 1)


def test_bf16_runs_the_matmuls_in_bf16_and_keeps_fp32_weights_and_state(tmp_path: Path, corpus: Path) -> None:
    """Catches: train.bf16 ignored (matmuls in fp32), or bf16 done by casting the model (weights, gradients or
    AdamW moments in bf16, also in the checkpoint).

    A dispatch mode records the dtypes every matmul kernel receives during the real step (forward and
    backward); the fp32 run is the control that shows the recorder sees fp32 when it is there.
    """
    from torch.distributed.checkpoint import FileSystemReader

    _, (fp32,) = _run(tmp_path / "fp32", corpus, Probe(dispatch=True, grads=False))
    assert len(fp32.matmuls) >= _min_matmuls(fp32) and _matmul_dtypes(fp32) == {torch.float32}
    _, (step,) = _run(tmp_path / "bf16", corpus, Probe(dispatch=True, grads=False), **{"train.bf16": True})
    assert len(step.matmuls) >= _min_matmuls(step)
    assert _matmul_dtypes(step) == {torch.bfloat16}, [c for c in step.matmuls if torch.bfloat16 not in c[1]][:3]
    assert step.param_dtypes == {torch.float32}
    assert step.grad_dtypes == {torch.float32}
    assert step.state_dtypes == {torch.float32}  # AdamW's exp_avg, exp_avg_sq
    saved = FileSystemReader(str(tmp_path / "bf16" / "checkpoints" / "step-1" / "state")).read_metadata()
    dtypes = {m.properties.dtype for k, m in saved.state_dict_metadata.items() if hasattr(m, "properties")}
    assert dtypes == {torch.float32}, dtypes  # weights and moments (the step counters are fp32 scalars too)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bf16_under_fsdp2_computes_in_bf16_with_fp32_shards(sharded_runs: dict[str, Path]) -> None:
    """Catches: fsdp2 with train.bf16 computing in fp32, reducing gradients in bf16, or keeping bf16 shards /
    gradients / AdamW state (its MixedPrecisionPolicy must be bf16 compute, fp32 parameters, fp32 reduction)."""
    for step in _sharded_records(sharded_runs, "bf16-fsdp2"):
        assert len(step.matmuls) >= _min_matmuls(step) and _matmul_dtypes(step) == {torch.bfloat16}
        assert step.param_dtypes == {torch.float32}  # the local shards
        assert step.reductions and {d for _, ds in step.reductions for d in ds} == {torch.float32}  # fp32 reduction
        assert step.grad_dtypes == {torch.float32}
        assert step.state_dtypes == {torch.float32}


# ---- activation checkpointing -------------------------------------------------------------------------------
def test_activation_checkpointing_recomputes_blocks_and_keeps_the_gradient(tmp_path: Path, corpus: Path) -> None:
    """Catches: model.activation_checkpointing that enables nothing (no recomputation, all activations kept),
    or one that changes the gradient.

    With checkpointing every block's attention runs twice per micro-batch (forward, then again in backward),
    autograd keeps well under half the activation bytes outside the checkpointed blocks, and the accumulated
    gradient is bit-identical (recomputation replays the same deterministic CPU kernels).
    """
    _, (plain,) = _run(tmp_path / "plain", corpus, Probe())
    _, (ckpt,) = _run(tmp_path / "ckpt", corpus, Probe(), **{"model.activation_checkpointing": True})
    layers, micro = 2, plain.num_micro_batches
    assert plain.sublayer_calls["self_attn"] == layers * micro
    assert ckpt.sublayer_calls["self_attn"] == 2 * layers * micro
    assert ckpt.saved_bytes < 0.5 * plain.saved_bytes, (ckpt.saved_bytes, plain.saved_bytes)
    assert plain.grads.keys() == ckpt.grads.keys() and len(plain.grads) > 0
    for name in plain.grads:
        assert torch.equal(ckpt.grads[name], plain.grads[name]), name


# ---- torch.compile ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compile_runs_the_steps_through_dynamo_graphs(tmp_path: Path, corpus: Path) -> None:
    """Catches: model.compile that compiles nothing (an eager forward), compiles a module the step never calls,
    or recompiles every step; and a compiled forward whose losses leave eager's.

    The step's forward module must be ``torch.compile`` of the backend's module, and dynamo's counters must show
    its frames traced into one graph that the second step reuses. Inductor, as users get it: ~30 s of CPU cold,
    a few seconds after test_loop's compile test has filled inductor's FX-graph cache with the same graphs.
    """
    probe = dict(grads=False, saved=False, sublayers=False)  # hooks added per step would force recompiles
    eager, _ = _run(tmp_path / "eager", corpus, Probe(**probe), **{"train.max_steps": 2})
    torch._dynamo.reset()  # an earlier test's compiled frames would be reused without tracing (and counted 0)
    counters.clear()
    compiled, steps = _run(
        tmp_path / "compiled", corpus, Probe(**probe), **{"train.max_steps": 2, "model.compile": True}
    )
    assert [s.model_type for s in steps] == ["OptimizedModule"] * 2
    assert all(s.compiles_forward_module for s in steps)
    assert counters["frames"]["ok"] >= 1 and counters["stats"]["calls_captured"] > 0
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # step 2 reuses step 1's graph
    # Measured bit-identical here; inductor's fused CPU kernels may round differently on other machines.
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)


# ---- Adafactor in the loop ----------------------------------------------------------------------------------
def _per_lr(step: StepRecord) -> dict[str, torch.Tensor]:
    return {n: d.double() / step.lr for n, d in _delta(step).items()}


def test_adafactor_in_loop_default_steps_by_lr_times_schedule(tmp_path: Path, corpus: Path) -> None:
    """Catches: optim.name=adafactor in the loop (no optim.hparams, as users get it) ignoring optim.lr and the
    schedule (a relative step, or a parameter-scaled one).

    flatlm passes optim.lr and a schedule, so Adafactor defaults to relative_step=false, scale_parameter=false:
    step 1 moves each parameter by lr_1 * U_1, where U_1 (the clipped normalised gradient) does not depend on the
    lr. Two runs whose first-step lr differ 6x, once through optim.lr and once through the warmup, must give the
    same update per unit of lr.
    """
    base = {"optim.name": "adafactor", "train.max_steps": 1, "train.eval_every": 0, "optim.weight_decay": 0.0}
    warm = {"optim.lr": 1e-2, "schedule.warmup_steps": 2}  # cosine (the default) warming up: lr_1 = 5e-3
    _, (a,) = _run(tmp_path / "a", corpus, Probe(grads=False), **base, **warm)
    flat = {"optim.lr": 3e-2, "schedule.name": "constant", "schedule.warmup_steps": 0}  # lr_1 = 3e-2
    _, (b,) = _run(tmp_path / "b", corpus, Probe(grads=False), **base, **flat)
    assert a.optimizer_defaults["relative_step"] is False and a.optimizer_defaults["scale_parameter"] is False
    assert (a.lr, b.lr) == pytest.approx((5e-3, 3e-2))
    assert [r["lr"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")] == pytest.approx([5e-3])
    per_a, per_b = _per_lr(a), _per_lr(b)
    for name in per_a:  # atol: 1 ulp of |p| <= ~1, per unit of the smaller lr
        torch.testing.assert_close(per_a[name], per_b[name], rtol=1e-4, atol=3e-7 / a.lr, msg=name)
    # U_1 is a normalised update: its RMS is at most clip_threshold = 1 and not far below it.
    rms = [float(u.square().mean().sqrt()) for u in per_a.values()]
    assert max(rms) <= 1.0 + 1e-3 and min(rms) > 0.1, rms


def test_adafactor_relative_step_in_loop(tmp_path: Path, corpus: Path) -> None:
    """Catches: optim.hparams.relative_step=true not reaching Adafactor in the loop (or refused there, as before).

    With an lr the relative step is rho_t = min(lr_t, 1/sqrt(t)) (torch.optim.Adafactor's rule; lr 1e-2 is the
    paper's). At step 1 with lr 2.0 that is 1: the same update as the absolute step with lr 1.0, where an lr that
    bypassed the relative step would move the weights twice as far."""
    base = {
        "optim.name": "adafactor",
        "train.max_steps": 1,
        "train.eval_every": 0,
        "optim.weight_decay": 0.0,
        "schedule.name": "constant",
        "schedule.warmup_steps": 0,
        "optim.hparams.scale_parameter": True,
    }
    _, (a,) = _run(
        tmp_path / "a", corpus, Probe(grads=False), **base, **{"optim.hparams.relative_step": True}, **{"optim.lr": 2.0}
    )
    _, (b,) = _run(
        tmp_path / "b",
        corpus,
        Probe(grads=False),
        **base,
        **{"optim.hparams.relative_step": False},
        **{"optim.lr": 1.0},
    )
    assert a.optimizer_defaults["relative_step"] is True and b.optimizer_defaults["relative_step"] is False
    for name in a.before:
        torch.testing.assert_close(_delta(a)[name], _delta(b)[name], msg=name)
