"""Post-training quantization: the `quantize` transform, and per-layer sensitivity.

    from nncompress.quant import QuantizeConfig, QuantSpec
    from nncompress.formats import IntFormat, PerGroup
    cfg = QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=64)),
                         activation=QuantSpec(format=IntFormat(bits=8, signed=False, symmetric=False)))
    model = nncompress.apply(model, cfg, context=nncompress.Context(data=data))

As a recipe stage:

    - kind: quantize
      weight: {format: {kind: int, bits: 4}, granularity: {kind: per_group, axis: 1, size: 64}, observer: mse}
      activation: {format: {kind: int, bits: 8, signed: false, symmetric: false}, observer: percentile,
                   observer_args: {percentile: 99.99}}
      calib_batches: 8
      fold_bn: true

The model keeps fake-quant wrappers (`QuantLinear` / `QuantConv`, original under `.base`), so what is
measured afterwards is the quantized model. `ctx.record` holds, per layer, the resolved specs and
every scale / zero point as lists: replay rebuilds the same wrappers without data.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core import Config, ConfigError, Context, Targets, check, register
from ..core.errors import DataError, TargetError
from ..formats import PerGroup
from .bn_fold import equalize, fold_batchnorm, set_module
from .fake_quant import QUANTIZABLE, FakeQuant, QuantSpec, QuantWrapper, calibrating, wrap

__all__ = ["QuantizeConfig", "quantize", "quantizable_layers", "unwrap_layers", "wrap_layers", "calibrate",
           "bias_correct",
           "layer_record", "rebuild_layer", "quant_sensitivity", "batch_inputs", "call_model"]


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(Config):
    """Post-training quantization.

    weight:          how weights are quantized (method rtn: PTQ learns nothing)
    activation:      how each quantized layer's input is quantized; None for weight-only
    calib_batches:   batches of the calibration loader fed to the activation observers
    fold_bn:         fold BatchNorm into the preceding Linear/Conv first (inference-exact)
    equalize:        cross-layer equalization of Linear/Conv -> ReLU -> Linear/Conv chains (DFQ)
    bias_correction: shift each bias by the mean output error the weight quantization causes
    """

    weight: QuantSpec = QuantSpec()
    activation: QuantSpec | None = None
    calib_batches: int = 8
    fold_bn: bool = False
    equalize: bool = False
    bias_correction: bool = False

    def __post_init__(self) -> None:
        check(self.calib_batches >= 1, "calib_batches", f"must be >= 1, got {self.calib_batches}")
        check(self.weight.method == "rtn", "weight.method",
              f"{self.weight.method} learns its ranges by training; PTQ takes method rtn, use kind: qat")
        if self.activation is not None:
            check(self.activation.method == "rtn", "activation.method",
                  f"{self.activation.method} learns its ranges by training; PTQ takes method rtn, use kind: qat")
            check(not isinstance(self.activation.granularity, PerGroup), "activation.granularity",
                  "activations take per_tensor or per_channel (their shape varies); per_group is for weights")


# ------------------------------------------------------------------------------------ helpers

def batch_inputs(batch: Any) -> Any:
    """The model inputs of a batch: `x` of `(x, y)`, or the dict itself."""
    if isinstance(batch, dict):
        return batch
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        return batch[0]
    if torch.is_tensor(batch):
        return batch
    raise DataError(f"a batch must be an (x, y) pair, a tensor or a dict of tensors, got {type(batch).__name__}")


def call_model(model: nn.Module, inputs: Any, device: torch.device | None = None) -> Any:
    if isinstance(inputs, dict):
        return model(**{k: v.to(device) if device is not None else v for k, v in inputs.items()})
    return model(inputs.to(device) if device is not None else inputs)


def quantizable_layers(model: nn.Module, targets: Targets) -> list[tuple[str, nn.Module]]:
    """Targeted Linear/Conv layers (exact types) that are not already inside a quant wrapper, and
    `nn.Embedding` tables when `targets.types` names Embedding (weight only; never by default, so
    existing recipes keep their float embeddings)."""
    inside = {id(m.base) for m in model.modules() if isinstance(m, QuantWrapper)}
    embeddings = any(t in ("Embedding", nn.Embedding) for t in targets.types)
    return [(n, m) for n, m in targets.select(model) if type(m) in QUANTIZABLE and id(m) not in inside
            and (embeddings or type(m) is not nn.Embedding)]


def unwrap_layers(model: nn.Module, targets: Targets, names: list[str] | None = None) -> tuple[nn.Module, list[str]]:
    """Put back the `.base` of targeted wrappers (a layer quantized again starts from its float
    weights); `names` (from a record) replays exactly those. Returns the model and the names."""
    if names is None:
        names = [n for n, m in model.named_modules()
                 if isinstance(m, QuantWrapper) and targets.matches(n, m.base)]
    for name in names:
        model = set_module(model, name, model.get_submodule(name).base)
    return model, list(names)


def wrap_layers(model: nn.Module, layers: list[tuple[str, nn.Module]], weight: QuantSpec | None,
                activation: QuantSpec | None) -> tuple[nn.Module, dict[str, QuantWrapper]]:
    """Replace each (name, layer) by its wrapper; raises a ConfigError naming the layer on a bad fit."""
    wrappers = {}
    for name, layer in layers:
        try:
            wrapper = wrap(layer, weight, None if type(layer) is nn.Embedding else activation)  # ids: weight only
        except ConfigError as e:
            raise ConfigError(f"weight.granularity.{e.path}" if e.path else "weight.granularity",
                              f"layer {name!r} ({type(layer).__name__}, weight {tuple(layer.weight.shape)}): "
                              f"{e.message}; or exclude it with targets.exclude: [{name!r}]") from None
        model = set_module(model, name, wrapper)
        wrappers[name] = wrapper
    return model, wrappers


def _batches(loader: Iterable, n: int) -> Iterable:
    for i, batch in enumerate(loader):
        if i >= n:
            break
        yield batch


def calibrate(model: nn.Module, loader: Iterable, batches: int, device: torch.device | None = None,
              input_means: dict[str, QuantWrapper] | None = None) -> dict[str, Tensor]:
    """Run `batches` batches through the model inside `calibrating`; optionally collect the mean
    input of each wrapper in `input_means` (per input channel), for bias correction."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, w in (input_means or {}).items():
        def hook(_m, args, name=name):
            x = args[0].detach().double()
            dims = [d for d in range(x.ndim) if d != (x.ndim - 1 if isinstance(_m.base, nn.Linear) else 1)]
            sums[name] = sums.get(name, 0) + x.sum(dims)
            counts[name] = counts.get(name, 0) + x.numel() // x.shape[-1 if isinstance(_m.base, nn.Linear) else 1]
        handles.append(w.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with calibrating(model), torch.no_grad():
            seen = 0
            for batch in _batches(loader, batches):
                call_model(model, batch_inputs(batch), device)
                seen += 1
            if seen == 0:
                raise DataError("calibration loader yielded no batches; give the data a calib split")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (sums[n] / counts[n]) for n in sums}


