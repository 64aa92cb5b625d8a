"""Quantization-aware training: prepare fake-quant wrappers, fine-tune through them, convert.

    cfg = QATConfig(weight=QuantSpec(format=IntFormat(bits=4), method="lsq"), epochs=2, lr=1e-4)
    model = nncompress.apply(model, cfg, context=nncompress.Context(data=data, teacher=teacher))

Gradients pass the rounding by the straight-through estimator (`STEQuantize`); LSQ learns each step,
PACT each activation clip, DoReFa trains tanh-normalised weights, rtn keeps the observer's range
(weights re-observed after every optimizer step). Binary and ternary weight formats train the same
way (their alpha is refitted from the weights at every forward).

`bits_schedule: [8, 4, 2]` trains at each weight width in turn (progressive quantization, Zhuang
et al. 2018), `epochs` at each; the activation format keeps its width.

In your own training loop, `step` splits the stage in two applications, each recorded (so `save` and
`load` work after either), as torchao's `QATConfig(step=...)` does:

    model = nncompress.apply(model, QATConfig(weight=spec, step="prepare"))   # wrappers, train mode
    for x, y in loader: ...                                                   # your loop, your optimizer
    model = nncompress.apply(model, QATConfig(weight=spec, step="convert"))   # frozen, eval mode

`convert` freezes exactly the tensors the fake-quant forward uses, so prepared and converted models
agree bit for bit. Integer weight grids (rtn, or LSQ whose learned step becomes the fixed scale) and
binary / ternary weights keep an eval-mode wrapper with a frozen weight quantizer, so checkpoints store
their weights as bit-packed codes (`quant.storage`); other weight formats (DoReFa, float grids) are
baked in: weight-only layers become plain Linear/Conv modules, layers with input quantization keep
their (frozen) input quantizer around the baked base.

>>> import nncompress
>>> from nncompress.formats import IntFormat
>>> spec = QuantSpec(format=IntFormat(bits=4), method="lsq")
>>> m = nncompress.apply(nn.Sequential(nn.Linear(4, 3)), QATConfig(weight=spec, step="prepare"))
>>> x = torch.randn(2, 4)
>>> y = m(x)                                           # fake-quant forward (straight-through backward)
>>> c = nncompress.apply(m, QATConfig(weight=spec, step="convert"))
>>> torch.equal(c(x), y), type(c[0]).__name__, c[0].weight_quant.spec.method
(True, 'QuantLinear', 'rtn')
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn as nn

from ..core.objectives import kd_logits_loss, objective, require_data
from ..core import ConfigError, Context, Edits, Site, TrainConfig, check, fit, get_module, layer_transform
from ..core.errors import TargetError
from ..core.train import make_optimizer
from ..core.zeros import zero_keeper
from ..formats import BinaryFormat, IntFormat, PerGroup, TernaryFormat
from .bn_fold import fold_batchnorm
from .fake_quant import EPS, FakeQuant, QuantSpec, QuantWrapper
from .ptq import QUANT_LAYERS, calibrate, quant_sites, wrap_sites

__all__ = ["QATConfig", "frozen_weight_quant", "refresh_weight_scales", "kd_loss"]


@dataclasses.dataclass(frozen=True)
class QATConfig(TrainConfig):
    """QAT options: the training loop's, plus

    weight:        weight quantization (method rtn | lsq | dorefa; binary/ternary formats too)
    activation:    input quantization of each wrapped layer (rtn | lsq | pact), or None
    bits_schedule: integer weight widths to train at in turn, e.g. [8, 4, 2]; empty: the format's own
    kd_alpha:      weight of logits distillation from ctx.teacher (label loss gets 1 - kd_alpha)
    temperature:   distillation temperature T
    calib_batches: calibration batches that initialise activation ranges (and LSQ steps, PACT alphas)
    fold_bn:       fold BatchNorm into the preceding layer before training
    step:          all (prepare, train, convert) | prepare (wrap only: train in your own loop) | convert
                   (freeze the prepared wrappers among the targets)
    """

    weight: QuantSpec = QuantSpec()
    activation: QuantSpec | None = None
    bits_schedule: tuple[int, ...] = ()
    kd_alpha: float = 0.0
    temperature: float = 4.0
    calib_batches: int = 8
    fold_bn: bool = False
    step: Literal["all", "prepare", "convert"] = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.weight.method != "pact", "weight.method",
              "pact clips activations; for weights use rtn, lsq or dorefa")
        if self.activation is not None:
            check(self.activation.method != "dorefa", "activation.method",
                  "dorefa here quantizes weights; for activations use rtn, lsq or pact")
            check(not isinstance(self.activation.granularity, PerGroup), "activation.granularity",
                  "activations take per_tensor or per_channel (their shape varies); per_group is for weights")
        for i, b in enumerate(self.bits_schedule):
            check(2 <= b <= 16, f"bits_schedule[{i}]", f"integer widths are 2..16, got {b}")
        if self.bits_schedule:
            check(isinstance(self.weight.format, IntFormat), "weight.format",
                  "a bits_schedule needs an integer weight format ({kind: int})")
        check(0.0 <= self.kd_alpha <= 1.0, "kd_alpha", f"must be in [0, 1], got {self.kd_alpha}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.calib_batches >= 1, "calib_batches", f"must be >= 1, got {self.calib_batches}")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's logits distillation: T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean.

    >>> kd_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]), temperature=4.0).item()
    0.0
    """
    return kd_logits_loss(student, teacher, temperature)


