"""Module-level data flow, read off one trace: who reads each module's output, how often it runs.

The exported graph (see `trace`) is keyed by ATen op; every node carries the stack of module calls
that ran it. A module *call* is the run of nodes under one entry of that stack (a module called
twice has two entries: `fc` and `fc@1`); its *outputs* are the nodes of the call read outside it.
A read is labelled by the module that does it when that module is a leaf (`"bn"`, `"q"`), else by
the op (`"op:add"` for a residual add written in a block's forward, `"op:relu"` for `F.relu`), or
`"model output"`. Ops that return their input's values unchanged (eval dropout, a view or `to` that
keeps shape, dtype and layout, `clone`, `detach`) are looked through; `nn.Identity` leaves no node.

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Dropout(), nn.ReLU())
>>> flow = DataFlow(net, torch.randn(2, 2, 8))
>>> flow.sole_consumer("0").label, [u.label for u in flow.consumers("1")], flow.calls["3"]
('1', ['3'], 1)
>>> flow.consumers("3")
(Use(label='model output', node=''),)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.fx import Node

from ..core.errors import UnsupportedOpError
from .trace import Trace, op_name, trace

__all__ = ["DataFlow", "Use", "MODEL_INPUT", "MODEL_OUTPUT", "guess_inputs"]

MODEL_OUTPUT = "model output"
MODEL_INPUT = "model input"

# ops whose output holds their first input's values unchanged when shape, dtype and layout are kept
_SAME_VALUES = {"alias", "clone", "contiguous", "detach", "lift_fresh_copy", "view", "reshape", "_unsafe_view",
                "expand", "flatten", "slice", "to", "_to_copy", "type_as"}
_DROPOUTS = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"}  # no-ops when train=False
_ADDS = {"add"}

Path = tuple[str, ...]  # the nn_module_stack keys down to one module call: identifies the call


@dataclasses.dataclass(frozen=True)
class Use:
    """One read of a value: by a leaf module (`label` is its name), by an op (`op:add`), or the model's
    output (`model output`). `node` names the graph node that reads it ("" for the model output)."""

    label: str
    node: str = ""

    @property
    def module(self) -> str | None:
        """The reading module's name, or None for an op or the model output."""
        return None if self.label == MODEL_OUTPUT or self.label.startswith("op:") else self.label


class DataFlow:
    """Producer/consumer relations between modules, from one `torch.export` trace; read-only.

    calls: module name -> how many times forward ran it (modules that ran no op, such as
           `nn.Identity`, are absent)

    `DataFlow(model, example_inputs)` traces the model (`example_inputs=None`: see `guess_inputs`);
    `DataFlow.from_trace(tr)` reuses a trace.
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None):
        self._build(trace(model, guess_inputs(model) if example_inputs is None else example_inputs))

    @classmethod
    def from_trace(cls, tr: Trace) -> "DataFlow":
        flow = cls.__new__(cls)
        flow._build(tr)
        return flow

    def _build(self, tr: Trace) -> None:
        self.trace = tr
        self._by_name = {n.name: n for n in tr.graph.nodes}
        self._paths: dict[Node, Path] = {}
        self._region: dict[Path, list[Node]] = {}   # a call -> its nodes, in execution order
        self._fqn: dict[Path, str] = {}
        calls: dict[str, list[Path]] = {}
        for node in tr.calls():
            stack = list((node.meta.get("nn_module_stack") or {}).items())
            keys = tuple(k for k, _ in stack)
            self._paths[node] = keys
            for i, (_, (fqn, _cls)) in enumerate(stack):
                path = keys[:i + 1]
                if path not in self._region:
                    self._region[path] = []
                    self._fqn[path] = fqn
                    calls.setdefault(fqn, []).append(path)
                self._region[path].append(node)
        self._calls = calls
        self.calls: dict[str, int] = {fqn: len(paths) for fqn, paths in calls.items()}
        self._leaves = {n for n, m in tr.modules.items() if n and next(m.children(), None) is None}

    # --- queries -----------------------------------------------------------------------------
    def consumers(self, of: str | Use) -> tuple[Use, ...]:
        """The reads of a module's output (over all its calls) or of an op's output (`of` a `Use`),
        no-op aliases looked through; one `Use` per reading node, in graph order.

        A module name that never ran (or is unknown) has no consumers, nor has the model output.
        """
        if isinstance(of, Use):
            node = self._by_name.get(of.node)
            sources = [] if node is None else [(node, set())]   # the model output is read by nothing
        else:
            sources = []
            for path in self._calls.get(of, []):
                inside = set(self._region[path])
                sources += [(n, inside) for n in self._region[path] if any(u not in inside for u in n.users)]
        uses: dict[Use, None] = {}
        for node, inside in sources:
            for use in self._reads(node, inside):
                uses[use] = None
        return tuple(uses)

    def sole_consumer(self, of: str | Use) -> Use | None:
        """The one read of `of`'s output, if `of` (a module) runs once and its output is read by exactly
        one node, no-op aliases (and `nn.Identity`) looked through; else None."""
        if not isinstance(of, Use) and self.calls.get(of) != 1:
            return None
        uses = self.consumers(of)
        return uses[0] if len(uses) == 1 else None

    def sources(self, name: str) -> tuple[str, ...]:
        """For each call of module `name`, what produced its first input, aliases looked through: a leaf
        module's name, `op:<aten op>`, or `model input`."""
        out = []
        for path in self._calls.get(name, []):
            x = self._first_input(path)
            if x is not None:
                out.append(self._label(self._origin(x)))
        return tuple(out)

    def reads_its_input_into_add(self, block: str) -> bool:
        """Whether a call of `block` adds its first input (or a no-op alias of it) to something in its
        own forward, as a residual block does; `nn.Identity` shortcuts leave no node, so they count.
        An add inside a submodule does not: `Sequential(Residual(f), g)` computes g(x + f(x)), and a
        post-LN transformer layer adds inside its attention and FFN outputs, not at its own level."""
        for path in self._calls.get(block, []):
            x = self._first_input(path)
            if x is None:
                continue
            same = set(self._aliases(x))
            if any(self._paths[n] == path and _op(n) in _ADDS and any(a in same for a in n.args[:2])
                   for n in self._region[path]):
                return True
        return False

    # --- helpers -----------------------------------------------------------------------------
    def _reads(self, node: Node, inside: set[Node]) -> Iterator[Use]:
        for user in node.users:
            if user in inside:
                continue
            if user.op == "output":
                yield Use(MODEL_OUTPUT)
            elif _is_alias(user, node):
                yield from self._reads(user, inside)
            elif _holds_tensors(user):   # sym_size & co read no values
                yield Use(self._label(user), user.name)

    def _label(self, node: Node) -> str:
        if node.op == "placeholder":
            return MODEL_INPUT
        keys = self._paths.get(node, ())
        fqn = self._fqn[keys] if keys else ""
        if fqn in self._leaves:
            return fqn
        return f"op:{_op(node)}"

    def _first_input(self, path: Path) -> Node | None:
        """The first activation the call reads from outside (parameters and constants are not inputs)."""
        inside = set(self._region[path])
        for node in self._region[path]:
            for a in _node_args(node):
                if a not in inside and self._is_activation(a):
                    return a
        return None

    def _is_activation(self, node: Node) -> bool:
        if node.op == "placeholder":
            return node.name in self.trace.inputs and isinstance(node.meta.get("val"), torch.Tensor)
        return node.op == "call_function" and _holds_tensors(node)

    def _origin(self, node: Node) -> Node:
        while node.op == "call_function" and node.args and isinstance(node.args[0], Node) \
                and _is_alias(node, node.args[0]):
            node = node.args[0]
        return node

    def _aliases(self, node: Node) -> Iterator[Node]:
        yield node
        for user in node.users:
            if _is_alias(user, node):
                yield from self._aliases(user)


