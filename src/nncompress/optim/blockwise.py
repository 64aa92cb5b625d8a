"""Block-wise dynamic quantization of optimizer states (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization").

Two ideas, each a pure function here:

- **Dynamic (tree) quantization map.** An 8-bit code is read as: a sign bit (signed maps only),
  then a run of E zero bits that gives the decimal exponent 10^-E, then an indicator 1 bit, then the
  remaining bits as a linear fraction in [0.1, 1]. Large magnitudes get many fraction bits, tiny
  ones few, so one byte spans 7 decades (1e-7 .. 1) with a roughly constant *relative* error.
  Adam's first moment uses the signed map, the second (non-negative) the unsigned map, where the
  sign bit becomes one more fraction bit.
- **Block-wise absmax.** The tensor is cut into blocks of `block_size` (2048) elements, each block
  is divided by its own absolute maximum before being mapped to the nearest code. An outlier only
  coarsens its own block, and blocks are independent (parallel, no global reduction).

>>> qmap = dynamic_map(signed=True)
>>> qmap.numel(), float(qmap.min()), float(qmap.max()), int((qmap == 0).sum())
(256, -0.9929687..., 1.0, 1)
>>> codes, absmax = quantize_blockwise(torch.tensor([0.5, 2.0, 0.0, -1e-3]), qmap, block_size=4)
>>> codes.dtype, absmax.tolist()
(torch.uint8, [2.0])
>>> dequantize_blockwise(codes, absmax, qmap, block_size=4).tolist()   # the absmax and 0 are exact
[0.4953..., 2.0, 0.0, -0.0009874...]
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dynamic_map", "quantize_to_map", "quantize_blockwise", "dequantize_blockwise", "blockwise_bytes"]


def dynamic_map(signed: bool = True, total_bits: int = 8, exponent_bits: int | None = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """The sorted table of the 2**total_bits values a dynamic-tree code can stand for, in [-1, 1].

    Built from the code layout (module docstring), as bitsandbytes' `create_dynamic_map` does: with
    n = total_bits - 1 bits after the sign, exponent E in 0..n-1 leaves n - 1 - E fraction bits,
    i.e. 2**(n-1-E) values at the midpoints of a linear split of [0.1, 1], scaled by 10**-E, each
    with both signs; the unsigned map has no sign and spends that bit on twice as many fraction
    values per decade. Zero and 1.0 (so a block's absmax is exact) take the two spare codes. A code
    is the index into this sorted table. float64 maths, cast to `dtype` at the end.

    >>> m = dynamic_map(signed=False)
    >>> m.numel(), float(m.min()), float(m.max()), bool((m.diff() > 0).all())
    (256, 0.0, 1.0, True)
    """
    n = total_bits - 1  # bits after the sign; the unsigned map spends the sign bit on fractions
    decades = exponent_bits if exponent_bits is not None else n
    values: list[float] = [0.0, 1.0]
    for i in range(decades):  # i = decades-1-E: the largest magnitudes get the most fraction values
        count = 2 ** (i + n - decades) if signed else 2 ** (i + n - decades + 1)
        edges = [0.1 + 0.9 * k / count for k in range(count + 1)]     # linear split of [0.1, 1]
        mids = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        scale = 10.0 ** (i - (decades - 1))
        values += [scale * v for v in mids]
        if signed:
            values += [-scale * v for v in mids]
    values += [0.0] * (2 ** total_bits - len(values))  # only when exponent_bits < n: pad with zeros
    assert len(values) == 2 ** total_bits, (len(values), signed, total_bits, exponent_bits)
    return torch.tensor(sorted(values), dtype=torch.float64).to(dtype)


def quantize_to_map(x: Tensor, qmap: Tensor) -> Tensor:
    """The index of the nearest entry of the sorted `qmap` for each element of `x` (ties go down).

    x: any shape, already normalised into [qmap.min(), qmap.max()]; returns uint8 codes, same shape.

    >>> quantize_to_map(torch.tensor([0.0, 1.0, 0.999]), dynamic_map(signed=False)).tolist()
    [0, 255, 255]
    """
    mids = (qmap[1:] + qmap[:-1]) / 2                                      # (255,) decision boundaries
    codes = torch.bucketize(x.to(qmap.dtype).contiguous(), mids, right=False)  # x <= mid -> lower code
    return codes.to(torch.uint8)


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """x flattened and zero-padded into (n_blocks, block_size)."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)                                       # (B, block)


def quantize_blockwise(x: Tensor, qmap: Tensor, block_size: int = 2048) -> tuple[Tensor, Tensor]:
    """uint8 codes (x.numel(),) and float32 per-block absmax (ceil(numel / block_size),) of `x`.

    Each block is divided by its absmax (an all-zero block by 1) and mapped to the nearest code.
    """
    n = x.numel()
    blocks = _blocks(x.detach().float(), block_size)                      # (B, block)
    absmax = blocks.abs().amax(dim=1)                                     # (B,)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = quantize_to_map((blocks / safe[:, None]).clamp_(-1, 1), qmap.float())  # (B, block)
    return codes.reshape(-1)[:n].clone(), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, qmap: Tensor, block_size: int = 2048) -> Tensor:
    """float32 values (codes.numel(),) from `quantize_blockwise`'s codes and absmax."""
    n = codes.numel()
    values = qmap.float()[codes.long()]                                   # (n,)
    scale = absmax.float().repeat_interleave(block_size)[:n]              # (n,)
    return values * scale


def blockwise_bytes(numel: int, block_size: int = 2048) -> int:
    """Bytes one block-quantized state of `numel` elements takes: 1 byte a code + 4 per block absmax.

    >>> blockwise_bytes(4096), blockwise_bytes(4097)
    (4104, 4109)
    """
    return numel + 4 * math.ceil(numel / block_size)
