"""Groups of coupled channels, derived once from a traced model; read-only.

A `Group` is a set of parameter dims that must lose the same channels together: the producing
layers' output dims, the norms on the way, the consumers' input dims, every branch joined by a
residual add, and so on. Groups that cannot be pruned exactly say why.

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Conv1d(1, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 4, 3))
>>> graph = DependencyGraph(net, torch.randn(2, 1, 16))
>>> for group in graph.groups():
...     print(group)
Group(8 ch): 0[out] -> 1 -> 3[in]
Group(4 ch): 3[out]  [not prunable: model output (its width is part of the model's contract)]
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Literal

import torch
import torch.nn as nn

from ..core.targets import Targets
from .spaces import Slot
from .ties import tie_widths
from .trace import trace
from .walk import Walk

__all__ = ["DependencyGraph", "Group", "Member", "build_graph"]

Role = Literal["out", "in", "norm"]


@dataclasses.dataclass(frozen=True)
class Member:
    """One parameter dim in a group: channel i is `offset + i*stride ... + stride - 1` along `dim`.

    role: "out" for a producing layer's output dim (conv/linear/embedding weight and bias, depthwise
    weight), "in" for a consumer's input dim, "norm" for everything riding along (norm parameters
    and running stats, scales, shape attributes such as a weightless LayerNorm's normalized_shape).
    """

    module: str
    param: str
    dim: int
    offset: int = 0
    stride: int = 1
    role: Role = "norm"

    @property
    def name(self) -> str:
        """The parameter's fully qualified name, e.g. `layer1.0.conv1.weight`."""
        return f"{self.module}.{self.param}" if self.module else self.param


@dataclasses.dataclass(frozen=True)
class Group:
    """Coupled channels: removing channel i removes it from every member at once.

    size:      number of channels
    members:   the coupled parameter dims, in the order the graph met them
    prunable:  False when some coupling cannot be edited exactly (then `reason` says why and where)
    dim_sizes: each member's dim size when traced (to detect a model edited since)
    """

    size: int
    members: tuple[Member, ...]
    prunable: bool = True
    reason: str = ""
    chain: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)
    dim_sizes: tuple[int, ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def producers(self) -> tuple[str, ...]:
        """Modules whose output channels this group is (the layers one would target)."""
        return tuple(dict.fromkeys(m.module for m in self.members if m.role == "out"))

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.module for m in self.members))

    def __str__(self) -> str:
        text = f"Group({self.size} ch): " + " -> ".join(self.chain)
        return text if self.prunable else f"{text}  [not prunable: {self.reason}]"


class DependencyGraph:
    """Trace `model` once and derive its channel groups; never edits the model.

    example_inputs: a tensor, a tuple of positional inputs, or a dict for `model(**inputs)`
                    (e.g. a tokenizer's output); default: a seeded batch of 2 of `model.input_shape`.
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None):
        if example_inputs is None:
            example_inputs = _default_input(model)
        self.model_class = type(model).__name__
        self.trace = trace(model, example_inputs)
        self._walk = Walk(self.trace).run()
        tie_widths(self._walk)
        self._groups = _collect(self._walk)

    def groups(self, targets: Targets | None = None) -> list[Group]:
        """Every group with a producing layer; with `targets`, those whose producers match it.

        A group is kept if any of its producers matches `targets`; a group that contains an
        excluded module is returned as not prunable.
        """
        if targets is None:
            return list(self._groups)
        mods = self.trace.modules
        out = []
        for group in self._groups:
            if not any(targets.matches(p, mods[p]) for p in group.producers if p in mods):
                continue
            excluded = [m for m in group.modules if any(fnmatch.fnmatchcase(m, p) for p in targets.exclude)]
            if excluded and group.prunable:
                group = dataclasses.replace(group, prunable=False,
                                            reason=f"{excluded[0]} is excluded by targets and shares these channels")
            out.append(group)
        return out

    def group_of(self, module: str) -> Group:
        """The group whose producers include `module` (its output channels).

        >>> import torch.nn as nn
        >>> g = DependencyGraph(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.zeros(2, 4))
        >>> g.group_of("0").size
        8
        """
        for group in self._groups:
            if module in group.producers:
                return group
        from ..core.errors import TargetError

        raise TargetError(f"no channel group is produced by {module!r}; producers are: "
                          f"{', '.join(p for g in self._groups for p in g.producers[:1])}")

    def __str__(self) -> str:
        return "\n".join(str(g) for g in self._groups)


def build_graph(model: nn.Module, example_inputs: Any = None) -> DependencyGraph:
    """`DependencyGraph(model, example_inputs)`: trace once, derive the channel groups."""
    return DependencyGraph(model, example_inputs)


def _default_input(model: nn.Module) -> torch.Tensor:
    shape = getattr(model, "input_shape", None)
    if shape is None:
        from ..core.errors import UnsupportedOpError

        raise UnsupportedOpError(f"{type(model).__name__}: no example inputs and no input_shape; pass example "
                                 f"inputs that match forward")
    # batch 2: a batch of 1 would make every batch dim a broadcastable size-1 dim
    return torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))


def _collect(walk: Walk) -> list[Group]:
    sp = walk.sp
    order = {name: i for i, name in enumerate(walk.shapes)}  # placeholder order: model definition order
    groups: list[tuple[int, Group]] = []
    for r in range(len(sp.parent)):
        if sp.parent[r] != r or r in sp.redirect or not sp.members[r]:
            continue
        members = _members(walk, sp.members[r])
        if not any(m.role == "out" for m in members):
            continue  # no layer produces these channels (model inputs, kernel dims, ...)
        reason = sp.reason.get(r, "")
        if not reason and sp.size[r] == 1:
            reason = "a single channel cannot be removed"
        chain = _chain(walk, sp.events[r])
        sizes = tuple(_dim_size(walk, m) for m in members)
        first = min(order.get(m.name, len(order)) for m in members if m.role == "out")
        groups.append((first, Group(sp.size[r], members, not reason, reason, chain, sizes)))
    return [g for _, g in sorted(groups, key=lambda t: t[0])]


def _members(walk: Walk, slots: list[Slot]) -> tuple[Member, ...]:
    out = dict.fromkeys(Member(s.module, s.param, s.dim, s.offset, s.stride,
                               walk.roles.get((s.module, s.param, s.dim), "norm")) for s in slots)
    return tuple(out)


def _chain(walk: Walk, events: list) -> tuple[str, ...]:
    out: list[str] = []
    mark, last = "", ""
    for e in events:
        if isinstance(e, str):
            mark = e
            continue
        role = walk.roles.get((e.module, e.param, e.dim), "norm")
        tags = ([role] if role != "norm" else []) + ([f"+{e.offset}"] if e.offset else []) + \
               ([f"x{e.stride}"] if e.stride != 1 else [])
        name = e.module or walk.tr.model_class
        if e.param not in ("weight", "bias", "running_mean", "running_var"):
            name = f"{name}.{e.param}"
        text = name + (f"[{' '.join(tags)}]" if tags else "")
        if text == last and not mark:
            continue  # weight, bias and running stats of one layer read as one step
        out.append(f"{mark} {text}" if mark else text)
        mark, last = "", text
    return tuple(out)


def _dim_size(walk: Walk, m: Member) -> int:
    shape = walk.shapes.get(m.name)
    if shape is not None:
        return shape[m.dim]
    return -1  # a shape attribute, not a tensor
