"""`apply(model, config, targets=...)`: the one public verb.

>>> import torch.nn as nn
>>> from nncompress.core.registry import names
>>> "finetune" in names()
True
"""
from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

from .config import Config
from .context import Context
from .registry import lookup, transform_for
from .targets import Targets

HISTORY_ATTR = "_nncompress_history"
SOURCE_ATTR = "_nncompress_source"


def apply(model: nn.Module, config: Config, targets: Targets | None = None,
          context: Context | None = None) -> nn.Module:
    """Apply the registered transform for `config` to `model` and return the model.

    The application (config, targets and what the transform recorded) is appended to the model's
    history, which `nncompress.save` writes to the manifest so `nncompress.load` can replay it.
    """
    ctx = copy.copy(context) if context is not None else Context()
    if targets is not None:
        ctx.targets = targets
    ctx.record = {}
    out = transform_for(config).fn(model, config, ctx)
    if not isinstance(out, nn.Module):
        raise TypeError(f"transform {config.kind!r} returned {type(out).__name__}, not an nn.Module")
    entry = {"config": config.to_dict(), "targets": ctx.targets.to_dict(), "record": ctx.record}
    setattr(out, HISTORY_ATTR, history(model) + [entry])
    return out


def history(model: nn.Module) -> list[dict[str, Any]]:
    """The transforms applied to `model` so far, as manifest entries."""
    return list(getattr(model, HISTORY_ATTR, []))


def replay(model: nn.Module, entries: list[dict[str, Any]]) -> nn.Module:
    """Re-run the structural part of each entry (used by `load`); weights come from the file."""
    for i, entry in enumerate(entries):
        kind = entry["config"]["kind"]
        cfg = lookup(kind).config.from_dict(entry["config"], path=f"manifest.history[{i}]")
        ctx = Context(targets=Targets.from_dict(entry.get("targets", {})), replay=True,
                      record=dict(entry.get("record", {})))
        model = transform_for(cfg).fn(model, cfg, ctx)
    setattr(model, HISTORY_ATTR, list(entries))
    return model


def model_source(model: nn.Module) -> dict[str, Any] | None:
    """The spec (`{"name": ..., "kwargs": ...}`) the model was built from, if nncompress built it."""
    return getattr(model, SOURCE_ATTR, None)


def tag_source(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Remember how `model` was built, so `save` can write it and `load` can rebuild it."""
    setattr(model, SOURCE_ATTR, {"name": spec["name"], "kwargs": dict(spec.get("kwargs") or {})})
    return model
