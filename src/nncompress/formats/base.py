"""What every number format shares: the `NumberFormat` protocol and exact power-of-two helpers.

Conventions for every format in this package:

- `quantize(x, scale=None)` returns float values on `scale * grid` (round to nearest, ties to
  even for uniform grids), in `x`'s dtype. `scale` broadcasts against `x`. For formats with a fixed
  grid (int, fixed point, minifloat, pow2, log) None means a scale of 1; for formats whose scale is
  part of their definition (block exponents, binary/ternary alpha, scaled codebooks) None means
  "derive it from `x`".
- `encode` returns `torch.int32` codes (two's complement for signed integers, raw bit patterns
  for floats); `decode(encode(x)) == quantize(x)`.
- `quantize` is not differentiable (its gradient is zero or absent); training wrappers add a
  straight-through estimator themselves: `x + (fmt.quantize(x) - x).detach()`.
- `bits` is the storage width of one element; `bit_cost(shape, granularity, scale_bits)` is
  bits per element including stored scales (and zero points, shared exponents) amortised.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .granularity import Granularity, Shape


@runtime_checkable
class NumberFormat(Protocol):
    """The interface every format value implements (checked structurally)."""

    @property
    def bits(self) -> int: ...

    def quantize(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor: ...

    def bit_cost(self, shape: Shape, granularity: Granularity | None = None,
                 scale_bits: int = 16) -> float: ...


def pow2(n: Tensor, dtype: torch.dtype) -> Tensor:
    """2**n for an integer tensor `n`, built from bits so it is exact (subnormals included).

    `n` is clamped to the range of `dtype` (float32: [-149, 127]; float64: [-1074, 1023]).

    >>> pow2(torch.tensor([-149, -1, 0, 127]), torch.float32).tolist()[1:]
    [0.5, 1.0, 1.7014118346046923e+38]
    """
    n = n.long()
    if dtype == torch.float64:
        lo, mbits, bias, ibits = -1074, 52, 1023, torch.int64
    else:
        lo, mbits, bias, ibits = -149, 23, 127, torch.int32
    n = n.clamp(lo, bias)
    normal = (n + bias).clamp_min(1) << mbits
    sub = torch.ones_like(n) << (n - lo).clamp(0, mbits - 1)
    return torch.where(n >= 1 - bias, normal, sub).to(ibits).view(dtype)


def floor_log2(a: Tensor) -> Tensor:
    """floor(log2(a)) for a > 0, exact (from frexp, not from a rounded log2); int32."""
    return torch.frexp(a)[1] - 1


def compute_dtype(x: Tensor, needs_float64: bool = False) -> torch.dtype:
    """float64 for float64 inputs or formats whose range float32 cannot hold, else float32."""
    return torch.float64 if needs_float64 or x.dtype == torch.float64 else torch.float32


def as_scale(scale: Tensor | float | None, like: Tensor) -> Tensor | None:
    """`scale` as a tensor of `like`'s dtype and device (None stays None)."""
    if scale is None:
        return None
    return torch.as_tensor(scale, dtype=like.dtype, device=like.device)
