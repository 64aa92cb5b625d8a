"""Huffman coding of symbol streams (Deep Compression's last stage, seed 003): the indices of a
codebook, or the integer codes of a quantized weight, stored in as many bits as their frequencies
call for rather than a fixed ceil(log2 K) each.

Canonical codes, at most `MAX_BITS` long (frequencies are flattened until they fit), so a decoder
needs only each symbol's code length. The stream is decoded in chunks of `chunk` symbols whose
starting bit offsets are stored, one table lookup per symbol for all chunks at once (numpy), so a
stream of millions of symbols decodes in a fraction of a second. `encode` says how many bytes that
costs; the checkpoint writer keeps the Huffman stream only when it is smaller than the fixed-width one.

>>> import numpy as np
>>> sym = np.array([0] * 90 + [1] * 6 + [2] * 3 + [3], dtype=np.int64)
>>> parts, meta = encode(sym, 4)
>>> code_lengths(np.bincount(sym)).tolist(), meta["bits_total"]      # the frequent symbol gets 1 bit
([1, 2, 3, 3], 114)
>>> bool((decode(parts, meta, sym.size) == sym).all())
True
"""
from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np
import torch

from .packing import pack, unpack

MAX_BITS = 15  # longest code: lengths fit 4 bits, and the decode table has 2**15 entries at most

__all__ = ["code_lengths", "encode", "decode", "nbytes", "MAX_BITS"]


def code_lengths(counts: np.ndarray, max_bits: int = MAX_BITS) -> np.ndarray:
    """Huffman code length of each symbol (0 for a symbol that never occurs), none above `max_bits`.

    >>> code_lengths(np.array([5, 0, 1, 1])).tolist()
    [1, 0, 2, 2]
    """
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.int64)
    if used.size <= 1:
        lengths[used] = 1
        return lengths
    weights = counts[used].astype(np.float64)
    shift = max_bits - 2
    while True:
        heap = [(w, i, (i,)) for i, w in enumerate(weights)]
        heapq.heapify(heap)
        depth = np.zeros(used.size, dtype=np.int64)
        tie = used.size
        while len(heap) > 1:
            w1, _, a = heapq.heappop(heap)
            w2, _, b = heapq.heappop(heap)
            members = a + b
            depth[list(members)] += 1
            heapq.heappush(heap, (w1 + w2, tie, members))
            tie += 1
        if depth.max() <= max_bits:
            lengths[used] = depth
            return lengths
        # too deep: raise the rare symbols' weights to a floor, higher each retry; at shift 0 every weight
        # is equal and the depth is ceil(log2(symbols)), so this ends
        shift = max(shift - 1, 0)
        weights = np.maximum(weights, weights.max() / 2 ** shift)


def _canonical(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of each symbol: shorter codes first, ties by symbol order."""
    codes = np.zeros(lengths.size, dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


def _chunk(n: int) -> int:
    """Symbols per independently decodable chunk: ~4 sqrt(n), so offsets cost little and the
    decoder's loop (one step per symbol of a chunk) stays short."""
    return int(min(8192, max(256, 4 * math.isqrt(max(n, 1)))))


def encode(symbols: np.ndarray, k: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Huffman-code `symbols` (integers in [0, k)): parts `lengths` (each symbol's code length, 4 bits,
    up to the last symbol used), `stream` uint8 and `offsets` (chunks,) int64 (each chunk's first bit),
    and meta {"symbols", "chunk", "bits_total"}."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    lengths = code_lengths(np.bincount(symbols, minlength=k))
    codes = _canonical(lengths)
    n, chunk = symbols.size, _chunk(symbols.size)
    sym_len = lengths[symbols]
    ends = np.cumsum(sym_len)
    starts = ends - sym_len
    offsets = starts[::chunk].copy()
    total = int(ends[-1]) if n else 0
    bits = np.zeros(total, dtype=np.uint8)
    step = 1 << 20  # symbols expanded to bits a million at a time
    for lo in range(0, n, step):
        s, ln, st = symbols[lo:lo + step], sym_len[lo:lo + step], starts[lo:lo + step]
        owner = np.repeat(np.arange(s.size), ln)  # the symbol each bit belongs to
        within = np.arange(owner.size) - (st - st[0])[owner] if owner.size else owner
        bits[st[0]:st[0] + owner.size] = (codes[s][owner] >> (ln[owner] - 1 - within)) & 1
    stream = np.packbits(bits)
    symbols_used = int(np.flatnonzero(lengths).max()) + 1 if n else 0
    parts = {"lengths": pack(torch.from_numpy(lengths[:symbols_used]), 4), "stream": torch.from_numpy(stream),
             "offsets": torch.from_numpy(offsets.astype(np.int64))}
    return parts, {"symbols": symbols_used, "chunk": chunk, "bits_total": total}


def nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in parts.values())


def decode(parts: dict[str, torch.Tensor], meta: dict[str, Any], n: int) -> np.ndarray:
    """The `n` symbols `encode` stored (int64). A malformed stream (code lengths that no Huffman code
    has, offsets or sizes that do not fit) raises ValueError rather than reading past it."""
    lengths = unpack(parts["lengths"], 4, int(meta["symbols"])).numpy().astype(np.int64)
    chunk, end = int(meta["chunk"]), int(meta["bits_total"])
    offsets = parts["offsets"].numpy().astype(np.int64)
    used = lengths[lengths > 0]
    if (not used.size or used.max() > MAX_BITS or float(np.sum(2.0 ** -used)) > 1.0 or chunk < 1
            or offsets.size != -(-n // chunk) or parts["stream"].numel() != -(-end // 8)
            or (offsets.size and (offsets.min() < 0 or offsets.max() > end))):
        raise ValueError("Huffman stream: code lengths, chunk offsets or sizes are inconsistent")
    codes = _canonical(lengths)
    width = int(lengths.max())
    table_sym = np.zeros(1 << width, dtype=np.int64)
    table_len = np.zeros(1 << width, dtype=np.int64)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (width - int(lengths[s]))
        hi = (int(codes[s]) + 1) << (width - int(lengths[s]))
        table_sym[lo:hi], table_len[lo:hi] = s, lengths[s]
    table_len[table_len == 0] = 1  # a window no code starts (an incomplete code's gap): step on, never stall
    stream = np.concatenate([parts["stream"].numpy(), np.zeros(4, dtype=np.uint8)]).astype(np.uint32)
    pos = offsets.copy()
    out = np.zeros((pos.size, chunk), dtype=np.int64)
    for i in range(min(chunk, n)):
        np.minimum(pos, end, out=pos)  # the last chunk runs out first: it reads padding, discarded below
        byte = pos >> 3
        word = (stream[byte] << 16) | (stream[byte + 1] << 8) | stream[byte + 2]  # 24 bits from the byte
        window = (word >> (24 - width - (pos & 7))) & ((1 << width) - 1)
        out[:, i] = table_sym[window]
        pos += table_len[window]
    return out.reshape(-1)[:n]
