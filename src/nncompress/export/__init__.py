"""Saving and exporting: safetensors + manifest checkpoints, atomic writes, ONNX.

`export.onnx` uses `eval` to run and verify the exported file (export and eval are siblings in the
layer picture; eval never imports export).
"""
from .atomic import atomic_dir, atomic_path, atomic_write_text
from .checkpoint import Checkpoint, load_weights, read_checkpoint, write_checkpoint

__all__ = ["atomic_dir", "atomic_path", "atomic_write_text", "Checkpoint", "load_weights",
           "read_checkpoint", "write_checkpoint"]
