"""A run's saved state by parameter name, whatever backend wrote it: for tests, debugging and comparisons.

``final_state(path)`` reads one checkpoint (a run directory means its ``checkpoints/latest``) into one process and
returns a flat ``{name: tensor}`` dict, the same keys for every backend and world size:

    model.<fqn>               the weight (fp32 master weights under DeepSpeed, not its bf16 copy)
    optim.<fqn>.<state key>   each optimizer-state tensor of that parameter, whole (``exp_avg``, ``step``, Adafactor's
                              ``exp_avg_sq_row`` / ``exp_avg_sq_col``, Muon's ``momentum_buffer``, SAM's ``sam_*``)

Sources. DCP checkpoints (single, ddp, ddp with ``shard_optimizer_state``, fsdp2): ``state/`` read with
``_load_state_dict_from_keys`` (DTensors come back whole), metadata through the checkpoint module's allowlisted
unpickler. DeepSpeed ZeRO checkpoints (``deepspeed/state/``): every rank's flat fp32 partitions (master weights and
the client optimizer's state laid out like them) are cut back into parameters:

* stage 1/2: per param group, ``param_slice_mappings`` names each parameter's (start, numel) in a rank's partition;
  a parameter cut by a partition boundary is the concatenation of its pieces in rank order;
* stage 3: every parameter is split on its own into ``ceil(numel / world)`` elements per rank, the parameters of a
  param group back to back in ``param_shapes`` order (one sub-group per group is required and checked);
* state that is not partition-shaped is flatlm's Adafactor's on ZeRO pieces (``parallel.zero_layout``):
  ``exp_avg_sq_row`` / ``exp_avg_sq_col`` (the same whole R, C on every rank) and ``exp_avg_sq`` (each rank's piece
  of a vector), keyed by the index of the parameter among the sorted names of the partition; mapped back by it;
* a partition's ``step`` is given to every parameter in it.

Everything is loaded with torch's weights-only unpickler (DeepSpeed's three plain data classes allowed): reading a
checkpoint never runs pickled code.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flatlm.errors import FlatlmError

__all__ = ["final_state", "resolve_checkpoint"]


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: itself if it is one, else the one a run directory's
    ``checkpoints/latest`` names."""
    from flatlm.train.checkpoint import CHECKPOINT_DIR, LATEST, TRAINER_STATE

    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return path
    latest = path / CHECKPOINT_DIR / LATEST
    if latest.is_file():
        return path / CHECKPOINT_DIR / latest.read_text().strip()
    raise FlatlmError(f"{path} is neither a checkpoint (no {TRAINER_STATE}) nor a run directory with {latest}")


def final_state(path: str | Path) -> dict[str, Tensor]:
    """Model parameters and every optimizer-state tensor of a checkpoint (or a run directory's latest one), by
    parameter name: ``model.<fqn>`` and ``optim.<fqn>.<state key>`` (see the module docstring). Runs in one process,
    without a process group; non-tensor numbers in the optimizer state come back as 0-d tensors."""
    from flatlm.parallel.deepspeed import ENGINE_DIR, ENGINE_TAG
    from flatlm.train.checkpoint import STATE_DIR

    ckpt = resolve_checkpoint(path)
    if (ckpt / STATE_DIR / ".metadata").is_file():
        return _dcp_state(ckpt / STATE_DIR)
    if (ckpt / ENGINE_DIR / ENGINE_TAG).is_dir():
        return _zero_state(ckpt / ENGINE_DIR / ENGINE_TAG)
    raise FlatlmError(f"{ckpt} holds neither a DCP state/ nor a DeepSpeed {ENGINE_DIR}/{ENGINE_TAG}/ checkpoint")


def _as_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, bool | int | float):
        return torch.tensor(value)
    return None


# -- DCP ------------------------------------------------------------------------------------------------------------


def _dcp_state(state_dir: Path) -> dict[str, Tensor]:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    from flatlm.train.checkpoint import _safe_reader

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        sd = _load_state_dict_from_keys(storage_reader=_safe_reader(state_dir))
    out: dict[str, Tensor] = {}
    for name, value in sd["model"].items():
        out[f"model.{name}"] = _whole(value)
    for name, per_key in sd.get("optim", {}).get("state", {}).items():
        for key, value in per_key.items():
            tensor = _as_tensor(value)
            if tensor is not None:
                out[f"optim.{name}.{key}"] = _whole(tensor)
    return out


