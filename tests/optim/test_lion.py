"""Lion: lion-pytorch's two classes, an independent float64 transcription, sign(0), the three paths (eager one
tensor at a time, foreach, compiled fused loop) and the fused path's eager fallback, state, closure, missing
gradients, DTensor parameters and validation."""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import pytest
import torch
from lion_pytorch import Lion as RefLion
from lion_pytorch.foreach import Lion as RefForeachLion

from flatlm.optim import lion as lion_mod
from flatlm.optim.lion import Lion, lion

# 1-D, non-square 2-D both ways, 3-D, a single entry; sizes differ so the reused scratch buffer is sliced.
SHAPES = [(17,), (8, 12), (12, 8), (3, 5, 7), (1,)]
HP = [dict(lr=1e-2, weight_decay=0.0), dict(lr=1e-2, weight_decay=0.3, betas=(0.8, 0.95))]
STEPS = 6


def _tensors(shapes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def _grads(shapes, steps=STEPS, seed=1, dtype=torch.float32):
    return [_tensors(shapes, seed + k, dtype) for k in range(steps)]


def _run(make_opt, init, grads, opt_out=None):
    """Step an optimizer over a gradient sequence (None = no grad that step); return params and momenta."""
    params = [p.clone().requires_grad_() for p in init]
    opt = make_opt(params)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
    if opt_out is not None:
        opt_out.append(opt)
    return [p.detach() for p in params], [opt.state[p]["exp_avg"] for p in params]


def _transcribed(init, grads, lr, betas=(0.9, 0.99), weight_decay=0.0):
    """The paper's update, written out in float64 (Chen et al. 2023, Algorithm 2)."""
    b1, b2 = betas
    out = []
    for i, p0 in enumerate(init):
        theta, m = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64)
        for gs in grads:
            g = gs[i].double()
            c = b1 * m + (1 - b1) * g
            theta = theta - lr * (torch.sign(c) + weight_decay * theta)
            m = b2 * m + (1 - b2) * g
        out.append((theta, m))
    return out


@pytest.fixture(params=["whole", "pieces"])
def chunk(request, monkeypatch):
    """The one-at-a-time path as shipped (these small tensors are never split) and with pieces of 16 entries."""
    if request.param == "pieces":
        monkeypatch.setattr(lion_mod, "_CHUNK", 16)
    return request.param


