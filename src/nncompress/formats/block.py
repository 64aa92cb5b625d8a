"""Block formats: `block` consecutive elements along `axis` share one power-of-two scale.

Each block stores a shared exponent E (in `scale_exp` bits, bias 2**(scale_exp-1) - 1, the top
code reserved for NaN as in E8M0, so E is clipped to [-(2**(scale_exp-1) - 1), 2**(scale_exp-1) - 1])
and small elements that are quantized relative to X = 2**(E - emax_elem):

- `BlockFloat(man)`: block floating point (BFP); E = floor(log2 max|x|), elements are
  sign-magnitude fixed point with `man` magnitude bits, 1 of them before the binary point.
- `BlockMinifloat(element)`: a shared exponent bias per block and minifloat elements (BM).
  E = floor(log2 max|x|), emax_elem = the binade of the element's max: the OCP MX rule.
- `BlockLog(exp)`: a shared scale and log2-quantized elements (BL), E = max|x| rounded in log2.

The OCP MX formats (block 32, E8M0 scale) are values of these classes:

>>> MXFP4.bit_cost((16, 64))           # 4-bit E2M1 elements + an 8-bit scale per 32
4.25
>>> x = torch.tensor([0.1, 0.8, 1.3, 2.6, 5.0, 12.0, 0.0, 0.0] * 4)    # amax 12: X = 2**(3 - 2)
>>> MXFP4.quantize(x)[:8].tolist()                                        # X * E2M1 grid
[0.0, 1.0, 1.0, 3.0, 4.0, 12.0, 0.0, 0.0]

An axis whose length `block` does not divide is padded with zeros (which change no block max).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.config import Config, check
from .base import compute_dtype, floor_log2, pow2
from .codebook import LogFormat
from .granularity import Granularity, Shape, _axis, as_shape, scale_overhead
from .integer import FixedPoint
from .minifloat import FloatFormat


def to_blocks(x: Tensor, block: int, axis: int) -> Tensor:
    """`x` with `axis` moved last, zero-padded to a multiple of `block` and split: (..., L/B, B)."""
    axis = _axis(axis, x.ndim)
    v = x.movedim(axis, -1)                                 # (..., L)
    pad = -v.shape[-1] % block
    if pad:
        v = F.pad(v, (0, pad))
    return v.unflatten(-1, (v.shape[-1] // block, block))   # (..., L/B, B)


def from_blocks(v: Tensor, axis: int, shape: torch.Size) -> Tensor:
    """The inverse of `to_blocks` for a tensor of `shape`."""
    axis = _axis(axis, len(shape))
    v = v.flatten(-2)[..., : shape[axis]]                   # (..., L)
    return v.movedim(-1, axis)


class _Blocked:
    """Shared machinery; subclasses give `_element`, `_block_exponent` and the block fields."""

    block: int
    scale_exp: int
    axis: int

    def _check_block(self) -> None:
        check(self.block >= 1, "block", f"a block holds at least 1 element, got {self.block}")
        check(2 <= self.scale_exp <= 8, "scale_exp", f"expected 2..8 shared exponent bits, got {self.scale_exp}")

    @property
    def _element(self):  # the per-element format, quantizing x / X
        raise NotImplementedError

    def _block_exponent(self, amax: Tensor) -> Tensor:  # E before clipping, amax > 0
        return floor_log2(amax)

    @property
    def scale_bias(self) -> int:
        return 2 ** (self.scale_exp - 1) - 1

    @property
    def bits(self) -> int:
        return self._element.bits

    @property
    def emax_elem(self) -> int:
        """Exponent of the element format's largest binade."""
        return int(math.floor(math.log2(self._element.max)))

    def shared_exponents(self, x: Tensor) -> Tensor:
        """The per-block exponent E (int32), shape `x.shape` with `axis` moved last and -> L/B.

        log2 of the block scale X is `E - emax_elem`. All-zero blocks get the smallest exponent;
        blocks holding inf or NaN the largest (MX would mark the scale NaN; we keep the others).
        """
        return self._exponents(to_blocks(x, self.block, self.axis).to(compute_dtype(x)))

    def _exponents(self, v: Tensor) -> Tensor:
        amax = v.abs().amax(-1)                                          # (..., L/B, B) -> (..., L/B)
        e = torch.where(amax > 0, self._block_exponent(amax), -self.scale_bias)
        e = torch.where(amax.isfinite(), e, self.scale_bias)  # inf (or NaN) in a block: the top scale
        return e.clamp(-self.scale_bias, self.scale_bias).to(torch.int32)

    def _scales(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        v = to_blocks(x, self.block, self.axis).to(compute_dtype(x))     # (..., L/B, B)
        e = self._exponents(v)                                           # (..., L/B)
        return v, e, pow2(e - self.emax_elem, v.dtype).unsqueeze(-1)     # X: (..., L/B, 1)

    def quantize(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """Quantize block by block; `scale` (broadcast against x) is an extra outer scale."""
        y = x if scale is None else x / scale
        v, _, X = self._scales(y)
        q = from_blocks(self._element.quantize(v, X), self.axis, x.shape)
        return (q if scale is None else q * scale).to(x.dtype)

    def encode(self, x: Tensor, scale: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """(element codes shaped like x, biased shared exponent codes (..., L/B)), both int32."""
        y = x if scale is None else x / scale
        v, e, X = self._scales(y)
        codes = from_blocks(self._element.encode(v, X), self.axis, x.shape)
        return codes, e + self.scale_bias

    def decode(self, codes: Tensor, shared: Tensor, scale: Tensor | float | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """Values from `encode`'s pair (an outer `scale` multiplies them)."""
        X = pow2(shared.long() - self.scale_bias - self.emax_elem, torch.float64).unsqueeze(-1)
        c = to_blocks(codes, self.block, self.axis)                      # (..., L/B, B)
        v = from_blocks(self._element.decode(c, X, dtype=torch.float64), self.axis, codes.shape)
        return (v if scale is None else v * scale).to(dtype)

    def bit_cost(self, shape: Shape, granularity: Granularity | None = None, scale_bits: int = 16) -> float:
        """Element bits + `scale_exp` per block (+ an outer scale per group when given).

        >>> BlockFloat(man=7, block=16).bit_cost((4, 64))   # 8 + 8/16
        8.5
        """
        shape = as_shape(shape)
        axis = _axis(self.axis, len(shape))
        blocks = math.prod(shape) // max(shape[axis], 1) * math.ceil(shape[axis] / self.block)
        return self.bits + self.scale_exp * blocks / math.prod(shape) + scale_overhead(shape, granularity, scale_bits)


@dataclass(frozen=True)
class BlockFloat(_Blocked, Config):
    """Block floating point: E = floor(log2 max|x|) per block, elements `sign + man` bits.

    Elements are integers m in [-(2**man - 1), 2**man - 1] times 2**(E + 1 - man), so the block
    max lands in [2**(man-1), 2**man). `BlockFloat(man=7, block=32)` is OCP MXINT8 (restricted to
    the symmetric range, as the spec allows).

    >>> BlockFloat(man=3, block=4).quantize(torch.tensor([1.0, 0.3, -0.2, 0.06])).tolist()
    [1.0, 0.25, -0.25, 0.0]
    """

    man: int = 7
    block: int = 16
    scale_exp: int = 8
    axis: int = -1

    def __post_init__(self) -> None:
        check(1 <= self.man <= 15, "man", f"expected 1..15 mantissa bits, got {self.man}")
        self._check_block()

    @property
    def _element(self) -> FixedPoint:
        return FixedPoint(bits=self.man + 1, frac_bits=self.man - 1, narrow_range=True)


@dataclass(frozen=True)
class BlockMinifloat(_Blocked, Config):
    """A shared exponent bias per block and minifloat elements; X = 2**(floor(log2 amax) - emax_elem).

    The default element is the lecture's BM W8A8 (E4M3, no special values, 8-bit shared bias).
    Elements always saturate (a block's max may exceed the element max, e.g. 7.5 > 6 for E2M1).

    >>> BlockMinifloat().bits, BlockMinifloat().emax_elem
    (8, 8)
    """

    element: FloatFormat = FloatFormat(exp=4, man=3, specials="none")
    block: int = 16
    scale_exp: int = 8
    axis: int = -1

    def __post_init__(self) -> None:
        check(self.element.saturate, "element.saturate", "block elements clamp to the element max; "
                                                         "set saturate=True")
        self._check_block()

    @property
    def _element(self) -> FloatFormat:
        return self.element


@dataclass(frozen=True)
class BlockLog(_Blocked, Config):
    """A shared scale per block and log2-quantized elements: sign + `exp` bits of log2 magnitude.

    E = round(log2 max|x|) (in the log domain, like the elements); the element magnitudes are
    {0} and 2**(E - j) for j = 0 .. 2**exp - 2 (see `LogFormat`).

    >>> BlockLog(exp=3, block=4).quantize(torch.tensor([1.0, 0.3, -0.2, 0.0])).tolist()
    [1.0, 0.25, -0.25, 0.0]
    """

    exp: int = 7
    block: int = 16
    scale_exp: int = 8
    axis: int = -1

    def __post_init__(self) -> None:
        check(1 <= self.exp <= 8, "exp", f"expected 1..8 log2 magnitude bits, got {self.exp}")
        self._check_block()

    @property
    def _element(self) -> LogFormat:
        return LogFormat(bits=self.exp + 1, max_exp=0)

    def _block_exponent(self, amax: Tensor) -> Tensor:
        return LogFormat.log2_round(amax, frac_bits=0)


BlockFormat = Union[BlockFloat, BlockMinifloat, BlockLog]

# OCP Microscaling (MX) v1.0: 32 elements share an E8M0 scale 2**(floor(log2 amax) - emax_elem).
MXINT8 = BlockFloat(man=7, block=32, scale_exp=8)
MXFP8 = BlockMinifloat(element=FloatFormat(exp=4, man=3), block=32, scale_exp=8)             # E4M3
MXFP8_E5M2 = BlockMinifloat(element=FloatFormat(exp=5, man=2), block=32, scale_exp=8)
MXFP6 = BlockMinifloat(element=FloatFormat(exp=2, man=3), block=32, scale_exp=8)             # E2M3
MXFP6_E3M2 = BlockMinifloat(element=FloatFormat(exp=3, man=2), block=32, scale_exp=8)
MXFP4 = BlockMinifloat(element=FloatFormat(exp=2, man=1), block=32, scale_exp=8)             # E2M1
