r"""Adafactor: adaptive step sizes with a factored (sublinear-memory) second moment.

Source: N. Shazeer and M. Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost" (ICML 2018,
arXiv:1804.04235), Algorithms 4-5 with the relative step size, parameter scale and update clipping of Section 8.
Hyperparameter names, defaults and arithmetic follow ``transformers.optimization.Adafactor`` (the fairseq port),
which flatlm's tests use as the reference.

One step for a parameter X with gradient G at step t (counted from 1), eps = (eps1, eps2), clip threshold d:

    rho_t   = min(1e-6 t if warmup_init else 1e-2, 1/sqrt(t))   if relative_step, else lr
              (relative_step with an lr: 1e-2 becomes lr, rho_t = min(lr, 1/sqrt(t)), torch.optim.Adafactor's rule)
    alpha_t = max(eps2, RMS(X_{t-1})) rho_t                     if scale_parameter, else rho_t
    beta2_t = 1 - t^decay_rate                                  (0 at t = 1: the first estimate is G^2 itself)
    G2      = G^2 + eps1                                        elementwise
    factored (X has >= 2 dims; rows are dim -2, columns dim -1, leading dims are a batch of matrices):
        R_t = beta2_t R_{t-1} + (1 - beta2_t) mean_j G2_ij       [..., n]   "exp_avg_sq_row" (mean over dim -1)
        C_t = beta2_t C_{t-1} + (1 - beta2_t) mean_i G2_ij       [..., m]   "exp_avg_sq_col" (mean over dim -2)
        V_t = (R_t / mean(R_t)) outer C_t                        never materialised
    otherwise (1-D):
        V_t = beta2_t V_{t-1} + (1 - beta2_t) G2                 "exp_avg_sq"
    U_t     = G / sqrt(V_t)
    U_t     = U_t / max(1, RMS(U_t) / d)                         update clipping
    U_t     = alpha_t U_t
    M_t     = beta1 M_{t-1} + (1 - beta1) U_t;  U_t = M_t        only if beta1 is not None ("exp_avg")
    X_t     = X_{t-1} - weight_decay alpha_t X_{t-1} - U_t

RMS(x) = ||x||_2 / sqrt(numel(x)). Weight decay is as transformers does it: scaled by alpha_t (the parameter-scaled
relative step), applied to the parameter before the update, not added to the gradient.

mean(R_t) = mean(C_t): both are EMAs (same betas, same zero start) of the mean of G2 over the whole matrix. flatlm
normalises by mean(C_t), which is exact in exact arithmetic and, unlike mean(R_t), needs no reduction across
row shards (see below). Floating-point results differ from transformers' by rounding only (~1e-7 relative).

Low precision: for float16/bfloat16 parameters the math runs in float32 (a float32 copy of the gradient and of the
parameter, float32 state) and the result is copied back, as transformers does.

State per parameter: ``step`` (float32 scalar tensor, as torch.optim keeps it); ``exp_avg_sq_row`` [..., n] and
``exp_avg_sq_col`` [..., m] for >= 2-D parameters (n + m numbers per n x m matrix), or ``exp_avg_sq`` (as the
parameter) for 1-D ones; ``exp_avg`` (as the parameter) when beta1 is set. State is float32 for low-precision
parameters. transformers also stores the last RMS(X) as ``RMS``; flatlm recomputes it and keeps no copy.

Reductions and sharding. Everything above is elementwise except three reductions, which sit behind
:class:`Reductions` (``Adafactor.reductions``): the update math calls them and nothing else that needs the whole
parameter. In the order one step calls them:
    1. ``rms(X)``       RMS of the parameter (scale_parameter only)       all-reduce of the sum of squares
    2. ``row_mean(G2)`` mean over the last dim, one per row               local under dim-0 sharding
       ``col_mean(G2)`` mean over dim -2, one per column                  all-reduce of the partial sums
    3. ``rms(U)``       RMS of the update, for clipping                   all-reduce of the sum of squares
Under dim-0 (row) sharding of a matrix, R is local and C is whole after 2., so mean(C) needs nothing more: a
sharded wrapper overrides ``col_mean`` and ``rms`` to all-reduce and calls the same math (tests/optim/
test_adafactor.py simulates this with two threads). The fast path passes ``rms`` a row-shaped tensor with the same
RMS as U (see ``_multi_tensor_adafactor``), sharded like U's rows. Under a flat partition that splits rows, the
factored statistics are meaningless: such a wrapper must recover (param, rows) views or refuse.

Differences from ``torch.optim.Adafactor`` (torch >= 2.5), a separate implementation of the same paper:
    - always a relative step with rho_t = min(lr, 1/sqrt(t)) and always the parameter scale: no absolute-lr mode,
      no scale_parameter=False, no warmup_init. lr=1e-2 there equals relative_step=True here, and any lr there
      equals relative_step=True with the same lr here (transformers refuses that pair; flatlm takes torch's
      meaning, so that a schedule in the training loop can drive the relative step's cap).
    - eps1 is not added to G^2; instead V_t is clamped to >= eps1^2 and mean(R_t) to >= eps1 (default eps1 = the
      dtype's machine epsilon, so tiny gradients are scaled differently).
    - weight decay is decoupled and uses its lr, X *= 1 - lr weight_decay, not alpha_t.
    - no first moment (beta1), and its state has no ``exp_avg``; ``row_var``/``col_var``/``variance`` hold
      R, C, V with singleton dims kept.
  With beta1=None, weight_decay=0, eps1 tiny and the default relative step the two agree to rounding (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Reductions:
    """The reductions Adafactor needs over a whole parameter; these are the local (unsharded) versions.

    Each takes a tensor shaped like the parameter (or like its rows, ``[..., n]``) and returns the statistic
    of the *whole* parameter. A sharded wrapper subclasses this, computes the local partial sums,
    all-reduces them and divides by the global count; then it calls the same update functions.
    Row and column means are matrix-vector products: on CPU BLAS reads the matrix once, faster than ``mean``.
    """

    def row_mean(self, x: Tensor) -> Tensor:
        """Mean over the last dim, one per row: ``[..., n, m] -> [..., n]``. Local under dim-0 sharding."""
        return x @ x.new_full((x.shape[-1],), 1.0 / x.shape[-1])

    def col_mean(self, x: Tensor) -> Tensor:
        """Mean over dim -2, one per column: ``[..., n, m] -> [..., m]``. Dim-0 sharded: all-reduce the sums."""
        return x.new_full((x.shape[-2],), 1.0 / x.shape[-2]) @ x

    def rms(self, x: Tensor) -> Tensor:
        """sqrt(mean(x^2)) over all of x, a 0-d tensor. Under sharding: all-reduce the sum of squares."""
        return torch.linalg.vector_norm(x) / math.sqrt(x.numel())


LOCAL_REDUCTIONS = Reductions()


def _local(x: Tensor) -> Tensor:
    """This rank's part of a dim-0 sharded DTensor (same storage), else ``x``."""
    return x.to_local() if hasattr(x, "to_local") else x


