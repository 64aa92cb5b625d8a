"""Fine-grained, N:M, vector and kernel-pattern sparsity whose masks stay enforced: `sparsify`.

    model = nncompress.apply(model, SparsityConfig(granularity=NM(2, 4), importance="wanda"),
                             context=Context(data=data))

Pruned weights are exact zeros in plain modules, so the masks are implied by the checkpoint and
loading replays nothing. Schedules: `one_shot`; `iterative` (prune -> fine-tune `rounds` times, each
round removing the same fraction of what is left); `gradual` (Zhu & Gupta's cubic s_t over the
fine-tune, a mask update every `frequency` steps). While fine-tuning, masks are re-applied after
every optimizer step; with `soft` the forward uses w * mask while the dense w keeps its full
gradient (straight-through) and the mask is recomputed from the dense weights every `frequency`
steps, so pruned weights may regrow (seed 000, soft masking). Data-driven criteria: taylor and snip
(gradients on labelled calibration batches), wanda and sparsegpt (calibration inputs per layer,
pruned layer by layer in model order so later layers see the already pruned ones).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, ClassVar, Iterator, Literal

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..core import ConfigError, Context, Site, TrainConfig, check, fit, layer_transform, lookup
from ..core.surgery import plain_sites
from ..core import names, register
from ..core.objectives import objective, require_data
from ..core.calibration import BlockInputs, LayerStats, block_chain, calibrate, gradient_sums, sequential_blocks
from .epi import UntilStable, train_until_stable
from .granularity import NM, Element, Pattern, Vector, granularity_from_dict, granularity_to_dict
from .masks import (global_masks, magnitude_scores, nm_mask, pattern_mask, random_scores, row_mask,
                    snip_scores, sparsegpt_prune, taylor_scores, unstructured_mask, vector_mask,
                    wanda_scores)

Masks = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
_SOLVERS = ("sparsegpt",)  # criteria that also rewrite the kept weights, beside the "saliency" scores


@dataclasses.dataclass(frozen=True)
class SparsityConfig(TrainConfig):
    """Fine-grained sparsity of Linear and Conv weights; the training loop's options (optimizer, lr,
    ...) apply to the fine-tune with masks enforced (`epochs` per round for iterative; 0: none).

    ratio:        fraction of weights zeroed (default 0.5; N:M implies 1 - n/m and may leave it out)
    granularity:  Element() | NM(n, m) (n kept of every m along the input dim) | Vector(dim) (whole
                  vectors) | Pattern() (3x3 kernel patterns, plus whole kernels beyond 5/9); in YAML
                  `element`, `{kind: nm, n: 2, m: 4}`, `{kind: vector, dim: -1}`, `pattern`
    scope:        layer (each layer at `ratio`) | global (one threshold, element only)
    importance:   magnitude | random | taylor | snip | wanda | sparsegpt
    soft:         straight-through soft masks recomputed every `frequency` steps (needs epochs)
    schedule:     one_shot | iterative (`rounds`; with snip: FORCE-like rounds before training) |
                  gradual (cubic from initial_ratio, reaching `ratio` after `ramp` of the steps)
    l1:           strength of an L1 penalty on the targeted weights while fine-tuning
    sequential, dampening, block_size: wanda / sparsegpt layer-wise options
    layer_budgets: uniform (every layer at `ratio`) | owl (outlier-weighted layer-wise sparsity, Yin et al.
                  2024: a layer's ratio falls with its share of outlier Wanda scores, above `owl_m` times its
                  mean, within ratio +- `owl_lambda`, the parameter-weighted mean kept at `ratio`; wanda /
                  sparsegpt, element, one-shot)
    until_stable: `{max_epochs: 20}` trains on the stage's objective before sparsifying until the Early
                  Pruning Indicator (seed 000) sees the top weights at `ratio` (element granularity, the
                  stage's scope) stop moving (`epi.UntilStable`), then sparsifies; the record says at which
                  epoch it fired, or that it did not within max_epochs
    """

    renamed: ClassVar[dict[str, str]] = {
        **TrainConfig.renamed, "sparsity": "ratio (the fraction removed, as in prune and drop_layers)", "initial_sparsity": "initial_ratio",
        "n": "granularity: {kind: nm, n: 2, m: 4}", "m": "granularity: {kind: nm, n: 2, m: 4}",
        "vector_dim": "granularity: {kind: vector, dim: -1}"}

    ratio: float | None = None
    granularity: Any = Element()
    scope: Literal["layer", "global"] = "layer"
    importance: str = "magnitude"
    soft: bool = False
    schedule: Literal["one_shot", "iterative", "gradual"] = "one_shot"
    initial_ratio: float = 0.0
    rounds: int = 3
    epochs: int = 0
    frequency: int = 10
    ramp: float = 0.75
    l1: float = 0.0
    calib_batches: int = 8
    sequential: bool = True
    dampening: float = 0.01
    block_size: int = 128
    layer_budgets: Literal["uniform", "owl"] = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    until_stable: UntilStable | None = None
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        g = granularity_from_dict(self.granularity)
        object.__setattr__(self, "granularity", g)
        r = self.ratio
        check(r is None or 0.0 <= r < 1.0, "ratio", f"must be in [0, 1), got {r}")
        if isinstance(g, NM) and r is not None:
            check(abs(r - g.sparsity) < 1e-9, "ratio", f"{g.n}:{g.m} keeps {g.n} of every {g.m}, i.e. ratio "
                  f"{g.sparsity:g}; leave ratio out or set it to that")
        kind = granularity_to_dict(g)["kind"]
        check(self.scope == "layer" or isinstance(g, Element), "scope",
              f"global applies to granularity element, not {kind}; use scope: layer")
        check(self.schedule == "one_shot" or isinstance(g, (Element, Vector)), "schedule",
              f"{kind} masks have a fixed sparsity; use schedule: one_shot")
        check(0.0 <= self.initial_ratio <= self.target, "initial_ratio",
              f"must be in [0, ratio={self.target:g}], got {self.initial_ratio}")
        for name in ("rounds", "frequency", "calib_batches", "block_size"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(0.0 < self.ramp <= 1.0, "ramp", f"must be in (0, 1], got {self.ramp}")
        check(self.l1 >= 0, "l1", f"must be >= 0, got {self.l1}")
        check(self.dampening > 0, "dampening", f"must be > 0, got {self.dampening}")
        known = names("saliency") + list(_SOLVERS)
        check(self.importance in known, "importance", f"unknown criterion {self.importance!r}; known: "
              f"{', '.join(sorted(known))}")
        if self.importance == "sparsegpt":
            check(isinstance(g, (Element, NM)) and self.scope == "layer", "importance",
                  "sparsegpt prunes each layer on its own, element or nm; use scope: layer")
            check(self.schedule == "one_shot" and not self.soft, "schedule",
                  "sparsegpt is one-shot; use schedule: one_shot without soft")
        check(self.layer_budgets in ("uniform", "owl"), "layer_budgets",
              f"must be uniform or owl, got {self.layer_budgets!r}")
        if self.layer_budgets == "owl":
            check(self.importance in ("wanda", "sparsegpt") and isinstance(g, Element) and self.scope == "layer"
                  and self.schedule == "one_shot" and not self.soft, "layer_budgets",
                  "owl sets each layer's ratio for one-shot wanda / sparsegpt at element granularity, scope layer")
            check(self.owl_m > 0, "owl_m", f"must be > 0, got {self.owl_m}")
            check(0 <= self.owl_lambda <= min(self.target, 1 - self.target), "owl_lambda",
                  f"must keep every layer's ratio in [0, 1]: 0 <= owl_lambda <= {min(self.target, 1 - self.target):g}")
        check(self.until_stable is None or isinstance(g, Element), "until_stable",
              f"the early pruning indicator watches single weights; use granularity: element, not {kind}")
        check(not (self.soft or self.schedule == "gradual") or self.epochs > 0, "epochs",
              "soft masks and the gradual schedule act while training; set epochs > 0")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["granularity"] = granularity_to_dict(self.granularity)
        return out

    @property
    def target(self) -> float:
        """The final fraction of zeros the schedule reaches."""
        g = self.granularity
        if isinstance(g, NM):
            return g.sparsity
        if self.ratio is None:
            return 0.0 if isinstance(g, Pattern) else 0.5
        return self.ratio


# -------------------------------------------------------------------------------- criteria (saliency)


def _saliency(name: str, needs: str | None = None):
    """Register an element-wise criterion `fn(weight, stats) -> scores` with what data it needs."""
    def wrap(fn):
        fn.needs = needs
        return register(name, namespace="saliency")(fn)
    return wrap


@_saliency("magnitude")
def magnitude_saliency(w: torch.Tensor, stats: dict) -> torch.Tensor:
    return magnitude_scores(w)


@_saliency("random")
def random_saliency(w: torch.Tensor, stats: dict) -> torch.Tensor:
    return random_scores(w, stats.get("generator"))


@_saliency("taylor", needs="grad")
def taylor_saliency(w: torch.Tensor, stats: dict) -> torch.Tensor:
    return taylor_scores(w, stats["grad"])


@_saliency("snip", needs="grad")
def snip_saliency(w: torch.Tensor, stats: dict) -> torch.Tensor:
    return snip_scores(w, stats["grad"], stats.get("total"))


@_saliency("wanda", needs="input_norm")
def wanda_saliency(w: torch.Tensor, stats: dict) -> torch.Tensor:
    return wanda_scores(w, stats["input_norm"])


# ---------------------------------------------------------------------------------------- the stage


SPARSE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@layer_transform("sparsify", config=SparsityConfig, layers=SPARSE_LAYERS, on_wrapped="through", what="Linear/Conv")
def _sparsify(model: nn.Module, config: SparsityConfig, ctx: Context, sites: list[Site]) -> nn.Module:
    """Zero weights by an element, N:M, vector or kernel-pattern mask and keep them zero."""
    was_training = model.training
    skipped: dict[str, str] = {}
    with plain_sites(sites) as plain:
        model = plain.model.to(ctx.device)
        layers = sparse_layers(plain.layers, config, skipped)
        if not layers:
            raise ConfigError("targets", "no Linear or Conv layer left to sparsify; widen targets"
                              + (f" (skipped: {skipped})" if skipped else ""))
        if config.until_stable is not None:
            ctx.record["until_stable"] = train_until_stable(
                model, ctx, config.until_stable, config.target, "element", config.scope, TrainConfig.of(config),
                "sparsify-until-stable")
        job = _Job(model, layers, config, ctx, torch.Generator().manual_seed(config.seed), [])
        job.loss = objective(ctx, "sparsify.epochs", model) if config.epochs else None
        masks = _run(job)
    _record(ctx, masks, skipped, job.notes)
    model = sites[0].model
    model.train(was_training)
    return model


def _run(job: _Job) -> Masks:
    """The configured criterion and schedule; returns the final masks."""
    config = job.config
    if config.importance in _SOLVERS or config.layer_budgets == "owl" or (
            config.importance == "wanda" and config.schedule == "one_shot" and config.sequential and not config.soft):
        return _train(job, layerwise_prune(job))
    if config.importance == "snip" and config.schedule != "gradual":
        return _train(job, snip_prune(job), _constant(config.target) if config.soft else None)
    if config.schedule == "gradual":
        start = _apply(job, compute_masks(job, config.initial_ratio)) if config.initial_ratio else None
        return _train(job, start, lambda step, total: cubic_sparsity(
            step, max(1, round(config.ramp * total)), config.target, config.initial_ratio))
    rounds = config.rounds if config.schedule == "iterative" else 1
    masks = None
    for k in range(1, rounds + 1):
        level = 1 - (1 - config.target) ** (k / rounds)
        masks = _apply(job, compute_masks(job, level, None if config.soft else masks))
        masks = _train(job, masks, _constant(level) if config.soft else None)
    return masks


def cubic_sparsity(step: int, total: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's gradual schedule s_t = s_f + (s_i - s_f)(1 - t/T)^3, held at s_f after T.

    >>> [round(cubic_sparsity(t, 4, 0.8), 4) for t in (0, 2, 4, 9)]
    [0.0, 0.7, 0.8, 0.8]
    """
    t = min(max(step, 0), total) / max(total, 1)
    return final + (initial - final) * (1 - t) ** 3


def sparse_layers(candidates: dict[str, nn.Module], config: SparsityConfig,
                  skipped: dict[str, str]) -> dict[str, nn.Module]:
    """The layers among `candidates` that `config` can sparsify; the others land in `skipped`."""
    layers = {}
    for name, mod in candidates.items():
        fan_in, kernel = mod.weight.shape[1], tuple(mod.weight.shape[2:])
        g = config.granularity
        if isinstance(g, NM) and fan_in % g.m:
            skipped[name] = f"{fan_in} inputs are not a multiple of m={g.m}"
        elif isinstance(g, Pattern) and kernel != (3, 3):
            skipped[name] = f"pattern pruning needs 3x3 kernels, got {kernel or 'a Linear'}"
        elif config.importance in ("wanda", "sparsegpt") and getattr(mod, "groups", 1) > 1:
            skipped[name] = f"{config.importance} needs one input norm per channel; grouped convolution"
        else:
            layers[name] = mod
    return layers


@dataclasses.dataclass
class _Job:
    model: nn.Module
    layers: dict[str, nn.Module]
    config: SparsityConfig
    ctx: Context
    generator: torch.Generator
    notes: list[str]
    loss: LossFn | None = None
    levels: dict[str, float] = dataclasses.field(default_factory=dict)  # per-layer ratios (owl), else ratio


def _constant(level: float) -> Callable[[int, int], float]:
    return lambda step, total: level


def _dense(module: nn.Module) -> torch.Tensor:
    """The weight a criterion scores: the dense original while soft-masked, else the weight."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _apply(job: _Job, masks: Masks) -> Masks:
    with torch.no_grad():
        for name, mask in masks.items():
            if not job.config.soft:
                job.layers[name].weight.mul_(mask)
    return masks


def masks_from_scores(scores: dict[str, torch.Tensor], config: SparsityConfig, level: float) -> Masks:
    """The granularity switch: per-layer (or global) masks at `level` from element scores."""
    g = config.granularity
    if isinstance(g, Element) and config.scope == "global":
        return global_masks(scores, level)
    if isinstance(g, Element):
        maker = row_mask if config.importance == "wanda" else unstructured_mask  # Wanda compares per output
        return {n: maker(s, level) for n, s in scores.items()}
    if isinstance(g, NM):
        return {n: nm_mask(s, g.n, g.m, dim=1) for n, s in scores.items()}
    if isinstance(g, Vector):
        return {n: vector_mask(s, level, g.dim) for n, s in scores.items()}
    return {n: pattern_mask(s, sparsity=level) for n, s in scores.items()}


def compute_masks(job: _Job, level: float, old: Masks | None = None) -> Masks:
    """Score every layer with the configured criterion and make masks at `level`. With `old` (hard
    masks), already pruned weights score -inf so they stay pruned and sparsity only grows."""
    crit = lookup(job.config.importance, namespace="saliency")
    stats: dict[str, dict] = {n: {"generator": job.generator} for n in job.layers}
    if crit.needs == "grad":
        grads = calib_grads(job)
        total = sum(float(taylor_scores(_dense(m), grads[n]).sum()) for n, m in job.layers.items())
        for n in job.layers:
            stats[n].update(grad=grads[n], total=total)
    elif crit.needs == "input_norm":
        inputs = collect_inputs(job.model, job.layers, _calib(job), job.config.calib_batches)
        for n in job.layers:
            stats[n]["input_norm"] = inputs[n].norm()
    scores = {n: crit(_dense(m).detach(), stats[n]) for n, m in job.layers.items()}
    if old is not None:
        scores = {n: s.masked_fill(~old[n], -math.inf) for n, s in scores.items()}
    return masks_from_scores(scores, job.config, level)


def _calib(job: _Job):
    return require_data(job.ctx, "importance", f"calibration data for {job.config.importance!r}").calib


def snip_prune(job: _Job) -> Masks:
    """SNIP at the current (initial) weights; with schedule iterative, `rounds` rounds towards the
    target where the gradient is taken on the masked network but scored against the dense weights,
    so pruned weights may come back (FORCE-like iterative SNIP)."""
    cfg = job.config
    rounds = cfg.rounds if cfg.schedule == "iterative" else 1
    dense = {n: _dense(m).detach().clone() for n, m in job.layers.items()}
    masks: Masks | None = None
    for k in range(1, rounds + 1):
        with torch.no_grad():
            for n, m in job.layers.items():
                _dense(m).copy_(dense[n] if masks is None else dense[n] * masks[n])
        grads = calib_grads(job)
        total = sum(float(taylor_scores(dense[n], grads[n]).sum()) for n in job.layers)
        scores = {n: snip_scores(dense[n], grads[n], total) for n in job.layers}
        masks = masks_from_scores(scores, cfg, 1 - (1 - cfg.target) ** (k / rounds))
    with torch.no_grad():
        for n, m in job.layers.items():
            _dense(m).copy_(dense[n] if cfg.soft else dense[n] * masks[n])
    return masks


def layerwise_prune(job: _Job) -> Masks:
    """Wanda or SparseGPT one layer at a time, in forward order, each from its calibration inputs; with
    `sequential` those inputs are recomputed through the layers pruned before it (layers reading the
    same tensor, like q, k and v, share one pass)."""
    cfg = job.config
    hessian = cfg.importance == "sparsegpt"
    batches = _calib(job)
    if cfg.layer_budgets == "owl":
        job.levels = owl_levels(job, batches)
    pending = dict(job.layers)
    masks: Masks = {}
    if cfg.sequential:
        _by_blocks(job, pending, masks, batches, hessian)  # a layer stack: block by block, on cached inputs
    while pending:  # no stack, or layers outside it
        found = collect_inputs(job.model, pending, batches, cfg.calib_batches, hessian, first_group=cfg.sequential)
        if not found or all(st.count == 0 for st in found.values()):
            for name in pending:
                masks[name] = _prune_layer(job, name, pending[name], None, hessian)
            break
        for name, stats in found.items():
            masks[name] = _prune_layer(job, name, pending.pop(name), stats, hessian)
    return {n: masks[n] for n in job.layers}


def _by_blocks(job: _Job, pending: dict[str, nn.Module], masks: Masks, batches, hessian: bool) -> None:
    """The layers of `pending` that sit in a chain of blocks, pruned block by block: inside a block,
    group by group (layers reading one tensor together), each from the block's cached inputs run
    through the groups pruned before it. Pops what it prunes from `pending` into `masks`."""
    path = {id(m): n for n, m in job.model.named_modules()}
    full = {path[id(m)]: n for n, m in pending.items()}  # module path -> the job's name

    def step(block_name: str, block: nn.Module, inputs: BlockInputs) -> None:
        inside = {p[len(block_name) + 1:]: n for p, n in full.items() if p.startswith(block_name + ".")}
        while inside:
            found = inputs.stats(block, {r: _wants(pending[n], hessian) for r, n in inside.items()}, first_group=True)
            if not found or all(st.count == 0 for st in found.values()):
                for n in inside.values():
                    masks[n] = _prune_layer(job, n, pending.pop(n), None, hessian)
                return
            for r, st in found.items():
                n = inside.pop(r)
                masks[n] = _prune_layer(job, n, pending.pop(n), st, hessian)

    blocks = block_chain(job.model, list(full), batches)
    if blocks:
        sequential_blocks(job.model, blocks, batches, job.config.calib_batches, step)
        job.notes.append(f"calibrated block by block ({len(blocks)} blocks)")


def _wants(mod: nn.Module, hessian: bool) -> tuple[str, ...]:
    return ("sqnorm", "gram") if hessian and isinstance(mod, nn.Linear) else ("sqnorm",)


def owl_levels(job: _Job, batches) -> dict[str, float]:
    """OWL's per-layer ratios from the dense model: D = the fraction of a layer's Wanda scores above
    `owl_m` x their mean (outliers); ratio = 1 - D mapped linearly onto [ratio - lambda, ratio + lambda]
    (the most outlier-heavy layer at the low end), then shifted so the parameter-weighted mean is `ratio`."""
    cfg = job.config
    inputs = collect_inputs(job.model, job.layers, batches, cfg.calib_batches)
    outliers, sizes = {}, {}
    for name, mod in job.layers.items():
        if name not in inputs or inputs[name].count == 0:
            continue
        s = wanda_scores(mod.weight, inputs[name].norm())
        outliers[name], sizes[name] = float((s > cfg.owl_m * s.mean()).float().mean()), mod.weight.numel()
    if len(outliers) < 2:
        return {}
    raw = {n: 1 - d for n, d in outliers.items()}
    lo, hi = min(raw.values()), max(raw.values())
    spread = {n: 2 * cfg.owl_lambda * (r - lo) / (hi - lo) if hi > lo else 0.0 for n, r in raw.items()}
    shift = cfg.target - sum(spread[n] * sizes[n] for n in spread) / sum(sizes.values())
    levels = {n: min(max(v + shift, 0.0), 0.99) for n, v in spread.items()}
    job.notes.append(f"owl: layer ratios {min(levels.values()):.3f}-{max(levels.values()):.3f} "
                     f"(outliers {min(outliers.values()):.2%}-{max(outliers.values()):.2%})")
    return levels


def _prune_layer(job: _Job, name: str, mod: nn.Module, stats: LayerStats | None, hessian: bool) -> torch.Tensor:
    cfg, w = job.config, mod.weight
    level = job.levels.get(name, cfg.target)
    if stats is None or stats.count == 0:
        job.notes.append(f"{name}: not reached by the calibration data; pruned by magnitude")
        mask = masks_from_scores({"": magnitude_scores(w)}, cfg, level)[""]
    elif hessian and isinstance(mod, nn.Linear):
        nm = (cfg.granularity.n, cfg.granularity.m) if isinstance(cfg.granularity, NM) else None
        new, mask = sparsegpt_prune(w, stats.hessian(), level, nm, cfg.block_size, cfg.dampening)
        with torch.no_grad():
            w.copy_(new)
    else:
        if hessian:
            job.notes.append(f"{name}: sparsegpt handles Linear layers; pruned by wanda scores")
        wanda = dataclasses.replace(cfg, importance="wanda")
        mask = masks_from_scores({"": wanda_scores(w, stats.norm())}, wanda, level)[""]
    with torch.no_grad():
        w.mul_(mask)
    return mask


def _record(ctx: Context, masks: Masks, skipped: dict[str, str], notes: list[str]) -> None:
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    ctx.record["ratio"] = round(zeros / max(total, 1), 6)
    ctx.record["layers"] = {n: round(float((~m).float().mean()), 6) for n, m in masks.items()}
    if skipped:
        ctx.record["skipped"] = dict(skipped)
    if notes:
        ctx.record["notes"] = list(notes)


# ------------------------------------------------------------------------------------ training


class SoftMask(nn.Module):
    """Parametrization w -> w * mask in the forward with the gradient of w left dense
    (straight-through), so pruned weights keep learning and can win their place back."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (w * self.mask - w).detach()


@contextlib.contextmanager
def soft_masked(layers: dict[str, nn.Module], masks: Masks) -> Iterator[dict[str, SoftMask]]:
    """Within the block each layer computes with a `SoftMask`; on exit it is a plain module again
    whose weight is the dense weight times the last mask (exact zeros)."""
    handles: dict[str, SoftMask] = {}
    try:
        for name, mod in layers.items():
            handles[name] = SoftMask(masks[name])
            parametrize.register_parametrization(mod, "weight", handles[name])
        yield handles
    finally:
        for name, mod in layers.items():
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
                with torch.no_grad():
                    mod.weight.mul_(handles[name].mask)


def _train(job: _Job, masks: Masks | None, level_at: Callable[[int, int], float] | None = None) -> Masks:
    """Fine-tune `epochs` with the masks enforced; `level_at(step, total)` asks for a mask update to
    that sparsity every `frequency` steps (gradual schedule, soft masks). Returns the final masks."""
    cfg, ctx = job.config, job.ctx
    if masks is None:
        masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in job.layers.items()}
    if not cfg.epochs:
        return masks
    total = cfg.epochs * len(ctx.data.train)
    state = {"step": 0, "masks": masks, "level": None}
    with contextlib.ExitStack() as stack:
        soft = stack.enter_context(soft_masked(job.layers, masks)) if cfg.soft else None

        def update(level: float) -> None:
            new = compute_masks(job, level, None if soft else state["masks"])
            state["masks"], state["level"] = new, level
            for n, mask in new.items():
                if soft:
                    soft[n].mask.copy_(mask)

        def after_step(model: nn.Module) -> None:
            state["step"] += 1
            step = state["step"]
            if level_at is not None and (step % cfg.frequency == 0 or step == total):
                level = level_at(step, total)
                if soft or level != state["level"]:
                    update(level)
            if not soft:
                with torch.no_grad():
                    for n, mod in job.layers.items():
                        mod.weight.mul_(state["masks"][n])

        def l1(model: nn.Module, batch) -> torch.Tensor:  # the targeted layers only
            return cfg.l1 * sum(mod.weight.abs().sum() for mod in job.layers.values())
        losses = fit(job.model, ctx.data.train, job.loss, TrainConfig.of(cfg),
                     extra_losses=(l1,) if cfg.l1 else (), after_step=after_step, progress=ctx.progress,
                     desc="sparsify")
        ctx.record.setdefault("epoch_losses", []).extend(round(x, 6) for x in losses)
    return state["masks"]


