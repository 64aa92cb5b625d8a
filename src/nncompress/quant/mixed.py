"""Mixed precision under a budget (seed 001; HAQ, HAWQ): every targeted layer takes one format from a
candidate set so that the summed sensitivity is smallest while the model fits a budget in bytes on
disk, bit operations or latency, solved exactly as a 0/1 integer programme (scipy's `milp`, HiGHS).

    cfg = MixedPrecisionConfig(candidates=(Choice(weight=w4_g128), Choice(weight=w8), Choice()), size_ratio=6)
    model = nncompress.apply(model, cfg, targets=Targets(types=("Linear", "Embedding")), context=Context(data=data))
    print(plan_yaml(nncompress.history(model)[-1]["record"]["stages"]))

`Choice()` (no weight spec) keeps a layer as it is (float); `Choice(weight=w4, method="gptq")` rounds
with GPTQ (a `gptq` stage), its sensitivity measured on the GPTQ-rounded layer. The plan is run as plain `quantize`
stages, one per format with its layers as `targets.include`, through the `quantize` transform itself:
save / load replay it unchanged, and `record["stages"]` is that recipe, YAML to read, edit and run
(`plan_yaml`); applying it gives the same model, bit for bit.

Budgets (exactly one):
  max_bytes       every byte of the saved checkpoint (weights + manifest)
  size_ratio      that many times smaller than the model's checkpoint before this stage
  max_bops        bit operations of one sample's forward (MACs x weight bits x input bits)
  target_latency  '2x' or '12ms' in onnxruntime at `latency` (batch, threads), from a table of every
                  layer in every format measured alone on this machine (provider "format_table"); formats
                  count where nncompress exports an int8 kernel (W8A8), others are left out. A torch
                  target is refused: fake quantization in eager mode is never faster than float.

Bytes are predicted per layer from what the checkpoint writer stores (each layer encoded alone in
each format); the plan is then applied to a copy and saved, and when the real folder is larger than
the budget (headers, this stage's manifest entry) the solver's budget shrinks by the excess and it
solves again (`rounds`). A latency budget is measured the same way: the plan applied to a copy,
exported as it deploys (QDQ) and timed against the float model in onnxruntime. An
unreachable budget raises `ConfigError` naming the field and the closest point (every layer in its
cheapest format). Sensitivity: `mixed_costs`.

>>> import torch, torch.nn as nn
>>> from nncompress.core import Context, apply, history
>>> from nncompress.formats import IntFormat
>>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
>>> x = torch.randn(8, 16)
>>> class Data: calib = [(x, None)]; example_batch = lambda self, n: x[:n]
>>> w4 = Choice(weight=QuantSpec(format=IntFormat(bits=4)))
>>> cfg = MixedPrecisionConfig(candidates=(w4, Choice()), max_bops=4e5)  # room for one float layer: the cheaper one
>>> out = apply(net, cfg, context=Context(data=Data()))
>>> history(out)[-1]["record"]["plan"]
{'0': 'W4', '2': 'float'}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import numpy as np
import torch.nn as nn
import yaml

from ..core import Config, ConfigError, Context, Site, Targets, check, layer_transform, lookup
from ..core.config import parse_target
from ..core.objectives import require_data
from ..formats import IntFormat, PerChannel, PerGroup, PerTensor
from .fake_quant import QuantSpec
from .mixed_budget import Budget, budget_for, ort_format
from .gptq import GPTQConfig
from .mixed_costs import fisher_distortion, fit_gptq, fit_wrapper, layer_hessians, output_distortion
from .ptq import QUANT_LAYERS, QuantizeConfig, float_layer, quant_sites

__all__ = ["Choice", "MixedLatency", "MixedPrecisionConfig", "solve_plan", "plan_stages", "plan_yaml", "apply_plan"]

BUDGETS = ("max_bytes", "size_ratio", "max_bops", "target_latency")


@dataclasses.dataclass(frozen=True)
class Choice(Config):
    """One format a layer may take: a weight spec and optionally an input spec; neither keeps the
    layer as it is (float). `method`: how the weights get onto the grid, "rtn" (round to nearest, a
    `quantize` stage) or "gptq" (error-corrected rounding from the layer's input Hessian, a `gptq`
    stage; weight-only, integer formats)."""

    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    method: Literal["rtn", "gptq"] = "rtn"

    def __post_init__(self) -> None:
        check(self.weight is not None or self.activation is None, "activation",
              "a float layer has no input format; give a weight spec too, or neither to keep the layer float")
        check(self.method in ("rtn", "gptq"), "method", f"must be 'rtn' or 'gptq', got {self.method!r}")
        check(self.method == "rtn" or self.weight is not None, "method", "a float layer has no rounding method")
        check(self.method == "rtn" or self.activation is None, "activation",
              "gptq quantizes weights only; drop the input format or use method rtn")
        if self.method == "gptq":
            GPTQConfig(weight=self.weight)  # the same checks as a gptq stage
        elif self.weight is not None:
            QuantizeConfig(weight=self.weight, activation=self.activation)  # the same checks as a quantize stage

    @property
    def is_float(self) -> bool:
        return self.weight is None

    @property
    def label(self) -> str:
        """`float`, `W4 g128`, `W8A8`, ...: for records and reports."""
        if self.weight is None:
            return "float"
        label = _spec_label("W", self.weight) + ("" if self.activation is None else _spec_label("A", self.activation))
        return label if self.method == "rtn" else f"{label} gptq"

    def stage(self, names: list[str], types: list[str], calib_batches: int) -> dict[str, Any]:
        """This format as a plain `quantize` (or `gptq`) stage on the layers `names`."""
        out: dict[str, Any] = {"kind": "quantize" if self.method == "rtn" else "gptq",
                               "targets": {"include": list(names), "types": sorted(set(types))},
                               "weight": self.weight.to_dict()}
        if self.method == "gptq":  # every layer's Hessian from the float model, as its sensitivity was measured
            out.update(calib_batches=calib_batches, sequential=False)
        elif self.activation is not None:
            out.update(calib_batches=calib_batches)
        if self.activation is not None:
            out.update(activation=self.activation.to_dict())
        return out

    def fit(self, layer: nn.Module, hessian: Any = None) -> Any:
        """`layer` (float, left as it is) in this format: its wrapper, or why the format does not fit it."""
        if self.method == "gptq":
            return fit_gptq(layer, self.weight, hessian)
        return fit_wrapper(layer, self.weight, self.activation)


def _spec_label(role: str, spec: QuantSpec) -> str:
    fmt, g = spec.format, spec.granularity
    name = f"{role}{fmt.bits}" if isinstance(fmt, IntFormat) else f"{role}:{type(fmt).__name__}"
    if isinstance(g, PerGroup):
        name += f" g{g.size}"
    elif isinstance(g, PerTensor) and role == "W" or isinstance(g, PerChannel) and role == "A":
        name += f" {type(g).__name__}"
    return name if spec.observer == "minmax" else f"{name} {spec.observer}"


@dataclasses.dataclass(frozen=True)
class MixedLatency(Config):
    """Where a `target_latency` is measured: runtime torch (eager, CPU) or onnxruntime (CPU), the batch
    (samples of the calibration data), intra-op threads (None: the current count); the measured latency
    may exceed the target by `tolerance`."""

    runtime: Literal["torch", "onnxruntime"] = "torch"
    batch: int = 1
    threads: int | None = None
    tolerance: float = 0.03

    def __post_init__(self) -> None:
        check(self.batch >= 1, "batch", f"must be >= 1, got {self.batch}")
        check(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        check(0.0 <= self.tolerance < 1.0, "tolerance", f"must be in [0, 1), got {self.tolerance}")


W4_G128 = QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=128))
DEFAULT_CANDIDATES = (Choice(weight=W4_G128), Choice(weight=QuantSpec(format=IntFormat(bits=8))), Choice())


@dataclasses.dataclass(frozen=True)
class MixedPrecisionConfig(Config):
    """Per-layer formats under one budget (module doc).

    candidates:     the formats each layer may take, in the order their stages run; `{}` keeps it float
    max_bytes / size_ratio / max_bops / target_latency: the budget, exactly one
    latency:        where a target_latency is measured
    sensitivity:    distortion (measured, one layer at a time) or fisher (predicted from the output Fisher)
    calib_batches:  calibration batches for sensitivity and for input ranges
    rounds:         at most this many solve-apply-measure rounds for a measured budget
    """

    candidates: tuple[Choice, ...] = DEFAULT_CANDIDATES
    max_bytes: int | None = None
    size_ratio: float | None = None
    max_bops: float | None = None
    target_latency: str | None = None
    latency: MixedLatency = MixedLatency()
    sensitivity: Literal["distortion", "fisher"] = "distortion"
    calib_batches: int = 4
    rounds: int = 3

    def __post_init__(self) -> None:
        given = [f for f in BUDGETS if getattr(self, f) is not None]
        check(len(given) == 1, given[1] if len(given) > 1 else "max_bytes",
              "give exactly one budget: max_bytes, size_ratio, max_bops or target_latency")
        check(any(not c.is_float for c in self.candidates), "candidates",
              "needs at least one format that quantizes, e.g. {weight: {format: {kind: int, bits: 4}}}")
        labels = [c.label for c in self.candidates]
        dup = next((x for x in labels if labels.count(x) > 1), None)
        check(dup is None, "candidates", f"two candidates read {dup!r}; list each format once")
        check(self.max_bytes is None or self.max_bytes > 0, "max_bytes", f"must be > 0, got {self.max_bytes}")
        check(self.size_ratio is None or self.size_ratio > 1, "size_ratio",
              f"is how many times smaller the file gets: must be > 1, got {self.size_ratio}")
        check(self.max_bops is None or self.max_bops > 0, "max_bops", f"must be > 0, got {self.max_bops}")
        if self.target_latency is not None:
            parse_target(self.target_latency)
            check(self.latency.runtime == "onnxruntime", "latency.runtime", "a quantize stage runs as fake "
                  "quantization in torch eager, never faster than float, so a torch latency target has no plan; "
                  "time the plan where int8 kernels run: latency: {runtime: onnxruntime} with W8A8 candidates")
            check(any(ort_format(c) == "int8_static" for c in self.candidates), "candidates",
                  "none runs faster in onnxruntime: a latency target needs a W8A8 candidate (int8 weights per "
                  "channel or tensor, 8-bit inputs per tensor), the format nncompress exports to int8 kernels")
        check(self.sensitivity != "fisher" or all(c.method == "rtn" for c in self.candidates), "sensitivity",
              "fisher predicts from each weight's own rounding error; GPTQ lowers the output error by correlated "
              "corrections that prediction cannot see: use sensitivity: distortion with a gptq candidate")
        check(self.calib_batches >= 1, "calib_batches", f"must be >= 1, got {self.calib_batches}")
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")

    @property
    def budget_field(self) -> str:
        return next(f for f in BUDGETS if getattr(self, f) is not None)


# ------------------------------------------------------------------------------------ the solver

def solve_plan(cost: Any, use: Any, budget: float) -> list[int] | None:
    """The exact 0/1 programme: one choice c per layer l minimising `sum cost[l, c]` subject to
    `sum use[l, c] <= budget` (scipy's `milp`, HiGHS branch and bound, no optimality gap). An infinite
    cost or use marks a choice a layer may not take. Returns the choice per layer, None if none fits.

    >>> solve_plan([[3.0, 0.0], [1.0, 0.0]], [[1.0, 4.0], [1.0, 2.0]], 5.0)  # one may stay float: the costlier
    [1, 0]
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    cost, use = np.asarray(cost, dtype=float), np.asarray(use, dtype=float)
    ok = np.isfinite(cost) & np.isfinite(use)
    if not ok.any(1).all():
        return None
    idx = np.argwhere(ok)                                   # (K, 2): variable -> (layer, choice)
    k = len(idx)
    c, u = cost[ok], use[ok]
    c = c / max(np.abs(c).max(), 1e-300)                    # HiGHS' gaps and tolerances are absolute: scale to 1
    scale = max(abs(budget), np.abs(u).max(), 1e-300)
    one = np.zeros((cost.shape[0], k))
    one[idx[:, 0], np.arange(k)] = 1.0
    limit = budget / scale
    for _ in range(3):  # a plan over the budget by the solver's feasibility tolerance: tighten by it
        res = milp(c, integrality=np.ones(k), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one, 1, 1), LinearConstraint((u / scale)[None], -np.inf, limit)],
                   options={"mip_rel_gap": 0.0})
        if res.x is None:
            return None
        plan = [-1] * cost.shape[0]
        for j in np.flatnonzero(res.x > 0.5):
            plan[idx[j, 0]] = int(idx[j, 1])
        if sum(use[l, p] for l, p in enumerate(plan)) <= budget:
            return plan
        limit -= 1e-6
    return None


