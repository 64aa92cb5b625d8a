"""Minifloats: `FloatFormat(exp, man)` with every constant derived from the fields.

>>> FloatFormat(exp=4, man=3).max, FloatFormat(exp=5, man=2).max, FloatFormat(exp=2, man=1).max
(448.0, 57344.0, 6.0)
>>> FloatFormat(exp=4, man=3).quantize(torch.tensor([0.3, 500.0])).tolist()
[0.3125, 448.0]

Special values (`specials`), None picks the OCP convention for the width:
- "ieee": the top exponent code holds inf (mantissa 0) and NaN (E5M2, fp16, bf16; exp >= 5).
- "fn": finite only, NaN is the all-ones code S.1111.111 (E4M3FN; 7- and 8-bit formats, exp <= 4).
- "fnuz": finite only, bias 2**(exp-1), no negative zero, NaN is the code 1000...0.
- "none": every code is a finite number (FP4 E2M1, FP6 E2M3/E3M2: 6 bits or fewer).

Overflow (`saturate`): True clamps anything that rounds past `max` (inf included) to +-max.
False gives inf for "ieee" and NaN for "fn"/"fnuz" ("none" has neither, so it must saturate).
NaN inputs stay NaN (quantize returns floats even for "none", which has no NaN code).
These match torch's casts bit for bit: float8_e4m3fn is `FloatFormat(4, 3)` (saturating: torch
clamps finite overflow and inf to +-448), float8_e5m2 is `FloatFormat(5, 2, saturate=False)`
(IEEE: overflow to inf), float8_e4m3fnuz / float8_e5m2fnuz are `specials="fnuz", saturate=False`,
float16 is `FloatFormat(5, 10, saturate=False)`, bfloat16 `FloatFormat(8, 7, saturate=False)`.

`denorm=True` is the lecture's denormalised minifloat (DMF): no implicit leading 1, so every
exponent code behaves like a subnormal one: value = 2**(e - bias) * m / 2**man, all codes finite.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..core.config import Config, check
from .base import as_scale, compute_dtype, floor_log2, pow2
from .granularity import Granularity, Shape, scale_overhead

Specials = Literal["ieee", "fn", "fnuz", "none"]


@dataclass(frozen=True)
class FloatFormat(Config):
    """Sign, `exp` exponent bits, `man` mantissa bits; see the module docstring for the options.

    >>> f = FloatFormat(exp=4, man=3)
    >>> f.bits, f.exponent_bias, f.convention, f.min_normal, f.min_subnormal
    (8, 7, 'fn', 0.015625, 0.001953125)
    >>> FloatFormat(exp=4, man=3, denorm=True).max   # 2**(15 - 7) * 7/8
    224.0
    """

    exp: int = 4
    man: int = 3
    bias: int | None = None
    specials: Specials | None = None
    subnormals: bool = True
    saturate: bool = True
    denorm: bool = False

    def __post_init__(self) -> None:
        check(1 <= self.exp <= 8, "exp", f"FloatFormat takes 1..8 exponent bits, got {self.exp}")
        check(0 <= self.man <= 23, "man", f"FloatFormat takes 0..23 mantissa bits, got {self.man}")
        check(self.bias is None or -64 <= self.bias <= 254, "bias", f"expected -64..254, got {self.bias}")
        if self.denorm:
            check(self.man >= 1, "man", "a denormalised minifloat needs at least 1 mantissa bit")
            check(self.specials in (None, "none"), "specials",
                  "a denormalised minifloat has no special values; leave specials unset or 'none'")
        conv = self.convention
        check(not (conv == "ieee" and self.exp < 2), "exp", "IEEE specials need exp >= 2")
        check(not (conv == "none" and not self.saturate), "saturate",
              "specials='none' has no inf or NaN code to overflow to; set saturate=True")
        check(self.max > 0, "man", "this format has no positive finite value")

    # ---- derived constants ------------------------------------------------------------------

    @property
    def bits(self) -> int:
        return 1 + self.exp + self.man

    @property
    def convention(self) -> str:
        """The resolved `specials`: the OCP convention for this width when unset."""
        if self.specials is not None:
            return self.specials
        if self.denorm or self.bits <= 6:
            return "none"
        return "ieee" if self.exp >= 5 else "fn"

    @property
    def exponent_bias(self) -> int:
        if self.bias is not None:
            return self.bias
        return 2 ** (self.exp - 1) if self.convention == "fnuz" else 2 ** (self.exp - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (for denorm: of the smallest exponent code)."""
        return -self.exponent_bias if self.denorm else 1 - self.exponent_bias

    @property
    def _top(self) -> tuple[int, int]:
        """(exponent code, mantissa code) of the largest finite value."""
        top, full = 2 ** self.exp - 1, 2 ** self.man - 1
        conv = self.convention
        if conv == "ieee":
            return top - 1, full
        if conv == "fn":
            return (top, full - 1) if self.man >= 1 else (top - 1, 0)
        return top, full

    @property
    def max(self) -> float:
        e, m = self._top
        if self.denorm:
            return 2.0 ** (e - self.exponent_bias) * m / 2 ** self.man
        if e == 0:  # only subnormals are finite (exp=1 formats)
            return 2.0 ** (self.emin - self.man) * m
        return 2.0 ** (e - self.exponent_bias) * (1 + m / 2 ** self.man)

    @property
    def emax(self) -> int:
        """Exponent of the binade holding `max` (MX formats call it emax_elem)."""
        return int(torch.frexp(torch.tensor(self.max, dtype=torch.float64))[1]) - 1

    @property
    def min_normal(self) -> float:
        """Smallest value with the full `man`-bit precision (for denorm: leading mantissa bit set)."""
        return 2.0 ** (self.emin - 1) if self.denorm else 2.0 ** self.emin

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (min_normal when subnormals are flushed)."""
        if self.denorm or self.subnormals:
            return 2.0 ** (self.emin - self.man)
        return self.min_normal

    @property
    def _needs_float64(self) -> bool:
        return self.emin - self.man < -149 or self.emax > 127

    # ---- quantize / encode / decode ---------------------------------------------------------

    def quantize(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """Round `x / scale` to the nearest value (ties to even), overflow per `saturate`.

        >>> FloatFormat(exp=2, man=1).quantize(torch.tensor([0.25, 0.75, 2.5, 5.0, -7.0])).tolist()
        [0.0, 1.0, 2.0, 4.0, -6.0]
        """
        dtype = compute_dtype(x, self._needs_float64)
        y = x.to(dtype)
        s = as_scale(scale, y)
        if s is not None:
            y = y / s
        q = self._round(y)
        if s is not None:
            q = q * s
        return q.to(x.dtype)

    def _round(self, y: Tensor) -> Tensor:
        a = y.abs()
        k = floor_log2(a)  # binade of |y|; frexp(0) and frexp(inf) give harmless values
        if self.denorm:  # no hidden bit: binade k needs exponent k + 1, step 2**(k + 1 - man)
            t = (k + 1).clamp_min(self.emin) - self.man
        else:
            t = k.clamp_min(self.emin) - self.man
        step = pow2(t, a.dtype)
        q = torch.round(a / step) * step
        if not self.subnormals and not self.denorm:  # flush: round to 0 or min_normal (tie to 0)
            mn = self.min_normal
            q = torch.where(a < mn, torch.where(a > mn / 2, mn, 0.0).to(a.dtype), q)
        over = q > self.max
        if self.saturate:
            q = torch.where(over, self.max, q)
        else:
            q = torch.where(over, float("inf") if self.convention == "ieee" else float("nan"), q)
        q = torch.copysign(q, y)
        if self.convention == "fnuz":  # no negative zero
            q = torch.where(q == 0, 0.0, q).to(q.dtype)
        return q

    def encode(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """Bit patterns `sign | exponent | mantissa` (int32) of `quantize(x, scale) / scale`.

        >>> FloatFormat(exp=4, man=3).encode(torch.tensor([1.0, -448.0, float("nan")])).tolist()
        [56, 254, 127]
        """
        dtype = compute_dtype(x, self._needs_float64)
        y = x.to(dtype)
        s = as_scale(scale, y)
        q = self._round(y if s is None else y / s)
        a = q.abs()
        k = floor_log2(a)
        E, M, bias = self.exp, self.man, self.exponent_bias
        if self.denorm:
            e = (k + 1 + bias).clamp_min(0)
            m = a / pow2(e - bias - M, dtype)
        else:
            normal = a >= self.min_normal
            e = torch.where(normal, k + bias, 0)
            m = torch.where(normal, a / pow2(k - M, dtype) - 2 ** M, a / pow2(torch.full_like(k, self.emin - M), dtype))
        e = torch.where(a == 0, 0, e)
        m = torch.where(a == 0, 0.0, m)
        code = (e.long() << M) | torch.round(torch.nan_to_num(m, 0.0, 0.0, 0.0)).long()
        conv, top = self.convention, (2 ** E - 1) << M
        if conv == "ieee":
            code = torch.where(torch.isinf(a), top, code)
        if conv in ("ieee", "fn"):
            code = torch.where(torch.isnan(a), top | (2 ** M - 1), code)
        sign = torch.signbit(q).long() << (E + M)
        if conv == "fnuz":
            code = torch.where(torch.isnan(a), 1 << (E + M), code | sign)
        else:
            code = code | sign
        return code.to(torch.int32)

    def decode(self, codes: Tensor, scale: Tensor | float | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """Values of bit patterns (the inverse of `encode`).

        >>> FloatFormat(exp=4, man=3).decode(torch.tensor([56, 126, 127])).tolist()
        [1.0, 448.0, nan]
        """
        E, M, bias = self.exp, self.man, self.exponent_bias
        wide = torch.float64 if self._needs_float64 or dtype == torch.float64 else torch.float32
        c = codes.long()
        sign = (c >> (E + M)) & 1
        e = (c >> M) & (2 ** E - 1)
        m = (c & (2 ** M - 1)).to(wide)
        if self.denorm:
            v = m * pow2(e - bias - M, wide)
        else:
            v = torch.where(e == 0, m * pow2(torch.full_like(e, self.emin - M), wide),
                            (m + 2 ** M) * pow2(e - bias - M, wide))
            if not self.subnormals:
                v = torch.where(e == 0, 0.0, v).to(wide)
        conv, top = self.convention, 2 ** E - 1
        if conv == "ieee":
            v = torch.where(e == top, torch.where(m == 0, float("inf"), float("nan")), v).to(wide)
        elif conv == "fn":
            v = torch.where((e == top) & (m == 2 ** M - 1), float("nan"), v).to(wide)
        elif conv == "fnuz":
            v = torch.where((sign == 1) & (e == 0) & (m == 0), float("nan"), v).to(wide)
        v = torch.where(sign == 1, -v, v)
        if scale is not None:
            v = v * torch.as_tensor(scale, dtype=wide)
        return v.to(dtype)

    def grid(self) -> Tensor:
        """Every finite value, sorted and without duplicates (float64); small formats only.

        >>> FloatFormat(exp=2, man=1).grid().tolist()
        [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
        """
        check(self.bits <= 16, "bits", "grid() enumerates every code; use it for formats of 16 bits or fewer")
        v = self.decode(torch.arange(2 ** self.bits), dtype=torch.float64)
        return torch.unique(v[torch.isfinite(v)])

    def bit_cost(self, shape: Shape, granularity: Granularity | None = None, scale_bits: int = 16) -> float:
        """`bits` + a `scale_bits` scale per group when a granularity is given.

        >>> from nncompress.formats import PerTensor
        >>> FloatFormat(exp=4, man=3).bit_cost((64, 64), PerTensor())   # 8 + 16/4096
        8.00390625
        """
        return self.bits + scale_overhead(shape, granularity, scale_bits)
