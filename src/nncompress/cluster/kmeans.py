"""The maths of weight sharing: 1-D k-means, clustering a weight into a codebook, Huffman code lengths.

Deep Compression (Han et al., 2016) replaces each layer's weights by k shared values: k-means on
the scalar weights, then the weight is `codebook[index]` with b = log2(k) bit indices. In one
dimension Lloyd's algorithm is cheap (assignment is a `searchsorted` on the midpoints between sorted
centroids) and the paper's finding is that a *linear* initialisation (evenly spaced between min and
max) beats density (quantile) and random (Forgy) ones, because it keeps a few centroids on the rare
large weights, which matter most.

>>> import torch
>>> x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 2.0, 2.5])
>>> c, a = kmeans_1d(x, 3)
>>> c.tolist(), a.tolist()
([-0.75, 0.25, 2.25], [0, 0, 1, 1, 2, 2])
>>> huffman_bits(torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 3]))  # lengths 1, 2, 3, 3
15
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..formats.huffman import code_lengths

Init = Literal["linear", "density", "random"]


def init_centroids(x: Tensor, k: int, init: Init = "linear", generator: torch.Generator | None = None) -> Tensor:
    """k starting centroids for the values `x` (1-D): linear (evenly spaced over [min, max]),
    density (evenly spaced quantiles of x) or random (k distinct samples of x, Forgy).

    >>> init_centroids(torch.tensor([0.0, 1.0, 4.0]), 3).tolist()
    [0.0, 2.0, 4.0]
    >>> init_centroids(torch.tensor([0.0, 1.0, 4.0]), 3, "density").tolist()
    [0.0, 1.0, 4.0]
    """
    if init == "linear":
        return torch.linspace(float(x.min()), float(x.max()), k, dtype=x.dtype)
    if init == "density":
        s = x.sort().values
        pos = torch.linspace(0, x.numel() - 1, k, dtype=torch.float64).round().long()
        return s[pos].clone()
    if init == "random":
        idx = torch.randperm(x.numel(), generator=generator)[:k]
        c = x[idx]
        if c.numel() < k:  # fewer values than clusters: the extra ones stay empty
            c = torch.cat([c, c[-1:].expand(k - c.numel())])
        return c.clone()
    raise ValueError(f"unknown init {init!r}; use linear, density or random")


def nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid of every value (ties to the smaller centroid): (n,) int64."""
    c, order = centroids.sort()
    mids = (c[1:] + c[:-1]) / 2  # (k-1,) decision boundaries
    return order[torch.searchsorted(mids, x.contiguous())]


def kmeans_1d(values: Tensor, k: int, init: Init = "linear", iters: int = 100,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on scalars, in float64: (centroids (k,), assignment (n,) int64).

    Stops when the assignment no longer changes (a fixed point: every value sits with its nearest
    centroid and every non-empty centroid is the mean of its values) or after `iters` rounds. An empty
    cluster keeps its centroid. Centroids come back in the dtype of `values`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = values.detach().reshape(-1).double()  # (n,)
    if x.numel() == 0:
        return torch.zeros(k, dtype=values.dtype), torch.zeros(0, dtype=torch.long)
    c = init_centroids(x, k, init, generator)  # (k,)
    assign = nearest(x, c)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=k)  # (k,)
        sums = torch.zeros(k, dtype=x.dtype).index_add_(0, assign, x)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        new = nearest(x, c)
        if torch.equal(new, assign):
            break
        assign = new
    return c.to(values.dtype), assign


def cluster_weight(w: Tensor, k: int, groups: int = 1, init: Init = "linear", keep_zeros: bool = True,
                   iters: int = 100, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Cluster each of `groups` equal slices of `w` (1: the whole tensor; w.shape[0]: per output
    channel) into k shared values: (centroids (G, k), assignment (G, numel / G) int64).

    keep_zeros: exact zeros (pruned weights) are not clustered; they get the index k, a zero slot
                outside the codebook, so they stay exactly zero and the pruning mask survives.
    The clustered weight is `torch.cat([centroids, zeros(G, 1)], 1).gather(1, assignment)`.

    >>> w = torch.tensor([[0.0, 1.0, 1.5], [0.0, -2.0, 0.0]])
    >>> c, a = cluster_weight(w, 2)
    >>> c.tolist(), a.tolist()
    ([[-2.0, 1.25]], [[2, 1, 1, 2, 0, 2]])
    """
    rows = w.detach().reshape(groups, -1)  # (G, R)
    centroids = torch.zeros(groups, k, dtype=w.dtype)
    assign = torch.full(rows.shape, k, dtype=torch.long)  # (G, R), k = the zero slot
    for g in range(groups):
        keep = rows[g] != 0 if keep_zeros else torch.ones_like(rows[g], dtype=torch.bool)
        c, a = kmeans_1d(rows[g][keep], k, init, iters, generator)
        centroids[g], assign[g, keep] = c, a
    return centroids, assign


def huffman_lengths(counts: list[int]) -> list[int]:
    """Code length of each symbol in a Huffman code for these frequencies (0 for unused symbols;
    a lone used symbol still takes 1 bit): the code the checkpoint writer stores (`formats.huffman`).

    >>> huffman_lengths([5, 2, 1, 1, 0])
    [1, 2, 3, 3, 0]
    """
    return code_lengths(np.asarray(counts, dtype=np.int64)).tolist()


def huffman_bits(indices: Tensor, num_symbols: int | None = None) -> int:
    """Total bits of `indices` (non-negative ints) under the Huffman code of their own histogram."""
    counts = torch.bincount(indices.reshape(-1).long(), minlength=num_symbols or 0).tolist()
    return sum(c * n for c, n in zip(counts, huffman_lengths(counts), strict=True))


def index_bits(num_values: int) -> int:
    """Bits of a fixed-width index into `num_values` shared values (at least 1).

    >>> index_bits(16), index_bits(17), index_bits(1)
    (4, 5, 1)
    """
    return max(1, math.ceil(math.log2(max(num_values, 1))))