# ------------------------------------------------------------------------------------ plan -> recipe

def plan_stages(plan: dict[str, Choice], candidates: tuple[Choice, ...], types: dict[str, str],
                calib_batches: int) -> list[dict[str, Any]]:
    """The plan as plain `quantize` stages: one per format (in candidate order) with its layers, in
    model order, as `targets.include`; float layers get none."""
    stages = []
    for choice in candidates:
        names = [n for n, c in plan.items() if c == choice]
        if names and not choice.is_float:
            stages.append(choice.stage(names, [types[n] for n in names], calib_batches))
    return stages


def plan_yaml(stages: list[dict[str, Any]]) -> str:
    """Recipe YAML (`stages:` list) of `plan_stages`; `nncompress.recipe.parse_recipe` reads it."""
    return yaml.safe_dump({"stages": stages}, sort_keys=False, default_flow_style=None, width=120)


def apply_plan(model: nn.Module, stages: list[dict[str, Any]], ctx: Context) -> nn.Module:
    """Run the plan's stages through their transforms, `quantize` or `gptq` (edits recorded in `ctx.edits`)."""
    for stage in stages:
        fields = {k: v for k, v in stage.items() if k not in ("kind", "targets")}
        transform = lookup(stage["kind"])
        sub = dataclasses.replace(ctx, targets=Targets.from_dict(stage["targets"]), record={})
        model = transform.fn(model, transform.config.from_dict(fields), sub)
    return model


