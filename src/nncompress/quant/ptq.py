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
measured afterwards is the quantized model. The wrappers are recorded as layer swaps (their specs
and tensor shapes); the scales themselves are stored once, in the checkpoint. A layer quantized
before starts again from its float weights; a clustered or int8 layer is quantized from its values.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core import Config, ConfigError, Context, Site, Targets, check, layer_transform, set_module
from ..core.objectives import require_data
from ..core.calibration import calibrate as calibrate_stats
from ..core.calibration import feed
from ..core.errors import DataError, TargetError
from ..formats import PerGroup
from .bn_fold import equalize, fold_batchnorm
from .fake_quant import (QUANTIZABLE, QuantConv, QuantEmbedding, QuantLinear, QuantSpec, QuantWrapper, calibrating,
                         wrap)

__all__ = ["QuantizeConfig", "QUANT_LAYERS", "calibrate", "bias_correct", "quant_sensitivity", "float_layer",
           "quant_sites", "wrap_sites", "wants_embeddings"]


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

QUANT_LAYERS = (*QUANTIZABLE, QuantLinear, QuantConv, QuantEmbedding)  # own wrappers: quantized again


def wants_embeddings(targets: Targets) -> bool:
    """Embedding tables are quantized only when `targets.types` names Embedding (weight only; never by
    default, so existing recipes keep their float embeddings)."""
    return any(t in ("Embedding", nn.Embedding) for t in targets.types)


def float_layer(layer: nn.Module) -> nn.Module:
    """What a quantizer starts from: a layer quantized before starts again from its float weights."""
    return layer.base if isinstance(layer, QuantWrapper) else layer


def quant_sites(sites: list[Site], targets: Targets, stage: str) -> list[Site]:
    """The sites a quantization stage wraps (embeddings only when asked for)."""
    keep = wants_embeddings(targets)
    out = [s for s in sites if keep or type(float_layer(s.layer)) is not nn.Embedding]
    if not out:
        raise TargetError(f"{stage}: no Linear/Conv1d/Conv2d/Conv3d layer among the targets; check "
                          "targets.include / types (embeddings need types: [Embedding])")
    return out


def wrap_sites(sites: list[Site], weight: QuantSpec | None, activation: QuantSpec | None) -> dict[str, QuantWrapper]:
    """Replace each site's layer by its wrapper; raises a ConfigError naming the layer on a bad fit."""
    wrappers = {}
    for site in sites:
        layer = float_layer(site.layer)
        try:
            wrapper = wrap(layer, weight, None if type(layer) is nn.Embedding else activation)  # ids: weight only
        except ConfigError as e:
            raise ConfigError(f"weight.granularity.{e.path}" if e.path else "weight.granularity",
                              f"layer {site.name!r} ({type(layer).__name__}, weight {tuple(layer.weight.shape)}): "
                              f"{e.message}; or exclude it with targets.exclude: [{site.name!r}]") from None
        wrappers[site.name] = site.replace(wrapper)
    return wrappers


def _batches(loader: Iterable, n: int) -> Iterable:
    for i, batch in enumerate(loader):
        if i >= n:
            break
        yield batch


def calibrate(model: nn.Module, loader: Iterable, batches: int, device: torch.device | None = None,
              input_means: dict[str, QuantWrapper] | None = None) -> dict[str, Tensor]:
    """Run `batches` batches through the model inside `calibrating` (activation quantizers observe
    their inputs); optionally return the mean input of each wrapper named in `input_means` (per input
    channel), for bias correction."""
    wants = {n: ("mean",) for n in (input_means or {})}
    with calibrating(model):
        found = calibrate_stats(model, loader, wants, batches=batches, device=device, stop_early=False)
    return {n: st.mean() for n, st in found.items()}


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


# ------------------------------------------------------------------------------------ the transform

@layer_transform("quantize", config=QuantizeConfig, layers=QUANT_LAYERS, on_wrapped="merge", what="Linear/Conv")
def _quantize(model: nn.Module, config: QuantizeConfig, ctx: Context, sites: list[Site]) -> nn.Module:
    """Post-training quantization: fake-quant wrappers with scales from observers and calibration data."""
    needs_data = config.activation is not None or config.bias_correction
    if needs_data:
        require_data(ctx, "quantize.activation" if config.activation is not None else "quantize.bias_correction",
                     "calibration data")
    sites = quant_sites(sites, ctx.targets, "quantize")
    model.eval()
    example = ctx.data.example_batch(2) if ctx.data is not None else None
    if config.fold_bn:
        ctx.record["folded"] = [list(p) for p in fold_batchnorm(model, example, edits=ctx.edits)]
    if config.equalize:
        ctx.record["equalized"] = [list(p) for p in equalize(model, example)]
    wrappers = wrap_sites(sites, config.weight, config.activation)
    model = sites[0].model.to(ctx.device)
    if needs_data:
        biased = {n: w for n, w in wrappers.items() if type(w.base) is not nn.Embedding}   # no bias to correct
        means = calibrate(model, ctx.data.calib, config.calib_batches, ctx.device,
                          input_means=biased if config.bias_correction else None)
        if config.bias_correction:  # a bias that appears is structure: the swap's description sees it
            ctx.record["bias_correction"] = {n: round(float(bias_correct(wrappers[n], means[n]).abs().max()), 6)
                                             for n in biased}
    for name, w in wrappers.items():
        if w.input_quant is not None and not w.input_quant.ready:
            raise DataError(f"quantize: layer {name!r} saw no calibration input; it is not on the forward path "
                            f"of the calibration data, exclude it with targets.exclude: [{name!r}]")
    ctx.record["layers"] = sorted(wrappers)
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
            pred = feed(model, x, device).argmax(-1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    return correct / max(total, 1)


def _fidelity(reference: list[Tensor]) -> Callable[[nn.Module, Iterable, Any, Any], float]:
    """Mean cosine similarity of the outputs to `reference` (for tasks without labels)."""
    def metric(model, loader, device, max_batches):
        sims = []
        with torch.no_grad():
            for ref, batch in zip(reference, _batches(loader, max_batches or len(reference))):
                out = feed(model, batch, device)
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
            ref = [feed(model, b, device).float().cpu()
                   for b in _batches(data.test, max_batches or 10 ** 9)]
        metric = _fidelity(ref)
    baseline = metric(model, data.test, device, max_batches)
    drops = []
    embeddings = wants_embeddings(targets)
    layers = [(n, m) for n, m in targets.select(model) if type(m) in QUANTIZABLE
              and (embeddings or type(m) is not nn.Embedding)]
    for name, layer in layers:
        wrapper = wrap(layer, spec, None)
        model = set_module(model, name, wrapper)
        try:
            drops.append((name, baseline - metric(model, data.test, device, max_batches)))
        finally:
            model = set_module(model, name, layer)
    model.train(was_training)
    return sorted(drops, key=lambda t: -t[1])
