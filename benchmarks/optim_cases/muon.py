"""Muon step time against torch.optim.Muon (same 2-D tensors) and, for context, against fused AdamW.

    python benchmarks/optim_step.py --only muon

The parameters come unnamed, so "2-D" stands in for "hidden matrix": the embedding and the head count as matrices
here (torch.optim.Muon gets the same set). Same hyperparameters for both sides; adjust_lr="match_rms_adamw".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatlm.optim.muon import Muon

HP = dict(lr=2e-3, momentum=0.95, nesterov=True, weight_decay=0.1)


def _matrices(params: list[Tensor]) -> list[Tensor]:
    return [p for p in params if p.ndim == 2]


def _split(params: list[Tensor]) -> list[dict]:
    return [
        {"params": _matrices(params), "use_muon": True},
        {"params": [p for p in params if p.ndim != 2], "use_muon": False, "weight_decay": 0.0},
    ]


def _torch_muon(params: list[Tensor]) -> Optimizer:
    return torch.optim.Muon(_matrices(params), **HP, adjust_lr_fn="match_rms_adamw")


def cases() -> list[tuple[str, Callable[[list[Tensor]], Optimizer], Callable[[list[Tensor]], Optimizer]]]:
    return [
        # foreach=None: batched NS on CUDA, per tensor on CPU (measured faster there).
        ("muon bf16 vs torch Muon (2-D)", lambda ps: Muon(_matrices(ps), **HP), _torch_muon),
        ("muon bf16 batched vs torch Muon (2-D)", lambda ps: Muon(_matrices(ps), **HP, foreach=True), _torch_muon),
        ("muon fp32 NS vs torch Muon (2-D)", lambda ps: Muon(_matrices(ps), **HP, ns_dtype="float32"), _torch_muon),
        (
            "muon+adamw vs torch AdamW fused (all)",
            lambda ps: Muon(_split(ps), **HP),
            lambda ps: torch.optim.AdamW(ps, lr=HP["lr"], betas=(0.9, 0.95), weight_decay=0.1, fused=True),
        ),
    ]