# ------------------------------------------------------------------------------------ the transform

@layer_transform("mixed_precision", config=MixedPrecisionConfig, layers=QUANT_LAYERS, on_wrapped="merge",
                 what="Linear/Conv/Embedding")
def _mixed_precision(model: nn.Module, config: MixedPrecisionConfig, ctx: Context, sites: list[Site]) -> nn.Module:
    """Mixed precision: per-layer formats from a candidate set under a budget, solved exactly (milp)."""
    require_data(ctx, "mixed_precision.sensitivity", "calibration data")
    sites = quant_sites(sites, ctx.targets, "mixed_precision")
    model = sites[0].model.eval()
    names = [s.name for s in sites]
    types = {s.name: type(float_layer(s.layer)).__name__ for s in sites}
    options, unavailable = _options(sites, config, ctx)
    measure = output_distortion if config.sensitivity == "distortion" else fisher_distortion
    sens = measure(model, names, [[None if isinstance(o, str) else o for o in row] for row in options],
                   ctx.data.calib, config.calib_batches, ctx.device)
    sens[np.array([[isinstance(o, str) for o in row] for row in options])] = np.inf
    budget = budget_for(model, config, ctx, names, options, types, apply_plan,
                        plain={s.name: float_layer(s.layer) for s in sites})

    def record(plan_idx: list[int], rounds: list[dict[str, Any]]) -> dict[str, Any]:
        plan = {n: config.candidates[c] for n, c in zip(names, plan_idx)}
        out = {"sensitivity": config.sensitivity, "plan": {n: c.label for n, c in plan.items()},
               "counts": {c.label: sum(p == c for p in plan.values()) for c in config.candidates},
               "budget": {"field": budget.field, "limit": round(budget.limit, 4), "unit": budget.unit},
               "predicted": round(budget.fixed + sum(float(budget.use[i, c]) for i, c in enumerate(plan_idx)), 4),
               "rounds": rounds, "predicted_distortion": float(f"{sum(sens[i, c] for i, c in enumerate(plan_idx)):.6g}"),
               "layer_sensitivity": {n: {config.candidates[j].label: float(f"{sens[i, j]:.4g}")
                                         for j in range(sens.shape[1]) if np.isfinite(sens[i, j])}
                                     for i, n in enumerate(names)},
               "stages": plan_stages(plan, config.candidates, types, config.calib_batches)}
        if unavailable:
            out["unavailable"] = unavailable
        return out

    plan_idx, rounds = _solve(config, sens, budget, record)
    ctx.record.update(record(plan_idx, rounds))
    model = apply_plan(model, ctx.record["stages"], ctx)
    ctx.log(f"mixed_precision: {', '.join(f'{k} x{v}' for k, v in ctx.record['counts'].items())}")
    return model.eval()


