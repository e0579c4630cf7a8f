"""Adafactor: transformers' Adafactor in every mode, torch.optim.Adafactor where comparable, an independent float64
transcription of the paper's update, factored state size, the fast path, low precision, the sharding hooks
(simulated dim-0 sharding), state_dict, closure, missing grads and validation."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from transformers.optimization import Adafactor as HFAdafactor

from flatlm.optim.adafactor import Adafactor
from flatlm.optim.distribution import Layout, Part

# 0-d, 1-D, a zero-initialised 1-D (RMS 0: eps2 sets the scale), non-square 2-D both ways, square, 3-D.
SHAPES = [(), (7,), (6,), (5, 3), (4, 6), (5, 5), (2, 3, 5)]
ZERO_INIT = 2  # index of the zero-initialised parameter
STEPS = 6

MODES = {
    "default": {},
    "no_scale": {"scale_parameter": False},
    "warmup_init": {"warmup_init": True},
    "warmup_init_no_scale": {"warmup_init": True, "scale_parameter": False},
    "external_lr": {"lr": 1e-2, "relative_step": False, "scale_parameter": False},
    "external_lr_scaled": {"lr": 3e-2, "relative_step": False},
    "beta1": {"beta1": 0.9},
    "weight_decay": {"weight_decay": 0.1},
    "beta1_wd_external": {"beta1": 0.8, "weight_decay": 0.05, "lr": 1e-2, "relative_step": False},
    "clip_decay": {"clip_threshold": 0.5, "decay_rate": -0.5, "eps": (1e-20, 1e-2)},
}


def _params(shapes=SHAPES, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    if shapes is SHAPES:
        ps[ZERO_INIT].zero_()
    return ps


def _grads(shapes=SHAPES, steps=STEPS, seed=1, dtype=torch.float32):
    """Per step, gradients whose scale changes by up to ~20x between steps, so update clipping is exercised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        scale = math.exp(3.0 * torch.rand((), generator=g).item() - 1.5)
        out.append([(scale * torch.randn(s, generator=g)).to(dtype) for s in shapes])
    return out


def _run(make_opt, init, grads):
    """Step an optimizer over the gradient sequence; return (final params, optimizer)."""
    params = [p.clone() for p in init]
    opt = make_opt(params)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params, opt


def _assert_rel(x, y, tol=1e-5, atol=0.0):
    """max|x - y| <= tol * max|y| + atol: relative to the tensor's scale, so near-zero entries do not dominate."""
    x, y = x.double(), y.double()
    err, scale = (x - y).abs().max().item(), y.abs().max().item()
    assert err <= tol * scale + atol + 1e-30, f"max abs err {err:.3g} > {tol} * {scale:.3g} + {atol:.3g}"


def _assert_updates_match(init, ours, ref, tol=1e-5):
    """The parameters, and the accumulated updates X_T - X_0 up to the float32 rounding of storing X each step."""
    for p0, a, b in zip(init, ours, ref, strict=True):
        _assert_rel(a, b, tol)
        storage = STEPS * torch.finfo(torch.float32).eps * b.abs().max().item()
        _assert_rel(a - p0, b - p0, tol, atol=storage)


# --- transformers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "fast"])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_transformers(mode, foreach):
    kw = MODES[mode]
    init, grads = _params(), _grads()
    ours, opt = _run(lambda ps: Adafactor(ps, foreach=foreach, **kw), init, grads)
    ref, ref_opt = _run(lambda ps: HFAdafactor(ps, **kw), init, grads)
    _assert_updates_match(init, ours, ref)
    for p, q in zip(ours, ref, strict=True):  # the statistics themselves
        s, r = opt.state[p], ref_opt.state[q]
        assert s["step"].item() == r["step"] == STEPS
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg"):
            assert (key in s) == (key in r), key
            if key == "exp_avg" and key in s:  # signed: relative to its scale
                _assert_rel(s[key], r[key])
            elif key in s:  # positive: elementwise
                torch.testing.assert_close(s[key], r[key], rtol=1e-5, atol=0)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "fast"])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_transformers_float64(mode, foreach):
    """In float64 rounding is ~1e-16, so agreement to 1e-10 shows the same arithmetic, not just a close one."""
    kw = MODES[mode]
    init, grads = _params(dtype=torch.float64), _grads(dtype=torch.float64)
    ours, _ = _run(lambda ps: Adafactor(ps, foreach=foreach, **kw), init, grads)
    ref, _ = _run(lambda ps: HFAdafactor(ps, **kw), init, grads)
    for p0, a, b in zip(init, ours, ref, strict=True):
        assert a.dtype == torch.float64
        _assert_rel(a - p0, b - p0, tol=1e-10)


