r"""Lion: EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

For each parameter tensor :math:`\theta` with gradient :math:`g` and momentum :math:`m` (state ``exp_avg``,
zero at the first step), one step with learning rate :math:`\eta` and decoupled weight decay :math:`\lambda` is

.. math::

    c        &= \beta_1 m + (1 - \beta_1) g                       \quad\text{(interpolation used for the sign)} \\
    \theta   &\leftarrow \theta (1 - \eta \lambda) - \eta \operatorname{sign}(c) \\
    m        &\leftarrow \beta_2 m + (1 - \beta_2) g               \quad\text{(the momentum kept)}

with :math:`\operatorname{sign}(0) = 0`, as ``torch.sign`` and lion-pytorch have it: an entry whose gradient and
momentum are both zero (an embedding row never looked up) only decays. Every update has magnitude
:math:`\eta` per entry, so Lion wants a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger.

Reductions: none. Every line is elementwise, so the same functions run unchanged on any shard of a parameter
(an FSDP2 local shard, a DeepSpeed flat partition, a rank's slice under ZeRO-1) and need no communication.

State per parameter: ``exp_avg`` (the momentum :math:`m`, same shape, dtype and device as the parameter) — the
same key as lion-pytorch, so its state dicts load here.

Implementations (one signature; :func:`lion` picks one from ``foreach``):

- ``_single_tensor_lion`` (``foreach=False``): eager ops one tensor at a time. :math:`c` lives in one scratch
  buffer reused for every tensor, and tensors above ``_CHUNK`` entries are stepped in flat pieces, so a step
  allocates nothing per parameter and each piece's five passes run while it is in cache. Allocating fresh
  temporaries, as lion-pytorch and ``torch._foreach_*`` do on CPU, can cost more than the arithmetic there.
- ``_fused_lion`` (``foreach=None`` on CPU): ``torch.compile`` fuses the update of each large tensor into one loop
  that reads p, g, m once and writes p, m once, eight same-size tensors per call. Small tensors, tensor subclasses
  (DTensor), non-contiguous tensors and small steps take ``_single_tensor_lion``, and so does everything if
  compiling fails (with one warning). Two graphs per dtype, compiled at the first step (2-7 s) and kept for the
  process; hyperparameters travel as a tensor, so a learning-rate schedule never recompiles.
- ``_multi_tensor_lion`` (``foreach=True``, and ``None`` on GPUs): ``torch._foreach_*`` over lists grouped by
  device and dtype; a few kernel launches per step instead of several per tensor, which is what counts on GPUs.

The interpolations use ``lerp`` (one pass over memory instead of a multiply and an add). The eager paths are
bit-identical to lion-pytorch's foreach class and to each other, and their parameters bit-identical to
lion-pytorch's for-loop class (its momentum within float32 rounding). The fused loop rounds differently (m within
an ulp or so), so where :math:`|c|` is within rounding of zero its sign, and that entry's step, can differ.
Measured step times: ``benchmarks/optim_cases/lion.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Lion", "lion"]

# Devices with multi-tensor (foreach) kernels. On CPU, torch's _foreach_* ops are a loop of ordinary ops that
# allocate every temporary: slower than the reused scratch buffer below.
_FOREACH_DEVICES = ("cuda", "xpu")

# Entries per piece on the eager path (4 MiB per float32 array): bounds the scratch buffer and keeps a 32k-vocab
# embedding's pieces in cache (measured 0.50 of lion-pytorch's step time for pieces against 0.72 whole).
_CHUNK = 1 << 20

# The fused path compiles for tensors of at least _FUSED_MIN entries (a compiled call costs ~20 us of guards and
# wrapping against ~10 us for the five eager ops, more than fusing saves on a small tensor), and only when those
# add up to _FUSED_MIN_STEP entries: below that a step takes about a millisecond either way (the 2M-parameter tiny
# preset measured no faster fused), not worth seconds of compiling.
_FUSED_MIN = 1 << 16
_FUSED_MIN_STEP = 1 << 22
# Tensors of one size per compiled call: a call costs ~35-85 us beyond its memory traffic (guards, wrappers, waking
# threads). A Llama's 56 matrices (hidden 512): 10.5 ms one per call, 9.9 ms four per call, 7.7 ms eight per call,
# 7.4 ms for one flat tensor of the same size (the memory-bandwidth floor here).
_FUSED_BATCH = 8


def _is_plain(t: Tensor) -> bool:
    return type(t) in (Tensor, torch.nn.Parameter)  # not a tensor subclass such as DTensor


def _pieces(param: Tensor, grad: Tensor, exp_avg: Tensor) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
    """Matching flat pieces of at most _CHUNK entries, or the whole tensors where they cannot be split as views."""
    if param.numel() <= _CHUNK or not _is_plain(param) or not all(t.is_contiguous() for t in (param, grad, exp_avg)):
        return ((param, grad, exp_avg),)
    flat = (t.view(-1).split(_CHUNK) for t in (param, grad, exp_avg))
    return zip(*flat, strict=True)


class _Scratch:
    """One reusable buffer per (device, dtype) for the interpolation c, so a step allocates no temporaries."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def like(self, t: Tensor) -> Tensor:
        """A contiguous tensor shaped like ``t`` with garbage contents, valid until the next call."""
        if not _is_plain(t) or t.numel() > _CHUNK:  # a DTensor, or a piece _pieces could not split: allocate
            return torch.empty_like(t, memory_format=torch.contiguous_format)
        key, n = (t.device, t.dtype), t.numel()
        if key not in self._buffers or self._buffers[key].numel() < n:  # grows at most to _CHUNK
            self._buffers[key] = torch.empty(n, device=t.device, dtype=t.dtype)
        return self._buffers[key][:n].view(t.shape)


