"""Backend resolution from the config and the launcher, and the bad-input errors of issue 5's list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flatlm.config import ParallelConfig, RunConfig, load_config
from flatlm.errors import FlatlmError
from flatlm.parallel import Environment
from flatlm.parallel.compat import check_parallel
from flatlm.parallel.deepspeed import deepspeed_config
from flatlm.parallel.distributed import launcher_bf16, resolve_backend
from flatlm.train.loop import grad_accumulation

ONE, TWO = Environment(), Environment(rank=0, world_size=2, local_world_size=2)


def _resolve(backend: str, env: Environment, environ: dict[str, str] | None = None, **kw: object) -> ParallelConfig:
    return resolve_backend(ParallelConfig(backend=backend, **kw), env, environ or {})


def test_config_and_world_size_decide_the_backend() -> None:
    assert _resolve("single", ONE).backend == "single"
    assert _resolve("fsdp2", ONE).backend == "single"  # one process: said in a warning, run single
    assert _resolve("single", TWO).backend == "ddp"  # several processes, no request: data parallel
    resolved = _resolve("zero2", TWO)
    assert (resolved.backend, resolved.world_size) == ("zero2", 2)


def test_launcher_requests_win_and_carry_options() -> None:
    fsdp = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}
    resolved = _resolve("single", TWO, fsdp)
    assert (resolved.backend, resolved.reshard_after_forward) == ("fsdp2", False)
    ds = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    assert _resolve("ddp", TWO, ds).backend == "zero3"


@pytest.mark.parametrize(
    ("environ", "kw", "message"),
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {}, "flatlm applies FSDP2"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, {}, "stages 1, 2 and 3"),
        ({}, {"backend": "fsdp2", "shard_optimizer_state": True}, "shard_optimizer_state=true is for ddp"),
    ],
)
def test_requests_flatlm_cannot_honour_are_errors(environ: dict, kw: dict, message: str) -> None:
    kw = {"backend": "single", **kw}
    with pytest.raises(FlatlmError, match=message):
        resolve_backend(ParallelConfig(**kw), TWO, environ)


def test_launcher_mixed_precision() -> None:
    assert launcher_bf16({"ACCELERATE_MIXED_PRECISION": "bf16"}) is True
    assert launcher_bf16({"ACCELERATE_MIXED_PRECISION": "no"}) is None
    assert launcher_bf16({}) is None
    with pytest.raises(FlatlmError, match="mixed_precision=fp16; flatlm trains in fp32 or bf16"):
        launcher_bf16({"ACCELERATE_MIXED_PRECISION": "fp16"})


def _cfg(**overrides: object) -> RunConfig:
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    return cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"world_size": 2})})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"parallel.backend": "zero3", "optim.name": "esam"}, "optim.name=esam cannot run under zero3"),
        ({"parallel.backend": "zero1", "optim.name": "esam"}, "optim.name=esam cannot run under zero1"),
        ({"parallel.backend": "zero2", "optim.name": "gsam", "sam.perturbation": "replica"}, "under zero2 runs sam"),
        ({"parallel.backend": "fsdp2", "optim.name": "gsam", "sam.perturbation": "replica"}, "under fsdp2 runs sam"),
        ({"parallel.backend": "zero3", "optim.name": "sam", "sam.perturbation": "replica"}, "zero3 shards the weights"),
    ],
)
def test_impossible_pairs_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(FlatlmError, match=message):
        check_parallel(_cfg(**overrides))


def test_batch_layout_must_divide_over_the_world() -> None:
    cfg = _cfg(**{"train.global_batch_size": 8, "train.micro_batch_size": 3})
    with pytest.raises(FlatlmError, match="not divisible by train.micro_batch_size=3 x world size 2"):
        grad_accumulation(cfg.train, 2)


def test_deepspeed_config_follows_flatlm(tmp_path: Path) -> None:
    cfg = _cfg(**{"parallel.backend": "zero2", "train.global_batch_size": 16, "train.micro_batch_size": 4})
    ds = deepspeed_config(cfg, 2, 2, {})
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16,
        4,
        2,
    )
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_allow_untested_optimizer"]
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}}))
    merged = deepspeed_config(cfg, 2, 2, {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(user)})
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ({"train_batch_size": 32}, "sets train_batch_size=32 but flatlm's settings give 16"),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 but flatlm's settings give 2"),
        ({"zero_optimization": {"stage": 3}}, "asks for ZeRO stage 3 but the backend is zero2"),
        ({"optimizer": {"type": "Adam"}}, "names an optimizer"),
    ],
)
def test_contradicting_deepspeed_config_is_refused(tmp_path: Path, user: dict, message: str) -> None:
    cfg = _cfg(**{"parallel.backend": "zero2", "train.global_batch_size": 16, "train.micro_batch_size": 4})
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(FlatlmError, match=message):
        deepspeed_config(cfg, 2, 2, {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)})


def test_deepspeed_never_compiles_its_shm_kernel_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """deepspeed.comm builds ``deepspeed_shm_comm`` (1-2 min of g++) unless flatlm marks it unavailable first;
    with the flag left on, ``build_shm_op`` would return the compiled module instead of None."""
    import importlib

    import deepspeed.ops

    from flatlm.parallel.zero_views import skip_shm_comm_build

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)
    skip_shm_comm_build()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None
