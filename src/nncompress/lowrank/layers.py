"""Low-rank layers: the factors of a Linear or a convolution, run in sequence.

A factorized layer replaces the dense weight by its factors, so unlike the other wrappers it keeps
no `.base`: `merge()` reconstructs the dense layer (the product of the factors), which equals the
original layer exactly at full rank and is its best low-rank approximation otherwise. Both are
containers (`core.surgery`): later techniques work on the factors, and their sizes are read off
the factors' weights, so a pruned rank stays consistent.

>>> _ = torch.manual_seed(0)
>>> dense = nn.Linear(8, 6)
>>> low = LowRankLinear.from_linear(dense, rank=6)  # full rank: same outputs
>>> x = torch.randn(3, 8)
>>> bool(torch.allclose(low(x), dense(x), atol=1e-5)), type(low.merge()).__name__
(True, 'Linear')
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from torch import Tensor

from ..core import Wrapper, wrapper

from .svd import spatial_kernel, spatial_svd, truncated_svd, tucker2, tucker2_kernel, whitened_svd

__all__ = ["CONV_TYPES", "ConvMethod", "LowRankConv", "LowRankLinear", "full_ranks", "weight_params",
           "weight_shape"]

ConvMethod = Literal["svd", "spatial", "tucker2"]
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_shape(m: nn.Module) -> torch.Size:
    """The weight shape of a plain layer, or of the layer a wrapper stands for (a quantized factor)."""
    for attr in ("weight", "weight_q"):
        t = getattr(m, attr, None)
        if isinstance(t, Tensor):
            return t.shape
    base = getattr(m, "base", None)
    return weight_shape(base) if isinstance(base, nn.Module) else m.merge().weight.shape


def _plain(m: nn.Module) -> nn.Module:
    return m.merge() if isinstance(m, Wrapper) else m


@wrapper("lowrank_linear")
class LowRankLinear(Wrapper, nn.Sequential):
    """`second(first(x))`: Linear(I -> r, no bias) then Linear(r -> O, with the original bias).

    A container: other techniques reach the two factors (quantize them, prune the rank between them).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        kw = {"device": device, "dtype": dtype}
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False, **kw)  # weight (r, I)
        self.second = nn.Linear(rank, out_features, bias=bias, **kw)  # weight (O, r)

    @property
    def in_features(self) -> int:
        return weight_shape(self.first)[1]

    @property
    def out_features(self) -> int:
        return weight_shape(self.second)[0]

    @property
    def rank(self) -> int:
        return weight_shape(self.first)[0]

    @classmethod
    def like(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """An unfilled low-rank layer with `linear`'s shapes, device and dtype (weights come later)."""
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, linear.bias is not None, w.device, w.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, chol: Tensor | None = None) -> LowRankLinear:
        """The truncated SVD of `linear` at `rank`; with `chol` (see `svd.whitening`) the data-aware one."""
        layer = cls.like(linear, rank)
        w = linear.weight
        if chol is None:
            a, b = truncated_svd(w, rank)  # (O, r), (r, I)
        else:
            a, b = whitened_svd(w, chol.to(w.device), rank)
        with torch.no_grad():
            layer.first.weight.copy_(b)
            layer.second.weight.copy_(a)
            if linear.bias is not None:
                layer.second.bias.copy_(linear.bias)
        return layer

    def merge(self) -> nn.Linear:
        """A plain nn.Linear with weight `second.weight @ first.weight` (the reconstructed dense layer)."""
        first, second = _plain(self.first), _plain(self.second)
        w = second.weight
        out = nn.Linear(first.in_features, second.out_features, bias=second.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w @ first.weight)  # (O, r) @ (r, I)
            if second.bias is not None:
                out.bias.copy_(second.bias)
        return out

    def describe(self, child: Any) -> dict[str, Any]:
        return {"first": child(self.first), "second": child(self.second)}

    @classmethod
    def rebuild(cls, desc: dict[str, Any], child: Any) -> LowRankLinear:
        layer = cls(1, 1, 1)
        layer.first, layer.second = child(desc["first"]), child(desc["second"])
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _conv(conv: nn.Module, in_ch: int, out_ch: int, kernel, *, bias: bool = False, stride=1, padding=0,
          dilation=1, padding_mode: str = "zeros") -> nn.Module:
    w = conv.weight
    return type(conv)(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias,
                      padding_mode=padding_mode, device=w.device, dtype=w.dtype)