@pytest.mark.parametrize("hp", HP)
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_lion_pytorch(hp, foreach, chunk):
    """Parameters bit-identical to lion_pytorch.Lion (same decay and sign step); the momentum uses lerp where it
    uses a multiply and an add, so it may differ by float32 rounding (|m| ~ 1 here: ulp ~ 1.2e-7)."""
    init, grads = _tensors(SHAPES, 0), _grads(SHAPES)
    ours = _run(lambda ps: Lion(ps, **hp, foreach=foreach), init, grads)
    ref = _run(lambda ps: RefLion(ps, **hp, use_triton=False), init, grads)
    for p, q in zip(ours[0], ref[0], strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    for m, n in zip(ours[1], ref[1], strict=True):
        torch.testing.assert_close(m, n, atol=1e-7, rtol=0)


@pytest.mark.parametrize("hp", HP)
def test_bit_identical_to_lion_pytorch_foreach(hp):
    """lion-pytorch's foreach class does the same arithmetic (lerp, sign, decay, add, lerp): no difference."""
    init, grads = _tensors(SHAPES, 0), _grads(SHAPES)
    ours = _run(lambda ps: Lion(ps, **hp), init, grads)
    ref = _run(lambda ps: RefForeachLion(ps, **hp), init, grads)
    for x, y in zip(ours[0] + ours[1], ref[0] + ref[1], strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("hp", HP)
def test_matches_float64_transcription(hp):
    init, grads = _tensors(SHAPES, 0, torch.float64), _grads(SHAPES, dtype=torch.float64)
    ours = _run(lambda ps: Lion(ps, **hp), init, grads)
    expected = _transcribed(init, grads, **hp)
    for p, m, (theta, m_exp) in zip(*ours, expected, strict=True):
        torch.testing.assert_close(p, theta, atol=1e-12, rtol=0)
        torch.testing.assert_close(m, m_exp, atol=1e-12, rtol=0)


def test_update_magnitude_is_lr():
    """Without decay every entry moves by exactly lr (float64, so no rounding hides a wrong scale)."""
    init, grads = _tensors(SHAPES, 0, torch.float64), _grads(SHAPES, steps=1, dtype=torch.float64)
    params, _ = _run(lambda ps: Lion(ps, lr=0.25), init, grads)
    for p, p0, g in zip(params, init, grads[0], strict=True):
        torch.testing.assert_close((p - p0).abs(), torch.full_like(p, 0.25), atol=1e-15, rtol=0)
        assert torch.equal(torch.sign(p - p0), -torch.sign(g))  # m = 0 at the first step: sign(c) = sign(g)


def test_sign_of_zero_is_zero():
    """Rows with zero gradient and zero momentum (an embedding row never looked up) only decay, as lion-pytorch."""
    init = _tensors([(6, 4)], 0)
    g = _tensors([(6, 4)], 1)[0]
    g[1::2] = 0.0  # rows 1, 3, 5: no gradient at all
    grads = [[g]] * 3
    hp = dict(lr=1e-2, weight_decay=0.5)
    (p,), (m,) = _run(lambda ps: Lion(ps, **hp), init, grads)
    (q,), _ = _run(lambda ps: RefLion(ps, **hp), init, grads)
    torch.testing.assert_close(p, q, atol=0, rtol=0)
    decayed = init[0][1::2].clone()
    for _ in range(3):
        decayed.mul_(1 - hp["lr"] * hp["weight_decay"])
    torch.testing.assert_close(p[1::2], decayed, atol=0, rtol=0)
    assert torch.count_nonzero(m[1::2]) == 0
    assert torch.all((p[0::2] - init[0][0::2]).abs() > hp["lr"] / 2)  # rows with gradient took sign steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_foreach_matches_loop(dtype, chunk):
    init, grads = _tensors(SHAPES, 0, dtype), _grads(SHAPES, dtype=dtype)
    loop = _run(lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1, foreach=False), init, grads)
    multi = _run(lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1, foreach=True), init, grads)
    for x, y in zip(loop[0] + loop[1], multi[0] + multi[1], strict=True):
        assert torch.equal(x, y)


def test_foreach_groups_mixed_dtypes():
    """The multi-tensor path groups by dtype; each tensor ends as on the one-at-a-time path."""
    tensors = [*_tensors(SHAPES[:2], 0, torch.float32), *_tensors(SHAPES[2:], 0, torch.float64)]
    grads = [[g.to(t.dtype) for g, t in zip(_tensors(SHAPES, k), tensors, strict=True)] for k in range(1, 4)]

    def run(foreach):
        params, moms = [t.clone() for t in tensors], [torch.zeros_like(t) for t in tensors]
        for gs in grads:
            lion(params, gs, moms, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, foreach=foreach)
        return params + moms

    for x, y in zip(run(False), run(True), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


# Nine tensors of 60 entries: one compiled call for eight of them, one for the ninth; the rest one call each.
FUSED_SHAPES = [*SHAPES, (6, 10), (60,), (10, 6), (2, 5, 6), (60,), (3, 20), (20, 3), (4, 15), (15, 4)]


@pytest.fixture
def fused(monkeypatch):
    """The CPU default path with every tensor compiled (these test tensors are below the sizes it compiles for)."""
    monkeypatch.setattr(lion_mod, "_FUSED_MIN", 0)
    monkeypatch.setattr(lion_mod, "_FUSED_MIN_STEP", 0)
    assert not lion_mod._compile_failed


@pytest.mark.parametrize("hp", HP)
def test_fused_matches_lion_pytorch(hp, fused):
    """The fused loop rounds differently from the eager ops: parameters to float32 rounding of the decay and the
    momentum to a few ulps. (A sign flip where |c| is within rounding of zero would show as 2 * lr: none here.)"""
    init, grads = _tensors(FUSED_SHAPES, 0), _grads(FUSED_SHAPES)
    ours = _run(lambda ps: Lion(ps, **hp), init, grads)
    ref = _run(lambda ps: RefLion(ps, **hp, use_triton=False), init, grads)
    for x, y in zip(ours[0] + ours[1], ref[0] + ref[1], strict=True):
        torch.testing.assert_close(x, y, atol=5e-7, rtol=0)
    assert not lion_mod._compile_failed


@pytest.mark.parametrize("hp", HP)
def test_fused_matches_float64_transcription(hp, fused):
    init, grads = _tensors(FUSED_SHAPES, 0, torch.float64), _grads(FUSED_SHAPES, dtype=torch.float64)
    ours = _run(lambda ps: Lion(ps, **hp), init, grads)
    for p, m, (theta, m_exp) in zip(*ours, _transcribed(init, grads, **hp), strict=True):
        torch.testing.assert_close(p, theta, atol=1e-12, rtol=0)
        torch.testing.assert_close(m, m_exp, atol=1e-12, rtol=0)
    assert not lion_mod._compile_failed


def test_fused_falls_back_to_eager_when_compile_fails(monkeypatch):
    """A failing torch.compile (no C++ compiler, say) warns once and leaves results exactly the eager path's."""

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no compiler here")

        return compiled

    monkeypatch.setattr(lion_mod, "_FUSED_MIN", 0)
    monkeypatch.setattr(lion_mod, "_FUSED_MIN_STEP", 0)
    monkeypatch.setattr(lion_mod, "_compiled", {})
    monkeypatch.setattr(lion_mod, "_compile_failed", False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    init, grads = _tensors(SHAPES, 0), _grads(SHAPES)
    with pytest.warns(UserWarning, match="torch.compile failed.*no compiler here") as record:
        ours = _run(lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1), init, grads)
    assert len(record) == 1 and lion_mod._compile_failed
    eager = _run(lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1, foreach=False), init, grads)
    for x, y in zip(ours[0] + ours[1], eager[0] + eager[1], strict=True):
        assert torch.equal(x, y)


