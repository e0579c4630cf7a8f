"""Weight robustness: evaluate a model under relative Gaussian weight noise or weight-only fake quantisation.

Both are context managers that change the given parameters in place (under ``torch.no_grad``) and, on exit,
restore them bit for bit from a copy saved on entry, also when the body raises. The copy lives beside each
parameter (same device and dtype), so entering costs one extra copy of the perturbed weights in memory.
A tensor listed twice (tied weights) is changed once.

Relative noise (multiplicative Gaussian weight noise, the flatness probe of e.g. Keskar et al. 2017 "On
large-batch training..." and Hochreiter & Schmidhuber 1997 "Flat minima", scaled per weight as in
filter-normalised perturbations, Li et al. 2018), elementwise:

.. math::

    w \\leftarrow w + \\sigma \\, |w| \\, \\varepsilon, \\qquad \\varepsilon \\sim \\mathcal{N}(0, 1)

so a weight moves by a fraction ``sigma`` of its own magnitude and zeros stay zero. ``epsilon`` is drawn on
the CPU from the caller's generator, in float32, one tensor of the parameter's shape per parameter in the given
order, then moved to the parameter's device: the same seed gives the same noise on every rank and device.

Quantisation: round-to-nearest symmetric per-channel weight-only quantisation (as in LLM.int8()'s vector-wise
quantisation, Dettmers et al. 2022, and GPTQ's round-to-nearest baseline, Frantar et al. 2022). For a tensor of
``ndim >= 2``, per row ``i`` of dim 0 (an output channel of ``nn.Linear``, a token of an embedding), with
``q_max = 2^(bits-1) - 1``:

.. math::

    s_i = \\max_j |w_{ij}| / q_{max}, \\qquad
    w_{ij} \\leftarrow \\operatorname{clamp}(\\operatorname{round}(w_{ij} / s_i), -q_{max}, q_{max}) \\, s_i

The grid is symmetric, so int8 uses the 255 levels [-127, 127] and int4 the 15 levels [-7, 7] (the extra
negative level of two's complement is left unused). ``round`` is ``torch.round`` (ties to even). A zero row
has ``s_i = 0`` and stays zero. This is fake quantisation: the storage dtype does not change, each weight is
replaced by its dequantised value (computed in float32, or float64 for float64 weights, then cast back, so a
bfloat16 weight also carries bfloat16's rounding). Tensors of ``ndim < 2`` (norm gains, biases) keep full
precision, as weight-only quantisers do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from flatlm.errors import FlatlmError


def _unique(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters in order, each tensor object once (tied weights are perturbed once, restored once)."""
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@contextlib.contextmanager
def _replaced(params: Sequence[torch.Tensor], new_value: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Copy each parameter in place to ``new_value(p)``; restore the saved originals exactly on exit."""
    tensors = _unique(params)
    with torch.no_grad():
        saved = [p.detach().clone() for p in tensors]
        try:
            for p in tensors:
                p.copy_(new_value(p))
            yield
        finally:
            for p, original in zip(tensors, saved, strict=True):
                p.copy_(original)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


@contextlib.contextmanager
def relative_noise(params: Sequence[torch.Tensor], sigma: float, generator: torch.Generator) -> Iterator[None]:
    """Add ``sigma * |w| * N(0, 1)`` to every weight, in place, for the duration of the ``with`` block.

    ``generator`` must be a CPU generator: the noise is drawn there (the same on every rank), in the order of
    ``params``, then moved to each parameter's device and dtype. The parameters are restored exactly on exit.
    """
    if not math.isfinite(sigma) or sigma < 0:
        raise FlatlmError(f"relative weight noise sigma must be a finite number >= 0, got {sigma}")
    if generator.device.type != "cpu":
        raise FlatlmError(
            f"relative_noise draws its noise on the CPU; pass a torch.Generator() on cpu, not on {generator.device}"
        )

    def noisy(p: torch.Tensor) -> torch.Tensor:
        eps = torch.randn(p.shape, generator=generator, dtype=torch.float32)  # on CPU, the same on every rank
        w = p.to(_work_dtype(p))
        return w + sigma * w.abs() * eps.to(device=p.device, dtype=w.dtype)

    with _replaced(params, noisy):
        yield


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise FlatlmError(f"quantisation bits must be an integer in [2, 16] (e.g. 8 or 4), got {bits!r}")


def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest symmetric per-row quantise-dequantise of ``w`` (a new tensor; ``ndim < 2``: a copy).

    Rows are the slices along dim 0; the result has ``w``'s shape and dtype.
    """
    _check_bits(bits)
    if w.ndim < 2:
        return w.detach().clone()
    q_max = 2 ** (bits - 1) - 1
    rows = w.detach().to(_work_dtype(w)).reshape(w.shape[0], -1)  # (out, in...)
    scale = rows.abs().amax(dim=1, keepdim=True) / q_max  # (out, 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero row: 0 / 1 = 0, then 0 * 0
    levels = torch.clamp(torch.round(rows / safe), -q_max, q_max)  # integers in [-q_max, q_max]
    return (levels * scale).reshape(w.shape).to(w.dtype)


@contextlib.contextmanager
def quantized(params: Sequence[torch.Tensor], bits: int) -> Iterator[None]:
    """Replace every matrix (``ndim >= 2``) by its ``bits``-bit per-row fake quantisation for the ``with`` block.

    Tensors of ``ndim < 2`` are left untouched (not even copied). Restored exactly on exit.
    """
    _check_bits(bits)
    with _replaced([p for p in params if p.ndim >= 2], lambda p: fake_quantize(p, bits)):
        yield


def quantization_error(params: Sequence[torch.Tensor], bits: int) -> float:
    """Relative Frobenius error ``||Q(W) - W|| / ||W||`` over all matrices together (``ndim >= 2``), for reports.

    Sums of squares are accumulated in float64 over every matrix; 0.0 when there is no matrix or all are zero.
    """
    _check_bits(bits)
    err = total = 0.0
    with torch.no_grad():
        for p in _unique([p for p in params if p.ndim >= 2]):
            w = p.detach().double()
            err += float((fake_quantize(p, bits).double() - w).square().sum())
            total += float(w.square().sum())
    return math.sqrt(err / total) if total > 0 else 0.0
