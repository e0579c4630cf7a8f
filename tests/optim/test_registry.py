"""One table over every registered optimizer: builds, steps, resumes exactly, skips missing grads,
runs under step(closure), shares groups with schedules; plus the registry's errors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flatlm.errors import FlatlmError
from flatlm.optim import OPTIMIZERS, build_optimizer, build_scheduler, model_param_groups
from flatlm.optim.registry import get_spec

LR = {"sgd": 0.05, "adagrad": 0.05, "rmsprop": 1e-3, "adadelta": 1.0, "adafactor": 1e-2, "lion": 1e-4, "muon": 0.02}
SAM_FAMILY = [n for n, s in OPTIMIZERS.items() if s.wrapper]


def _hparams(name: str) -> dict:
    if name == "adafactor":
        return {"lr": LR[name], "relative_step": False, "scale_parameter": False}
    return {"lr": LR.get(name, 1e-3)}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


def _loss(model: torch.nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (4, 9), generator=g)
    logits = model(input_ids=x[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())


def _build(name: str, model: torch.nn.Module, **extra) -> torch.optim.Optimizer:
    hp = {**_hparams(name), **extra}
    return build_optimizer(name, model_param_groups(name, model, 0.01, hp), **hp)


def _step(opt: torch.optim.Optimizer, model: torch.nn.Module, seed: int) -> float:
    """One training step the way the loop drives it (two passes for the SAM family)."""
    opt.zero_grad(set_to_none=True)
    loss = _loss(model, seed)
    loss.backward()
    if hasattr(opt, "perturb") and opt.perturb():
        _loss(model, seed).backward()
        opt.restore()
    opt.step()
    return loss.item()


def _all_names() -> list[str]:
    return list(OPTIMIZERS)


@pytest.mark.parametrize("name", _all_names())
def test_steps_and_lowers_loss(name: str) -> None:
    model = _model()
    opt = _build(name, model)
    first = [_step(opt, model, seed=0) for _ in range(15)]
    assert all(torch.isfinite(torch.tensor(first)))
    assert first[-1] < first[0], f"{name}: {first[0]} -> {first[-1]}"


@pytest.mark.parametrize("name", _all_names())
def test_state_dict_round_trip_is_exact(name: str) -> None:
    model = _model()
    opt = _build(name, model)
    for s in range(3):
        _step(opt, model, s)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    expected = [_step(opt, model, s) for s in range(3, 6)]

    model2 = _model(seed=1)
    model2.load_state_dict(saved_model)
    opt2 = _build(name, model2)
    opt2.load_state_dict(saved_opt)
    resumed = [_step(opt2, model2, s) for s in range(3, 6)]
    assert resumed == expected
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", _all_names())
def test_missing_grads_are_skipped(name: str) -> None:
    model = _model()
    opt = _build(name, model)
    frozen = model.model.layers[1].mlp.down_proj.weight
    before = frozen.detach().clone()
    opt.zero_grad(set_to_none=True)
    _loss(model, 0).backward()
    frozen.grad = None
    if hasattr(opt, "perturb") and opt.perturb():
        _loss(model, 0).backward()
        frozen.grad = None
        opt.restore()
    opt.step()
    assert torch.equal(frozen, before)


@pytest.mark.parametrize("name", _all_names())
def test_step_with_closure(name: str) -> None:
    model = _model()
    opt = _build(name, model)

    def closure() -> torch.Tensor:
        loss = _loss(model, 0)
        loss.backward()
        return loss

    opt.zero_grad()
    loss = opt.step(closure)
    assert loss is not None and torch.isfinite(loss)


@pytest.mark.parametrize("name", _all_names())
def test_scheduler_moves_every_group(name: str) -> None:
    model = _model()
    opt = _build(name, model)
    sched = build_scheduler("linear", opt, total_steps=4, min_lr_ratio=0.0)
    base = getattr(opt, "base_optimizer", opt)
    peak = [g["lr"] for g in base.param_groups]
    _step(opt, model, 0)
    sched.step()
    assert [g["lr"] for g in base.param_groups] == pytest.approx([0.75 * p for p in peak])


@pytest.mark.parametrize("name", SAM_FAMILY)
@pytest.mark.parametrize("base", ["sgd", "adamw", "lion"])
def test_sam_family_takes_any_base(name: str, base: str) -> None:
    model = _model()
    opt = _build(name, model, base=base, rho=0.05, lr=LR.get(base, 1e-3))
    assert type(opt.base_optimizer).__name__.lower().startswith(base[:3])
    _step(opt, model, 0)


def test_sam_with_muon_base_gets_muon_groups() -> None:
    model = _model()
    groups = model_param_groups("sam", model, 0.0, {"base": "muon"})
    assert {g.get("use_muon") for g in groups} == {True, False}


def test_errors() -> None:
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(FlatlmError, match=r"unknown optimizer 'adamm'.*did you mean 'adam'.*valid optimizers: adamw"):
        build_optimizer("adamm", p)
    with pytest.raises(FlatlmError, match=r"has no hyperparameter 'bettas'.*did you mean 'betas'"):
        build_optimizer("adamw", p, bettas=(0.9, 0.9))
    with pytest.raises(FlatlmError, match="invalid hyperparameters for optimizer 'adamw'.*learning rate"):
        build_optimizer("adamw", p, lr=-1.0)
    with pytest.raises(FlatlmError, match="invalid hyperparameters for optimizer 'adamw'.*beta"):
        build_optimizer("adamw", p, betas=(1.0, 0.9))
    with pytest.raises(FlatlmError, match=r"unknown base optimizer 'adamx'.*did you mean 'adam.*valid: adamw"):
        build_optimizer("sam", p, base="adamx")
    with pytest.raises(FlatlmError, match="unknown base optimizer 'sam'"):
        build_optimizer("asam", p, base="sam")
    with pytest.raises(FlatlmError, match="rho"):
        build_optimizer("sam", p, rho=0.0)
    with pytest.raises(FlatlmError, match="'sam' has no hyperparameter 'rhoo'"):
        build_optimizer("sam", p, rhoo=0.1)


def test_fused_kernels_chosen_for_torch_optimizers() -> None:
    p = [torch.nn.Parameter(torch.zeros(4, 4))]
    for name in ("adamw", "adam", "sgd", "adagrad"):
        assert build_optimizer(name, p, lr=0.1).defaults["fused"] is True, name
    assert build_optimizer("adamw", p, lr=0.1, foreach=True).defaults["fused"] in (None, False)
    assert get_spec("adamw").defaults["betas"] == (0.9, 0.95)
