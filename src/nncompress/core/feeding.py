"""Feeding a model: the one convention for a batch (`(x, y)`, a tensor, or a dict of tensors), and
reading what a module returned.

>>> import torch, torch.nn as nn
>>> feed(nn.Identity(), (torch.ones(2), torch.zeros(2))).tolist()
[1.0, 1.0]
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from .errors import DataError

__all__ = ["batch_inputs", "move", "feed", "first_tensor", "first_arg", "evaluating", "take"]


def batch_inputs(batch: Any) -> Any:
    """The model inputs of a batch: `x` of `(x, y)`, a dict of tensors as is, or a tensor."""
    if isinstance(batch, Mapping) or torch.is_tensor(batch):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[0]):
        return batch[0]
    raise DataError(f"a batch must be an (x, y) pair, a tensor or a dict of tensors, got {type(batch).__name__}"
                    f"{' of ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}; "
                    f"make the loader yield (inputs, labels) or {{'input_ids': ..., 'attention_mask': ...}}")


def move(inputs: Any, device: torch.device | str | None) -> Any:
    """`inputs` (a tensor or a dict of them) on `device` (None: where they are)."""
    if device is None:
        return inputs
    if isinstance(inputs, Mapping):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    return inputs.to(device)


def feed(model: nn.Module, batch: Any, device: torch.device | str | None = None) -> Any:
    """Run `model` on a batch: `model(x)` for a tensor (or the x of `(x, y)`), `model(**x)` for a dict."""
    inputs = move(batch_inputs(batch), device)
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def first_tensor(output: Any) -> Tensor | None:
    """The tensor a module returned: itself, `.logits` / the first value of a Hugging Face output, or
    the first item of a tuple."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, Mapping):
        return next((v for v in output.values() if torch.is_tensor(v)), None)
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    return None


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradients inside; the model's mode comes back after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was)


def take(loader: Iterable, n: int) -> Iterator[Any]:
    """The first `n` batches of `loader`."""
    return itertools.islice(iter(loader), n)


def first_arg(args: tuple, kwargs: dict) -> Tensor | None:
    """The first tensor a module was called with (positional, else `hidden_states`, else any keyword)."""
    for a in args:
        if torch.is_tensor(a):
            return a
    t = kwargs.get("hidden_states")
    return t if torch.is_tensor(t) else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
