"""Eager edits that prepare a model for quantization without changing what it computes:
BatchNorm folding and cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019).

    pairs = fold_batchnorm(model.eval())          # [("stem.0", "stem.1"), ...]; BNs become Identity
    pairs = equalize(model)                       # [("net.0", "net.2"), ...]; same outputs, even ranges

Which layer feeds which is read off the dependency graph's data flow (`graph.DataFlow`: one
`torch.export` trace, functional ReLUs included). Without example inputs, `model.input_shape` or the
first layer's input size stands in (`graph.guess_inputs`); a model that cannot be traced raises
`UnsupportedOpError` naming the fix.

Limits: a producer is edited only when its output feeds nothing but the BN (or the activation), and
each module is called once. Transposed convs, grouped convs (for equalization), BNs without running
statistics and activations that are not positively homogeneous (ReLU6, GELU) are left alone.
Folding is an inference-time edit: it is exact in eval mode only.

>>> m = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3)).eval()
>>> fold_batchnorm(m)
[('0', '1')]
>>> type(m[1]).__name__
'Identity'
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..core import Edits, Wrapper, plain_view
from ..core.errors import UnsupportedOpError
from ..graph import DataFlow

__all__ = ["fold_batchnorm", "fold_bn_weights", "find_conv_bn_pairs", "equalize", "equalization_scales",
           "find_equalization_pairs"]

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU)
_FUNCTIONAL = ("op:relu", "op:leaky_relu")  # F.relu, torch.relu, x.relu(), F.leaky_relu (in place too)


# ------------------------------------------------------------------------------------ data flow

def flow_of(model: nn.Module, example_inputs: Any, what: str, fix: str = "") -> tuple[DataFlow, set[str]]:
    """The model's data flow (one trace), and the names of the wrappers it saw as their plain merge.

    Export runs on fake tensors, which some value wrappers cannot take (int8 kernels); then the model
    is traced once more under `plain_view` and those wrappers read as the plain layers they stand for.
    A model that still cannot be traced raises `UnsupportedOpError` naming `what` and the fixes.
    """
    try:
        return DataFlow(model, example_inputs), set()
    except UnsupportedOpError as e:
        error = e
    if any(isinstance(m, Wrapper) for m in model.modules()):
        with plain_view(model) as view:
            try:
                return DataFlow(model, example_inputs), set(view.swapped)
            except UnsupportedOpError:
                pass
    raise UnsupportedOpError(f"{what}: cannot tell which layer feeds which: {error}{'; or ' + fix if fix else ''}"
                             ) from None


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


# ------------------------------------------------------------------------------------ BN folding

def find_conv_bn_pairs(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
    """(layer, bn) names where the Linear/Conv output feeds only that BatchNorm (both called once)."""
    modules = dict(model.named_modules())
    if not any(_has_stats(m) for m in modules.values()):
        return []  # nothing to fold: no trace needed
    flow, merged = flow_of(model, example_inputs, "fold_bn", "set fold_bn=False")
    pairs = []
    for name in flow.calls:
        layer = modules.get(name)
        if not isinstance(layer, _FOLDABLE) or name in merged:
            continue
        use = flow.sole_consumer(name)
        bn = modules.get(use.module) if use is not None and use.module is not None else None
        if _has_stats(bn) and bn.num_features == _out_channels(layer) and flow.calls.get(use.module) == 1:
            pairs.append((name, use.module))
    return pairs


def _has_stats(m: nn.Module | None) -> bool:
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None)


def fold_bn_weights(w: Tensor, b: Tensor | None, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """(w', b') with layer'(x) == bn(layer(x)) in eval mode; computed in float64.

    w' = w * gamma / sqrt(var + eps) per output channel; b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    """
    var, mean = bn.running_var.double(), bn.running_mean.double()
    k = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        k = k * bn.weight.detach().double()
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    b0 = b.detach().double() if b is not None else torch.zeros_like(mean)
    w_new = w.detach().double() * k.view(-1, *([1] * (w.ndim - 1)))   # (O, ...) scaled per output channel
    return w_new.to(w.dtype), ((b0 - mean) * k + beta).to(w.dtype)


