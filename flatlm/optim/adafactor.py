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

Reductions and sharding. Everything above is elementwise except three reductions over the whole parameter. The
update functions see only this rank's *parts* of parameters (``flatlm.optim.distribution.Part``: a whole parameter,
an FSDP2 row shard, or a run of row-major elements of a ZeRO flat partition, which may start and end mid-row) and
compute each reduction from local partial sums; ``shard_sum`` (injected at construction; None in one process) adds
up the partial ones over the ranks, once per phase for all parts of the step call. In the order one step calls them:
    1. RMS(X) per parameter (scale_parameter only)       sum of squares                      one number per part
    2. row and column means of G2 per matrix              ``Part.row_means`` / ``col_means``  the partial ones:
                                                                                              FSDP2 C (m), ZeRO R, C
    3. RMS(U) per parameter, for clipping                 sum of squares (fast path:          one number per part
                                                          ``Part.weighted_sumsq`` from G2)
With R and C whole (or this rank's rows of R, FSDP2), mean(C) needs nothing more. Without ``shard_sum`` the work
goes one parameter at a time (small temporaries); with it, each phase runs over every part so that each reduction
is one call. The injected ``layout`` creates the state where its layout keeps it (FSDP2: DTensors placed like the
parameter; ZeRO: R, C whole and V per piece, ``{part index: tensor}`` per flat partition, M flat-partition-shaped),
so checkpoints key and reshard it as before; tests/optim/test_adafactor.py simulates dim-0 sharding with threads.

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

from flatlm.optim.distribution import LOCAL_LAYOUT, Layout, Part, SumFn, sum_list

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _relative_step(t: float, *, lr: float | None, relative_step: bool, warmup_init: bool) -> float:
    """rho_t: the step size before the parameter scale."""
    if not relative_step:
        assert lr is not None
        return lr
    cap = 1e-2 if lr is None else lr  # an lr caps the relative step (torch.optim.Adafactor's rule)
    min_step = min(cap, 1e-6 * t) if warmup_init else cap
    return min(min_step, 1.0 / math.sqrt(t))


def _step_counts(state_steps: list[Tensor]) -> list[float]:
    """Add 1 to every step counter once (parts of one optimizer tensor share its counter), return t per part."""
    counted: dict[int, float] = {}
    for s in state_steps:
        if id(s) not in counted:
            counted[id(s)] = s.add_(1).item()
    return [counted[id(s)] for s in state_steps]


def _rms(local_sumsqs: list[Tensor], parts: list[Part], shard_sum: SumFn | None) -> list[Tensor]:
    """RMS of each whole parameter from this rank's sums of squares: one ``shard_sum`` call for the parts whose
    sums are partial (``Part.partial``); a part held whole here is complete as it is."""
    partial = [k for k, part in enumerate(parts) if part.partial] if shard_sum is not None else []
    if not partial:  # nothing to add up: no stacking (this runs once per parameter in one process)
        return [(x / part.numel).sqrt_() for x, part in zip(local_sumsqs, parts, strict=True)]
    totals = list(local_sumsqs)
    dtype = totals[partial[0]].dtype
    (summed,) = sum_list([torch.stack([totals[k].to(dtype) for k in partial])], shard_sum)
    for j, k in enumerate(partial):
        totals[k] = summed[j]
    return [(x / part.numel).sqrt() for x, part in zip(totals, parts, strict=True)]


def _sumsq(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x).square()


def _chunk_alphas(
    chunk: list[int],
    xs: list[Tensor],
    parts: list[Part],
    rhos: list[float],
    *,
    scale_parameter: bool,
    eps2: float,
    shard_sum: SumFn | None,
) -> dict[int, Any]:
    """alpha_t = max(eps2, RMS(X_{t-1})) rho_t (reduction 1), or rho_t, for the parameters in ``chunk``, by index
    (computed just before their update: X is read while in cache)."""
    if not scale_parameter:
        return {i: rhos[i] for i in chunk}
    rms = _rms([_sumsq(xs[i]) for i in chunk], [parts[i] for i in chunk], shard_sum)
    return {i: r.clamp(min=eps2) * rhos[i] for i, r in zip(chunk, rms, strict=True)}


def _factored_means(g2s: list[Tensor], parts: list[Part], shard_sum: SumFn | None) -> tuple[list[Tensor], list[Tensor]]:
    """Row and column means of each whole G2 from this rank's parts (reduction 2: one call for every partial one)."""
    rows = [part.row_means(g2) for g2, part in zip(g2s, parts, strict=True)]
    cols = [part.col_means(g2) for g2, part in zip(g2s, parts, strict=True)]
    if shard_sum is not None:
        partial = [(rows, k) for k, p in enumerate(parts) if p.rows_partial]
        partial += [(cols, k) for k, p in enumerate(parts) if p.cols_partial]
        summed = sum_list([out[k] for out, k in partial], shard_sum)
        for (out, k), total in zip(partial, summed, strict=True):
            out[k] = total
    return rows, cols


def _chunks(rows: list[Tensor | None], shard_sum: SumFn | None) -> list[list[int]]:
    """The order of work: without communication one matrix at a time (its temporaries stay small and in cache),
    then the vectors together; with it every parameter in each phase, so that each reduction is one call."""
    if shard_sum is not None:
        return [list(range(len(rows)))] if rows else []
    vectors = [i for i, row in enumerate(rows) if row is None]
    return [[i] for i, row in enumerate(rows) if row is not None] + ([vectors] if vectors else [])


def _single_tensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    state_steps: list[Tensor],
    parts: list[Part],
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
    shard_sum: SumFn | None = None,
) -> None:
    """The update as the module docstring writes it, materialising G^2 and U. State lists hold None where unused."""
    eps1, eps2 = eps
    ts = _step_counts(state_steps)
    rhos = [_relative_step(t, lr=lr, relative_step=relative_step, warmup_init=warmup_init) for t in ts]
    xs = [p.float() if p.dtype in _LOW_PRECISION else p for p in params]  # fp32 copies for bf16/fp16
    gs = [g.to(x.dtype) for g, x in zip(grads, xs, strict=True)]  # no copy when the dtypes agree

    for chunk in _chunks(exp_avg_sq_rows, shard_sum):
        alphas = _chunk_alphas(chunk, xs, parts, rhos, scale_parameter=scale_parameter, eps2=eps2, shard_sum=shard_sum)
        g2s = {i: gs[i] * gs[i] + eps1 for i in chunk}  # G2
        mats = [i for i in chunk if exp_avg_sq_rows[i] is not None]  # factored: [..., n, m]
        row_means, col_means = _factored_means([g2s[i] for i in mats], [parts[i] for i in mats], shard_sum)
        updates: dict[int, Tensor] = {}
        for i, row_mean, col_mean in zip(mats, row_means, col_means, strict=True):
            row, col = exp_avg_sq_rows[i], exp_avg_sq_cols[i]
            assert row is not None and col is not None
            one_minus_beta2 = ts[i] ** decay_rate
            row.lerp_(row_mean, one_minus_beta2)  # R [..., n]
            col.lerp_(col_mean, one_minus_beta2)  # C [..., m]
            r = (row / col.mean(dim=-1, keepdim=True)).rsqrt()  # 1/sqrt(R / mean(R)), mean(R) == mean(C)
            updates[i] = gs[i] * parts[i].outer(r, col.rsqrt())  # G / sqrt(V)
        for i in chunk:
            if i not in updates:  # unfactored
                v = exp_avg_sqs[i]
                assert v is not None
                v.lerp_(g2s[i], ts[i] ** decay_rate)
                updates[i] = gs[i] * v.rsqrt()
        del g2s
        rms = _rms([_sumsq(updates[i]) for i in chunk], [parts[i] for i in chunk], shard_sum)  # reduction 3
        for i, update_rms in zip(chunk, rms, strict=True):
            update = updates[i]
            update.div_((update_rms / clip_threshold).clamp_(min=1.0))  # clip the RMS to <= d
            update.mul_(alphas[i])
            m = exp_avgs[i]
            if m is not None:
                m.lerp_(update, 1.0 - beta1)  # type: ignore[operator]
                update = m
            x = xs[i]
            if weight_decay != 0:
                x.mul_(1.0 - weight_decay * alphas[i])
            x.sub_(update)
            if x is not params[i]:
                params[i].copy_(x)


