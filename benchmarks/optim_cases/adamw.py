"""AdamW: flatlm's registry choice against torch's own paths."""

from __future__ import annotations

import torch

from flatlm.optim import build_optimizer


def cases():
    ours = lambda ps: build_optimizer("adamw", ps, lr=1e-3, weight_decay=0.1)  # noqa: E731
    yield "adamw vs torch AdamW(fused=True)", ours, lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)
    yield "adamw vs torch AdamW(foreach=True)", ours, lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)
    yield "adamw vs torch AdamW(for-loop)", ours, lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False)