def test_non_contiguous_param(chunk):
    """A transposed (non-contiguous) parameter: stepped whole (never split), into a contiguous temporary."""
    base = _tensors([(8, 12)], 0)[0]
    grads = _grads([(12, 8)], steps=3)
    p_t = base.t().clone().t().contiguous().t()  # shape (12, 8), strides of a transpose
    assert not p_t.is_contiguous()
    ours = _run(lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1), [p_t], grads)
    ref = _run(lambda ps: RefLion(ps, lr=1e-2, weight_decay=0.1), [p_t.contiguous()], grads)
    torch.testing.assert_close(ours[0][0], ref[0][0], atol=0, rtol=0)


def test_param_groups_with_their_own_hyperparameters():
    init, grads = _tensors(SHAPES, 0), _grads(SHAPES)

    def groups(ps):
        return [{"params": ps[:2], "weight_decay": 0.2, "lr": 3e-2}, {"params": ps[2:]}]

    ours = _run(lambda ps: Lion(groups(ps), lr=1e-2, betas=(0.85, 0.98)), init, grads)
    ref = _run(lambda ps: RefLion(groups(ps), lr=1e-2, betas=(0.85, 0.98)), init, grads)
    for p, q in zip(ours[0], ref[0], strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip(foreach):
    """Save after 3 steps, load into a fresh optimizer over fresh tensors, continue: same as uninterrupted."""
    init, grads = _tensors(SHAPES, 0), _grads(SHAPES)
    make = lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1, foreach=foreach)  # noqa: E731
    straight = _run(make, init, grads)
    first_opt: list[Lion] = []
    first, _ = _run(make, init, grads[:3], opt_out=first_opt)
    saved = copy.deepcopy(first_opt[0].state_dict())
    assert set(saved["state"][0]) == {"exp_avg"}

    def resumed_opt(ps):
        opt = make(ps)
        opt.load_state_dict(saved)
        return opt

    resumed = _run(resumed_opt, first, grads[3:])
    for x, y in zip(straight[0] + straight[1], resumed[0] + resumed[1], strict=True):
        assert torch.equal(x, y)


