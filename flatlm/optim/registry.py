"""One map from optimizer name to its class, flatlm's defaults and its parameter-group policy.

``build_optimizer(name, params_or_groups, **hparams)`` validates every hyperparameter name against the
optimizer's signature (an unknown one is an error that lists the valid ones), applies flatlm's
defaults (fused/foreach kernels, LM-friendly betas) and turns the optimizer's own ``ValueError`` into
a :class:`FlatlmError`. The SAM family wraps any other registered optimizer:
``build_optimizer("sam", params, base="adamw", rho=0.05, lr=1e-3, betas=(0.9, 0.95))`` passes the
hyperparameters SAM does not take to its base. What a backend provides (global sums, Muon's gather-scatter
orthogonalisation, Adafactor's layout and partial-sum reduction, the ownership step wrapper) arrives as one
``flatlm.optim.distribution.Distribution`` and is passed to the constructors (``INJECTED`` names), never patched in.

Adding an optimizer is one module and one line in ``OPTIMIZERS``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from flatlm.errors import FlatlmError, did_you_mean
from flatlm.optim.distribution import LOCAL, Distribution


@dataclass(frozen=True)
class OptimizerSpec:
    target: str
    """``module:Class`` of the optimizer (imported on first use)."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """flatlm's defaults where they differ from the class's."""
    fast_kernels: bool = False
    """Try ``fused=True`` (torch's fastest CPU/GPU kernels) unless the user chose a path."""
    muon_groups: bool = False
    """Parameters are split into Muon (2-D hidden matrices) and AdamW groups."""
    wrapper: bool = False
    """A SAM-family wrapper around a ``base`` optimizer."""
    with_lr: dict[str, Any] = field(default_factory=dict)
    """Defaults that apply when an ``lr`` is given (Adafactor: the lr and its schedule set the step size)."""

    def cls(self) -> type[torch.optim.Optimizer]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)

    def hparam_names(self) -> list[str]:
        skip = {"self", "params", "base_optimizer", *INJECTED}
        return [p for p in inspect.signature(self.cls()).parameters if p not in skip]


# Constructor arguments a backend passes when it builds the optimizer (how distribution gets in): never
# hyperparameters, so never in a config, in the valid names an error lists, or in the run identity.
INJECTED = frozenset({"sum_across_ranks", "orthogonalize", "layout", "shard_sum"})  # flatlm.optim.distribution

_TORCH = "torch.optim"
_SAM = "flatlm.optim"
OPTIMIZERS: dict[str, OptimizerSpec] = {
    # torch.optim, not rewritten; fused kernels where torch has them for the device.
    "adamw": OptimizerSpec(f"{_TORCH}:AdamW", {"betas": (0.9, 0.95)}, fast_kernels=True),
    "adam": OptimizerSpec(f"{_TORCH}:Adam", {"betas": (0.9, 0.95)}, fast_kernels=True),
    "sgd": OptimizerSpec(f"{_TORCH}:SGD", fast_kernels=True),
    "adagrad": OptimizerSpec(f"{_TORCH}:Adagrad", fast_kernels=True),
    "rmsprop": OptimizerSpec(f"{_TORCH}:RMSprop"),
    "adadelta": OptimizerSpec(f"{_TORCH}:Adadelta"),
    # flatlm's own.
    "adafactor": OptimizerSpec(
        "flatlm.optim.adafactor:Adafactor", with_lr={"relative_step": False, "scale_parameter": False}
    ),
    "lion": OptimizerSpec("flatlm.optim.lion:Lion"),
    "muon": OptimizerSpec("flatlm.optim.muon:Muon", muon_groups=True),
    # The SAM family around any of the above.
    "sam": OptimizerSpec(f"{_SAM}.sam:SAM", wrapper=True),
    "asam": OptimizerSpec(f"{_SAM}.asam:ASAM", wrapper=True),
    "ssam": OptimizerSpec(f"{_SAM}.ssam:SSAM", wrapper=True),
    "gsam": OptimizerSpec(f"{_SAM}.gsam:GSAM", wrapper=True),
    "looksam": OptimizerSpec(f"{_SAM}.looksam:LookSAM", wrapper=True),
    "esam": OptimizerSpec(f"{_SAM}.esam:ESAM", wrapper=True),
}


def get_spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise FlatlmError(
            f"unknown optimizer {name!r}{did_you_mean(name, OPTIMIZERS)}; valid optimizers: {', '.join(OPTIMIZERS)}"
        )
    return OPTIMIZERS[name]


def uses_muon_groups(name: str, hparams: dict[str, Any] | None = None) -> bool:
    """Whether ``name`` (or, for the SAM family, its base) wants Muon/AdamW parameter groups."""
    spec = get_spec(name)
    if spec.wrapper:
        return get_spec(str((hparams or {}).get("base", "adamw"))).muon_groups
    return spec.muon_groups


