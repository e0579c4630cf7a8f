"""Launching jobs (``flatlm launch``, SLURM templates, elastic restarts): the cluster issue fills this package.

Everything that knows about ranks of a *running* job (environment, process groups, backends, sharded optimizer
plumbing) lives in :mod:`flatlm.parallel`.
"""
