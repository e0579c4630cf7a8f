r"""SAM: Sharpness-Aware Minimization, and the base class of its family (ASAM, SSAM, GSAM, LookSAM, ESAM).

Source: P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021 (arXiv:2010.01412); reference code google-research/sam, davda54/sam.

SAM minimises max_{||eps|| <= rho} L(w + eps) with a first-order inner step. One optimizer step is

    g    = grad L(w)                          pass 1 (the training loop's forward/backward)
    eps  = rho g / (||g|| + 1e-12)            ||.|| is the global L2 norm over every parameter
    g'   = grad L(w + eps)                    pass 2, on the same data
    w    <- base_optimizer_step(w, g')        AdamW, SGD, Lion, ... at w (not w + eps), with g'

SAM is a train-step strategy wrapped around *any* base optimizer (AdamW by default), driven by the loop as

    pass 1 -> if opt.perturb(): pass 2 (backward of opt.second_pass_loss(...)); opt.restore() -> clip -> opt.step()

``perturb`` keeps an exact copy of w (so ``restore`` gives w back bit for bit, never w + eps - eps), writes
w + eps into the parameters and zeroes the gradients the way torch's ``zero_grad`` does, by setting them to None
(pass 2 then writes fresh tensors, and variants that need g later keep the pass-1 tensors themselves instead of
copying them). ``restore`` copies w back and leaves the variant's final gradient in ``p.grad`` (SAM: g'
itself). ``step()`` without a closure is the base optimizer's step on ``p.grad``; with a closure (torch
convention: forward + backward, returns the loss, does not zero grads) it runs closure, perturb, closure,
restore, base step and returns the first loss.

Variants override two hooks, ``_perturb`` (what eps is; may decline the second pass) and ``_final_grad`` (what
the base optimizer sees), and ``second_pass_loss`` (ESAM's data selection):

    ASAM     (asam.py)     eps = rho T^2 g / ||T g||, T = |w| + eta          Kwon et al. 2021
    SSAM     (ssam.py)     g_final = g' ||g|| / ||g'||                       Tan et al. 2024
    GSAM     (gsam.py)     g_final = g' - alpha g_perp(g to g')              Zhuang et al. 2022
    LookSAM  (looksam.py)  SAM every k steps, reuse g' 's part orthogonal to g in between   Liu et al. 2022
    ESAM     (esam.py)     random subset of tensors perturbed, top-gamma samples in pass 2  Du et al. 2022

Reductions and sharding. Every norm and dot product over the parameters is computed from *local* sums
(``_sumsq``, ``_dot``: sums of squares / products of the tensors this process holds), stacked into one vector
per call site, and passed through ``self.sum_across_ranks`` (identity by default) before any square root or
division. A backend passes an all-reduce there when it builds the optimizer (``sum_across_ranks=``), so each
call site costs one small all-reduce and the norm is the global one, never a per-rank norm. Order per step for
SAM: perturb: 1 reduction (||g||^2); restore: none. Everything else is elementwise and works on any shard.

Views. The math never keys anything by tensor object (a backend may hand it new ones every step: DeepSpeed's
partitions through ``detach()``, FSDP2's unsharded copies). It works on ``flatlm.optim.views.ParamView`` s: a
stable ``key``, this rank's ``tensor``, and flags the math asks instead of testing backend attributes
(``swappable``: may ``p.data`` be swapped; ``whole``: one whole parameter; ``transient``: a copy dropped after the
step). ``perturb()``/``restore()`` use the optimizer's own views (``param_views``: its tensors, keyed by position
in the param groups); a backend calls ``perturb_views(views, grads)`` / ``restore_views(views, grads)`` with the
views it built once (``flatlm.parallel.sam_step`` drives the protocol for every backend). What a variant needs
from a backend is declared as class attributes (``writes_final_grad``, ``final_grad_uses_first_pass``,
``keeps_state``, ``may_skip_second_pass``, ``selects_tensors``); ``flatlm.parallel.compat`` refuses a backend
that cannot provide it, before training.

State. Per view, in ``self.sam_state[view.key]`` (checkpointed, keys start with ``sam_``): none for SAM; the
variants document theirs (LookSAM: ``sam_g_v``). A view of an optimizer tensor is keyed by its position in the
param groups, so the merge into ``state_dict()`` needs no lookup by tensor. Global counters live in every param
group: ``sam_step`` = number of ``perturb`` calls. The copy of w is a scratch buffer per view (``_scratch``,
allocated once and reused: constant memory over a run, ``scratch_bytes`` counts it), never checkpointed
(checkpoints are taken between steps, when w is in the parameters).

The wrapper and its base share one ``param_groups`` list (``self.param_groups`` *is*
``self.base_optimizer.param_groups``, also after ``load_state_dict``), so an LR scheduler built on the SAM
object moves the base's lr. ``self.state`` is the base optimizer's state; ``state_dict()`` has torch's usual
shape ({"state": {index: {...}}, "param_groups": [...]}) with each parameter's base state and its ``sam_*``
state merged, so torch.distributed.checkpoint can key it by parameter name like any optimizer's.

Cost. Everything is torch._foreach_* over all parameters at once (one call per operation, not per tensor),
with no temporaries on CPU. SAM moves 8 parameter-sized streams per step (norm: read g; copy w: read w, write
the copy; w += s g: read w and g, write w; restore: read the copy, write w), AdamW 7; the variants' extra
streams are listed in their modules. benchmarks/optim_cases/sam.py times them against a fused AdamW step.
(On CPU each write to memory not in cache first reads the line, so a copy costs ~1.5 streams there and SAM
~10 against AdamW's 7; GPUs need no such read for whole-line writes.)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from flatlm.optim.views import ParamView, plain_views

BaseFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]

EPS = 1e-12  # added to every norm we divide by (google-research/sam and davda54/sam use 1e-12)
STATE_PREFIX = "sam_"  # wrapper state keys inside state_dict()["state"][i]; everything else is the base's


def default_base_optimizer(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """torch's AdamW on its fused kernels where every parameter allows them (else torch's default path)."""
    params = [p for g in groups for p in g["params"]]
    fused = all(type(p) in (Tensor, torch.nn.Parameter) and p.is_floating_point() for p in params) and all(
        p.device.type in ("cpu", "cuda") for p in params
    )
    return torch.optim.AdamW(groups, fused=fused or None)


def identity(x: Tensor) -> Tensor:
    return x


def check(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok`` (hyperparameter validation for the whole family)."""
    if not ok:
        raise ValueError(message)


