"""Physically remove coupled channels from the eager model, and replay that edit later.

`remove_channels(model, group, drop)` slices every member of a `Group` (from
`nncompress.graph.DependencyGraph`) along its dim, replaces the Parameters (so optimizers built
afterwards see the new shapes), updates module attributes (`out_channels`, `in_features`,
`num_features`, `normalized_shape`, `groups` of depthwise convs, ...) and Hugging Face config fields
such as `intermediate_size`. It returns a JSON-serialisable record of the kept indices, and
`apply_record(fresh_model, record)` replays exactly that edit without tracing or data.

>>> import torch, torch.nn as nn
>>> from nncompress.graph import DependencyGraph
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> group = DependencyGraph(net, torch.zeros(2, 4)).group_of("0")
>>> record = remove_channels(net, group, drop=[1, 5])
>>> net[0].out_features, net[2].in_features, record["params"][0]["keep"]
(6, 6, [0, 2, 3, 4, 6, 7])
>>> twin = apply_record(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), record)
>>> twin[2].weight.shape
torch.Size([2, 6])
"""
from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..core.errors import ConfigError, ModelLoadError, UnsupportedOpError
from ..graph.groups import Group

__all__ = ["apply_record", "remove_channels", "remove_groups"]

RECORD_FORMAT = 1
_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                "normalized_shape", "num_channels", "num_groups", "num_embeddings", "embedding_dim",
                "num_parameters", "nf", "nx")
_FFN_FIELDS = ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "dim_feedforward", "encoder_ffn_dim",
               "decoder_ffn_dim")


def remove_channels(model: nn.Module, group: Group, drop: Sequence[int]) -> dict[str, Any]:
    """Remove channels `drop` (indices in `range(group.size)`) of `group` from `model`, in place.

    Returns the record `apply_record` replays. Removing no channels changes nothing; removing all
    of them raises `ConfigError`. Groups are only valid for the model as it was traced: to remove
    channels of several groups from one graph, pass them together to `remove_groups`.
    """
    return remove_groups(model, [(group, drop)])


def remove_groups(model: nn.Module, plan: Iterable[tuple[Group, Sequence[int]]]) -> dict[str, Any]:
    """Remove channels of several groups of one graph at once; returns one record.

    >>> import torch, torch.nn as nn
    >>> from nncompress.graph import DependencyGraph
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> graph = DependencyGraph(net, torch.zeros(2, 4))
    >>> _ = remove_groups(net, [(graph.group_of("0"), [0]), (graph.group_of("2"), [1, 2])])
    >>> [tuple(m.weight.shape) for m in net if isinstance(m, nn.Linear)]
    [(7, 4), (6, 7), (2, 6)]
    """
    drops, traced = _plan_drops(plan)
    if not drops:
        return _empty_record()
    tensors = {key: _find(model, key[0]) for key in drops}
    for key, t in tensors.items():
        if isinstance(t, torch.Tensor) and traced[key] >= 0 and t.shape[key[1]] != traced[key]:
            raise ConfigError("group", f"{key[0]} has {t.shape[key[1]]} entries along dim {key[1]} but the graph "
                                       f"saw {traced[key]}; the model changed since the graph was built: build a "
                                       f"new DependencyGraph, or remove several groups at once with remove_groups")
    holders = _holders(model)
    touched = {key[0].rpartition(".")[0] for key in drops}  # owners, and every module sharing a tensor
    touched |= {name for t in tensors.values() if isinstance(t, torch.Tensor) for name, _, _ in holders.get(id(t), [])}
    before = {name: _shape_attrs(model.get_submodule(name)) for name in touched}
    linears = _linear_widths(model)
    record = _empty_record()
    attr_drops: dict[str, dict[str, int]] = {}
    for (name, dim), idx in drops.items():
        if not isinstance(tensors[(name, dim)], torch.Tensor):  # a shape attribute (weightless LayerNorm)
            module, _, attr = name.rpartition(".")
            attr_drops.setdefault(module, {})[attr] = len(idx)
            continue
        t = _find(model, name)  # the current tensor: an earlier edit may have replaced it
        keep = [i for i in range(t.shape[dim]) if i not in idx]
        _slice(holders, t, dim, keep)
        record["params"].append({"name": name, "dim": dim, "size": int(t.shape[dim]), "keep": keep})
    for name in sorted(touched):
        changed = _new_attrs(model.get_submodule(name), before[name], attr_drops.get(name, {}))
        if changed:
            _set_attrs(model.get_submodule(name), changed)
            record["modules"][name] = _plain(changed)
    parents = {name.rpartition(".")[0] for name in touched if name}
    for name, attrs in _sync_attention(model, parents).items():
        record["modules"].setdefault(name, {}).update(attrs)
    record["configs"] = _sync_hf_configs(model, linears)
    for prefix, fields in _sync_head_configs(model, parents).items():
        record["configs"].setdefault(prefix, {}).update(fields)
    return record


