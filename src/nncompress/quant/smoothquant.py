"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8 PTQ.

A Linear computes `x W^T`; for any positive per-input-channel s, `(x / s)(W diag(s))^T` is the same
product. Transformer activations have a few outlier channels that wreck a per-tensor int8 scale,
while weights are smooth, so SmoothQuant picks

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)        (alpha = 0.5 balances the two)

to flatten the activation's channels at the cost of slightly rougher weight columns. Where the
division by s goes:

- **folded**: when a LayerNorm's output feeds *only* Linears (pre-LN transformers: OPT, Llama-style
  blocks), its weight and bias are divided by s; no op is added and the float model is unchanged.
- **explicit**: in post-LN BERT/MiniLM every LayerNorm output also feeds the residual add of the
  next sublayer, so folding would change the residual stream. Each Linear fed by it becomes a
  `SmoothedLinear` (`x / s` then the Linear with `W diag(s)`, kept as `.base`), which a later
  `quantize` stage wraps with its activation quantizer: the int8 scale is fitted to `x / s`.

Linears whose input does not come straight from a LayerNorm (BERT's attention.output.dense and
output.dense, a pooler) are left alone and listed in `ctx.record["unsmoothed"]` with the reason.

    model = nncompress.apply(model, SmoothQuantConfig(alpha=0.5), context=Context(data=data))
    model = nncompress.apply(model, QuantizeConfig(activation=QuantSpec(...)), context=Context(data=data))

`ctx.record` holds each group's LayerNorm, Linears, mode and scale range; the `SmoothedLinear`
wrappers are recorded as layer swaps, and the checkpoint brings the scales and smoothed weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Literal

import torch
import torch.nn as nn
from torch import Tensor

from ..core import (CompositionError, Config, ConfigError, Context, Site, Wrapper, check, get_module,
                    layer_transform, wrapper)
from ..core.errors import DataError, TargetError
from ..core.surgery import cut_plain, keep_indices
from ..core.calibration import batch_inputs, calibrate, move
from .bn_fold import flow_of

__all__ = ["SmoothQuantConfig", "SmoothedLinear", "smoothing_scales", "weight_input_max", "migrate_into_norm",
           "activation_maxima", "find_smooth_groups", "SmoothGroup"]


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig(Config):
    """SmoothQuant outlier smoothing (run it before `quantize`).

    alpha:          migration strength in [0, 1]: 0 leaves activations as they are, 1 moves their whole
                    range into the weights; 0.5 suits BERT/OPT, larger models with worse outliers take ~0.8
    calib_batches:  batches of the calibration loader whose per-channel |x| maxima set the scales
    explicit_scale: smooth Linears whose LayerNorm output also feeds other ops (the residual in
                    post-LN BERT) through a `SmoothedLinear` input scale; False leaves them unsmoothed
    scope:          norm_fed: only Linears that read a norm's output (the paper's choice); all: also
                    every other targeted Linear (BERT's attention.output.dense, output.dense after
                    GELU), each through a `SmoothedLinear` with a scale from its own input. Measured on
                    MiniLM W8A8 (per-tensor activations) it lowers embedding fidelity (cosine 0.99 -> 0.93
                    with per-channel weights), so norm_fed stays the default
    """

    alpha: float = 0.5
    calib_batches: int = 8
    explicit_scale: bool = True
    scope: Literal["norm_fed", "all"] = "norm_fed"

    def __post_init__(self) -> None:
        check(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.calib_batches >= 1, "calib_batches", f"must be >= 1, got {self.calib_batches}")


# ------------------------------------------------------------------------------------ the maths

def smoothing_scales(act_max: Tensor, weight_max: Tensor, alpha: float = 0.5) -> Tensor:
    """s_j = act_max_j^alpha / weight_max_j^(1 - alpha), per input channel (I,).

    A channel that never fired or whose weights are all zero gets s = 1 (there is nothing to
    balance, and a zero would divide by zero downstream).

    >>> smoothing_scales(torch.tensor([16.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0]), alpha=0.5)
    tensor([4.0000, 0.5000, 1.0000])
    """
    act, w = act_max.double(), weight_max.double()                       # (I,), (I,)
    ok = (act > 0) & (w > 0)
    s = act.clamp(min=1e-30).pow(alpha) / w.clamp(min=1e-30).pow(1 - alpha)
    return torch.where(ok, s, torch.ones_like(s)).to(act_max.dtype)


