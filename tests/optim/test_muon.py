"""Muon: Newton–Schulz properties, torch.optim.Muon, an independent float64 transcription, the AdamW groups,
the batched path, state, validation and the Muon parameter-group policy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatlm.optim import muon as muon_mod
from flatlm.optim.muon import Muon, orthogonalize, zeropower_via_newtonschulz5
from flatlm.optim.param_groups import muon_param_groups

# Non-square both ways, square, a repeated shape (batched together) and a very wide one.
SHAPES = [(32, 16), (16, 32), (24, 24), (32, 16), (24, 24), (6, 40)]
A, B, C = 3.4445, -4.7750, 2.0315


def _params(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def _grads(shapes, steps, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(steps)]


def _run(make_opt, init, grads):
    """Step an optimizer over the given gradient sequence; return the final parameters."""
    params = [p.clone().requires_grad_() for p in init]
    opt = make_opt(params)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = None if g is None else g.to(p.dtype, copy=True)
        opt.step()
    return [p.detach() for p in params]


def _assert_close(xs, ys, atol, rtol=0.0):
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x, y.to(x.dtype), atol=atol, rtol=rtol)


# --- Newton–Schulz ---------------------------------------------------------------------------------------------


def _p5(x: torch.Tensor) -> torch.Tensor:
    """The scalar map NS5 applies to each normalised singular value."""
    for _ in range(5):
        x = A * x + B * x**3 + C * x**5
    return x


def _ill_conditioned(m, n, cond_exp=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    return u[:, :k] @ torch.diag(torch.logspace(0, -cond_exp, k, dtype=torch.float64)) @ v[:, :k].T


def _inputs():
    g = torch.Generator().manual_seed(3)
    randoms = [torch.randn(s, generator=g, dtype=torch.float64) for s in [(64, 128), (128, 64), (96, 96), (7, 300)]]
    return [*randoms, _ill_conditioned(64, 48), _ill_conditioned(40, 80, cond_exp=9)]


@pytest.mark.parametrize(
    "dtype, band, tiny_max", [(torch.float32, (0.68, 1.21), 0.01), (torch.bfloat16, (0.65, 1.25), 0.25)]
)
def test_ns_singular_values_in_band(dtype, band, tiny_max):
    """Every direction with sigma / ||G||_F >= 2e-3 ends in the quintic's band (the scalar map's range is
    [0.682, 1.202] there); directions far below it stay small: 5 steps grow them at most 3.4445**5 ~ 487x, so
    below 0.005 here in fp32; in bf16 the rounding noise (~2**-8), grown the same way, sets the floor."""
    for G in _inputs():
        x = torch.linalg.svdvals(G) / G.norm()
        s = torch.linalg.svdvals(zeropower_via_newtonschulz5(G.to(dtype)).double())
        assert s.shape == x.shape
        reached = x >= 2e-3
        assert band[0] <= s[reached].min() and s[reached].max() <= band[1], (tuple(G.shape), s[reached])
        tiny = x < 1e-5
        if tiny.any():
            assert s[tiny].max() < tiny_max


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_ns_applies_the_scalar_quintic_to_singular_values(dtype, atol):
    """NS5 keeps the singular vectors and maps each singular value by p(p(p(p(p(sigma / ||G||_F)))))."""
    for G in _inputs():
        out = zeropower_via_newtonschulz5(G.to(dtype)).double()
        u, s, vh = torch.linalg.svd(G, full_matrices=False)
        expected = u @ torch.diag(_p5(s / (G.norm() + 1e-7))) @ vh
        torch.testing.assert_close(out, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ns_batched_equals_per_matrix(dtype):
    """A batch runs baddbmm (the GPU path), one matrix addmm (torch.optim.Muon's): the same numbers."""
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 24, 16), (5, 16, 24), (2, 3, 12, 12)]:
        G = torch.randn(shape, generator=g).to(dtype)
        batched = zeropower_via_newtonschulz5(G)
        flat = G.reshape(-1, *shape[-2:])
        single = torch.stack([zeropower_via_newtonschulz5(m) for m in flat]).reshape(shape)
        torch.testing.assert_close(batched, single, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
        assert batched.shape == G.shape and batched.dtype == dtype


def test_orthogonalize_batches_same_shapes_into_one_call():
    updates = _params(SHAPES)
    muon_mod.ns_stats.update(calls=0, matrices=0)
    out = orthogonalize(updates, dtype=torch.float32)
    assert muon_mod.ns_stats == {"calls": 4, "matrices": 6}  # 4 distinct shapes, 6 matrices
    for u, o in zip(updates, out, strict=True):
        torch.testing.assert_close(o, zeropower_via_newtonschulz5(u), atol=1e-6, rtol=0)


def test_ns_rejects_vectors_and_zero_steps():
    with pytest.raises(ValueError, match=r"matrix or a batch of matrices"):
        zeropower_via_newtonschulz5(torch.ones(4))
    with pytest.raises(ValueError, match=r"steps must be >= 1, got 0"):
        zeropower_via_newtonschulz5(torch.ones(4, 4), steps=0)


# --- the optimizer against references --------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_muon(foreach, adjust_lr, nesterov, weight_decay):
    """torch.optim.Muon runs Newton–Schulz in bf16; so does flatlm's default, and the results agree."""
    hp = dict(lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    init, grads = _params(SHAPES), _grads(SHAPES, steps=5)
    ours = _run(lambda ps: Muon(ps, **hp, adjust_lr=adjust_lr, foreach=foreach), init, grads)
    ref = _run(lambda ps: torch.optim.Muon(ps, **hp, adjust_lr_fn=adjust_lr), init, grads)
    _assert_close(ours, ref, atol=1e-6)
    assert max((o - i).abs().max() for o, i in zip(ours, init, strict=True)) > 1e-2  # the test moved something


def test_spectral_is_original():
    init, grads = _params(SHAPES), _grads(SHAPES, steps=2)
    a = _run(lambda ps: Muon(ps, lr=0.02, adjust_lr="spectral"), init, grads)
    b = _run(lambda ps: Muon(ps, lr=0.02, adjust_lr="original"), init, grads)
    _assert_close(a, b, atol=0)


def _reference_muon(init, grads, lr, mu, nesterov, wd, adjust_lr, eps=1e-7):
    """The papers' equations in float64, one matrix at a time, written apart from flatlm's code:
    B <- mu B + G; U <- G + mu B (nesterov) or B; O <- NS5(U); W <- W (1 - lr wd) - lr s O."""
    params = [p.double().clone() for p in init]
    bufs = [torch.zeros_like(p) for p in params]
    for gs in grads:
        for i, g in enumerate(gs):
            g = g.double()
            bufs[i] = mu * bufs[i] + g
            u = g + mu * bufs[i] if nesterov else bufs[i]
            x = u.T if u.shape[0] > u.shape[1] else u
            x = x / (torch.sqrt((x * x).sum()) + eps)
            for _ in range(5):
                gram = x @ x.T
                x = A * x + (B * gram + C * gram @ gram) @ x
            o = x.T if u.shape[0] > u.shape[1] else x
            rows, cols = u.shape
            s = max(1.0, rows / cols) ** 0.5 if adjust_lr == "original" else 0.2 * max(rows, cols) ** 0.5
            params[i] = params[i] * (1 - lr * wd) - lr * s * o
    return params


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_float64_reference(foreach, adjust_lr, nesterov):
    hp = dict(lr=0.02, mu=0.95, nesterov=nesterov, wd=0.1, adjust_lr=adjust_lr)
    init, grads = _params(SHAPES), _grads(SHAPES, steps=5)
    make = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=0.1, adjust_lr=adjust_lr, foreach=foreach)
    # float64 end to end, eps=0: the EMA momentum of torch/flatlm gives exactly the papers' sum-form update.
    ref = _reference_muon(init, grads, **hp, eps=0.0)
    ours64 = _run(lambda ps: Muon(ps, **make, eps=0.0, ns_dtype="float64"), [p.double() for p in init], grads)
    _assert_close(ours64, ref, atol=1e-12)
    # fp32 Newton–Schulz and the default eps (which weighs (1 - mu) = 20x more on the EMA's smaller norm).
    ref = _reference_muon(init, grads, **hp)
    ours32 = _run(lambda ps: Muon(ps, **make, ns_dtype="float32"), init, grads)
    _assert_close(ours32, ref, atol=1e-6)


@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_foreach_matches_single_tensor(ns_dtype):
    init, grads = _params(SHAPES), _grads(SHAPES, steps=4)
    a = _run(lambda ps: Muon(ps, lr=0.02, ns_dtype=ns_dtype, foreach=True), init, grads)
    b = _run(lambda ps: Muon(ps, lr=0.02, ns_dtype=ns_dtype, foreach=False), init, grads)
    _assert_close(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "foreach, torch_kw", [(None, {"fused": True}), (True, {"foreach": True}), (False, {"foreach": False})]
)
def test_adamw_groups_match_torch_adamw(foreach, torch_kw):
    shapes = [(8,), (12, 6), (3, 4, 5), (16, 16)]  # the last one is Muon's, the rest AdamW's
    init, grads = _params(shapes), _grads(shapes, steps=4)
    hp = dict(lr=3e-3, weight_decay=0.05)

    def ours(ps):
        groups = [{"params": ps[:3], "use_muon": False}, {"params": ps[3:], "use_muon": True}]
        return Muon(groups, **hp, adamw_betas=(0.8, 0.9), adamw_eps=1e-6, foreach=foreach)

    def ref(ps):
        return torch.optim.AdamW(ps[:3], **hp, betas=(0.8, 0.9), eps=1e-6, **torch_kw)

    _assert_close(_run(ours, init, grads)[:3], _run(ref, init, grads)[:3], atol=0)


# --- optimizer mechanics ---------------------------------------------------------------------------------------


def _mixed_groups(ps):
    return [
        {"params": [p for p in ps if p.ndim == 2], "use_muon": True, "weight_decay": 0.1},
        {"params": [p for p in ps if p.ndim != 2], "use_muon": False, "weight_decay": 0.0, "lr": 3e-3},
    ]


def test_state_dict_round_trip():
    shapes = [*SHAPES, (8,), (4, 3, 2)]
    init, grads = _params(shapes), _grads(shapes, steps=6)
    uninterrupted = _run(lambda ps: Muon(_mixed_groups(ps), lr=0.02), init, grads)

    params = [p.clone().requires_grad_() for p in init]
    opt = Muon(_mixed_groups(params), lr=0.02)
    for gs in grads[:3]:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][0]) == {"momentum_buffer"} and set(saved["state"][6]) == {"step", "exp_avg", "exp_avg_sq"}
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = Muon(_mixed_groups(resumed_params), lr=0.02)
    resumed.load_state_dict(saved)
    for gs in grads[3:]:
        for p, g in zip(resumed_params, gs, strict=True):
            p.grad = g.clone()
        resumed.step()
    _assert_close([p.detach() for p in resumed_params], uninterrupted, atol=0)