# ------------------------------------------------------------------------- calibration statistics


def calib_grads(job: _Job) -> dict[str, torch.Tensor]:
    """Summed dL/dw of each layer's (dense) weight over up to `calib_batches` labelled batches."""
    data = job.ctx.data
    if data is None or getattr(data, "task", "classification") != "classification":
        raise ConfigError("importance", f"{job.config.importance!r} needs labelled calibration data; for "
                          "embedding models use magnitude, wanda or sparsegpt")
    loss_fn = objective(job.ctx, "importance", job.model)
    params = {n: _dense(m) for n, m in job.layers.items()}
    grads, _ = gradient_sums(job.model, data.calib, loss_fn, job.config.calib_batches, params)
    return {n: grads.get(n, torch.zeros_like(p)) for n, p in params.items()}


def collect_inputs(model: nn.Module, layers: dict[str, nn.Module], batches, max_batches: int,
                   hessian: bool = False, first_group: bool = False) -> dict[str, LayerStats]:
    """Input statistics of `layers` (Wanda's norms, SparseGPT's Gram) over up to `max_batches` batches;
    padding tokens are left out. first_group: only the first group of layers reading one tensor."""
    names = {id(m): n for n, m in model.named_modules()}
    wants = {names[id(m)]: _wants(m, hessian) for m in layers.values()}
    found = calibrate(model, batches, wants, batches=max_batches, first_group=first_group)
    by_module = {names[id(m)]: n for n, m in layers.items()}
    return {by_module[k]: v for k, v in found.items()}
