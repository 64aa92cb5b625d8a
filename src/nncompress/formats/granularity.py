"""Which elements share a scale: per tensor, per channel, or per group of `size` along an axis.

A granularity is a value; `split_groups` turns a tensor into a view whose reduction over `dims`
(with `keepdim=True`) gives one statistic per group, already broadcastable against that view:

>>> import torch
>>> w = torch.arange(8.0).view(2, 4)                         # (O, I)
>>> v, dims = split_groups(w, PerGroup(axis=1, size=2))      # (O, I/G, G)
>>> v.abs().amax(dims, keepdim=True).flatten().tolist()
[1.0, 3.0, 5.0, 7.0]
>>> group_amax(w, PerChannel(axis=0)).shape                  # (O, 1): broadcasts against w
torch.Size([2, 1])
>>> group_amax(w, PerGroup(axis=1, size=2)).shape            # (O, I/G): compact, see expand_scale
torch.Size([2, 2])
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from ..core.config import Config, check
from ..core.errors import ConfigError


@dataclass(frozen=True)
class PerTensor(Config):
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerChannel(Config):
    """One scale per index along `axis` (output channels of a weight are `axis=0`)."""

    axis: int = 0


@dataclass(frozen=True)
class PerGroup(Config):
    """One scale per `size` consecutive elements along `axis` (and per index of every other axis)."""

    axis: int = -1
    size: int = 128

    def __post_init__(self) -> None:
        check(self.size >= 1, "size", f"a group holds at least 1 element, got {self.size}")


# Order matters for from_dict: the first class whose fields accept the mapping wins, and
# PerTensor takes no fields, PerChannel only `axis`.
Granularity = Union[PerTensor, PerChannel, PerGroup]

Shape = Union[int, Sequence[int]]


def as_shape(shape: Shape | torch.Size) -> tuple[int, ...]:
    """`numel` (an int) reads as the 1-D shape `(numel,)`."""
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


def _axis(axis: int, ndim: int, field: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise ConfigError(field, f"axis {axis} is out of range for a tensor with {ndim} dims")
    return axis % ndim


def num_groups(shape: Shape | torch.Size, granularity: Granularity | None) -> int:
    """How many scales `granularity` stores for a tensor of `shape` (0 for None: no scale).

    A group axis that `size` does not divide is padded, as block formats do: ceil(L / size).

    >>> num_groups((64, 256), PerGroup(axis=1, size=64))
    256
    >>> num_groups(1000, PerGroup(size=64))
    16
    """
    shape = as_shape(shape)
    numel = math.prod(shape)
    if granularity is None:
        return 0
    if isinstance(granularity, PerTensor):
        return 1
    axis = _axis(granularity.axis, len(shape))
    if isinstance(granularity, PerChannel):
        return shape[axis]
    return numel // max(shape[axis], 1) * math.ceil(shape[axis] / granularity.size)


def split_groups(x: Tensor, granularity: Granularity) -> tuple[Tensor, tuple[int, ...]]:
    """A view of `x` and the dims to reduce (keepdim=True) for one statistic per group.

    PerTensor: `x`, all dims. PerChannel(a): `x`, every dim but a.
    PerGroup(a, G): `x.unflatten(a, (L / G, G))`, the new G dim; G must divide L.
    """
    if isinstance(granularity, PerTensor):
        return x, tuple(range(x.ndim))
    axis = _axis(granularity.axis, x.ndim)
    if isinstance(granularity, PerChannel):
        return x, tuple(d for d in range(x.ndim) if d != axis)
    size, length = granularity.size, x.shape[axis]
    if length % size:
        raise ConfigError("size", f"group size {size} does not divide dim {axis} of length {length}; "
                                  "pick a divisor or pad the tensor")
    return x.unflatten(axis, (length // size, size)), (axis + 1,)  # (..., L/G, G, ...)


def merge_groups(view: Tensor, granularity: Granularity) -> Tensor:
    """The inverse of `split_groups`: flatten the group dim back into its axis."""
    if not isinstance(granularity, PerGroup):
        return view
    axis = _axis(granularity.axis, view.ndim - 1)
    return view.flatten(axis, axis + 1)


def group_reduce(x: Tensor, granularity: Granularity,
                 reduce: Callable[[Tensor, tuple[int, ...]], Tensor]) -> Tensor:
    """`reduce(view, dims)` (which must keep dims) per group, in the compact scale layout.

    Compact layout: PerTensor (1, ..., 1); PerChannel(a) size C at a, 1 elsewhere (broadcasts
    against `x`); PerGroup(a, G) the shape of `x` with L / G at a (see `expand_scale`).
    """
    view, dims = split_groups(x, granularity)
    stat = reduce(view, dims)
    if isinstance(granularity, PerGroup):
        stat = stat.squeeze(dims[0])  # (..., L/G, 1, ...) -> (..., L/G, ...)
    return stat


def group_amax(x: Tensor, granularity: Granularity) -> Tensor:
    """max |x| per group, in the compact layout of `group_reduce`."""
    return group_reduce(x, granularity, lambda v, d: v.abs().amax(d, keepdim=True))


def group_min_max(x: Tensor, granularity: Granularity) -> tuple[Tensor, Tensor]:
    """(min, max) per group, in the compact layout of `group_reduce`."""
    lo = group_reduce(x, granularity, lambda v, d: v.amin(d, keepdim=True))
    hi = group_reduce(x, granularity, lambda v, d: v.amax(d, keepdim=True))
    return lo, hi


def expand_scale(scale: Tensor, granularity: Granularity, shape: Shape | torch.Size) -> Tensor:
    """A compact per-group scale made broadcastable against a tensor of `shape`.

    Only PerGroup needs work (each scale repeated G times along its axis); the others broadcast.

    >>> expand_scale(torch.tensor([[1.0, 2.0]]), PerGroup(axis=1, size=2), (1, 4)).tolist()
    [[1.0, 1.0, 2.0, 2.0]]
    """
    if not isinstance(granularity, PerGroup):
        return scale
    shape = as_shape(shape)
    axis = _axis(granularity.axis, len(shape))
    return scale.repeat_interleave(granularity.size, dim=axis).narrow(axis, 0, shape[axis])


def apply_grouped(x: Tensor, granularity: Granularity,
                  fn: Callable[[Tensor, tuple[int, ...]], Tensor]) -> Tensor:
    """`fn(view, dims)` on the grouped view of `x`, reshaped back to `x`'s shape.

    >>> centred = apply_grouped(torch.tensor([[1.0, 3.0], [2.0, 6.0]]), PerChannel(axis=0),
    ...                         lambda v, d: v - v.mean(d, keepdim=True))
    >>> centred.tolist()
    [[-1.0, 1.0], [-2.0, 2.0]]
    """
    view, dims = split_groups(x, granularity)
    return merge_groups(fn(view, dims), granularity)


def scale_overhead(shape: Shape | torch.Size, granularity: Granularity | None, bits_per_group: float) -> float:
    """Bits per element that the per-group scales cost: groups * bits / numel."""
    numel = math.prod(as_shape(shape))
    check(numel > 0, "shape", "a tensor with no elements has no bit cost")
    return num_groups(shape, granularity) * bits_per_group / numel
