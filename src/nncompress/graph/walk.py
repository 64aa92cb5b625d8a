"""Walk an exported graph once, giving every tensor dim a channel label (see `spaces`).

`Walk(trace).run()` fills `Walk.sp` (spaces, members, reasons) and `Walk.roles`; `groups.py` turns
the result into `Group`s. Per-op rules live in `rules.py` and `shape_rules.py`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.export.graph_signature import OutputKind
from torch.fx import Node
from torch.utils._pytree import tree_flatten

from .spaces import Label, Spaces
from .trace import Trace, module_of, op_name

Labels = list[Label]
Rule = Callable[["Walk", Node], Any]
RULES: dict[str, Rule] = {}
OUTPUT_REASON = "model output (its width is part of the model's contract)"


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a channel rule for the aten ops `names` (one line at the rule's definition)."""
    def wrap(fn: Rule) -> Rule:
        for name in names:
            if name in RULES:
                raise RuntimeError(f"channel rule for aten.{name} is defined twice")
            RULES[name] = fn
        return fn
    return wrap


class Walk:
    """Labels for every node of one traced graph."""

    def __init__(self, tr: Trace):
        self.tr = tr
        self.sp = Spaces()
        self.labels: dict[Node, Any] = {}
        self.roles: dict[tuple[str, str, int], str] = {}  # (module, param, dim) -> "out" | "in"
        self.param_dim: dict[int, tuple[str, str, int]] = {}  # space made for a param dim -> which
        self.shapes: dict[str, tuple[int, ...]] = {}  # param fqn -> shape at trace time
        self.by_param: dict[str, Labels] = {}  # param fqn -> the labels of its dims

    # --- the walk -------------------------------------------------------------------------
    def run(self) -> "Walk":
        from . import rules, shape_rules  # noqa: F401  (registers the rules)

        for node in self.tr.graph.nodes:
            if node.op == "placeholder":
                self.labels[node] = self._placeholder(node)
            elif node.op == "call_function":
                self.labels[node] = self._call(node)
            elif node.op == "output":
                self._output(node)
            else:  # get_attr: constants and sub-graphs
                self.labels[node] = self.fresh_like(node.meta.get("val"), "a constant")
        return self

    def _placeholder(self, node: Node) -> Any:
        val = node.meta.get("val")
        fqn = self.tr.params.get(node.name)
        if fqn is None:
            return self.fresh_like(val, "model input")
        if not isinstance(val, torch.Tensor) or not val.is_floating_point():
            return self.fresh_like(val, f"{fqn}: integer buffer")
        if fqn in self.by_param:  # a tied tensor can appear as several placeholders: one set of spaces
            return self.by_param[fqn]
        module, _, param = fqn.rpartition(".")
        self.shapes[fqn] = tuple(int(d) for d in val.shape)
        out: Labels = []
        for dim, size in enumerate(val.shape):
            if size == 1:
                out.append(None)
                continue
            s = self.sp.new(int(size))
            self.param_dim[s] = (module, param, dim)
            label = ((s, 0, 1),)
            self.sp.attach(label, module, param, dim)
            out.append(label)
        self.by_param[fqn] = out
        return out

    def _call(self, node: Node) -> Any:
        val = node.meta.get("val")
        if not _has_tensor(val):
            return None  # asserts, sizes, ...: nothing to couple
        ns, name = op_name(node)
        fn = RULES.get(name) if ns == "aten" or (ns, name) == ("", "getitem") else None
        if fn is None and ns == "aten" and name.endswith("_") and not name.endswith("__"):
            fn = RULES.get(name[:-1])  # in-place variant
        if fn is None:
            return self.unknown(node)
        try:
            out = fn(self, node)
        except Exception as e:  # noqa: BLE001  an unforeseen argument form: be safe, say so
            return self.unknown(node, f" (its rule failed: {type(e).__name__}: {e})")
        if out is NotImplemented or not _fits(out, val):
            return self.unknown(node, " for this case")
        return out

    def unknown(self, node: Node, detail: str = "") -> Any:
        """No exact rule: block every space the op reads; its outputs start fixed spaces."""
        where, op = self.where(node), self.op(node)
        reason = f"{where}: no channel rule for {op}{detail}; prune with exclude=['{where}']"
        for arg in tree_flatten((node.args, node.kwargs))[0]:
            if isinstance(arg, Node):
                for label in _flat_labels(self.labels.get(arg)):
                    self.sp.block(label, reason)
        return self.fresh_like(node.meta.get("val"), reason)

    def _output(self, node: Node) -> None:
        specs = self.tr.program.graph_signature.output_specs
        outs = tree_flatten(node.args)[0]
        for i, arg in enumerate(outs):
            if isinstance(arg, Node):
                kind = specs[i].kind if i < len(specs) else OutputKind.USER_OUTPUT
                reason = OUTPUT_REASON if kind == OutputKind.USER_OUTPUT else f"mutated buffer {specs[i].target}"
                for label in _flat_labels(self.labels.get(arg)):
                    self.sp.block(label, reason)

    # --- helpers for the rules ------------------------------------------------------------
    def lab(self, x: Any) -> Labels:
        """The labels of a tensor argument (stored form; the spaces resolve them)."""
        out = self.labels.get(x) if isinstance(x, Node) else None
        if not isinstance(out, list):
            raise TypeError(f"{x} is not a traced tensor")
        return out

    @staticmethod
    def shape(x: Any) -> tuple[int, ...]:
        val = x.meta.get("val") if isinstance(x, Node) else None
        if isinstance(val, (tuple, list)):
            val = val[0]
        if not isinstance(val, torch.Tensor):
            raise TypeError(f"{x} is not a traced tensor")
        return tuple(int(d) for d in val.shape)

    @staticmethod
    def is_tensor(x: Any) -> bool:
        return isinstance(x, Node) and isinstance(x.meta.get("val"), torch.Tensor)

    def where(self, node: Node) -> str:
        return module_of(node)[0] or self.tr.model_class

    def module(self, node: Node) -> Any:
        """The innermost module object that ran `node` (None at the top level)."""
        fqn = module_of(node)[0]
        return self.tr.modules.get(fqn) if fqn else None

    @staticmethod
    def op(node: Node) -> str:
        ns, name = op_name(node)
        return f"{ns}.{name}" if ns else name

    def fresh(self, size: int, reason: str) -> Label:
        """A new fixed (never prunable) space for a dim of `size`; None for size 1."""
        return None if size == 1 else ((self.sp.new(size, reason), 0, 1),)

    def fresh_like(self, val: Any, reason: str) -> Any:
        if isinstance(val, torch.Tensor):
            return [self.fresh(int(d), reason) for d in val.shape]
        if isinstance(val, (tuple, list)):
            return tuple(self.fresh_like(v, reason) for v in val)
        return None

    def unify(self, a: Label, b: Label, where: str, mark: str = "") -> None:
        self.sp.unify(a, b, mark, where)

    def block(self, labels: Any, reason: str) -> None:
        for label in _flat_labels(labels):
            self.sp.block(label, reason)

    def role(self, label: Label, role: str) -> None:
        """Mark the parameter dims in `label` as the "out" or "in" side of a layer."""
        for s, _, _ in label or ():
            key = self.param_dim.get(s)
            if key is not None:
                self.roles.setdefault(key, role)

    def bind(self, node: Node) -> dict[str, Any]:
        """The op's arguments by schema name, defaults filled in."""
        schema = node.target._schema
        out: dict[str, Any] = {}
        for i, a in enumerate(schema.arguments):
            if i < len(node.args):
                out[a.name] = node.args[i]
            elif a.name in node.kwargs:
                out[a.name] = node.kwargs[a.name]
            else:
                out[a.name] = a.default_value if a.has_default_value() else None
        return out

    def broadcast(self, out_shape: tuple[int, ...], operands: list[tuple[Labels, tuple[int, ...]]],
                  where: str, mark: str = "") -> Labels:
        """Elementwise coupling with broadcasting: equal-size aligned dims are the same channels."""
        n = len(out_shape)
        out: Labels = []
        for j, size in enumerate(out_shape):
            cands = []
            for labels, shape in operands:
                k = j - (n - len(shape))
                if k >= 0 and shape[k] == size and size != 1 and labels[k] is not None:
                    cands.append(labels[k])
            for c in cands[1:]:
                self.unify(cands[0], c, where, mark)
            out.append(cands[0] if cands else None)
        return out


def _has_tensor(val: Any) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (tuple, list)) and any(_has_tensor(v) for v in val)


def _fits(labels: Any, val: Any) -> bool:
    """Does a rule's result have one label per dim of each output tensor?"""
    if isinstance(val, torch.Tensor):
        return isinstance(labels, list) and len(labels) == val.dim()
    if isinstance(val, (tuple, list)):
        return isinstance(labels, tuple) and len(labels) == len(val) and all(_fits(l, v) for l, v in zip(labels, val))
    return labels is None


def _flat_labels(labels: Any) -> list[Label]:
    if isinstance(labels, list):
        return [l for l in labels if l is not None]
    if isinstance(labels, tuple):
        return [l for sub in labels for l in _flat_labels(sub)]
    return []
