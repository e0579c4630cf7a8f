"""Launching jobs (``flatlm launch``, SLURM templates, elastic restarts): the cluster issue fills this package.

``flatlm launch`` is ``cli`` (its parser and runner) over ``plan`` (arguments and environment -> one launcher
command line and its environment additions; pure), ``slurm`` (an allocation's layout, node-list expansion) and
``run`` (the launcher as a child, stop signals relayed to all of its processes, exit 75 after a stop). The batch
template is configs/slurm/flatlm.sbatch.

Everything that knows about ranks of a *running* job (environment, process groups, backends, sharded optimizer
plumbing) lives in :mod:`flatlm.parallel`.
"""
