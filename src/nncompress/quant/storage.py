"""Integer storage of quantized weights: a wrapper's weight as (codes, scale, zero point) and back.

A fake-quant wrapper computes with `(clip(round(w / s) + z) - z) * s`; only the codes, the scale and
the zero point matter (binary: sign and alpha; ternary: {-1, 0, 1} and alpha), so a checkpoint can hold b-bit codes instead of the float `.base.weight`.
`weight_codes` takes them with the wrapper's own fixed qparams (those its forward uses) and
`dequantize_codes` is the inverse; `storage_hints` hands them to the checkpoint writer (registered in
the "storage_hints" namespace, so `export` never imports `quant`).

The stored weight is the dequantized one (the float weight snapped onto its grid): the reloaded
wrapper quantizes it to the same values, so outputs are identical, but the float master weights are
gone. Wrappers in training mode (QAT in progress) are left out and keep their float weights.

>>> import torch.nn as nn
>>> from nncompress.formats import IntFormat
>>> from .fake_quant import QuantLinear, QuantSpec
>>> layer = QuantLinear(nn.Linear(64, 8), weight=QuantSpec(format=IntFormat(bits=4))).eval()
>>> codes = weight_codes(layer)
>>> codes.bits, codes.codes.shape, int(codes.codes.min()) >= -8, int(codes.codes.max()) <= 7
(4, torch.Size([8, 64]), True, True)
>>> torch.equal(dequantize_codes(codes), layer.quantized_weight())
True
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..core import register
from ..formats import (BinaryFormat, IntFormat, PerChannel, PerGroup, PerTensor, TernaryFormat, expand_scale,
                       group_reduce)
from .fake_quant import QuantWrapper

__all__ = ["WeightCodes", "weight_codes", "dequantize_codes", "storage_hints"]

_FIX_TRIES = 24  # binary / ternary: secant steps towards stored values that re-fit alpha exactly


@dataclasses.dataclass(frozen=True)
class WeightCodes:
    """A quantized weight as integers: `value = (codes - zero_point) * scale` (kind "affine"),
    `(2 * codes - 1) * scale` (kind "binary") or `codes * scale` with codes in {-1, 0, 1} (kind
    "ternary", 2-bit signed), scale / zero point in the compact layout of `granularity`
    over the 2-D view (out, in * kernel).

    codes:      int32, the weight's shape; bits: packed width; signed: codes are two's complement
    scale:      float, compact per-group layout; zero_point: int32 or None (symmetric)
    fix:        binary only: the magnitude of each group's last element (see `_fit_binary`)
    """

    codes: Tensor
    bits: int
    signed: bool
    scale: Tensor
    zero_point: Tensor | None
    granularity: Any
    kind: str = "affine"
    fix: Tensor | None = None


def _granularity_dict(g: Any) -> dict[str, Any]:
    kind = {PerTensor: "per_tensor", PerChannel: "per_channel", PerGroup: "per_group"}[type(g)]
    return {"kind": kind, **g.to_dict()}


def weight_codes(wrapper: QuantWrapper) -> WeightCodes | None:
    """The codes of `wrapper`'s weight under its own fixed qparams; None when the quantizer is not an
    integer grid with a fixed scale (rtn int), a binary or a ternary format (LSQ / PACT / float grids / none).
    """
    fq = wrapper.weight_quant
    if fq is None:
        return None
    fmt = fq.fmt
    with torch.no_grad():
        w = wrapper.base.weight.detach().flatten(1)  # (O, I * k)
        if isinstance(fmt, IntFormat) and fq.spec.method == "rtn" and fq.ready:
            fq.finish()
            if fq.scale is None:
                return None
            s = expand_scale(fq.scale, fq.granularity, w.shape)
            z = None if fq.zero_point is None else expand_scale(fq.zero_point, fq.granularity, w.shape)
            codes = fmt.encode(w, s, z)
            return WeightCodes(codes.view(wrapper.base.weight.shape), fmt.bits, fmt.signed, fq.scale.detach(),
                               None if fq.zero_point is None else fq.zero_point.detach(), fq.granularity)
        if isinstance(fmt, BinaryFormat):
            alpha = group_reduce(w, fmt.granularity, lambda v, d: v.abs().mean(d, keepdim=True))
            codes = fmt.encode(w)
            return WeightCodes(codes.view(wrapper.base.weight.shape), 1, False, alpha, None, fmt.granularity,
                               kind="binary")
        if isinstance(fmt, TernaryFormat):
            alpha = group_reduce(w, fmt.granularity, lambda v, d: fmt._fit(v, d)[0])   # TWN alpha, compact
            codes = fmt.encode(w)                                                     # {-1, 0, 1}, TWN mask
            return WeightCodes(codes.view(wrapper.base.weight.shape), 2, True, alpha, None, fmt.granularity,
                               kind="ternary")
    return None


def dequantize_codes(c: WeightCodes, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight the codes stand for, in the codes' shape (exact: integer times scale)."""
    codes = c.codes.reshape(c.codes.shape[0], -1) if c.codes.dim() > 1 else c.codes.view(1, -1)  # (O, I*k)
    s = expand_scale(c.scale, c.granularity, codes.shape)
    if c.kind == "binary":
        out = (2 * codes - 1) * s
        if c.fix is not None:
            out = torch.where(last_in_group(tuple(codes.shape), c.granularity),
                              (2 * codes - 1) * expand_scale(c.fix, c.granularity, codes.shape), out)
    else:  # affine; ternary is affine with zero point 0
        z = 0 if c.zero_point is None else expand_scale(c.zero_point, c.granularity, codes.shape)
        out = (codes - z) * s
    return out.to(dtype).view(c.codes.shape)