def _wrappers(model: nn.Module) -> list[tuple[str, QuantWrapper]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantWrapper)]


def _prepare(sites: list[Site], weight: QuantSpec, activation: QuantSpec | None, calib: Any = None,
             calib_batches: int = 8, device: torch.device | None = None) -> nn.Module:
    """Wrap the sites for training; activation quantizers are initialised on `calib` (required when
    `activation` is given). rtn activations keep observing while training."""
    wrappers = wrap_sites(sites, weight, activation)
    model = sites[0].model
    if activation is not None:
        if calib is None:
            raise ConfigError("activation", "initialising activation quantizers needs calibration data")
        calibrate(model, calib, calib_batches, device)
        for w in wrappers.values():
            if w.input_quant is not None:  # embeddings are weight only
                w.input_quant.track = w.input_quant.spec.method == "rtn"
    return model


def refresh_weight_scales(model: nn.Module) -> None:
    """Re-observe every rtn weight quantizer on the current weights (after an optimizer step)."""
    for _, w in _wrappers(model):
        if w.weight_quant is not None and w.weight_quant.spec.method == "rtn":
            w.calibrate_weight()


def frozen_weight_quant(fq: FakeQuant) -> FakeQuant | None:
    """A quantizer with fixed qparams that computes what `fq` computes in eval mode, for formats whose
    codes checkpoints store bit-packed; None for the others (DoReFa, float grids, ...).

    rtn keeps its scale; LSQ's learned step becomes the scale (|step| clamped as the forward does,
    zero point 0); binary / ternary fit their alpha from the weight and have no state to freeze."""
    fmt, method = fq.fmt, fq.spec.method
    if isinstance(fmt, (BinaryFormat, TernaryFormat)):
        return fq
    if not isinstance(fmt, IntFormat) or method not in ("rtn", "lsq") or not fq.ready:
        return None
    fq.finish()
    frozen = FakeQuant(dataclasses.replace(fq.spec, method="rtn"), "weight")
    with torch.no_grad():
        if method == "lsq":
            scale = fq.step.detach().abs().clamp_min(EPS).clone()                # lsq_quantize's |s|, clamped
            frozen.set_qparams(scale, torch.zeros_like(scale, dtype=torch.int32))
        else:
            zp = None if fq.zero_point is None else fq.zero_point.detach().clone()
            frozen.set_qparams(fq.scale.detach().clone(), zp)
    return frozen


