"""Weight robustness (flatlm/analysis/weights.py): exact restore, relative-noise statistics, and per-row
round-to-nearest fake quantisation (levels, error bound, per-row scales, 1-D parameters, zero rows)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlm.analysis.weights import fake_quantize, quantization_error, quantized, relative_noise
from flatlm.errors import FlatlmError


def _params(seed: int = 0) -> list[torch.Tensor]:
    """A matrix, a 3-D tensor, a bias and a norm gain, as leaf parameters that require grad."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 32), (4, 6, 5), (16,), (32,)]
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _contexts(params: list[torch.Tensor]) -> list:
    return [
        lambda: relative_noise(params, 0.1, torch.Generator().manual_seed(1)),
        lambda: quantized(params, 4),
    ]


@pytest.mark.parametrize("which", ["noise", "quantized"])
def test_restore_is_bit_identical_also_after_an_exception(which: str) -> None:
    params = _params()
    params[0].data[0, 0] = float("-0.0")  # a signed zero must come back signed
    before = [p.detach().clone() for p in params]
    ptrs = [p.data_ptr() for p in params]
    enter = _contexts(params)[0 if which == "noise" else 1]
    with enter():
        assert not torch.equal(params[0], before[0])  # the weights did change inside
    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom"), enter():
            raise RuntimeError("boom")
    for p, b, ptr in zip(params, before, ptrs, strict=True):
        assert torch.equal(p, b) and p.data_ptr() == ptr and p.requires_grad  # same storage, same bits
        assert torch.equal(p.view(torch.int32), b.view(torch.int32))
    assert torch.signbit(params[0][0, 0])


def test_noise_statistics_and_seeding() -> None:
    w = nn.Parameter(torch.randn(400, 500, generator=torch.Generator().manual_seed(0)) + 0.5)
    w0 = w.detach().clone()
    for sigma in (0.01, 0.2):
        with relative_noise([w], sigma, torch.Generator().manual_seed(3)):
            z = (w.detach() - w0) / w0.abs()  # should be N(0, sigma^2)
            first = w.detach().clone()
        assert abs(float(z.std()) / sigma - 1) < 0.02 and abs(float(z.mean())) < 0.02 * sigma
        with relative_noise([w], sigma, torch.Generator().manual_seed(3)):
            assert torch.equal(w, first)  # same seed, same noise
        with relative_noise([w], sigma, torch.Generator().manual_seed(4)):
            assert not torch.equal(w, first)
    with relative_noise([w], 0.0, torch.Generator().manual_seed(3)):
        assert torch.equal(w, w0)
    zero = nn.Parameter(torch.zeros(8, 8))
    with relative_noise([zero], 0.5, torch.Generator().manual_seed(0)):
        assert torch.equal(zero, torch.zeros(8, 8))  # relative: zeros stay zero


def test_noise_follows_the_generator_in_parameter_order_and_perturbs_tied_weights_once() -> None:
    a, b = nn.Parameter(torch.ones(3, 4)), nn.Parameter(torch.ones(5))
    g = torch.Generator().manual_seed(7)
    eps_a, eps_b = torch.randn(3, 4, generator=g), torch.randn(5, generator=g)
    with relative_noise([a, b, a], 0.5, torch.Generator().manual_seed(7)):
        assert torch.allclose(a, 1 + 0.5 * eps_a) and torch.allclose(b, 1 + 0.5 * eps_b)


def test_noise_in_bfloat16_matches_float32_noise_rounded() -> None:
    w32 = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    w16 = nn.Parameter(w32.to(torch.bfloat16))
    w = w16.detach().float()
    eps = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    ref = w + 0.1 * w.abs() * eps  # computed in float32, rounded to bfloat16 once
    with relative_noise([w16], 0.1, torch.Generator().manual_seed(2)):
        assert w16.dtype == torch.bfloat16 and torch.equal(w16, ref.to(torch.bfloat16))


def test_bad_arguments_are_user_errors() -> None:
    params = _params()
    with pytest.raises(FlatlmError, match="sigma"), relative_noise(params, -0.1, torch.Generator()):
        pass
    with pytest.raises(FlatlmError, match="bits"), quantized(params, 1):
        pass
    with pytest.raises(FlatlmError, match="bits"):
        quantization_error(params, 33)


def _per_row(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantization_levels_and_error_bound_per_row(bits: int) -> None:
    params = _params(seed=bits)
    q_max = 2 ** (bits - 1) - 1
    originals = [p.detach().clone() for p in params]
    with quantized(params, bits):
        for p, w in zip(params, originals, strict=True):
            if p.ndim < 2:
                assert torch.equal(p, w)  # biases and norm gains keep full precision
                continue
            scale = _per_row(w).abs().amax(dim=1) / q_max
            for row_q, row_w, s in zip(_per_row(p.detach()), _per_row(w), scale, strict=True):
                assert len(torch.unique(row_q)) <= 2**bits - 1
                assert float((row_q - row_w).abs().max()) <= float(s) / 2 * (1 + 1e-5)
                levels = row_q / s
                assert torch.allclose(levels, levels.round(), atol=1e-4)  # integers times the row's scale
                assert float(levels.abs().max()) == pytest.approx(q_max, abs=1e-4)  # the max maps to q_max


def test_int8_is_much_closer_than_int4_and_error_matches_the_context() -> None:
    params = _params()
    e8, e4 = quantization_error(params, 8), quantization_error(params, 4)
    assert 0 < e8 < e4 / 10  # about 2^4 = 16 times smaller
    originals = [p.detach().clone() for p in params]
    with quantized(params, 4):
        mats = [(p.detach().double(), w.double()) for p, w in zip(params, originals, strict=True) if p.ndim >= 2]
    num = sum(float((q - w).square().sum()) for q, w in mats)
    den = sum(float(w.square().sum()) for _, w in mats)
    assert e4 == pytest.approx((num / den) ** 0.5, rel=1e-12)
    assert quantization_error([torch.ones(5)], 4) == 0.0  # no matrix, nothing to report


def test_per_row_scales_keep_a_small_row() -> None:
    """Planted-bug comparison: one scale for the whole tensor would round the tiny row to zero."""
    w = torch.stack([torch.linspace(-1, 1, 32), torch.linspace(-1e-3, 1e-3, 32)])
    got = fake_quantize(w, 4)
    assert float((got[1] - w[1]).abs().max()) <= 1e-3 / 7 / 2 * (1 + 1e-5)  # kept at its own precision
    assert len(torch.unique(got[1])) > 1
    per_tensor_scale = w.abs().max() / 7
    per_tensor = torch.clamp(torch.round(w / per_tensor_scale), -7, 7) * per_tensor_scale
    assert torch.equal(per_tensor[1], torch.zeros(32))  # what the wrong scale would do
    assert torch.allclose(per_tensor[0], got[0])  # and on the large row both agree


def test_zero_rows_stay_zero_and_dtypes_are_kept() -> None:
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    w[2] = 0
    got = fake_quantize(w, 8)
    assert torch.equal(got[2], torch.zeros(10)) and torch.isfinite(got).all()
    bf = nn.Parameter(w.to(torch.bfloat16))
    with quantized([bf], 8):
        assert (
            bf.dtype == torch.bfloat16 and torch.isfinite(bf).all() and torch.equal(bf[2], torch.zeros(10).bfloat16())
        )
    assert torch.equal(bf, w.to(torch.bfloat16))
    assert fake_quantize(torch.zeros(3, 3, dtype=torch.float64), 4).dtype == torch.float64