def last_in_group(shape2d: tuple[int, int], granularity: Any) -> Tensor | None:
    """Bool mask (O, R) of the last element of each group of `granularity`; None for a granularity
    binary storage does not handle (per channel along another axis)."""
    rows, cols = shape2d
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if isinstance(granularity, PerTensor):
        mask[-1, -1] = True
    elif isinstance(granularity, PerChannel) and granularity.axis == 0:
        mask[:, -1] = True
    elif isinstance(granularity, PerGroup) and granularity.axis in (1, -1) and cols % granularity.size == 0:
        mask[:, granularity.size - 1::granularity.size] = True
    else:
        return None
    return mask


def _fit_binary(wrapper: QuantWrapper, c: WeightCodes) -> WeightCodes | None:
    """Binary alpha is re-fitted on load as mean |w| of the stored weight, and a float32 mean of n equal
    values is not always that value. So the last element of each group stores `fix` instead of
    alpha, chosen so that the mean comes back exactly alpha (n * alpha - the others, then secant steps)."""
    fmt, target = wrapper.weight_quant.fmt, c.scale
    rows = c.codes.shape[0]
    codes = c.codes.reshape(rows, -1)                                      # (O, R)
    mask = last_in_group(tuple(codes.shape), fmt.granularity)
    if mask is None:
        return None
    full = expand_scale(target, fmt.granularity, codes.shape).expand(codes.shape)  # (O, R)
    n = group_reduce(torch.ones_like(full), fmt.granularity, lambda v, d: v.sum(d, keepdim=True))
    rest = group_reduce(torch.where(mask, 0.0, full).double(), fmt.granularity, lambda v, d: v.sum(d, keepdim=True))
    guess = (n.double() * target.double() - rest).float()                   # compact layout
    # the float32 sum absorbs small moves of one element, so step by the measured error of the mean
    # times n (a secant step), plus a growing nudge in the same direction when a step was absorbed
    ulp = (torch.nextafter(target, torch.full_like(target, float("inf"))) - target).double()
    fix, done = guess.clone(), torch.zeros_like(target, dtype=torch.bool)
    cand = guess.double()
    for i in range(_FIX_TRIES):
        w = dequantize_codes(dataclasses.replace(c, fix=cand.float()))
        refit = group_reduce(w.reshape(rows, -1), fmt.granularity, lambda v, d: v.abs().mean(d, keepdim=True))
        hit = (refit == target) & ~done
        fix, done = torch.where(hit, cand.float(), fix), done | hit
        if done.all():
            return dataclasses.replace(c, fix=fix)
        err = refit.double() - target.double()
        cand = cand - err * n.double() - torch.sign(err) * ulp * n.double() * i / 8
    return None


