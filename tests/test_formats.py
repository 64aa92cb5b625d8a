"""formats/: every number format against an oracle (torch dtypes, enumeration, float64, hand counts)."""
from __future__ import annotations

import doctest
import importlib
import itertools
import math

import numpy as np
import pytest
import torch

from nncompress.core.errors import ConfigError, DataError
from nncompress.formats import (MXFP4, MXFP6, MXFP8, MXFP8_E5M2, MXINT8, BinaryFormat, BlockFloat, BlockLog,
                                BlockMinifloat, FixedPoint, FloatFormat, IntFormat, LogFormat, NumberFormat,
                                PerChannel, PerGroup, PerTensor, Pow2Format, ScaledCodebook, TernaryFormat,
                                expand_scale, fake_quantize, fit_scaled_codebook, group_amax, int_codebook,
                                int_qparams, log_codebook, merge_groups, num_groups, pack, packed_size,
                                pow2_codebook, split_groups, to_blocks, unpack)

MODULES = ["base", "granularity", "integer", "minifloat", "block", "codebook", "binary", "packing"]


@pytest.mark.parametrize("name", MODULES + [""])
def test_docstring_examples_run(name):
    module = importlib.import_module("nncompress.formats" + (f".{name}" if name else ""))
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _f32(bits: torch.Tensor) -> torch.Tensor:
    """float32 values with the given (int64, 0..2**32-1) bit patterns."""
    return (bits - (bits >= 2 ** 31).long() * 2 ** 32).to(torch.int32).view(torch.float32)


