"""ZeRO-1 on plain data parallel: each rank keeps the optimizer state of the parameters it owns.

Every parameter is owned by one rank (greedy by size, largest first, so ranks hold about equal state).
A step runs the inner optimizer on the owned parameters only (their gradients are already all-reduced
by DDP), then each owner broadcasts its updated parameters, one flat buffer per owner. The math is the
inner optimizer's on whole parameters, so shape-aware optimizers (Muon's Newton-Schulz, Adafactor's
factored statistics) stay exact and run once per matrix across all ranks. torch's
``ZeroRedundancyOptimizer`` does the same; this one keeps the caller's ``param_groups`` (schedulers and
SAM wrappers share them) and works with any flatlm optimizer factory.

Communication per step: one broadcast per rank of the parameters it owns (every parameter once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from flatlm.parallel.collectives import broadcast_, world

Factory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def assign_owners(params: list[Tensor], world_size: int) -> dict[int, int]:
    """id(param) -> owning rank: largest parameters first, each to the least-loaded rank (deterministic)."""
    load = [0] * world_size
    owner: dict[int, int] = {}
    order = sorted(range(len(params)), key=lambda i: (-params[i].numel(), i))
    for i in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[id(params[i])] = rank
        load[rank] += params[i].numel()
    return owner


class OwnedParamsOptimizer(torch.optim.Optimizer):
    """Wraps the optimizer ``factory`` builds so that each rank holds state only for the parameters it owns.

    ``param_groups`` are the caller's full groups; the inner optimizer's groups hold the owned subset and
    take the full groups' hyperparameters (lr from a scheduler, ...) before every step.
    """

    def __init__(self, groups: list[dict[str, Any]], factory: Factory) -> None:
        rank, size = world()
        self.rank, self.world_size = rank, size
        groups = [dict(g) for g in groups]
        params = [p for g in groups for p in g["params"]]
        self.owner = assign_owners(params, size)
        owned = [{**g, "params": [p for p in g["params"] if self.owner[id(p)] == rank]} for g in groups]
        kept = [i for i, g in enumerate(owned) if g["params"]]  # torch refuses empty groups
        self.inner = factory([owned[i] for i in kept])
        self._inner_group_of = kept  # inner group j takes its hyperparameters from full group kept[j]
        self._by_owner = [[p for p in params if self.owner[id(p)] == r] for r in range(size)]
        super().__init__(groups, self.inner.defaults)

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        pass  # torch's __init__ assigns an empty state; the inner optimizer's is the one

    def _sync_hyperparameters(self) -> None:
        for j, i in enumerate(self._inner_group_of):
            for key, value in self.param_groups[i].items():
                if key != "params":
                    self.inner.param_groups[j][key] = value

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparameters()
        self.inner.step()
        self._broadcast_owned()
        return loss

    def _broadcast_owned(self) -> None:
        """Each owner sends its updated parameters to every rank: one flat broadcast per owner."""
        if self.world_size == 1:
            return
        for rank, params in enumerate(self._by_owner):
            if not params:
                continue
            flat = _flatten_dense_tensors([p.data for p in params])
            broadcast_(flat, src=rank)
            if rank != self.rank:
                for p, new in zip(params, _unflatten_dense_tensors(flat, [p.data for p in params]), strict=True):
                    p.copy_(new)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch's usual shape over the full groups; ``state`` holds this rank's owned parameters only."""
        inner = self.inner.state_dict()
        index = self._full_index()
        inner_params = [p for g in self.inner.param_groups for p in g["params"]]
        state = {index[id(inner_params[k])]: v for k, v in inner["state"].items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in self.param_groups]
        for g, full in zip(groups, self.param_groups, strict=True):
            g["params"] = [index[id(p)] for p in full["params"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a ``state_dict()`` of this rank (or any with the same groups: only owned entries are kept).

        Saved keys are matched to parameters by position in the saved groups' ``params`` lists, as torch does, so
        index keys (``state_dict()``) and parameter names (torch.distributed.checkpoint) both work."""
        index = self._full_index()
        inner_params = [p for g in self.inner.param_groups for p in g["params"]]
        full_to_inner = {index[id(p)]: k for k, p in enumerate(inner_params)}
        position = {key: i for i, key in enumerate(k for g in state_dict["param_groups"] for k in g["params"])}
        state = {full_to_inner[position[k]]: v for k, v in state_dict["state"].items() if position[k] in full_to_inner}
        saved_groups = state_dict["param_groups"]
        groups = []
        for j, i in enumerate(self._inner_group_of):
            hyper = {k: v for k, v in saved_groups[i].items() if k != "params"}
            groups.append({**hyper, "params": [index[id(p)] for p in self.inner.param_groups[j]["params"]]})
            self.param_groups[i].update(hyper)
        renumber = {full: k for k, full in enumerate(i for g in groups for i in g["params"])}
        self.inner.load_state_dict(
            {
                "state": {k: v for k, v in state.items()},
                "param_groups": [{**g, "params": [renumber[i] for i in g["params"]]} for g in groups],
            }
        )

    def _full_index(self) -> dict[int, int]:
        """id(param) -> its position in the full groups (torch's state_dict numbering)."""
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