def _local_or_none(x: Tensor | None) -> Tensor | None:
    return None if x is None else _local(x)


def _like_rows(local: Tensor, param: Tensor, shape: torch.Size, replicated: bool = False) -> Tensor:
    """State for ``param``: a plain tensor, or for a DTensor parameter a DTensor on its mesh, sharded by rows
    like it (or replicated: column statistics), so checkpoints key and reshard it like the parameter."""
    if not hasattr(param, "to_local"):
        return local
    from torch.distributed.tensor import DTensor, Replicate

    placements = [Replicate()] * len(param.placements) if replicated else param.placements
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, param.device_mesh, placements, run_check=False, shape=shape, stride=stride)


def _relative_step(t: float, *, lr: float | None, relative_step: bool, warmup_init: bool) -> float:
    """rho_t: the step size before the parameter scale."""
    if not relative_step:
        assert lr is not None
        return lr
    cap = 1e-2 if lr is None else lr  # an lr caps the relative step (torch.optim.Adafactor's rule)
    min_step = min(cap, 1e-6 * t) if warmup_init else cap
    return min(min_step, 1.0 / math.sqrt(t))


def _single_tensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    lr: float | None,
    eps: tuple[float, float],
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    reductions: Reductions = LOCAL_REDUCTIONS,
) -> None:
    """The update, one tensor at a time, in the order of the module docstring. State lists hold None where unused."""
    eps1, eps2 = eps
    for i, param in enumerate(params):
        x = param.float() if param.dtype in _LOW_PRECISION else param  # fp32 copy for bf16/fp16
        grad = grads[i].to(x.dtype)  # no copy when the dtypes agree
        step = state_steps[i]
        step += 1
        t = step.item()
        rho = _relative_step(t, lr=lr, relative_step=relative_step, warmup_init=warmup_init)
        alpha = reductions.rms(x).clamp(min=eps2) * rho if scale_parameter else rho
        beta2 = 1.0 - t**decay_rate

        row, col = exp_avg_sq_rows[i], exp_avg_sq_cols[i]
        if row is not None and col is not None:  # factored: [..., n, m]
            grad2 = grad * grad + eps1  # G2 [..., n, m]
            row.lerp_(reductions.row_mean(grad2), 1.0 - beta2)  # R [..., n]
            col.lerp_(reductions.col_mean(grad2), 1.0 - beta2)  # C [..., m]
            r = (row / col.mean(dim=-1, keepdim=True)).rsqrt()  # 1/sqrt(R / mean(R)), mean(R) == mean(C)
            update = grad * r.unsqueeze(-1) * col.rsqrt().unsqueeze(-2)  # G / sqrt(V), [..., n, m]
        else:
            v = exp_avg_sqs[i]
            assert v is not None
            v.lerp_(grad * grad + eps1, 1.0 - beta2)
            update = grad * v.rsqrt()
        update.div_((reductions.rms(update) / clip_threshold).clamp_(min=1.0))  # clip the RMS to <= d
        update.mul_(alpha)

        m = exp_avgs[i]
        if m is not None:
            m.lerp_(update, 1.0 - beta1)  # type: ignore[operator]
            update = m
        if weight_decay != 0:
            x.mul_(1.0 - weight_decay * alpha)
        x.sub_(update)
        if x is not param:
            param.copy_(x)


