"""Experiments over many runs: ablation grids (``grid``), their compute budgets (``budget``), the cells as processes
(``runner``, ``cells``) and the report (``report``).

Layering: this package composes runs as processes and reads their directories; it never imports
``flatlm.train`` or ``flatlm.parallel`` (the CLI passes ``flatlm.train.checks.check_static`` in as a callable).
Kept import-free so that ``python -m flatlm.experiments.pdeathsig`` starts in milliseconds.
"""