@pytest.fixture(scope="module")
def sweep() -> torch.Tensor:
    """Every float32 upper half-word, each with low half-words that make ties, plus random patterns.

    Covers both signs, float32 subnormals, every fp8 binade and subnormal, exact ties, values just
    either side of them, values beyond each format's max, inf and NaN.
    """
    hi = torch.arange(2 ** 16, dtype=torch.int64) << 16
    lows = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1000, 0x0800])
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, 2 ** 32, (100_000,), generator=g, dtype=torch.int64)
    return _f32(torch.cat([(hi[:, None] | lows[None, :]).reshape(-1), rand]))


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bitwise equality of float32 tensors, any NaN equal to any NaN."""
    return (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())


# ---- minifloats against torch's casts, bit for bit ----------------------------------------------

TORCH_CASTS = [
    (FloatFormat(exp=4, man=3), torch.float8_e4m3fn),                       # saturating, like torch
    (FloatFormat(exp=5, man=2, saturate=False), torch.float8_e5m2),         # IEEE: overflow -> inf
    (FloatFormat(exp=4, man=3, specials="fnuz", saturate=False), torch.float8_e4m3fnuz),
    (FloatFormat(exp=5, man=2, specials="fnuz", saturate=False), torch.float8_e5m2fnuz),
    (FloatFormat(exp=5, man=10, saturate=False), torch.float16),
    (FloatFormat(exp=8, man=7, saturate=False), torch.bfloat16),
]


def _cast_id(v) -> str:
    return str(v).split(".")[-1] if isinstance(v, torch.dtype) else ""


@pytest.mark.parametrize("fmt,dtype", TORCH_CASTS, ids=_cast_id)
def test_quantize_matches_torch_cast_bit_for_bit(fmt, dtype, sweep):
    ref = sweep.to(dtype).float()
    q = fmt.quantize(sweep)
    bad = ~_same(ref, q)
    assert not bad.any(), f"{int(bad.sum())} mismatches, e.g. x={sweep[bad][:3].tolist()}"
    assert _same(fmt.decode(fmt.encode(sweep)), q).all()


@pytest.mark.parametrize("fmt,dtype", [c for c in TORCH_CASTS if c[0].bits == 8])
def test_float8_codes_match_torch_bit_patterns(fmt, dtype, sweep):
    assert torch.equal(fmt.encode(sweep), sweep.to(dtype).view(torch.uint8).int())
    every = torch.arange(256, dtype=torch.uint8)
    assert _same(fmt.decode(every.int()), every.view(dtype).float()).all()


def test_float32_as_a_format_is_the_identity(sweep):
    assert _same(FloatFormat(exp=8, man=23, saturate=False).quantize(sweep), sweep).all()


def test_saturating_e5m2_matches_torch_after_clamp(sweep):
    fmt = FloatFormat(exp=5, man=2)  # saturate=True: overflow and inf clamp to +-max
    ref = sweep.clamp(-fmt.max, fmt.max).to(torch.float8_e5m2).float()
    assert _same(fmt.quantize(sweep), ref).all()


def test_non_saturating_e4m3_overflows_to_nan_per_ocp():
    fmt = FloatFormat(exp=4, man=3, saturate=False)
    q = fmt.quantize(torch.tensor([448.0, 463.9, 464.0, 464.1, 1e4, float("inf"), -float("inf")]))
    assert q[:3].tolist() == [448.0, 448.0, 448.0]  # 464 is a tie: to the even mantissa 110 (448)
    assert q[3:].isnan().all()


def test_scaled_quantize_matches_torch_cast():
    x = torch.randn(4096) * 30
    for scale in (0.5, 0.0371, torch.rand(4096) + 0.1):
        ref = (x / scale).to(torch.float8_e4m3fn).float() * scale
        assert torch.equal(FloatFormat(exp=4, man=3).quantize(x, scale), ref)


@pytest.mark.parametrize("exp,man,specials,expected", [
    (4, 3, None, 448.0), (5, 2, None, 57344.0), (2, 1, None, 6.0), (3, 2, None, 28.0), (2, 3, None, 7.5),
    (5, 10, None, 65504.0), (8, 7, None, 3.3895313892515355e38), (4, 3, "fnuz", 240.0),
    (5, 2, "fnuz", 57344.0), (4, 3, "ieee", 240.0), (4, 3, "none", 480.0),
])
def test_float_max_is_derived(exp, man, specials, expected):
    assert FloatFormat(exp=exp, man=man, specials=specials).max == expected


def test_float_small_constants_are_derived():
    e4m3, e5m2 = FloatFormat(exp=4, man=3), FloatFormat(exp=5, man=2)
    assert (e4m3.min_normal, e4m3.min_subnormal) == (2.0 ** -6, 2.0 ** -9)
    assert (e5m2.min_normal, e5m2.min_subnormal) == (2.0 ** -14, 2.0 ** -16)
    assert e4m3.min_normal == torch.finfo(torch.float8_e4m3fn).tiny
    assert e5m2.max == torch.finfo(torch.float8_e5m2).max
    assert FloatFormat(exp=4, man=3, subnormals=False).min_subnormal == 2.0 ** -6


def _grid_oracle(fmt: FloatFormat) -> torch.Tensor:
    """Every finite value from the definition, in float64, independent of decode."""
    b, M = fmt.exponent_bias, fmt.man
    vals = set()
    for e, m in itertools.product(range(2 ** fmt.exp), range(2 ** M)):
        if fmt.denorm:
            v = 2.0 ** (e - b) * m / 2 ** M
        elif e == 0:
            v = 2.0 ** (1 - b - M) * m if fmt.subnormals else 0.0
        else:
            v = 2.0 ** (e - b) * (1 + m / 2 ** M)
        if v <= fmt.max:
            vals |= {v, -v}
    return torch.tensor(sorted(vals), dtype=torch.float64)


SMALL_FLOATS = [FloatFormat(exp=2, man=1), FloatFormat(exp=3, man=2), FloatFormat(exp=2, man=3),
                FloatFormat(exp=4, man=3, denorm=True), FloatFormat(exp=3, man=2, subnormals=False),
                FloatFormat(exp=3, man=3, bias=2, specials="none")]


@pytest.mark.parametrize("fmt", SMALL_FLOATS, ids=str)
def test_small_float_is_nearest_point_of_enumerated_grid(fmt):
    grid = _grid_oracle(fmt)
    assert torch.equal(fmt.grid(), grid)
    assert torch.equal(fmt.quantize(grid), grid)  # every value is a fixed point
    x = (torch.rand(20_000, dtype=torch.float64) * 2 - 1) * fmt.max * 1.2
    nearest = grid[(x[:, None] - grid[None, :]).abs().argmin(1)]
    assert torch.equal(fmt.quantize(x), nearest)  # random float64 draws do not hit ties
    assert torch.equal(fmt.decode(fmt.encode(x), dtype=torch.float64), nearest)


def test_mxfp4_element_grid():
    element = MXFP4.element
    expected = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert element.grid().tolist() == sorted({-v for v in expected} | set(expected))
    assert (element.bits, element.emax, MXFP4.block, MXFP4.scale_exp) == (4, 2, 32, 8)


def test_float_ties_go_to_even_mantissa():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert FloatFormat(exp=2, man=1).quantize(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_float_quantize_keeps_dtype():
    x = torch.randn(64, dtype=torch.bfloat16)
    assert FloatFormat(exp=4, man=3).quantize(x).dtype == torch.bfloat16


# ---- integers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,signed,narrow,qmin,qmax", [
    (8, True, False, -128, 127), (8, True, True, -127, 127), (8, False, False, 0, 255),
    (4, True, False, -8, 7), (4, True, True, -7, 7), (2, True, False, -2, 1), (16, False, False, 0, 65535),
])
def test_int_qmin_qmax(bits, signed, narrow, qmin, qmax):
    fmt = IntFormat(bits=bits, signed=signed, narrow_range=narrow, symmetric=signed or not narrow)
    assert (fmt.qmin, fmt.qmax) == (qmin, qmax)
    assert IntFormat(bits=8, signed=False, symmetric=False, narrow_range=True).qmin == 1


@pytest.mark.parametrize("bits,signed,symmetric,narrow",
                         [(b, s, sym, n) for b in (2, 3, 4, 8) for s in (True, False) for sym in (True, False)
                          for n in (False, True) if not (n and sym and not s)])
def test_every_int_grid_point_is_a_fixed_point(bits, signed, symmetric, narrow):
    fmt = IntFormat(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow)
    scale, zp = torch.tensor(0.0371), torch.tensor(0 if symmetric else 3, dtype=torch.int32)
    codes = torch.arange(fmt.qmin, fmt.qmax + 1)
    values = (codes - zp) * scale
    assert torch.equal(fake_quantize(values, scale, zp, fmt), values)
    assert torch.equal(fmt.encode(values, scale, zp), codes.int())
    beyond = torch.tensor([-1e3, 1e3])
    assert fake_quantize(beyond, scale, zp, fmt).tolist() == values[[0, -1]].tolist()  # clamps


def test_int_qparams_cover_the_range_and_keep_zero_exact():
    lo, hi = torch.tensor([-0.3, -2.0, 0.5]), torch.tensor([1.7, -0.5, 3.0])
    for fmt in (IntFormat(bits=8, symmetric=False), IntFormat(bits=4, symmetric=False, signed=False)):
        scale, zp = int_qparams(lo, hi, fmt)
        assert torch.equal(fake_quantize(torch.zeros(3), scale, zp, fmt), torch.zeros(3))
        for v in (torch.minimum(lo, torch.zeros(3)), torch.maximum(hi, torch.zeros(3))):
            assert ((fake_quantize(v, scale, zp, fmt) - v).abs() <= scale / 2 + 1e-7).all()
    scale, zp = int_qparams(lo, hi, IntFormat(bits=8))
    assert torch.allclose(scale, torch.tensor([1.7, 2.0, 3.0]) / 127) and not zp.any()


def test_fixed_point_grid_is_enumerated():
    fmt = FixedPoint(bits=6, frac_bits=3)
    values = torch.arange(-32, 32) / 8.0
    assert torch.equal(fmt.quantize(values), values)
    assert (fmt.min, fmt.max, fmt.resolution) == (-4.0, 3.875, 0.125)
    assert fmt.quantize(torch.tensor([0.0625, 0.1875, 9.0])).tolist() == [0.0, 0.25, 3.875]  # ties to even


# ---- block formats -----------------------------------------------------------------------------

def _block_exponent_oracle(x: torch.Tensor, block: int, scale_exp: int) -> np.ndarray:
    """floor(log2(max |x|)) per block of the last axis in float64, clipped; 0-blocks at the bottom."""
    a = np.abs(x.double().numpy())
    a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, -a.shape[-1] % block)])
    amax = a.reshape(*a.shape[:-1], -1, block).max(-1)
    lim = 2 ** (scale_exp - 1) - 1
    with np.errstate(divide="ignore"):
        return np.clip(np.floor(np.log2(amax)), -lim, lim).astype(np.int64)


def _hard_blocks() -> torch.Tensor:
    """Blocks whose max sits on, just under and just over powers of two, or clips the range."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 40, generator=g) * torch.logspace(-6, 6, 64)[:, None]
    k = torch.arange(-20, 20, dtype=torch.float32)
    x[:40, 0] = 2.0 ** k
    x[:40, 16] = torch.nextafter(2.0 ** k, torch.tensor(0.0)) * 2  # just below 2**(k+1)
    x[40] = 0.0
    x[41, :5] = 1e-40                                              # float32 subnormals: clip low
    x[42, 20] = 3e38                                               # clip high for narrow scales
    x[43, 33] = float("inf")                                       # inf: the top exponent
    return x


