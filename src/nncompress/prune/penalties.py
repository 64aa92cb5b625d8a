"""Sparsity-inducing penalties as `fit(extra_losses=...)` terms: L1 and group lasso (seed 000 / 001).

>>> lin = nn.Linear(1, 1, bias=False).requires_grad_(False)
>>> _ = lin.weight.fill_(2.0)
>>> float(regularizer(l1_penalty, 0.5)(lin, None))
1.0
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn

from ..core import Targets
from .structured import group_lasso_penalty

__all__ = ["l1_penalty", "group_lasso", "regularizer"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _weights(model: nn.Module, targets: Targets | None) -> list[torch.Tensor]:
    return [m.weight for _, m in (targets or Targets()).select(model)
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


def l1_penalty(model: nn.Module, targets: Targets | None = None) -> torch.Tensor:
    """sum |w| over the targeted Linear and Conv weights: the L1 term of seed 001 eq. 2.

    >>> lin = nn.Linear(2, 1, bias=False).requires_grad_(False)
    >>> _ = lin.weight.fill_(-1.5)
    >>> float(l1_penalty(lin))
    3.0
    """
    return sum((w.abs().sum() for w in _weights(model, targets)), torch.zeros(()))


def group_lasso(model: nn.Module, targets: Targets | None = None, alpha: float = 0.0,
                groups: list | None = None) -> torch.Tensor:
    """Seed 000's r(theta) = sum_l (1 - alpha) sqrt(P_l) sum_n ||theta_l^n||_2 + alpha ||theta_l||_1, the
    groups n being each layer's output rows (P_l entries each). With `groups` (coupled channel groups
    from `nncompress.graph`) this is `structured.group_lasso_penalty` on them.

    >>> lin = nn.Linear(4, 1, bias=False).requires_grad_(False)
    >>> _ = lin.weight.fill_(1.0)
    >>> float(group_lasso(lin))  # sqrt(4) * ||(1, 1, 1, 1)||_2
    4.0
    """
    if groups is not None:
        return group_lasso_penalty(model, groups, alpha)
    total = torch.zeros(())
    for w in _weights(model, targets):
        rows = w.reshape(w.shape[0], -1)  # (O, P)
        total = total + (1 - alpha) * math.sqrt(rows.shape[1]) * rows.norm(dim=1).sum() + alpha * rows.abs().sum()
    return total


def regularizer(penalty: Callable[..., torch.Tensor], strength: float, **kwargs: Any) -> LossFn:
    """A `fit(extra_losses=...)` term: `strength * penalty(model, **kwargs)` each batch.

    >>> lin = nn.Linear(1, 1, bias=False).requires_grad_(False)
    >>> _ = lin.weight.fill_(2.0)
    >>> float(regularizer(l1_penalty, 0.5)(lin, None))
    1.0
    """
    return lambda model, batch: strength * penalty(model, **kwargs)
