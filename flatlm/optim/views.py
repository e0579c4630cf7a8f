"""Parameter views: a stable description of "this rank's part of parameter i", the only thing the SAM math keys on.

A backend hands the math tensors that are not the same objects from step to step (DeepSpeed's flat fp32
partitions read through ``detach()``, FSDP2's unsharded copies re-gathered every step, DTensor shards). Anything the
math keeps between calls (SAM's copy of w, a variant's scratch, LookSAM's g_v) is keyed by ``ParamView.key``,
which the backend builds once and keeps: so a step never allocates a buffer it does not free, and per-parameter
state survives every backend. The flags tell the math what it may do with ``tensor`` without testing backend
attributes (no ``ds_id``, no ``isinstance(..., DTensor)`` in the math):

    swappable   ``tensor.data`` may be replaced by another storage for the pass (a plain tensor owning its storage
                that no one else holds views of); else w + eps is written in place and w copied back
    whole       ``tensor`` is one whole parameter (not a piece of one, not several back to back): per-tensor
                choices (ESAM's random subset of tensors) mean per-parameter only then
    transient   ``tensor`` is a copy dropped after the step: nothing to put back

Pure data: importable by the math without torch.distributed; built by ``flatlm.parallel``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class ParamView:
    """This rank's part of one optimizer tensor (see the module docstring)."""

    key: str
    """Stable for the life of the backend: a parameter name, or ``zero.flat<k>`` for a ZeRO partition."""
    tensor: Tensor
    """The local values, writable in place (a parameter, a DTensor, a flat partition, an unsharded copy)."""
    shape: torch.Size
    """The global shape of what the tensor is a part of (the parameter's; a flat partition's own)."""
    swappable: bool = False
    """``tensor.data`` may be swapped for another storage during a pass."""
    whole: bool = True
    """``tensor`` is exactly one whole parameter."""
    transient: bool = False
    """The tensor is a copy the backend drops after the step (FSDP2's unsharded weights): w need not be kept
    aside nor written back, the trained weights were never touched."""

    def with_tensor(self, tensor: Tensor) -> ParamView:
        """The same view over a new tensor (FSDP2's unsharded copy of this step): same key, same flags."""
        return replace(self, tensor=tensor)


def owns_storage(t: Tensor) -> bool:
    """Whether ``t`` is the whole of its storage (not a slice of a flat buffer)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def plain_views(named: Sequence[tuple[str, Tensor]], *, swappable: bool | None = None) -> list[ParamView]:
    """Views of whole parameters held as they are (one process, DDP, FSDP2's DTensors), keyed by name.

    ``swappable`` None: a plain tensor that owns its storage may be swapped; a DTensor or a view into a shared
    buffer may not."""
    out = []
    for name, p in named:
        plain = type(p) in (Tensor, torch.nn.Parameter)
        swap = (plain and owns_storage(p)) if swappable is None else swappable
        out.append(ParamView(name, p, p.shape, swappable=swap, whole=True))
    return out