def _convert(model: nn.Module, sites: list[tuple[str, QuantWrapper]], edits: Edits) -> nn.Module:
    """Freeze the quantized weights (see the module docstring); returns the model, in eval mode.

    Wrappers whose weight format stores as packed codes keep a frozen weight quantizer; the others bake
    the dequantized weight in (weight-only ones become plain modules). Input quantizers stay, frozen.
    """
    model.eval()
    for name, w in sites:
        frozen = frozen_weight_quant(w.weight_quant) if w.weight_quant is not None else None
        if w.input_quant is None and frozen is None:
            model = edits.swap(model, name, w.merge())
            continue
        edits.touch(model, name)  # its quantizers change in place: recorded as they end up
        if frozen is not None:
            w.weight_quant = frozen
        else:
            with torch.no_grad():
                baked = w.quantized_weight().detach().clone()
            w.base.weight = nn.Parameter(baked, requires_grad=w.base.weight.requires_grad)
            w.weight_quant = None
        if w.input_quant is not None:
            w.input_quant.track = False
            for p in w.input_quant.parameters():
                p.requires_grad_(False)
    return model


def _set_weight_spec(wrappers: list[QuantWrapper], spec: QuantSpec) -> None:
    """Swap each wrapper's weight quantizer for a fresh one with `spec`, fitted to the current weights."""
    for w in wrappers:
        w.weight_quant = FakeQuant(spec, "weight").to(w.base.weight.device)
        w.calibrate_weight()


@layer_transform("qat", config=QATConfig, layers=QUANT_LAYERS, on_wrapped="merge", what="Linear/Conv")
def _qat(model: nn.Module, config: QATConfig, ctx: Context, sites: list[Site]) -> nn.Module:
    """Quantization-aware training through fake-quant wrappers, then convert (outputs kept bit for bit)."""
    if config.step == "convert":
        prepared = [(s.name, s.layer) for s in sites if isinstance(s.layer, QuantWrapper)]
        if not prepared:
            raise TargetError("qat: step convert found no quantized layer among the targets; apply "
                              "QATConfig(step='prepare') first")
        return _convert(model, prepared, ctx.edits)
    needs_data = config.step == "all" or config.activation is not None
    if needs_data:
        require_data(ctx, "qat")
    sites = quant_sites(sites, ctx.targets, "qat")
    model.to(ctx.device)
    if config.fold_bn:
        model.eval()
        example = ctx.data.example_batch(2) if ctx.data is not None else None
        ctx.record["folded"] = [list(p) for p in fold_batchnorm(model, example, edits=ctx.edits)]
    widths = list(config.bits_schedule) or [None]
    specs = [config.weight if b is None else config.weight.with_bits(b) for b in widths]
    calib = ctx.data.calib if ctx.data is not None else None
    model = _prepare(sites, specs[0], config.activation, calib, config.calib_batches, ctx.device)
    if config.step == "prepare":
        return model.train()
    loss_fn = objective(ctx, "qat.kd_alpha", kd_alpha=config.kd_alpha, temperature=config.temperature)
    wrappers = [get_module(model, s.name) for s in sites]
    train_cfg = TrainConfig.of(config)
    keep_zeros = zero_keeper(model)  # weights pruned by an earlier stage stay pruned

    def after_step(m: nn.Module) -> None:
        keep_zeros(m)
        refresh_weight_scales(m)

    losses = []
    for i, spec in enumerate(specs):
        if i:
            _set_weight_spec(wrappers, spec)
        optimizer = make_optimizer(model.parameters(), train_cfg, "qat")
        losses.append(fit(model, ctx.data.train, loss_fn, train_cfg, optimizer=optimizer,
                          after_step=after_step, progress=ctx.progress,
                          desc=f"qat{'' if widths[i] is None else f' {widths[i]}-bit'}"))
    model = _convert(model, [(s.name, w) for s, w in zip(sites, wrappers)], ctx.edits)
    ctx.record["epoch_losses"] = [[round(x, 6) for x in stage] for stage in losses]
    ctx.record["weight"] = specs[-1].resolved("weight").to_dict()
    return model.eval()
