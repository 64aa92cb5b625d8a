"""Layer pruning: drop whole residual blocks (ResNet/MobileNetV2 blocks, transformer layers).

A block whose output is `x + f(x)` can be removed outright: the model then computes `x` where it
computed `x + f(x)`, exactly the model with that block's residual branch `f` zeroed. Which blocks
matter least is measured on calibration data:

- `angular`: the angular distance arccos(cos(x, y)) / pi between a block's input and output (Gromov et
  al. 2024, "The unreasonable ineffectiveness of the deeper layers"); with `contiguous=True` the
  `count` consecutive blocks whose first input is closest to their last output go together, as in
  the paper,
- `cosine`: 1 - cos(x, y) ("block influence", ShortGPT),
- `loss`: how much the loss grows when the block is skipped (labelled data), or how far the model's
  outputs move (embedding data).

    model = nncompress.apply(model, DropLayersConfig(count=2), context=Context(data=calib))

Candidates are found on the model itself: the elements of a `ModuleList` of identical blocks
(transformer stacks: `encoder.layer`, `model.layers`), and blocks in a `Sequential`/`ModuleList`
whose own forward adds its input (read off one trace of the whole model, `graph.DataFlow`; if the
model cannot be traced, only the stacks are candidates and `ctx.log` says why), in both cases only if
the output has the input's shape. `targets` narrows them by name; `targets.types` instead names the
block class outright (the user then vouches that it is residual). A block in a `ModuleList` is
deleted from the list (the Hugging Face config's `num_hidden_layers`, `layer_types` and every
`layer_idx` follow, so `save_pretrained` round-trips); any other block becomes `nn.Identity`. The
record keeps the removed names, so replay removes the same blocks without data.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import Config, ConfigError, Context, check, lookup, plain_view, register
from ..core.calibration import batch_inputs, collect_block_io, feed, first_tensor, intercepting, move
from ..core.errors import DataError, UnsupportedOpError
from ..graph import DataFlow

__all__ = ["DropLayersConfig", "angular_distance", "cosine_distance", "find_blocks", "remove_blocks", "skipping"]


@dataclasses.dataclass(frozen=True)
class DropLayersConfig(Config):
    """Remove whole residual blocks.

    count:         how many blocks to remove (give count or ratio)
    ratio:         fraction of the candidate blocks to remove, rounded down
    importance:    registered layer criterion: angular, cosine, loss
    contiguous:    remove `count` consecutive blocks of one stack together (Gromov et al.); angular/cosine only
    calib_batches: calibration batches used to score the blocks
    """

    count: int | None = None
    ratio: float | None = None
    importance: str = "angular"
    contiguous: bool = False
    calib_batches: int = 4

    def __post_init__(self):
        check((self.count is None) != (self.ratio is None), "count",
              "give exactly one of count (blocks to remove) or ratio (fraction of candidates)")
        check(self.count is None or self.count >= 0, "count", f"must be >= 0, got {self.count}")
        check(self.ratio is None or 0.0 <= self.ratio < 1.0, "ratio", f"must be in [0, 1), got {self.ratio}")
        check(self.calib_batches >= 1, "calib_batches", f"must be >= 1, got {self.calib_batches}")
        check(not (self.contiguous and self.importance == "loss"), "contiguous",
              "contiguous windows are scored by angular or cosine distance; set importance to one of them")
        try:
            lookup(self.importance, namespace="layer_importance")
        except Exception:
            raise ConfigError("importance", f"unknown layer criterion {self.importance!r}; known: angular, "
                              "cosine, loss") from None


# ---------------------------------------------------------------------------------------------
# pure maths


def _rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Feature rows to compare: real tokens (T, H) of a (N, T, H) tensor under `mask`, else (N, D)."""
    if mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask.bool()]  # (tokens, H)
    return t.flatten(1)  # (N, D)


def cosine_distance(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of 1 - cos(x_r, y_r) over rows (samples, or real tokens under `mask`).

    >>> float(cosine_distance(torch.ones(2, 3), -torch.ones(2, 3)))
    2.0
    """
    a, b = _rows(x, mask).double(), _rows(y, mask).double()
    return (1 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)).mean()


def angular_distance(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of arccos(cos(x_r, y_r)) / pi over rows: 0 for parallel, 1 for opposite (Gromov et al.).

    >>> round(float(angular_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))), 6)
    0.5
    """
    a, b = _rows(x, mask).double(), _rows(y, mask).double()
    cos = F.cosine_similarity(a, b, dim=-1, eps=1e-12).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).mean()


# ---------------------------------------------------------------------------------------------
# finding and removing blocks


def adds_its_input(module: nn.Module, example_inputs: Any = None) -> bool:
    """Whether its own `forward` adds its (first) input to something, maybe through `nn.Identity`
    shortcuts (an add inside a child does not count); one trace (`graph.DataFlow`; without example
    inputs, `graph.guess_inputs` makes some). A module that cannot be traced raises `UnsupportedOpError`.

    >>> from nncompress.zoo.models import BasicBlock
    >>> adds_its_input(BasicBlock(4, 4)), adds_its_input(BasicBlock(4, 8))
    (True, False)
    """
    return DataFlow(module, example_inputs).reads_its_input_into_add("")


