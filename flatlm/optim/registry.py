"""One map from optimizer name to factory. Unknown names and hyperparameters are loud errors."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from flatlm.errors import FlatlmError, did_you_mean


def _adamw(params: Any, lr: float, betas: tuple[float, float] = (0.9, 0.95), **kw: Any) -> torch.optim.Optimizer:
    """torch's AdamW on its fastest path here: fused kernels where the device has them."""
    kw.setdefault("fused", True)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), **kw)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": _adamw}
_SIGNATURES: dict[str, Callable[..., Any]] = {"adamw": torch.optim.AdamW}


def build_optimizer(name: str, params_or_groups: Any, **hparams: Any) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise FlatlmError(
            f"unknown optimizer {name!r}{did_you_mean(name, OPTIMIZERS)}; valid optimizers: {', '.join(OPTIMIZERS)}"
        )
    valid = [p for p in inspect.signature(_SIGNATURES[name]).parameters if p not in ("self", "params")]
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise FlatlmError(
            f"optimizer {name!r} has no hyperparameter {', '.join(map(repr, unknown))}"
            f"{did_you_mean(unknown[0], valid)}; valid: {', '.join(valid)}"
        )
    try:
        return OPTIMIZERS[name](params_or_groups, **hparams)
    except ValueError as exc:
        raise FlatlmError(f"invalid hyperparameters for optimizer {name!r}: {exc}") from None