@pytest.mark.parametrize("fmt", [BlockFloat(man=7, block=16), BlockFloat(man=3, block=8, scale_exp=4),
                                 MXINT8, MXFP8, MXFP4, BlockMinifloat(block=8, scale_exp=5)], ids=str)
def test_shared_exponent_matches_float64(fmt):
    x = _hard_blocks()
    got = fmt.shared_exponents(x).long().numpy()
    assert np.array_equal(got, _block_exponent_oracle(x, fmt.block, fmt.scale_exp))
    codes, shared = fmt.encode(x)
    assert torch.equal(shared.long(), torch.from_numpy(got) + fmt.scale_bias)
    assert _same(fmt.decode(codes, shared), fmt.quantize(x)).all()


def test_mxfp8_is_torch_e4m3_cast_of_each_block():
    x = _hard_blocks()[:, :32]
    x = x * torch.where(x.abs() < 1e37, 7.0, 1.0)  # top mantissas vary; no overflow to inf
    X = 2.0 ** (torch.from_numpy(_block_exponent_oracle(x, 32, 8)).double() - 8)  # emax(E4M3) = 8
    ref = ((x.double() / X).float().to(torch.float8_e4m3fn).double() * X).float()
    assert torch.equal(MXFP8.quantize(x), ref)
    X2 = 2.0 ** (torch.from_numpy(_block_exponent_oracle(x, 32, 8)).double() - 15)
    y = (x.double() / X2).float().clamp(-57344, 57344)  # block elements saturate; torch's E5M2 would overflow
    assert torch.equal(MXFP8_E5M2.quantize(x), (y.to(torch.float8_e5m2).double() * X2).float())