def test_loads_lion_pytorch_state_dict():
    """Same state key and group keys (foreach aside): a lion-pytorch run can be continued here."""
    init, grads = _tensors(SHAPES, 0), _grads(SHAPES)
    straight = _run(lambda ps: RefLion(ps, lr=1e-2), init, grads)
    ref_opt: list[RefLion] = []
    first, _ = _run(lambda ps: RefLion(ps, lr=1e-2), init, grads[:3], opt_out=ref_opt)
    saved = copy.deepcopy(ref_opt[0].state_dict())

    def resumed_opt(ps):
        opt = Lion(ps, lr=1e-2)
        opt.load_state_dict(saved)
        return opt

    resumed, _ = _run(resumed_opt, first, grads[3:])
    for x, y in zip(straight[0], resumed, strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_closure_is_evaluated_with_grad_and_returned():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([w], lr=0.1)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True]
    assert loss.item() == pytest.approx(5.25)
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, -1.9, 0.4]))


def test_params_without_grad_are_skipped():
    init = _tensors(SHAPES, 0)
    grads = [[None if i == 1 else g for i, g in enumerate(gs)] for gs in _grads(SHAPES, steps=2)]
    params = [p.clone().requires_grad_() for p in init]
    opt = Lion(params, lr=1e-2, weight_decay=0.5)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g
        opt.step()
    assert torch.equal(params[1].detach(), init[1])  # not even decayed
    assert params[1] not in opt.state
    assert not torch.equal(params[0].detach(), init[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "lr must be > 0, got 0.0"),
        (dict(lr=-1.0), "lr must be > 0, got -1.0"),
        (dict(lr=float("nan")), "lr must be > 0, got nan"),
        (dict(betas=(1.0, 0.99)), r"betas\[0\] must be in \[0, 1\), got 1.0"),
        (dict(betas=(-0.1, 0.99)), r"betas\[0\] must be in \[0, 1\), got -0.1"),
        (dict(betas=(0.9, 1.5)), r"betas\[1\] must be in \[0, 1\), got 1.5"),
        (dict(betas=(0.9,)), r"betas must be a pair"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Lion([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_hyperparameter_names_and_defaults():
    """The names and defaults of lion_pytorch.Lion (what the registry validates against), plus foreach."""
    sig = inspect.signature(Lion).parameters
    assert list(sig)[1:] == ["lr", "betas", "weight_decay", "foreach"]
    ref = inspect.signature(RefLion).parameters
    for name in ("lr", "betas", "weight_decay"):
        assert sig[name].default == ref[name].default


def test_sparse_gradient_is_refused():
    w = torch.nn.Parameter(torch.zeros(4))
    w.grad = torch.zeros(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        Lion([w]).step()


_DTENSOR_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
from flatlm.optim.lion import Lion
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
torch.manual_seed(0)
full, grad = torch.randn(8, 4), torch.randn(8, 4)
for foreach in (False, True, None):
    p = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
    p.grad = distribute_tensor(grad, mesh, [Shard(0)])
    Lion([p], lr=0.1, weight_decay=0.1, foreach=foreach).step()
    q = torch.nn.Parameter(full.clone())
    q.grad = grad.clone()
    Lion([q], lr=0.1, weight_decay=0.1, foreach=foreach).step()
    assert torch.equal(p.full_tensor(), q.detach()), foreach
dist.destroy_process_group()
print("ok")
"""


@pytest.mark.slow
def test_dtensor_params(tmp_path):
    """FSDP2-style DTensor parameters (one gloo rank, in a subprocess): every path steps them like plain tensors
    (the scratch buffer is a plain tensor, so DTensors get their own temporary; the fused path leaves them eager)."""
    pytest.importorskip("torch.distributed.tensor")
    out = subprocess.run(
        [sys.executable, "-c", _DTENSOR_SCRIPT, str(tmp_path / "store")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_small_steps_do_not_compile(monkeypatch):
    """Below _FUSED_MIN_STEP entries in all the default path stays eager: no compile for tiny models and tests."""
    monkeypatch.setattr(lion_mod, "_FUSED_MIN", 0)  # every tensor is large enough; only the step total says no
    monkeypatch.setattr(lion_mod, "_compiled", {})
    init, grads = _tensors(SHAPES, 0), _grads(SHAPES, steps=2)
    ours = _run(lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1), init, grads)
    eager = _run(lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1, foreach=False), init, grads)
    assert lion_mod._compiled == {}
    for x, y in zip(ours[0] + ours[1], eager[0] + eager[1], strict=True):
        assert torch.equal(x, y)