def test_step_with_closure_returns_loss_and_updates():
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(16, 8)
    opt = Muon([w], lr=0.02)
    before = w.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (x @ w).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert not torch.equal(w.detach(), before)


def test_params_without_grad_are_skipped():
    shapes = [(16, 8), (16, 8), (8,)]
    init = _params(shapes)
    grads = [[g if i != 1 else None for i, g in enumerate(gs)] for gs in _grads(shapes, steps=3)]
    params = [p.clone().requires_grad_() for p in init]
    opt = Muon([{"params": params[:2]}, {"params": params[2:], "use_muon": False}], lr=0.02)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g
        opt.step()
    assert torch.equal(params[1].detach(), init[1]) and params[1] not in opt.state
    assert not torch.equal(params[0].detach(), init[0]) and not torch.equal(params[2].detach(), init[2])
    # The batched call saw the one matrix that had a gradient: same as a run with only that matrix.
    alone = _run(lambda ps: Muon(ps, lr=0.02), init[:1], [gs[:1] for gs in grads])
    _assert_close([params[0].detach()], alone, atol=0)


def test_ns_call_count_per_step():
    init, grads = _params(SHAPES), _grads(SHAPES, steps=1)
    for foreach, calls in [(True, 4), (False, 6), (None, 6)]:  # None on CPU: per tensor
        muon_mod.ns_stats.update(calls=0, matrices=0)
        _run(lambda ps, fe=foreach: Muon(ps, foreach=fe), init, grads)
        assert muon_mod.ns_stats == {"calls": calls, "matrices": 6}


