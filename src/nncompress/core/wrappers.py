"""The wrapper protocol and the plain layers it builds on: find and replace a module, the `Wrapper`
base every wrapping layer implements and registers once (`@wrapper("name")`), slicing a layer's
tensors, and the JSON form of plain layers (`describe_module` / `build_module`).

>>> import torch.nn as nn
>>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
>>> _ = set_module(m, "1", nn.Identity())
>>> type(get_module(m, "1")).__name__
'Identity'
>>> build_module(describe_module(nn.Linear(3, 2, bias=False)))
Linear(in_features=3, out_features=2, bias=False)
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from .errors import CompositionError, ModelLoadError, TargetError
from .registry import lookup, register

__all__ = ["Wrapper", "wrapper", "get_module", "set_module", "keep_indices", "sync_shape", "cut_plain",
           "describe_module", "build_module", "plain_spec", "Describe", "Build"]

Describe = Callable[[nn.Module], dict[str, Any]]
Build = Callable[[dict[str, Any]], nn.Module]


# ------------------------------------------------------------------------------------ find and replace

def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule `name` (dotted; "" is the model); a missing name raises `TargetError`."""
    if not name:
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise TargetError(f"{type(model).__name__} has no module {name!r}") from None


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at `name` (dotted); returns the model, or `new` itself when `name` is "" (the root)."""
    if not name:
        return new
    parent, _, attr = name.rpartition(".")
    setattr(get_module(model, parent), attr, new)
    return model


# ------------------------------------------------------------------------------------ the protocol

class Wrapper(nn.Module):
    """Base of every layer a technique puts in place of a plain one.

    holds_values: True when the wrapper *is* one layer's values in another form (quantized, clustered,
                  int8): other techniques see its `merge()` (and may re-apply it to what they make,
                  `rewrap`). False for containers of plain layers (low-rank factors, a grouped conv, a
                  smoothing scale): other techniques reach the plain layers inside.
    stands_for:   the plain layer class it replaces (so `Targets(types=("Linear",))` still selects it)
    """

    kind: ClassVar[str] = ""
    holds_values: ClassVar[bool] = False
    rewrap_types: ClassVar[tuple[type, ...]] = ()  # plain layers `rewrap` accepts

    @property
    def stands_for(self) -> type | None:
        """The plain class a value wrapper replaces (containers: None)."""
        return None

    def merge(self) -> nn.Module:
        """Plain modules computing what this wrapper computes (exactly, or as its docstring states)."""
        raise NotImplementedError

    def describe(self, child: Describe) -> dict[str, Any]:
        """Its structure as JSON (no tensor values: those come from the checkpoint); `child(m)`
        describes an inner module."""
        raise NotImplementedError

    @classmethod
    def rebuild(cls, desc: dict[str, Any], child: Build) -> "Wrapper":
        """The structure `describe` wrote, with placeholder tensors; `child(d)` builds an inner module."""
        raise NotImplementedError

    def rewrap(self, layer: nn.Module, first: bool) -> nn.Module:
        """The same technique applied to another plain layer (e.g. the factors of a low-rank
        decomposition of this layer); `first`: the layer reads this wrapper's own input (the first
        factor). Value wrappers only."""
        raise CompositionError(f"{type(self).__name__} cannot be re-applied to another layer")

    def cut(self, cuts: dict[str, dict[int, list[int]]], attrs: dict[str, Any]) -> None:
        """Structured pruning reached this wrapper through its plain view: keep only the indices
        `cuts[tensor][dim]` of the view's tensors ("weight", "bias"), set the view's changed
        attributes `attrs` (e.g. `groups`), and update its own state."""
        raise CompositionError(f"{type(self).__name__} cannot be pruned through; merge it first")

    def summary(self) -> str:
        """What it is, in a few words, for messages ("quantized (int4 weights)")."""
        return type(self).__name__


def keep_indices(module: nn.Module, tensor: str, dim: int, keep: list[int]) -> None:
    """Replace `module.<tensor>` (a parameter or buffer) by its entries `keep` along `dim` (a new
    tensor of the same kind, so optimizers built afterwards see the new shape)."""
    t = getattr(module, tensor)
    if t is None:
        return
    idx = torch.as_tensor(keep, dtype=torch.long, device=t.device)
    new = t.detach().index_select(dim, idx).clone()
    if isinstance(t, nn.Parameter):
        setattr(module, tensor, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(module, tensor, new)


def sync_shape(module: nn.Module) -> None:
    """Set a Linear / Conv / Embedding's size attributes from its (sliced) weight."""
    w = module.weight
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = w.shape