def test_clipping_and_eps2_are_exercised():
    """Guards the reference tests: with these inputs the clip and the eps2 floor change the result."""
    init, grads = _params(), _grads()
    base, _ = _run(lambda ps: Adafactor(ps), init, grads)
    no_clip, _ = _run(lambda ps: Adafactor(ps, clip_threshold=1e6), init, grads)
    big_eps2, _ = _run(lambda ps: Adafactor(ps, eps=(1e-30, 1e-2)), init, grads)
    assert any(not torch.allclose(a, b, rtol=1e-4) for a, b in zip(base, no_clip, strict=True))
    assert not torch.allclose(base[ZERO_INIT], big_eps2[ZERO_INIT], rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "fast"])
def test_low_precision_matches_transformers(dtype, foreach):
    """fp32 math and fp32 state for bf16/fp16 params, result copied back, as transformers does."""
    kw = {"beta1": 0.9, "weight_decay": 0.1}
    init, grads = _params(dtype=dtype), _grads(dtype=dtype)
    ours, opt = _run(lambda ps: Adafactor(ps, foreach=foreach, **kw), init, grads)
    ref, ref_opt = _run(lambda ps: HFAdafactor(ps, **kw), init, grads)
    for p, q in zip(ours, ref, strict=True):
        assert p.dtype == dtype
        # the fp32 math agrees to ~1e-7, so after rounding to bf16/fp16 at most one ulp apart (equal here in fact)
        torch.testing.assert_close(p, q, rtol=torch.finfo(dtype).eps, atol=0)
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == torch.float32, key
                _assert_rel(value, ref_opt.state[q][key])


# --- torch.optim.Adafactor -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [None, 0.5], ids=["default", "lr-caps"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "fast"])
def test_matches_torch_adafactor_where_comparable(foreach, lr):
    """torch's lr=1e-2 is our default relative step, and our relative step with an lr is torch's with that lr
    (lr=0.5: rho_t = min(0.5, 1/sqrt(t)), so the 1/sqrt(t) branch decides from step 5 of 6); no weight decay, no
    beta1, eps1 too small to matter in either place (torch clamps V at eps1^2, we add eps1 to G^2). The other
    differences are listed in the module docstring."""
    init, grads = _params(), _grads()
    ours, opt = _run(lambda ps: Adafactor(ps, lr=lr, foreach=foreach), init, grads)
    ref, ref_opt = _run(
        lambda ps: torch.optim.Adafactor(ps, lr=lr or 1e-2, eps=(1e-30, 1e-3), weight_decay=0.0, foreach=foreach),
        init,
        grads,
    )
    _assert_updates_match(init, ours, ref)
    for p, q in zip(ours, ref, strict=True):
        s, r = opt.state[p], ref_opt.state[q]
        if p.ndim >= 2:
            torch.testing.assert_close(s["exp_avg_sq_row"], r["row_var"].squeeze(-1), rtol=1e-5, atol=0)
            torch.testing.assert_close(s["exp_avg_sq_col"], r["col_var"].squeeze(-2), rtol=1e-5, atol=0)
        else:
            torch.testing.assert_close(s["exp_avg_sq"], r["variance"], rtol=1e-5, atol=0)


# --- independent float64 transcription -----------------------------------------------------------------------------


def _transcribed(x, grads, *, beta1, weight_decay, clip=1.0, decay=-0.8, eps1=1e-30, eps2=1e-3):
    """Shazeer & Stern Alg. 4/5 + Sec. 8, relative step and parameter scale, weight decay scaled by alpha_t;
    written from the paper in float64, elementwise indices spelled out."""
    x = x.double().clone()
    factored = x.ndim >= 2
    R = C = V = None
    M = torch.zeros_like(x)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        alpha = max(eps2, math.sqrt((x**2).mean().item())) * min(1e-2, 1 / math.sqrt(t))
        b2 = 1 - t**decay
        if factored:
            r_new, c_new = (g**2 + eps1).mean(-1), (g**2 + eps1).mean(-2)
            R = r_new if R is None else b2 * R + (1 - b2) * r_new
            C = c_new if C is None else b2 * C + (1 - b2) * c_new
            Vhat = R[..., :, None] * C[..., None, :] / R.mean(-1)[..., None, None]
        else:
            V = g**2 + eps1 if V is None else b2 * V + (1 - b2) * (g**2 + eps1)
            Vhat = V
        U = g / Vhat.sqrt()
        U = U / max(1.0, math.sqrt((U**2).mean().item()) / clip)
        M = beta1 * M + (1 - beta1) * alpha * U if beta1 is not None else alpha * U
        x = x - weight_decay * alpha * x - M
    return x


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "fast"])
@pytest.mark.parametrize(("beta1", "weight_decay"), [(None, 0.0), (0.9, 0.1)])
def test_matches_transcribed_equation(beta1, weight_decay, foreach):
    shapes = [(9,), (6, 4), (3, 4, 6)]
    init, grads = _params(shapes), _grads(shapes)
    ours, _ = _run(lambda ps: Adafactor(ps, beta1=beta1, weight_decay=weight_decay, foreach=foreach), init, grads)
    for i, p in enumerate(ours):
        want = _transcribed(init[i], [gs[i] for gs in grads], beta1=beta1, weight_decay=weight_decay)
        _assert_updates_match([init[i]], [p], [want])


