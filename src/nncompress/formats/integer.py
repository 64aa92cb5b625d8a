"""Integer and fixed-point formats: `x_q = clip(round(x / scale) + zero_point, qmin, qmax)`.

>>> fmt = IntFormat(bits=4)
>>> fmt.qmin, fmt.qmax
(-8, 7)
>>> scale, zp = int_qparams(torch.tensor(-1.0), torch.tensor(0.5), fmt)
>>> fake_quantize(torch.tensor([-1.0, -0.06, 0.3, 2.0]), scale, zp, fmt).tolist()
[-1.0, 0.0, 0.2857142984867096, 1.0]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.config import Config, check
from .base import as_scale
from .granularity import Granularity, Shape, scale_overhead


@dataclass(frozen=True)
class IntFormat(Config):
    """A `bits`-wide integer grid; `symmetric=False` adds a zero point (stored in `bits` bits).

    `narrow_range` drops the most negative code (signed: [-127, 127] for int8) or code 0
    (unsigned, asymmetric only: [1, 255]), as some integer GEMM kernels require.

    >>> IntFormat(bits=8, narrow_range=True).qmin
    -127
    >>> IntFormat(bits=8, signed=False).qmax
    255
    >>> IntFormat(bits=4).quantize(torch.tensor([0.5, 1.5, -9.0])).tolist()  # scale 1: integers
    [0.0, 2.0, -8.0]
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False

    def __post_init__(self) -> None:
        check(2 <= self.bits <= 16, "bits", f"IntFormat takes 2..16 bits, got {self.bits}; "
                                            "use BinaryFormat for 1 bit")
        check(not (self.narrow_range and self.symmetric and not self.signed), "narrow_range",
              "an unsigned symmetric grid starts at code 0 (zero); narrow_range would drop it, "
              "set symmetric=False or narrow_range=False")

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + int(self.narrow_range)
        return int(self.narrow_range)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    @property
    def levels(self) -> int:
        """Number of representable values."""
        return self.qmax - self.qmin + 1

    def quantize(self, x: Tensor, scale: Tensor | float | None = None,
                 zero_point: Tensor | int | None = None) -> Tensor:
        """Fake-quantize `x`: scale 1 and zero point 0 when not given (the integer grid itself)."""
        scale = as_scale(1.0 if scale is None else scale, x)
        return fake_quantize(x, scale, 0 if zero_point is None else zero_point, self)

    def encode(self, x: Tensor, scale: Tensor | float | None = None,
               zero_point: Tensor | int | None = None) -> Tensor:
        """Integer codes in [qmin, qmax] (int32)."""
        scale = as_scale(1.0 if scale is None else scale, x)
        zp = 0 if zero_point is None else zero_point
        return (torch.round(x / scale) + zp).clamp(self.qmin, self.qmax).to(torch.int32)

    def decode(self, codes: Tensor, scale: Tensor | float | None = None,
               zero_point: Tensor | int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        scale = 1.0 if scale is None else scale
        zp = 0 if zero_point is None else zero_point
        return ((codes - zp) * scale).to(dtype)

    def bit_cost(self, shape: Shape, granularity: Granularity | None = None, scale_bits: int = 16) -> float:
        """Bits per element: `bits` + (scale [+ zero point in `bits` bits]) per group.

        >>> from nncompress.formats import PerChannel, PerGroup
        >>> IntFormat(bits=4).bit_cost((128, 256), PerGroup(axis=1, size=64))   # 4 + 16/64
        4.25
        >>> IntFormat(bits=8, symmetric=False).bit_cost((8, 32), PerChannel(0))  # 8 + (16+8)/32
        8.75
        """
        per_group = scale_bits + (0 if self.symmetric else self.bits)
        return self.bits + scale_overhead(shape, granularity, per_group)


def int_qparams(min_val: Tensor, max_val: Tensor, fmt: IntFormat,
                eps: float = torch.finfo(torch.float32).eps) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) that map [min_val, max_val] (elementwise, any shape) onto `fmt`.

    Symmetric signed: scale = max(|min|, |max|) / qmax, zero point 0 (nothing clips).
    Symmetric unsigned: scale = max / qmax, zero point 0 (for non-negative data).
    Asymmetric: the range is widened to contain 0, scale = (max - min) / (qmax - qmin) and the
    integer zero point = qmin - round(min / scale), so that 0.0 is exactly representable.
    Scales are at least `eps` (an all-zero tensor gets scale eps).

    >>> s, z = int_qparams(torch.tensor(0.0), torch.tensor(2.55), IntFormat(signed=False, symmetric=False))
    >>> round(s.item(), 6), z.item()
    (0.01, 0)
    """
    min_val, max_val = torch.as_tensor(min_val), torch.as_tensor(max_val)
    min_val = torch.minimum(min_val, torch.zeros_like(min_val))
    max_val = torch.maximum(max_val, torch.zeros_like(max_val))
    if fmt.symmetric:
        span = torch.maximum(-min_val, max_val) if fmt.signed else max_val
        scale = (span / fmt.qmax).clamp_min(eps)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((max_val - min_val) / (fmt.qmax - fmt.qmin)).clamp_min(eps)
    zero_point = (fmt.qmin - torch.round(min_val / scale)).clamp(fmt.qmin, fmt.qmax).to(torch.int32)
    return scale, zero_point


def fake_quantize(x: Tensor, scale: Tensor | float, zero_point: Tensor | int, fmt: IntFormat) -> Tensor:
    """Quantize then dequantize: `(clip(round(x / scale) + zp, qmin, qmax) - zp) * scale`.

    Rounding is to nearest, ties to even (torch.round). No straight-through gradient here:
    wrappers that train through it add `x + (fake_quantize(...) - x).detach()`.

    >>> fake_quantize(torch.tensor([0.25, 0.75, 10.0]), 0.5, 0, IntFormat(bits=4)).tolist()
    [0.0, 1.0, 3.5]
    """
    q = (torch.round(x / scale) + zero_point).clamp(fmt.qmin, fmt.qmax)
    return ((q - zero_point) * scale).to(x.dtype)


@dataclass(frozen=True)
class FixedPoint(Config):
    """A `bits`-wide fixed-point number with `frac_bits` bits after the binary point.

    The value is `code * 2**-frac_bits`: an integer grid with the fixed scale 2**-frac_bits.

    >>> fmt = FixedPoint(bits=8, frac_bits=4)
    >>> fmt.resolution, fmt.max, fmt.min
    (0.0625, 7.9375, -8.0)
    >>> fmt.quantize(torch.tensor([0.03, 0.1, 100.0])).tolist()
    [0.0, 0.125, 7.9375]
    """

    bits: int = 8
    frac_bits: int = 4
    signed: bool = True
    narrow_range: bool = False

    def __post_init__(self) -> None:
        check(2 <= self.bits <= 16, "bits", f"FixedPoint takes 2..16 bits, got {self.bits}")
        check(-64 <= self.frac_bits <= 64, "frac_bits", f"expected -64..64, got {self.frac_bits}")
        check(not (self.narrow_range and not self.signed), "narrow_range",
              "narrow_range drops the most negative code of a signed grid; set signed=True")

    @property
    def int_format(self) -> IntFormat:
        return IntFormat(bits=self.bits, signed=self.signed, narrow_range=self.narrow_range)

    @property
    def resolution(self) -> float:
        return 2.0 ** -self.frac_bits

    @property
    def max(self) -> float:
        return self.int_format.qmax * self.resolution

    @property
    def min(self) -> float:
        return self.int_format.qmin * self.resolution

    def quantize(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """Onto `scale * 2**-frac_bits * [qmin, qmax]` (scale 1 when None)."""
        step = self.resolution if scale is None else as_scale(scale, x) * self.resolution
        return fake_quantize(x, step, 0, self.int_format)

    def encode(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        step = self.resolution if scale is None else as_scale(scale, x) * self.resolution
        return self.int_format.encode(x, step)

    def decode(self, codes: Tensor, scale: Tensor | float | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        step = self.resolution if scale is None else scale * self.resolution
        return self.int_format.decode(codes, step, dtype=dtype)

    def bit_cost(self, shape: Shape, granularity: Granularity | None = None, scale_bits: int = 16) -> float:
        """`bits`, plus a scale per group only when a granularity is given (the binary point is free)."""
        return self.bits + scale_overhead(shape, granularity, scale_bits)
