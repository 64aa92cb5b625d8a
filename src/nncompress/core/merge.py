"""The `merge` transform: wrappers back to plain modules, keeping what they compute.

>>> import torch, torch.nn as nn, nncompress
>>> from nncompress.lowrank import LowRankConfig
>>> net = nn.Sequential(nn.Linear(8, 8))
>>> low = nncompress.apply(net, LowRankConfig(rank=2))
>>> plain = nncompress.merge(low)
>>> type(plain[0]).__name__, [e["config"]["kind"] for e in nncompress.history(plain)]
('Linear', ['lowrank', 'merge'])
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch.nn as nn

from .apply import apply
from .config import Config
from .context import Context
from .registry import register
from .surgery import merge_wrappers
from .targets import Targets


@dataclasses.dataclass(frozen=True)
class MergeConfig(Config):
    """No options: every targeted wrapper (quantized, low-rank, clustered, grouped, smoothed, int8)
    becomes the plain layer it computes; use it between two techniques that do not compose."""


@register("merge", config=MergeConfig)
def _merge(model: nn.Module, config: MergeConfig, ctx: Context) -> nn.Module:
    """Replace wrappers by the plain layers they compute (quantized values, factor products, ...)."""
    return merge_wrappers(model, ctx.targets, ctx.edits)


def merge(model: nn.Module, targets: Targets | Mapping[str, Any] | None = None) -> nn.Module:
    """`apply(model, MergeConfig(), targets)`: the wrappers among `targets` (all by default) become plain."""
    return apply(model, MergeConfig(), targets=targets)
