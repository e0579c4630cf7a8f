"""What a backend gives an optimizer when it is built: how distribution gets into the math (pure; no ranks here).

The optimizers' update functions see only this rank's tensors. Everything that depends on how the parameters are
laid out over the ranks comes in through the constructor, as keyword-only arguments (``flatlm.optim.registry.
INJECTED`` keeps them out of the hyperparameters), and never changes afterwards:

    sum_across_ranks   SAM family: local sums (squares, products) -> global sums (one all-reduce per call)
    orthogonalize      Muon: Newton-Schulz of whole matrices from this rank's parts (gather -> NS -> scatter)
    layout             Muon, Adafactor: which parts of which parameters this rank's optimizer tensors hold
    shard_sum          Adafactor: partial statistics of every part -> whole-parameter statistics (one all-reduce
                       per step phase for all parameters)
    step_wrapper       the registry builds the weight-updating optimizer through it (ownership ZeRO-1 on DDP)

:class:`Distribution` carries them; ``flatlm.parallel.layouts.distribution`` builds the one a backend needs and
``build_optimizer`` passes each optimizer the fields its constructor names.

A :class:`Part` is this rank's elements of one parameter of a known global shape, with the few geometric
operations the shape-aware math needs (row and column means of a squared gradient, the outer product of row and
column factors at this rank's elements). :class:`Layout` maps an optimizer tensor to its parts and creates
per-part state. The defaults here describe one process (or any rank holding whole parameters): one part per
tensor, the tensor itself, nothing partial. ``flatlm.parallel`` subclasses them for FSDP2 row shards and for
DeepSpeed ZeRO's flat partitions, whose layout is only known after ``deepspeed.initialize`` (the backend binds the
layout object it passed at construction; the optimizer keeps the same object and never changes class).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

SumFn = Callable[[Tensor], Tensor]
"""``Tensor -> Tensor``: elementwise sum over the ranks (an all-reduce); returns a new tensor or its argument."""


class Part:
    """This rank's elements of one parameter of global ``shape`` (here: the whole parameter, held as it is).

    Tensors "laid out like the optimizer tensor" (the parameter, its gradient, a momentum) are read through
    ``view``. ``rows_partial`` / ``cols_partial`` / ``partial``: the row / column means / the sum of squares
    computed from this rank's elements are partial sums that ``shard_sum`` must add up over the ranks (False: they
    are complete here, and adding them up would count them once per rank).
    """

    rows_partial = False
    cols_partial = False
    partial = False  # sums of squares over this rank's elements are partial: Adafactor's RMS adds them up

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = torch.Size(shape)

    @property
    def numel(self) -> int:
        """Elements of the whole parameter (every rank's parts together)."""
        return math.prod(self.shape)

    def view(self, tensor: Tensor) -> Tensor:
        """This rank's elements of this part in ``tensor`` (laid out like the optimizer tensor), writable."""
        return tensor

    def state_shape(self, kind: str, local: Tensor) -> tuple[torch.Size, torch.Size]:
        """(local, global) shape of Adafactor's ``row`` ([..., n]), ``col`` ([..., m]) or ``elem`` state."""
        g = self.shape
        if kind == "row":
            return local.shape[:-1], g[:-1]
        if kind == "col":
            return local.shape[:-2] + local.shape[-1:], g[:-2] + g[-1:]
        return local.shape, g

    # -- geometry of a factored (>= 2-D) parameter: rows are dim -2, columns dim -1 --------------------------------

    def row_means(self, x: Tensor) -> Tensor:
        """This rank's contribution to the mean over each row (over the columns), laid out like the row state.
        A matrix-vector product: on CPU BLAS reads x once, faster than ``mean``."""
        return x @ x.new_full((self.shape[-1],), 1.0 / self.shape[-1])

    def col_means(self, x: Tensor) -> Tensor:
        """This rank's contribution to the mean over each column (over the rows), laid out like the column state."""
        return x.new_full((x.shape[-2],), 1.0 / self.shape[-2]) @ x

    def outer(self, r: Tensor, c: Tensor, out: Tensor | None = None) -> Tensor:
        """r_i c_j at each of this rank's elements (r like the row state, c like the column state)."""
        return torch.mul(r.unsqueeze(-1), c.unsqueeze(-2), out=out)

    def weighted_sumsq(self, x2: Tensor, r2: Tensor, c2: Tensor) -> Tensor:
        """sum over this rank's elements of x2_ij r2_i c2_j (0-d): the squared norm of U = G r c^T from G^2."""
        return torch.dot((x2 @ c2.unsqueeze(-1)).reshape(-1), r2.reshape(-1))


class Layout:
    """How an optimizer tensor maps to parts of parameters; creates per-part state. Default: whole parameters.

    ``keyed_by_part``: per-part state (Adafactor's R, C, V) is stored as ``{part index: tensor}`` under each state
    key (one optimizer tensor holds many parameters' parts: ZeRO); else as the tensor itself (one part per tensor).
    """

    keyed_by_part = False

    def parts(self, tensor: Tensor) -> list[Part]:
        """The parts ``tensor`` (an optimizer parameter) holds, the same list on every rank."""
        if hasattr(tensor, "to_local"):  # a DTensor: its local shard is not the whole parameter
            raise ValueError(
                "a shape-aware optimizer got a sharded (DTensor) parameter but no layout for it; build it with "
                "build_optimizer(..., distribution=flatlm.parallel.layouts.distribution(backend)) as setup_parallel "
                "does"
            )
        return [Part(tensor.shape)]

    def zeros(self, tensor: Tensor, part: Part, kind: str, dtype: torch.dtype) -> Tensor:
        """New zero state of ``kind`` ("row", "col", "elem") for ``part`` of ``tensor``, stored as the
        checkpoint keeps it (a plain tensor here; FSDP2: a DTensor placed like the parameter)."""
        local_shape, _ = part.state_shape(kind, part.view(tensor))
        return torch.zeros(local_shape, device=tensor.device, dtype=dtype)

    def local(self, state: Tensor) -> Tensor:
        """This rank's storage of a state tensor made by ``zeros`` (writable, same storage)."""
        return state


LOCAL_LAYOUT = Layout()


def sum_list(tensors: list[Tensor], shard_sum: SumFn | None) -> list[Tensor]:
    """Each tensor summed over the ranks with one ``shard_sum`` call for the whole list (concatenated, then split
    back); the tensors themselves without ``shard_sum`` or for an empty list (every rank passes the same shapes)."""
    if shard_sum is None or not tensors:
        return tensors
    flat = shard_sum(torch.cat([t.reshape(-1) for t in tensors]))
    return [chunk.view(t.shape) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


OrthogonalizeFn = Callable[..., list[Tensor]]
"""``(updates, parts, *, steps, coefficients, eps, dtype) -> list[Tensor]``: NS5 of every whole matrix from this
rank's parts ``updates`` (shaped like them); called once per step with all of a group's matrices."""

StepWrapper = Callable[[list[Any], Callable[[list[Any]], torch.optim.Optimizer]], torch.optim.Optimizer]
"""``(groups, factory) -> Optimizer``: builds the optimizer that updates the weights from its factory."""


@dataclass(frozen=True)
class Distribution:
    """What a backend injects into the optimizers it steps (see the module docstring); None: one process's way."""

    sum_across_ranks: SumFn | None = None
    orthogonalize: OrthogonalizeFn | None = None
    layout: Layout | None = None
    shard_sum: SumFn | None = None
    step_wrapper: StepWrapper | None = None

    def arguments_for(self, names: Sequence[str]) -> dict[str, Any]:
        """The injected constructor arguments among ``names`` (a constructor's parameters) that are set."""
        wanted = set(names)
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name in wanted and f.name != "step_wrapper" and getattr(self, f.name) is not None
        }


LOCAL = Distribution()