def weight_input_max(linears: Iterable[nn.Linear]) -> Tensor:
    """max over the Linears and their output rows of |W_ij|, per input channel j (I,)."""
    return torch.stack([lin.weight.detach().abs().amax(dim=0) for lin in linears]).amax(dim=0)


@torch.no_grad()
def migrate_into_norm(norm: nn.Module, linears: Iterable[nn.Linear], scales: Tensor) -> None:
    """Fold s into a norm and the Linears it alone feeds: gamma, beta /= s; W[:, j] *= s_j.

    Exact in real arithmetic: Linear(norm(x) / s) with weights W diag(s) is Linear(norm(x)).

    >>> ln, fc = nn.LayerNorm(3), nn.Linear(3, 2)
    >>> x = torch.randn(4, 3); before = fc(ln(x))
    >>> migrate_into_norm(ln, [fc], torch.tensor([2.0, 0.5, 4.0]))
    >>> torch.allclose(fc(ln(x)), before, atol=1e-6)
    True
    """
    s = scales.to(norm.weight)
    norm.weight.div_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight)[None, :])                        # (O, I) * (1, I)


@wrapper("smoothed_linear")
class SmoothedLinear(Wrapper):
    """`base(x / scale)`, where `base` is the Linear with weight `W diag(scale)`: the same function
    as the original Linear, but the activation a quantizer sees is the smoothed `x / scale`.
    Other techniques reach `base` (a later `quantize` wraps it, so its input quantizer sees `x / scale`).

    >>> fc = nn.Linear(3, 2); x = torch.randn(4, 3); y = fc(x)
    >>> sm = SmoothedLinear.smooth(fc, torch.tensor([2.0, 0.5, 4.0]))
    >>> torch.allclose(sm(x), y, atol=1e-6), torch.allclose(sm.merge()(x), y, atol=1e-6)
    (True, True)
    """

    view_as_merge = True  # structured pruning sees the merged Linear (the division is no op it maps)

    def __init__(self, base: nn.Module, scale: Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("scale", scale.detach().clone().float())  # (I,), saved with the weights

    @classmethod
    @torch.no_grad()
    def smooth(cls, linear: nn.Linear, scale: Tensor) -> "SmoothedLinear":
        """Wrap `linear` (in place: its weight columns are multiplied by `scale`)."""
        linear.weight.mul_(scale.to(linear.weight)[None, :])              # (O, I) * (1, I)
        return cls(linear, scale.to(linear.weight))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x / self.scale.to(x.dtype))                      # (..., I) / (I,)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain Linear with the scale folded back into the weight columns (a wrapped base is merged first)."""
        base = self.base.merge() if isinstance(self.base, Wrapper) else self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        out.to(base.weight)
        out.weight.copy_(base.weight / self.scale.to(base.weight)[None, :])
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out

    def describe(self, child: Any) -> dict[str, Any]:
        return {"base": child(self.base), "in_features": int(self.scale.numel())}

    @classmethod
    def rebuild(cls, desc: dict[str, Any], child: Any) -> "SmoothedLinear":
        return cls(child(desc["base"]), torch.ones(int(desc["in_features"])))

    def cut(self, cuts: dict[str, dict[int, list[int]]], attrs: dict[str, Any]) -> None:
        """The merged view's weight is `base.weight / scale`: the base follows its cuts, the scale its
        kept input columns."""
        if isinstance(self.base, Wrapper):
            self.base.cut(cuts, attrs)
        else:
            cut_plain(self.base, cuts, attrs)
        if 1 in cuts.get("weight", {}):
            keep_indices(self, "scale", 0, cuts["weight"][1])

    def extra_repr(self) -> str:
        return (f"in_features={self.scale.numel()}, scale range [{float(self.scale.min()):.3g}, "
                f"{float(self.scale.max()):.3g}]")