def _single_tensor_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    scratch = _Scratch()
    for whole in zip(params, grads, exp_avgs, strict=True):
        for param, grad, exp_avg in _pieces(*whole):
            c = scratch.like(param)
            torch.lerp(exp_avg, grad, 1.0 - beta1, out=c)  # c = beta1 * m + (1 - beta1) * g
            c.sign_()  # sign(0) = 0: entries with zero c move only by the decay
            if weight_decay != 0:
                param.mul_(1.0 - lr * weight_decay)  # decoupled decay, before the sign step
            param.add_(c, alpha=-lr)  # theta -= lr * sign(c)
            exp_avg.lerp_(grad, 1.0 - beta2)  # m = beta2 * m + (1 - beta2) * g, after c used the old m


def _lion_update(param: Tensor, grad: Tensor, exp_avg: Tensor, hparams: Tensor) -> None:
    """The update of one flat tensor, written for torch.compile to fuse into one loop (read p, g, m; write p, m).

    ``hparams`` is (lr, beta1, beta2, weight_decay) as a float64 tensor, so new values never recompile.
    """
    lr, beta1, beta2, weight_decay = hparams.unbind()
    c = torch.sign(exp_avg * beta1 + grad * (1 - beta1))
    param.mul_(1 - lr * weight_decay).sub_(lr * c)
    exp_avg.mul_(beta2).add_(grad * (1 - beta2))


