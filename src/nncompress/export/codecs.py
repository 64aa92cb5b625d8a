"""Compact, exact tensor storage: bytes on disk follow sparsity and the number of distinct values.

Each tensor is stored with whichever codec makes it smallest while decoding to exactly the same
values (checked at encode time):

- `dense`:    as is.
- `bitmask`:  one bit per element saying "nonzero", then the nonzero values (unstructured sparsity).
- `nm`:       N:M sparsity along the last dim: the kept values plus packed positions inside each
              group of M (2:4: 2 values and two 2-bit indices per 4 weights).
- `codebook`: at most 256 distinct values (quantized or clustered weights): the codebook plus
              packed b-bit indices, b = ceil(log2(K)).

>>> import torch
>>> w = torch.zeros(64, 64); w[::8] = torch.randn(8, 64)
>>> parts, meta = encode_tensor(w)
>>> meta["codec"], torch.equal(decode_tensor(parts, meta), w)
('bitmask', True)
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..formats.packing import pack, unpack

MIN_NUMEL = 256  # below this the bookkeeping costs more than it saves


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def encode_tensor(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The smallest exact encoding of `t`: (named parts, metadata)."""
    t = t.detach().contiguous().cpu()
    dense = ({"data": t}, {"codec": "dense"})
    if not t.is_floating_point() or t.numel() < MIN_NUMEL:
        return dense
    candidates = [dense]
    for encode in (_nm, _bitmask, _codebook):  # on equal size, the 2:4 layout wins
        enc = encode(t)
        if enc is not None:
            candidates.append(enc)
    best = min(candidates, key=lambda c: sum(_nbytes(p) for p in c[0].values()))
    best[1].update(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))
    if best[1]["codec"] != "dense":
        assert torch.equal(decode_tensor(*best), t), best[1]  # internal invariant: encodings are exact
    return best


def decode_tensor(parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    codec = meta["codec"]
    if codec == "dense":
        return parts["data"]
    shape, dtype = tuple(meta["shape"]), getattr(torch, meta["dtype"])
    numel = math.prod(shape)
    if codec == "bitmask":
        mask = unpack(parts["mask"], 1, numel).bool()
        out = torch.zeros(numel, dtype=dtype)
        out[mask] = parts["values"]
        return out.view(shape)
    if codec == "nm":
        n, m = meta["n"], meta["m"]
        pos = unpack(parts["index"], meta["bits"], numel // m * n).long().view(-1, n)  # (G, N)
        out = torch.zeros(numel // m, m, dtype=dtype)  # (G, M)
        out.scatter_(1, pos, parts["values"].view(-1, n))
        return out.view(shape)
    if codec == "codebook":
        idx = unpack(parts["index"], meta["bits"], numel).long()
        return parts["codebook"][idx].view(shape)
    raise ValueError(f"unknown codec {codec!r}")


def _bitmask(t: torch.Tensor):
    flat = t.reshape(-1)
    nz = flat != 0
    if nz.all():
        return None
    return {"mask": pack(nz.to(torch.uint8), 1), "values": flat[nz].clone()}, {"codec": "bitmask"}


def _nm(t: torch.Tensor, n: int = 2, m: int = 4):
    if t.dim() < 2 or t.shape[-1] % m:
        return None
    groups = t.reshape(-1, m)  # (G, M)
    if ((groups != 0).sum(1) > n).any():
        return None
    # positions of the n kept slots per group: the nonzeros first, padded with zero slots
    order = torch.argsort((groups != 0).to(torch.int8), dim=1, descending=True, stable=True)[:, :n]
    pos = order.sort(dim=1).values  # (G, N)
    values = groups.gather(1, pos)  # (G, N)
    bits = max(1, math.ceil(math.log2(m)))
    return ({"values": values.reshape(-1).clone(), "index": pack(pos.reshape(-1), bits)},
            {"codec": "nm", "n": n, "m": m, "bits": bits})


def _codebook(t: torch.Tensor):
    flat = t.reshape(-1)
    # NaNs never compare equal, so a NaN-holding tensor stays dense
    if torch.isnan(flat).any():
        return None
    values, idx = torch.unique(flat, return_inverse=True)
    k = values.numel()
    if k > 256:
        return None
    bits = max(1, math.ceil(math.log2(k)))
    return {"codebook": values.clone(), "index": pack(idx, bits)}, {"codec": "codebook", "bits": bits}