def _multi_tensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    state_steps: list[Tensor],
    parts: list[Part],
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
    shard_sum: SumFn | None = None,
) -> None:
    """The same update with fewer passes over memory and fewer allocations (the step is memory-bound on CPU).

    Per matrix, one scratch buffer (allocated once per call; shared by all matrices when nothing is communicated)
    holds G^2 and then the rank-1 factor; neither V nor U is ever materialised. With c = C^(-1/2) per column and
    r = (R / mean(C))^(-1/2) per row, U_ij = G_ij r_i c_j, and

        RMS(U)^2 = mean_ij G2_ij r_i^2 c_j^2            ``Part.weighted_sumsq``: a matrix-vector product on G2
        X <- X - (k r) outer c * G                      k = alpha_t / max(1, RMS(U) / d) folded into the row vector

    (eps1 is added to the means of G^2 rather than to G^2: equal up to rounding). Matrix-sized traffic without
    beta1: X read twice and written once, G read twice, the buffer written twice and read three times (it stays in
    cache); transformers allocates about six matrix-sized temporaries instead. 1-D parameters go through
    torch._foreach_* ops together.
    """
    eps1, eps2 = eps
    ts = _step_counts(state_steps)
    rhos = [_relative_step(t, lr=lr, relative_step=relative_step, warmup_init=warmup_init) for t in ts]
    one_minus_beta2 = [t**decay_rate for t in ts]
    xs = [p.float() if p.dtype in _LOW_PRECISION else p for p in params]
    gs = [g.to(x.dtype) for g, x in zip(grads, xs, strict=True)]
    chunks = _chunks(exp_avg_sq_rows, shard_sum)

    sizes: dict[tuple[torch.device, torch.dtype], int] = {}  # per device and dtype: the largest chunk's matrices
    for chunk in chunks:
        need: dict[tuple[torch.device, torch.dtype], int] = {}
        for i in chunk:
            if exp_avg_sq_rows[i] is not None:
                key = (xs[i].device, xs[i].dtype)
                need[key] = need.get(key, 0) + xs[i].numel()
        for key, numel in need.items():
            sizes[key] = max(sizes.get(key, 0), numel)
    scratch = {key: torch.empty(numel, device=key[0], dtype=key[1]) for key, numel in sizes.items()}

    for chunk in chunks:
        alphas = _chunk_alphas(chunk, xs, parts, rhos, scale_parameter=scale_parameter, eps2=eps2, shard_sum=shard_sum)
        mats = [i for i in chunk if exp_avg_sq_rows[i] is not None]
        vecs = [i for i in chunk if exp_avg_sq_rows[i] is None]
        used: dict[tuple[torch.device, torch.dtype], int] = {}
        bufs: dict[int, Tensor] = {}
        for i in mats:
            key = (xs[i].device, xs[i].dtype)
            at = used.get(key, 0)
            bufs[i] = scratch[key][at : at + xs[i].numel()].view(xs[i].shape)
            used[key] = at + xs[i].numel()
            torch.mul(gs[i], gs[i], out=bufs[i])  # G2 without eps1
        row_means, col_means = _factored_means([bufs[i] for i in mats], [parts[i] for i in mats], shard_sum)
        factors: dict[int, tuple[Tensor, Tensor]] = {}
        sumsqs: dict[int, Tensor] = {}
        for i, row_mean, col_mean in zip(mats, row_means, col_means, strict=True):
            row, col = exp_avg_sq_rows[i], exp_avg_sq_cols[i]
            assert row is not None and col is not None
            row.lerp_(row_mean.add_(eps1), one_minus_beta2[i])  # R [..., n]
            col.lerp_(col_mean.add_(eps1), one_minus_beta2[i])  # C [..., m]
            c = col.rsqrt()  # [..., m]
            r = (row / col.mean(dim=-1, keepdim=True)).rsqrt_()  # [..., n]; mean(R) == mean(C)
            sumsqs[i] = parts[i].weighted_sumsq(bufs[i], r * r, c * c)  # ||U||^2 on this rank
            factors[i] = (r, c)
        if vecs:
            v_gs = [gs[i] for i in vecs]
            g2 = torch._foreach_mul(v_gs, v_gs)
            torch._foreach_add_(g2, eps1)
            v_sqs: list[Tensor] = [exp_avg_sqs[i] for i in vecs]  # type: ignore[misc]
            torch._foreach_lerp_(v_sqs, g2, [one_minus_beta2[i] for i in vecs])  # V
            v_updates = torch._foreach_rsqrt(v_sqs)
            torch._foreach_mul_(v_updates, v_gs)  # G / sqrt(V)
            for i, u in zip(vecs, v_updates, strict=True):
                sumsqs[i] = _sumsq(u)
        rms = dict(zip(chunk, _rms([sumsqs[i] for i in chunk], [parts[i] for i in chunk], shard_sum), strict=True))

        for i in mats:  # reduction 3 done: the step
            r, c = factors[i]
            k = alphas[i] / (rms[i] / clip_threshold).clamp_(min=1.0)
            factor = parts[i].outer(r.mul_(k), c, out=bufs[i])  # k r_i c_j
            x, m = xs[i], exp_avgs[i]
            if m is not None:
                m.lerp_(factor.mul_(gs[i]), 1.0 - beta1)  # type: ignore[operator]  # M <- beta1 M + (1 - beta1) U
            if weight_decay != 0:
                x.mul_(1.0 - weight_decay * alphas[i])
            if m is not None:
                x.sub_(m)
            else:
                x.addcmul_(factor, gs[i], value=-1.0)
            if x is not params[i]:
                params[i].copy_(x)
        if vecs:
            scales = [alphas[i] / (rms[i] / clip_threshold).clamp_(min=1.0) for i in vecs]
            torch._foreach_mul_(v_updates, scales)
            if beta1 is not None:
                ms: list[Tensor] = [exp_avgs[i] for i in vecs]  # type: ignore[misc]
                torch._foreach_lerp_(ms, v_updates, 1.0 - beta1)
                v_updates = ms
            v_xs = [xs[i] for i in vecs]
            if weight_decay != 0:
                torch._foreach_mul_(v_xs, [1.0 - weight_decay * alphas[i] for i in vecs])
            torch._foreach_sub_(v_xs, v_updates)
            for i in vecs:
                if xs[i] is not params[i]:
                    params[i].copy_(xs[i])


def adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    exp_avgs: list[Tensor | None],
    state_steps: list[Tensor],
    parts: list[Part] | None = None,
    *,
    foreach: bool | None = None,
    **hparams: Any,
) -> None:
    """Functional Adafactor: the per-tensor path (``foreach=False``) or the fast one (None/True, the default).

    Every list holds one entry per part: this rank's tensors of one parameter (a whole parameter, an FSDP2 row
    shard, a run of a ZeRO partition), ``parts`` their geometry (default: whole parameters, ``Part(p.shape)``),
    ``shard_sum`` (in ``hparams``) the sum over ranks of partial statistics (None: nothing is partial).
    """
    if parts is None:
        parts = [Part(p.shape) for p in params]
    fn = _single_tensor_adafactor if foreach is False else _multi_tensor_adafactor
    fn(params, grads, exp_avg_sq_rows, exp_avg_sq_cols, exp_avg_sqs, exp_avgs, state_steps, parts, **hparams)


class Adafactor(torch.optim.Optimizer):
    """Adafactor as ``transformers.optimization.Adafactor`` computes it (see the module docstring).

    With the defaults the step size is relative (``min(1e-2, 1/sqrt(t))``) and scaled by the parameter's RMS; for
    an external schedule pass ``relative_step=False, scale_parameter=False, lr=...`` (``lr`` then multiplies the
    clipped normalised update directly). ``relative_step=True`` with an ``lr`` caps the relative step by it,
    ``min(lr, 1/sqrt(t))`` (as torch.optim.Adafactor; transformers refuses the pair), so ``lr=1e-2`` is the paper.
    ``foreach``: None or True for the fast path, False for the per-tensor one.

    Injected by the backend at construction (keyword-only, never hyperparameters; ``flatlm.optim.distribution``):
        layout: the parts of parameters each optimizer tensor holds on this rank, and how their state is created and
            stored (default: whole parameters, plain tensors).
        shard_sum: ``Tensor -> Tensor``, the sum over the ranks of partial statistics (an all-reduce); None where
            every part is a whole parameter.
    """

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
        *,
        layout: Layout | None = None,
        shard_sum: SumFn | None = None,
    ) -> None:
        self._layout = layout or LOCAL_LAYOUT
        self._shard_sum = shard_sum
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

    def _new_state(self, p: Tensor, parts: list[Part], beta1: float | None) -> dict[str, Any]:
        """Zero state for p: R and C per factored part, V per unfactored part (``Layout.zeros`` places them; a
        layout keyed by part stores ``{part index: tensor}``), M laid out like p."""
        layout = self._layout
        dtype = torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
        state: dict[str, Any] = {"step": torch.tensor(0.0, dtype=torch.float32)}
        factored = [j for j, part in enumerate(parts) if len(part.shape) >= 2]
        vectors = [j for j, part in enumerate(parts) if len(part.shape) < 2]
        kinds = {
            "exp_avg_sq_row": ("row", factored),
            "exp_avg_sq_col": ("col", factored),
            "exp_avg_sq": ("elem", vectors),
        }
        for key, (kind, idx) in kinds.items():
            made = {j: layout.zeros(p, parts[j], kind, dtype) for j in idx}
            if layout.keyed_by_part:
                state[key] = made
            elif made:
                (state[key],) = made.values()
        if beta1 is not None:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Any], ...]:
        """One entry per part of every parameter with a gradient: this rank's tensors and their state."""
        layout = self._layout
        params, grads, rows, cols, sqs, exp_avgs, steps, parts = [], [], [], [], [], [], [], []

        def of(state: dict[str, Any], key: str, j: int) -> Tensor | None:
            value = state.get(key)
            if isinstance(value, dict):
                value = value.get(j)
            return None if value is None else layout.local(value)

        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adafactor does not support sparse gradients")
            tensor_parts = layout.parts(p)
            if not self.state[p]:
                self.state[p].update(self._new_state(p, tensor_parts, group["beta1"]))
            state = self.state[p]
            for j, part in enumerate(tensor_parts):
                params.append(part.view(p))
                grads.append(part.view(p.grad))
                rows.append(of(state, "exp_avg_sq_row", j))
                cols.append(of(state, "exp_avg_sq_col", j))
                sqs.append(of(state, "exp_avg_sq", j))
                exp_avgs.append(part.view(state["exp_avg"]) if group["beta1"] is not None else None)
                steps.append(state["step"])
                parts.append(part)
        return params, grads, rows, cols, sqs, exp_avgs, steps, parts

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
                shard_sum=self._shard_sum,
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