def _stack_lists(model: nn.Module) -> dict[str, nn.ModuleList]:
    """ModuleLists of >= 2 identical non-leaf blocks (transformer layer stacks)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1 \
                and any(True for _ in m[0].children()):
            out[name] = m
    return out


def _structural_candidates(model: nn.Module, ctx: Context, batch: Any) -> list[str]:
    selected = {n for n, _ in ctx.targets.select(model)}
    if ctx.targets.types:  # the user named the block class: take every selected module of it
        return [n for n, _ in model.named_modules() if n and n in selected]
    stacks = _stack_lists(model)
    names = [f"{p}.{i}" if p else str(i) for p, lst in stacks.items() for i in range(len(lst))]
    loose = [f"{pname}.{key}" if pname else key  # blocks in other containers: residual only if found so
             for pname, parent in model.named_modules()
             if isinstance(parent, (nn.Sequential, nn.ModuleList)) and pname not in stacks
             for key, child in parent.named_children() if any(True for _ in child.children())]
    loose = [n for n in loose if n in selected]
    if loose:  # one trace of the whole model answers for every block
        try:
            flow = DataFlow(model, _on_model_device(model, batch_inputs(batch)))
        except UnsupportedOpError as e:
            ctx.log(f"drop_layers: blocks outside layer stacks are not considered ({e}); "
                    f"name the block class with targets.types=[...] to take them")
        else:
            names += [n for n in loose if flow.reads_its_input_into_add(n)]
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted((n for n in set(names) if n in selected), key=order.__getitem__)


def _on_model_device(model: nn.Module, inputs: Any) -> Any:
    param = next(model.parameters(), None)
    return inputs if param is None else move(inputs, param.device)


def _calib_batches(ctx: Context, n: int) -> list:
    if ctx.data is None:
        raise ConfigError("importance", "drop_layers scores blocks on calibration data; run it in a recipe or "
                          "pass Context(data=...)")
    out = []
    for batch in ctx.data.calib:
        out.append(batch)
        if len(out) >= n:
            break
    if not out:
        raise DataError("drop_layers: the calibration loader is empty; give data with at least one batch")
    return out


def find_blocks(model: nn.Module, ctx: Context, batch: Any) -> list[str]:
    """Names of the removable residual blocks among `ctx.targets`, checked on one forward of `batch`:
    a block qualifies only if it runs and its output has its input's shape."""
    with plain_view(model):  # quantized / clustered layers inside a block: its data flow is the plain one's
        names = _structural_candidates(model, ctx, batch)
    io = collect_block_io(model, names, batch)
    return [n for n in names if n in io and io[n][0].shape == io[n][1].shape]


def skipping(model: nn.Module, names: Iterable[str]):
    """Context manager: the named blocks return their input (the model without them), then restore."""
    def skip(out: Any, x: torch.Tensor | None) -> Any:
        return (x, *out[1:]) if isinstance(out, tuple) else x
    return intercepting(model, names, skip)


def remove_blocks(model: nn.Module, names: list[str]) -> nn.Module:
    """Remove blocks named as in the model before removal: delete from a ModuleList (renumbering it and
    fixing the HF config and `layer_idx`), else replace by `nn.Identity`."""
    deletions: dict[int, tuple[nn.ModuleList, list[int]]] = {}
    for name in names:
        pname, _, key = name.rpartition(".")
        try:
            parent = model.get_submodule(pname)
            model.get_submodule(name)
        except AttributeError:
            raise ConfigError("record.removed", f"{name!r} is no module of {type(model).__name__}; the manifest "
                              "does not belong to this architecture") from None
        if isinstance(parent, nn.ModuleList):
            deletions.setdefault(id(parent), (parent, []))[1].append(int(key))
        else:
            setattr(parent, key, nn.Identity())
    for lst, idx in deletions.values():
        for i in sorted(set(idx), reverse=True):
            del lst[i]  # ModuleList renumbers the rest
        _fix_stack(model, lst, sorted(set(idx)))
    return model


def _fix_stack(model: nn.Module, lst: nn.ModuleList, removed: list[int]) -> None:
    """After deleting `removed` layers of `lst`: renumber `layer_idx` (KV cache slots) and shrink the config."""
    for i, layer in enumerate(lst):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = i
    done: set[int] = set()
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is None or id(cfg) in done or not hasattr(cfg, "num_hidden_layers"):
            continue
        if not any(sub is lst for sub in m.modules()):
            continue
        done.add(id(cfg))
        old = cfg.num_hidden_layers
        cfg.num_hidden_layers = len(lst)
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and len(types) == old:
            cfg.layer_types = [t for i, t in enumerate(types) if i not in set(removed)]


