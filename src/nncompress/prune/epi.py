"""The Early Pruning Indicator (Shen et al., "When to Prune?", CVPR 2022; seed 000).

Early in training a dominant sub-network (the top-k most important neurons or weights) forms and
stops moving; once it is stable, pruning can happen without waiting for the dense model to converge.
Between the sub-networks N_1, N_2 of two epochs the seed defines the stability

    Psi(N_1, N_2) = 1 - 1/L sum_l |n_(1,l) - n_(2,l)| / (n_(1,l) + n_(2,l))

over the L layers, and EPI_t = 1/r sum_{j=1..r} Psi(N_t, N_{t-j}). With n_l counting kept units per
layer, Psi only sees layer widths (always 1 when every layer keeps the same fraction); here the count
difference is taken as the set difference |N_1,l xor N_2,l| of the kept masks, which is at least the
count difference and equals it when one set contains the other: Psi is 1 for identical masks and 0
for disjoint ones. `distance` = 1 - Psi.

    epi = EarlyPruningIndicator(sparsity=0.5, threshold=0.02, patience=2)
    for epoch in range(epochs):
        fit(model, loader, loss_fn, TrainConfig(epochs=1))
        if epi(model).stable:
            break  # the sub-network has settled: prune now
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn as nn

from ..core import Targets
from .masks import global_masks, unstructured_mask

Masks = dict[str, torch.Tensor]


def mask_distance(a: Masks, b: Masks) -> float:
    """1 - Psi: the mean over layers of |A xor B| / (|A| + |B|) of the kept sets; 0 when identical,
    1 when disjoint.

    >>> m = {"fc": torch.tensor([True, True, False, False])}
    >>> mask_distance(m, m), mask_distance(m, {"fc": ~m["fc"]})
    (0.0, 1.0)
    """
    if set(a) != set(b):
        raise KeyError(f"masks of different layers: {sorted(set(a) ^ set(b))}")
    if not a:
        return 0.0
    terms = []
    for name in a:
        x, y = a[name].bool(), b[name].bool()
        kept = int(x.sum()) + int(y.sum())
        terms.append(int((x ^ y).sum()) / kept if kept else 0.0)
    return sum(terms) / len(terms)


def stability(a: Masks, b: Masks) -> float:
    """The seed's Psi(N_1, N_2) on kept sets: 1 - `mask_distance`."""
    return 1.0 - mask_distance(a, b)


def count_stability(a: Masks, b: Masks) -> float:
    """The seed's Psi taken literally, on kept counts per layer: 1 - 1/L sum |n_1 - n_2| / (n_1 + n_2).

    >>> count_stability({"fc": torch.tensor([True, False])}, {"fc": torch.tensor([False, True])})
    1.0
    """
    terms = []
    for name in a:
        n1, n2 = int(a[name].sum()), int(b[name].sum())
        terms.append(abs(n1 - n2) / (n1 + n2) if n1 + n2 else 0.0)
    return 1.0 - sum(terms) / max(len(terms), 1)


@dataclasses.dataclass(frozen=True)
class EPIStep:
    """What the indicator saw at one call.

    epoch:    calls so far (1 for the first)
    psi:      Psi(N_t, N_{t-1}) (1.0 at the first call)
    distance: 1 - psi
    epi:      EPI_t, the mean Psi to the last `window` sub-networks
    stable:   1 - epi has stayed below `threshold` for `patience` consecutive calls
    """

    epoch: int
    psi: float
    distance: float
    epi: float
    stable: bool


class EarlyPruningIndicator:
    """Callback for epoch ends: `indicator(model) -> EPIStep`.

    sparsity:    fraction of units outside the dominant sub-network
    granularity: channel (output neurons / filters ranked by the L2 norm of their weights, as the
                 paper does) | element (single weights by magnitude)
    scope:       layer (top-k within each layer) | global (one ranking over all layers)
    threshold, patience, window: stable once 1 - EPI_t < threshold for `patience` calls, EPI_t over
                 the last `window` sub-networks (the seed's r)

    >>> model = nn.Linear(8, 4)
    >>> epi = EarlyPruningIndicator(sparsity=0.5, patience=2)
    >>> [epi(model).stable for _ in range(3)]
    [False, False, True]
    """

    def __init__(self, sparsity: float = 0.5, granularity: Literal["channel", "element"] = "channel",
                 scope: Literal["layer", "global"] = "layer", threshold: float = 0.02, patience: int = 2,
                 window: int = 1, targets: Targets | None = None):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"EarlyPruningIndicator: sparsity must be in [0, 1), got {sparsity}")
        if patience < 1 or window < 1:
            raise ValueError(f"EarlyPruningIndicator: patience and window must be >= 1, got {patience}, {window}")
        self.sparsity, self.granularity, self.scope = sparsity, granularity, scope
        self.threshold, self.patience, self.window = threshold, patience, window
        self.targets = targets or Targets()
        self.masks: list[Masks] = []
        self.history: list[EPIStep] = []
        self._calm = 0

    def subnetwork(self, model: nn.Module) -> Masks:
        """The dominant sub-network of `model` now: kept masks per targeted Linear / Conv layer."""
        scores = {}
        for name, m in self.targets.select(model):
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                w = m.weight.detach().float()
                scores[name] = w.reshape(w.shape[0], -1).norm(dim=1) if self.granularity == "channel" else w.abs()
        if self.scope == "global":
            return global_masks(scores, self.sparsity)
        return {n: unstructured_mask(s, self.sparsity) for n, s in scores.items()}

    def __call__(self, model: nn.Module) -> EPIStep:
        current = self.subnetwork(model)
        previous = self.masks[-self.window:]
        psi = stability(current, self.masks[-1]) if self.masks else 1.0
        epi = sum(stability(current, p) for p in previous) / len(previous) if previous else 1.0
        self.masks = (self.masks + [current])[-self.window:]
        self._calm = self._calm + 1 if previous and 1.0 - epi < self.threshold else 0
        step = EPIStep(len(self.history) + 1, psi, 1.0 - psi, epi, self._calm >= self.patience)
        self.history.append(step)
        return step

    @property
    def stable(self) -> bool:
        """Whether the last call found the sub-network stable."""
        return bool(self.history) and self.history[-1].stable