def _op(node: Node) -> str:
    """The op's name, in-place variants named as the op: `add_` -> `add`."""
    name = op_name(node)[1]
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _node_args(node: Node) -> Iterator[Node]:
    todo = [*node.args, *node.kwargs.values()]
    while todo:
        a = todo.pop(0)
        if isinstance(a, Node):
            yield a
        elif isinstance(a, (tuple, list)):
            todo[:0] = list(a)


def _holds_tensors(node: Node) -> bool:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return any(isinstance(v, torch.Tensor) for v in vals)


def _is_alias(user: Node, src: Node) -> bool:
    """`user` returns `src`'s values unchanged (same shape, dtype, layout): reading it reads `src`."""
    if user.op != "call_function" or not user.args or user.args[0] is not src:
        return False
    name = _op(user)
    if name in _DROPOUTS:
        train = user.args[2] if len(user.args) > 2 else user.kwargs.get("train", True)
        return train is False
    if name not in _SAME_VALUES:
        return False
    a, b = src.meta.get("val"), user.meta.get("val")
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride())


def guess_inputs(model: nn.Module) -> torch.Tensor:
    """Example inputs for a model given none: a seeded batch of 2 of `model.input_shape`, else one that
    fits the first Linear / Conv / Embedding in module order ((2, in_features), (2, C, 32, ...) or
    (2, 8) token ids). A guess that does not fit makes tracing fail with a typed error; pass inputs.

    >>> tuple(guess_inputs(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())).shape)
    (2, 3, 32, 32)
    """
    g = torch.Generator().manual_seed(0)
    shape = getattr(model, "input_shape", None)
    if shape is not None:  # batch 2: a batch of 1 would make every batch dim a broadcastable size-1 dim
        return torch.randn((2, *shape), generator=g)
    for m in model.modules():
        param = next(m.parameters(recurse=False), None)
        if isinstance(m, nn.Linear):
            return torch.randn(2, m.in_features, generator=g, dtype=param.dtype).to(param.device)
        if isinstance(m, nn.modules.conv._ConvNd):
            size = (2, m.in_channels, *[32] * len(m.kernel_size))  # traced with fake tensors: size costs nothing
            return torch.randn(size, generator=g, dtype=param.dtype).to(param.device)
        if isinstance(m, nn.Embedding):
            return torch.zeros(2, 8, dtype=torch.long, device=param.device)
        if param is not None:
            break
    raise UnsupportedOpError(f"{type(model).__name__}: no example inputs, no input_shape, and no first Linear, "
                             f"Conv or Embedding to guess them from; pass example inputs that match forward")