# ---------------------------------------------------------------------------------------------
# criteria: fn(model, names, batches) -> scores (higher = more important), registered by name

Scorer = Callable[[nn.Module, list[str], list], torch.Tensor]


def _mask(batch: Any) -> torch.Tensor | None:
    return batch.get("attention_mask") if isinstance(batch, dict) else None


def _distance_scores(model: nn.Module, names: list[str], batches: list, dist) -> torch.Tensor:
    total = torch.zeros(len(names), dtype=torch.float64)
    for b in batches:
        io = collect_block_io(model, names, b)
        total += torch.stack([dist(*io[n], _mask(b)) for n in names])
    return total / len(batches)


@register("angular", namespace="layer_importance")
def angular_importance(model: nn.Module, names: list[str], batches: list) -> torch.Tensor:
    """Mean angular distance between each block's input and output."""
    return _distance_scores(model, names, batches, angular_distance)


@register("cosine", namespace="layer_importance")
def cosine_importance(model: nn.Module, names: list[str], batches: list) -> torch.Tensor:
    """Mean cosine distance between each block's input and output (block influence)."""
    return _distance_scores(model, names, batches, cosine_distance)


@register("loss", namespace="layer_importance")
def loss_importance(model: nn.Module, names: list[str], batches: list) -> torch.Tensor:
    """Loss increase when the block is skipped: cross-entropy for (x, y) batches, else the mean
    squared change of the model's outputs."""
    def loss(batch, ref=None) -> float:
        out = first_tensor(feed(model, batch))
        if isinstance(batch, (tuple, list)):
            return float(F.cross_entropy(out.float(), batch[1]))
        return 0.0 if ref is None else float((out.double() - ref.double()).pow(2).mean())

    scores = torch.zeros(len(names), dtype=torch.float64)
    with torch.no_grad():
        for b in batches:
            ref = first_tensor(feed(model, b))
            base = loss(b)
            for j, n in enumerate(names):
                with skipping(model, [n]):
                    scores[j] += loss(b, ref) - base
    return scores / len(batches)


# ---------------------------------------------------------------------------------------------
# the transform


def _windows(names: list[str], n: int) -> list[list[str]]:
    """Runs of `n` consecutive blocks of one container, all candidates."""
    have = set(names)
    out = []
    for name in names:
        parent, _, key = name.rpartition(".")
        if key.isdigit():
            run = [f"{parent}.{int(key) + k}" if parent else str(int(key) + k) for k in range(n)]
            if all(r in have for r in run):
                out.append(run)
    return out


def _pick_contiguous(model: nn.Module, names: list[str], n: int, batches: list, dist) -> tuple[list[str], dict]:
    wins = _windows(names, n)
    if not wins:
        raise ConfigError("contiguous", f"no {n} consecutive candidate blocks in one stack; lower count or "
                          "set contiguous=False")
    total = torch.zeros(len(wins), dtype=torch.float64)
    for b in batches:
        io = collect_block_io(model, names, b)
        total += torch.stack([dist(io[w[0]][0], io[w[-1]][1], _mask(b)) for w in wins])
    best = int(torch.argmin(total))
    return wins[best], {w[0]: float(s) / len(batches) for w, s in zip(wins, total)}


@register("remove_blocks", namespace="edit")
def _replay_removed_blocks(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    return remove_blocks(model, [str(n) for n in edit.get("names", [])])


@register("drop_layers", config=DropLayersConfig)
def _drop_layers(model: nn.Module, config: DropLayersConfig, ctx: Context) -> nn.Module:
    """Remove the least important whole residual blocks (layer pruning)."""
    was = model.training
    model.eval()
    batches = _calib_batches(ctx, config.calib_batches)
    names = find_blocks(model, ctx, batches[0])
    if not names:
        raise ConfigError("targets", "no removable residual block (output = input + f(input), same shape) among "
                          "the targeted modules; name the block class with targets.types=[...]")
    n = config.count if config.count is not None else int(config.ratio * len(names))
    if n > len(names):
        raise ConfigError("count", f"asks to remove {n} blocks but only {len(names)} are removable "
                          f"({', '.join(names)}); lower count")
    ctx.record.update(candidates=names, removed=[])
    if n == 0:
        return model.train(was)
    if config.contiguous:
        dist = angular_distance if config.importance == "angular" else cosine_distance
        drop, scores = _pick_contiguous(model, names, n, batches, dist)
    else:
        s = lookup(config.importance, namespace="layer_importance")(model, names, batches)
        order = torch.argsort(s, stable=True)  # least important first
        drop = sorted((names[i] for i in order[:n].tolist()), key=names.index)
        scores = {nm: float(v) for nm, v in zip(names, s)}
    ctx.record.update(removed=drop, scores=scores)
    ctx.edits.add("remove_blocks", names=drop)
    ctx.log(f"drop_layers: removed {', '.join(drop)}")
    return remove_blocks(model, drop).train(was)
