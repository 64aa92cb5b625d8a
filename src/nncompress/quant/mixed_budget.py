"""What a mixed-precision plan spends, for `mixed_precision`: every layer in every candidate format
priced in the budget's unit, plus how to measure a whole plan once applied to a copy.

- bytes: each layer encoded alone in each format by the checkpoint writer (provider "state_bytes"),
  the rest of the model as the checkpoint before the stage minus its layers; measured by saving the
  applied copy with its history and this stage's entry (provider "checkpoint_bytes").
- bops: MACs of one sample x weight bits x input bits (`bops_per_layer`); exact, nothing to measure.
- latency (onnxruntime): a table of each layer in each format timed alone on the target (provider
  "format_table", `eval.format_table`); the rest is the model timed whole minus its layers. A format
  counts only where nncompress exports an int8 kernel for it (float, and W8A8 through
  `export_qdq_onnx`). The applied copy is exported as it deploys and timed against the float model in
  interleaved rounds (provider "deployed_latency").
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import numpy as np
import torch.nn as nn

from ..core import Context, Edits, history, lookup, model_source
from ..core.calibration import io_shapes
from ..core.config import parse_target
from ..formats import IntFormat, PerChannel, PerTensor
from .fake_quant import QuantWrapper
from .mixed_costs import bops_per_layer
from .ptq import float_layer

__all__ = ["Budget", "budget_for", "ort_format"]

SLACK_BYTES = 128  # room for the figures this stage's record gains after the measurement (its last round)


@dataclasses.dataclass
class Budget:
    """`use[l, c]`: what layer l spends in format c (inf: not available); `fixed`: the rest of the model;
    `measure(stages, record)`: the plan applied to a copy, measured (None: the prediction is exact)."""

    field: str
    unit: str
    use: np.ndarray
    fixed: float
    limit: float
    closest_note: Callable[[float], str]
    measure: Callable[[list[dict[str, Any]], dict[str, Any]], float] | None = None


def budget_for(model: nn.Module, config: Any, ctx: Context, names: list[str], options: list[list[Any]],
               types: dict[str, str], apply_plan: Callable[..., nn.Module],
               plain: dict[str, nn.Module] | None = None) -> Budget:
    """`plain`: each layer as a plain module (another technique's wrapper merged), for counting MACs."""
    field = config.budget_field
    if field in ("max_bytes", "size_ratio"):
        return _bytes(model, config, ctx, names, options, apply_plan)
    if field == "max_bops":
        return _bops(model, config, ctx, names, options, plain or {})
    return _latency(model, config, ctx, names, options, apply_plan)


def _trial(model: nn.Module, config: Any, ctx: Context, stages: list[dict[str, Any]], record: dict[str, Any],
           apply_plan: Callable[..., nn.Module]) -> tuple[nn.Module, dict[str, Any]]:
    """The plan applied to a copy, and the history entry `apply` will write for it."""
    sub = dataclasses.replace(ctx, edits=Edits(), record={})
    trial = apply_plan(copy.deepcopy(model), stages, sub)
    entry = {"config": config.to_dict(), "targets": ctx.targets.to_dict(), "record": record,
             "edits": sub.edits.finalize(trial)}
    return trial, entry


def _bytes(model: nn.Module, config: Any, ctx: Context, names: list[str], options: list[list[Any]],
           apply_plan: Callable[..., nn.Module]) -> Budget:
    state_bytes = lookup("state_bytes", "measure")
    saved_bytes = lookup("checkpoint_bytes", "measure")
    current = [state_bytes(model.get_submodule(n)) for n in names]
    use = np.array([[current[i] if o is None else np.inf if isinstance(o, str) else state_bytes(o) for o in row]
                    for i, row in enumerate(options)], dtype=float)
    total = saved_bytes(model, history(model), model_source(model))
    limit = config.max_bytes if config.max_bytes is not None else total / config.size_ratio

    def measure(stages: list[dict[str, Any]], record: dict[str, Any]) -> float:
        trial, entry = _trial(model, config, ctx, stages, record, apply_plan)
        return saved_bytes(trial, history(model) + [entry], model_source(model)) + SLACK_BYTES

    return Budget(config.budget_field, "bytes", use, total - sum(current), float(limit),
                  lambda v: f" ({total / v:.2f}x smaller than the {total:,} bytes before)", measure)


def _specs(layer: nn.Module) -> tuple[Any, Any]:
    if isinstance(layer, QuantWrapper):
        return (None if layer.weight_quant is None else layer.weight_quant.spec,
                None if layer.input_quant is None else layer.input_quant.spec)
    return None, None


def _bops(model: nn.Module, config: Any, ctx: Context, names: list[str], options: list[list[Any]],
          plain: dict[str, nn.Module]) -> Budget:
    shapes = io_shapes(model, names, ctx.data.example_batch(1))
    rows = []
    for n, row in zip(names, options):
        here = model.get_submodule(n)
        layer = plain.get(n) or float_layer(here)
        out_shape = shapes[n][1] if n in shapes else (0,)  # not called on a sample (an embedding's lookup): no MACs
        now = bops_per_layer(layer, out_shape, *_specs(here))
        rows.append([now if o is None else np.inf if isinstance(o, str) else
                     bops_per_layer(layer, out_shape, o.weight_quant.spec,
                                    None if o.input_quant is None else o.input_quant.spec) for o in row])
    return Budget("max_bops", "BOPs", np.array(rows, dtype=float), 0.0, float(config.max_bops), lambda v: "")


def ort_format(choice: Any) -> str | None:
    """The onnxruntime kernel a candidate deploys to through nncompress' exports: `fp32` (float),
    `int8_static` (int8 weights per channel or tensor and int8 inputs per tensor: `export_qdq_onnx`),
    None for formats nncompress has no onnxruntime export for (4-bit weights, weight-only int8)."""
    if choice.is_float:
        return "fp32"
    w, a = choice.weight, choice.activation
    if (a is not None and isinstance(w.format, IntFormat) and w.format.bits == 8 and isinstance(a.format, IntFormat)
            and a.format.bits == 8 and isinstance(w.granularity, (type(None), PerChannel, PerTensor))
            and isinstance(a.granularity, (type(None), PerTensor))):
        return "int8_static"
    return None


def _latency(model: nn.Module, config: Any, ctx: Context, names: list[str], options: list[list[Any]],
             apply_plan: Callable[..., nn.Module]) -> Budget:
    spec = config.latency
    inputs = ctx.data.example_batch(spec.batch)
    formats: dict[str, dict[str, nn.Module]] = {}
    for n, row in zip(names, options):
        here = model.get_submodule(n)
        formats[n] = {c.label: here if o is None else o for c, o in zip(config.candidates, row)
                      if not isinstance(o, str) and ort_format(c) is not None}
    table = lookup("format_table", "measure")(model, inputs, formats, runtime=spec.runtime, threads=spec.threads,
                                              cache_dir=ctx.cache_dir)
    use = np.array([[_ms(table, n, c.label) for c in config.candidates] for n in names], dtype=float)
    current = sum(_ms(table, n, "current") for n in names)
    if current > table.full_ms:  # timed alone the layers cost more than the model whole (per-call overhead,
        use = use * (table.full_ms / current)  # a noisy sample): scale them so the rest is never negative
        current = table.full_ms
    value, unit = parse_target(config.target_latency)
    limit = table.full_ms / value if unit == "x" else value

    def measure(stages: list[dict[str, Any]], record: dict[str, Any]) -> float:
        trial, _ = _trial(model, config, ctx, stages, record, apply_plan)
        base, ms = lookup("deployed_latency", "measure")([model, trial], inputs, runtime=spec.runtime,
                                                          threads=spec.threads)
        return ms / base * table.full_ms  # on the table's scale: the ratio is what two interleaved medians mean

    return Budget("target_latency", "ms", use, table.full_ms - current, float(limit),
                  lambda v: f" ({table.full_ms / v:.2f}x; the model runs {table.full_ms:.3g} ms now)", measure)


def _ms(table: Any, name: str, label: str) -> float:
    ms = table.ms.get(name, {}).get(label)
    return np.inf if ms is None else float(ms)
