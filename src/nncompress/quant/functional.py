"""The pure functions of fake quantization: qparams, rounding onto a format, and the straight-through
estimators (STE, LSQ, PACT, DoReFa) written as custom autograd functions (seed 001).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..formats import (FixedPoint, FloatFormat, IntFormat, LogFormat, Pow2Format, expand_scale, fake_quantize,
                       group_amax, int_qparams)
from .observers import grid_max

EPS = torch.finfo(torch.float32).eps


def uses_scale(fmt: Any) -> bool:
    """True for grids an observer range is mapped onto; False for formats that fit their own scale."""
    return isinstance(fmt, (IntFormat, FixedPoint, FloatFormat, Pow2Format, LogFormat))


def qparams(lo: Tensor, hi: Tensor, fmt: Any) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) mapping [lo, hi] onto any scaled format (int: `int_qparams`).

    >>> s, z = qparams(torch.tensor(-2.0), torch.tensor(448.0), FloatFormat(exp=4, man=3))
    >>> s.item(), z.item()
    (1.0, 0)
    """
    if isinstance(fmt, IntFormat):
        return int_qparams(lo, hi, fmt)
    amax = torch.maximum(lo.abs(), hi.abs())
    scale = (amax / grid_max(fmt)).clamp_min(EPS)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def _as_int(fmt: Any, scale: Tensor) -> tuple[IntFormat, Tensor]:
    if isinstance(fmt, FixedPoint):  # a fixed point number is an integer grid with step 2**-frac_bits
        return fmt.int_format, scale * fmt.resolution
    return fmt, scale


def quantize_values(x: Tensor, fmt: Any, scale: Tensor | None = None, zero_point: Tensor | int | None = None
                    ) -> Tensor:
    """Quantize-dequantize `x` with a broadcastable scale (None for self-scaled formats). No gradient."""
    if not uses_scale(fmt):
        return fmt.quantize(x)
    if isinstance(fmt, (IntFormat, FixedPoint)):
        int_fmt, step = _as_int(fmt, scale)
        return fake_quantize(x, step, 0 if zero_point is None else zero_point, int_fmt)
    return fmt.quantize(x, scale)


def in_range(x: Tensor, fmt: Any, scale: Tensor | None, zero_point: Tensor | int | None) -> Tensor:
    """Where the straight-through gradient passes: the code before clipping lies in [qmin, qmax]
    (PyTorch's FakeQuantize rule). Self-scaled formats never clip: everywhere."""
    if not uses_scale(fmt):
        return torch.ones_like(x, dtype=torch.bool)
    if isinstance(fmt, (IntFormat, FixedPoint)):
        int_fmt, step = _as_int(fmt, scale)
        code = torch.round(x / step) + (0 if zero_point is None else zero_point)
        return (code >= int_fmt.qmin) & (code <= int_fmt.qmax)
    return (x / scale).abs() <= grid_max(fmt)


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to `shape`."""
    while grad.ndim > len(shape):
        grad = grad.sum(0)
    dims = tuple(d for d, n in enumerate(shape) if n == 1 and grad.shape[d] != 1)
    return grad.sum(dims, keepdim=True) if dims else grad


class STEQuantize(torch.autograd.Function):
    """Forward: `quantize_values(x, fmt, scale, zero_point)`. Backward: the straight-through
    estimator, identity for x inside the clip range and zero outside; for a scale that requires
    grad, LSQ's d out / d scale = (out - x) / scale inside and out / scale outside.

    >>> x = torch.tensor([0.2, 0.9, 5.0], requires_grad=True)
    >>> STEQuantize.apply(x, torch.tensor(0.5), 0, IntFormat(bits=3)).sum().backward()   # clip at 3.5
    >>> x.grad.tolist()
    [1.0, 1.0, 0.0]
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor | None, zero_point: Tensor | int | None, fmt: Any) -> Tensor:
        q = quantize_values(x, fmt, scale, zero_point)
        ctx.save_for_backward(x, q, scale if isinstance(scale, Tensor) else None,
                              in_range(x, fmt, scale, zero_point))
        return q

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, q, scale, inside = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = _sum_to(grad * torch.where(inside, (q - x) / scale, q / scale), scale.shape)
        return grad_x, grad_scale, None, None


class GradScale(torch.autograd.Function):
    """Identity forward (bit for bit), gradient times `factor` (LSQ's g)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def quantize_ste(x: Tensor, fmt: Any, scale: Tensor | None = None, zero_point: Tensor | int | None = None) -> Tensor:
    """`quantize_values` with the straight-through gradient when autograd needs one."""
    needs = torch.is_grad_enabled() and (x.requires_grad or (isinstance(scale, Tensor) and scale.requires_grad))
    return STEQuantize.apply(x, scale, zero_point, fmt) if needs else quantize_values(x, fmt, scale, zero_point)


def lsq_quantize(x: Tensor, step: Tensor, fmt: IntFormat, per_step: int) -> Tensor:
    """LSQ (Esser et al. 2020): quantize with a learned step whose gradient is scaled by
    g = 1 / sqrt(per_step * qmax), `per_step` the number of elements sharing one step."""
    g = 1.0 / math.sqrt(max(per_step, 1) * fmt.qmax)
    s = GradScale.apply(step, g).abs().clamp_min(EPS)
    return quantize_ste(x, fmt, s, 0)


def pact_quantize(x: Tensor, alpha: Tensor, fmt: IntFormat) -> Tensor:
    """PACT (Choi et al. 2018): clip to [0, alpha] (alpha learned: gradient 1 where x >= alpha),
    then quantize [0, alpha] onto the unsigned grid with the straight-through estimator."""
    alpha = alpha.abs().clamp_min(EPS)
    y = torch.minimum(x.clamp_min(0), alpha)
    return quantize_ste(y, fmt, (alpha / fmt.qmax).detach(), 0)


def dorefa_weight(w: Tensor, fmt: IntFormat, granularity: Any) -> Tensor:
    """DoReFa-Net weights: 2 * Q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1 with k = fmt.bits, in [-1, 1].

    The grid has no scale of the layer's weights: the paper relies on a normalisation after it.
    """
    t = torch.tanh(w)
    amax = expand_scale(group_amax(t, granularity), granularity, w.shape).clamp_min(EPS)
    u = t / (2 * amax) + 0.5                                           # in [0, 1]
    n = 2 ** fmt.bits - 1
    return 2 * quantize_ste(u, IntFormat(bits=fmt.bits, signed=False), torch.tensor(1.0 / n), 0) - 1
