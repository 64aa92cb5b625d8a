"""Keep pruned weights pruned while training: a later fine-tune must not regrow the zeros a
sparsify / prune stage made (the usual "prune, then recover" pipeline).

A trained dense weight has essentially no exact zeros, so a weight matrix with at least
`min_fraction` exact zeros is taken as pruned and its zero pattern is frozen.

>>> import torch, torch.nn as nn
>>> layer = nn.Linear(8, 4)
>>> with torch.no_grad(): layer.weight[:, :4] = 0.0
>>> keep = zero_keeper(layer)
>>> with torch.no_grad(): _ = layer.weight.add_(1.0)   # an optimizer step
>>> keep(layer); int((layer.weight == 0).sum())
16
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

MIN_FRACTION = 0.01  # below this, zeros are chance, not pruning


def zero_masks(model: nn.Module, min_fraction: float = MIN_FRACTION) -> dict[str, torch.Tensor]:
    """`{parameter name: mask of its nonzeros}` for every matrix / kernel (dim >= 2) that is pruned."""
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() >= 2 and p.numel():
            nonzero = p.detach() != 0
            if 1.0 - nonzero.float().mean().item() >= min_fraction:
                masks[name] = nonzero
    return masks


def zero_keeper(model: nn.Module, min_fraction: float = MIN_FRACTION) -> Callable[[nn.Module], None]:
    """An `after_step` callback for `fit` that puts the pruned zeros of `model` back after each step."""
    masks = zero_masks(model, min_fraction)

    def keep(m: nn.Module) -> None:
        if not masks:
            return
        params = dict(m.named_parameters())
        with torch.no_grad():
            for name, mask in masks.items():
                if name in params and params[name].shape == mask.shape:
                    params[name].mul_(mask)

    return keep