def _whole(value: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


# -- DeepSpeed ZeRO -------------------------------------------------------------------------------------------------


def _load(path: Path) -> Any:
    from flatlm.parallel.zero_views import pickled_classes

    with torch.serialization.safe_globals(pickled_classes()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _zero_state(engine_dir: Path) -> dict[str, Tensor]:
    from flatlm.parallel.zero_views import check_deepspeed_version

    check_deepspeed_version()  # the file layout read below is DeepSpeed's, checked for these versions only
    optim_files = sorted(engine_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)  # bf16_...
    model_files = sorted(engine_dir.glob("*model_states.pt"), key=lambda p: _rank_of(p) if "zero_pp" in p.name else 0)
    if not optim_files or not model_files:
        raise FlatlmError(f"{engine_dir} has no DeepSpeed optimizer or model states")
    ranks = [_load(p)["optimizer_state_dict"] for p in optim_files]
    if [_rank_of(p) for p in optim_files] != list(range(len(ranks))):
        raise FlatlmError(f"{engine_dir}: the ranks' optimizer files are not 0..{len(ranks) - 1}")
    param_shapes: list[dict[str, torch.Size]] = _load(model_files[0])["param_shapes"]
    stage = int(ranks[0]["zero_stage"])
    if stage == 3:
        layouts = _stage3_layouts(ranks, param_shapes)
        masters = [r["fp32_flat_groups"] for r in ranks]
        states = [r["optimizer_state_dict"] for r in ranks]
    else:
        layouts = _stage12_layouts(ranks, param_shapes)
        masters = [r["single_partition_of_fp32_groups"] for r in ranks]
        states = [r["base_optimizer_state"] for r in ranks]
    out: dict[str, Tensor] = {}
    for k, layout in enumerate(layouts):
        for name, shape in layout.shapes.items():
            out[f"model.{name}"] = layout.gather(name, [m[k] for m in masters]).view(shape)
        per_rank = [s["state"].get(k, {}) for s in states]
        for key in per_rank[0]:
            values = [s[key] for s in per_rank]
            out.update(_zero_state_key(layout, key, values))
    return out


def _rank_of(path: Path) -> int:
    return int(path.name.split("zero_pp_rank_")[1].split("_")[0])


class _FlatLayout:
    """Where each parameter of one flat partition index sits on every rank: ``pieces[name][r] = (offset in rank r's
    flat, start in the flattened parameter, numel)``."""

    def __init__(self, shapes: dict[str, torch.Size], world: int) -> None:
        self.shapes = shapes
        self.world = world
        self.pieces: dict[str, list[tuple[int, int, int]]] = {n: [(0, 0, 0)] * world for n in shapes}

    def gather(self, name: str, flats: list[Tensor]) -> Tensor:
        """The whole flattened parameter from every rank's tensor laid out like the flat partition."""
        parts = []
        for r, (offset, start, numel) in enumerate(self.pieces[name]):
            if numel:
                parts.append((start, flats[r].reshape(-1).narrow(0, offset, numel)))
        whole = torch.cat([t for _, t in sorted(parts, key=lambda x: x[0])])
        if whole.numel() != math.prod(self.shapes[name]):
            raise FlatlmError(
                f"{name}: the ranks' pieces hold {whole.numel()} elements, the parameter has "
                f"{math.prod(self.shapes[name])}"
            )
        return whole

    def sorted_names(self) -> list[str]:
        """flatlm's ``zero_layout`` order: every parameter with a piece in this flat on some rank, sorted."""
        return sorted(n for n, ps in self.pieces.items() if any(numel for *_, numel in ps))


def _stage12_layouts(ranks: list[dict[str, Any]], param_shapes: list[dict[str, torch.Size]]) -> list[_FlatLayout]:
    world = len(ranks)
    layouts = []
    for i, shapes in enumerate(param_shapes):
        layout = _FlatLayout(dict(shapes), world)
        for r, sd in enumerate(ranks):
            for name, frag in sd["param_slice_mappings"][i].items():  # frag.start: offset in rank r's partition
                layout.pieces[name][r] = (frag.start, 0, frag.numel)
        _fill_starts(layout)
        layouts.append(layout)
    return layouts


def _fill_starts(layout: _FlatLayout) -> None:
    """Pieces of a parameter on consecutive ranks are consecutive runs of its elements: number them."""
    for pieces in layout.pieces.values():
        start = 0
        for r, (offset, _, numel) in enumerate(pieces):
            pieces[r] = (offset, start, numel)
            start += numel


def _stage3_layouts(ranks: list[dict[str, Any]], param_shapes: list[dict[str, torch.Size]]) -> list[_FlatLayout]:
    world = len(ranks)
    flats = ranks[0]["fp32_flat_groups"]
    if len(flats) != len(param_shapes):
        raise FlatlmError(
            f"ZeRO-3 checkpoint with {len(flats)} sub-groups for {len(param_shapes)} param groups: reading it by "
            "parameter name needs one sub-group per group (the default sub_group_size)"
        )
    layouts = []
    for k, shapes in enumerate(param_shapes):
        layout = _FlatLayout(dict(shapes), world)
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            n = math.ceil(numel / world)  # per-rank partition of this parameter, padding included
            for r in range(world):
                real = max(0, min(n, numel - r * n))
                layout.pieces[name][r] = (offset, r * n, real)
            offset += n
        if offset != flats[k].numel():
            raise FlatlmError(
                f"ZeRO-3 sub-group {k}: parameters cover {offset} elements, the partition {flats[k].numel()}"
            )
        layouts.append(layout)
    return layouts


def _zero_state_key(layout: _FlatLayout, key: str, values: list[Any]) -> dict[str, Tensor]:
    """One state key of one flat partition, every rank's value, as per-parameter tensors."""
    out: dict[str, Tensor] = {}
    first = values[0]
    if isinstance(first, dict):  # Adafactor on ZeRO pieces: {index among the sorted names: tensor}
        names = layout.sorted_names()
        for index in first:
            name = names[index]
            if key in ("exp_avg_sq_row", "exp_avg_sq_col"):  # whole on every rank
                out[f"optim.{name}.{key}"] = first[index]
            else:  # this rank's piece of a vector parameter
                pieces = [(layout.pieces[name][r][1], v[index]) for r, v in enumerate(values) if index in v]
                out[f"optim.{name}.{key}"] = torch.cat([t for _, t in sorted(pieces, key=lambda x: x[0])])
        return out
    tensor = _as_tensor(first)
    if tensor is None:
        return out
    for name, shape in layout.shapes.items():
        if tensor.dim() == 0:  # a per-partition number (``step``): every parameter in the partition has it
            out[f"optim.{name}.{key}"] = tensor
        else:
            out[f"optim.{name}.{key}"] = layout.gather(name, values).view(shape)
    return out
