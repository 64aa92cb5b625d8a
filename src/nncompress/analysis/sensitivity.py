"""Sensitivity analysis: prune one unit at a time at a sweep of ratios, and watch the quality fall.

A unit is a prunable layer (`unit="element"`: its weights magnitude-pruned element by element) or a
coupled channel group (`unit="channel"`: the structured engine's groups, so a residual pair whose
outputs are added is ONE unit and its channels go from every member at once; pruning one side of
the pair alone is impossible and would look falsely robust). Every trial runs on a copy; the model
passed in is never changed. Quality is top-1 accuracy on `data.test` for classification, and for
embedding data the mean cosine between the pruned and the unpruned model's outputs.

The curves then give per-unit ratios for a target sparsity (`SensitivityResult.ratios_for`), the
"different ratio per layer" of seed 003: sensitive layers (often the first) are pruned less.

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Linear(2, 2, bias=False))
>>> with torch.no_grad():
...     _ = model[0].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
>>> class Data: task = "classification"; test = [(torch.eye(2), torch.tensor([0, 1]))]
>>> result = sensitivity(model, Data(), ratios=(0.0, 0.5, 0.75))
>>> result.units, result.drop("0")   # the zeros go first; at 0.75 the 1.0 goes and sample 1 is lost
(['0'], (0.0, 0.0, 0.5))
>>> result.ratios_for(0.5, threshold=0.01)
{'0': 0.5}
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import itertools
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import ConfigError, Context, DataError, Targets
from ..eval.metrics import accuracy, embed, perplexity
from ..eval.report import higher_is_better
from ..export.atomic import atomic_path
from ..graph import Group
from ..prune.importance import member_tensor
from ..prune.masks import magnitude_scores, random_scores, unstructured_mask
from ..prune.structural import remove_groups
from ..prune.structured import PruneConfig, plan_from_scores, score_groups

__all__ = ["DEFAULT_RATIOS", "ChannelUnit", "SensitivityResult", "channel_units", "sensitivity"]

DEFAULT_RATIOS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)
_ELEMENT_CRITERIA = ("magnitude", "l1", "l2", "random")  # l1/l2 of one weight rank as |w|
UnitKind = Literal["element", "channel"]


# ---------------------------------------------------------------------------------------------- result


@dataclasses.dataclass(frozen=True)
class SensitivityResult:
    """Quality of the model with one unit pruned at each ratio; drop = how much worse than the
    baseline (baseline - quality; quality - baseline for perplexity, where lower is better).

    unit:     "element" (units are layers, keyed by module name) or "channel" (units are coupled
              groups, keyed by the group's first producing module: the name `PruneConfig.overrides`
              matches)
    metric:   "accuracy", "cosine" (embedding fidelity to the unpruned model) or "perplexity"
    ratios:   the pruned fractions swept, ascending
    baseline: quality of the unpruned model on the same batches
    quality:  unit -> quality at each ratio
    params:   unit -> parameters it owns (element: the weight; channel: producers' and norms' slices)
    members:  unit -> the modules it prunes (channel: every producer of the group, e.g. a residual pair)

    >>> r = SensitivityResult("element", "accuracy", (0.0, 0.5), 0.9, {"fc": (0.9, 0.6)}, {"fc": 10}, {"fc": ("fc",)})
    >>> [round(d, 3) for d in r.drop("fc")], r.max_ratio("fc", threshold=0.1)
    ([0.0, 0.3], 0.0)
    """

    unit: UnitKind
    metric: str
    ratios: tuple[float, ...]
    baseline: float
    quality: dict[str, tuple[float, ...]]
    params: dict[str, int]
    members: dict[str, tuple[str, ...]]

    @property
    def units(self) -> list[str]:
        """The units in model order."""
        return list(self.quality)

    def drop(self, unit: str) -> tuple[float, ...]:
        """How much worse than unpruned at each ratio (positive: worse).

        >>> SensitivityResult("element", "perplexity", (0.5,), 4.0, {"fc": (4.5,)}, {"fc": 1}, {"fc": ("fc",)}).drop("fc")
        (0.5,)
        """
        return tuple(self._worse(q) for q in self._curve(unit))

    def _worse(self, q: float) -> float:
        return self.baseline - q if higher_is_better(self.metric) else q - self.baseline

    def rows(self) -> list[tuple[str, float, float, float]]:
        """`(unit, ratio, quality, drop)` for every unit and ratio, units in model order."""
        return [(u, r, q, self._worse(q)) for u in self.units for r, q in zip(self.ratios, self.quality[u])]

    def most_sensitive(self) -> list[str]:
        """Units sorted by mean drop over the sweep, most sensitive first (stable for ties)."""
        return sorted(self.units, key=lambda u: -sum(self.drop(u)) / len(self.ratios))

    def max_ratio(self, unit: str, threshold: float) -> float:
        """The largest swept ratio reached before the drop first exceeds `threshold` (0.0 if none).

        Ratios past the first exceedance are not trusted even if the curve recovers (noise).
        """
        best = 0.0
        for r, d in zip(self.ratios, self.drop(unit)):
            if d > threshold:
                break
            best = r
        return best

    def overall_sparsity(self, ratios: dict[str, float]) -> float:
        """Parameter-weighted mean of per-unit ratios: sum_u r_u * params_u / sum_u params_u.

        For channel units this is the share of the groups' own parameters removed; the true drop in
        parameters is a little larger, as the consumers' input dims shrink too.
        """
        total = sum(self.params.values())
        return sum(ratios.get(u, 0.0) * p for u, p in self.params.items()) / max(total, 1)

    def ratios_for(self, target_sparsity: float, threshold: float) -> dict[str, float]:
        """Per-unit ratios for `target_sparsity` overall, each within the degradation `threshold`.

        Rule: each unit's cap is `max_ratio(unit, threshold)`; if the caps together remove more than
        the target, all caps are scaled by one factor so `overall_sparsity` equals the target exactly
        (units keep their relative robustness; a unit capped at 0 stays unpruned). If they remove less,
        the caps are returned (the threshold wins) and a warning gives the reachable sparsity.
        Use the result as `PruneConfig(ratio=0.0, overrides=...)` (channel) or as per-layer
        sparsities (element). Channel counts are floored when pruned, so the realised sparsity can be
        a little lower.

        >>> r = SensitivityResult("channel", "accuracy", (0.0, 0.5, 0.9), 1.0,
        ...                       {"a": (1.0, 1.0, 1.0), "b": (1.0, 0.95, 0.5)}, {"a": 100, "b": 100},
        ...                       {"a": ("a",), "b": ("b",)})
        >>> r.ratios_for(0.35, threshold=0.1)   # caps 0.9 and 0.5, scaled by 0.5
        {'a': 0.45, 'b': 0.25}
        """
        if not 0.0 <= target_sparsity < 1.0:
            raise ConfigError("target_sparsity", f"must be in [0, 1), got {target_sparsity}")
        if threshold < 0:
            raise ConfigError("threshold", f"must be >= 0 (a tolerated drop in {self.metric}), got {threshold}")
        caps = {u: self.max_ratio(u, threshold) for u in self.units}
        reach = self.overall_sparsity(caps)
        if reach <= target_sparsity:
            if reach < target_sparsity - 1e-9:
                warnings.warn(f"sensitivity: a drop in {self.metric} <= {threshold:g} per unit allows only "
                              f"{reach:.3f} overall sparsity, not {target_sparsity:g}; returning the caps "
                              f"(raise threshold or lower the target)", stacklevel=2)
            return caps
        scale = target_sparsity / reach
        return {u: round(c * scale, 6) for u, c in caps.items()}

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write `unit,ratio,quality,drop` rows (with a header) to `path` atomically."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["unit", "ratio", "quality", "drop"])
        for u, r, q, d in self.rows():
            writer.writerow([u, f"{r:.10g}", f"{q:.10g}", f"{d:.10g}"])
        with atomic_path(path) as tmp:
            tmp.write_text(buf.getvalue())
        return Path(path)

    def plot_png(self, path: str | os.PathLike) -> Path:
        """One curve per unit, quality vs ratio, baseline dashed; written atomically to `path` (PNG)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4.8), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.axhline(self.baseline, color="0.5", ls="--", lw=1, label="unpruned")
        for u in self.units:
            label = u if len(self.members.get(u, ())) <= 1 else f"{u} (+{len(self.members[u]) - 1} coupled)"
            ax.plot(self.ratios, self.quality[u], marker="o", ms=3, lw=1.2, label=label)
        what = "channels removed from the group" if self.unit == "channel" else "weights pruned in the layer"
        ax.set_xlabel(f"fraction of {what}")
        ax.set_ylabel(self.metric if higher_is_better(self.metric) else f"{self.metric} (lower is better)")
        ax.set_title(f"{self.unit} sensitivity ({len(self.units)} units)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        return Path(path)

    def __str__(self) -> str:
        head = f"{'unit':<28}" + "".join(f"{r:>7.2f}" for r in self.ratios)
        lines = [f"{self.unit} sensitivity, {self.metric} drop (baseline {self.baseline:.4f})", head]
        lines += [f"{u:<28}" + "".join(f"{d:>7.3f}" for d in self.drop(u)) for u in self.most_sensitive()]
        return "\n".join(lines)

    def _curve(self, unit: str) -> tuple[float, ...]:
        if unit not in self.quality:
            raise KeyError(f"no unit {unit!r}; units are: {', '.join(self.units)}")
        return self.quality[unit]


# ----------------------------------------------------------------------------------------------- units


@dataclasses.dataclass(frozen=True)
class ChannelUnit:
    """A coupled channel group with its importance scores: what `unit="channel"` prunes.

    name:    the group's first producing module (what `PruneConfig.overrides` matches)
    group:   the graph's `Group` (valid for the model as traced, and for copies of it)
    scores:  (group.size,) importance per channel; the lowest go first
    params:  parameters the group owns (producers' output slices and the norms riding along)
    """

    name: str
    group: Group
    scores: torch.Tensor
    params: int

    def plan(self, ratio: float) -> list[tuple[Group, list[int]]]:
        """`[(group, channel indices to drop)]` at `ratio` (floored, at least one channel kept)."""
        return plan_from_scores([(self.group, self.scores)], PruneConfig(), ratio)

    def pruned(self, model: nn.Module, ratio: float) -> nn.Module:
        """A copy of `model` with `ratio` of this group's channels removed from every member."""
        out = copy.deepcopy(model)
        remove_groups(out, self.plan(ratio))
        return out


def channel_units(model: nn.Module, data: Any, *, importance: str = "l2", targets: Targets | None = None,
                  device: torch.device | str = "cpu") -> list[ChannelUnit]:
    """Trace `model` once and return its prunable coupled groups, scored by `importance`, in model order.

    A residual pair (outputs added) is one unit whose `group.producers` lists both layers.

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> class Data: task = "classification"; test = [(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))]
    >>> [(u.name, u.group.size, u.params) for u in channel_units(net, Data())]   # 8 * (4 + 1) params
    [('0', 8, 40)]
    """
    ctx = Context(targets=targets or Targets(), data=data, device=torch.device(device))
    scored = score_groups(model, PruneConfig(importance=importance), ctx, _example_inputs(data))
    return [ChannelUnit(g.producers[0], g, s, _group_params(model, g)) for g, s in scored]


def _group_params(model: nn.Module, group: Group) -> int:
    total = 0
    for m in group.members:
        t = member_tensor(model, m)
        if m.role != "in" and isinstance(t, nn.Parameter):  # inputs belong to the consumer's group
            total += t.numel() // t.shape[m.dim] * group.size * m.stride  # (.., size*stride, ..) slice
    return total


def _element_layers(model: nn.Module, targets: Targets | None) -> list[tuple[str, nn.Module]]:
    layers = [(n, m) for n, m in (targets or Targets()).select(model) if isinstance(m, _PRUNABLE)]
    if not layers:
        raise ConfigError("targets", "no Linear or Conv layer among the targeted modules; widen targets")
    return layers


# -------------------------------------------------------------------------------------------- analysis


def sensitivity(model: nn.Module, data: Any, *, ratios: Iterable[float] = DEFAULT_RATIOS,
                unit: UnitKind = "element", importance: str | None = None, targets: Targets | None = None,
                max_batches: int | None = None, device: torch.device | str = "cpu") -> SensitivityResult:
    """Prune each unit alone at each ratio (on a copy) and measure quality on `data.test`.

    data:        anything with `.test` (batches `(x, y)`, or model inputs for embedding data) and
                 `.task` ("classification" -> accuracy; "embedding" -> cosine to the unpruned outputs;
                 "language_model" -> perplexity, where a drop is a rise)
    unit:        "element": each Linear/Conv layer's weight, pruned by `importance` in
                 ("magnitude" = "l1" = "l2", "random"); "channel": each prunable coupled group, ranked by a
                 registered structured criterion (default "l2")
    max_batches: evaluate on the first `max_batches` test batches only (they are held in memory)

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> class Data: task = "classification"; test = [(torch.randn(16, 4), torch.zeros(16, dtype=torch.long))]
    >>> sensitivity(net, Data(), unit="channel", ratios=(0.0, 0.5)).units
    ['0']
    """
    ratios = _check_ratios(ratios)
    if unit not in ("element", "channel"):
        raise ConfigError("unit", f"must be 'element' or 'channel', got {unit!r}")
    if max_batches is not None and max_batches < 1:
        raise ConfigError("max_batches", f"must be >= 1 or None, got {max_batches}")
    work = copy.deepcopy(model).to(device).eval()  # the caller's model is never touched
    metric, evaluate = _evaluator(work, data, max_batches, device)
    baseline = evaluate(work)
    if unit == "element":
        quality, params, members = _element_sweep(work, ratios, importance or "magnitude", targets, evaluate, baseline)
    else:
        quality, params, members = _channel_sweep(work, data, ratios, importance or "l2", targets, device,
                                                  evaluate, baseline)
    return SensitivityResult(unit, metric, ratios, baseline, quality, params, members)


def _element_sweep(work: nn.Module, ratios: tuple[float, ...], importance: str, targets: Targets | None,
                   evaluate: Callable[[nn.Module], float], baseline: float) -> tuple[dict, dict, dict]:
    if importance not in _ELEMENT_CRITERIA:
        raise ConfigError("importance", f"unit='element' ranks weights by {', '.join(_ELEMENT_CRITERIA)}, "
                          f"not {importance!r}")
    quality, params, members = {}, {}, {}
    for name, layer in _element_layers(work, targets):
        w = layer.weight  # (O, I) or (O, I/groups, *kernel)
        original = w.detach().clone()
        scores = (magnitude_scores(original) if importance != "random"
                  else random_scores(original, torch.Generator().manual_seed(0)))
        curve = []
        try:
            for r in ratios:
                mask = unstructured_mask(scores, r)
                if bool(mask.all()):  # nothing pruned: the model is the unpruned one
                    curve.append(baseline)
                    continue
                with torch.no_grad():
                    w.copy_(original * mask)
                curve.append(evaluate(work))
        finally:
            with torch.no_grad():
                w.copy_(original)
        quality[name], params[name], members[name] = tuple(curve), w.numel(), (name,)
    return quality, params, members


def _channel_sweep(work: nn.Module, data: Any, ratios: tuple[float, ...], importance: str,
                   targets: Targets | None, device: torch.device | str, evaluate: Callable[[nn.Module], float],
                   baseline: float) -> tuple[dict, dict, dict]:
    quality, params, members = {}, {}, {}
    for u in channel_units(work, data, importance=importance, targets=targets, device=device):
        curve = []
        for r in ratios:
            if not u.plan(r)[0][1]:  # no channel removed at this ratio (floored)
                curve.append(baseline)
                continue
            curve.append(evaluate(u.pruned(work, r)))
        quality[u.name], params[u.name], members[u.name] = tuple(curve), u.params, u.group.producers
    return quality, params, members


def _evaluator(model: nn.Module, data: Any, max_batches: int | None,
               device: torch.device | str) -> tuple[str, Callable[[nn.Module], float]]:
    test = getattr(data, "test", None)
    if test is None:
        raise DataError(f"sensitivity: {type(data).__name__} has no .test loader; pass a DataBundle")
    batches = list(itertools.islice(test, max_batches))
    if not batches:
        raise DataError("sensitivity: data.test yielded no batches; give a non-empty test loader")
    task = getattr(data, "task", "classification")
    if task == "classification":
        return "accuracy", lambda m: accuracy(m, batches, device)
    if task == "language_model":
        return "perplexity", lambda m: perplexity(m, batches, device)["perplexity"]
    if task != "embedding":
        raise DataError(f"sensitivity: unknown task {task!r}; expected 'classification', 'embedding' or "
                        "'language_model'")
    reference = embed(model, batches, device).flatten(1).double()  # (N, D)

    def cosine(m: nn.Module) -> float:
        out = embed(m, batches, device).flatten(1).double()  # (N, D)
        if out.shape != reference.shape:
            raise DataError(f"sensitivity: pruned outputs {tuple(out.shape)} differ from {tuple(reference.shape)}; "
                            "exclude the output layer from targets")
        return float(F.cosine_similarity(out, reference, dim=1).mean())

    return "cosine", cosine


def _example_inputs(data: Any) -> Any:
    if hasattr(data, "example_batch"):
        return data.example_batch(2)
    batch = next(iter(data.test))
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return {k: v[:2] for k, v in x.items()} if isinstance(x, dict) else x[:2]


def _check_ratios(ratios: Iterable[float]) -> tuple[float, ...]:
    out = tuple(float(r) for r in ratios)
    if not out:
        raise ConfigError("ratios", "give at least one ratio, e.g. (0.0, 0.25, 0.5, 0.75)")
    if any(not 0.0 <= r < 1.0 for r in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise ConfigError("ratios", f"must be strictly increasing fractions in [0, 1), got {list(out)}")
    return out