def _options(sites: list[Site], config: MixedPrecisionConfig, ctx: Context
             ) -> tuple[list[list[Any]], dict[str, dict[str, str]]]:
    """options[l][c]: the layer's wrapper in format c, None for float (the layer as it is), or why it
    does not fit; a layer that fits no candidate is a ConfigError naming it."""
    options, unavailable = [], {}
    hessians = layer_hessians(sites[0].model, [s.name for s in sites], ctx.data.calib, config.calib_batches,
                              ctx.device) if any(c.method == "gptq" for c in config.candidates) else {}
    for s in sites:
        row = [None if c.is_float else c.fit(float_layer(s.layer), hessians.get(s.name)) for c in config.candidates]
        bad = {c.label: o for c, o in zip(config.candidates, row) if isinstance(o, str)}
        if len(bad) == len(row):
            raise ConfigError("candidates", f"layer {s.name!r} takes none of the formats ({next(iter(bad.values()))}); "
                              f"add one that fits (or {{}} to keep it float), or exclude it with targets.exclude")
        if bad:
            unavailable[s.name] = bad
        options.append(row)
    return options, unavailable


def _solve(config: MixedPrecisionConfig, sens: np.ndarray, budget: Budget,
           record: Callable[[list[int], list[dict[str, Any]]], dict[str, Any]]) -> tuple[list[int], list[dict[str, Any]]]:
    """Solve, apply to a copy, measure; correct the prediction by what it missed and solve again.

    On disk most of the miss is the manifest, which grows with every quantized layer (its name in the
    stage's targets, its replay edit): the miss is spread over the layers the plan changes, so a plan
    that changes more layers is predicted to cost more. A latency miss shifts the whole budget."""
    changes = np.array([[not c.is_float for c in config.candidates]] * sens.shape[0], dtype=float)
    per_layer, shift, base_miss = 0.0, 0.0, None
    keep = next((j for j, c in enumerate(config.candidates) if c.is_float), None)
    rounds: list[dict[str, Any]] = []
    best = None
    tolerance = config.latency.tolerance if budget.unit == "ms" else 0.0
    for _ in range(config.rounds):
        use = budget.use + per_layer * changes
        plan = solve_plan(sens, use, budget.limit - budget.fixed - shift)
        if plan is None:
            if best is not None:
                break  # corrected past what the formats allow: keep the closest measured plan
            cheapest = np.where(np.isfinite(sens), budget.use, np.inf).argmin(1).tolist()
            closest, how = budget.fixed + float(sum(budget.use[i, c] for i, c in enumerate(cheapest))), "takes"
            if budget.measure is not None and not rounds:  # the prediction may be pessimistic: measure it
                predicted, closest, how = closest, budget.measure(record(cheapest, [])["stages"],
                                                                  record(cheapest, [])), "measured"
                rounds.append({"predicted": round(predicted, 4), "measured": round(float(closest), 4),
                               "met": bool(closest <= budget.limit * (1 + tolerance)), "plan": "cheapest"})
                if rounds[-1]["met"] and budget.unit != "ms":
                    return cheapest, rounds
                if rounds[-1]["met"]:  # within reach after all: correct the whole budget by the miss and solve again
                    best = (cheapest, closest)
                    shift += closest - predicted
                    continue
            raise ConfigError(budget.field, f"{budget.limit:,.6g} {budget.unit} is out of reach: the closest plan "
                              f"(every layer in its cheapest candidate) {how} {closest:,.6g} {budget.unit}"
                              f"{budget.closest_note(closest)}; loosen the budget or add cheaper candidates")
        predicted = budget.fixed + shift + sum(float(use[i, c]) for i, c in enumerate(plan))
        entry: dict[str, Any] = {"predicted": round(predicted, 4)}
        if budget.measure is None:
            return plan, rounds + [entry]
        # measured with the record it will carry (this round's figures filled in as if met)
        actual = budget.measure(record(plan, [])["stages"],
                                record(plan, rounds + [{**entry, "measured": round(budget.limit, 4), "met": True}]))
        met = actual <= budget.limit * (1 + tolerance)
        rounds.append({**entry, "measured": round(float(actual), 4), "met": met})
        if met:
            return plan, rounds
        if best is None or actual < best[1]:
            best = (plan, actual)
        changed = sum(changes[i, c] for i, c in enumerate(plan))
        if budget.unit == "bytes" and changed and keep is not None:
            raw = predicted - shift - per_layer * changed  # this plan's bytes before any correction
            if base_miss is None:  # the part of the miss that every plan pays: measured on the plan that changes nothing
                unchanged = [keep] * len(plan)
                base_miss = budget.measure([], record(unchanged, [])) - budget.fixed - float(budget.use[:, keep].sum())
                shift = max(base_miss, 0.0)
            per_layer = max(per_layer, (actual - raw - shift) / changed)
        else:
            shift += max(actual - predicted, actual - budget.limit, 0.0)
    if budget.unit == "bytes":  # a file budget is a promise: never hand back a plan that breaks it
        raise ConfigError(budget.field, f"{budget.limit:,.0f} bytes was not met in {config.rounds} rounds: the "
                          f"closest plan measured {best[1]:,.0f} bytes; loosen the budget or raise rounds")
    return best[0], rounds  # a latency target missed by more than its tolerance: the record says met: false
