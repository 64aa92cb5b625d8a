"""Bit packing of b-bit codes into bytes, and back.

Layout: a little-endian bit stream. Code i occupies stream bits [i*b, (i+1)*b), its least
significant bit first, and stream bit j is bit (j % 8) of byte j // 8. So for b = 4 the first code
is the low nibble of byte 0 (the usual int4 layout), for b = 1 code i is bit i % 8 of byte i // 8,
and 3-bit codes run across byte boundaries (8 codes fill exactly 3 bytes). The result has exactly
ceil(numel * b / 8) bytes; the unused high bits of the last byte are 0.

Signed codes (e.g. int4 in [-8, 7]) are packed as b-bit two's complement; `unpack(...,
signed=True)` sign-extends them back.

>>> codes = torch.tensor([1, 2, 3, 15, 0])
>>> pack(codes, 4).tolist()
[33, 243, 0]
>>> unpack(pack(codes, 4), 4, 5).tolist()
[1, 2, 3, 15, 0]
>>> unpack(pack(torch.tensor([-8, -1, 7]), 4), 4, 3, signed=True).tolist()
[-8, -1, 7]
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.errors import ConfigError, DataError

_BYTE_BITS = torch.arange(8)  # bit positions inside a byte


def packed_size(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take: ceil(numel * bits / 8).

    >>> packed_size(10, 3)
    4
    """
    return math.ceil(numel * bits / 8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ConfigError("bits", f"pack works on 1..8-bit codes, got {bits}; use int16 storage for wider codes")


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes (any shape, flattened in row-major order) into a uint8 tensor.

    Codes must lie in [-2**(bits-1), 2**bits - 1]: unsigned b-bit values or signed ones
    (stored as two's complement).
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex():
        raise DataError(f"pack: codes must be an integer tensor, got {codes.dtype}; encode the values first")
    c = codes.reshape(-1).long()
    if c.numel() and (c.min() < -(2 ** (bits - 1)) or c.max() > 2 ** bits - 1):
        raise DataError(f"pack: codes in [{int(c.min())}, {int(c.max())}] do not fit in {bits} bits")
    c = c & (2 ** bits - 1)
    n = c.numel()
    if 8 % bits == 0:  # whole codes per byte: shift each into its slot and sum
        per = 8 // bits
        c = torch.nn.functional.pad(c, (0, -n % per))
        shifts = torch.arange(per, device=c.device) * bits
        return (c.view(-1, per) << shifts).sum(-1).to(torch.uint8)  # (ceil(n/per),)
    stream = (c.unsqueeze(-1) >> torch.arange(bits, device=c.device)) & 1     # (n, b): LSB first
    stream = torch.nn.functional.pad(stream.reshape(-1), (0, -(n * bits) % 8))  # (8 * bytes,)
    return (stream.view(-1, 8) << _BYTE_BITS.to(c.device)).sum(-1).to(torch.uint8)


def unpack(packed: Tensor, bits: int, numel: int, signed: bool = False) -> Tensor:
    """The first `numel` codes of a `pack`ed tensor, as int32 (sign-extended when `signed`)."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise DataError(f"unpack: expected a uint8 tensor from pack, got {packed.dtype}")
    need = packed_size(numel, bits)
    if packed.numel() < need:
        raise DataError(f"unpack: {numel} codes of {bits} bits need {need} bytes, got {packed.numel()}")
    p = packed.reshape(-1)[:need].long()
    if 8 % bits == 0:
        shifts = torch.arange(8 // bits, device=p.device) * bits
        c = ((p.unsqueeze(-1) >> shifts) & (2 ** bits - 1)).reshape(-1)[:numel]
    else:
        stream = ((p.unsqueeze(-1) >> _BYTE_BITS.to(p.device)) & 1).reshape(-1)[: numel * bits]
        c = (stream.view(numel, bits) << torch.arange(bits, device=p.device)).sum(-1)
    if signed:
        c = torch.where(c >= 2 ** (bits - 1), c - 2 ** bits, c)
    return c.to(torch.int32)