def _plan_drops(plan: Iterable[tuple[Group, Sequence[int]]]) -> tuple[dict, dict]:
    """`(param or attribute fqn, dim) -> indices to remove` over all groups, and each dim's traced size."""
    drops: dict[tuple[str, int], set[int]] = {}
    traced: dict[tuple[str, int], int] = {}
    for group, drop in plan:
        channels = _check_drop(group, drop)
        for m, size in zip(group.members, group.dim_sizes or (-1,) * len(group.members)):
            key = (m.name, m.dim)
            drops.setdefault(key, set()).update(m.offset + c * m.stride + k for c in channels for k in range(m.stride))
            traced[key] = size
    return {k: v for k, v in drops.items() if v}, traced


def apply_record(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Replay a record from `remove_channels` on a model of the original architecture; in place.

    Only shapes change (weights are sliced from whatever the model holds); load the pruned
    weights afterwards. Records of successive removals replay in the order they were made.
    """
    if not isinstance(record, Mapping) or record.get("format") != RECORD_FORMAT:
        got = repr(record.get("format")) if isinstance(record, Mapping) else type(record).__name__
        raise ModelLoadError(f"apply_record: expected a record from remove_channels (format {RECORD_FORMAT}), "
                             f"got {got}")
    holders = _holders(model)
    for edit in record.get("params", []):
        name, dim, size = edit["name"], int(edit["dim"]), int(edit["size"])
        try:
            t = _find(model, name)
        except (AttributeError, KeyError):
            raise ModelLoadError(f"apply_record: the model has no {name}; replay on the architecture the record "
                                 f"was made from") from None
        if not isinstance(t, torch.Tensor) or t.dim() <= dim or t.shape[dim] != size:
            have = t.shape[dim] if isinstance(t, torch.Tensor) and t.dim() > dim else "no"
            raise ModelLoadError(f"apply_record: {name} has {have} entries along dim {dim}, the record expects "
                                 f"{size}; replay records in order on the architecture they were made from")
        _slice(holders, t, dim, [int(i) for i in edit["keep"]])
    for name, attrs in record.get("modules", {}).items():
        _set_attrs(model.get_submodule(name), attrs)
    for name, fields in record.get("configs", {}).items():
        config = model.get_submodule(name).config
        for field, value in fields.items():
            setattr(config, field, value)
    return model


# --- checks -----------------------------------------------------------------------------------
def _check_drop(group: Group, drop: Sequence[int]) -> list[int]:
    if not isinstance(group, Group):
        raise TypeError(f"expected a Group from DependencyGraph.groups(), got {type(group).__name__}")
    try:
        if any(isinstance(c, bool) for c in drop):
            raise TypeError
        channels = sorted({operator.index(c) for c in drop})
    except TypeError:
        raise ConfigError("drop", f"channel indices must be integers, got {list(drop)[:5]!r}") from None
    if not channels:
        return []
    who = ", ".join(group.producers) or "?"
    if not group.prunable:
        raise UnsupportedOpError(f"{who}: these channels cannot be removed ({group.reason})")
    if channels[0] < 0 or channels[-1] >= group.size:
        raise ConfigError("drop", f"channel {channels[0] if channels[0] < 0 else channels[-1]} is out of range "
                                  f"for the {group.size} channels of {who}")
    if len(channels) == group.size:
        raise ConfigError("drop", f"removing all {group.size} channels of {who} would leave the layer empty; "
                                  f"keep at least one")
    return channels


def _empty_record() -> dict[str, Any]:
    return {"format": RECORD_FORMAT, "params": [], "modules": {}, "configs": {}}


# --- tensors ----------------------------------------------------------------------------------
def _find(model: nn.Module, name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module), attr)


def _holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(tensor) -> every (module name, module, attribute) holding it (tied weights have several)."""
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for attr, t in table.items():
                if t is not None:
                    out.setdefault(id(t), []).append((name, module, attr))
    return out


def _slice(holders: dict, t: torch.Tensor, dim: int, keep: list[int]) -> None:
    """Replace `t` by its slice in every module holding it (a new Parameter: optimizers see the new shape)."""
    with torch.no_grad():
        data = t.detach().index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device)).clone()
    new = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    places = holders.pop(id(t), [])
    for _, module, attr in places:
        if attr in module._parameters:
            module._parameters[attr] = new
        else:
            module._buffers[attr] = new
    holders[id(new)] = places


