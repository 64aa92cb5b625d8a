"""The `cluster` stage: weight sharing by k-means (`merge` turns clustered layers back into plain ones).

    model = nncompress.apply(model, ClusterConfig(bits=4), targets=Targets(types=("Conv1d", "Linear")))
    model = nncompress.apply(model, FinetuneConfig(epochs=2), context=Context(data=data))  # trains centroids

Each targeted Linear / Conv weight becomes 2^bits shared values (one codebook per layer, or per
output channel) held by a `ClusteredLayer`; with `keep_zeros` pruned zeros are not clustered and
stay an exact extra value, so the layer keeps 2^bits - 1 nonzero centroids plus zero (still b-bit
indices). A `finetune` stage after it trains the centroids (gradients pooled per cluster), never the
assignment. What a layer costs is recorded: b-bit packed indices plus the codebook, and the same
indices Huffman-coded (canonical code, so the table is one length byte per symbol), whose difference
is the further saving of entropy coding (Deep Compression's third step; reported, not written).

Storage on disk: the checkpoint stores each layer's centroids and its assignment (the centroid index
of every weight, 0 for a pruned zero) packed at b bits, per layer or per channel alike; after pruning,
a 1-bit mask of the nonzeros comes first and only their indices follow. `packed_bytes` in the record
is that cost computed; the bytes on disk are measured by the report.

The layers are recorded as swaps (their codebook shapes); the codebook and the assignment come from
the checkpoint on load (see `ClusteredLayer`). A quantized or int8 layer is clustered from its values.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn as nn

from ..core import Config, ConfigError, Context, Site, check, layer_transform
from .clustered import CLUSTERABLE, ClusteredLayer
from .kmeans import huffman_bits, huffman_lengths, index_bits


@dataclasses.dataclass(frozen=True)
class ClusterConfig(Config):
    """Weight sharing by k-means (Deep Compression).

    bits:        index width b; each codebook has 2^b values (zero included when keep_zeros)
    granularity: layer (one codebook per layer) | channel (one per output channel)
    init:        linear (evenly spaced over [min, max]; Deep Compression's best) | density | random
    keep_zeros:  leave exact zeros (pruned weights) out of the clustering; they stay exactly zero
    iters:       at most this many Lloyd rounds (it stops earlier at a fixed point)
    seed:        for init: random
    """

    bits: int = 4
    granularity: Literal["layer", "channel"] = "layer"
    init: Literal["linear", "density", "random"] = "linear"
    keep_zeros: bool = True
    iters: int = 100
    seed: int = 0

    def __post_init__(self):
        check(1 <= self.bits <= 8, "bits", f"must be in [1, 8] (at most 256 shared values), got {self.bits}")
        check(self.iters >= 1, "iters", f"must be >= 1, got {self.iters}")


def _tied(model: nn.Module) -> set[int]:
    """ids of parameters used by more than one module (tied embeddings): clustering would rewrite both."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return {k for k, n in uses.items() if n > 1}


def layer_cost(layer: ClusteredLayer) -> dict[str, Any]:
    """What a clustered layer's weight costs, in bytes, three ways:

    packed_bytes:  b-bit indices of every weight plus the float codebook (b counts the zero slot as a
                   value only when the layer uses it): what the checkpoint's codebook codec writes
    sparse_bytes:  a 1-bit nonzero mask plus indices of the nonzeros only, plus the codebook (equal to
                   packed_bytes for a layer without zeros)
    huffman_bytes: every index Huffman-coded (zero is a symbol), plus the codebook and one code-length
                   byte per used symbol (a canonical code is rebuilt from its lengths)
    """
    assign = layer.assignment  # (G, R), 0 = the zero slot
    k, numel = layer.k, assign.numel()
    uses_zero = bool((assign == 0).any())
    bits = index_bits(k + int(uses_zero))
    codebook = layer.centroids.numel() * layer.centroids.element_size()
    counts = torch.bincount(assign.reshape(-1), minlength=k + 1).tolist()
    used = sum(1 for c in counts if c)
    packed = math.ceil(numel * bits / 8) + codebook
    # a 1-bit nonzero mask plus index_bits(k)-bit indices of the nonzeros only
    sparse = math.ceil(numel / 8) + math.ceil((numel - counts[0]) * index_bits(k) / 8) + codebook
    huff_bits = huffman_bits(assign, k + 1)
    huffman = math.ceil(huff_bits / 8) + codebook + used
    return {"k": k, "groups": layer.groups, "bits": bits, "numel": numel, "zeros": counts[0],
            "packed_bytes": packed, "sparse_bytes": sparse if counts[0] else packed, "huffman_bytes": huffman,
            "huffman_bits_per_weight": round(huff_bits / max(numel, 1), 4),
            "max_code_length": max(huffman_lengths(counts))}


@layer_transform("cluster", config=ClusterConfig, layers=CLUSTERABLE, on_wrapped="merge", what="Linear/Conv")
def _cluster(model: nn.Module, config: ClusterConfig, ctx: Context, sites: list[Site]) -> nn.Module:
    """Share weights: k-means each targeted Linear / Conv weight into 2^bits values."""
    skipped: dict[str, str] = {}
    tied = _tied(model)
    gen = torch.Generator().manual_seed(config.seed)
    records: dict[str, dict[str, Any]] = {}
    for site in sites:
        layer = site.layer
        if id(layer.weight) in tied:
            skipped[site.name] = "weight tied to another module"
            continue
        w = layer.weight.detach()
        has_zeros = config.keep_zeros and bool((w == 0).any())
        k = 2 ** config.bits - int(has_zeros)  # the zero value takes one of the 2^b indices
        if config.granularity == "layer":
            distinct = int(torch.unique(w[w != 0] if config.keep_zeros else w).numel())
            k = max(1, min(k, distinct))  # a tiny layer with fewer values than clusters keeps them all
        wrapped = ClusteredLayer.from_layer(layer, k, config.granularity, config.init, config.keep_zeros,
                                            config.iters, gen).to(w.device)
        site.replace(wrapped)
        records[site.name] = layer_cost(wrapped)
    if not records:
        raise ConfigError("targets", f"no Linear or Conv layer to cluster (skipped: {skipped}); widen targets")
    total = {key: sum(r[key] for r in records.values())
             for key in ("numel", "packed_bytes", "sparse_bytes", "huffman_bytes")}
    ctx.record.update(layers=records, **total, huffman_saved_bytes=total["packed_bytes"] - total["huffman_bytes"])
    if skipped:
        ctx.record["skipped"] = skipped
    ctx.log(f"cluster: {len(records)} layers, {total['packed_bytes']:,} bytes packed, "
            f"{total['huffman_bytes']:,} with Huffman")
    return sites[0].model
