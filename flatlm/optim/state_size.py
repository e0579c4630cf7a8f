"""How much memory an optimizer's state holds on this rank."""

from __future__ import annotations

from typing import Any

import torch


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value  # a DTensor counts its shard
        return local.numel() * local.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensor state this rank's optimizer holds (a wrapper's and its base's together)."""
    total = _tensor_bytes(dict(optimizer.state))
    base = getattr(optimizer, "base_optimizer", None)
    if base is not None and base.state is not optimizer.state:
        total += _tensor_bytes(dict(base.state))
    return total