def test_mxint8_and_block_float_elements_are_fixed_point():
    x = torch.randn(8, 64) * 3
    X = 2.0 ** torch.from_numpy(_block_exponent_oracle(x, 32, 8)).double().repeat_interleave(32, -1)
    ref = ((x.double() / X * 64).round().clamp(-127, 127) / 64 * X).float()
    assert torch.equal(MXINT8.quantize(x), ref)
    codes, _ = BlockFloat(man=3, block=4).encode(x)
    assert codes.abs().max() <= 7
    assert (to_blocks(codes, 4, -1).abs().amax(-1) >= 4).all()  # block max keeps the top mantissa bit


def test_mxfp4_values_lie_on_scaled_e2m1_grid():
    x = torch.randn(4, 96)
    X = 2.0 ** (torch.from_numpy(_block_exponent_oracle(x, 32, 8)).double() - 2).repeat_interleave(32, -1)
    ratio = (MXFP4.quantize(x).double() / X).abs()                        # (4, 96)
    assert set(ratio.unique().tolist()) <= {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
    block_max = ratio.view(4, 3, 32).amax(-1)                              # amax / X in [4, 8)
    assert set(block_max.unique().tolist()) <= {4.0, 6.0}


def test_block_axis_and_padding():
    x = torch.randn(10, 3)
    fmt = BlockFloat(man=4, block=4, axis=0)
    q = fmt.quantize(x)
    ref = BlockFloat(man=4, block=4).quantize(x.T.contiguous()).T
    assert torch.equal(q, ref) and q.shape == (10, 3)
    assert fmt.shared_exponents(x).shape == (3, 3)  # (other dims, ceil(10 / 4))


def test_block_log_elements_are_powers_of_two_below_the_block_scale():
    x = torch.randn(16, 32)
    fmt = BlockLog(exp=3, block=32)
    q, E = fmt.quantize(x), fmt.shared_exponents(x).double()
    ratio = (q.double() / 2.0 ** E).abs()                         # (16, 32) / (16, 1)
    allowed = torch.tensor([0.0] + [2.0 ** -j for j in range(7)], dtype=torch.float64)
    assert torch.isin(ratio, allowed).all()
    amax = x.abs().amax(-1).double()
    assert torch.equal(E, torch.round(torch.log2(amax)).unsqueeze(-1))
    codes, shared = fmt.encode(x)
    assert torch.equal(fmt.decode(codes, shared), q)


# ---- codebooks, binary, ternary -----------------------------------------------------------------

def test_pow2_format_is_nearest_codebook_value():
    fmt = Pow2Format(min_exp=-4, max_exp=2)
    grid = torch.tensor(sorted({0.0} | {s * 2.0 ** k for k in range(-4, 3) for s in (1, -1)}), dtype=torch.float64)
    x = torch.randn(5000, dtype=torch.float64) * 2
    assert torch.equal(fmt.quantize(x), grid[(x[:, None] - grid).abs().argmin(1)])
    assert torch.equal(fmt.quantize(grid), grid) and fmt.bits == 4
    assert torch.equal(fmt.decode(fmt.encode(x), dtype=torch.float64), fmt.quantize(x))


def test_log_format_rounds_in_the_log_domain():
    fmt = LogFormat(bits=4, frac_bits=1, max_exp=1)
    levels = torch.tensor([2.0 ** (1 - j / 2) for j in range(7)], dtype=torch.float64)
    x = torch.rand(5000, dtype=torch.float64) * 2 + levels[-1] / 2
    nearest_log = levels[(torch.log2(x)[:, None] - torch.log2(levels)).abs().argmin(1)]
    assert torch.allclose(fmt.quantize(x), nearest_log, rtol=1e-15, atol=0)  # levels are >= 19% apart
    assert torch.allclose(fmt.quantize(-levels), -levels, rtol=1e-15, atol=0)


def test_scaled_codebook_loss_never_increases_and_beats_max_abs_scaling():
    w = torch.randn(8, 256, dtype=torch.float64)
    _, losses = fit_scaled_codebook(w, int_codebook(4), iters=15, dims=(1,))
    assert (losses.diff(dim=0) <= 1e-12).all() and (losses[-1] < losses[0]).all()
    fmt = IntFormat(bits=4)
    scale, zp = int_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), fmt)
    uniform_sse = ((fake_quantize(w, scale, zp, fmt) - w) ** 2).sum(1)
    codebook = ScaledCodebook(levels=int_codebook(4), granularity=PerChannel(axis=0))
    optimal_sse = ((codebook.quantize(w) - w) ** 2).sum(1)
    assert (optimal_sse <= uniform_sse + 1e-12).all() and (optimal_sse < uniform_sse).any()
    for levels in (pow2_codebook(3), log_codebook(5)):
        _, losses = fit_scaled_codebook(w, levels, iters=10, dims=(1,))
        assert (losses.diff(dim=0) <= 1e-12).all()


