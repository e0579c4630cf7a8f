"""Optimizers: the registry, parameter-group policy and learning-rate schedules."""

from flatlm.optim.param_groups import param_groups
from flatlm.optim.registry import OPTIMIZERS, build_optimizer
from flatlm.optim.schedules import SCHEDULES, build_scheduler

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler", "param_groups"]