def _multi_tensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    lr: float | None,
    eps: tuple[float, float],
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    reductions: Reductions = LOCAL_REDUCTIONS,
) -> None:
    """The same update with fewer passes over memory and fewer allocations (the step is memory-bound on CPU).

    Per matrix, one scratch buffer (shared by all matrices, allocated once per call) holds G^2 and then the
    rank-1 factor; neither V nor U is ever materialised. With c = C^(-1/2) per column and r = (R / mean(C))^(-1/2)
    per row, U_ij = G_ij r_i c_j, and

        RMS(U)^2 = mean_i r_i^2 mean_j G2_ij c_j^2      a matrix-vector product on G2, so RMS(U) = rms(r s)
                                                        with s_i = sqrt(mean_j G2_ij c_j^2), a row-shaped tensor
        X <- X - (k r) outer c * G                      k = alpha_t / max(1, RMS(U) / d) folded into the row vector

    (eps1 is added to the means of G^2 rather than to G^2: equal up to rounding). Matrix-sized traffic without
    beta1: X read twice and written once, G read twice, the buffer written twice and read four times (it stays in
    cache); transformers allocates about six matrix-sized temporaries instead. 1-D parameters go through
    torch._foreach_* ops together.
    """
    eps1, eps2 = eps
    steps = [s.add_(1).item() for s in state_steps]
    rhos = [_relative_step(t, lr=lr, relative_step=relative_step, warmup_init=warmup_init) for t in steps]
    one_minus_beta2 = [t**decay_rate for t in steps]

    vector_idx = [i for i, row in enumerate(exp_avg_sq_rows) if row is None]
    matrix_idx = [i for i, row in enumerate(exp_avg_sq_rows) if row is not None]

    sizes: dict[tuple[torch.device, torch.dtype], int] = {}  # per device and compute dtype: the largest matrix
    for i in matrix_idx:
        key = (params[i].device, torch.float32 if params[i].dtype in _LOW_PRECISION else params[i].dtype)
        sizes[key] = max(sizes.get(key, 0), params[i].numel())
    scratch = {key: torch.empty(numel, device=key[0], dtype=key[1]) for key, numel in sizes.items()}

    for i in matrix_idx:
        param, row, col = params[i], exp_avg_sq_rows[i], exp_avg_sq_cols[i]
        assert row is not None and col is not None
        x = param.float() if param.dtype in _LOW_PRECISION else param
        grad = grads[i].to(x.dtype)
        buf = scratch[(param.device, x.dtype)][: param.numel()].view(param.shape)
        alpha = reductions.rms(x).clamp_(min=eps2).mul_(rhos[i]) if scale_parameter else rhos[i]

        grad2 = torch.mul(grad, grad, out=buf)  # G2 without eps1, [..., n, m]
        row.lerp_(reductions.row_mean(grad2).add_(eps1), one_minus_beta2[i])  # R [..., n]
        col.lerp_(reductions.col_mean(grad2).add_(eps1), one_minus_beta2[i])  # C [..., m]
        c = col.rsqrt()  # [..., m]
        r = (row / col.mean(dim=-1, keepdim=True)).rsqrt_()  # [..., n]; mean(R) == mean(C)
        s = (grad2 @ (c * c).unsqueeze(-1)).squeeze(-1).div_(c.shape[-1]).sqrt_()  # [..., n]
        update_rms = reductions.rms(s.mul_(r))  # == RMS(U)
        k = alpha / (update_rms / clip_threshold).clamp_(min=1.0)
        factor = torch.mul(r.mul_(k).unsqueeze(-1), c.unsqueeze(-2), out=buf)  # k r_i c_j, [..., n, m]

        m = exp_avgs[i]
        if m is not None:
            m.lerp_(factor.mul_(grad), 1.0 - beta1)  # type: ignore[operator]  # M <- beta1 M + (1 - beta1) U
        if weight_decay != 0:
            x.mul_(1.0 - weight_decay * alpha)
        if m is not None:
            x.sub_(m)
        else:
            x.addcmul_(factor, grad, value=-1.0)
        if x is not param:
            param.copy_(x)

    if vector_idx:
        _foreach_unfactored(
            [params[i] for i in vector_idx],
            [grads[i] for i in vector_idx],
            [exp_avg_sqs[i] for i in vector_idx],  # type: ignore[misc]
            [exp_avgs[i] for i in vector_idx],
            rhos=[rhos[i] for i in vector_idx],
            one_minus_beta2=[one_minus_beta2[i] for i in vector_idx],
            eps1=eps1,
            eps2=eps2,
            clip_threshold=clip_threshold,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            reductions=reductions,
        )


