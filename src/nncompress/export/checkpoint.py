"""Checkpoints: safetensors weights plus a JSON manifest, no pickle anywhere.

A checkpoint folder holds `model.safetensors` and `manifest.json`. The manifest records where the
base architecture comes from (`source`, e.g. `{"name": "mnist1d_cnn", "kwargs": {}}`), the transforms
applied (`history`: their structural edits are replayed on load) and the weights' SHA-256.

Loading treats the folder as untrusted data: every file the manifest names must lie inside the
folder, and the checksum is verified on the very bytes that are then decoded, so a swapped or
corrupt file never loads. `checkpoint_bytes` counts every byte needed to load (weights, manifest
and any other file), which is what reports call a stage's size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from ..core.errors import ConfigError, ModelLoadError
from ..core.registry import lookup, names, register

from .codecs import decode_tensor, encode_int_codes, encode_tensor

FORMAT = "nncompress-checkpoint"
VERSION = 2  # 2: history entries carry the structural edits that load replays
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder as read back: what to build, what to replay, where the weights are."""

    path: Path
    source: dict[str, Any]
    history: list[dict[str, Any]]
    extra: dict[str, Any]
    weights: Path
    sha256: str


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_bytes(directory: str | Path) -> dict[str, int]:
    """Bytes on disk of every file needed to load the checkpoint in `directory`:
    `{"weights": ..., "manifest": ..., "other": ..., "total": ...}`."""
    directory = Path(directory)
    files = [f for f in directory.rglob("*") if f.is_file()]
    weights = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
    manifest = sum(f.stat().st_size for f in files if f.name == MANIFEST)
    total = sum(f.stat().st_size for f in files)
    return {"weights": weights, "manifest": manifest, "other": total - weights - manifest, "total": total}


def write_checkpoint(model: nn.Module, directory: str | Path, source: dict[str, Any],
                     history: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                     compress: bool = True, overwrite: bool = False) -> Path:
    """Write `model`'s weights and manifest as the folder `directory`, atomically: the files are
    written into a temporary folder beside it, which then takes its place (a reader never sees half
    a checkpoint; a failure leaves what was there).

    A folder that exists must be an nncompress checkpoint (only its own files), or empty, unless
    `overwrite`: a user's folder is never silently replaced.
    compress: store each tensor with its smallest exact codec (sparse, 2:4, codebook; see
              `codecs`), so bytes on disk fall with sparsity and quantization; quantized weights
              (hinted by `storage_hints`) are stored as bit-packed integer codes.
    """
    directory = Path(directory)
    _check_target(directory, overwrite)
    tensors, codecs = encode_state(model.state_dict(), compress, storage_hints(model) if compress else None)
    import nncompress  # the version only; no circular use
    with _replacing(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "codecs": json.dumps(codecs)})
        manifest = {
            "format": FORMAT, "version": VERSION, "nncompress": nncompress.__version__,
            "torch": torch.__version__, "source": source, "history": history,
            "weights": {"file": WEIGHTS, "sha256": sha256(tmp / WEIGHTS)},
            "extra": extra or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, separators=(",", ":"), default=str), encoding="utf-8")
    return directory


# ------------------------------------------------------------------------------------ for techniques
# Techniques do not import export: a budget in bytes looks these two up (namespace "measure").

@register("state_bytes", namespace="measure")
def state_bytes(module: nn.Module) -> int:
    """Bytes of the weights file `write_checkpoint` would write for `module` alone (every tensor with
    its codec, the header included): what one layer in a given format costs on disk."""
    from safetensors.torch import save as safetensors_bytes

    tensors, codecs = encode_state(module.state_dict(), True, storage_hints(module))
    return len(safetensors_bytes(tensors, metadata={"format": FORMAT, "codecs": json.dumps(codecs)}))


@register("checkpoint_bytes", namespace="measure")
def checkpoint_size(model: nn.Module, history: list[dict[str, Any]], source: dict[str, Any] | None = None) -> int:
    """Every byte (weights + manifest) of `model` saved with `history`, written to a temporary folder."""
    with tempfile.TemporaryDirectory() as d:
        folder = write_checkpoint(model, Path(d) / "ck", source or {"name": "-"}, history)
        return checkpoint_bytes(folder)["total"]


