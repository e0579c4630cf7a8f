r"""Muon: momentum orthogonalised by a Newton–Schulz iteration, for the 2-D hidden matrices of a network.

Sources: K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024; blog and
github.com/KellerJordan/Muon); J. Liu et al., "Muon is Scalable for LLM Training" (Moonlight, arXiv:2502.16982).

For a matrix W (rows x cols) with gradient G, one step is

    B <- mu B + (1 - mu) G                                 momentum buffer (an EMA; see below)
    U <- (1 - mu) G + mu B    if nesterov,   else  U <- B
    O <- NS5(U)                                            ~ the orthogonal factor P Q^T of U = P S Q^T
    W <- W (1 - lr wd) - lr s(rows, cols) O                decoupled weight decay, then the update

NS5 is the quintic Newton–Schulz iteration. With k = min(rows, cols) it works on the k-row orientation (U^T when
rows > cols, so the Gram matrix is k x k) and starts from X = U / (||U||_F + eps); ||U||_F bounds the spectral
norm, so every singular value starts in [0, 1]. Then, `steps` times,

    A = X X^T;   X <- a X + (b A + c A^2) X,        (a, b, c) = (3.4445, -4.7750, 2.0315)

which maps every singular value by p(x) = a x + b x^3 + c x^5 and leaves the singular vectors alone. The
coefficients (Jordan) maximise the slope at 0 (a) so that small singular values grow fast, at the price of not
converging to exactly 1: after 5 steps every singular value with sigma / ||U||_F >= 2e-3 lands in [0.68, 1.21]
(tests/optim/test_muon.py checks both this band and the exact scalar map).

Update scale s, named as torch.optim.Muon's ``adjust_lr_fn``:
    "original" (alias "spectral"): max(1, rows / cols) ** 0.5    Jordan's scale (RMS->RMS operator norm ~ 1)
    "match_rms_adamw":             0.2 * max(rows, cols) ** 0.5  Moonlight: update RMS ~ 0.2, like AdamW's, so AdamW
                                                                 learning rates and weight decays carry over
The weight decay uses the unscaled lr (as torch.optim.Muon, Moonlight and Jordan do).

Momentum form. The papers write B <- mu B + G and U <- G + mu B. torch.optim.Muon and KellerJordan/Muon keep the
EMA B_ema = (1 - mu) B instead, so U_ema = (1 - mu) U. NS5 starts by dividing by the Frobenius norm, so
NS5(c U) = NS5(U) for any c > 0 (up to eps): the update is the same. flatlm keeps the EMA so that its state matches
torch.optim.Muon's (``momentum_buffer``) and its bf16 updates agree with torch's bit for bit.

Precision. NS5 runs in ``ns_dtype``, bfloat16 by default, as the references do: the iteration only needs singular
values inside a band of width ~0.5, far wider than bf16 rounding, and bf16 matmuls run on tensor cores (a whole
step was ~4x faster than with fp32 on this project's CPUs, which have avx512_bf16). "float32" gives a more exact
update; on a CPU without native bf16 it may also be the faster one.

Parameters with ``use_muon=False`` in their group (embeddings, LM head, norms, biases; see
``flatlm.optim.param_groups.muon_param_groups``) are stepped by torch's functional AdamW (decoupled weight decay,
bias correction) with the group's lr and weight_decay, ``adamw_betas`` and ``adamw_eps``.

State per parameter: Muon params ``momentum_buffer`` (as the param); AdamW params ``step`` (float32 scalar),
``exp_avg``, ``exp_avg_sq`` (as torch.optim.AdamW's).

Reductions and sharding. Momentum, weight decay and the final update are elementwise: they work on any part of a
matrix. The only reductions are inside NS5 (the Frobenius norm and the matmuls), which need each whole matrix. So
there is one update, ``muon``, over this rank's tensors of each matrix (whole matrices in one process or under
DDP; FSDP2 row shards; 1-D pieces of a DeepSpeed ZeRO flat partition), their global shapes (the scale s) and an
``orthogonalize`` callable; the backend injects that callable and the ``layout`` (which parts of which matrices
each optimizer tensor holds, ``flatlm.optim.distribution``) when it builds the optimizer. Default: ``orthogonalize``
below on whole matrices, one at a time on the per-tensor path; an injected one (``flatlm.parallel.muon``: gather
each matrix on one owner rank, the same ``orthogonalize``, scatter; or, under DDP, owner-computes-and-broadcasts)
is called once per step with every matrix, so that it can batch its communication.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _torch_adamw
from torch.optim.optimizer import _default_to_fused_or_foreach

from flatlm.optim.distribution import LOCAL_LAYOUT, Layout, OrthogonalizeFn, Part

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan's quintic: slope 3.4445 at 0, iterates stay in ~[0.7, 1.2]
ADJUST_LR = {
    "original": lambda rows, cols: max(1.0, rows / cols) ** 0.5,
    "spectral": lambda rows, cols: max(1.0, rows / cols) ** 0.5,
    "match_rms_adamw": lambda rows, cols: 0.2 * math.sqrt(max(rows, cols)),
}
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}

# How much Newton–Schulz work was done (calls, and matrices across the batches); tests reset and read it.
ns_stats = {"calls": 0, "matrices": 0}


def zeropower_via_newtonschulz5(
    G: Tensor, steps: int = 5, coefficients: Sequence[float] = NS_COEFFICIENTS, eps: float = 1e-7
) -> Tensor:
    """NS5(G) for a matrix or a batch of same-shape matrices ``[..., m, n]``, computed in G's dtype.

    Pure: no state, no communication. The caller chooses the dtype by casting G.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton–Schulz needs a matrix or a batch of matrices [..., m, n], got shape {tuple(G.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ns_stats["calls"] += 1
    ns_stats["matrices"] += math.prod(G.shape[:-2])
    a, b, c = coefficients
    X = G.reshape(-1, *G.shape[-2:])  # [B, m, n]
    if X.size(0) == 1:
        X = X[0]  # one matrix: addmm, as torch.optim.Muon (bmm with a batch of one is slower on CPU)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # Frobenius >= spectral norm: singular values in [0, 1]
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT  # [B, k, K] with k = min(m, n): the Gram matrix below is k x k
    mm = torch.addmm if X.ndim == 2 else torch.baddbmm
    for _ in range(steps):
        A = X @ X.mT  # [B, k, k]
        P = mm(A, A, A, beta=b, alpha=c)  # b A + c A^2 with one rounding (as torch.optim.Muon's addmm)
        X = mm(X, P, X, beta=a)  # a X + P X: each singular value s -> a s + b s^3 + c s^5
    if transposed:
        X = X.mT
    return X.reshape(G.shape)


def orthogonalize(
    updates: Sequence[Tensor],
    *,
    steps: int = 5,
    coefficients: Sequence[float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> list[Tensor]:
    """NS5 of each full matrix in ``updates``, same-shape matrices stacked into one batched call.

    Returns tensors in ``dtype``, aligned with ``updates``. This is the one place Muon needs whole matrices.
    """
    out: list[Tensor] = [None] * len(updates)  # type: ignore[list-item]
    by_shape: dict[tuple[Any, ...], list[int]] = {}
    for i, u in enumerate(updates):
        by_shape.setdefault((tuple(u.shape), u.device), []).append(i)
    for idx in by_shape.values():
        if len(idx) == 1:
            stacked = updates[idx[0]].to(dtype).unsqueeze(0)  # [1, m, n]
        else:
            stacked = torch.stack([updates[i].to(dtype) for i in idx])  # [B, m, n]
        orth = zeropower_via_newtonschulz5(stacked, steps, coefficients, eps)
        for i, o in zip(idx, orth.unbind(0), strict=True):
            out[i] = o
    return out


def update_scale(shape: Sequence[int], adjust_lr: str) -> float:
    """s(rows, cols): the factor on lr for a matrix of ``shape`` (its global shape)."""
    return ADJUST_LR[adjust_lr](shape[0], shape[1])


LocalOrthogonalize = Callable[..., list[Tensor]]  # updates -> NS5 of each, shaped like them (ns keywords)


def _single_tensor_muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    shapes: list[torch.Size],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    ns_coefficients: Sequence[float],
    eps: float,
    adjust_lr: str,
    ns_dtype: torch.dtype,
    orthogonalize_fn: LocalOrthogonalize | None = None,
) -> None:
    ns = {"steps": ns_steps, "coefficients": ns_coefficients, "eps": eps, "dtype": ns_dtype}
    if orthogonalize_fn is None:  # whole matrices here: one at a time, the least memory
        for param, grad, buf, shape in zip(params, grads, momentum_buffers, shapes, strict=True):
            buf.lerp_(grad, 1 - momentum)  # B <- mu B + (1 - mu) G
            update = grad.lerp(buf, momentum) if nesterov else buf  # (1 - mu) G + mu B
            (orth,) = orthogonalize([update], **ns)
            param.mul_(1 - lr * weight_decay)  # decoupled weight decay, unscaled lr
            param.add_(orth.view(param.shape), alpha=-lr * update_scale(shape, adjust_lr))
        return
    updates = []  # an injected orthogonalize gets every matrix in one call, so that it can batch its
    for grad, buf in zip(grads, momentum_buffers, strict=True):  # communication (one gather, one scatter per step)
        buf.lerp_(grad, 1 - momentum)
        updates.append(grad.lerp(buf, momentum) if nesterov else buf)
    orths = orthogonalize_fn(updates, **ns)
    for param, orth, shape in zip(params, orths, shapes, strict=True):
        param.mul_(1 - lr * weight_decay)
        param.add_(orth.view(param.shape), alpha=-lr * update_scale(shape, adjust_lr))


def _multi_tensor_muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    shapes: list[torch.Size],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    ns_coefficients: Sequence[float],
    eps: float,
    adjust_lr: str,
    ns_dtype: torch.dtype,
    orthogonalize_fn: LocalOrthogonalize | None = None,
) -> None:
    if not params:
        return
    torch._foreach_lerp_(momentum_buffers, grads, 1 - momentum)
    updates = torch._foreach_lerp(grads, momentum_buffers, momentum) if nesterov else momentum_buffers
    orths = (orthogonalize_fn or orthogonalize)(
        updates, steps=ns_steps, coefficients=ns_coefficients, eps=eps, dtype=ns_dtype
    )
    del updates
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    by_shape: dict[tuple[int, ...], list[int]] = {}  # one scale per shape: one foreach add per shape
    for i, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(i)
    for shape, idx in by_shape.items():
        torch._foreach_add_(
            [params[i] for i in idx],
            [orths[i].view(params[i].shape) for i in idx],
            alpha=-lr * update_scale(shape, adjust_lr),
        )


def muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    shapes: list[torch.Size] | None = None,
    *,
    foreach: bool | None = None,
    **hparams: Any,
) -> None:
    """Functional Muon: the one update, for whole matrices or for this rank's parts of them.

    ``params``, ``grads``, ``momentum_buffers``: this rank's tensors of each matrix (whole matrices, FSDP2 row
    shards, 1-D pieces of a ZeRO partition); ``shapes``: each matrix's global shape (default: the tensors' own);
    ``orthogonalize_fn`` (in ``hparams``): ``updates -> NS5`` of the whole matrices those parts belong to, shaped
    like the parts (the backend's gather -> ``orthogonalize`` -> scatter); None: ``orthogonalize`` on whole
    matrices. The batched path if ``foreach``, else the per-tensor one.

    ``foreach=None`` follows torch's choice: batched where foreach kernels exist (CUDA), per tensor elsewhere. On
    CPU the per-tensor path measured faster: batching saves no launches there, its large staging buffers cost
    page faults, and bf16 ``baddbmm`` runs 10-25% slower than per-matrix ``addmm``.
    """
    if shapes is None:
        shapes = [p.shape for p in params]
    if foreach is None:
        foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]
    (_multi_tensor_muon if foreach else _single_tensor_muon)(params, grads, momentum_buffers, shapes, **hparams)