def _grouped(x: Tensor, granularity: Any) -> Tensor | None:
    """The (O, R) tensor viewed as (groups..., group elements): (1, 1, O*R), (O, 1, R) or (O, R/G, G)."""
    rows, cols = x.shape
    if isinstance(granularity, PerTensor):
        return x.reshape(1, 1, -1)
    if isinstance(granularity, PerChannel) and granularity.axis == 0:
        return x.reshape(rows, 1, cols)
    if isinstance(granularity, PerGroup) and granularity.axis in (1, -1) and cols % granularity.size == 0:
        return x.reshape(rows, cols // granularity.size, granularity.size)
    return None


def _fit_ternary(wrapper: QuantWrapper, c: WeightCodes) -> WeightCodes | None:
    """Ternary alpha is re-fitted on load (TWN: the mean |w| over the kept elements, which are exactly
    the non-zero codes), and a float32 mean of k equal values cannot always land on alpha. The reloaded
    forward only reads the signs, the kept set and that mean, so the stored codes may carry -2 (a legal
    2-bit code) for the first (or last) m negative elements of a group: the mean becomes
    (k + m) / k * alpha' and, over a few m and ulps of alpha', one combination re-fits alpha exactly
    (measured on 20 random 256 x 64 weights: all layers per channel; with groups of 32, one layer
    had a group where none did, and such a layer keeps its float weight)."""
    fmt, target = wrapper.weight_quant.fmt, c.scale                          # target: compact (groups)
    rows = c.codes.shape[0]
    codes = c.codes.reshape(rows, -1)                                        # (O, R)
    view = _grouped(codes, fmt.granularity)
    if view is None:
        return None
    kept = group_reduce((codes != 0).float(), fmt.granularity, lambda v, d: v.sum(d, keepdim=True)).double()
    neg = (view < 0).to(torch.int32)
    ranks = (torch.cumsum(neg, -1) * neg,                                    # 1.. for negatives, from the front
             torch.flip(torch.cumsum(torch.flip(neg, (-1,)), -1), (-1,)) * neg)   # ... and from the back
    ulp = (torch.nextafter(target, torch.full_like(target, float("inf"))) - target).double()
    best_codes, best_scale = codes.clone(), target.clone()
    done = torch.zeros_like(target, dtype=torch.bool)
    for m, rank in [(i, r) for i in range(_FIX_TRIES) for r in ranks[:1 if i == 0 else 2]]:
        doubled = (rank > 0) & (rank <= m)                                   # (groups..., G)
        trial = torch.where(doubled, -2, view).reshape(codes.shape)          # (O, R)
        base = target.double() * kept / (kept + m).clamp_min(1)
        for j in (0, -1, 1, -2, 2, -3, 3):
            scale = (base + j * ulp).float()
            w = dequantize_codes(dataclasses.replace(c, codes=trial, scale=scale)).reshape(rows, -1)
            refit = group_reduce(w, fmt.granularity, lambda v, d: fmt._fit(v, d)[0])
            hit = (refit == target) & ~done
            hit_el = expand_scale(hit, fmt.granularity, codes.shape).expand(codes.shape)
            best_codes = torch.where(hit_el, trial, best_codes)
            best_scale, done = torch.where(hit, scale, best_scale), done | hit
            if done.all():
                return dataclasses.replace(c, codes=best_codes.view(c.codes.shape), scale=best_scale)
    return None


def storage_hint(wrapper: QuantWrapper, prefix: str) -> dict[str, Any] | None:
    """The checkpoint hint for one wrapper (see `export.codecs.encode_int_codes`), or None when its
    weight cannot be stored as codes that reproduce its forward exactly."""
    c = weight_codes(wrapper)
    if c is None:
        return None
    if c.kind in ("binary", "ternary"):
        c = _fit_binary(wrapper, c) if c.kind == "binary" else _fit_ternary(wrapper, c)
        if c is None:
            return None
    w = wrapper.base.weight
    values = dequantize_codes(c, w.dtype)
    with torch.no_grad():  # the oracle: the reloaded wrapper must compute with the same weight
        same = torch.equal(wrapper.weight_quant(values.flatten(1)).reshape(w.shape), wrapper.quantized_weight())
    if not same:
        return None
    scale: Any = c.scale if c.kind in ("binary", "ternary") else f"{prefix}weight_quant.scale"
    zero_point = None if c.zero_point is None or not bool(c.zero_point.any()) else f"{prefix}weight_quant.zero_point"
    hint = {"codes": c.codes, "bits": c.bits, "signed": c.signed, "scale": scale, "zero_point": zero_point,
            "granularity": _granularity_dict(c.granularity), "kind": "affine" if c.kind == "ternary" else c.kind,
            "values": values}
    if c.fix is not None:
        hint["fix"] = c.fix
    return hint


@register("quant_weights", namespace="storage_hints")
def storage_hints(model: nn.Module) -> dict[str, dict[str, Any]]:
    """`{state name of a base weight: hint}` for every quantized wrapper in eval mode."""
    hints = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantWrapper) and not m.training:
            prefix = f"{name}." if name else ""
            hint = storage_hint(m, prefix)
            if hint is not None:
                hints[f"{prefix}base.weight"] = hint
    return hints