def _lion_update_batch(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hparams: Tensor) -> None:
    """_lion_update on _FUSED_BATCH flat tensors of one size: one compiled call instead of several."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        _lion_update(param, grad, exp_avg, hparams)


_compiled: dict[Callable[..., None], Callable[..., None]] = {}  # torch.compile'd on first use, kept per process
_compile_failed = False


def _compiled_fn(fn: Callable[..., None]) -> Callable[..., None]:
    if fn not in _compiled:  # dynamic: one graph per dtype for every size
        _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=True)
    return _compiled[fn]


def _fusable(param: Tensor, grad: Tensor, exp_avg: Tensor) -> bool:
    return (
        param.device.type == "cpu"
        and param.numel() >= _FUSED_MIN
        and _is_plain(param)
        and all(t.is_contiguous() for t in (param, grad, exp_avg))
    )


def _run_compiled(batch: list[tuple[Tensor, Tensor, Tensor]], hparams: Tensor) -> None:
    """Up to _FUSED_BATCH tensors of one dtype and size: a full batch in one call, a shorter one a call each."""
    flat = [tuple(t.view(-1).detach() for t in tensors) for tensors in batch]  # detached: no autograd base to guard
    if len(flat) == _FUSED_BATCH:  # equal sizes share one symbolic size: one graph for every batch
        ps, gs, ms = (list(ts) for ts in zip(*flat, strict=True))
        _compiled_fn(_lion_update_batch)(ps, gs, ms, hparams)
    else:
        for tensors in flat:
            _compiled_fn(_lion_update)(*tensors, hparams)


def _fused_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    global _compile_failed
    by_size: dict[tuple[torch.dtype, int], list[tuple[Tensor, Tensor, Tensor]]] = {}
    rest: list[tuple[Tensor, Tensor, Tensor]] = []
    for tensors in zip(params, grads, exp_avgs, strict=True):
        if _fusable(*tensors):
            by_size.setdefault((tensors[0].dtype, tensors[0].numel()), []).append(tensors)
        else:
            rest.append(tensors)
    batches = [group[i : i + _FUSED_BATCH] for group in by_size.values() for i in range(0, len(group), _FUSED_BATCH)]
    if _compile_failed or sum(len(b) * b[0][0].numel() for b in batches) < _FUSED_MIN_STEP:
        rest += [tensors for batch in batches for tensors in batch]  # a small step gains nothing worth a compile
        batches = []
    hparams = torch.tensor([lr, beta1, beta2, weight_decay], dtype=torch.float64)
    for i, batch in enumerate(batches):
        try:
            _run_compiled(batch, hparams)
        except Exception as exc:  # no C++ compiler, an unsupported platform...: compiling fails before any write
            _compile_failed = True
            warnings.warn(f"Lion: torch.compile failed, using eager ops ({type(exc).__name__}: {exc})", stacklevel=2)
            rest += [tensors for undone in batches[i:] for tensors in undone]
            break
    if rest:
        ps, gs, ms = (list(ts) for ts in zip(*rest, strict=True))
        _single_tensor_lion(ps, gs, ms, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)


def _multi_tensor_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        ps, gs, ms = groups.setdefault((param.device, param.dtype), ([], [], []))
        ps.append(param)
        gs.append(grad)
        ms.append(exp_avg)
    for ps, gs, ms in groups.values():
        cs = torch._foreach_lerp(ms, gs, 1.0 - beta1)  # c = beta1 * m + (1 - beta1) * g
        torch._foreach_sign_(cs)
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
        torch._foreach_add_(ps, cs, alpha=-lr)
        del cs
        torch._foreach_lerp_(ms, gs, 1.0 - beta2)


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    foreach: bool | None = None,
) -> None:
    """One Lion step in place on ``params`` and ``exp_avgs`` (any shards of them: the math is elementwise).

    ``foreach``: True for ``torch._foreach_*``, False for eager ops one tensor at a time, None for the fastest
    on these tensors' devices (foreach on GPUs, the compiled fused loop on CPU).
    """
    if foreach is None:
        on_gpu = bool(params) and all(p.device.type in _FOREACH_DEVICES for p in params)
        impl = _multi_tensor_lion if on_gpu else _fused_lion
    else:
        impl = _multi_tensor_lion if foreach else _single_tensor_lion
    impl(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)


class Lion(torch.optim.Optimizer):
    """Lion (sign of an interpolated momentum, decoupled weight decay); see the module docstring.

    Args:
        params: parameters or parameter groups.
        lr: learning rate, > 0 (each entry moves by exactly ``lr`` per step, before decay).
        betas: (beta1, beta2), each in [0, 1): beta1 interpolates the sign's input, beta2 the kept momentum.
        weight_decay: decoupled weight decay, >= 0; the parameter is scaled by ``1 - lr * weight_decay``.
        foreach: True for the multi-tensor path, False for eager ops one tensor at a time, None for the fastest
            on the parameters' device (multi-tensor on GPUs; on CPU a compiled fused loop for large tensors).

    State per parameter: ``exp_avg``. No communication: under sharding each rank steps its own shards.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts from lion-pytorch have no foreach
            group.setdefault("foreach", None)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            beta1, beta2 = group["betas"]
            lion(
                params,
                grads,
                exp_avgs,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                foreach=group["foreach"],
            )
        return loss