def test_scaled_codebook_alpha_is_the_closed_form_at_convergence():
    w = torch.randn(500, dtype=torch.float64)
    c = torch.tensor(pow2_codebook(2), dtype=torch.float64)
    alpha, _ = fit_scaled_codebook(w, c, iters=200)
    cz = c[(w[:, None] / alpha - c).abs().argmin(1)]
    assert torch.allclose(alpha, (w * cz).sum() / (cz * cz).sum(), rtol=1e-12)
    fmt = ScaledCodebook(levels=pow2_codebook(2), iters=200)
    scale = fmt.fit_scale(w)
    assert torch.equal(fmt.decode(fmt.encode(w, scale), scale, dtype=torch.float64), fmt.quantize(w, scale))


def test_binary_and_ternary_value_sets_per_channel():
    w = torch.randn(6, 50)
    b = BinaryFormat(granularity=PerChannel(axis=0)).quantize(w)
    t = TernaryFormat(granularity=PerChannel(axis=0)).quantize(w)
    assert all(row.unique().numel() == 2 for row in b) and all(row.unique().numel() == 3 for row in t)
    for row, qb, qt in zip(w.double(), b, t):
        alpha = row.abs().mean()
        assert torch.allclose(qb.abs().double(), alpha.expand(50))
        kept = row.abs() > 0.7 * alpha
        assert torch.equal(qt != 0, kept)
        assert torch.allclose(qt.abs().max().double(), row.abs()[kept].mean())


