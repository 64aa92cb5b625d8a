"""Compact, exact tensor storage: bytes on disk follow sparsity and the number of distinct values.

Each tensor is stored with whichever codec makes it smallest while decoding to exactly the same
values (checked at encode time):

- `dense`:    as is.
- `bitmask`:  one bit per element saying "nonzero", then the nonzero values (unstructured sparsity);
              when the nonzeros have few distinct values (pruned, then clustered or quantized) they
              are themselves a codebook plus packed indices, so the two savings compose.
- `nm`:       N:M sparsity along the last dim: the kept values plus which positions each group of M
              keeps, as one of the C(M, N) combinations (2:4: 2 values and a 3-bit choice of 6 per 4 weights).
- `codebook`: at most 256 distinct values (quantized or clustered weights): the codebook plus
              packed b-bit indices, b = ceil(log2(K)).
- `int_codes`: a quantized weight given with a hint (see `encode_int_codes`): packed b-bit integer
              codes; the scale / zero point are other tensors of the state (named) or stored beside.

Every stream of small integers in these (a codebook's indices, the nonzeros' indices, integer codes,
the bytes of a sparsity mask) is Huffman-coded instead of fixed-width when that is smaller
(`formats.huffman`; Deep Compression's last stage): the bytes on disk follow the entropy of the
weights, and decoding gives back the same values bit for bit.

>>> import torch
>>> w = torch.zeros(64, 64); w[::8] = torch.randn(8, 64)
>>> parts, meta = encode_tensor(w)
>>> meta["codec"], torch.equal(decode_tensor(parts, meta), w)
('bitmask', True)
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from ..formats import huffman
from ..formats.granularity import PerChannel, PerGroup, PerTensor, expand_scale
from ..formats.packing import pack, unpack

MIN_NUMEL = 256  # below this the bookkeeping costs more than it saves
MIN_HUFFMAN = 1024  # symbols below which a Huffman stream is not tried (its table and offsets cost more)


def _stream(name: str, symbols: torch.Tensor, bits: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Integers in [0, 2**bits) (or signed ones, as pack stores them) as parts named `name...`: packed
    `bits` wide, or Huffman-coded when that is smaller (meta then holds `{name}_huffman`)."""
    fixed = {name: pack(symbols, bits)}
    if symbols.numel() < MIN_HUFFMAN or bits < 2:
        return fixed, {}
    unsigned = (symbols.reshape(-1).long() & ((1 << bits) - 1)).numpy()
    parts, meta = huffman.encode(unsigned, 1 << bits)
    if huffman.nbytes(parts) >= _nbytes(fixed[name]):
        return fixed, {}
    return {f"{name}_{k}": v for k, v in parts.items()}, {f"{name}_huffman": meta}


