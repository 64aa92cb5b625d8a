"""AWQ (Lin et al. 2024): activation-aware scales that protect the weights low-bit rounding hurts most.

A Linear computes `x W^T = (x / s)(W diag(s))^T` for any positive per-input-channel s. Scaling a
column up before round-to-nearest shrinks its relative rounding error, and the channels whose inputs
are large carry the most output error, so AWQ searches

    s = rms(x)^alpha (normalised to geometric mean 1),  alpha on a grid in [0, 1)

for the alpha whose quantized weights reproduce the layer's outputs best on calibration data:

    err(alpha) = sum over the group's Linears of tr(dW H dW^T),  dW = Q(W diag(s)) diag(s)^-1 - W

with H = X^T X the inputs' Gram (so the search never re-runs the model) and Q the weight format the
later `quantize` / `gptq` stage uses (`weight`). alpha = 0 is plain RTN, so on the calibration objective
AWQ is never worse. Where s goes is SmoothQuant's business (`smoothquant.smooth_groups`): folded into a
norm that feeds only these Linears, else a `SmoothedLinear` (x / s then the scaled Linear); Linears not
fed by a norm are scaled alone (scope all, the default here). The float model is unchanged; run
`quantize` or `gptq` with the same `weight` spec after it:

    model = nncompress.apply(model, AWQConfig(weight=w4), context=ctx)
    model = nncompress.apply(model, QuantizeConfig(weight=w4), context=ctx)
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from ..core import Config, ConfigError, Context, Site, check, layer_transform
from ..core.calibration import calibrate
from ..formats import IntFormat
from ..formats.granularity import PerChannel, PerGroup, PerTensor
from .fake_quant import QuantSpec
from .gptq import _fit
from .smoothquant import SmoothGroup, smooth_groups

__all__ = ["AWQConfig", "awq_scales", "round_to_nearest"]


@dataclasses.dataclass(frozen=True)
class AWQConfig(Config):
    """Activation-aware weight scaling before weight-only low-bit quantization (run `quantize` / `gptq` after).

    weight:        the weight format the scales are searched for (the one the next stage applies)
    grid:          alphas tried, evenly spaced in [0, 1)
    calib_batches: batches whose input Gram and per-channel RMS set the search
    explicit_scale, scope: as in smoothquant (scope all: Linears not fed by a norm get their own scale)
    """

    weight: QuantSpec = QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=128))
    grid: int = 20
    calib_batches: int = 8
    explicit_scale: bool = True
    scope: Literal["norm_fed", "all"] = "all"

    def __post_init__(self) -> None:
        w = self.weight
        check(isinstance(w.format, IntFormat), "weight.format", "awq searches scales for an integer grid; use {kind: int}")
        g = w.granularity
        check(g is None or isinstance(g, (PerTensor, PerChannel)) or (isinstance(g, PerGroup) and g.axis in (1, -1)),
              "weight.granularity", "awq takes per_tensor, per_channel or per_group along the fan-in (axis 1)")
        check(self.grid >= 1, "grid", f"must be >= 1, got {self.grid}")
        check(self.calib_batches >= 1, "calib_batches", f"must be >= 1, got {self.calib_batches}")
        check(self.scope in ("norm_fed", "all"), "scope", f"must be norm_fed or all, got {self.scope!r}")


def round_to_nearest(w: Tensor, spec: QuantSpec) -> Tensor:
    """`w` (O, I) fake-quantized by round to nearest in the spec's format and granularity (per tensor,
    per output channel, or per group of `size` inputs; a ragged last group is padded with copies of its last
    column, which leave its range as it is), scales from its observer."""
    g = spec.granularity
    if isinstance(g, PerGroup):  # a fan-in that is no multiple of the size: the last group is ragged
        pad = -w.shape[1] % g.size
        padded = torch.cat([w, w[:, -1:].expand(-1, pad)], 1) if pad else w   # repeats: the range is unchanged
        rows = padded.reshape(-1, g.size)
    elif g is None or isinstance(g, PerChannel):
        rows = w
    elif isinstance(g, PerTensor):
        rows = w.reshape(1, -1)
    else:
        raise ConfigError("weight", f"awq: granularity {type(g).__name__} is not supported; per tensor, "
                          "per channel or per group")
    scale, zp = _fit(rows, spec)
    fmt = spec.format
    q = ((torch.round(rows / scale) + zp).clamp(fmt.qmin, fmt.qmax) - zp) * scale
    return q.reshape(w.shape[0], -1)[:, :w.shape[1]] if isinstance(g, PerGroup) else q.reshape(w.shape)


def awq_scales(weights: list[Tensor], gram: Tensor, rms: Tensor, spec: QuantSpec, grid: int = 20
               ) -> tuple[Tensor, float, dict[str, float]]:
    """The best s over the grid for Linears sharing one input: `(s (I,), alpha, {"rtn": err, "awq": err})`
    with err the output squared error summed over the calibration rows."""
    h = gram.float()
    base = rms.float().clamp_min(1e-8)

    def error(s: Tensor) -> float:
        total = 0.0
        for w in weights:
            dw = round_to_nearest(w.float() * s, spec) / s - w.float()
            total += float(((dw @ h) * dw).sum())
        return total

    best = (torch.ones_like(base), 0.0, error(torch.ones_like(base)))
    rtn = best[2]
    for k in range(1, grid):
        alpha = k / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        e = error(s)
        if e < best[2]:
            best = (s, alpha, e)
    return best[0], best[1], {"rtn": rtn, "awq": best[2]}


@layer_transform("awq", config=AWQConfig, layers=(nn.Linear,), on_wrapped="refuse")
def _awq(model: nn.Module, config: AWQConfig, ctx: Context, sites: list[Site]) -> nn.Module:
    """Search activation-aware input scales for the targeted Linears; the float model is unchanged."""
    searched: dict[str, dict[str, float]] = {}

    def scales(model: nn.Module, groups: list[SmoothGroup]) -> dict[str, Tensor]:
        found = calibrate(model, ctx.data.calib, {g.linears[0]: ("gram", "sqnorm") for g in groups},
                          batches=config.calib_batches, device=ctx.device)
        out = {}
        for g in groups:
            st = found.get(g.linears[0])
            if st is None or st.count == 0:
                continue
            weights = [model.get_submodule(n).weight.detach() for n in g.linears]
            s, alpha, err = awq_scales(weights, st.gram(), (st.sq / st.count).sqrt(), config.weight, config.grid)
            out[g.linears[0]] = s
            searched[g.linears[0]] = {"alpha": alpha, "error_rtn": float(f"{err['rtn']:.4g}"),
                                      "error_awq": float(f"{err['awq']:.4g}")}
        return out

    model = smooth_groups(model, config, ctx, sites, "awq", scales)
    for g in ctx.record.get("groups", []):
        g.update(searched.get(g["linears"][0], {}))
    return model