def _dtype_name(dtype: str | torch.dtype) -> str:
    """Groups keep the dtype's name ("bfloat16"), so they stay YAML/JSON-friendly."""
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype


def _check_hparams(g: dict[str, Any]) -> None:
    """Raise ValueError naming the bad value and the valid range."""
    checks = [
        ("lr", g["lr"] >= 0, ">= 0"),
        ("momentum", 0 <= g["momentum"] < 1, "in [0, 1)"),
        ("weight_decay", g["weight_decay"] >= 0, ">= 0"),
        ("ns_steps", isinstance(g["ns_steps"], int) and g["ns_steps"] >= 1, "an int >= 1"),
        ("eps", g["eps"] >= 0, ">= 0"),
        ("adamw_eps", g["adamw_eps"] >= 0, ">= 0"),
    ]
    for name, ok, valid in checks:
        if not ok:
            raise ValueError(f"{name} must be {valid}, got {g[name]!r}")
    coeffs = g["ns_coefficients"]
    if len(coeffs) != 3 or not all(math.isfinite(float(x)) for x in coeffs):
        raise ValueError(f"ns_coefficients must be three finite floats (a, b, c), got {coeffs!r}")
    betas = g["adamw_betas"]
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"adamw_betas must be two floats in [0, 1), got {betas!r}")
    if g["adjust_lr"] not in ADJUST_LR:
        raise ValueError(f"adjust_lr must be one of {', '.join(map(repr, ADJUST_LR))}, got {g['adjust_lr']!r}")
    if g["ns_dtype"] not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be one of {', '.join(map(repr, NS_DTYPES))}, got {g['ns_dtype']!r}")
    if g["foreach"] not in (None, True, False):
        raise ValueError(f"foreach must be None, True or False, got {g['foreach']!r}")


