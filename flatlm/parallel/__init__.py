"""Everything that knows about ranks: the launcher's environment, process groups, the data-parallel backends
(DDP, FSDP2, DeepSpeed ZeRO-1/2/3) behind one ``Parallel`` protocol, and the sharded side of the optimizers
(parameter ownership, global norms, gather/scatter for Muon, piece-aware reductions for Adafactor).

Optimizer math (:mod:`flatlm.optim`) never imports this package; it receives what it needs from here as
callables when it is built. This package never imports :mod:`flatlm.train`.
"""

from flatlm.parallel.environment import Environment, environment

__all__ = ["Environment", "environment"]