def fold_batchnorm(model: nn.Module, example_inputs: Any = None, pairs: list[tuple[str, str]] | None = None,
                   edits: Edits | None = None) -> list[tuple[str, str]]:
    """Fold each BatchNorm into the Linear/Conv before it, in place; the BN becomes `nn.Identity`.

    `pairs` skips the search. `edits` (a transform's `ctx.edits`) records the structural changes
    (the BN swapped out, a bias added) for replay. Returns the pairs folded.
    """
    edits = edits or Edits()
    pairs = find_conv_bn_pairs(model, example_inputs) if pairs is None else [tuple(p) for p in pairs]
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        w, b = fold_bn_weights(layer.weight, layer.bias, bn)
        with torch.no_grad():
            layer.weight.copy_(w)
            if layer.bias is None:
                edits.touch(model, layer_name)  # a new bias is structure
                layer.bias = nn.Parameter(b)
            else:
                layer.bias.copy_(b)
        edits.swap(model, bn_name, nn.Identity())
    return [tuple(p) for p in pairs]


# ------------------------------------------------------------------------------------ equalization

def find_equalization_pairs(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
    """(layer1, layer2) where layer1 feeds only a ReLU/LeakyReLU (module or functional) that feeds only layer2."""
    modules = dict(model.named_modules())
    if sum(_equalizable(m) for m in modules.values()) < 2:
        return []  # no chain possible: no trace needed
    flow, merged = flow_of(model, example_inputs, "equalize", "set equalize=False")
    pairs = []
    for name in flow.calls:
        m1 = modules.get(name)
        act = flow.sole_consumer(name) if _equalizable(m1) and name not in merged else None
        if act is None or not (act.label in _FUNCTIONAL or isinstance(modules.get(act.module), _HOMOGENEOUS)):
            continue
        second = flow.sole_consumer(act if act.module is None else act.module)
        m2 = modules.get(second.module) if second is not None and second.module is not None else None
        if (_equalizable(m2) and second.module not in merged and flow.calls.get(second.module) == 1
                and (m2.in_features if isinstance(m2, nn.Linear) else m2.in_channels) == _out_channels(m1)):
            pairs.append((name, second.module))
    return pairs


def _equalizable(m: nn.Module | None) -> bool:
    return type(m) in _FOLDABLE and getattr(m, "groups", 1) == 1


def equalization_scales(w1: Tensor, w2: Tensor) -> Tensor:
    """DFQ's s_i = sqrt(r1_i / r2_i): r1 the range of output channel i of w1 (O1, ...), r2 that of
    input channel i of w2 (O2, O1, ...). Dividing w1's channel by s and multiplying w2's by s leaves
    both with range sqrt(r1 * r2). Channels with a zero range keep s = 1.

    >>> equalization_scales(torch.tensor([[4.0], [1.0]]), torch.tensor([[1.0, 4.0]])).tolist()
    [2.0, 0.5]
    """
    r1 = w1.detach().flatten(1).abs().amax(1).double()                       # (C,)
    r2 = w2.detach().transpose(0, 1).flatten(1).abs().amax(1).double()       # (C,)
    ok = (r1 > 0) & (r2 > 0)
    return torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, 1.0)), 1.0)


def equalize(model: nn.Module, example_inputs: Any = None, pairs: list[tuple[str, str]] | None = None,
             iterations: int = 8) -> list[tuple[str, str]]:
    """Cross-layer equalization of each (layer1, ReLU, layer2) chain, in place; the function the
    model computes is unchanged (ReLU(x / s) = ReLU(x) / s for s > 0). Chains of several pairs are
    swept `iterations` times, as DFQ iterates to convergence. Returns the pairs."""
    pairs = find_equalization_pairs(model, example_inputs) if pairs is None else [tuple(p) for p in pairs]
    for _ in range(iterations):
        for a, b in pairs:
            m1, m2 = model.get_submodule(a), model.get_submodule(b)
            s = equalization_scales(m1.weight, m2.weight)                    # (C,)
            with torch.no_grad():
                m1.weight.copy_((m1.weight.double() / s.view(-1, *([1] * (m1.weight.ndim - 1)))).to(m1.weight.dtype))
                if m1.bias is not None:
                    m1.bias.copy_((m1.bias.double() / s).to(m1.bias.dtype))
                shape = (1, -1, *([1] * (m2.weight.ndim - 2)))
                m2.weight.copy_((m2.weight.double() * s.view(shape)).to(m2.weight.dtype))
    return [tuple(p) for p in pairs]
