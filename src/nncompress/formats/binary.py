"""Extremely low precision: binary {-alpha, +alpha} and ternary {-alpha, 0, +alpha} weights.

alpha is fitted per group of `granularity` when no scale is given:
- binary (XNOR-Net/BWN): alpha = mean |x|, the L2-optimal scale for sign(x);
- ternary (TWN, Li et al. 2016): threshold delta = `threshold_ratio` * mean |x| (0.7 by default),
  alpha = mean of |x| over the elements above delta.

>>> from nncompress.formats import PerChannel
>>> w = torch.tensor([[0.5, -1.5, 1.0], [2.0, -0.5, -0.5]])   # mean |x| = 1 in both rows
>>> BinaryFormat(granularity=PerChannel(axis=0)).quantize(w).tolist()
[[1.0, -1.0, 1.0], [1.0, -1.0, -1.0]]
>>> TernaryFormat(granularity=PerChannel(axis=0)).quantize(w).tolist()    # delta = 0.7
[[0.0, -1.25, 1.25], [2.0, 0.0, 0.0]]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.config import Config, check
from .granularity import Granularity, PerTensor, Shape, apply_grouped, expand_scale, group_reduce, scale_overhead


def _sign(x: Tensor) -> Tensor:
    """+1 for x >= 0, -1 below: sign with no zero, so a binary tensor has exactly two values."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


@dataclass(frozen=True)
class BinaryFormat(Config):
    """sign(x) * alpha, alpha = mean |x| per group (1 bit per element + alpha per group)."""

    granularity: Granularity = PerTensor()

    @property
    def bits(self) -> int:
        return 1

    def fit_scale(self, x: Tensor) -> Tensor:
        """alpha = mean |x| per group, broadcastable against `x`."""
        alpha = group_reduce(x, self.granularity, lambda v, d: v.abs().mean(d, keepdim=True))
        return expand_scale(alpha, self.granularity, x.shape)

    def quantize(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        if scale is not None:
            return _sign(x) * scale
        return apply_grouped(x, self.granularity, lambda v, d: _sign(v) * v.abs().mean(d, keepdim=True))

    def encode(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """1 for +alpha, 0 for -alpha (int32); the scale does not change the sign."""
        return (x >= 0).to(torch.int32)

    def decode(self, codes: Tensor, scale: Tensor | float, dtype: torch.dtype = torch.float32) -> Tensor:
        return ((2 * codes - 1) * scale).to(dtype)

    def bit_cost(self, shape: Shape, granularity: Granularity | None = None, scale_bits: int = 16) -> float:
        """1 + one alpha per group (of `granularity`, default the format's own).

        >>> from nncompress.formats import PerChannel
        >>> BinaryFormat(granularity=PerChannel(axis=0)).bit_cost((64, 128))   # 1 + 16/128
        1.125
        """
        return 1 + scale_overhead(shape, granularity or self.granularity, scale_bits)


@dataclass(frozen=True)
class TernaryFormat(Config):
    """{-alpha, 0, +alpha} with TWN's threshold and alpha per group (2 bits per element).

    With an explicit `scale` (alpha) the nearest of {-alpha, 0, alpha} is taken (threshold alpha/2,
    ties to 0); without one, TWN: delta = threshold_ratio * mean|x|, alpha = mean |x| over |x| > delta.
    """

    granularity: Granularity = PerTensor()
    threshold_ratio: float = 0.7

    def __post_init__(self) -> None:
        check(self.threshold_ratio >= 0, "threshold_ratio", f"expected >= 0, got {self.threshold_ratio}")

    @property
    def bits(self) -> int:
        return 2

    def _fit(self, v: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """(alpha keepdim, mask of kept elements) for a grouped view."""
        a = v.abs()
        delta = self.threshold_ratio * a.mean(dims, keepdim=True)
        mask = a > delta
        kept = mask.sum(dims, keepdim=True).clamp_min(1)
        return (a * mask).sum(dims, keepdim=True) / kept, mask

    def fit_scale(self, x: Tensor) -> Tensor:
        """TWN alpha per group, broadcastable against `x`."""
        alpha = group_reduce(x, self.granularity, lambda v, d: self._fit(v, d)[0])
        return expand_scale(alpha, self.granularity, x.shape)

    def _codes(self, x: Tensor, scale: Tensor | float | None) -> Tensor:
        if scale is None:
            mask = apply_grouped(x, self.granularity, lambda v, d: self._fit(v, d)[1])
        else:
            mask = x.abs() > torch.as_tensor(scale, dtype=x.dtype).abs() / 2
        return torch.sign(x).to(torch.int32) * mask

    def quantize(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        if scale is None:
            def fit(v: Tensor, dims: tuple[int, ...]) -> Tensor:
                alpha, mask = self._fit(v, dims)
                return torch.where(mask, torch.sign(v) * alpha, 0.0).to(v.dtype)
            return apply_grouped(x, self.granularity, fit)
        return self._codes(x, scale) * scale

    def encode(self, x: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """Codes in {-1, 0, 1} (int32; 2-bit two's complement when packed)."""
        return self._codes(x, scale)

    def decode(self, codes: Tensor, scale: Tensor | float, dtype: torch.dtype = torch.float32) -> Tensor:
        return (codes * scale).to(dtype)

    def bit_cost(self, shape: Shape, granularity: Granularity | None = None, scale_bits: int = 16) -> float:
        """2 + one alpha per group (of `granularity`, default the format's own)."""
        return 2 + scale_overhead(shape, granularity or self.granularity, scale_bits)