def _foreach_unfactored(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avgs: list[Tensor | None],
    *,
    rhos: list[float],
    one_minus_beta2: list[float],
    eps1: float,
    eps2: float,
    clip_threshold: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    reductions: Reductions,
) -> None:
    """The unfactored (1-D) update for a list of tensors with torch._foreach_* ops; the RMS hooks stay per tensor."""
    xs = [p.float() if p.dtype in _LOW_PRECISION else p for p in params]
    gs = [g.to(x.dtype) for g, x in zip(grads, xs, strict=True)]
    if scale_parameter:
        alphas: list[Any] = [reductions.rms(x).clamp_(min=eps2).mul_(rho) for x, rho in zip(xs, rhos, strict=True)]
    else:
        alphas = rhos
    g2 = torch._foreach_mul(gs, gs)
    torch._foreach_add_(g2, eps1)
    torch._foreach_lerp_(exp_avg_sqs, g2, one_minus_beta2)  # V
    updates = torch._foreach_rsqrt(exp_avg_sqs)
    torch._foreach_mul_(updates, gs)  # G / sqrt(V)
    scales = [
        alpha / (reductions.rms(u) / clip_threshold).clamp_(min=1.0) for u, alpha in zip(updates, alphas, strict=True)
    ]
    torch._foreach_mul_(updates, scales)
    if beta1 is not None:
        ms: list[Tensor] = exp_avgs  # type: ignore[assignment]
        torch._foreach_lerp_(ms, updates, 1.0 - beta1)
        updates = ms
    if weight_decay != 0:
        torch._foreach_mul_(xs, [1.0 - weight_decay * a for a in alphas])
    torch._foreach_sub_(xs, updates)
    for x, p in zip(xs, params, strict=True):
        if x is not p:
            p.copy_(x)


def adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    **hparams: Any,
) -> None:
    """Functional Adafactor: the per-tensor path (``foreach=False``) or the fast one (None/True, the default)."""
    fn = _single_tensor_adafactor if foreach is False else _multi_tensor_adafactor
    fn(params, grads, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_sqs, exp_avgs, state_steps, **hparams)