@contextlib.contextmanager
def _replacing(directory: Path) -> Iterator[Path]:
    """A temporary folder beside `directory` that takes its place on success (the old one, if any, is
    moved aside first and removed after); on failure the temporary folder goes and the old one stays."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    old = None
    try:
        yield tmp
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old.tmp", dir=directory.parent))
            os.replace(directory, old / "x")
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _check_target(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise ConfigError("path", f"{directory}: exists and is not a folder; save to a new folder path")
    parent = next((p for p in directory.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError("path", f"{directory}: {parent} is a file, not a folder; save to another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("path", f"{directory}: cannot write into {parent} (not writable); save to another path")
    if overwrite or not directory.exists():
        return
    entries = {p.name for p in directory.iterdir()}
    if entries and not entries <= {WEIGHTS, MANIFEST}:
        raise ConfigError("path", f"{directory}: folder is not empty and holds files nncompress did not write "
                             f"({sorted(entries - {WEIGHTS, MANIFEST})[0]!r}, ...); save to a new folder, or pass "
                             "overwrite=True to replace it")


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
    """Read and validate a checkpoint folder's manifest (the weights are read and verified by
    `load_weights`)."""
    directory = Path(directory)
    if directory.is_file() and directory.name in (WEIGHTS, MANIFEST):
        directory = directory.parent
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ModelLoadError(f"{directory}: no {MANIFEST} here; point at a folder written by nncompress.save")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{manifest_path}: not valid JSON ({e}); the file is corrupt, re-save the model") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{manifest_path}: not an nncompress manifest (format field missing or wrong)")
    version = manifest.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise ModelLoadError(f"{manifest_path}: manifest version {version!r} is newer than this nncompress reads "
                             f"({VERSION}); upgrade nncompress")
    if version < VERSION:
        raise ModelLoadError(f"{manifest_path}: manifest version {version} was written by an older nncompress; "
                             "re-save the model with this version")
    weights = manifest.get("weights")
    if not (isinstance(weights, dict) and isinstance(weights.get("file"), str)
            and isinstance(weights.get("sha256"), str)):
        raise ModelLoadError(f"{manifest_path}: the weights entry must name a file and its sha256; the manifest is corrupt")
    source, history = manifest.get("source"), manifest.get("history", [])
    if not isinstance(source, dict) or not isinstance(history, list):
        raise ModelLoadError(f"{manifest_path}: source must be a mapping and history a list; the manifest is corrupt")
    return Checkpoint(directory, source, history, manifest.get("extra") or {},
                      inside(directory, weights["file"], manifest_path), weights["sha256"])


def inside(directory: Path, name: str, where: Path) -> Path:
    """`directory / name`, refusing anything that resolves outside `directory` (`..`, absolute paths,
    links out of the folder): a manifest names files of its own folder only."""
    root = directory.resolve()
    path = (directory / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root) or path == root:
        raise ModelLoadError(f"{where}: names the file {name!r}, which is outside the checkpoint folder; "
                             "a manifest may only name files inside its own folder")
    return path


def load_weights(model: nn.Module, ckpt: Checkpoint) -> nn.Module:
    """Load the checkpoint's tensors into `model` (built and replayed); shapes and names must match.

    The file is read once: the checksum is checked on those bytes, and those bytes are decoded."""
    if not ckpt.weights.is_file():
        raise ModelLoadError(f"{ckpt.weights}: weights file is missing; copy the whole checkpoint folder")
    raw_bytes = ckpt.weights.read_bytes()
    if hashlib.sha256(raw_bytes).hexdigest() != ckpt.sha256:
        raise ModelLoadError(f"{ckpt.weights}: checksum does not match the manifest (file corrupt or replaced); "
                             "re-save the model")
    try:
        raw = safetensors_load(raw_bytes)
        codecs = json.loads(_metadata(raw_bytes)["codecs"])
        tensors = decode_state(raw, codecs)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ModelLoadError(f"{ckpt.weights}: cannot read weights ({type(e).__name__}: {e}); the file is corrupt, "
                             "re-save the model") from None
    _check_state(model, tensors, ckpt.weights)
    model.load_state_dict(tensors, strict=True)
    return model


def _metadata(raw: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file in memory (its JSON header)."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return header.get("__metadata__") or {}


def _check_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    state = model.state_dict()
    for name, tensor in tensors.items():
        if name not in state:
            raise ModelLoadError(f"{where}: tensor {name!r} has no place in the rebuilt model; "
                                 "the manifest and weights do not belong together")
        if state[name].shape != tensor.shape:
            raise ModelLoadError(f"{where}: {name} has shape {tuple(tensor.shape)} but the rebuilt model "
                                 f"expects {tuple(state[name].shape)}; the manifest and weights do not belong together")
    missing = [k for k in state if k not in tensors]
    if missing:
        raise ModelLoadError(f"{where}: tensor {missing[0]!r} is missing; the manifest and weights do not "
                             "belong together, or the file is incomplete")
