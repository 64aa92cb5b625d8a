"""Codebook formats: values drawn from a fixed set of levels, times a scale.

The lecture (Idelbayev et al., "Optimal Quantization using Scaled Codebook", CVPR 2021) writes
quantization as min over alpha, z of sum_n sum_k z_nk (w_n - alpha c_k)**2 for a codebook C:
symmetric INT8 {0, +-1, ..., +-127}, powers of two {0, +-1, +-2, ..., +-2**s}, log-scale
{0, +-log 2, ..., +-log s}. `ScaledCodebook` solves it for any C; `Pow2Format` and `LogFormat`
are the power-of-two grids as formats with codes.

Ties on these non-uniform grids go to the level of smaller magnitude.

>>> Pow2Format(min_exp=-2, max_exp=1).quantize(torch.tensor([0.1, 0.2, 0.7, 1.5, 1.6, 9.0])).tolist()
[0.0, 0.25, 0.5, 1.0, 2.0, 2.0]
>>> LogFormat(bits=3).quantize(torch.tensor([0.1, 0.2, 0.7, 0.72, 1.5])).tolist()  # 0.72 > 2**-0.5
[0.0, 0.25, 0.5, 1.0, 1.0]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.config import Config, check
from .base import compute_dtype, floor_log2, pow2
from .granularity import (Granularity, PerTensor, Shape, apply_grouped, expand_scale, group_reduce,
                          scale_overhead)

_SQRT_HALF = math.sqrt(0.5)


class _SignedPow2:
    """Sign + magnitude code c: c = 0 is zero, c >= 1 is 2**((r_min + c - 1) / 2**frac_bits)."""

    frac_bits: int = 0

    @property
    def _r_range(self) -> tuple[int, int]:  # (r_min, r_max), log2 magnitudes in units of 2**-frac_bits
        raise NotImplementedError

    def _round_r(self, a: Tensor) -> Tensor:  # rounded log2 |x| in units of 2**-frac_bits, a > 0
        raise NotImplementedError

    def _level(self, r: Tensor, dtype: torch.dtype) -> Tensor:
        if self.frac_bits == 0:
            return pow2(r, dtype)
        k, i = r.div(2 ** self.frac_bits, rounding_mode="floor"), r % 2 ** self.frac_bits
        frac = torch.tensor([2.0 ** (j / 2 ** self.frac_bits) for j in range(2 ** self.frac_bits)],
                            dtype=dtype, device=r.device)
        return pow2(k, dtype) * frac[i]  # 2**k exactly times 2**(i / 2**f) rounded once

    @property
    def max(self) -> float:
        return 2.0 ** (self._r_range[1] / 2 ** self.frac_bits)

    @property
    def min_positive(self) -> float:
        return 2.0 ** (self._r_range[0] / 2 ** self.frac_bits)

    def _magnitude_code(self, a: Tensor) -> Tensor:
        """0 for zero, else r - r_min + 1 (int64); saturates above, flushes below min/2."""
        r_min, r_max = self._r_range
        r = self._round_r(torch.where(a > 0, a, 1.0).to(a.dtype)).long().clamp(r_min, r_max)
        zero = ~(a > self.min_positive / 2)  # NaN-safe; the tie at min/2 goes to 0
        return torch.where(zero, 0, r - r_min + 1)

    def quantize(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """Nearest level of `x / scale`, times `scale` (1 when None)."""
        return self.decode(self.encode(x, scale), scale, dtype=x.dtype)

    def encode(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """Sign bit (at bit `bits - 1`) | magnitude code; int32."""
        y = x.to(compute_dtype(x))
        if scale is not None:
            y = y / scale
        c = self._magnitude_code(y.abs())
        return (c | (torch.signbit(y).long() << (self.bits - 1))).to(torch.int32)

    def decode(self, codes: Tensor, scale: Tensor | float | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        c = codes.long()
        mag = c & (2 ** (self.bits - 1) - 1)
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        v = torch.where(mag == 0, 0.0, self._level(self._r_range[0] + mag - 1, wide)).to(wide)
        v = torch.where((c >> (self.bits - 1)) & 1 == 1, -v, v)
        return (v if scale is None else v * scale).to(dtype)

    def bit_cost(self, shape: Shape, granularity: Granularity | None = None, scale_bits: int = 16) -> float:
        """`bits` + a scale per group when a granularity is given."""
        return self.bits + scale_overhead(shape, granularity, scale_bits)


@dataclass(frozen=True)
class Pow2Format(_SignedPow2, Config):
    """The codebook {0} U {+-2**k : min_exp <= k <= max_exp}, rounding to the nearest value.

    >>> f = Pow2Format(min_exp=-6, max_exp=0)
    >>> f.bits, f.max, f.min_positive
    (4, 1.0, 0.015625)
    """

    min_exp: int = -6
    max_exp: int = 0

    def __post_init__(self) -> None:
        check(self.min_exp <= self.max_exp, "min_exp", f"{self.min_exp} > max_exp={self.max_exp}")
        check(-126 <= self.min_exp and self.max_exp <= 127, "max_exp", "exponents must lie in [-126, 127]")

    @property
    def bits(self) -> int:  # sign + enough bits for zero and every exponent
        return 1 + math.ceil(math.log2(self.max_exp - self.min_exp + 2))

    @property
    def _r_range(self) -> tuple[int, int]:
        return self.min_exp, self.max_exp

    def _round_r(self, a: Tensor) -> Tensor:
        k = floor_log2(a)
        return k + (a > 1.5 * pow2(k, a.dtype)).long()  # nearest in value: 2**k or 2**(k+1)


@dataclass(frozen=True)
class LogFormat(_SignedPow2, Config):
    """Log-domain levels: sign + (bits-1)-bit magnitude code, levels 2**(max_exp - j / 2**frac_bits).

    There are 2**(bits-1) - 1 non-zero magnitudes (j = 0 .. 2**(bits-1) - 2); `|x|` is rounded in
    the log domain (round(log2 |x| * 2**frac_bits)), which is what makes it a log quantizer.

    >>> f = LogFormat(bits=4, frac_bits=1)
    >>> f.max, f.min_positive
    (1.0, 0.125)
    """

    bits: int = 4
    frac_bits: int = 0
    max_exp: int = 0

    def __post_init__(self) -> None:
        check(2 <= self.bits <= 9, "bits", f"LogFormat takes 2..9 bits, got {self.bits}")
        check(0 <= self.frac_bits <= 8, "frac_bits", f"expected 0..8, got {self.frac_bits}")
        check(-126 <= self._r_range[0] / 2 ** self.frac_bits and self.max_exp <= 127, "max_exp",
              "levels must lie within float32's normal range")

    @property
    def _r_range(self) -> tuple[int, int]:
        r_max = self.max_exp * 2 ** self.frac_bits
        return r_max - (2 ** (self.bits - 1) - 2), r_max

    def _round_r(self, a: Tensor) -> Tensor:
        return self.log2_round(a, self.frac_bits)

    @staticmethod
    def log2_round(a: Tensor, frac_bits: int = 0) -> Tensor:
        """round(log2(a) * 2**frac_bits) for a > 0 (int64), from frexp so powers of two are exact."""
        k = floor_log2(a).long()
        frac = a / pow2(k, a.dtype)                  # in [1, 2)
        if frac_bits == 0:
            return k + (frac >= 2 * _SQRT_HALF).long()   # log2(frac) >= 1/2
        step = torch.round(torch.log2(frac.to(torch.float64)) * 2 ** frac_bits).long()
        return k * 2 ** frac_bits + step


# ---- scaled codebooks --------------------------------------------------------------------------

def int_codebook(bits: int) -> tuple[float, ...]:
    """Symmetric integers {0, +-1, ..., +-(2**(bits-1) - 1)}.

    >>> int_codebook(3)
    (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
    """
    q = 2 ** (bits - 1) - 1
    return tuple(float(v) for v in range(-q, q + 1))


def pow2_codebook(s: int) -> tuple[float, ...]:
    """{0, +-1, +-2, ..., +-2**s}.

    >>> pow2_codebook(2)
    (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)
    """
    pos = [2.0 ** k for k in range(s + 1)]
    return tuple(sorted([-p for p in pos] + [0.0] + pos))


def log_codebook(s: int) -> tuple[float, ...]:
    """{0, +-log 2, +-log 3, ..., +-log s} (natural log, as in the lecture).

    >>> [round(v, 3) for v in log_codebook(3)]
    [-1.099, -0.693, 0.0, 0.693, 1.099]
    """
    pos = [math.log(k) for k in range(2, s + 1)]
    return tuple(sorted([-p for p in pos] + [0.0] + pos))


def nearest_level(x: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest entry of the sorted 1-D `levels` for each element; ties to smaller |level|.

    >>> nearest_level(torch.tensor([-1.5, 0.4, 0.5, 7.0]), torch.tensor([-2.0, -1.0, 0.0, 1.0])).tolist()
    [1, 2, 2, 3]
    """
    if levels.numel() == 1:
        return torch.zeros_like(x, dtype=torch.long)
    mids = (levels[1:] + levels[:-1]) / 2                         # (K-1,)
    if x.numel() * mids.numel() <= 2 ** 20:
        # small inputs: counting is microseconds, bucketize pays milliseconds of thread start-up on CPU
        idx = (x.unsqueeze(-1) > mids).sum(-1)                    # mids[i-1] < x <= mids[i] -> i
    else:
        idx = torch.bucketize(x, mids)
    at_mid = (idx < mids.numel()) & (x == mids[idx.clamp_max(mids.numel() - 1)])
    up = at_mid & (levels[(idx + 1).clamp_max(levels.numel() - 1)].abs() < levels[idx].abs())
    return idx + up.long()


def fit_scaled_codebook(w: Tensor, levels: Tensor | tuple[float, ...], iters: int = 20,
                        dims: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """Alternating minimisation of sum (w - alpha * c(z))**2 over alpha and assignments z.

    Starts from max-abs scaling (alpha = max|w| / max|c|), then alternates the nearest-level
    assignment and the closed form alpha = sum w c(z) / sum c(z)**2. Each step solves its
    sub-problem exactly, so the loss never increases. Works in float64.
    Returns (alpha, losses): alpha keeps the reduced `dims` (default: all) as size 1, losses is
    (iters + 1, *alpha.shape) with the loss of each assignment, the last one for the final alpha.

    >>> alpha, losses = fit_scaled_codebook(torch.tensor([0.1, 0.9, 1.0, 2.2]), (0.0, 1.0, 2.0), iters=5)
    >>> round(alpha.item(), 4), bool((losses.diff(dim=0) <= 0).all())
    (1.05, True)
    """
    w64 = w.to(torch.float64)
    dims = tuple(range(w.ndim)) if dims is None else dims
    c = torch.sort(torch.as_tensor(levels, dtype=torch.float64, device=w.device)).values
    alpha = (w64.abs().amax(dims, keepdim=True) / c.abs().max()).clamp_min(1e-300)
    losses = []
    for step in range(iters + 1):
        cz = c[nearest_level(w64 / alpha, c)]
        losses.append(((w64 - alpha * cz) ** 2).sum(dims, keepdim=True))
        if step == iters:
            break
        num, den = (w64 * cz).sum(dims, keepdim=True), (cz * cz).sum(dims, keepdim=True)
        alpha = torch.where((den > 0) & (num > 0), num / den.clamp_min(1e-300), alpha)
    return alpha, torch.stack(losses)


@dataclass(frozen=True)
class ScaledCodebook(Config):
    """alpha * C for a fixed codebook C, alpha fitted per group by `fit_scaled_codebook`.

    >>> fmt = ScaledCodebook(levels=pow2_codebook(2))
    >>> fmt.bits
    3
    >>> fmt.quantize(torch.tensor([0.0, 1.0, 2.0, 4.0, 3.9])).tolist()
    [0.0, 0.9891892075538635, 1.978378415107727, 3.956756830215454, 3.956756830215454]
    """

    levels: tuple[float, ...] = int_codebook(4)
    iters: int = 20
    granularity: Granularity = PerTensor()

    def __post_init__(self) -> None:
        check(len(self.levels) >= 2, "levels", "a codebook needs at least 2 levels")
        check(max(abs(v) for v in self.levels) > 0, "levels", "a codebook needs a non-zero level")
        check(self.iters >= 0, "iters", f"expected >= 0, got {self.iters}")

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(len(self.levels))))

    def _levels(self, x: Tensor) -> Tensor:
        return torch.sort(torch.tensor(self.levels, dtype=torch.float64, device=x.device)).values

    def fit_scale(self, x: Tensor) -> Tensor:
        """alpha per group of `granularity`, broadcastable against `x`."""
        alpha = group_reduce(x, self.granularity,
                             lambda v, d: fit_scaled_codebook(v, self._levels(x), self.iters, d)[0])
        return expand_scale(alpha, self.granularity, x.shape).to(x.dtype)

    def quantize(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """alpha * nearest level of x / alpha; alpha fitted per group when `scale` is None."""
        c = self._levels(x)
        if scale is None:
            def fit(v: Tensor, dims: tuple[int, ...]) -> Tensor:
                alpha = fit_scaled_codebook(v, c, self.iters, dims)[0]
                return alpha * c[nearest_level(v.to(torch.float64) / alpha, c)]
            return apply_grouped(x, self.granularity, fit).to(x.dtype)
        return (c[nearest_level(x.to(torch.float64) / scale, c)] * scale).to(x.dtype)

    def encode(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """Indices into the sorted levels (int32); `scale` from `fit_scale` when None."""
        scale = self.fit_scale(x) if scale is None else scale
        return nearest_level(x.to(torch.float64) / scale, self._levels(x)).to(torch.int32)

    def decode(self, codes: Tensor, scale: Tensor | float, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self._levels(codes)[codes.long()] * scale).to(dtype)

    def bit_cost(self, shape: Shape, granularity: Granularity | None = None, scale_bits: int = 16) -> float:
        """`bits` + one alpha per group (of `granularity`, default the format's own)."""
        return self.bits + scale_overhead(shape, granularity or self.granularity, scale_bits)