def test_binary_ternary_per_group_and_codes():
    w = torch.randn(4, 32)
    g = PerGroup(axis=1, size=8)
    b = BinaryFormat(granularity=g)
    assert all(blk.unique().numel() == 2 for blk in b.quantize(w).view(4, 4, 8).flatten(0, 1))
    assert torch.equal(b.decode(b.encode(w), b.fit_scale(w)), b.quantize(w))
    t = TernaryFormat(granularity=g)
    codes = t.encode(w)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.allclose(t.decode(codes, t.fit_scale(w)), t.quantize(w))


# ---- granularity ---------------------------------------------------------------------------------

def test_group_views_round_trip_and_reduce_per_group():
    w = torch.randn(6, 12)
    for g in (PerTensor(), PerChannel(axis=0), PerChannel(axis=1), PerGroup(axis=1, size=4), PerGroup(axis=0, size=3)):
        view, dims = split_groups(w, g)
        assert torch.equal(merge_groups(view, g), w)
        stat = view.abs().amax(dims, keepdim=True)
        assert stat.numel() == num_groups(w.shape, g)
    amax = group_amax(w, PerGroup(axis=1, size=4))                  # (O, I/G)
    assert torch.equal(amax, w.abs().view(6, 3, 4).amax(-1))
    full = expand_scale(amax, PerGroup(axis=1, size=4), w.shape)
    assert torch.equal(full, amax.repeat_interleave(4, dim=1))
    with pytest.raises(ConfigError, match="size"):
        split_groups(w, PerGroup(axis=1, size=5))


# ---- bit costs -------------------------------------------------------------------------------------

def test_bit_costs_by_hand():
    assert MXFP4.bit_cost((64, 128)) == 4 + 8 / 32
    assert MXFP8.bit_cost(4096) == 8 + 8 / 32 and MXINT8.bit_cost(4096) == 8.25 and MXFP6.bit_cost(64) == 6.25
    assert IntFormat(bits=4).bit_cost((128, 256), PerGroup(axis=1, size=64)) == 4 + 16 / 64
    assert IntFormat(bits=8).bit_cost((32, 100), PerChannel(axis=0)) == 8 + 32 * 16 / 3200
    assert IntFormat(bits=8, symmetric=False).bit_cost(1000, PerTensor(), scale_bits=32) == 8 + 40 / 1000
    assert IntFormat(bits=8).bit_cost(1000) == 8
    assert FloatFormat(exp=4, man=3).bit_cost((16, 16), PerTensor(), scale_bits=32) == 8 + 32 / 256
    assert BlockFloat(man=3, block=16).bit_cost((2, 40)) == 4 + 8 * 2 * 3 / 80      # 40 pads to 3 blocks
    assert BinaryFormat(granularity=PerChannel(0)).bit_cost((64, 128)) == 1 + 16 / 128
    assert TernaryFormat().bit_cost(1000) == 2 + 16 / 1000
    assert ScaledCodebook(levels=int_codebook(3)).bit_cost(1000, PerChannel(0)) == 3 + 16
    assert Pow2Format(min_exp=-6, max_exp=0).bit_cost(100) == 4


