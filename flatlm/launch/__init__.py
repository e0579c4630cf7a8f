"""Where a run executes: the launcher's environment and (later) backend application."""

from flatlm.launch.environment import Environment, environment

__all__ = ["Environment", "environment"]