@pytest.mark.parametrize("foreach", [True, False], ids=["batched", "per-tensor"])
def test_injected_orthogonalize_is_used(foreach):
    """The seam a sharded Muon uses: an orthogonalize given at construction gets every matrix of the step in one
    call with their parts (global shapes), and the result is the same through it."""
    seen = []

    def spy(updates, parts, **kw):
        seen.append([tuple(p.shape) for p in parts])
        assert [tuple(u.shape) for u in updates] == seen[-1]
        return orthogonalize(updates, **kw)

    init, grads = _params(SHAPES), _grads(SHAPES, steps=2)
    make = lambda ps: Muon(ps, lr=0.02, foreach=foreach, orthogonalize=spy)  # noqa: E731
    _assert_close(_run(make, init, grads), _run(lambda ps: Muon(ps, lr=0.02, foreach=foreach), init, grads), atol=0)
    assert seen == [SHAPES, SHAPES]


def test_bf16_params_and_dtype_argument():
    p = torch.randn(16, 8, dtype=torch.bfloat16, requires_grad=True)
    opt = Muon([p], ns_dtype=torch.float32)
    assert opt.param_groups[0]["ns_dtype"] == "float32"
    p.grad = torch.randn_like(p)
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["momentum_buffer"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, r"lr must be >= 0, got -1.0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
        ({"weight_decay": -0.1}, r"weight_decay must be >= 0, got -0.1"),
        ({"ns_steps": 0}, r"ns_steps must be an int >= 1, got 0"),
        ({"ns_steps": 2.5}, r"ns_steps must be an int >= 1, got 2.5"),
        ({"eps": -1e-7}, r"eps must be >= 0, got -1e-07"),
        ({"adamw_eps": -1.0}, r"adamw_eps must be >= 0, got -1.0"),
        ({"ns_coefficients": (1.0, 2.0)}, r"ns_coefficients must be three finite floats"),
        ({"adamw_betas": (0.9, 1.0)}, r"adamw_betas must be two floats in \[0, 1\), got \(0.9, 1.0\)"),
        ({"adjust_lr": "rms"}, r"adjust_lr must be one of 'original', 'spectral', 'match_rms_adamw', got 'rms'"),
        ({"ns_dtype": "float16"}, r"ns_dtype must be one of 'bfloat16', 'float32', 'float64', got 'float16'"),
        ({"foreach": "yes"}, r"foreach must be None, True or False, got 'yes'"),
    ],
)
def test_hyperparameter_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Muon([torch.zeros(4, 4, requires_grad=True)], **kwargs)


