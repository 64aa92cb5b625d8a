"""Structured pruning: rank coupled channel groups, remove the weakest, and the model physically shrinks.

    model = nncompress.apply(model, PruneConfig(ratio=0.5, importance="taylor"), context=ctx)

Schedules: one-shot (`steps: 1`), iterative prune -> fine-tune -> prune (`steps: k` with
`epochs`), and sparse training first (`penalty: group_lasso` for `penalty_epochs`, the
r(theta) of seed 000 with its alpha mix of L1 and group lasso), then pruning by magnitude.
Budgets: a channel `ratio`, or `keep_macs` / `keep_params` as fractions of the model's current
MACs / parameters (found by bisection on the real pruned model's counts).
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.objectives import objective, require_data
from ..core import ConfigError, Context, TrainConfig, check, fit, lookup, plain_view, register
from ..core.errors import DataError
from ..core.reconstruct import recalibrate_norms, reconstruction_on, refit_to_reference
from ..graph import build_graph
from .epi import UntilStable, train_until_stable
from .importance import NEEDS, RANKED_AS_IS, collect_stats
from .latency import LatencyTarget, parse_target, prune_to_latency
from .structural import apply_record, remove_groups


@dataclasses.dataclass(frozen=True)
class PruneConfig(TrainConfig):
    """Structured (channel / neuron) pruning of coupled groups. The training loop's options
    (optimizer, lr, ...) apply to the fine-tune between iterative steps and to sparse training.

    ratio:        fraction of each group's channels to remove (scope local), or of all prunable
                  channels (scope global, groups ranked together on mean-normalised scores; obs's
                  output errors as they are, so the widths found differ layer by layer)
    importance:   registered criterion: l1, l2, fpgm, bn_scale, taylor, fisher, hessian, activation, obs, random
                  (obs: structured OBS on the layers that read the group, the choice that suits reconstruction)
    round_to:     keep channel counts a multiple of this (int8 / tensor-core kernels like 8 or 16)
    min_channels: never keep fewer than this many channels in a group
    max_ratio:    cap on any one group's pruned fraction under global scope
    overrides:    per-group ratios by glob on the group's producing module, e.g. {"stem.*": 0.0}
    keep_macs / keep_params: a budget instead of `ratio`: keep this fraction of MACs / params (met on
                  the real pruned model's counts; a budget no pruning can meet is an error)
    target_latency: a budget instead of `ratio`: a measured speedup ("2x") or ms per batch ("12ms") on
                  the target `latency` describes (runtime, batch, threads, device); group widths are
                  chosen by a knapsack of importance against a latency table measured there (HALP),
                  then the pruned model is timed and the plan tightened until the target is met
    steps, epochs: the iterative schedule: `steps` prune steps, each followed by `epochs` of fine-tune
    penalty, penalty_epochs, penalty_strength, penalty_alpha: sparse training before pruning
    until_stable: `{max_epochs: 20}` trains before pruning until the Early Pruning Indicator (seed
                  000) finds the dominant sub-network (the channels `ratio` keeps, by L2 norm; under a
                  keep_macs / keep_params budget b, the share 1 - sqrt(b)) stable
                  (`epi.UntilStable`); the record says at which epoch it fired, or that it did not
    calib_batches: batches used by data-driven criteria (and by reconstruction)
    reconstruct:  after each removal, "lstsq": re-fit the layers that read the removed channels by least
                  squares so they reproduce the unpruned model's outputs on the calibration data, layer by
                  layer in forward order (`core.reconstruct`); "bn": only re-estimate BatchNorm
                  statistics (cheaper, weaker); "auto": lstsq when the context has calibration data;
                  "none": leave the kept weights as they were
    """

    ratio: float = 0.5
    importance: str = "l2"
    scope: Literal["local", "global"] = "local"
    round_to: int = 1
    min_channels: int = 1
    max_ratio: float = 0.9
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    keep_macs: float | None = None
    keep_params: float | None = None
    target_latency: str | None = None
    latency: LatencyTarget = dataclasses.field(default_factory=LatencyTarget)
    steps: int = 1
    epochs: int = 0
    penalty: Literal["none", "group_lasso", "l1_bn"] = "none"
    penalty_epochs: int = 0
    penalty_strength: float = 1e-4
    penalty_alpha: float = 0.0
    until_stable: UntilStable | None = None
    calib_batches: int = 8
    reconstruct: Literal["auto", "lstsq", "bn", "none"] = "auto"

    renamed: ClassVar[dict[str, str]] = {
        **TrainConfig.renamed, "target_macs": "keep_macs (the fraction kept, as in lowrank)", "target_params": "keep_params",
        "finetune_epochs": "epochs (fine-tune epochs after each step)"}

    def __post_init__(self):
        super().__post_init__()
        check(0.0 <= self.ratio < 1.0, "ratio", f"must be in [0, 1), got {self.ratio}")
        check(self.round_to >= 1, "round_to", f"must be >= 1, got {self.round_to}")
        check(self.min_channels >= 1, "min_channels", f"must be >= 1, got {self.min_channels}")
        check(0.0 < self.max_ratio < 1.0, "max_ratio", f"must be in (0, 1), got {self.max_ratio}")
        for k, v in self.overrides.items():
            check(0.0 <= v < 1.0, f"overrides.{k}", f"must be in [0, 1), got {v}")
        for name in ("keep_macs", "keep_params"):
            v = getattr(self, name)
            check(v is None or 0.0 < v < 1.0, name, f"must be a fraction in (0, 1) to keep, got {v}")
        budgets = [n for n in ("keep_macs", "keep_params", "target_latency") if getattr(self, n)]
        check(len(budgets) <= 1, budgets[-1] if budgets else "", f"give one budget, not {' and '.join(budgets)}")
        if self.target_latency is not None:
            parse_target(self.target_latency)
        check(self.reconstruct in ("auto", "lstsq", "bn", "none"), "reconstruct",
              f"must be auto, lstsq, bn or none, got {self.reconstruct!r}")
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.penalty_epochs >= 0, "penalty_epochs", f"must be >= 0, got {self.penalty_epochs}")
        check(0.0 <= self.penalty_alpha <= 1.0, "penalty_alpha", f"must be in [0, 1], got {self.penalty_alpha}")
        check(self.penalty == "none" or self.penalty_epochs > 0, "penalty_epochs",
              f"penalty {self.penalty!r} trains before pruning: set penalty_epochs > 0")
        try:
            lookup(self.importance, namespace="importance")
        except Exception:
            raise ConfigError("importance", f"unknown criterion {self.importance!r}; known: "
                              "l1, l2, fpgm, bn_scale, taylor, fisher, hessian, activation, obs, random") from None


@register("prune", config=PruneConfig)
def _prune(model: nn.Module, config: PruneConfig, ctx: Context) -> nn.Module:
    """Structured pruning of coupled channel groups; the model physically shrinks."""
    inputs = example_inputs(model, ctx)
    if config.until_stable is not None:
        budget = config.keep_macs or config.keep_params
        share = 1 - math.sqrt(budget) if budget else config.ratio  # MACs and params fall as the square of widths
        ctx.record["until_stable"] = train_until_stable(
            model, ctx, config.until_stable, share, "channel", "global" if config.scope == "global" else "layer",
            TrainConfig.of(config), "prune-until-stable")
    if config.penalty != "none":
        sparse_train(model, config, ctx, inputs)
    budget = config.keep_macs or config.keep_params
    original: dict[tuple, int] = {}  # group (by its producers) -> width before the first step
    removed = 0
    timed = [] if config.target_latency else None
    refit = reconstruction_on(config.reconstruct, ctx, "prune.reconstruct")
    for step in range(1, config.steps + 1):
        reference = copy.deepcopy(model) if refit else None
        with plain_view(model) as view:  # quantized / clustered layers are pruned through their plain view
            if timed is not None:
                plan, record = prune_to_latency(model, score_groups(model, config, ctx, inputs), config, ctx,
                                                timing_inputs(model, ctx, config.latency.batch),
                                                remove_groups, step / config.steps)
                timed.append(record)
            elif budget:
                plan = _plan_for_budget(model, config, ctx, inputs, budget ** (step / config.steps))
            elif config.scope == "local":  # cumulative ratio of the original widths: k steps end at one-shot's
                plan = plan_from_scores(score_groups(model, config, ctx, inputs), config,
                                        config.ratio * step / config.steps, original)
            else:  # global: the fraction of what is left that brings the total to ratio * step / steps
                done, goal = config.ratio * (step - 1) / config.steps, config.ratio * step / config.steps
                plan = plan_from_scores(score_groups(model, config, ctx, inputs), config,
                                        1 - (1 - goal) / (1 - done))
            count, record = _remove(model, plan, ctx, view)
            removed += count
        if count and reference is not None:
            _reconstruct(model, reference, plan, record, config, ctx)
        if config.epochs:
            _finetune(model, config, ctx)
    ctx.record["channels_removed"] = removed
    if timed:
        total = math.prod(t["measured_speedup"] for t in timed)  # each step timed against the one before
        ctx.record["latency"] = timed[0] if len(timed) == 1 else {
            "target": config.target_latency, "measured_speedup": round(total, 3),
            "met": all(t["met"] for t in timed), "steps": timed}
    return model.eval()


def _remove(model: nn.Module, plan: list, ctx: Context, view: plain_view) -> tuple[int, dict[str, Any]]:
    """Remove the plan's channels (in the plain view; the wrappers follow) and record the edit."""
    removed = sum(len(drop) for _, drop in plan)
    record: dict[str, Any] = {}
    if removed:
        record = remove_groups(model, plan)
        view.cut_through(_cuts(record), record.get("modules", {}))
        ctx.edits.add("remove_channels", **_compact(record))
    return removed, record


def _reconstruct(model: nn.Module, reference: nn.Module, plan: list, record: dict[str, Any], config: PruneConfig,
                 ctx: Context) -> None:
    """lstsq: re-fit the layers that read removed channels to reproduce `reference` (the model before
    this step), in forward order; their targets are the outputs before any norm, so the norms'
    statistics stay valid. bn: re-estimate BatchNorm statistics only. Layers inside another
    technique's wrapper are left as they are (only plain Linear / Conv are solved)."""
    if config.reconstruct == "bn":
        norms = recalibrate_norms(model, ctx.data.calib, config.calib_batches, ctx.device)
        ctx.record.setdefault("reconstruct", []).append({"norms": norms})
        return
    consumers = {m.module for g, drop in plan if len(drop) for m in g.members if m.role == "in" and m.param == "weight"}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    names = sorted((n for n in consumers if n in order), key=order.__getitem__)
    kept = {p["name"].rpartition(".")[0]: p["keep"] for p in record.get("params", [])
            if p["name"].endswith(".weight") and int(p["dim"]) == 0}
    errors = refit_to_reference(model, reference, names, ctx.data.calib, config.calib_batches, ctx.device,
                                outputs={n: kept[n] for n in names if n in kept})
    if errors:
        ctx.record.setdefault("reconstruct", []).append({
            "layers": len(errors),
            "error_before": float(f"{sum(e['before'] for e in errors.values()) / len(errors):.4g}"),
            "error_after": float(f"{sum(e['after'] for e in errors.values()) / len(errors):.4g}")})


def _cuts(record: dict[str, Any]) -> list[tuple[str, int, list[int]]]:
    return [(p["name"], int(p["dim"]), p["keep"]) for p in record.get("params", [])]


def _compact(record: dict[str, Any]) -> dict[str, Any]:
    """The removal record with each distinct kept-index list stored once (every member of a group, a
    conv, its bias, its BatchNorm and the next layer's input, shares one), referred to by position."""
    keeps: list[list[int]] = []
    seen: dict[tuple[int, ...], int] = {}
    params = []
    for p in record.get("params", []):
        key = tuple(p["keep"])
        if key not in seen:
            seen[key] = len(keeps)
            keeps.append(list(key))
        params.append({**p, "keep": seen[key]})
    return {"record": {**record, "params": params}, "keeps": keeps}


def _expand(edit: dict[str, Any]) -> dict[str, Any]:
    record, keeps = dict(edit["record"]), edit["keeps"]
    record["params"] = [{**p, "keep": keeps[int(p["keep"])]} for p in record.get("params", [])]
    return record


@register("remove_channels", namespace="edit")
def _replay_removal(model: nn.Module, edit: dict[str, Any]) -> nn.Module:
    record = _expand(edit)
    with plain_view(model) as view:
        apply_record(model, record)
        view.cut_through(_cuts(record), record.get("modules", {}))
    return model


def score_groups(model: nn.Module, config: PruneConfig, ctx: Context, inputs) -> list[tuple]:
    """Trace the model once and score every prunable targeted group: `[(group, scores), ...]`."""
    graph = build_graph(model, inputs)
    every = graph.groups(ctx.targets)
    groups = [g for g in every if g.prunable]
    if not groups:
        why = next((g.reason for g in every if g.reason), "")
        raise ConfigError("targets", "no prunable channel group among the targeted modules"
                          + (f" (e.g. {why})" if why else "") + "; widen targets or see graph.groups() for the reasons")
    scorer = lookup(config.importance, namespace="importance")
    stats = _stats(model, groups, config, ctx)
    scored = [(g, scorer(model, g, stats)) for g in groups]
    unscored = [g.producers[0] if g.producers else str(g) for g, s in scored if s is None]
    if unscored:
        ctx.record["not_scored"] = unscored
    return [(g, s.float()) for g, s in scored if s is not None]


def plan_from_scores(scored: list[tuple], config: PruneConfig, ratio: float,
                     original: dict[tuple, int] | None = None) -> list[tuple]:
    """Which channels of each group to remove: `[(group, sorted channel indices), ...]`.

    original: widths before an iterative schedule began (filled on first use); ratios apply to them.
    """
    if original is not None:
        for g, _ in scored:
            original.setdefault(g.producers, g.size)
    ratios = [_group_ratio(g, config, ratio) for g, _ in scored]
    if config.scope == "global" and not config.overrides and scored:
        # |s| mean: a signed criterion (hessian) may have negative scores; same as s.mean() otherwise
        normed = [s if config.importance in RANKED_AS_IS else s / s.abs().mean().clamp_min(1e-12) for _, s in scored]
        flat = torch.cat(normed)
        k = int(ratio * flat.numel())
        threshold = flat.sort().values[k - 1].item() if k > 0 else -float("inf")
        ratios = [min(float((s <= threshold).float().mean()), config.max_ratio) for s in normed]
    plan = []
    for (g, s), r in zip(scored, ratios):
        width = original.get(g.producers, g.size) if original is not None and config.scope == "local" else g.size
        keep = min(g.size, _kept(width, r, config))
        order = torch.argsort(s, descending=True, stable=True)
        plan.append((g, sorted(order[keep:].tolist())))
    return plan


def _group_ratio(group, config: PruneConfig, ratio: float) -> float:
    root = next((m.module for m in group.members if m.role == "out"), group.members[0].module)
    for pattern, r in config.overrides.items():
        if fnmatch.fnmatchcase(root, pattern):
            return r
    return ratio


def _kept(size: int, ratio: float, config: PruneConfig) -> int:
    keep = size - int(ratio * size)
    if config.round_to > 1:
        keep = max(config.round_to, round(keep / config.round_to) * config.round_to)
    return min(size, max(keep, config.min_channels))


def _stats(model: nn.Module, groups: list, config: PruneConfig, ctx: Context) -> dict[str, Any]:
    need = NEEDS.get(config.importance)
    if need is None:
        return {}
    require_data(ctx, "importance", f"calibration data for {config.importance!r}")
    if need not in ("activations", "grams") and ctx.data.task != "classification":
        raise ConfigError("importance", f"{config.importance!r} needs labelled data; for {ctx.data.task} "
                          "models use l2, fpgm, activation or obs")
    role = "in" if need == "grams" else "out"  # obs reads the consumers' inputs, activation the producers' outputs
    modules = {m.module for g in groups for m in g.members if m.role == role and m.param == "weight"}
    return collect_stats(model, ctx.data.calib, _loss, "grad" if need == "grad_sq" else need,
                         modules, config.calib_batches)


def _loss(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, dict):
        out = model(**batch)
        return out.pow(2).mean()  # only used for activation statistics
    x, y = batch
    return F.cross_entropy(model(x), y)


def example_inputs(model: nn.Module, ctx: Context):
    """Inputs to trace with: two samples of the recipe's data, or zeros of `model.input_shape`."""
    if ctx.data is not None:
        return ctx.data.example_batch(2)
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise DataError(f"{type(model).__name__}: pruning traces the model and needs example inputs; pass "
                        "Context(data=...) or set model.input_shape")
    return torch.zeros(2, *shape)


def timing_inputs(model: nn.Module, ctx: Context, batch: int):
    """A batch of `batch` samples to time the model on: the recipe's data, or zeros of `model.input_shape`."""
    if ctx.data is not None:
        return ctx.data.example_batch(batch)
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise DataError(f"{type(model).__name__}: target_latency times the model and needs example inputs; "
                        "pass Context(data=...) or set model.input_shape")
    return torch.zeros(batch, *shape)


def count_macs(model: nn.Module, inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs) if isinstance(inputs, dict) else model(inputs)
    model.train(was)
    return counter.get_total_flops() // 2


def _plan_for_budget(model: nn.Module, config: PruneConfig, ctx: Context, inputs, keep: float) -> list[tuple]:
    """Bisection on the channel ratio until a pruned copy keeps at most `keep` of the MACs/params.

    The model is traced and scored once; each trial prunes a copy with the same scores and counts
    its real MACs (or parameters).
    """
    def measure(m):
        return count_macs(m, inputs) if config.keep_macs else sum(p.numel() for p in m.parameters())

    base = measure(model)
    scored = score_groups(model, config, ctx, inputs)

    def kept(ratio: float) -> float:
        trial = copy.deepcopy(model)
        remove_groups(trial, plan_from_scores(scored, config, ratio))
        return measure(trial) / base

    lo, hi = 0.0, 0.95
    floor = kept(hi)
    if floor > keep:  # even the most pruning the groups allow keeps more: never a silently larger model
        field = "keep_macs" if config.keep_macs else "keep_params"
        raise ConfigError(field, f"{keep:.3g} of the {'MACs' if config.keep_macs else 'parameters'} is out of "
                          f"reach: removing {hi:.0%} of every prunable group keeps {floor:.3g} (layers outside "
                          "the prunable groups, max_ratio, min_channels and round_to hold the rest); raise it, "
                          "or widen targets")
    for _ in range(12):
        mid = (lo + hi) / 2
        if kept(mid) > keep:
            lo = mid
        else:
            hi = mid
    return plan_from_scores(scored, config, hi)


def _finetune(model: nn.Module, config: PruneConfig, ctx: Context) -> None:
    fit(model, ctx.data.train, objective(ctx, "epochs"), TrainConfig.of(config),
        progress=ctx.progress, desc="prune-finetune")


def group_lasso_penalty(model: nn.Module, groups: list, alpha: float) -> torch.Tensor:
    """r(theta) = alpha * ||theta||_1 + (1 - alpha) * sum_groups sum_channels ||theta_channel||_2 (seed 000).

    A channel's parameters across every coupled layer form one lasso group, so the penalty drives
    whole coupled channels to zero together.
    """
    from .importance import member_tensor
    total = torch.zeros(())
    for g in groups:
        sq = 0
        for m in g.members:
            t = member_tensor(model, m)
            if isinstance(t, nn.Parameter):
                v = t.movedim(m.dim, 0)[m.offset: m.offset + g.size * m.stride].reshape(g.size, -1)
                sq = sq + v.pow(2).sum(1)
                if alpha:
                    total = total + alpha * v.abs().sum()
        if not isinstance(sq, int):
            total = total + (1 - alpha) * (sq + 1e-12).sqrt().sum()
    return total


def sparse_train(model: nn.Module, config: PruneConfig, ctx: Context, inputs) -> None:
    """Train with the sparsity penalty so that unimportant groups shrink before they are cut."""
    loss = objective(ctx, "penalty", model)
    groups = [g for g in build_graph(model, inputs).groups(ctx.targets) if g.prunable]
    bns = [m for _, m in ctx.targets.select(model) if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def penalty(m: nn.Module, batch) -> torch.Tensor:
        if config.penalty == "l1_bn":  # network slimming: L1 on BN gamma (seed 001 eq. 7)
            return config.penalty_strength * sum(bn.weight.abs().sum() for bn in bns)
        return config.penalty_strength * group_lasso_penalty(m, groups, config.penalty_alpha)

    fit(model, ctx.data.train, loss, TrainConfig.of(config, epochs=config.penalty_epochs),
        extra_losses=(penalty,), progress=ctx.progress, desc=f"sparse-train ({config.penalty})")
