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

from ..core import Config, ConfigError, Context, Targets, TrainConfig, check, fit
from ..core.objectives import objective
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
            raise ConfigError("sparsity", f"must be in [0, 1), got {sparsity}")
        if patience < 1 or window < 1:
            raise ConfigError("patience" if patience < 1 else "window", f"must be >= 1, got {patience}, {window}")
        if granularity not in ("channel", "element") or scope not in ("layer", "global"):
            raise ConfigError("granularity" if granularity not in ("channel", "element") else "scope",
                              f"must be channel / element and layer / global, got {granularity!r}, {scope!r}")
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


@dataclasses.dataclass(frozen=True)
class UntilStable(Config):
    """A stage's `until_stable`: train before pruning until the indicator fires (seed 000's "when to
    prune"), with the stage's training options.

    max_epochs: train at most this long; if the indicator has not fired, prune then (the record says so)
    threshold, patience, window: as `EarlyPruningIndicator`
    """

    max_epochs: int = 20
    threshold: float = 0.02
    patience: int = 2
    window: int = 1

    def __post_init__(self):
        check(self.max_epochs >= 1, "max_epochs", f"must be >= 1, got {self.max_epochs}")
        check(self.threshold > 0, "threshold", f"must be > 0, got {self.threshold}")
        check(self.patience >= 1, "patience", f"must be >= 1, got {self.patience}")
        check(self.window >= 1, "window", f"must be >= 1, got {self.window}")


def train_until_stable(model: nn.Module, ctx: Context, until: UntilStable, sparsity: float,
                       granularity: Literal["channel", "element"], scope: Literal["layer", "global"],
                       train: TrainConfig, desc: str = "until-stable") -> dict:
    """Train `model` on the stage's objective until the indicator (its sub-network: what `sparsity`
    at `granularity` / `scope` keeps) fires, or for `until.max_epochs`. Returns the record a stage
    keeps: the epoch it fired at (None if it did not), the epochs trained, and the distance to the
    previous sub-network after each epoch. One training run: the optimizer and schedule carry on."""
    indicator = EarlyPruningIndicator(sparsity, granularity, scope, until.threshold, until.patience, until.window,
                                      ctx.targets)
    loss = objective(ctx, "until_stable", model)
    indicator(model)  # the sub-network before any training: the first epoch is compared with it
    when: list[int] = []

    def stable(epoch: int) -> bool:
        if indicator(model).stable:
            when.append(epoch)
        return bool(when)

    max_epochs = until.max_epochs
    fit(model, ctx.data.train, loss, TrainConfig.of(train, epochs=max_epochs), progress=ctx.progress, desc=desc,
        stop_after_epoch=stable)
    fired = when[0] if when else None
    trained = fired or max_epochs
    record = {"fired_epoch": fired, "epochs": trained, "max_epochs": max_epochs,
              "distance": [round(h.distance, 5) for h in indicator.history[1:]]}
    if fired is None:
        record["note"] = (f"the indicator did not fire within {max_epochs} epochs (1 - EPI stayed above "
                          f"{indicator.threshold} for {indicator.patience} epochs in a row); pruned after {max_epochs}")
    ctx.log(f"{desc}: " + (f"sub-network stable at epoch {fired}" if fired else record["note"]))
    return record