def test_group_override_is_validated():
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -0.5"):
        Muon([{"params": [torch.zeros(4, 4, requires_grad=True)], "lr": -0.5}])


def test_shape_errors():
    vec, mat = torch.zeros(4, requires_grad=True), torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"without 'use_muon' is a Muon group.*muon_param_groups"):
        Muon([mat, vec])
    with pytest.raises(ValueError, match=r"use_muon=True must hold only 2-D parameters"):
        Muon([{"params": [mat]}, {"params": [vec], "use_muon": True}])
    with pytest.raises(ValueError, match=r"Muon needs at least one 2-D parameter"):
        Muon([{"params": [vec, mat], "use_muon": False}])


# --- parameter groups ------------------------------------------------------------------------------------------


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tie", [False, True])
def test_muon_param_groups_on_tiny_llama(tie):
    model = _tiny_llama(tie)
    groups = {g["name"]: g for g in muon_param_groups(model, weight_decay=0.1)}
    expected_muon = {
        f"model.layers.{i}.{m}.{p}_proj.weight"
        for i in range(2)
        for m, ps in [("self_attn", "qkvo"), ("mlp", ["gate", "up", "down"])]
        for p in ps
    }
    assert set(groups["muon"]["names"]) == expected_muon
    assert groups["muon"]["use_muon"] is True and groups["muon"]["weight_decay"] == 0.1
    no_decay = set(groups["adamw_no_decay"]["names"])
    assert no_decay == {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
    }
    assert groups["adamw_no_decay"]["use_muon"] is False and groups["adamw_no_decay"]["weight_decay"] == 0.0
    if tie:  # the head is the embedding: it appears once, undecayed
        assert "adamw_decay" not in groups
    else:
        assert groups["adamw_decay"]["names"] == ["lm_head.weight"] and groups["adamw_decay"]["use_muon"] is False
    # Every parameter in exactly one group, names aligned with params.
    named = dict(model.named_parameters())
    listed = [n for g in groups.values() for n in g["names"]]
    assert sorted(listed) == sorted(named) and len(listed) == len(set(listed))
    for g in groups.values():
        assert all(named[n] is p for n, p in zip(g["names"], g["params"], strict=True))


def test_muon_trains_tiny_llama():
    model = _tiny_llama(tie=False)
    opt = Muon(muon_param_groups(model, weight_decay=0.1), lr=1e-2)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_muon_param_groups_needs_a_hidden_matrix():
    model = nn.Sequential()
    model.embed = nn.Embedding(10, 4)
    model.norm = nn.LayerNorm(4)
    with pytest.raises(ValueError, match=r"Muon needs at least one 2-D hidden weight matrix; Sequential has none"):
        muon_param_groups(model, weight_decay=0.1)
