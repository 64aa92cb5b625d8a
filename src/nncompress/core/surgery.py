"""Layer surgery: the one place that finds and replaces modules, the wrapper protocol, and the record
of structural edits that `nncompress.load` replays.

Every layer a technique puts in place of a plain one (quantized, low-rank, clustered, grouped,
smoothed, int8) is a `Wrapper` registered once with `@wrapper("name")`. It can be undone
(`merge()`: plain modules computing the same), described as JSON (`describe`) and rebuilt from that
description (`rebuild`) with placeholder tensors that the checkpoint then fills. A technique swaps
layers through `ctx.edits.swap(...)` (or a `Site` from `layer_sites`); `apply` turns what was swapped
into `edits` of the history, and replay rebuilds them without running the technique again.

>>> import torch.nn as nn
>>> edits = Edits()
>>> m = edits.swap(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "1", nn.Identity())
>>> edits.finalize(m)
[{'edit': 'swap', 'name': '1', 'module': {'plain': 'Identity', 'args': {}, 'dtype': None}}]
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Literal

import torch.nn as nn

from .errors import CompositionError, ModelLoadError, TargetError
from .registry import lookup, register
from .targets import Targets
from .wrappers import (Wrapper, build_module, cut_plain, describe_module, get_module, keep_indices, plain_spec,  # noqa: F401
                       set_module, sync_shape, wrapper)

__all__ = ["Wrapper", "wrapper", "get_module", "set_module", "Edits", "Site", "layer_sites", "describe_module",
           "build_module", "replay_edits", "merge_wrappers", "plain_view", "OnWrapped", "keep_indices", "sync_shape",
           "cut_plain", "plain_sites"]

OnWrapped = Literal["through", "merge", "refuse"]



# ------------------------------------------------------------------------------------ recorded edits

class Edits:
    """The structural edits of one `apply`, in order: layer swaps and registered edit kinds.

    A swapped name is described once, after the transform ends, as the module finally there: later
    changes to a swapped layer inside the same transform (QAT's convert) are part of what replays.
    The layer that was there before is referred to as `{"site": true}` (so layers nncompress cannot
    build, such as a model's own classes, can still be wrapped) unless its own structure changed
    meanwhile (a bias added by BN folding), in which case it is described in full.
    """

    def __init__(self) -> None:
        self._events: list[tuple[str, Any]] = []
        self._originals: dict[str, tuple[nn.Module, dict[str, Any] | None]] = {}
        self._touched: set[str] = set()

    def swap(self, model: nn.Module, name: str, new: nn.Module) -> nn.Module:
        """`set_module(model, name, new)`, recorded for replay. Returns the model (or `new` at the root)."""
        self._note(model, name)
        return set_module(model, name, new)

    def touch(self, model: nn.Module, name: str) -> None:
        """Announce an in-place structural change of the module at `name` (a bias added, a wrapper's
        quantizer replaced): it is then described in full, never as the layer that was there."""
        self._note(model, name)
        self._touched.add(name)

    def _note(self, model: nn.Module, name: str) -> None:
        if name not in self._originals:
            old = get_module(model, name)
            self._originals[name] = (old, plain_spec(old))
            self._events.append(("swap", name))

    def add(self, edit: str, **payload: Any) -> None:
        """Record an edit replayed by the function registered as `edit` in the "edit" namespace."""
        self._events.append(("edit", {"edit": edit, **payload}))

    def finalize(self, model: nn.Module) -> list[dict[str, Any]]:
        """The JSON edits: each swapped name described as what is there now; names inside another
        swapped name are covered by its description."""
        swapped = [p for kind, p in self._events if kind == "swap"]
        out = []
        for kind, payload in self._events:
            if kind == "edit":
                out.append(payload)
                continue
            name = payload
            if any(name.startswith(other + ".") for other in swapped if other) or (name and "" in swapped):
                continue
            now = get_module(model, name)
            old, old_spec = self._originals[name]
            unchanged = name not in self._touched and (old_spec is None or plain_spec(old) == old_spec)
            site = old if unchanged else None
            if now is site:
                continue  # swapped and put back unchanged
            out.append({"edit": "swap", "name": name, "module": describe_module(now, site)})
        return out


@register("swap", namespace="edit")
def _replay_swap(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    name = edit.get("name")
    if not isinstance(name, str):
        raise ModelLoadError("manifest: a swap edit without a layer name; the manifest is corrupt")
    try:
        site = get_module(model, name)
    except TargetError:
        raise ModelLoadError(f"manifest: a transform replaced {name!r}, which the rebuilt model does not have; the "
                             "manifest and the model source do not belong together") from None
    return set_module(model, name, build_module(edit.get("module") or {}, site))


def replay_edits(model: nn.Module, edits: Iterable[dict[str, Any]], where: str = "manifest") -> nn.Module:
    """Re-apply recorded edits (structure only; weights come from the checkpoint)."""
    for edit in edits:
        kind = edit.get("edit") if isinstance(edit, dict) else None
        try:
            fn = lookup(str(kind), "edit")
        except KeyError:
            raise ModelLoadError(f"{where}: unknown edit {kind!r}; the checkpoint needs a newer nncompress") from None
        model = fn(model, edit)
    return model


# ------------------------------------------------------------------------------------ target sites

@dataclasses.dataclass
class Site:
    """One layer a layer transform works on.

    name:    where it is in the model
    layer:   what the technique transforms: a plain layer, the merged values of a wrapper that was
             there, or the wrapper itself when the technique takes that wrapper class natively
    wrapped: the value wrapper found at `name`, when `layer` is its merge
    """

    name: str
    layer: nn.Module
    wrapped: Wrapper | None
    rewrap: bool
    _model: list[nn.Module]
    _edits: Edits

    def replace(self, new: nn.Module, rewrap: bool | None = None) -> nn.Module:
        """Put `new` in place of the layer (recorded); with `through` composition (or `rewrap=True`) the
        wrapper that was there is re-applied to every plain layer of `new` (a quantized layer's low-rank
        factors come out quantized). Returns what was put in place."""
        if (self.rewrap if rewrap is None else rewrap) and self.wrapped is not None:
            new = _rewrap_leaves(new, self.wrapped)
        self._model[0] = self._edits.swap(self._model[0], self.name, new)
        return new

    @property
    def model(self) -> nn.Module:
        return self._model[0]


def _rewrap_leaves(new: nn.Module, w: Wrapper) -> nn.Module:
    if type(new) in w.rewrap_types:
        return w.rewrap(new, True)
    leaves = [(name, m) for name, m in new.named_modules() if name and type(m) in w.rewrap_types]
    for i, (name, m) in enumerate(leaves):  # module order is forward order for the factor chains
        set_module(new, name, w.rewrap(m, i == 0))
    return new


def _matches(targets: Targets, name: str, module: nn.Module, inherited: bool) -> bool:
    """`targets` selects `module`: by its own name, or (`inherited`) through a selected container."""
    if inherited:
        return targets.matches_type(module)
    return targets.matches(name, module)


def _candidates(model: nn.Module, targets: Targets) -> list[tuple[str, nn.Module]]:
    """Modules the targets select, looking into containers (a selected low-rank layer selects its
    factors) but not into value wrappers (their insides are theirs)."""
    targets.select(model)  # typos in names and types raise here, listing what the model has
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, m: nn.Module, inherited: bool) -> None:
        excluded = bool(prefix) and targets.excludes(prefix)
        if not excluded and _matches(targets, prefix, m, inherited):
            out.append((prefix, m))
        if isinstance(m, Wrapper) and (m.holds_values or excluded):
            return  # a value wrapper's insides are its own; excluding a container excludes its layers
        selected_container = isinstance(m, Wrapper) and (inherited or targets.matches_name(prefix))
        for key, c in m.named_children():
            walk(f"{prefix}.{key}" if prefix else key, c, inherited or selected_container)

    walk("", model, False)
    return out


def layer_sites(model: nn.Module, targets: Targets, edits: Edits, layers: tuple[type, ...], stage: str,
                on_wrapped: OnWrapped = "through", what: str = "") -> list[Site]:
    """The layers a layer transform works on: targeted modules of exactly one of `layers` (subclasses
    are left alone: their owner may read them directly), and value wrappers standing for one.

    A wrapper class listed in `layers` is handed over as it is. Any other value wrapper is handled by
    `on_wrapped`: "through" (the technique sees its merged layer and the wrapper is re-applied to what
    comes out), "merge" (the technique sees the merged layer; the wrapper is gone), or "refuse" (a
    `CompositionError` naming the layer, what it is and the fix).
    """
    holder = [model]
    sites: list[Site] = []
    for name, m in _candidates(model, targets):
        if type(m) in layers:
            sites.append(Site(name, m, None, False, holder, edits))
        elif isinstance(m, Wrapper) and m.holds_values and m.stands_for in layers:
            if on_wrapped == "refuse":
                raise CompositionError(f"{stage}: layer {name!r} is already {m.summary()}; add a `merge` stage "
                                       f"before {stage}, or run {stage} before the stage that made it")
            sites.append(Site(name, m.merge(), m, on_wrapped == "through", holder, edits))
    if not sites:
        kinds = what or "/".join(t.__name__ for t in layers)
        raise TargetError(f"{stage}: no {kinds} layer among the targets ({targets.short()}); check "
                          "targets.include / types")
    return sites


# ------------------------------------------------------------------------------------ merge, views

def merge_wrappers(model: nn.Module, targets: Targets | None = None, edits: Edits | None = None) -> nn.Module:
    """Replace the targeted wrappers (all by default) by their plain equivalents, innermost first."""
    targets = targets or Targets()
    names = [n for n, m in model.named_modules() if isinstance(m, Wrapper) and targets.matches(n, m)]
    for name in sorted(names, key=lambda n: -n.count(".") - bool(n)):
        new = get_module(model, name).merge()
        model = edits.swap(model, name, new) if edits is not None else set_module(model, name, new)
    return model


class plain_view:
    """Context manager: every value wrapper (and every wrapper that is not a plain chain of layers)
    is temporarily replaced by its `merge()`, so graph analysis and scoring see plain layers.
    `cut_through(record_params)` hands the channel cuts made on the view back to the wrappers; on exit
    the wrappers are put back.

        with plain_view(model) as view:
            record = remove_groups(model, plan)      # edits the plain copies
            view.cut_through(cuts, attrs)            # the wrappers follow
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.swapped: dict[str, Wrapper] = {}

    def __enter__(self) -> "plain_view":
        for name, m in list(self.model.named_modules()):
            if not name or any(name.startswith(s + ".") for s in self.swapped):
                continue
            if isinstance(m, Wrapper) and (m.holds_values or getattr(m, "view_as_merge", False)):
                self.swapped[name] = m
                set_module(self.model, name, m.merge())
        return self

    def cut_through(self, cuts: list[tuple[str, int, list[int]]], attrs: dict[str, dict[str, Any]]) -> None:
        """Hand the view's cuts (`(tensor name, dim, kept indices)`) and changed module attributes
        (`{module name: {attr: value}}`) to the wrappers they fall in."""
        for name, w in self.swapped.items():
            mine: dict[str, dict[int, list[int]]] = {}
            for full, dim, keep in cuts:
                owner, _, tensor = full.rpartition(".")
                if owner == name:
                    mine.setdefault(tensor, {})[int(dim)] = list(keep)
            if mine or attrs.get(name):
                w.cut(mine, dict(attrs.get(name) or {}))

    def __exit__(self, *exc: Any) -> None:
        for name, w in self.swapped.items():
            set_module(self.model, name, w)


class plain_sites:
    """Context manager: the sites' layers as plain modules in the model while inside (a wrapped layer
    is replaced by its merge), the wrappers re-applied to the edited layers on exit (quantized weights
    pruned to 2:4 stay quantized; the zeros are on every grid)."""

    def __init__(self, sites: list[Site]):
        self.sites = sites

    def __enter__(self) -> "plain_sites":
        for s in self.sites:
            if s.wrapped is not None:
                s.replace(s.layer, rewrap=False)
        self.layers = {s.name: s.layer for s in self.sites}
        self.model = self.sites[0].model
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            for s in self.sites:
                if s.wrapped is not None:
                    s.replace(s.layer)