def _unstream(parts: dict[str, torch.Tensor], meta: dict[str, Any], name: str, bits: int, numel: int,
              signed: bool = False) -> torch.Tensor:
    """The `numel` integers `_stream` stored (int32; sign-extended when `signed`)."""
    coded = meta.get(f"{name}_huffman")
    if coded is None:
        return unpack(parts[name], bits, numel, signed=signed)
    sym = torch.from_numpy(huffman.decode({k: parts[f"{name}_{k}"] for k in ("lengths", "stream", "offsets")},
                                          coded, numel)).to(torch.int32)
    if sym.numel() != numel or (sym.numel() and int(sym.max()) >= 1 << bits):
        raise ValueError(f"{name}: its Huffman stream decodes to codes outside {bits} bits")
    return torch.where(sym >= 1 << (bits - 1), sym - (1 << bits), sym) if signed else sym


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def encode_tensor(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The smallest exact encoding of `t`: (named parts, metadata)."""
    t = t.detach().contiguous().cpu()
    dense = ({"data": t}, {"codec": "dense"})
    if t.dtype == torch.bool or t.is_complex() or t.numel() < MIN_NUMEL:
        return dense  # integer tensors (a clustered layer's assignment) pack like float ones
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


def decode_tensor(parts: dict[str, torch.Tensor], meta: dict[str, Any],
                  resolve: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Inverse of `encode_tensor`; `resolve` maps the state names an `int_codes` tensor refers to
    (its scale, zero point) to their decoded values."""
    codec = meta["codec"]
    if codec == "dense":
        return parts["data"]
    shape, dtype = tuple(meta["shape"]), getattr(torch, meta["dtype"])
    numel = math.prod(shape)
    if codec == "bitmask":
        mask_bytes = _unstream(parts, meta, "mask", 8, -(-numel // 8)).to(torch.uint8)  # Huffman over its bytes
        mask = unpack(mask_bytes, 1, numel).bool()
        out = torch.zeros(numel, dtype=dtype)
        if "values_codebook" in parts:  # the nonzeros as a codebook (clustered or quantized after pruning)
            idx = _unstream(parts, meta, "values_index", meta["values_bits"], int(mask.sum())).long()
            out[mask] = parts["values_codebook"][idx].to(dtype)
        else:
            out[mask] = parts["values"]
        return out.view(shape)
    if codec == "nm":
        n, m = meta["n"], meta["m"]
        if "combo_bits" in meta:
            ids = _unstream(parts, meta, "combo", meta["combo_bits"], numel // m).long()
            combos = _combinations(m, n)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= combos.shape[0]):
                raise ValueError(f"nm: position codes outside the {combos.shape[0]} combinations of {n} in {m}")
            pos = combos[ids]  # (G, N)
        else:  # files written before combinations: each position packed on its own
            pos = unpack(parts["index"], meta["bits"], numel // m * n).long().view(-1, n)
        out = torch.zeros(numel // m, m, dtype=dtype)  # (G, M)
        out.scatter_(1, pos, parts["values"].view(-1, n))
        return out.view(shape)
    if codec == "codebook":
        idx = _unstream(parts, meta, "index", meta["bits"], numel).long()
        return parts["codebook"][idx].to(dtype).view(shape)
    if codec == "int_codes":
        return decode_int_codes(parts, meta, resolve or {})
    raise ValueError(f"unknown codec {codec!r}")


def _bitmask(t: torch.Tensor):
    flat = t.reshape(-1)
    nz = flat != 0
    if nz.all():
        return None
    values = flat[nz].clone()
    parts, meta = _stream("mask", pack(nz.to(torch.uint8), 1), 8)  # the mask's bytes: Huffman when sparse enough
    meta["codec"] = "bitmask"
    coded = _codebook(values, "values_index") if values.numel() else None  # pruned then clustered / quantized
    if coded is not None and sum(_nbytes(p) for p in coded[0].values()) < _nbytes(values):
        parts.update(values_codebook=coded[0].pop("codebook"), **coded[0])
        meta.update({k: v for k, v in coded[1].items() if k != "codec"}, values_bits=coded[1]["bits"])
        meta.pop("bits")
    else:
        parts["values"] = values
    return parts, meta


def _combinations(m: int, n: int) -> torch.Tensor:
    """Every choice of n positions out of m, ascending, in lexicographic order: (C(m, n), n)."""
    return torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.long).view(-1, n)


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
    # each group's kept positions as one of the C(m, n) combinations (2:4: 6, so 3 bits rather than 4;
    # Huffman-coded when the choice is uneven)
    combos = _combinations(m, n)
    lookup = torch.full((1 << m,), -1, dtype=torch.long)
    lookup[(1 << combos).sum(1)] = torch.arange(combos.shape[0])
    ids = lookup[(1 << pos).sum(1)]
    bits = max(1, math.ceil(math.log2(combos.shape[0])))
    index, meta = _stream("combo", ids, bits)
    return {"values": values.reshape(-1).clone(), **index}, {"codec": "nm", "n": n, "m": m, "combo_bits": bits, **meta}


def _codebook(t: torch.Tensor, index: str = "index"):
    flat = t.reshape(-1)
    # NaNs never compare equal, so a NaN-holding tensor stays dense
    if torch.isnan(flat).any():
        return None
    values, idx = torch.unique(flat, return_inverse=True)
    k = values.numel()
    if k > 256:
        return None
    if not values.is_floating_point() and values.abs().max() < 2 ** 15:
        values = values.to(torch.int16)  # integer codebooks (centroid indices) need few bits each
    bits = max(1, math.ceil(math.log2(k)))
    parts, meta = _stream(index, idx, bits)
    return {"codebook": values.clone(), **parts}, {"codec": "codebook", "bits": bits, **meta}


# ------------------------------------------------------------------------------------ int_codes

_GRANULARITY = {"per_tensor": PerTensor, "per_channel": PerChannel, "per_group": PerGroup}


def _last_in_group(shape2d: torch.Size, gran: Any) -> torch.Tensor:
    """Mask (O, R) of the last element of each group (where a binary `fix` value replaces alpha)."""
    mask = torch.zeros(tuple(shape2d), dtype=torch.bool)
    if isinstance(gran, PerTensor):
        mask[-1, -1] = True
    elif isinstance(gran, PerChannel):
        mask[:, -1] = True
    else:
        mask[:, gran.size - 1::gran.size] = True
    return mask


def _refs(hint: dict[str, Any]) -> list[str]:
    return [v for v in (hint.get("scale"), hint.get("zero_point")) if isinstance(v, str)]


def encode_int_codes(hint: dict[str, Any], state: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Packed integer codes for a quantized weight, or None when they would not decode exactly.

    The hint (from a technique's "storage_hints" provider, e.g. `quant.storage`) holds:
    codes (int, the weight's shape), bits, signed, kind ("affine": (c - z) * s; "binary": (2c - 1) * s),
    scale and zero_point (a state name, a tensor stored beside as a part, or None for zero point 0),
    for binary optionally fix (per group: the magnitude of the group's last element),
    granularity ({kind, axis, size} over the 2-D view (out, rest)), and values: the exact tensor
    the decode must give back (what is stored in place of the float weight).

    >>> s = torch.full((4, 1), 0.5)
    >>> codes = torch.randint(-8, 8, (4, 64), dtype=torch.int32)
    >>> hint = {"codes": codes, "bits": 4, "signed": True, "kind": "affine", "scale": "s", "zero_point": None,
    ...         "granularity": {"kind": "per_channel", "axis": 0}, "values": codes * s}
    >>> parts, meta = encode_int_codes(hint, {"s": s})
    >>> parts["codes"].numel(), torch.equal(decode_tensor(parts, meta, {"s": s}), codes * s)
    (128, True)
    """
    values = hint["values"].detach().contiguous().cpu()
    if not 1 <= hint["bits"] <= 8 or any(r not in state for r in _refs(hint)):
        return None
    parts, coded = _stream("codes", hint["codes"].cpu(), hint["bits"])
    meta: dict[str, Any] = {**coded, "codec": "int_codes", "bits": hint["bits"], "signed": bool(hint["signed"]),
                            "kind": hint.get("kind", "affine"), "granularity": hint["granularity"],
                            "shape": list(values.shape), "dtype": str(values.dtype).removeprefix("torch.")}
    for key in ("scale", "zero_point", "fix"):
        ref = hint.get(key)
        if isinstance(ref, str):
            meta[key] = ref
        elif isinstance(ref, torch.Tensor):
            parts[key] = ref.detach().contiguous().cpu()
    resolve = {r: state[r].detach().cpu() for r in _refs(hint)}
    if not torch.equal(decode_int_codes(parts, meta, resolve), values):
        return None  # the caller falls back to the other codecs on the original tensor
    return parts, meta


def decode_int_codes(parts: dict[str, torch.Tensor], meta: dict[str, Any],
                     resolve: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor `encode_int_codes` stored: unpack, then (c - z) * s or (2c - 1) * s."""
    shape, dtype = tuple(meta["shape"]), getattr(torch, meta["dtype"])
    numel = math.prod(shape)
    rows = shape[0] if len(shape) > 1 else 1
    codes = _unstream(parts, meta, "codes", meta["bits"], numel, signed=meta["signed"]).view(rows, -1)  # (O, I*k)
    g = dict(meta["granularity"])
    gran = _GRANULARITY[g.pop("kind")](**g)

    def operand(key: str) -> torch.Tensor | None:
        ref = meta.get(key)
        t = resolve[ref] if isinstance(ref, str) else parts.get(key)
        return None if t is None else expand_scale(t, gran, codes.shape)

    scale, zero = operand("scale"), operand("zero_point")
    if meta["kind"] == "binary":
        out = (2 * codes - 1) * scale
        fix = operand("fix")
        if fix is not None:
            out = torch.where(_last_in_group(codes.shape, gran), (2 * codes - 1) * fix, out)
    else:
        out = (codes - (0 if zero is None else zero)) * scale
    return out.to(dtype).view(shape)