# ------------------------------------------------------------------------------------ who feeds whom

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)


@dataclasses.dataclass(frozen=True)
class SmoothGroup:
    """The targeted Linears that read one norm's output directly; they share one smoothing scale.

    others: what else reads that output (`op:add` for a residual, `model output`, an untargeted
            Linear); empty means the scale can be folded into the norm.
    """

    norm: str
    linears: tuple[str, ...]
    others: tuple[str, ...] = ()

    @property
    def exclusive(self) -> bool:
        return not self.others


@torch.no_grad()
def find_smooth_groups(model: nn.Module, inputs: Any, targets: Iterable[str],
                       device: torch.device | None = None) -> tuple[list[SmoothGroup], dict[str, str]]:
    """Trace the model once on `inputs` and find, for each LayerNorm/RMSNorm, the Linears that read its output.

    targets: names of the nn.Linear modules that may be smoothed. Returns the groups (norms feeding at
    least one targeted Linear) and, for every targeted Linear left out, the reason. Read-only.
    Who reads what comes from the dependency graph's data flow (`graph.DataFlow`): no-op aliases of
    a norm's output (eval dropout, a view that keeps the shape) still count as that output; a model
    that `torch.export` cannot trace raises `UnsupportedOpError` (see `bn_fold.flow_of`).

    >>> class Block(nn.Module):   # pre-LN: ln feeds only q and k; the residual bypasses it
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.ln, self.q, self.k, self.out = nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         h = self.ln(x)
    ...         return x + self.out(self.q(h) * self.k(h))
    >>> groups, left = find_smooth_groups(Block(), torch.randn(2, 4), ["q", "k", "out"])
    >>> groups, left
    ([SmoothGroup(norm='ln', linears=('k', 'q'), others=())], {'out': 'its input does not come straight from a norm'})
    """
    targets = set(targets)
    flow, merged = flow_of(model, move(batch_inputs(inputs), device), "smoothquant")
    norms = {n for n, m in model.named_modules()
             if isinstance(m, NORM_TYPES) and m.weight is not None and flow.calls.get(n)}
    readers = {n: {u.label for u in flow.consumers(n)} for n in norms}
    # Linear -> the norms (or None: something else) its input came from, one per call
    linear_inputs = {n: {src if src in norms else None for src in flow.sources(n)}
                     for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    groups, reasons = [], {}
    for norm, labels in sorted(readers.items()):
        mine = sorted(r for r in labels if r in targets - merged and linear_inputs.get(r) == {norm})
        if mine:
            groups.append(SmoothGroup(norm, tuple(mine), tuple(sorted(labels - set(mine)))))
    grouped = {n for g in groups for n in g.linears}
    for name in sorted(targets - grouped):
        srcs = linear_inputs.get(name)
        reasons[name] = ("wrapped by another technique (traced as its plain merge)" if name in merged else
                         "not called in the forward pass" if not srcs else
                         f"called on the outputs of several modules ({sorted(map(str, srcs))})" if len(srcs) > 1 else
                         _NOT_NORM_FED)
    return groups, reasons


_NOT_NORM_FED = "its input does not come straight from a norm"


# ------------------------------------------------------------------------------------ calibration

@torch.no_grad()
def activation_maxima(model: nn.Module, loader: Iterable, names: Iterable[str], batches: int,
                      device: torch.device | None = None) -> dict[str, Tensor]:
    """max |x_j| (I,) over `batches` calibration batches of the input of each named module (padding
    tokens left out)."""
    found = calibrate(model, loader, {n: ("absmax",) for n in names}, batches=batches, device=device)
    return {n: st.absmax for n, st in found.items() if st.absmax is not None}


# ------------------------------------------------------------------------------------ the transform

@layer_transform("smoothquant", config=SmoothQuantConfig, layers=(nn.Linear,), on_wrapped="refuse")
def _smoothquant(model: nn.Module, config: SmoothQuantConfig, ctx: Context, sites: list[Site]) -> nn.Module:
    """Smooth the inputs of LayerNorm-fed Linears (SmoothQuant); the float model's outputs are unchanged."""
    def scales(model: nn.Module, groups: list[SmoothGroup]) -> dict[str, Tensor]:
        maxima = activation_maxima(model, ctx.data.calib, [g.linears[0] for g in groups], config.calib_batches,
                                   ctx.device)
        return {g.linears[0]: smoothing_scales(maxima[g.linears[0]].to(model.get_submodule(g.linears[0]).weight),
                                               weight_input_max([model.get_submodule(n) for n in g.linears]),
                                               config.alpha)
                for g in groups if g.linears[0] in maxima}

    return smooth_groups(model, config, ctx, sites, "smoothquant", scales)


def smooth_groups(model: nn.Module, config: Any, ctx: Context, sites: list[Site], stage: str,
                  scales: Callable[[nn.Module, list[SmoothGroup]], dict[str, Tensor]]) -> nn.Module:
    """The shared body of input-scale techniques (SmoothQuant, AWQ): find the norm-fed groups (and, with
    `config.scope == "all"`, every other targeted Linear alone), ask `scales(model, groups)` for one scale
    per group (keyed by its first Linear), fold it into the norm or wrap the Linears in `SmoothedLinear`,
    and record what was done. `config` has calib_batches, explicit_scale and scope."""
    if ctx.data is None:
        raise ConfigError(stage, "needs calibration data for the activation statistics; "
                          "run it in a recipe or pass Context(data=...)")
    smoothed = [s.name for s in sites if isinstance(get_module(model, s.name.rpartition(".")[0]), SmoothedLinear)]
    if smoothed:
        raise CompositionError(f"{stage}: layer {smoothed[0]!r} is already smoothed; run smoothquant or awq once, "
                               "or add a `merge` stage before it")
    model.eval().to(ctx.device)
    example = batch_inputs(next(iter(ctx.data.calib)))
    by_name = {s.name: s for s in sites}
    linears = set(by_name)
    if not any(isinstance(m, NORM_TYPES) for m in model.modules()) and config.scope != "all":
        raise TargetError(f"{stage}: the model has no {' / '.join(t.__name__ for t in NORM_TYPES)}; "
                          f"the scales migrate out of the norm that feeds the Linears (or set scope: all)")
    groups, unsmoothed = find_smooth_groups(model, example, linears, ctx.device)
    if config.scope == "all" and config.explicit_scale:
        alone = [n for n, why in unsmoothed.items() if why == _NOT_NORM_FED]
        groups += [SmoothGroup("", (n,), ("not fed by a norm",)) for n in alone]
        unsmoothed = {n: why for n, why in unsmoothed.items() if n not in alone}
    kept = []
    for g in groups:
        if not g.exclusive and not config.explicit_scale:
            unsmoothed.update({n: f"{g.norm} also feeds {', '.join(g.others)}, and explicit_scale is off"
                               for n in g.linears})
        else:
            kept.append(g)
    found = scales(model, kept)
    record: list[dict[str, Any]] = []
    for g in kept:
        if g.linears[0] not in found:
            raise DataError(f"{stage}: {g.linears[0]!r} saw no calibration input; it is not on the forward "
                            f"path of the calibration data, exclude it with targets.exclude: [{g.linears[0]!r}]")
        layers = [model.get_submodule(n) for n in g.linears]
        s = found[g.linears[0]].to(layers[0].weight)
        if g.exclusive:
            migrate_into_norm(model.get_submodule(g.norm), layers, s)
        else:
            for name, layer in zip(g.linears, layers):
                by_name[name].replace(SmoothedLinear.smooth(layer, s))
        record.append({"norm": g.norm or None, "linears": list(g.linears),
                       "mode": "folded" if g.exclusive else "explicit",
                       "scale_range": [round(float(s.min()), 6), round(float(s.max()), 6)]})
    ctx.record.update({"groups": record, "unsmoothed": dict(sorted(unsmoothed.items()))})
    n_smoothed = sum(len(g["linears"]) for g in record)
    ctx.log(f"{stage}: {n_smoothed} Linears smoothed in {len(record)} groups, {len(unsmoothed)} left alone")
    return model