def full_ranks(conv: nn.Module, method: ConvMethod) -> tuple[int, ...]:
    """The ranks at which `method` reproduces `conv` exactly (larger ranks are never needed)."""
    o, c, *k = conv.weight.shape
    if method == "svd":
        return (min(o, c * _prod(k)),)
    if method == "spatial":
        return (min(c * k[0], o * k[1]),)
    return (o, c)


def weight_params(conv: nn.Module, method: ConvMethod, ranks: tuple[int, ...]) -> int:
    """Weights (biases excluded) of the factorization of `conv` with `method` at `ranks`."""
    o, c, *k = conv.weight.shape
    if method == "svd":
        return ranks[0] * (c * _prod(k) + o)
    if method == "spatial":
        return ranks[0] * (c * k[0] + o * k[1])
    r_out, r_in = ranks
    return r_in * c + r_out * r_in * _prod(k) + o * r_out


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


@wrapper("lowrank_conv")
class LowRankConv(Wrapper, nn.Sequential):
    """A convolution as a chain of smaller ones; `method` says which chain.

    svd:     kxk conv C -> r (the original stride, padding, dilation), then 1x1 conv r -> O
    spatial: (Conv2d only) (kh x 1) conv C -> r, then (1 x kw) conv r -> O; stride/padding split by axis
    tucker2: 1x1 conv C -> r_in, kxk core r_in -> r_out (the original stride, padding...), 1x1 r_out -> O
    The original bias goes on the last conv. Grouped convolutions are not supported.
    """

    def __init__(self, conv: nn.Module, method: ConvMethod, ranks: tuple[int, ...]):
        super().__init__()
        if not isinstance(conv, CONV_TYPES) or conv.groups != 1:
            raise ValueError("LowRankConv: needs an ungrouped Conv1d/2d/3d")
        if method == "spatial" and not isinstance(conv, nn.Conv2d):
            raise ValueError("LowRankConv: spatial SVD needs a Conv2d (kh x kw kernel)")
        self.method = method
        ranks = tuple(int(r) for r in ranks)
        o, c, *k = conv.weight.shape
        bias, mode = conv.bias is not None, conv.padding_mode
        geometry = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation,
                    "padding_mode": mode}
        ones = (1,) * len(k)
        if method == "svd":
            (r,) = ranks
            self.first = _conv(conv, c, r, tuple(k), **geometry)
            self.second = _conv(conv, r, o, ones, bias=bias)
        elif method == "spatial":
            (r,) = ranks
            pad = conv.padding
            pv, ph = (pad, pad) if isinstance(pad, str) else ((pad[0], 0), (0, pad[1]))
            self.vertical = _conv(conv, c, r, (k[0], 1), stride=(conv.stride[0], 1), padding=pv,
                                  dilation=(conv.dilation[0], 1), padding_mode=mode)
            self.horizontal = _conv(conv, r, o, (1, k[1]), bias=bias, stride=(1, conv.stride[1]), padding=ph,
                                    dilation=(1, conv.dilation[1]), padding_mode=mode)
        elif method == "tucker2":
            r_out, r_in = ranks
            self.first = _conv(conv, c, r_in, ones)
            self.core = _conv(conv, r_in, r_out, tuple(k), **geometry)
            self.last = _conv(conv, r_out, o, ones, bias=bias)
        else:
            raise ValueError(f"LowRankConv: unknown method {method!r}")
        self._dense = {"type": type(conv).__name__, "kernel_size": list(k), **_plain_geometry(geometry)}

    @property
    def ranks(self) -> tuple[int, ...]:
        """The factorization's ranks, read off the factors (structured pruning may have narrowed them)."""
        if self.method == "svd":
            return (weight_shape(self.first)[0],)
        if self.method == "spatial":
            return (weight_shape(self.vertical)[0],)
        core = weight_shape(self.core)
        return (core[0], core[1])

    @classmethod
    def factorize(cls, conv: nn.Module, method: ConvMethod, ranks: tuple[int, ...], iters: int = 0) -> LowRankConv:
        """The factorization of `conv` by `method` at `ranks` (`iters`: HOOI sweeps for tucker2)."""
        layer = cls(conv, method, ranks)
        w = conv.weight.detach()  # (O, C, *k)
        with torch.no_grad():
            if method == "svd":
                a, b = truncated_svd(w.reshape(w.shape[0], -1), ranks[0])  # (O, r), (r, C*K)
                layer.first.weight.copy_(b.reshape(layer.first.weight.shape))
                layer.second.weight.copy_(a.reshape(layer.second.weight.shape))
            elif method == "spatial":
                v, h = spatial_svd(w, ranks[0])
                layer.vertical.weight.copy_(v)
                layer.horizontal.weight.copy_(h)
            else:
                first, core, last = tucker2(w, ranks[0], ranks[1], iters)
                layer.first.weight.copy_(first.reshape(layer.first.weight.shape))
                layer.core.weight.copy_(core)
                layer.last.weight.copy_(last.reshape(layer.last.weight.shape))
            if conv.bias is not None:
                layer[-1].bias.copy_(conv.bias)
        return layer

    def dense_kernel(self) -> Tensor:
        """The (O, C, *k) kernel of the chain."""
        f = {n: _plain(m).weight for n, m in self.named_children()}
        if self.method == "svd":
            a = f["second"].flatten(1)  # (O, r)
            return torch.tensordot(a, f["first"], dims=([1], [0]))  # (O, r) x (r, C, *k) -> (O, C, *k)
        if self.method == "spatial":
            return spatial_kernel(f["vertical"], f["horizontal"])
        return tucker2_kernel(f["first"].flatten(1), f["core"], f["last"].flatten(1))

    def merge(self) -> nn.Module:
        """A plain conv with the chain's kernel (the reconstructed dense layer) and the same geometry."""
        d = self._dense
        last = _plain(self[-1])
        kernel = self.dense_kernel()
        w = last.weight
        out = getattr(nn, d["type"])(kernel.shape[1], kernel.shape[0], tuple(d["kernel_size"]),
                                     **_tuple_geometry(d), bias=last.bias is not None, device=w.device,
                                     dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(kernel)
            if out.bias is not None:
                out.bias.copy_(last.bias)
        return out

    def describe(self, child: Any) -> dict[str, Any]:
        return {"method": self.method, "dense": self._dense,
                "factors": {n: child(m) for n, m in self.named_children()}}

    @classmethod
    def rebuild(cls, desc: dict[str, Any], child: Any) -> LowRankConv:
        layer = cls.__new__(cls)
        nn.Sequential.__init__(layer)
        layer.method, layer._dense = desc["method"], dict(desc["dense"])
        if layer.method not in ("svd", "spatial", "tucker2"):
            raise ValueError(f"unknown low-rank method {layer.method!r}")
        for name, d in desc["factors"].items():
            layer.add_module(name, child(d))
        return layer

    def extra_repr(self) -> str:
        return f"method={self.method!r}, ranks={self.ranks}"


def _plain_geometry(geometry: dict[str, Any]) -> dict[str, Any]:
    """JSON-able stride / padding / dilation (tuples as lists; a padding string stays a string)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in geometry.items()}


def _tuple_geometry(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(d[k]) if isinstance(d[k], list) else d[k] for k in ("stride", "padding", "dilation", "padding_mode")}
