"""Checkpoints: safetensors weights plus a JSON manifest, no pickle anywhere.

A checkpoint folder holds `model.safetensors` and `manifest.json`. The manifest records where the
base architecture comes from (`source`, e.g. `{"name": "mnist1d_cnn", "kwargs": {}}`), the transforms
applied (`history`, replayed on load to rebuild changed shapes) and the weights' SHA-256, so a
corrupt or swapped file is caught before it is used.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..core.errors import ModelLoadError
from ..core.registry import lookup, names
from .atomic import atomic_path, atomic_write_text
from .codecs import decode_tensor, encode_int_codes, encode_tensor

FORMAT = "nncompress-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder as read back: what to build, what to replay, where the weights are."""

    path: Path
    source: dict[str, Any]
    history: list[dict[str, Any]]
    extra: dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint(model: nn.Module, directory: str | Path, source: dict[str, Any],
                     history: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                     compress: bool = True) -> Path:
    """Write `model`'s weights and manifest into `directory`; each file is written atomically.

    compress: store each tensor with its smallest exact codec (sparse, 2:4, codebook; see
              `codecs`), so bytes on disk fall with sparsity and quantization; quantized weights
              (hinted by `storage_hints`) are stored as bit-packed integer codes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, codecs = encode_state(model.state_dict(), compress, storage_hints(model) if compress else None)
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "codecs": json.dumps(codecs)})
    import nncompress  # the version only; no circular use
    manifest = {
        "format": FORMAT, "version": VERSION, "nncompress": nncompress.__version__,
        "torch": torch.__version__, "source": source, "history": history,
        "weights": {"file": WEIGHTS, "sha256": sha256(directory / WEIGHTS)},
        "extra": extra or {},
    }
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2, default=str))
    return directory


def storage_hints(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Hints from every provider registered in the "storage_hints" namespace: `{state name: hint}`.

    A technique that knows a tensor is better stored as something else (quantized weights as packed
    integer codes: `quant.storage`) registers a provider, so this module never imports techniques.
    """
    hints: dict[str, dict[str, Any]] = {}
    for provider in names("storage_hints"):
        hints.update(lookup(provider, "storage_hints")(model))
    return hints


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def encode_state(state: dict[str, torch.Tensor], compress: bool = True,
                 hints: dict[str, dict[str, Any]] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten a state dict into safetensors parts plus per-tensor codec metadata.

    Tied tensors (one storage under several names) are stored once; the others are aliases.
    hints: `{name: int_codes hint}` (see `storage_hints`); a hinted tensor is stored as packed codes
           when they decode exactly, else as usual. Tied tensors ignore hints (the other user of the
           storage reads the float values).
    """
    tensors: dict[str, torch.Tensor] = {}
    codecs: dict[str, Any] = {}
    seen: dict[tuple, str] = {}
    hints = hints or {}
    shared: dict[tuple, int] = {}
    for t in state.values():
        if t.numel():
            shared[_storage_key(t)] = shared.get(_storage_key(t), 0) + 1
    for name, t in state.items():
        key = _storage_key(t)
        if t.numel() and key in seen:
            codecs[name] = {"codec": "alias", "of": seen[key]}
            continue
        seen[key] = name
        hinted = None
        if compress and name in hints and shared.get(key, 0) <= 1:
            hinted = encode_int_codes(hints[name], state)
        if hinted is not None:
            parts, meta = hinted
        elif compress:
            parts, meta = encode_tensor(t)
        else:
            parts, meta = {"data": t.detach().contiguous().cpu()}, {"codec": "dense"}
        for part, value in parts.items():
            tensors[f"{name}::{part}"] = value
        codecs[name] = meta
    return tensors, codecs


def decode_state(tensors: dict[str, torch.Tensor], codecs: dict[str, Any]) -> dict[str, torch.Tensor]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, part = key.rpartition("::")
        parts.setdefault(name, {})[part] = value
    state: dict[str, torch.Tensor] = {}

    def get(n: str) -> torch.Tensor:  # on demand: int_codes refer to their scale by name
        if n not in state:
            meta = codecs[n]
            if meta["codec"] == "alias":
                state[n] = get(meta["of"])
            else:
                refs = {r: get(r) for r in (meta.get("scale"), meta.get("zero_point")) if isinstance(r, str)}
                state[n] = decode_tensor(parts.get(n, {}), meta, refs)
        return state[n]

    for n in codecs:
        get(n)
    return {n: state[n] for n in codecs}


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """Read and verify a checkpoint folder's manifest and checksum (the weights are loaded later)."""
    directory = Path(directory)
    if directory.is_file() and directory.name in (WEIGHTS, MANIFEST):
        directory = directory.parent
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ModelLoadError(f"{directory}: no {MANIFEST} here; point at a folder written by nncompress.save")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{manifest_path}: not valid JSON ({e.msg} at line {e.lineno}); the file is corrupt, re-save the model") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{manifest_path}: not an nncompress manifest (format field missing or wrong)")
    if manifest.get("version", 0) > VERSION:
        raise ModelLoadError(f"{manifest_path}: manifest version {manifest['version']} is newer than this "
                             f"nncompress reads ({VERSION}); upgrade nncompress")
    weights = directory / manifest["weights"]["file"]
    if not weights.is_file():
        raise ModelLoadError(f"{weights}: weights file is missing; copy the whole checkpoint folder")
    if sha256(weights) != manifest["weights"]["sha256"]:
        raise ModelLoadError(f"{weights}: checksum does not match the manifest (file corrupt or replaced); re-save the model")
    return Checkpoint(directory, manifest["source"], manifest.get("history", []), manifest.get("extra", {}))


def load_weights(model: nn.Module, ckpt: Checkpoint) -> nn.Module:
    """Load the checkpoint's tensors into `model` (built and replayed); shapes and names must match."""
    try:
        raw = load_file(str(ckpt.weights))
        with safe_open(str(ckpt.weights), "pt") as f:
            codecs = json.loads((f.metadata() or {})["codecs"])
        tensors = decode_state(raw, codecs)
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise ModelLoadError(f"{ckpt.weights}: cannot read weights ({type(e).__name__}: {e}); the file is corrupt, "
                             "re-save the model") from None
    state = model.state_dict()
    for name, tensor in tensors.items():
        if name not in state:
            raise ModelLoadError(f"{ckpt.weights}: tensor {name!r} has no place in the rebuilt model; "
                                 "the manifest and weights do not belong together")
        if state[name].shape != tensor.shape:
            raise ModelLoadError(f"{ckpt.weights}: {name} has shape {tuple(tensor.shape)} but the rebuilt model "
                                 f"expects {tuple(state[name].shape)}; the manifest and weights do not belong together")
    missing = [k for k in state if k not in tensors]
    if missing:
        raise ModelLoadError(f"{ckpt.weights}: tensor {missing[0]!r} is missing; the manifest and weights do not "
                             "belong together, or the file is incomplete")
    model.load_state_dict(tensors, strict=True)
    return model