# --- module attributes ------------------------------------------------------------------------
def _shape_attrs(module: nn.Module) -> dict[str, Any]:
    return {a: getattr(module, a) for a in _SHAPE_ATTRS if isinstance(getattr(module, a, None), (int, tuple))}


def _new_attrs(module: nn.Module, old: dict[str, Any], attr_drops: dict[str, int]) -> dict[str, Any]:
    """The shape attributes `module` should have now that its tensors were sliced."""
    w = getattr(module, "weight", None)
    w = w if isinstance(w, torch.Tensor) else None
    new = dict(old)
    if isinstance(module, nn.modules.conv._ConvNd) and w is not None:
        g = old["groups"]
        if module.transposed:
            new.update(in_channels=w.shape[0], out_channels=w.shape[1] * g)
        elif g > 1 and g == old["in_channels"] == old["out_channels"]:  # depthwise: one channel per group
            new.update(in_channels=w.shape[0], out_channels=w.shape[0], groups=w.shape[0])
        else:
            new.update(out_channels=w.shape[0], in_channels=w.shape[1] * g)
    elif isinstance(module, nn.Linear) and w is not None:
        new.update(out_features=w.shape[0], in_features=w.shape[1])
    elif isinstance(module, nn.Embedding) and w is not None:
        new.update(num_embeddings=w.shape[0], embedding_dim=w.shape[1])
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        ref = w if w is not None else getattr(module, "running_mean", None)
        if ref is not None:
            new["num_features"] = ref.shape[0]
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        shape = list(old["normalized_shape"])
        if w is not None:
            shape = list(w.shape)
        else:
            shape[-1] -= attr_drops.get("normalized_shape", 0)
        new["normalized_shape"] = tuple(shape)
    elif isinstance(module, nn.GroupNorm):
        c = w.shape[0] if w is not None else old["num_channels"] - attr_drops.get("num_channels", 0)
        if old["num_groups"] == old["num_channels"]:
            new["num_groups"] = c
        new["num_channels"] = c
    elif type(module).__name__ == "Conv1D" and w is not None and w.dim() == 2:  # transformers' GPT-2 layer
        new.update(nx=w.shape[0], nf=w.shape[1])  # weight (in, out); forward views its output to (..., nf)
    elif isinstance(module, nn.PReLU) and w is not None:
        new["num_parameters"] = w.numel()
    return {k: int(v) if not isinstance(v, tuple) else tuple(int(x) for x in v)
            for k, v in new.items() if v != old.get(k)}


def _set_attrs(module: nn.Module, attrs: Mapping[str, Any]) -> None:
    for attr, value in attrs.items():
        setattr(module, attr, tuple(value) if attr == "normalized_shape" else value)


def _plain(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}


# --- Hugging Face configs ---------------------------------------------------------------------
def _linear_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _sync_hf_configs(model: nn.Module, before: dict[str, int]) -> dict[str, dict[str, int]]:
    """Keep a transformers config's FFN width (e.g. `intermediate_size`) true when every FFN layer agrees.

    The FFN layers are the Linear layers that produced that width, and every layer named like them
    (`encoder.layer.#.intermediate.dense`). When they end up with different widths the config keeps
    its value and the record's per-module sizes carry the truth.
    """
    out: dict[str, dict[str, int]] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None or id(config) in seen or not any(c.__name__.lower() == "pretrainedconfig" for c in type(config).__mro__):
            continue
        seen.add(id(config))
        under = {n: w for n, w in before.items() if not prefix or n.startswith(prefix + ".")}
        for field in _FFN_FIELDS:
            value = getattr(config, field, None)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            side = field.partition("_")[0] if field.startswith(("encoder_", "decoder_")) else None
            # encoder_ffn_dim describes the encoder's layers only, even where both widths are equal
            pool = {n: w for n, w in under.items() if side is None or _side(model, n) == side}
            patterns = {_pattern(n) for n, w in pool.items() if w == value}
            layers = [n for n in pool if _pattern(n) in patterns]
            now = {model.get_submodule(n).out_features for n in layers}
            if layers and len(now) == 1 and (width := now.pop()) != value:
                setattr(config, field, width)
                out.setdefault(prefix, {})[field] = width
    return out


