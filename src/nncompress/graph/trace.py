"""Trace a model once with `torch.export` (non-strict) and map the graph back to modules.

The model is never modified: it is traced in eval mode under `no_grad` with key/value caches off
(`tracing_mode`), and every module's training flag and every config's `use_cache` are restored
afterwards, even when export fails.

>>> import torch, torch.nn as nn
>>> tr = trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.randn(2, 4))
>>> tr.params["p_0_weight"], [module_of(n)[0] for n in tr.calls()]
('0.weight', ['0', '1'])
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Node

from ..core.errors import UnsupportedOpError
from ..core.logs import quiet_loggers

__all__ = ["Trace", "trace", "module_of", "op_name", "split_inputs", "tracing_mode"]


@dataclasses.dataclass(frozen=True)
class Trace:
    """An exported program plus what the graph walk needs to name things.

    params:  placeholder name -> fully qualified name of the parameter or buffer it stands for
    inputs:  placeholder names of the user's inputs
    modules: fully qualified name -> module (read only; used for type checks and `Targets`)
    """

    program: ExportedProgram
    model_class: str
    params: dict[str, str]
    inputs: tuple[str, ...]
    modules: dict[str, nn.Module]

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    def calls(self) -> Iterator[Node]:
        """The `call_function` nodes, in execution order."""
        return (n for n in self.graph.nodes if n.op == "call_function")


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`(args, kwargs)` for a tensor, a tuple/list of positional inputs, or a mapping of keyword inputs."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


# torch logs a failed export's whole graph as a warning; the typed one-line error says what matters
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")


def trace(model: nn.Module, example_inputs: Any) -> Trace:
    """Export `model` on `example_inputs` (a tensor, a tuple of them, or a dict for `model(**inputs)`).

    Raises `UnsupportedOpError` naming the model class, the cause and the fix when export fails.
    """
    cls = type(model).__name__
    args, kwargs = split_inputs(example_inputs)
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise UnsupportedOpError(f"{cls}: example inputs do not match forward ({e}); pass example inputs "
                                 f"that match forward") from None
    except ValueError:  # no signature: let export check
        pass
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False  # a cache is an output export cannot flatten, and the graph has no use for it
    try:
        with tracing_mode(model), torch.no_grad(), quiet_loggers(*_EXPORT_LOGGERS, stderr=True):
            program = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:  # noqa: BLE001  any failure inside export is reported the same way
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise UnsupportedOpError(f"{cls}: torch.export cannot trace the model ({type(e).__name__}: {first}); "
                                 f"pass example inputs that match forward, and keep data-dependent Python "
                                 f"control flow out of forward") from None
    # a tied tensor has several names: use the first one in model order, as named_parameters() does
    first = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    params, inputs = {}, []
    for spec in program.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target is not None:
            t = state.get(spec.target)
            params[spec.arg.name] = first.get(id(t), spec.target) if t is not None else spec.target
        elif spec.kind == InputKind.USER_INPUT:
            inputs.append(spec.arg.name)
    return Trace(program, cls, params, tuple(inputs), dict(model.named_modules()))


@contextlib.contextmanager
def tracing_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with key/value caches off, restored on exit (also on error).

    Transformers decoders build a `DynamicCache` when their config says `use_cache=True` (the
    default) and return it; export cannot flatten that output, and the graph has no use for it.
    Every config reachable from a module's `config` attribute (sub-configs such as `text_config`
    included) that has a boolean `use_cache` is switched off for the duration.

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    >>> with tracing_mode(net):
    ...     net.training
    False
    >>> net.training
    True
    """
    modes = [(m, m.training) for m in model.modules()]
    caches = [(c, c.use_cache) for c in _cache_configs(model)]
    try:
        model.eval()
        for config, _ in caches:
            config.use_cache = False
        yield model
    finally:
        for config, value in caches:
            config.use_cache = value
        for m, mode in modes:
            m.training = mode


def _cache_configs(model: nn.Module) -> list[Any]:
    """The distinct configs (and their sub-configs) of `model`'s modules whose `use_cache` is True."""
    seen: dict[int, Any] = {}
    todo = [getattr(m, "config", None) for m in model.modules()]
    while todo:
        config = todo.pop()
        if config is None or id(config) in seen or isinstance(config, (nn.Module, torch.Tensor)):
            continue
        seen[id(config)] = config
        for value in vars(config).values() if hasattr(config, "__dict__") else ():
            if type(value).__name__.endswith("Config"):  # sub-configs: text_config, decoder, ...
                todo.append(value)
    return [c for c in seen.values() if getattr(c, "use_cache", None) is True]


def module_of(node: Node) -> tuple[str, str]:
    """`(fqn, class path)` of the innermost module that ran `node`; `("", "")` at the top level."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    fqn, cls = list(stack.values())[-1]
    return fqn, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def op_name(node: Node) -> tuple[str, str]:
    """`(namespace, name)` of a call: `("aten", "conv2d")`, `("", "getitem")`, `("mylib", "twist")`."""
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is not None:
        ns, _, name = schema.name.partition("::")
        return ns, name
    return "", getattr(target, "__name__", str(target))
