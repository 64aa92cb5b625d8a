"""Saving and exporting: safetensors + manifest checkpoints, atomic writes, ONNX."""
from .atomic import atomic_dir, atomic_path, atomic_write_text
from .checkpoint import Checkpoint, load_weights, read_checkpoint, write_checkpoint

__all__ = ["atomic_dir", "atomic_path", "atomic_write_text", "Checkpoint", "load_weights",
           "read_checkpoint", "write_checkpoint"]
