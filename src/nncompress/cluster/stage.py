"""The `cluster` stage (weight sharing by k-means) and `merge_clusters` (back to plain layers).

    model = nncompress.apply(model, ClusterConfig(bits=4), targets=Targets(types=("Conv1d", "Linear")))
    model = nncompress.apply(model, FinetuneConfig(epochs=2), context=Context(data=data))  # trains centroids

Each targeted Linear / Conv weight becomes 2^bits shared values (one codebook per layer, or per
output channel) held by a `ClusteredLayer`; with `keep_zeros` pruned zeros are not clustered and
stay an exact extra value, so the layer keeps 2^bits - 1 nonzero centroids plus zero (still b-bit
indices). A `finetune` stage after it trains the centroids (gradients pooled per cluster), never the
assignment. What a layer costs is recorded: b-bit packed indices plus the codebook, and the same
indices Huffman-coded (canonical code, so the table is one length byte per symbol), whose difference
is the further saving of entropy coding (Deep Compression's third step; reported, not written).

Storage on disk: per-layer codebooks come out at b bits per weight through the checkpoint's
codebook codec (<= 256 distinct values per tensor). Per-channel codebooks give G * 2^b distinct
values per tensor, which that codec only takes when G * 2^b <= 256; beyond, the checkpoint falls back
to the generic codecs (bitmask / dense) and `packed_bytes` in the record is what a per-row codebook
codec would write. Zeros are kept so that the bitmask codec could compose with the codebook one.

On load the stage replays from its record (the layer names and codebook shapes); the codebook and
the assignment come from the checkpoint (see `ClusteredLayer`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn as nn

from ..core import Config, ConfigError, Context, check, register
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


@dataclasses.dataclass(frozen=True)
class MergeClustersConfig(Config):
    """No options: every `ClusteredLayer` becomes its plain layer with the shared weights."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule `name` (dotted) by `new`; returns the model (`new` itself for name "")."""
    if not name:
        return new
    parent, _, attr = name.rpartition(".")
    setattr(get_module(model, parent), attr, new)
    return model


def clusterable_layers(model: nn.Module, ctx: Context, skipped: dict[str, str]) -> dict[str, nn.Module]:
    """The targeted Linear / Conv layers that are not already clustered (nor inside a wrapper);
    layers whose weight is tied to another module's land in `skipped` (clustering would rewrite both)."""
    inside = {id(m.base) for m in model.modules() if isinstance(m, ClusteredLayer)}
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    layers = {}
    for name, m in ctx.targets.select(model):
        if not isinstance(m, CLUSTERABLE) or id(m) in inside or isinstance(m, ClusteredLayer):
            continue
        if uses.get(id(m.weight), 0) > 1:
            skipped[name] = "weight tied to another module"
            continue
        layers[name] = m
    return layers


def layer_cost(layer: ClusteredLayer) -> dict[str, Any]:
    """What a clustered layer's weight costs, in bytes, three ways:

    packed_bytes:  b-bit indices of every weight plus the float codebook (b counts the zero slot as a
                   value only when the layer uses it): what the checkpoint's codebook codec writes
    sparse_bytes:  a 1-bit nonzero mask plus indices of the nonzeros only, plus the codebook (equal to
                   packed_bytes for a layer without zeros)
    huffman_bytes: every index Huffman-coded (zero is a symbol), plus the codebook and one code-length
                   byte per used symbol (a canonical code is rebuilt from its lengths)
    """
    assign = layer.assignment  # (G, R)
    k, numel = layer.k, assign.numel()
    uses_zero = bool((assign == k).any())
    bits = index_bits(k + int(uses_zero))
    codebook = layer.centroids.numel() * layer.centroids.element_size()
    counts = torch.bincount(assign.reshape(-1), minlength=k + 1).tolist()
    used = sum(1 for c in counts if c)
    packed = math.ceil(numel * bits / 8) + codebook
    # a 1-bit nonzero mask plus index_bits(k)-bit indices of the nonzeros only
    sparse = math.ceil(numel / 8) + math.ceil((numel - counts[k]) * index_bits(k) / 8) + codebook
    huff_bits = huffman_bits(assign, k + 1)
    huffman = math.ceil(huff_bits / 8) + codebook + used
    return {"k": k, "groups": layer.groups, "bits": bits, "numel": numel, "zeros": counts[k],
            "packed_bytes": packed, "sparse_bytes": sparse if counts[k] else packed, "huffman_bytes": huffman,
            "huffman_bits_per_weight": round(huff_bits / max(numel, 1), 4),
            "max_code_length": max(huffman_lengths(counts))}


@register("cluster", config=ClusterConfig)
def cluster(model: nn.Module, config: ClusterConfig, ctx: Context) -> nn.Module:
    """Share weights: k-means each targeted Linear / Conv weight into 2^bits values."""
    if ctx.replay:
        for name, info in ctx.record.get("layers", {}).items():
            model = set_module(model, name, ClusteredLayer.empty(get_module(model, name), info["k"], info["groups"]))
        return model
    skipped: dict[str, str] = {}
    layers = clusterable_layers(model, ctx, skipped)
    if not layers:
        raise ConfigError("targets", "no Linear or Conv layer to cluster (already clustered ones are skipped"
                          + (f"; skipped: {skipped}" if skipped else "") + "); widen targets, e.g. "
                          "types: [Linear, Conv1d]")
    gen = torch.Generator().manual_seed(config.seed)
    records: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        w = layer.weight.detach()
        has_zeros = config.keep_zeros and bool((w == 0).any())
        k = 2 ** config.bits - int(has_zeros)  # the zero value takes one of the 2^b indices
        if config.granularity == "layer":
            distinct = int(torch.unique(w[w != 0] if config.keep_zeros else w).numel())
            k = max(1, min(k, distinct))  # a tiny layer with fewer values than clusters keeps them all
        wrapped = ClusteredLayer.from_layer(layer, k, config.granularity, config.init, config.keep_zeros,
                                            config.iters, gen).to(w.device)
        model = set_module(model, name, wrapped)
        records[name] = layer_cost(wrapped)
    total = {key: sum(r[key] for r in records.values())
             for key in ("numel", "packed_bytes", "sparse_bytes", "huffman_bytes")}
    ctx.record.update(layers=records, **total, huffman_saved_bytes=total["packed_bytes"] - total["huffman_bytes"])
    if skipped:
        ctx.record["skipped"] = skipped
    ctx.log(f"cluster: {len(records)} layers, {total['packed_bytes']:,} bytes packed, "
            f"{total['huffman_bytes']:,} with Huffman")
    return model


@register("merge_clusters", config=MergeClustersConfig)
def merge_clusters(model: nn.Module, config: MergeClustersConfig | None = None, ctx: Context | None = None
                   ) -> nn.Module:
    """Replace every `ClusteredLayer` by its plain layer with the shared weights (same outputs)."""
    for name in [n for n, m in model.named_modules() if isinstance(m, ClusteredLayer)]:
        model = set_module(model, name, get_module(model, name).merge())
    return model