class Muon(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True`` (2-D matrices), AdamW for groups with ``use_muon=False``.

    Build the groups with ``flatlm.optim.param_groups.muon_param_groups``. A group without ``use_muon`` is a Muon
    group and must hold only 2-D parameters.

    Defaults, and why:
        lr=1e-3: with adjust_lr="match_rms_adamw" the Muon update has AdamW's RMS, so lr is an AdamW learning rate,
            and the same lr then suits the AdamW groups (embeddings, head) in this optimizer (update RMS 0.2 lr =
            2e-4). Jordan's lr=0.02 is for adjust_lr="original": a 512x512 update then has RMS 0.02 / sqrt(512)
            ~ 9e-4, i.e. lr ~ 4.4e-3 here.
        momentum=0.95, nesterov=True, ns_steps=5, ns_coefficients, eps=1e-7: Jordan's, used by Moonlight and torch.
        weight_decay=0.1: Moonlight found decay necessary for Muon at scale; torch.optim.Muon's default.
        adjust_lr="match_rms_adamw": AdamW hyperparameters carry over (Moonlight); "original" is Jordan's.
        adamw_betas=(0.9, 0.95), adamw_eps=1e-8: the usual LM AdamW settings (and flatlm's AdamW default).
        ns_dtype="bfloat16": as the references; see the module docstring.
        foreach=None: the fastest path: batched NS on CUDA, per tensor on CPU (see ``muon``); fused AdamW where
            available, else foreach. True: batched NS, foreach AdamW. False: per-tensor loops for both.

    Injected by the backend at construction (keyword-only, never hyperparameters; ``flatlm.optim.distribution``):
        layout: which parts of which matrices each optimizer tensor holds on this rank (default: whole matrices).
        orthogonalize: ``(updates, parts, **ns) -> NS5`` of the whole matrices from this rank's parts (the backend's
            gather -> ``orthogonalize`` -> scatter); default: ``orthogonalize`` on the whole matrices here.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        adjust_lr: str = "match_rms_adamw",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        ns_dtype: str | torch.dtype = "bfloat16",
        foreach: bool | None = None,
        *,
        orthogonalize: OrthogonalizeFn | None = None,
        layout: Layout | None = None,
    ) -> None:
        self._orthogonalize = orthogonalize
        self._layout = layout or LOCAL_LAYOUT
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            adjust_lr=adjust_lr,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            ns_dtype=_dtype_name(ns_dtype),
            foreach=foreach,
            use_muon=None,
        )
        _check_hparams(defaults)
        super().__init__(params, defaults)
        if not any(g["use_muon"] and g["params"] for g in self.param_groups):
            raise ValueError(
                "Muon needs at least one 2-D parameter in a Muon group, got none; build the groups with "
                "flatlm.optim.param_groups.muon_param_groups, or use AdamW"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["ns_dtype"] = _dtype_name(group["ns_dtype"])
        _check_hparams(group)
        shapes = [tuple(p.shape) for p in group["params"]]
        if group["use_muon"] is None:
            if any(len(s) != 2 for s in shapes):
                raise ValueError(
                    f"a param group without 'use_muon' is a Muon group and must hold only 2-D parameters, got shapes "
                    f"{[s for s in shapes if len(s) != 2]}; build the groups with "
                    "flatlm.optim.param_groups.muon_param_groups (embeddings, head, norms, biases -> AdamW)"
                )
            group["use_muon"] = True
        elif group["use_muon"] and any(len(s) != 2 for s in shapes):
            raise ValueError(f"a group with use_muon=True must hold only 2-D parameters, got shapes {shapes}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse or torch.is_complex(p):
                    raise ValueError("Muon supports neither sparse gradients nor complex parameters")
            if params:
                (self._muon_step if group["use_muon"] else self._adamw_step)(group, params)
        return loss

    def _muon_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        tensors: list[list[Tensor]] = [[], [], []]  # this rank's parts of the params, grads, momentum buffers
        parts: list[Part] = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:  # laid out like p: a DTensor, a flat partition, a matrix
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for part in self._layout.parts(p):
                for out, t in zip(tensors, (p, p.grad, state["momentum_buffer"]), strict=True):
                    out.append(part.view(t))
                parts.append(part)
        injected = self._orthogonalize
        muon(
            *tensors,
            [part.shape for part in parts],
            foreach=group["foreach"],
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_steps=group["ns_steps"],
            ns_coefficients=group["ns_coefficients"],
            eps=group["eps"],
            adjust_lr=group["adjust_lr"],
            ns_dtype=NS_DTYPES[group["ns_dtype"]],
            orthogonalize_fn=None if injected is None else (lambda updates, **ns: injected(updates, parts, **ns)),
        )

    def _adamw_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if group["foreach"] is None:
            fused, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=True)
        else:
            fused, foreach = False, group["foreach"]
        steps, exp_avgs, exp_avg_sqs = [], [], []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step_device = p.device if fused else torch.device("cpu")  # torch's placement of `step`
            if state["step"].device != step_device:
                state["step"] = state["step"].to(step_device)
            steps.append(state["step"])
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        beta1, beta2 = group["adamw_betas"]
        _torch_adamw(
            params,
            [p.grad for p in params],
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=foreach,
            fused=fused,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["adamw_eps"],
            maximize=False,
        )