def is_number(value: Any) -> bool:
    """A finite real number (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(name: str, value: float) -> None:
    check(is_number(value) and value > 0, f"{name} must be > 0, got {value}")


def check_nonnegative(name: str, value: float) -> None:
    check(is_number(value) and value >= 0, f"{name} must be >= 0, got {value}")


# ---------------------------------------------------------------------------------------------------------------
# List primitives. Each has a per-tensor loop and a torch._foreach_* path with the same result; ``foreach`` picks.
# Local reductions return 0-d tensors; callers stack them and pass them through sum_across_ranks.
# ---------------------------------------------------------------------------------------------------------------


def _norm_dtype(xs: list[Tensor]) -> torch.dtype | None:
    """Accumulate norms of low-precision tensors in float32; float32/float64 keep their own precision."""
    return None if all(x.dtype in (torch.float32, torch.float64) for x in xs) else torch.float32


def _local(xs: list[Tensor]) -> list[Tensor]:
    """The part of each tensor this rank holds (a DTensor's local shard), so sums are local sums."""
    return [x.to_local() if hasattr(x, "to_local") else x for x in xs]


def _sumsq(xs: list[Tensor], foreach: bool) -> Tensor:
    """Local sum of squares of every element of ``xs`` (0-d tensor)."""
    if not xs:
        return torch.zeros(())
    xs = _local(xs)
    dtype = _norm_dtype(xs)
    if dtype is None and xs[0].device.type == "cpu":
        return _dot(xs, xs)  # BLAS dot per tensor: ~1.6x faster than _foreach_norm on CPU, same value
    if foreach:
        norms = torch._foreach_norm(xs, 2, dtype=dtype)
    else:
        norms = [torch.linalg.vector_norm(x, dtype=dtype) for x in xs]
    return torch.stack(norms).square().sum()


def _dot(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """Local sum over all elements of xs * ys (0-d tensor).

    torch has no foreach dot, so this is one ``torch.dot`` per tensor (no temporaries; BLAS on CPU). It is the
    only per-parameter loop in the family's math, and only GSAM and LookSAM's full steps call it.
    """
    if not xs:
        return torch.zeros(())
    xs, ys = _local(xs), _local(ys)
    if _norm_dtype(xs) is None:
        return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys, strict=True)]).sum()
    return torch.stack(
        [torch.dot(x.reshape(-1).float(), y.reshape(-1).float()) for x, y in zip(xs, ys, strict=True)]
    ).sum()


