"""Optimizers: the registry, parameter-group policy and learning-rate schedules.

Each flatlm optimizer lives in its own module (``adafactor``, ``lion``, ``muon``, ``sam`` and its
variants) with its equation in the docstring; the classic family comes from ``torch.optim``.
"""

from flatlm.optim.param_groups import param_groups
from flatlm.optim.registry import OPTIMIZERS, build_optimizer, model_param_groups
from flatlm.optim.schedules import SCHEDULES, build_scheduler

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler", "model_param_groups", "param_groups"]