# --- state, fast path, state_dict, closure, missing grads -------------------------------------------------------


def _state_numel(state):
    return sum(v.numel() for k, v in state.items() if k != "step")


@pytest.mark.parametrize(
    ("shape", "second_moment_numel"),
    [((64, 48), 64 + 48), ((48, 64), 48 + 64), ((3, 16, 8), 3 * (16 + 8)), ((40,), 40), ((), 1)],
)
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_state_is_factored(shape, second_moment_numel, beta1):
    """O(n + m) second-moment state per n x m matrix (leading dims batched); a full one for 1-D (and 0-d)."""
    p = torch.randn(shape)
    p.grad = torch.randn(shape)
    opt = Adafactor([p], beta1=beta1)
    opt.step()
    state = opt.state[p]
    first_moment = p.numel() if beta1 is not None else 0
    assert _state_numel(state) == second_moment_numel + first_moment
    if p.ndim >= 2:
        assert state["exp_avg_sq_row"].shape == shape[:-1] and state["exp_avg_sq_col"].shape == shape[:-2] + shape[-1:]
        assert "exp_avg_sq" not in state
    else:
        assert state["exp_avg_sq"].shape == shape and "exp_avg_sq_row" not in state


@pytest.mark.parametrize("mode", list(MODES))
def test_fast_path_matches_single_tensor_path(mode):
    kw = MODES[mode]
    init, grads = _params(), _grads()
    fast, _ = _run(lambda ps: Adafactor(ps, foreach=True, **kw), init, grads)
    single, _ = _run(lambda ps: Adafactor(ps, foreach=False, **kw), init, grads)
    _assert_updates_match(init, fast, single, tol=1e-6)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "fast"])
def test_state_dict_round_trip(foreach):
    kw = {"beta1": 0.9, "weight_decay": 0.1, "foreach": foreach}
    init, grads = _params(), _grads(steps=5)
    straight, _ = _run(lambda ps: Adafactor(ps, **kw), init, grads)

    params, opt = _run(lambda ps: Adafactor(ps, **kw), init, grads[:3])
    saved = copy.deepcopy(opt.state_dict())
    resumed = [p.clone() for p in params]
    opt2 = Adafactor(resumed, **kw)
    opt2.load_state_dict(saved)
    for gs in grads[3:]:
        for p, g in zip(resumed, gs, strict=True):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(resumed, straight, strict=True):
        assert torch.equal(a, b)


def test_step_with_closure_returns_loss_and_steps():
    w = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(8, 4)
    opt = Adafactor([w])

    def closure():
        opt.zero_grad()
        loss = (x @ w).square().mean()
        loss.backward()  # the closure runs with grad enabled although step() is under no_grad
        return loss

    before = w.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert not torch.equal(w.detach(), before)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "fast"])
def test_params_without_grad_are_skipped(foreach):
    init = _params()
    grads = _grads()
    for gs in grads:
        gs[3] = None  # a 2-D parameter that never gets a gradient
        gs[1] = None  # and a 1-D one
    params, opt = _run(lambda ps: Adafactor(ps, foreach=foreach), init, grads)
    for i in (1, 3):
        assert torch.equal(params[i], init[i]) and len(opt.state[params[i]]) == 0
    assert not torch.equal(params[4], init[4])


