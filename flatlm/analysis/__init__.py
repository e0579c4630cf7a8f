"""Measurements of flatness on torch tensors: Hessian spectrum, SAM sharpness and loss landscapes.

Pure math: nothing here imports flatlm.train, flatlm.parallel, flatlm.data, flatlm.experiments or
torch.distributed. Distribution is injected as :class:`Objective`'s ``reduce`` (a sum over ranks).
Figures live in :mod:`flatlm.analysis.plots` (imported on demand: it loads matplotlib).
"""

from flatlm.analysis.hessian import Eigen, Spectrum, Trace, top_eigenvalue, top_eigenvalues, trace
from flatlm.analysis.landscape import filter_normalized_direction, interpolation, line, plane
from flatlm.analysis.objective import Objective, Reduce, axpy, dot, identity, norm, random_vector
from flatlm.analysis.sharpness import Sharpness, sam_sharpness

__all__ = [
    "Eigen",
    "Objective",
    "Reduce",
    "Sharpness",
    "Spectrum",
    "Trace",
    "axpy",
    "dot",
    "filter_normalized_direction",
    "identity",
    "interpolation",
    "line",
    "norm",
    "plane",
    "random_vector",
    "sam_sharpness",
    "top_eigenvalue",
    "top_eigenvalues",
    "trace",
]