def _side(model: nn.Module, name: str) -> str | None:
    """Which side of an encoder-decoder `name` is on: the innermost enclosing class naming one side, else None."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        cls = type(model.get_submodule(".".join(parts[:i]))).__name__.lower()
        if ("encoder" in cls) != ("decoder" in cls):
            return "encoder" if "encoder" in cls else "decoder"
    return None


# --- attention heads --------------------------------------------------------------------------
_HEAD_SIZE = ("attention_head_size", "head_dim", "head_size", "d_head", "dim_per_head")
_HEAD_COUNT = ("num_attention_heads", "num_heads", "n_heads", "n_head")
_KV_COUNT = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_QUERY = ("query", "q_proj", "q", "q_lin", "wq", "to_q")
_KEY = ("key", "k_proj", "k", "k_lin", "wk", "to_k")


def _sync_attention(model: nn.Module, parents: set[str]) -> dict[str, dict[str, int]]:
    """Head counts of attention modules whose Q/K projections lost heads, from the projections' widths.

    An attention module is one with an int head size (`attention_head_size`, `head_dim`, ...) and a
    query projection child (`query`, `q_proj`, ...); its head counts (`num_attention_heads`,
    `num_key_value_heads`, `all_head_size`, ...) are set to what the sliced projections now hold.
    """
    out: dict[str, dict[str, int]] = {}
    for name in sorted(parents):
        module = model.get_submodule(name)
        size = next((getattr(module, a) for a in _HEAD_SIZE if _is_int(getattr(module, a, None))), None)
        q = next((getattr(module, a) for a in _QUERY if isinstance(getattr(module, a, None), nn.Linear)), None)
        k = next((getattr(module, a) for a in _KEY if isinstance(getattr(module, a, None), nn.Linear)), None)
        if not size or q is None or q.out_features % size:
            continue
        heads = q.out_features // size
        want = {a: heads for a in _HEAD_COUNT if _is_int(getattr(module, a, None))}
        if _is_int(getattr(module, "all_head_size", None)):
            want["all_head_size"] = heads * size
        if k is not None and k.out_features % size == 0:
            want |= {a: k.out_features // size for a in _KV_COUNT if _is_int(getattr(module, a, None))}
        changed = {a: v for a, v in want.items() if getattr(module, a) != v}
        if changed:
            _set_attrs(module, changed)
            out[name] = changed
    return out


def _sync_head_configs(model: nn.Module, touched: set[str]) -> dict[str, dict[str, int]]:
    """Head counts in a transformers config, when every attention module under it agrees.

    Only configs with an explicit `head_dim` field (LLaMA, Mistral, Qwen, ...) are updated, and only
    when the result passes the config's own validation (transformers 5 wants `hidden_size` to be a
    multiple of the head count). A config that derives the head size as `hidden_size //
    num_attention_heads` (BERT, ViT, ...) cannot describe fewer heads of the same size (and
    transformers 5 dropped `pruned_heads`), so it keeps its values: `from_pretrained` then cannot
    rebuild the pruned shapes, and the record (`apply_record` on the base architecture) carries them.
    """
    out: dict[str, dict[str, int]] = {}
    attention = _attention_modules(model)
    if not touched & set(attention):
        return out
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None or not _is_int(getattr(config, "head_dim", None)) or id(config) in seen:
            continue
        seen.add(id(config))
        under = [n for n in attention if not prefix or n.startswith(prefix + ".")]
        if not touched & set(under):
            continue
        fields: dict[str, int] = {}
        for field, attrs in (("num_attention_heads", _HEAD_COUNT), ("num_key_value_heads", _KV_COUNT)):
            seen = {_head_count(model.get_submodule(n), attrs, field) for n in under}
            seen.discard(None)
            if len(seen) == 1 and _is_int(getattr(config, field, None)) and (v := seen.pop()) != getattr(config, field):
                fields[field] = v
        old = {field: getattr(config, field) for field in fields}
        for field, value in fields.items():
            setattr(config, field, value)
        try:
            getattr(config, "validate_architecture", lambda: None)()
        except ValueError:  # e.g. hidden_size must be a multiple of the head count: the record keeps the shapes
            for field, value in old.items():
                setattr(config, field, value)
            continue
        if fields:
            out[prefix] = fields
    return out


def _attention_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if any(_is_int(getattr(m, a, None)) for a in _HEAD_SIZE)
            and any(isinstance(getattr(m, a, None), nn.Linear) for a in _QUERY)]


def _head_count(module: nn.Module, attrs: tuple[str, ...], field: str) -> int | None:
    """Heads of an attention module, from its attributes or else from its projections' widths."""
    for a in attrs:
        if _is_int(getattr(module, a, None)):
            return getattr(module, a)
    size = next(getattr(module, a) for a in _HEAD_SIZE if _is_int(getattr(module, a, None)))
    names = _QUERY if field == "num_attention_heads" else _KEY
    proj = next((getattr(module, a) for a in names if isinstance(getattr(module, a, None), nn.Linear)), None)
    return proj.out_features // size if proj is not None and proj.out_features % size == 0 else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".#.", name)