# ---- packing -------------------------------------------------------------------------------------

def _pack_oracle(codes: list[int], bits: int) -> list[int]:
    """Little-endian bit stream with Python integers."""
    stream = sum((c & (2 ** bits - 1)) << (bits * i) for i, c in enumerate(codes))
    return list(stream.to_bytes(math.ceil(len(codes) * bits / 8), "little"))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1001])
def test_pack_unpack_exact_with_expected_size(bits, numel):
    codes = torch.randint(0, 2 ** bits, (numel,))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel * bits / 8) == packed_size(numel, bits)
    assert packed.tolist() == _pack_oracle(codes.tolist(), bits)
    assert torch.equal(unpack(packed, bits, numel), codes.int())
    signed = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (numel,))
    assert torch.equal(unpack(pack(signed, bits), bits, numel, signed=True), signed.int())


def test_pack_layout_and_errors():
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1]), 1).tolist() == [0b10001101, 1]
    assert pack(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b10010011]
    assert pack(torch.tensor([0x5, 0xA]), 4).tolist() == [0xA5]
    with pytest.raises(DataError, match="do not fit in 4 bits"):
        pack(torch.tensor([16]), 4)
    with pytest.raises(DataError, match="integer tensor"):
        pack(torch.tensor([1.0]), 4)
    codes = FloatFormat(exp=2, man=1).encode(torch.randn(33))
    assert torch.equal(unpack(pack(codes, 4), 4, 33), codes)


# ---- configs: round trips and typed errors -----------------------------------------------------

ALL_FORMATS = [IntFormat(bits=4, symmetric=False), FixedPoint(bits=8, frac_bits=5),
               FloatFormat(exp=5, man=2, bias=11), FloatFormat(exp=4, man=3, denorm=True), MXFP4, MXINT8,
               BlockLog(exp=5), Pow2Format(), LogFormat(frac_bits=1),
               ScaledCodebook(levels=log_codebook(4), granularity=PerGroup(axis=1, size=4)),
               BinaryFormat(granularity=PerChannel(axis=1)), TernaryFormat(threshold_ratio=0.5),
               PerGroup(axis=0, size=8)]


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: type(f).__name__)
def test_formats_round_trip_through_dicts(fmt):
    assert type(fmt).from_dict(fmt.to_dict()) == fmt
    if not isinstance(fmt, PerGroup):
        assert isinstance(fmt, NumberFormat)


@pytest.mark.parametrize("make,field", [
    (lambda: IntFormat(bits=1), "bits"), (lambda: IntFormat(bits=17), "bits"),
    (lambda: IntFormat(signed=False, narrow_range=True), "narrow_range"),
    (lambda: FloatFormat(exp=0, man=3), "exp"), (lambda: FloatFormat(exp=2, man=1, saturate=False), "saturate"),
    (lambda: FloatFormat(exp=4, man=0, denorm=True), "man"), (lambda: BlockFloat(block=0), "block"),
    (lambda: BlockMinifloat(element=FloatFormat(exp=5, man=2, saturate=False)), "element.saturate"),
    (lambda: Pow2Format(min_exp=2, max_exp=1), "min_exp"), (lambda: PerGroup(size=0), "size"),
    (lambda: ScaledCodebook(levels=(0.0,)), "levels"), (lambda: TernaryFormat(threshold_ratio=-1.0), "threshold_ratio"),
])
def test_impossible_configs_raise_config_error_naming_the_field(make, field):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.path == field and "\n" not in str(info.value)


def test_from_dict_reports_bad_field_paths():
    with pytest.raises(ConfigError, match=r"^fmt\.bits: IntFormat takes 2\.\.16 bits"):
        IntFormat.from_dict({"bits": 1}, path="fmt")
