"""Distribution is injected at construction and the math is written once.

* One update per equation: a bug planted in Muon's (or Adafactor's) one update function (monkeypatched in every
  rank) changes the single-process result *and* the FSDP2 and ZeRO-2 results, which still agree with the planted
  single process. A backend with its own copy of the update would keep the unplanted result and fail the check.
* Nothing patches an optimizer after it is built: on every backend the optimizer ``setup_parallel`` returns (and
  every optimizer it wraps) has the class, the attribute names and the injected objects it had when
  ``build_optimizer`` returned it.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.ranks import run_ranks

STEPS = 2
HPARAMS = {
    # fp32 Newton-Schulz: the per-tensor (single) and batched (sharded) bf16 kernels round differently
    "muon": {"lr": 1e-2, "ns_dtype": "float32"},
    "adafactor": {"lr": 1e-2, "relative_step": False, "beta1": 0.9},
}
# The planted bug, inside the one update function each optimizer's default CPU path runs: Muon's momentum
# 0.95 -> 0.5, Adafactor's second-moment decay -0.8 -> -0.5.
PLANTS = {
    "muon": ("flatlm.optim.muon", "_single_tensor_muon", "momentum", 0.5),
    "adafactor": ("flatlm.optim.adafactor", "_multi_tensor_adafactor", "decay_rate", -0.5),
}
# Sharded vs single: relative error of each weight's update after STEPS steps, measured <= 3.7e-6 (muon, fsdp2 and
# zero2, planted or not) and <= 4.5e-7 (adafactor); the plant moves the single process's worst update by 0.34
# (muon) and 0.045 (adafactor), and a sharded run that kept its own update would differ from the planted single
# process by that much (measured: 0.36 and 0.046).
AGREE = 3e-5
PLANTED_MOVES = 1e-2


def _model() -> torch.nn.Module:
    from flatlm.models import build_model, model_config

    overrides = {"num_hidden_layers": 2, "hidden_size": 24, "intermediate_size": 40, "num_attention_heads": 2}
    return build_model(model_config("tiny", 50, {**overrides, "num_key_value_heads": 2}), seed=0)


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    from flatlm.train.step import per_sequence_loss

    return per_sequence_loss(model, tokens[:, :-1], tokens[:, 1:], False).mean()


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(step))


@contextlib.contextmanager
def _planted(name: str, on: bool) -> Iterator[dict[str, int]]:
    """Count the calls of the one update function; with ``on``, plant the bug in it."""
    import importlib

    module_name, fn_name, key, value = PLANTS[name]
    module = importlib.import_module(module_name)
    original = getattr(module, fn_name)
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if on:
            kwargs[key] = value
        return original(*args, **kwargs)

    setattr(module, fn_name, wrapper)
    try:
        yield calls
    finally:
        setattr(module, fn_name, original)


def _train(name: str, backend: str, rank: int) -> dict[str, torch.Tensor]:
    """The weights after STEPS steps on the global batch (sharded backends: each rank half of it)."""
    from flatlm.optim import build_optimizer, model_param_groups
    from flatlm.parallel.layouts import distribution

    model = _model()
    if backend == "single":
        opt = build_optimizer(name, model_param_groups(name, model, 0.1), **HPARAMS[name])
        for step in range(STEPS):
            opt.zero_grad()
            _loss(model, _batch(step)).backward()
            opt.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    injected = distribution(backend)
    if backend == "fsdp2":
        from flatlm.parallel.fsdp2 import shard_fsdp2

        shard_fsdp2(model, reshard_after_forward=True, bf16=False)
        opt = build_optimizer(name, model_param_groups(name, model, 0.1), distribution=injected, **HPARAMS[name])
        for step in range(STEPS):
            opt.zero_grad()
            _loss(model, _batch(step)[2 * rank : 2 * rank + 2]).backward()  # FSDP2 averages over the ranks
            opt.step()
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    import deepspeed

    from flatlm.parallel.deepspeed import _shape_aware_on_partitions
    from flatlm.parallel.zero_views import skip_shm_comm_build

    opt = build_optimizer(name, model_param_groups(name, model, 0.1), distribution=injected, **HPARAMS[name])
    numel = sum(p.numel() for p in model.parameters())
    config = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 2, "reduce_bucket_size": numel, "allgather_bucket_size": numel},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    skip_shm_comm_build()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
    _shape_aware_on_partitions(injected.layout, engine, model)
    for step in range(STEPS):
        engine.backward(_loss(engine, _batch(step)[2 * rank : 2 * rank + 2]))
        engine.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}  # ZeRO-2: whole weights on every rank


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _one_update(rank: int, world: int, name: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    init = {n: p.detach().clone() for n, p in _model().named_parameters()}
    runs: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}
    for planted in (False, True):
        for backend in ("single", "fsdp2", "zero2"):
            with _planted(name, planted) as calls:
                runs[backend, planted] = _train(name, backend, rank)
            assert calls["n"] >= STEPS, (backend, calls)  # every layout steps through the one function
    for planted in (False, True):
        single = runs["single", planted]
        for backend in ("fsdp2", "zero2"):
            for n, w in runs[backend, planted].items():
                err = _rel(w - init[n], single[n] - init[n])
                assert err <= AGREE, f"{backend} planted={planted} {n}: {err:.2e}"
    moved = max(_rel(runs["single", True][n] - init[n], runs["single", False][n] - init[n]) for n in init)
    assert moved >= PLANTED_MOVES, moved  # the plant really changes the result (so the agreement above means one code)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["muon", "adafactor"])
def test_planted_bug_in_the_one_update_reaches_every_layout(name: str) -> None:
    run_ranks(_one_update, name)


# --- nothing patched after construction -------------------------------------------------------------------------

INJECTED_ATTRS = ("_layout", "_orthogonalize", "_shard_sum", "sum_across_ranks")


def _snapshot(optimizer: torch.optim.Optimizer) -> list[tuple[Any, ...]]:
    from flatlm.optim.registry import inner_optimizers

    return [
        (type(o), sorted(vars(o)), {a: id(getattr(o, a)) for a in INJECTED_ATTRS if hasattr(o, a)})
        for o in inner_optimizers(optimizer)
    ]


def _setup_unpatched(backend: str, optim: str, owned: bool = False) -> None:
    import flatlm.train.backend as train_backend
    from flatlm.config import load_config
    from flatlm.parallel import environment
    from flatlm.parallel.distributed import resolve_backend

    overrides = [
        f"parallel.backend={backend}",
        f"parallel.shard_optimizer_state={owned}",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        f"optim.name={optim}",
        "optim.lr=1e-3",
    ]
    if optim == "adafactor":
        overrides.append("optim.hparams.relative_step=false")
    if optim == "sam":
        overrides.append("optim.hparams.base=muon")
    cfg = load_config(None, overrides)
    cfg = cfg.model_copy(update={"parallel": resolve_backend(cfg.parallel, environment())})
    built: list[Any] = []
    original = train_backend.build_optimizer

    def recording(*args: Any, **kwargs: Any) -> Any:
        opt = original(*args, **kwargs)
        built.append((opt, copy.deepcopy(_snapshot(opt))))
        return opt

    train_backend.build_optimizer = recording
    try:
        _, optimizer, _ = train_backend.setup_parallel(_model(), cfg, torch.device("cpu"), accum=1)
    finally:
        train_backend.build_optimizer = original
    ((first, before),) = built
    assert optimizer is first, f"{backend}/{optim}: setup_parallel returned another optimizer than it built"
    assert _snapshot(optimizer) == before, f"{backend}/{optim}: the optimizer changed after it was built"


def _every_backend(rank: int, world: int) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    for optim in ("muon", "adafactor", "sam"):
        _setup_unpatched("ddp", optim)
        _setup_unpatched("ddp", optim, owned=True)
        for backend in ("fsdp2", "zero1", "zero2", "zero3"):
            _setup_unpatched(backend, optim)


def test_setup_never_patches_the_optimizer_single() -> None:
    for optim in ("muon", "adafactor", "sam"):
        _setup_unpatched("single", optim)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_setup_never_patches_the_optimizer_on_every_backend() -> None:
    run_ranks(_every_backend)


def _dtensor_without_layout(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from flatlm.errors import FlatlmError
    from flatlm.optim import build_optimizer

    mesh = init_device_mesh("cpu", (world,))
    for name, hp in (("muon", {}), ("adafactor", {"relative_step": False})):
        p = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        opt = build_optimizer(name, [p], lr=1e-2, **hp)  # no distribution: NS / statistics of a shard would be wrong
        p.grad = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
        with pytest.raises((ValueError, FlatlmError), match="no layout for it"):
            opt.step()


def test_sharded_parameters_without_a_layout_are_refused() -> None:
    """Never quietly wrong: Muon or Adafactor built on DTensor shards without the backend's layout refuse to step."""
    run_ranks(_dtensor_without_layout)