def _copy_(dst: list[Tensor], src: list[Tensor], foreach: bool) -> None:
    if not dst:  # foreach ops refuse empty lists
        return
    dst, src = _local(dst), _local(src)  # DTensors: copy shard to shard (DTensor has no foreach copy rule)
    if foreach:
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


def _mul_(xs: list[Tensor], scale: Tensor | float, foreach: bool) -> None:
    """xs <- scale * xs, scale a Python number or a 0-d tensor (no host sync on GPU)."""
    if not xs:  # foreach ops refuse empty lists
        return
    if foreach:
        torch._foreach_mul_(xs, scale)
    else:
        for x in xs:
            x.mul_(scale)


def _mul_list_(xs: list[Tensor], ys: list[Tensor], foreach: bool) -> None:
    """xs <- xs * ys elementwise."""
    if not xs:  # foreach ops refuse empty lists
        return
    if foreach:
        torch._foreach_mul_(xs, ys)
    else:
        for x, y in zip(xs, ys, strict=True):
            x.mul_(y)


def _abs_add_(xs: list[Tensor], c: float, foreach: bool) -> None:
    """xs <- |xs| + c."""
    if not xs:  # foreach ops refuse empty lists
        return
    if foreach:
        torch._foreach_abs_(xs)
        torch._foreach_add_(xs, c)
    else:
        for x in xs:
            x.abs_().add_(c)


def _add_(dst: list[Tensor], src: list[Tensor], alpha: float, foreach: bool) -> None:
    """dst <- dst + alpha * src for a Python number alpha."""
    if not dst:  # foreach ops refuse empty lists
        return
    if foreach:
        torch._foreach_add_(dst, src, alpha=alpha)
    else:
        for d, s in zip(dst, src, strict=True):
            d.add_(s, alpha=alpha)


def _add_scaled_(dst: list[Tensor], src: list[Tensor], scale: Tensor, foreach: bool, src_is_scratch: bool) -> None:
    """dst <- dst + scale * src for a 0-d tensor ``scale``.

    On CPU the scalar is read (free) and used as ``alpha``: one pass. On an accelerator reading it would stall the
    host until the gradients are ready, so the scale stays a tensor (``_add_scaled_sync_free``).
    """
    if not dst:
        return
    if scale.device.type == "cpu":
        _add_(dst, src, scale.item(), foreach)
    else:
        _add_scaled_sync_free(dst, src, scale, foreach, src_is_scratch)


def _add_scaled_sync_free(
    dst: list[Tensor], src: list[Tensor], scale: Tensor, foreach: bool, src_is_scratch: bool
) -> None:
    """dst <- dst + scale * src without reading ``scale`` on the host: src is scaled in place when it is scratch
    (its values are not needed afterwards), else into a temporary (cheap under a caching allocator)."""
    if not dst:
        return
    if src_is_scratch:
        _mul_(src, scale, foreach)
    else:
        src = torch._foreach_mul(src, scale) if foreach else [s * scale for s in src]
    _add_(dst, src, 1.0, foreach)