class Adafactor(torch.optim.Optimizer):
    """Adafactor as ``transformers.optimization.Adafactor`` computes it (see the module docstring).

    With the defaults the step size is relative (``min(1e-2, 1/sqrt(t))``) and scaled by the parameter's RMS; for
    an external schedule pass ``relative_step=False, scale_parameter=False, lr=...`` (``lr`` then multiplies the
    clipped normalised update directly). ``relative_step=True`` with an ``lr`` caps the relative step by it,
    ``min(lr, 1/sqrt(t))`` (as torch.optim.Adafactor; transformers refuses the pair), so ``lr=1e-2`` is the paper.
    ``foreach``: None or True for the fast path, False for the per-tensor one.
    Subclasses or sharded wrappers may replace ``reductions`` (see :class:`Reductions`).
    """

    reductions: Reductions = LOCAL_REDUCTIONS

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "eps": tuple(eps),
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "scale_parameter": scale_parameter,
            "relative_step": relative_step,
            "warmup_init": warmup_init,
            "foreach": foreach,
        }
        _validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _validate(self.param_groups[-1])  # groups may override any default: check each

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Any], ...]:
        params, grads, rows, cols, sqs, exp_avgs, steps = [], [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adafactor does not support sparse gradients")
            state = self.state[p]
            x = _local(p)  # a DTensor's rows on this rank (FSDP2); the reductions combine the ranks' rows
            if not state:
                state_dtype = torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
                zeros = dict(device=p.device, dtype=state_dtype)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                if p.ndim >= 2:
                    row = torch.zeros(x.shape[:-1], **zeros)  # [..., n] (this rank's rows)
                    state["exp_avg_sq_row"] = _like_rows(row, p, p.shape[:-1])
                    col = torch.zeros(x.shape[:-2] + x.shape[-1:], **zeros)  # [..., m]
                    state["exp_avg_sq_col"] = _like_rows(col, p, p.shape[:-2] + p.shape[-1:], replicated=True)
                else:
                    state["exp_avg_sq"] = _like_rows(torch.zeros(x.shape, **zeros), p, p.shape)
                if group["beta1"] is not None:
                    state["exp_avg"] = _like_rows(torch.zeros(x.shape, **zeros), p, p.shape)
            params.append(x)
            grads.append(_local(p.grad))
            rows.append(_local_or_none(state.get("exp_avg_sq_row")))
            cols.append(_local_or_none(state.get("exp_avg_sq_col")))
            sqs.append(_local_or_none(state.get("exp_avg_sq")))
            exp_avgs.append(_local_or_none(state.get("exp_avg")) if group["beta1"] is not None else None)
            steps.append(state["step"])
        return params, grads, rows, cols, sqs, exp_avgs, steps

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            tensors = self._init_group(group)
            if not tensors[0]:
                continue
            adafactor(
                *tensors,
                foreach=group["foreach"],
                lr=group["lr"],
                eps=group["eps"],
                clip_threshold=group["clip_threshold"],
                decay_rate=group["decay_rate"],
                beta1=group["beta1"],
                weight_decay=group["weight_decay"],
                scale_parameter=group["scale_parameter"],
                relative_step=group["relative_step"],
                warmup_init=group["warmup_init"],
                reductions=self.reductions,
            )
        return loss


def _validate(group: dict[str, Any]) -> None:
    """Raise ValueError naming the bad hyperparameter and its valid range."""
    lr, relative_step = group["lr"], group["relative_step"]
    if lr is None and not relative_step:
        raise ValueError("relative_step=False needs an explicit lr > 0, got lr=None")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if group["warmup_init"] and not relative_step:
        raise ValueError("warmup_init=True requires relative_step=True")
    eps = group["eps"]
    if len(eps) != 2 or not all(e >= 0 for e in eps):
        raise ValueError(f"eps must be a pair (eps1, eps2) of numbers >= 0, got {eps}")
    if not group["clip_threshold"] > 0:
        raise ValueError(f"clip_threshold must be > 0, got {group['clip_threshold']}")
    if not group["decay_rate"] < 0:
        raise ValueError(
            f"decay_rate must be < 0 (beta2_t = 1 - t^decay_rate must approach 1), got {group['decay_rate']}"
        )
    beta1 = group["beta1"]
    if beta1 is not None and not 0.0 <= beta1 < 1.0:
        raise ValueError(f"beta1 must be None or in [0, 1), got {beta1}")
    if not group["weight_decay"] >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
