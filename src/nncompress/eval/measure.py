"""Counting: parameters, non-zero parameters, MACs (torch's own flop counter) and bytes on disk.

Also the one convention for feeding a model, used by every measurement:
`inputs` is a tensor (`model(x)`) or a dict of tensors (`model(**inputs)`).

>>> import torch, torch.nn as nn
>>> layer = nn.Linear(64, 32)
>>> count_params(layer), count_macs(layer, torch.randn(1, 64))
(2080, 2048)
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

import torch
import torch.nn as nn

from ..core.calibration import feed, move
from ..core.errors import DataError

Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """Run `model` on `inputs`: `model(x)` for a tensor, `model(**inputs)` for a dict of tensors
    (`core.calibration.feed`, the one way to feed a model).

    >>> import torch, torch.nn as nn
    >>> call_model(nn.Identity(), torch.ones(2)).tolist()
    [1.0, 1.0]
    """
    if not isinstance(inputs, (torch.Tensor, Mapping)):
        raise DataError(f"{type(model).__name__}: inputs must be a tensor or a dict of tensors, got "
                        f"{type(inputs).__name__}; wrap several positional inputs in a dict keyed by argument name")
    return feed(model, inputs)


def input_tensors(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors of `inputs`, in order (one for a tensor, the dict's values otherwise)."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    raise DataError(f"inputs must be a tensor or a dict of tensors, got {type(inputs).__name__}")


def batch_size(inputs: Inputs) -> int:
    """The batch size of `inputs`: dim 0 of the first tensor.

    >>> batch_size({"input_ids": torch.zeros(3, 8, dtype=torch.long)})
    3
    """
    tensors = input_tensors(inputs)
    if not tensors or tensors[0].dim() == 0:
        raise DataError("inputs have no batch axis (no tensor, or a 0-d tensor first); give a batched tensor (B, ...)")
    return int(tensors[0].shape[0])


def move_inputs(inputs: Inputs, device: torch.device | str) -> Inputs:
    """`inputs` with every tensor on `device` (dicts keep their key order)."""
    if not isinstance(inputs, (torch.Tensor, Mapping)):
        raise DataError(f"inputs must be a tensor or a dict of tensors, got {type(inputs).__name__}")
    return move(inputs, device)


def first_tensor(output: Any, where: str) -> torch.Tensor:
    """The tensor a model returned: itself, `.logits` of a Hugging Face output, or the first of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DataError(f"{where}: the model returned {type(output).__name__}, not a tensor; "
                    "wrap it so forward returns the tensor to measure")


@contextlib.contextmanager
def evaluating(model: nn.Module, device: torch.device | str | None = None) -> Iterator[nn.Module]:
    """Within the block `model` is in eval mode (and on `device` if given); both are restored after.

    >>> m = nn.Linear(2, 2).train()
    >>> with evaluating(m):
    ...     m.training
    False
    >>> m.training
    True
    """
    was_training = model.training
    first = next(iter(model.parameters()), None)
    old_device = first.device if first is not None else None
    moved = device is not None and old_device is not None and torch.device(device) != old_device
    if moved:
        model.to(device)
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
        if moved:
            model.to(old_device)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once; buffers not counted).

    >>> count_params(nn.Linear(4, 3))
    15
    """
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    """Number of parameters that are not exactly zero (what pruning removes, before any repacking).

    >>> layer = nn.Linear(4, 3)
    >>> with torch.no_grad():
    ...     _ = layer.weight[0].zero_()
    >>> count_nonzero_params(layer)
    11
    """
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def count_macs(model: nn.Module, inputs: Inputs) -> int:
    """Multiply-accumulates of one forward on `inputs`, from `torch.utils.flop_counter` (flops // 2).

    Counts what torch's flop counter knows (matmul, linear, conv, attention); element-wise ops are free.
    Runs in eval mode under `no_grad`; the model's mode is restored.

    >>> count_macs(nn.Conv1d(2, 4, kernel_size=3), torch.randn(1, 2, 10))  # 4 ch * 8 pos * 2 * 3
    192
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # The counter's module tracker hooks autograd for inputs that require grad; a parameter passed
    # straight into a custom autograd.Function (fake-quant STE) trips it under no_grad. Counting
    # needs no gradients, so switch them off for the count and restore them after.
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        with evaluating(model), torch.no_grad(), counter:
            call_model(model, inputs)
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
    return int(counter.get_total_flops()) // 2


def file_bytes(path: str | os.PathLike) -> int:
    """Size on disk in bytes of a file, or the sum over every file under a directory.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (Path(d) / "w.bin").write_bytes(b"0" * 100)
    ...     file_bytes(d)
    100
    """
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    raise DataError(f"{p}: no such file or directory; save or export the model there before measuring its size")