def cut_plain(module: nn.Module, cuts: dict[str, dict[int, list[int]]], attrs: dict[str, Any]) -> None:
    """Apply a plain view's cuts and attribute changes (`groups` of a depthwise conv) to `module`."""
    for tensor, dims in cuts.items():
        for dim, keep in dims.items():
            keep_indices(module, tensor, dim, keep)
    for attr, value in attrs.items():
        setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    sync_shape(module)


def wrapper(name: str):
    """Class decorator: register a `Wrapper` subclass under `name` (what manifests call it)."""
    def wrap(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Wrapper)):
            raise TypeError(f"@wrapper({name!r}) decorates Wrapper subclasses, not {cls!r}")
        cls.kind = name
        return register(name, namespace="wrapper")(cls)
    return wrap


# ------------------------------------------------------------------------------------ plain modules

def _conv_args(m: nn.Module) -> dict[str, Any]:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
            "padding_mode": m.padding_mode}


_PLAIN: dict[str, tuple[type, Callable[[nn.Module], dict[str, Any]]]] = {
    "Identity": (nn.Identity, lambda m: {}),
    "Linear": (nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                                     "bias": m.bias is not None}),
    "Conv1d": (nn.Conv1d, _conv_args), "Conv2d": (nn.Conv2d, _conv_args), "Conv3d": (nn.Conv3d, _conv_args),
    "Embedding": (nn.Embedding, lambda m: {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                                           "padding_idx": m.padding_idx, "max_norm": m.max_norm,
                                           "norm_type": m.norm_type, "scale_grad_by_freq": m.scale_grad_by_freq,
                                           "sparse": m.sparse}),
}


def _dtype_of(m: nn.Module) -> str | None:
    t = next(iter(m.parameters(recurse=False)), None)
    return None if t is None else str(t.dtype).removeprefix("torch.")


def describe_module(m: nn.Module, site: nn.Module | None = None) -> dict[str, Any]:
    """JSON structure of `m`: `{"site": true}` for the module that was at the swapped name before,
    a registered wrapper's own description, or a plain layer's constructor arguments."""
    def child(x: nn.Module) -> dict[str, Any]:
        if site is not None and x is site:
            return {"site": True}
        if isinstance(x, Wrapper):
            return {"wrapper": x.kind, **x.describe(child)}
        entry = _PLAIN.get(type(x).__name__)
        if entry is None or type(x) is not entry[0]:
            raise CompositionError(f"cannot record a {type(x).__name__} put in the model: only registered wrappers "
                                   f"and {', '.join(_PLAIN)} can be rebuilt on load")
        return {"plain": type(x).__name__, "args": entry[1](x), "dtype": _dtype_of(x)}
    return child(m)


def _tuple_args(args: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def build_module(desc: dict[str, Any], site: nn.Module | None = None) -> nn.Module:
    """The module `describe_module` described, with placeholder tensors (the checkpoint fills them)."""
    def child(d: dict[str, Any]) -> nn.Module:
        if not isinstance(d, dict):
            raise ModelLoadError(f"manifest: a module description must be a mapping, got {type(d).__name__}")
        if d.get("site"):
            if site is None:
                raise ModelLoadError("manifest: a module refers to the swapped layer, but there is none")
            return site
        if "wrapper" in d:
            try:
                cls = lookup(d["wrapper"], "wrapper")
            except KeyError:
                raise ModelLoadError(f"manifest: unknown layer wrapper {d['wrapper']!r}; the checkpoint needs a newer "
                                     "nncompress") from None
            return cls.rebuild(d, child)
        name = d.get("plain")
        if name not in _PLAIN:
            raise ModelLoadError(f"manifest: cannot build a {name!r} layer; known: {', '.join(_PLAIN)}")
        kwargs = _tuple_args(d.get("args") or {})
        if d.get("dtype"):
            kwargs["dtype"] = getattr(torch, str(d["dtype"]))
        try:
            return _PLAIN[name][0](**kwargs)
        except (TypeError, ValueError, AttributeError) as e:
            raise ModelLoadError(f"manifest: bad arguments for a {name} layer ({e}); the manifest is corrupt") from None
    return child(desc)


def plain_spec(m: nn.Module) -> dict[str, Any] | None:
    """Constructor arguments and dtype of a plain layer nncompress can build, else None."""
    entry = _PLAIN.get(type(m).__name__)
    if entry is None or type(m) is not entry[0]:
        return None
    return {"args": entry[1](m), "dtype": _dtype_of(m)}
