"""`save` and `load`: a compressed model as safetensors + manifest, rebuilt without unpickling.

`load` builds the base architecture named in the manifest (`source`), replays the recorded structural
edits (so pruned, factorized or quantized shapes come back), then loads the weights; the reloaded
model's outputs equal the saved model's bit for bit.

A checkpoint folder is data, never code: `load` builds only registered models (the built-ins and
`hf:` folders, which transformers reads without remote code) unless the caller trusts the folder
(`trust_code=True`, CLI `--trust-code`) to import the `module:factory` its manifest names; it reads no
file outside the folder, and it decodes exactly the bytes whose checksum it verified.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from .core import history, model_source, replay, tag_source
from .core.errors import ModelLoadError
from .export.checkpoint import load_weights, read_checkpoint, write_checkpoint


def save(model: nn.Module, path: str | Path, source: dict[str, Any] | None = None,
         extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Save `model` to the folder `path` (weights + manifest), atomically.

    source:    how to rebuild the base architecture, e.g. `{"name": "mypkg.models:make_net"}`;
               models built by nncompress know theirs
    overwrite: replace a folder that holds files nncompress did not write (never done silently)
    """
    source = source or model_source(model)
    if source is None:
        raise ModelLoadError("save: the model's architecture source is unknown; pass "
                             "source={'name': 'module:factory', 'kwargs': {...}} so load() can rebuild it")
    return write_checkpoint(model, path, source, history(model), extra, overwrite=overwrite)


def needs_trust(source: dict[str, Any]) -> bool:
    """Whether building `source` imports code a file named (`module:factory`), rather than a registered model.

    >>> needs_trust({"name": "mnist1d_cnn"}), needs_trust({"name": "hf:minilm"}), needs_trust({"name": "os:system"})
    (False, False, True)
    """
    name = source.get("name") if isinstance(source, dict) else None
    return not isinstance(name, str) or (":" in name and not name.startswith("hf:"))


def untrusted_error(folder: str | Path, source: dict[str, Any]) -> ModelLoadError:
    return ModelLoadError(f"{folder}: the manifest builds the model with {source.get('name')!r}, which imports and "
                          "runs code; load it with trust_code=True (CLI: --trust-code) only if you trust where "
                          "the folder came from")


def load(path: str | Path, trust_code: bool = False) -> nn.Module:
    """Rebuild a model saved by `save` (eval mode).

    trust_code: allow the manifest's `module:factory` source to be imported and called (only for
                folders you trust: importing a module runs its code)
    """
    from .zoo.loaders import build_model  # lazily: transformers is slow to import

    ckpt = read_checkpoint(path)
    if needs_trust(ckpt.source) and not trust_code:
        raise untrusted_error(ckpt.path, ckpt.source)
    model, _ = build_model(ckpt.source)
    model = replay(model, ckpt.history)
    load_weights(model, ckpt)
    tag_source(model, ckpt.source)
    return model.eval()