# ---------------------------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------------------------


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any base optimizer: eps = rho g / ||g|| (see the module docstring).

    Args:
        params: parameters or parameter groups (as for any torch optimizer); groups go to the base unchanged.
        base_optimizer: ``groups -> Optimizer``; built on the same groups, which the wrapper then shares.
            Default: ``default_base_optimizer`` (torch AdamW, fused where possible).
        rho: radius of the perturbation ball, > 0 (0.05 in Foret et al.).
        foreach: use the torch._foreach_* path (True, the default when None) or per-tensor loops (False).
        sum_across_ranks: ``Tensor -> Tensor``, turns a vector of local sums (squares / products) into global
            sums (an all-reduce, given by the backend when the optimizer is built); identity by default.

    Attributes:
        swap_weights: ``None`` (the views decide: ``ParamView.swappable``), True or False (force one mode; for
            tests and benchmarks). Swapping saves two of the eight memory passes of the wrapper's own work.
        sam_state: per-view wrapper state (``sam_*`` keys) keyed by ``ParamView.key``, checkpointed with the
            base's state.

    What a variant needs from a backend, declared as class attributes (``flatlm.parallel.compat`` and
    ``flatlm.parallel.sam_step`` read them):
        writes_final_grad: the final gradient is not pass 2's g' as it is: ``restore`` (and a skipped pass 2)
            rewrites the gradients the step reads, so the backend hands them over and writes them back (for the
            others it does neither: their step reads g' where pass 2 left it).
        final_grad_uses_first_pass: the final gradient depends on this rank's pass-1 gradient (or its norm); under
            replica perturbation that gradient is rank-local, so the step's gradients must be laid out like it.
        keeps_state: per-view state lives from step to step (keyed by the view, checkpointed).
        may_skip_second_pass: ``perturb`` may return False (the final gradient is then pass 1's, rewritten).
        selects_tensors: the math picks a subset of tensors, meaningful per parameter only on whole parameters.
    """

    swap_weights: bool | None = None  # see Attributes
    writes_final_grad: bool = False
    final_grad_uses_first_pass: bool = False
    keeps_state: bool = False
    may_skip_second_pass: bool = False
    selects_tensors: bool = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseFactory | None = None,
        rho: float = 0.05,
        foreach: bool | None = None,
        *,
        sum_across_ranks: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        check_positive("rho", rho)
        self.rho = float(rho)
        self.foreach = True if foreach is None else bool(foreach)
        self.sum_across_ranks: Callable[[Tensor], Tensor] = sum_across_ranks or identity
        self.sam_state: defaultdict[str, dict[str, Any]] = defaultdict(dict)
        self._scratch: dict[str, dict[str, Tensor]] = {}  # per-view buffers by ParamView.key, never checkpointed
        self._views: tuple[tuple[int, ...], list[ParamView]] | None = None  # own views, built once per group layout
        self._keys: dict[int, str] = {}  # id(tensor) -> view key, for the tensors of the current perturb/restore
        self._swappable = False  # every view of the current perturb/restore may be swapped
        self._whole = True  # every view of the current perturb/restore is one whole parameter
        self._transient = False  # every view of the current perturb/restore is a copy dropped after the step
        self._perturbed: list[ParamView] | None = None  # views moved to w + eps, waiting for restore()
        self._swapped = False  # whether the kept w is in scratch by a p.data swap (restore swaps back)

        groups = list(params)
        check(len(groups) > 0, "SAM got an empty parameter list")
        groups = [dict(g) for g in groups] if isinstance(groups[0], dict) else [{"params": groups}]
        for g in groups:
            g.setdefault("sam_step", 0)
        factory = base_optimizer if base_optimizer is not None else default_base_optimizer
        base = factory(groups)
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must return a torch.optim.Optimizer, got {type(base).__name__}")
        given = {id(p) for g in groups for p in g["params"]}
        if {id(p) for g in base.param_groups for p in g["params"]} != given:
            raise ValueError("base_optimizer must build its optimizer on the parameter groups it is given")
        self.base_optimizer = base
        self._initializing = True  # torch's __init__ assigns state/param_groups and adds groups: the base has them
        super().__init__(base.param_groups, {**base.defaults, **self._hyperparameters()})
        self._initializing = False

    def _hyperparameters(self) -> dict[str, Any]:
        """The wrapper's hyperparameters, merged into ``defaults`` (variants extend)."""
        return {"rho": self.rho}

    # -- one set of param groups and state: the base's ----------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if not self.__dict__.get("_initializing", False):
            self.base_optimizer.param_groups = value

    @property
    def state(self) -> defaultdict[Tensor, Any]:  # type: ignore[override]
        return self.base_optimizer.state

    @state.setter
    def state(self, value: defaultdict[Tensor, Any]) -> None:
        if not self.__dict__.get("_initializing", False):
            self.base_optimizer.state = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.__dict__.get("_initializing", False):
            return
        param_group.setdefault("sam_step", self.sam_step)
        self.base_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    # -- counters -----------------------------------------------------------------------------------------------

    @property
    def sam_step(self) -> int:
        """Number of ``perturb`` calls so far (kept in every param group, so it is checkpointed)."""
        return int(self.param_groups[0].get("sam_step", 0))

    def _advance(self) -> int:
        """Count one perturb; returns the 0-based index of this step."""
        index = self.sam_step
        for g in self.param_groups:
            g["sam_step"] = index + 1
        return index

    # -- views ----------------------------------------------------------------------------------------------------

    def param_views(self) -> list[ParamView]:
        """Views of this optimizer's own tensors, keyed by their position in the param groups (torch's
        ``state_dict`` numbering, so the keys are the checkpoint's too). Built once per group layout."""
        params = [p for g in self.param_groups for p in g["params"]]
        ids = tuple(id(p) for p in params)
        if self._views is None or self._views[0] != ids:
            self._views = (ids, plain_views([(str(i), p) for i, p in enumerate(params)]))
        return self._views[1]

    def _bind(self, views: list[ParamView]) -> list[Tensor]:
        """Make the tensors of ``views`` known to the helpers below for this call; returns them."""
        self._keys = {id(v.tensor): v.key for v in views}
        self._swappable = all(v.swappable for v in views)
        self._whole = all(v.whole for v in views)
        self._transient = all(v.transient for v in views)
        return [v.tensor for v in views]

    def _key(self, t: Tensor) -> str:
        return self._keys[id(t)]

    # -- helpers for the variants -------------------------------------------------------------------------------

    def _buffers(self, params: list[Tensor], name: str) -> list[Tensor]:
        """Scratch tensor ``name`` for each tensor's view (allocated once, then reused: keyed by the view)."""
        out = []
        for p in params:
            slot = self._scratch.setdefault(self._key(p), {})
            buf = slot.get(name)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = slot[name] = torch.empty_like(p, memory_format=torch.preserve_format)
            out.append(buf)
        return out

    def _global(self, *local: Tensor) -> Tensor:
        """Global sums of the given local sums: one ``sum_across_ranks`` call for the whole vector."""
        dtype = local[0].dtype
        for x in local[1:]:
            dtype = torch.promote_types(dtype, x.dtype)
        return self.sum_across_ranks(torch.stack([x.to(device=local[0].device, dtype=dtype) for x in local]))

    def _grad_norm(self, grads: list[Tensor]) -> Tensor:
        return self._global(_sumsq(grads, self.foreach))[0].sqrt()

    def _can_swap(self) -> bool:
        """Whether w can be kept aside by swapping ``p.data`` instead of copying (the views say; or
        ``swap_weights``)."""
        if self.swap_weights is not None:
            return bool(self.swap_weights)
        return self._swappable

    def _save_and_move(
        self, params: list[Tensor], grads: list[Tensor], scale: Tensor, grads_kept: bool = False
    ) -> None:
        """Keep w aside exactly, then w <- w + scale * g. Pass ``grads_kept`` when g is needed after this.

        Swap mode (plain tensors): w + scale g is written into a scratch buffer (one read of w and g, one write)
        and the buffer becomes ``p.data``; the original storage is kept and swapped back by ``restore``, so w
        comes back bit for bit with no copy. Copy mode: w is copied to scratch and moved in place. Transient
        views (copies the backend drops after the step): moved in place, nothing kept.
        """
        if self._transient:
            _add_scaled_(params, grads, scale, self.foreach, src_is_scratch=not grads_kept)
            return
        if self._can_swap():
            moved = self._buffers(params, "w")
            if scale.device.type == "cpu":
                alpha = scale.item()
                for m, p, g in zip(moved, params, grads, strict=True):
                    torch.add(p, g, alpha=alpha, out=m)
            else:  # keep the scale on the device: no host sync
                _copy_(moved, params, self.foreach)
                _add_scaled_sync_free(moved, grads, scale, self.foreach, src_is_scratch=not grads_kept)
            for p, m in zip(params, moved, strict=True):
                self._scratch[self._key(p)]["w"] = p.data
                p.data = m
            self._swapped = True
            return
        _copy_(self._buffers(params, "w"), params, self.foreach)
        _add_scaled_(params, grads, scale, self.foreach, src_is_scratch=not grads_kept)

    def _put_back(self, params: list[Tensor]) -> None:
        """Restore the w that ``_save_and_move`` (or a variant's copy) kept aside. Transient views: nothing to put
        back, and nothing may stay keyed by them (a copy of a transient tensor is a whole weight copy held between
        steps): their scratch, if a variant made any, is dropped here."""
        if self._transient:
            for p in params:
                self._scratch.pop(self._key(p), None)
            return
        if self._swapped:
            for p in params:
                slot = self._scratch[self._key(p)]
                slot["w"], p.data = p.data, slot["w"]
            self._swapped = False
        else:
            _copy_(params, self._buffers(params, "w"), self.foreach)

    @staticmethod
    def _keep(grads: list[Tensor]) -> list[Tensor]:
        """Keep g for ``restore`` without copying it: ``perturb`` drops the tensors from p.grad, so pass 2
        writes fresh ones. A gradient that is a view of a shared buffer (DDP's gradient_as_bucket_view, ZeRO's
        gradient partitions) would be overwritten by pass 2, so that one is copied."""
        return [g.clone() if g._is_view() else g for g in grads]

    def scratch_bytes(self) -> tuple[int, int]:
        """(number of scratch buffers held, their bytes): constant from step to step (the leak tests read it)."""
        bufs = [t for slot in self._scratch.values() for t in slot.values()]
        return len(bufs), sum(t.numel() * t.element_size() for t in bufs)

    # -- the interface the training loop drives -----------------------------------------------------------------

    @torch.no_grad()
    def perturb(self) -> bool:
        """After pass 1 (p.grad = g at w): move to w + eps and zero the grads (set them to None, as torch's
        ``zero_grad`` does); True if pass 2 must run.

        False means this step needs no second pass: p.grad already holds the final gradient, weights unchanged.
        """
        views = [v for v in self.param_views() if v.tensor.grad is not None]
        for v in views:
            if v.tensor.grad.is_sparse:
                raise RuntimeError("the SAM family does not support sparse gradients")
        second = self.perturb_views(views, [v.tensor.grad for v in views])
        if second:
            for v in views:  # torch's zero_grad(set_to_none=True): pass 2 starts from fresh gradients
                v.tensor.grad = None
        return second

    @torch.no_grad()
    def perturb_views(self, views: list[ParamView], grads: list[Tensor]) -> bool:
        """``perturb`` on explicit views (a backend's: DeepSpeed's flat fp32 partitions, FSDP2's unsharded copies)
        and their pass-1 gradients; leaves the gradients to the caller. Where it returns False the final gradient
        has been written into ``grads``."""
        if self._perturbed is not None:
            raise RuntimeError("perturb() called twice without restore(): the weights are still at w + eps")
        index = self._advance()
        if not views:
            return False
        second = self._perturb(index, self._bind(views), list(grads))
        if second:
            self._perturbed = list(views)
        return second

    @torch.no_grad()
    def restore(self) -> None:
        """After pass 2 (p.grad = g' at w + eps): put w back exactly and write the final gradient into p.grad."""
        views = self._perturbed
        if views is None:
            raise RuntimeError("restore() called without a perturb() that returned True")
        for v in views:  # a param used in pass 1 but not in pass 2 (rare): its g' is zero
            if v.tensor.grad is None:
                v.tensor.grad = torch.zeros_like(v.tensor)
        self.restore_views(views, [v.tensor.grad for v in views])

    @torch.no_grad()
    def restore_views(self, views: list[ParamView], grads: list[Tensor]) -> None:
        """``restore`` on the views ``perturb_views`` moved, with pass 2's gradients ``grads`` (the final
        gradient is written into them)."""
        if self._perturbed is None:
            raise RuntimeError("restore() called without a perturb() that returned True")
        if [v.key for v in views] != [v.key for v in self._perturbed]:
            raise RuntimeError("restore() got other views than the perturb() it ends")
        params = self._bind(views)
        self._restore_weights(params)
        self._final_grad(params, list(grads))
        self._perturbed = None
        self._keys = {}

    def second_pass_loss(self, per_sample_loss: Tensor, first_pass_per_sample_loss: Tensor) -> Tensor:
        """The scalar to backward in pass 2 from the per-sample losses at w + eps (and at w); the mean here."""
        del first_pass_per_sample_loss
        return per_sample_loss.mean()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Without a closure: the base optimizer's step on p.grad. With one: the whole two-pass SAM step.

        The closure does forward + backward and returns the loss (it does not zero grads). The returned loss is
        the first pass's. Note: with a closure there are no per-sample losses, so ESAM's data selection does not
        apply (use the perturb/restore flow for it).
        """
        if self._perturbed is not None:
            raise RuntimeError("step() called between perturb() and restore(): the weights are still at w + eps")
        if closure is None:
            self._init_state()
            return self.base_optimizer.step()
        with torch.enable_grad():
            loss = closure()
        if self.perturb():
            with torch.enable_grad():
                closure()
            self.restore()
        self._init_state()
        self.base_optimizer.step()
        return loss

    # -- variant hooks ------------------------------------------------------------------------------------------

    def _perturb(self, index: int, params: list[Tensor], grads: list[Tensor]) -> bool:
        """SAM: eps = rho g / ||g||."""
        del index
        norm = self._grad_norm(grads)
        self._save_and_move(params, grads, self.rho / (norm + EPS))
        return True

    def _restore_weights(self, params: list[Tensor]) -> None:
        self._put_back(params)

    def _final_grad(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """SAM: the base optimizer steps with g' as it is."""

    def _init_state(self) -> None:
        """Create persistent per-view state that must exist before the first step (LookSAM's g_v).

        Called by ``step`` so that torch.distributed.checkpoint's state initialisation (a step on zero grads)
        also creates the wrapper's state, and a fresh optimizer's state_dict lists every key a checkpoint has.
        """

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base's state_dict with each parameter's ``sam_*`` state merged in (new dicts; base untouched).

        A view's state is keyed by the view, and a view of an optimizer tensor is keyed by its position in the
        param groups (``param_views``; a backend's views of the tensors it hands the optimizer likewise, e.g.
        ZeRO's flat partition k is position k): the position is torch's numbering here."""
        sd = self.base_optimizer.state_dict()
        state = dict(sd["state"])
        for position, key in enumerate(k for g in sd["param_groups"] for k in g["params"]):
            mine = self.sam_state.get(str(position))
            if mine:
                state[key] = {**state.get(key, {}), **mine}
        return {**sd, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Split each parameter's state into the base's and the ``sam_*`` keys; the base loads its part.

        State keys are matched to parameters by position in the saved groups' ``params`` lists, as torch does, so
        index keys (``state_dict()``) and parameter names (torch.distributed.checkpoint) both work.
        """
        saved = [k for g in state_dict["param_groups"] for k in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        if len(saved) != len(current):
            raise ValueError(f"state_dict has {len(saved)} parameters in its groups, this optimizer {len(current)}")
        position = {key: i for i, key in enumerate(saved)}
        base_state: dict[Any, dict[str, Any]] = {}
        mine: dict[str, dict[str, Any]] = {}
        for key, st in state_dict["state"].items():
            b = {k: v for k, v in st.items() if not str(k).startswith(STATE_PREFIX)}
            m = {k: v for k, v in st.items() if str(k).startswith(STATE_PREFIX)}
            if b:
                base_state[key] = b
            if m:
                p = current[position[key]]
                mine[str(position[key])] = {
                    k: v.to(device=p.device, dtype=p.dtype) if isinstance(v, Tensor) and v.is_floating_point() else v
                    for k, v in m.items()
                }
        self.base_optimizer.load_state_dict({**state_dict, "state": base_state})
        self.sam_state = defaultdict(dict, mine)
        self._perturbed = None