def _check_names(name: str, given: dict[str, Any], valid: list[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise FlatlmError(
            f"optimizer {name!r} has no hyperparameter {', '.join(map(repr, unknown))}"
            f"{did_you_mean(unknown[0], valid)}; valid: {', '.join(valid)}"
        )


def _plain_tensors(params: Any) -> bool:
    """Whether every parameter is a plain tensor (torch's fused kernels have no DTensor rules for some optimizers)."""
    items = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    return all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in items)


def _injected(cls: type, distribution: Distribution) -> dict[str, Any]:
    """The arguments ``distribution`` injects that ``cls``'s constructor takes (by name, from its signature)."""
    return distribution.arguments_for(list(inspect.signature(cls).parameters))


def _instantiate(
    name: str, spec: OptimizerSpec, params: Any, hparams: dict[str, Any], distribution: Distribution
) -> torch.optim.Optimizer:
    cls = spec.cls()
    kw = {**spec.defaults, **(spec.with_lr if "lr" in hparams else {}), **hparams, **_injected(cls, distribution)}
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    try:
        if spec.fast_kernels and not {"fused", "foreach"} & set(hparams) and _plain_tensors(params):
            try:
                return cls(params, **kw, fused=True)
            except (RuntimeError, ValueError):
                pass  # no fused kernel for this device/dtype/options: torch picks foreach or the loop
        return cls(params, **kw)
    except ValueError as exc:
        raise FlatlmError(f"invalid hyperparameters for optimizer {name!r}: {exc}") from None


def build_optimizer(
    name: str, params_or_groups: Any, *, distribution: Distribution | None = None, **hparams: Any
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params_or_groups`` with ``hparams`` (ecosystem names).

    ``distribution`` is what the backend injects (``flatlm.optim.distribution``; default: one process): each
    optimizer gets the fields its constructor names as keyword arguments (SAM ``sum_across_ranks``, Muon
    ``orthogonalize`` and ``layout``, Adafactor ``layout`` and ``shard_sum``), and ``step_wrapper(groups,
    factory)``, if set, builds the optimizer that updates the weights (the base of a SAM-family wrapper): how a
    sharding layer (``flatlm.parallel``) gets in without the registry knowing about ranks. Nothing is set on an
    optimizer after it is built.
    """
    distribution = distribution or LOCAL
    spec = get_spec(name)
    if isinstance(params_or_groups, torch.Tensor):
        raise FlatlmError("build_optimizer takes an iterable of parameters or parameter groups, not one tensor")
    params = list(params_or_groups)
    if not spec.wrapper:
        _check_names(name, hparams, spec.hparam_names())
        if distribution.step_wrapper is not None:
            return distribution.step_wrapper(
                params, lambda groups: _instantiate(name, spec, groups, hparams, distribution)
            )
        return _instantiate(name, spec, params, hparams, distribution)

    base = str(hparams.pop("base", "adamw"))
    if base not in OPTIMIZERS or OPTIMIZERS[base].wrapper:
        valid = [n for n, s in OPTIMIZERS.items() if not s.wrapper]
        raise FlatlmError(
            f"{name} has an unknown base optimizer {base!r}{did_you_mean(base, valid)}; valid: {', '.join(valid)}"
        )
    own_names = spec.hparam_names()
    own = {k: v for k, v in hparams.items() if k in own_names}
    base_hparams = {k: v for k, v in hparams.items() if k not in own_names}
    _check_names(name, base_hparams, sorted(set(OPTIMIZERS[base].hparam_names()) | set(own_names) | {"base"}))

    def make_base(groups: Any) -> torch.optim.Optimizer:
        return build_optimizer(base, groups, distribution=distribution, **base_hparams)

    try:
        return spec.cls()(params, make_base, **own, **_injected(spec.cls(), distribution))
    except ValueError as exc:
        raise FlatlmError(f"invalid hyperparameters for optimizer {name!r}: {exc}") from None


def model_param_groups(
    name: str, model: torch.nn.Module, weight_decay: float, hparams: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Parameter groups of ``model`` for optimizer ``name``: Muon/AdamW split or decay/no-decay."""
    from flatlm.optim.param_groups import muon_param_groups, param_groups

    if uses_muon_groups(name, hparams):
        try:
            return muon_param_groups(model, weight_decay)
        except ValueError as exc:
            raise FlatlmError(f"optimizer {name!r}: {exc}") from None
    return param_groups(model, weight_decay)


def _signature_defaults(cls: type) -> dict[str, Any]:
    # lr: flatlm always passes optim.lr; weight_decay: every parameter group sets its own from optim.weight_decay
    skip = {"self", "params", "base_optimizer", "lr", "weight_decay", *INJECTED}
    return {
        k: p.default
        for k, p in inspect.signature(cls).parameters.items()
        if k not in skip and p.default is not inspect.Parameter.empty
    }


def _plain(value: Any) -> Any:
    """Tuples as lists, as they read back from config.yaml."""
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def resolved_hparams(name: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters optimizer ``name`` runs with, given the written ``hparams`` and an lr: the written
    ones over flatlm's defaults over the class's. The run identity compares these, so ``optim.hparams: {}`` and
    ``optim.hparams.betas=[0.9, 0.95]`` (AdamW's default here) are one run. An unknown name (a run from another
    flatlm) resolves to ``hparams`` as written."""
    if name not in OPTIMIZERS:
        return dict(hparams)
    spec = get_spec(name)
    if spec.wrapper:  # the SAM family: its own arguments, then the base's
        base = str(hparams.get("base", "adamw"))
        own = _signature_defaults(spec.cls())
        rest = {k: v for k, v in hparams.items() if k not in own and k != "base"}
        written = {k: v for k, v in hparams.items() if k in own}
        return {**resolved_hparams(base, rest), **own, **{k: _plain(v) for k, v in written.items()}, "base": base}
    merged = {**_signature_defaults(spec.cls()), **spec.defaults, **spec.with_lr, **hparams}
    return {k: _plain(v) for k, v in merged.items()}


def inner_optimizers(optimizer: torch.optim.Optimizer) -> Iterator[torch.optim.Optimizer]:
    """``optimizer`` and every optimizer it wraps (a SAM base, an ownership wrapper's inner one)."""
    seen: set[int] = set()
    stack = [optimizer]
    while stack:
        opt = stack.pop()
        if id(opt) in seen:
            continue
        seen.add(id(opt))
        yield opt
        stack.extend(o for o in (getattr(opt, "base_optimizer", None), getattr(opt, "inner", None)) if o is not None)