def bias_correct(wrapper: QuantWrapper, mean_input: Tensor) -> Tensor:
    """Shift `wrapper.base.bias` so that E[W_q x] + b' = E[W x] + b (Nagel et al. 2019, empirical).

    mean_input: E[x] per input channel (I,). For convs the kernel's weights are summed, which is
    exact away from the padded border. Returns the subtracted delta (O,).
    """
    w = wrapper.base.weight
    with torch.no_grad():
        dw = (wrapper.quantized_weight() - w).double()                       # (O, I/groups, k...)
        dw = dw.flatten(2).sum(-1) if dw.ndim > 2 else dw                     # (O, I/groups)
        groups = getattr(wrapper.base, "groups", 1)
        ex = mean_input.double().view(groups, -1).repeat_interleave(dw.shape[0] // groups, 0)   # (O, I/groups)
        delta = (dw * ex).sum(1).to(w.dtype)                                  # (O,)
        if wrapper.base.bias is None:
            wrapper.base.bias = nn.Parameter(-delta)
        else:
            wrapper.base.bias.sub_(delta)
    return delta


def layer_record(wrapper: QuantWrapper) -> dict[str, Any]:
    """What replay needs to rebuild `wrapper`: the layer type and each quantizer's record."""
    return {"type": type(wrapper.base).__name__,
            "weight": wrapper.weight_quant.to_record() if wrapper.weight_quant is not None else None,
            "input": wrapper.input_quant.to_record() if wrapper.input_quant is not None else None}


def rebuild_layer(layer: nn.Module, record: dict[str, Any]) -> QuantWrapper:
    """The wrapper `layer_record` describes, around `layer`, without data."""
    weight = FakeQuant.from_record(record["weight"]) if record.get("weight") else None
    act = FakeQuant.from_record(record["input"]) if record.get("input") else None
    return wrap(layer, weight, act, calibrate_weight=False)


def _replay(model: nn.Module, config: QuantizeConfig, ctx: Context) -> nn.Module:
    rec = ctx.record
    model, _ = unwrap_layers(model, ctx.targets, rec.get("unwrapped", []))
    if rec.get("folded"):
        fold_batchnorm(model, pairs=rec["folded"])
    if rec.get("equalized"):
        equalize(model, pairs=rec["equalized"])
    for name, layer_rec in rec.get("layers", {}).items():
        model = set_module(model, name, rebuild_layer(model.get_submodule(name), layer_rec))
    for name, delta in rec.get("bias_correction", {}).items():
        base = model.get_submodule(name).base
        d = torch.tensor(delta, dtype=base.weight.dtype)
        with torch.no_grad():
            if base.bias is None:
                base.bias = nn.Parameter(-d)
            else:
                base.bias.sub_(d)
    return model


# ------------------------------------------------------------------------------------ the transform

@register("quantize", config=QuantizeConfig)
def quantize(model: nn.Module, config: QuantizeConfig, ctx: Context) -> nn.Module:
    """Post-training quantization: fake-quant wrappers with scales from observers and calibration data."""
    if ctx.replay:
        return _replay(model, config, ctx)
    needs_data = config.activation is not None or config.bias_correction
    if needs_data and ctx.data is None:
        raise ConfigError("quantize.activation" if config.activation is not None else "quantize.bias_correction",
                          "needs calibration data; run it in a recipe or pass Context(data=...)")
    model.eval()
    model, ctx.record["unwrapped"] = unwrap_layers(model, ctx.targets)
    example = ctx.data.example_batch(2) if ctx.data is not None else None
    if config.fold_bn:
        ctx.record["folded"] = [list(p) for p in fold_batchnorm(model, example)]
    if config.equalize:
        ctx.record["equalized"] = [list(p) for p in equalize(model, example)]
    layers = quantizable_layers(model, ctx.targets)
    if not layers:
        raise TargetError("quantize: no Linear/Conv1d/Conv2d/Conv3d layer among the targets; "
                          "check targets.include / types")
    model, wrappers = wrap_layers(model, layers, config.weight, config.activation)
    model.to(ctx.device)
    if needs_data:
        biased = {n: w for n, w in wrappers.items() if type(w.base) is not nn.Embedding}   # no bias to correct
        means = calibrate(model, ctx.data.calib, config.calib_batches, ctx.device,
                          input_means=biased if config.bias_correction else None)
        if config.bias_correction:
            ctx.record["bias_correction"] = {n: bias_correct(wrappers[n], means[n]).tolist() for n in biased}
    for name, w in wrappers.items():
        if w.input_quant is not None and not w.input_quant.ready:
            raise DataError(f"quantize: layer {name!r} saw no calibration input; it is not on the forward path "
                            f"of the calibration data, exclude it with targets.exclude: [{name!r}]")
    ctx.record["layers"] = {n: layer_record(w) for n, w in wrappers.items()}
    ctx.log(f"quantize: {len(wrappers)} layers wrapped")
    return model.eval()


# ------------------------------------------------------------------------------------ sensitivity

def _accuracy(model: nn.Module, loader: Iterable, device: torch.device | None, max_batches: int | None) -> float:
    correct = total = 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = batch[0], batch[1]
            pred = call_model(model, x, device).argmax(-1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    return correct / max(total, 1)


def _fidelity(reference: list[Tensor]) -> Callable[[nn.Module, Iterable, Any, Any], float]:
    """Mean cosine similarity of the outputs to `reference` (for tasks without labels)."""
    def metric(model, loader, device, max_batches):
        sims = []
        with torch.no_grad():
            for ref, batch in zip(reference, _batches(loader, max_batches or len(reference))):
                out = call_model(model, batch_inputs(batch), device)
                sims.append(F.cosine_similarity(out.flatten(1).float().cpu(), ref.flatten(1), dim=-1).mean())
        return float(torch.stack(sims).mean())
    return metric


def quant_sensitivity(model: nn.Module, data: Any, spec: QuantSpec, targets: Targets | None = None,
                      max_batches: int | None = None, device: torch.device | None = None
                      ) -> list[tuple[str, float]]:
    """Quantize one layer's weights at a time (round to nearest with `spec`) and measure the drop of
    the metric on `data.test`: accuracy for classification, output cosine similarity to the float
    model otherwise. Returns (layer, drop) sorted from the most sensitive.

    >>> from nncompress.formats import IntFormat
    >>> m = nn.Sequential(nn.Linear(4, 3))
    >>> with torch.no_grad():   # int2 rows: [5,1,1,1] -> [5,0,0,0], [1,1,3,1.2] -> [0,0,3,0]
    ...     _ = m[0].weight.copy_(torch.tensor([[5.0, 1, 1, 1], [1, 2, 1, 1], [1, 1, 3, 1.2]]))
    ...     _ = m[0].bias.zero_()
    >>> class Data: task = "classification"; test = [(torch.eye(4), torch.tensor([0, 1, 2, 2]))]
    >>> quant_sensitivity(m, Data(), QuantSpec(format=IntFormat(bits=2)))   # the last sample flips
    [('0', 0.25)]
    """
    targets = targets or Targets()
    was_training = model.training
    model.eval()
    if getattr(data, "task", "classification") == "classification":
        metric = _accuracy
    else:
        with torch.no_grad():
            ref = [call_model(model, batch_inputs(b), device).float().cpu()
                   for b in _batches(data.test, max_batches or 10 ** 9)]
        metric = _fidelity(ref)
    baseline = metric(model, data.test, device, max_batches)
    drops = []
    for name, layer in quantizable_layers(model, targets):
        wrapper = wrap(layer, spec, None)
        model = set_module(model, name, wrapper)
        try:
            drops.append((name, baseline - metric(model, data.test, device, max_batches)))
        finally:
            model = set_module(model, name, layer)
    model.train(was_training)
    return sorted(drops, key=lambda t: -t[1])