def test_sparse_gradient_is_rejected():
    p = torch.randn(3, 4)
    p.grad = torch.randn(3, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        Adafactor([p]).step()


# --- sharding hooks: simulated dim-0 sharding ------------------------------------------------------------------------


class _ThreadGroup:
    """A 2-'rank' all-reduce (sum) between threads: enough to check that the hooks are the only global reductions."""

    def __init__(self, world):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def all_reduce_sum(self, rank, x):
        self.slots[rank] = x
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()  # everyone has read the slots before they are reused
        return total


class _Dim0Part(Part):
    """This rank's dim-0 shard of a parameter (rows of a matrix, a slice of a 3-D tensor's batch of matrices)."""

    partial = True  # sums of squares are this rank's

    def __init__(self, shape, world):
        super().__init__((shape[0] * world, *shape[1:]))
        self.cols_partial = len(shape) == 2  # only a 2-D tensor's rows are split


class _Dim0Layout(Layout):
    def __init__(self, world):
        self.world = world

    def parts(self, tensor):
        return [_Dim0Part(tensor.shape, self.world)]


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "fast"])
def test_dim0_sharded_reductions_match_unsharded(foreach):
    """Each rank steps its row shard with only the partial statistics summed over the ranks (shard_sum); the
    gathered result equals the unsharded step. This checks the module docstring's claim that these are the only
    global reductions."""
    world, shapes = 2, [(8,), (6, 4), (4, 6, 5)]
    kw = {"beta1": 0.9, "weight_decay": 0.1, "foreach": foreach}
    init, grads = _params(shapes), _grads(shapes)
    full, _ = _run(lambda ps: Adafactor(ps, **kw), init, grads)

    group, results = _ThreadGroup(world), [None] * world

    def rank_main(rank):
        shard = [p.chunk(world, dim=0)[rank].clone() for p in init]
        sums = lambda x: group.all_reduce_sum(rank, x)  # noqa: E731
        opt = Adafactor(shard, **kw, layout=_Dim0Layout(world), shard_sum=sums)
        for gs in grads:
            for p, g in zip(shard, gs, strict=True):
                p.grad = g.chunk(world, dim=0)[rank].clone()
            opt.step()
        results[rank] = shard

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, p in enumerate(full):
        _assert_rel(torch.cat([results[r][i] for r in range(world)]) - init[i], p - init[i], tol=1e-5)


# --- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"relative_step": False}, r"relative_step=False needs an explicit lr > 0, got lr=None"),
        ({"lr": -1.0, "relative_step": False}, r"lr must be > 0, got -1.0"),
        ({"lr": 1e-3, "relative_step": False, "warmup_init": True}, r"warmup_init=True requires relative_step=True"),
        ({"eps": (-1.0, 1e-3)}, r"eps must be a pair \(eps1, eps2\) of numbers >= 0, got \(-1.0, 0.001\)"),
        ({"eps": (1e-30,)}, r"eps must be a pair"),
        ({"clip_threshold": 0.0}, r"clip_threshold must be > 0, got 0.0"),
        ({"decay_rate": 0.5}, r"decay_rate must be < 0 .*got 0.5"),
        ({"beta1": 1.0}, r"beta1 must be None or in \[0, 1\), got 1.0"),
        ({"beta1": -0.1}, r"beta1 must be None or in \[0, 1\), got -0.1"),
        ({"weight_decay": -0.1}, r"weight_decay must be >= 0, got -0.1"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adafactor([torch.zeros(2, 2)], **kwargs)


def test_validation_applies_to_param_groups():
    with pytest.raises(ValueError, match=r"beta1 must be None or in \[0, 1\), got 2.0"):
        Adafactor([{"params": [torch.zeros(2)], "beta1": 2.0}, {"params": [torch.zeros(3)]}])


def test_signature_matches_transformers():
    """Same hyperparameter names and defaults as transformers (plus foreach), so configs carry over."""
    import inspect

    from flatlm.optim.registry import INJECTED

    ours = dict(inspect.signature(Adafactor).parameters)
    assert ours.pop("foreach").default is None
    for name in ("layout", "shard_sum"):  # what a backend injects (keyword-only), never hyperparameters
        assert name in INJECTED and ours.pop(name).kind is inspect.Parameter.KEYWORD_ONLY
    theirs = inspect.signature(HFAdafactor).parameters
    assert list(ours) == list(theirs)
    assert all(ours[k].default == theirs[k].default for k in ours if k != "params")


def test_relative_step_lr_caps_the_step():
    """relative_step=True with an lr: min(lr, 1/sqrt(t)) (torch's rule); lr=1e-2 is the paper's (no lr) bit for bit,
    and a smaller lr really lowers the step (a cap that did nothing would give the lr=None update)."""
    init = _params()
    paper, _ = _run(lambda ps: Adafactor(ps), init, _grads())
    same, _ = _run(lambda ps: Adafactor(ps, lr=1e-2), init, _grads())
    for a, b in zip(paper, same, strict=True):
        assert torch.equal(a, b)
    # One step (later ones depend on the path through RMS(X)): the update is linear in rho_1 = min(lr, 1) = lr.
    # float64, so that storing X does not round the small update.
    init64, grads64 = _params(dtype=torch.float64), _grads(steps=1, dtype=torch.float64)
    one, _ = _run(lambda ps: Adafactor(ps), init64, grads64)
    small, _ = _run(lambda ps: Adafactor(ps, lr=1e-3), init64, grads64)
    for p0, a, c in zip(init64, one, small, strict=True):
        _assert_rel(c - p0, (a - p0) / 10, tol=1e-10)
