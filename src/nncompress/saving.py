"""`save` and `load`: a compressed model as safetensors + manifest, rebuilt without unpickling.

`load` builds the base architecture named in the manifest (`source`), replays the recorded
transforms (so pruned or factorized shapes come back), then loads the weights; the reloaded model's
outputs equal the saved model's bit for bit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from .core import history, model_source, replay, tag_source
from .core.errors import ModelLoadError
from .export.checkpoint import load_weights, read_checkpoint, write_checkpoint

def save(model: nn.Module, path: str | Path, source: dict[str, Any] | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Save `model` to the folder `path` (weights + manifest).

    source: how to rebuild the base architecture, e.g. `{"name": "mypkg.models:make_net"}`;
            models built by nncompress know theirs.
    """
    source = source or model_source(model)
    if source is None:
        raise ModelLoadError("save: the model's architecture source is unknown; pass "
                             "source={'name': 'module:factory', 'kwargs': {...}} so load() can rebuild it")
    return write_checkpoint(model, path, source, history(model), extra)


def load(path: str | Path) -> nn.Module:
    """Rebuild a model saved by `save` (eval mode)."""
    from .zoo.loaders import build_model  # lazily: transformers is slow to import

    ckpt = read_checkpoint(path)
    model, _ = build_model(ckpt.source)
    model = replay(model, ckpt.history)
    load_weights(model, ckpt)
    tag_source(model, ckpt.source)
    return model.eval()