def test_row_shards_refuse_a_plain_tensor() -> None:
    """FSDP2's layout on a tensor that is not a DTensor would count its elements as one rank's rows (statistics
    W times too large): one clear error instead."""
    from flatlm.parallel.layouts import RowShards

    with pytest.raises(ValueError, match=r"expect DTensor parameters sharded on dim 0, got a Tensor of shape \(6, 4\)"):
        RowShards().parts(torch.zeros(6, 4))


def test_adafactor_sums_only_partial_parts() -> None:
    """``Part.partial`` decides what Adafactor's RMS adds up over the ranks: parts held whole on every rank (not
    partial) under a ``shard_sum`` of 2 identical ranks step exactly as one process (relative step with
    scale_parameter, so alpha reads the RMS); marked partial, the same parts' RMS counts twice and the update moves
    (the check would fail if ``partial`` were ignored)."""
    from flatlm.optim.adafactor import Adafactor
    from flatlm.optim.distribution import Layout, Part

    class Whole(Part):
        partial = False

    class Counted(Part):
        partial = True

    class Held(Layout):
        def __init__(self, part: type[Part]) -> None:
            self.part = part

        def parts(self, tensor: torch.Tensor) -> list[Part]:
            return [self.part(tensor.shape)]

    def run(layout: Layout | None) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen) for s in ((8,), (6, 4))]
        kw: dict[str, Any] = {} if layout is None else {"layout": layout, "shard_sum": lambda x: 2 * x}
        opt = Adafactor(params, beta1=0.9, **kw)  # lr None: relative step, scale_parameter=True
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params

    single = run(None)
    for a, b in zip(run(Held(Whole)), single, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    moved = max((a - b).abs().max().item() for a, b in zip(run(Held(Counted)), single, strict=True))
    assert moved > 1e-4, f"partial parts' RMS summed over 2 ranks moved the weights by only {moved}"
