"""SAM, ASAM, SSAM, GSAM, LookSAM, ESAM against their equations transcribed here on plain tensors.

The model is a tiny network with a 2-D (non-square), a 1-D and a 3-D parameter, in float64, on fixed data. The
flatlm side is driven exactly as flatlm/train/step.py drives it (pass 1, perturb, pass 2 with second_pass_loss,
restore, step); the reference side computes every gradient with torch.autograd.grad on a pure function and
applies the variant's formula per tensor, then steps its own copy of the same base optimizer.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from flatlm.optim.asam import ASAM
from flatlm.optim.esam import ESAM
from flatlm.optim.gsam import GSAM
from flatlm.optim.looksam import LookSAM
from flatlm.optim.sam import SAM, _add_scaled_sync_free, default_base_optimizer
from flatlm.optim.ssam import SSAM

DT = torch.float64
B = 8  # samples per batch


# --- the model: a pure function of its weights, and the same as an nn.Module ------------------------------------


def init_weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(6, 5, generator=g, dtype=DT) * 0.5,  # 2-D, non-square
        torch.randn(6, generator=g, dtype=DT) * 0.1,  # 1-D
        torch.randn(2, 3, 6, generator=g, dtype=DT) * 0.5,  # 3-D
    ]


def forward(ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w1, b1, w3 = ws
    h = torch.tanh(x @ w1.T + b1)  # [B, 6]
    return torch.einsum("bh,ijh->bij", h, w3)  # [B, 2, 3]


def per_sample_loss(ws: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((forward(ws, x) - y) ** 2).mean(dim=(1, 2))  # [B]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ws = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for w in init_weights()])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(list(self.ws), x, y)


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(B, 5, generator=g, dtype=DT), torch.randn(B, 2, 3, generator=g, dtype=DT)) for _ in range(n)]


# --- the reference: each variant's equation, per tensor ----------------------------------------------------------


def grads_at(ws, x, y, select=None):
    ws = [w.detach().clone().requires_grad_() for w in ws]
    per = per_sample_loss(ws, x, y)
    loss = per.mean() if select is None else per[select].mean()
    return per.detach(), [gr.detach() for gr in torch.autograd.grad(loss, ws)]


def norm(ts):
    return torch.sqrt(sum((t * t).sum() for t in ts))


def dot(xs, ys):
    return sum((x * y).sum() for x, y in zip(xs, ys, strict=True))


def reference_final_grad(name, hp, t, ws, x, y, lr, lr_max, state):
    per_w, g = grads_at(ws, x, y)
    if name == "looksam" and t % hp["k"] != 0:  # reuse step: g + alpha ||g|| / ||g_v|| g_v
        gv = state["g_v"]
        s = hp["alpha"] * norm(g) / (norm(gv) + 1e-12)
        return [gi + s * vi for gi, vi in zip(g, gv, strict=True)]
    rho = hp.get("rho", 0.05)
    if name == "asam":  # eps = rho T^2 g / ||T g||, T = |w| + eta
        T = [w.abs() + hp["eta"] for w in ws]
        n = norm([ti * gi for ti, gi in zip(T, g, strict=True)])
        eps = [rho * ti * ti * gi / (n + 1e-12) for ti, gi in zip(T, g, strict=True)]
    elif name == "esam":  # a Bernoulli(beta) subset of tensors, scaled 1/beta, whole-gradient norm
        mask = np.random.default_rng((hp["seed"], t)).random(len(ws)) < hp["beta"]
        eps = [
            (rho / hp["beta"]) * gi / (norm(g) + 1e-12) if m else torch.zeros_like(gi)
            for gi, m in zip(g, mask, strict=True)
        ]
    else:
        if name == "gsam" and hp.get("rho_min") is not None:  # rho_t proportional to lr
            rho = hp["rho_min"] + (rho - hp["rho_min"]) * (lr - hp["lr_min"]) / (lr_max - hp["lr_min"])
        eps = [rho * gi / (norm(g) + 1e-12) for gi in g]
    wp = [w + e for w, e in zip(ws, eps, strict=True)]
    select = None
    if name == "esam" and hp["gamma"] < 1:  # the ceil(gamma B) samples whose loss rose most
        per_p = per_sample_loss(wp, x, y).detach()
        select = torch.topk(per_p - per_w, math.ceil(hp["gamma"] * B)).indices
    _, gp = grads_at(wp, x, y, select)
    if name == "ssam":  # g' ||g|| / ||g'||
        return [gi * norm(g) / (norm(gp) + 1e-12) for gi in gp]
    if name == "gsam":  # g' - alpha (g - <g,g'>/||g'||^2 g')
        c = dot(g, gp) / (norm(gp) ** 2 + 1e-12)
        return [gpi - hp["alpha"] * (gi - c * gpi) for gi, gpi in zip(g, gp, strict=True)]
    if name == "looksam":  # store g_v = g' - <g,g'>/||g||^2 g; step with g'
        c = dot(g, gp) / (norm(g) ** 2 + 1e-12)
        state["g_v"] = [gpi - c * gi for gi, gpi in zip(g, gp, strict=True)]
    return gp


def run_reference(name, hp, base, steps, schedule=None):
    params = [torch.nn.Parameter(w) for w in init_weights()]
    opt = base(params)
    lr_max = opt.param_groups[0]["lr"]
    state = {}
    for t, (x, y) in enumerate(batches(steps)):
        lr = lr_max * (schedule(t) if schedule else 1.0)
        opt.param_groups[0]["lr"] = lr
        final = reference_final_grad(name, hp, t, [p.detach() for p in params], x, y, lr, lr_max, state)
        for p, f in zip(params, final, strict=True):
            p.grad = f.clone()
        opt.step()
    return [p.detach() for p in params]


# --- the flatlm side, driven like flatlm/train/step.py ---------------------------------------------------------


def train_step(model, opt, x, y):
    first = model(x, y)
    first.mean().backward()
    second = opt.perturb()
    if second:
        opt.second_pass_loss(model(x, y), first.detach()).backward()
        opt.restore()
    opt.step()
    opt.zero_grad()
    return second


def run_flatlm(cls, hp, base, steps, schedule=None, foreach=None, swap=None):
    model = Net()
    opt = cls(model.parameters(), base, **hp, foreach=foreach)
    opt.swap_weights = swap
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule else None
    for x, y in batches(steps):
        train_step(model, opt, x, y)
        if sched:
            sched.step()
    return [p.detach() for p in model.parameters()], opt


VARIANTS = {
    "sam": (SAM, {"rho": 0.1}),
    "asam": (ASAM, {"rho": 0.5, "eta": 0.01}),
    "ssam": (SSAM, {"rho": 0.1}),
    "gsam": (GSAM, {"rho": 0.1, "alpha": 0.3}),
    "looksam": (LookSAM, {"rho": 0.1, "k": 3, "alpha": 0.7}),
    "esam": (ESAM, {"rho": 0.1, "beta": 0.5, "gamma": 0.5, "seed": 3}),
}
BASES = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
}


def assert_close(a, b, **kw):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=kw.get("rtol", 1e-9), atol=kw.get("atol", 1e-11))


@pytest.mark.parametrize("swap", [True, False], ids=["swap-w", "copy-w"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_equation(name, base, swap):
    cls, hp = VARIANTS[name]
    ours, _ = run_flatlm(cls, hp, BASES[base], steps=7, swap=swap)
    ref = run_reference(name, hp, BASES[base], steps=7)
    start = init_weights()
    assert any(not torch.allclose(a, b) for a, b in zip(ours, start, strict=True))  # it trained
    assert_close(ours, ref)


def test_gsam_rho_follows_lr():
    hp = {"rho": 0.1, "alpha": 0.3, "rho_min": 0.02, "lr_min": 0.0}
    schedule = lambda t: 1.0 - 0.1 * t  # noqa: E731
    ours, opt = run_flatlm(GSAM, hp, BASES["sgd"], steps=5, schedule=schedule)
    assert_close(ours, run_reference("gsam", hp, BASES["sgd"], steps=5, schedule=schedule))
    # after 5 scheduler steps lr = 0.5 lr_max: rho_t = 0.02 + 0.08 * 0.5
    assert opt.current_rho() == pytest.approx(0.06)
    # the perturbation really has norm rho_t
    model = Net()
    opt = GSAM(model.parameters(), BASES["sgd"], **hp)
    opt.param_groups[0]["lr"] = 0.025  # a quarter of lr_max 0.1
    x, y = batches(1)[0]
    model(x, y).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.perturb()
    moved = [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]
    assert float(norm(moved)) == pytest.approx(0.02 + 0.08 * 0.25, rel=1e-9)


def test_special_cases_reduce_to_sam():
    sam, _ = run_flatlm(SAM, {"rho": 0.1}, BASES["adamw"], steps=4)
    gsam0, _ = run_flatlm(GSAM, {"rho": 0.1, "alpha": 0.0}, BASES["adamw"], steps=4)
    esam1, _ = run_flatlm(ESAM, {"rho": 0.1, "beta": 1.0, "gamma": 1.0}, BASES["adamw"], steps=4)
    look1, _ = run_flatlm(LookSAM, {"rho": 0.1, "k": 1}, BASES["adamw"], steps=4)
    for other in (gsam0, esam1, look1):
        for a, b in zip(sam, other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_foreach_matches_per_tensor_loop(name):
    cls, hp = VARIANTS[name]
    fast, _ = run_flatlm(cls, hp, BASES["adamw"], steps=5, foreach=True)
    loop, _ = run_flatlm(cls, hp, BASES["adamw"], steps=5, foreach=False)
    assert_close(fast, loop, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("swap", [True, False], ids=["swap-w", "copy-w"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_restore_is_bit_exact_and_perturb_drops_grads(name, dtype, swap):
    cls, hp = VARIANTS[name]
    model = Net().to(dtype)
    opt = cls(model.parameters(), BASES["sgd"], **hp)
    opt.swap_weights = swap
    storage = [p.data_ptr() for p in model.parameters()]
    x, y = (t.to(dtype) for t in batches(1)[0])
    first = model(x, y)
    first.mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.perturb()  # step 0 is a full step for every variant
    moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)]
    assert any(moved)
    if name != "esam":
        assert all(moved)
    assert all(p.grad is None for p in model.parameters())  # zeroed as torch's zero_grad does: set to None
    opt.second_pass_loss(model(x, y), first.detach()).backward()
    opt.restore()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert [p.data_ptr() for p in model.parameters()] == storage  # the same storage is back, in both modes


def test_swap_is_decided_by_the_views():
    model = Net()
    opt = SAM(model.parameters(), BASES["sgd"], rho=0.1)
    params = list(model.parameters())
    assert all(v.swappable for v in opt.param_views())
    flat = torch.zeros(sum(p.numel() for p in params), dtype=DT)
    views = [torch.nn.Parameter(flat[:30].view(6, 5))]  # like DeepSpeed's params inside a flat buffer
    views[0].data = flat[:30].view(6, 5)
    in_flat = SAM(views, BASES["sgd"], rho=0.1)
    assert not in_flat.param_views()[0].swappable
    views[0].grad = torch.ones(6, 5, dtype=DT)
    assert in_flat.perturb()
    assert views[0].data_ptr() == flat.data_ptr()  # w + eps written into the flat buffer itself, not swapped out
    assert torch.all(flat[:30] != 0) and torch.all(flat[30:] == 0)


@pytest.mark.parametrize("name", ["gsam", "looksam"])
def test_gradients_in_a_shared_buffer_are_kept_by_copy(name):
    # DDP's gradient_as_bucket_view writes every backward into the same flat buffer; the pass-1 gradient these
    # variants keep for restore must not be overwritten by pass 2
    cls, hp = VARIANTS[name]
    x, y = batches(1)[0]

    def final_grads(shared_buffer):
        model = Net()
        opt = cls(model.parameters(), BASES["sgd"], **hp)
        params = list(model.parameters())
        flat = torch.zeros(sum(p.numel() for p in params), dtype=DT)
        views = list(torch.split(flat, [p.numel() for p in params]))

        def backward(loss):
            grads = torch.autograd.grad(loss, params)
            for p, v, gr in zip(params, views, grads, strict=True):
                if shared_buffer:
                    v.copy_(gr.reshape(-1))
                    p.grad = v.view(p.shape)
                else:
                    p.grad = gr.clone()

        first = model(x, y)
        backward(first.mean())
        opt.perturb()
        backward(opt.second_pass_loss(model(x, y), first.detach()))
        opt.restore()
        return [p.grad.clone() for p in params]

    for a, b in zip(final_grads(True), final_grads(False), strict=True):
        assert torch.equal(a, b)


def test_param_groups_shared_with_base_and_scheduler():
    model = Net()
    groups = [{"params": [model.ws[0], model.ws[2]], "lr": 0.1}, {"params": [model.ws[1]], "lr": 0.01}]
    opt = SAM(groups, BASES["adamw"])
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.defaults["rho"] == 0.05 and opt.defaults["betas"] == (0.9, 0.999)  # merged
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** (t + 1))
    assert [g["lr"] for g in opt.base_optimizer.param_groups] == [0.05, 0.005]
    for x, y in batches(2):
        train_step(model, opt, x, y)
        sched.step()
    assert [g["lr"] for g in opt.base_optimizer.param_groups] == pytest.approx([0.0125, 0.00125])
    # still one set after a load_state_dict (torch's load replaces the base's group dicts)
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched.step()
    assert [g["lr"] for g in opt.base_optimizer.param_groups] == pytest.approx([0.00625, 0.000625])
    assert opt.state is opt.base_optimizer.state and len(opt.state) == 3
    extra = torch.nn.Parameter(torch.zeros(2, dtype=DT))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert opt.param_groups is opt.base_optimizer.param_groups and len(opt.param_groups) == 3
    assert opt.param_groups[2]["sam_step"] == opt.sam_step == 2 and opt.param_groups[2]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_step_closure_equals_perturb_restore_flow(name):
    cls, hp = VARIANTS[name]
    if name == "esam":
        hp = {**hp, "gamma": 1.0}  # a closure has no per-sample losses: no data selection
    flow, _ = run_flatlm(cls, hp, BASES["adamw"], steps=5)
    model = Net()
    opt = cls(model.parameters(), BASES["adamw"], **hp)
    for x, y in batches(5):

        def closure(x=x, y=y):
            loss = model(x, y).mean()
            loss.backward()
            return loss

        loss = opt.step(closure)
        opt.zero_grad()
        assert loss.shape == () and torch.isfinite(loss)
    for a, b in zip(flow, [p.detach() for p in model.parameters()], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("name", "hp"),
    [
        ("looksam", {"rho": 0.1, "k": 3, "alpha": 0.7}),  # save after 4 steps: mid-cycle, g_v in use
        ("esam", {"rho": 0.1, "beta": 0.5, "gamma": 0.5, "seed": 3}),  # the random subset continues
        ("gsam", {"rho": 0.1, "alpha": 0.3, "rho_min": 0.02}),
        ("sam", {"rho": 0.1}),
    ],
)
def test_state_dict_round_trip_resumes_exactly(name, hp):
    cls = VARIANTS[name][0]
    schedule = lambda t: 1.0 - 0.05 * t  # noqa: E731
    data = batches(8)

    def make(seed_hp):
        model = Net()
        opt = cls(model.parameters(), BASES["adamw"], **seed_hp)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    model, opt, sched = make(hp)
    for x, y in data:
        train_step(model, opt, x, y)
        sched.step()
    full = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = make(hp)
    for x, y in data[:4]:
        train_step(model, opt, x, y)
        sched.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    if name == "looksam":
        assert "sam_g_v" in ckpt["opt"]["state"][0] and "exp_avg" in ckpt["opt"]["state"][0]
    # a fresh process: other seed in the constructor (the checkpoint's wins, as torch's param_groups do)
    model, opt, sched = make({**hp, "seed": 99} if name == "esam" else hp)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    assert opt.sam_step == 4
    for x, y in data[4:]:
        train_step(model, opt, x, y)
        sched.step()
    for a, b in zip(full, model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_fresh_state_dict_has_every_key_after_a_zero_grad_step():
    # torch.distributed.checkpoint initialises optimizer state by one step on zero grads; the wrapper's state
    # must then exist too, and `state` must be non-empty (DCP checks it before that step)
    model = Net()
    opt = LookSAM(model.parameters(), BASES["adamw"])
    assert not opt.state
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.state
    keys = set(opt.state_dict()["state"][2])
    assert {"sam_g_v", "exp_avg", "exp_avg_sq", "step"} <= keys


@pytest.mark.parametrize("name", ["looksam", "esam"])
def test_distributed_checkpoint_state_dict_round_trip(name):
    # torch.distributed.checkpoint keys optimizer state by parameter name; the wrapper's state must survive it
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    cls, hp = VARIANTS[name]
    data = batches(6)

    def make():
        model = Net()
        return model, cls(model.parameters(), BASES["adamw"], **hp)

    model, opt = make()
    for x, y in data:
        train_step(model, opt, x, y)
    full = [p.detach().clone() for p in model.parameters()]

    model, opt = make()
    for x, y in data[:4]:
        train_step(model, opt, x, y)
    osd = get_optimizer_state_dict(model, opt)
    assert set(osd["state"]) == {"ws.0", "ws.1", "ws.2"}
    if name == "looksam":
        assert {"sam_g_v", "exp_avg"} <= set(osd["state"]["ws.2"])
    msd = copy.deepcopy(model.state_dict())
    osd = copy.deepcopy(osd)
    model, opt = make()
    template = get_optimizer_state_dict(model, opt)  # DCP initialises state by a step on zero grads first
    assert ("sam_g_v" in template["state"]["ws.0"]) == (name == "looksam")
    model.load_state_dict(msd)
    set_optimizer_state_dict(model, opt, osd)
    for x, y in data[4:]:
        train_step(model, opt, x, y)
    for a, b in zip(full, model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_looksam_second_pass_every_k_steps():
    model = Net()
    opt = LookSAM(model.parameters(), BASES["sgd"], k=3)
    seen = []
    for x, y in batches(7):
        first = model(x, y)
        first.mean().backward()
        before = [p.detach().clone() for p in model.parameters()]
        second = opt.perturb()
        seen.append(second)
        if not second:  # weights untouched, grads already final
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
        else:
            opt.second_pass_loss(model(x, y), first.detach()).backward()
            opt.restore()
        opt.step()
        opt.zero_grad()
    assert seen == [True, False, False, True, False, False, True]


def test_esam_second_pass_loss_selects_largest_increase():
    opt = ESAM([torch.nn.Parameter(torch.zeros(2))], BASES["sgd"], gamma=0.5)
    first = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    second = torch.tensor([1.5, 0.2, 3.0, 1.1, 2.0], requires_grad=True)
    # increases 0.5, -0.8, 2.0, 0.1, 1.0 -> ceil(2.5) = 3 largest: samples 2, 4, 0
    loss = opt.second_pass_loss(second, first)
    assert loss.item() == pytest.approx((3.0 + 2.0 + 1.5) / 3)
    loss.backward()
    assert second.grad.tolist() == pytest.approx([1 / 3, 0.0, 1 / 3, 0.0, 1 / 3])
    # the selection is by increase, not by loss: a high loss that did not rise is dropped
    sel = opt.second_pass_loss(torch.tensor([9.0, 1.2, 1.1, 1.0]), torch.tensor([9.0, 0.0, 1.0, 1.0]))
    assert sel.item() == pytest.approx((1.2 + 1.1) / 2)
    assert ESAM([torch.nn.Parameter(torch.zeros(2))], BASES["sgd"], gamma=1.0).second_pass_loss(
        second, first
    ).item() == pytest.approx(second.mean().item())
    assert SAM([torch.nn.Parameter(torch.zeros(2))], BASES["sgd"]).second_pass_loss(second, first).item() == (
        pytest.approx(second.mean().item())
    )
    with pytest.raises(ValueError, match="differ in shape"):
        opt.second_pass_loss(second, first[:3])


def test_esam_mask_is_a_function_of_seed_and_step():
    def perturbed(seed):
        out = []
        model = Net()
        opt = ESAM(model.parameters(), BASES["sgd"], beta=0.5, seed=seed)
        for x, y in batches(6):
            first = model(x, y)
            first.mean().backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.perturb()
            out.append(tuple(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)))
            opt.second_pass_loss(model(x, y), first.detach()).backward()
            opt.restore()
            opt.step()
            opt.zero_grad()
        return out

    a = perturbed(3)
    assert a == perturbed(3)
    assert a == [tuple(np.random.default_rng((3, t)).random(3) < 0.5) for t in range(6)]
    assert len(set(a)) > 1  # the subset changes from step to step


# per variant: (reductions in perturb, reductions in restore) on step 0, and on step 1 (LookSAM reuses)
REDUCTIONS = {"sam": (1, 0), "asam": (1, 0), "ssam": (1, 1), "gsam": (1, 1), "looksam": (1, 1), "esam": (1, 0)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_reduction_goes_through_sum_across_ranks(name):
    cls, hp = VARIANTS[name]
    model = Net()
    opt = cls(model.parameters(), BASES["sgd"], **hp)
    calls = []

    def hook(local):  # two ranks holding identical shards: global sums are twice the local ones
        calls.append(local.clone())
        return 2 * local

    opt.sum_across_ranks = hook
    x, y = batches(1)[0]
    first = model(x, y)
    first.mean().backward()
    g = [p.grad.clone() for p in model.parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    opt.perturb()
    n_perturb = len(calls)
    if name == "sam":  # eps = rho g / sqrt(2 sum g^2): norm rho / sqrt(2); the hook saw the local sum of squares
        assert calls[0].tolist() == pytest.approx([float(norm(g) ** 2)])
        eps = [p.detach() - wi for p, wi in zip(model.parameters(), w, strict=True)]
        assert float(norm(eps)) == pytest.approx(0.1 / math.sqrt(2), rel=1e-9)
    opt.second_pass_loss(model(x, y), first.detach()).backward()
    opt.restore()
    assert (n_perturb, len(calls) - n_perturb) == REDUCTIONS[name]
    if name == "looksam":  # a reuse step: one call for (||g||^2, ||g_v||^2)
        opt.step()
        opt.zero_grad()
        model(x, y).mean().backward()
        assert not opt.perturb()
        assert len(calls) == 3 and calls[-1].shape == (2,)


def test_params_without_grad_are_skipped():
    model = Net()
    unused = torch.nn.Parameter(torch.ones(3, dtype=DT))
    opt = GSAM([*model.parameters(), unused], BASES["sgd"])
    for x, y in batches(3):
        train_step(model, opt, x, y)
    assert unused.grad is None and torch.equal(unused, torch.ones(3, dtype=DT))


def test_misuse_is_loud():
    model = Net()
    opt = SAM(model.parameters(), BASES["sgd"])
    with pytest.raises(RuntimeError, match="without a perturb"):
        opt.restore()
    x, y = batches(1)[0]
    model(x, y).mean().backward()
    assert opt.perturb()
    with pytest.raises(RuntimeError, match="between perturb"):
        opt.step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.perturb()
    with pytest.raises(TypeError, match="base_optimizer must return"):
        SAM(model.parameters(), lambda groups: None)
    with pytest.raises(ValueError, match="on the parameter groups it is given"):
        SAM(model.parameters(), lambda groups: torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    with pytest.raises(ValueError, match="empty parameter list"):
        SAM([], BASES["sgd"])


def test_default_base_is_adamw():
    opt = SAM(Net().parameters())
    assert isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert isinstance(default_base_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}]), torch.optim.AdamW)


def test_sync_free_scaled_add_matches():
    # the accelerator path (scale stays a tensor, no host read) computed on CPU tensors
    dst = [torch.ones(3, dtype=DT), torch.ones(2, 2, dtype=DT)]
    src = [torch.arange(3, dtype=DT), torch.full((2, 2), 2.0, dtype=DT)]
    for foreach in (True, False):
        for scratch in (True, False):
            d, s = copy.deepcopy(dst), copy.deepcopy(src)
            _add_scaled_sync_free(d, s, torch.tensor(0.5, dtype=DT), foreach, scratch)
            assert d[0].tolist() == [1.0, 1.5, 2.0] and d[1].tolist() == [[2.0, 2.0], [2.0, 2.0]]


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (SAM, {"rho": 0.0}, "rho must be > 0, got 0.0"),
        (SAM, {"rho": -1}, "rho must be > 0, got -1"),
        (SAM, {"rho": float("nan")}, "rho must be > 0, got nan"),
        (SAM, {"rho": True}, "rho must be > 0, got True"),
        (ASAM, {"eta": -0.1}, "eta must be >= 0, got -0.1"),
        (GSAM, {"alpha": -1.0}, "alpha must be >= 0, got -1.0"),
        (GSAM, {"rho": 0.05, "rho_min": 0.1}, r"rho_min must be <= rho \(0.05\), got 0.1"),
        (GSAM, {"rho_min": -0.1}, "rho_min must be >= 0, got -0.1"),
        (GSAM, {"lr_min": -1.0}, "lr_min must be >= 0, got -1.0"),
        (LookSAM, {"k": 0}, "k must be an integer >= 1, got 0"),
        (LookSAM, {"k": 2.5}, "k must be an integer >= 1, got 2.5"),
        (LookSAM, {"alpha": -0.7}, "alpha must be >= 0, got -0.7"),
        (ESAM, {"beta": 0.0}, r"beta must be in \(0, 1\], got 0.0"),
        (ESAM, {"beta": 1.5}, r"beta must be in \(0, 1\], got 1.5"),
        (ESAM, {"gamma": 0}, r"gamma must be in \(0, 1\], got 0"),
        (ESAM, {"seed": -1}, "seed must be an integer >= 0, got -1"),
    ],
)
def test_validation(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(Net().parameters(), BASES["sgd"], **kwargs)
