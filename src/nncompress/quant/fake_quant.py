"""Fake quantization: the quantizer state (`FakeQuant`) and the layer wrappers; the spec is in `spec.py`,
the pure functions and straight-through estimators in `functional.py`.

    spec = QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=64), observer="mse")
    layer = QuantLinear(nn.Linear(128, 10), weight=spec)       # keeps the original as layer.base
    plain = layer.merge()                                      # nn.Linear with the dequantized weights

In YAML a spec is `{format: {kind: int, bits: 4}, granularity: {kind: per_group, size: 64}, observer: mse}`.

Pure functions carry the maths (`qparams`, `quantize_values`, `quantize_ste`, `lsq_quantize`,
`pact_quantize`, `dorefa_weight`); `FakeQuant` only holds state (observer state, scale, zero point,
a learned LSQ step or PACT alpha). Weights are quantized in the 2-D view (out, in * kernel): per
channel is per output channel, per group runs along the flattened fan-in.

>>> layer = QuantLinear(nn.Linear(4, 2), weight=QuantSpec(format=IntFormat(bits=4)))
>>> w = layer.quantized_weight()                                    # (2, 4) on 15 levels per row
>>> codes = w / layer.weight_quant.scale                            # scale: (2, 1), one per row
>>> bool(torch.allclose(codes, codes.round(), atol=1e-4)), -8 <= codes.min().item(), codes.max().item() <= 7
(True, True, True)
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core import NNCompressError, Wrapper, distributed, lookup, wrapper
from ..core.surgery import cut_plain, keep_indices
from ..formats import IntFormat, PerChannel, PerTensor, expand_scale  # noqa: F401  (IntFormat: the doctest)
from . import observers as _observers  # noqa: F401  (registers the observers a spec names)
# the spec and the pure functions live in their own modules; re-exported here for `from .fake_quant import ...`
from .functional import (EPS, GradScale, STEQuantize, dorefa_weight, lsq_quantize, pact_quantize,  # noqa: F401
                         qparams, quantize_ste, quantize_values, uses_scale)
from .spec import QuantSpec, format_from_dict, format_to_dict, granularity_from_dict  # noqa: F401

# ------------------------------------------------------------------------------------- state holder

class FakeQuant(nn.Module):
    """One quantizer's state. Pure functions above do the work; this module remembers:

    scale, zero_point (buffers) for rtn, step (LSQ) or alpha (PACT) parameters, the observer's
    running state (not saved). `observing` (set by `calibrating`) feeds inputs to the observer and
    passes them through unquantized; `track` keeps observing activations while training (QAT rtn).
    """

    def __init__(self, spec: QuantSpec, role: Literal["weight", "activation"] = "weight"):
        super().__init__()
        self.spec = spec.resolved(role)
        self.role = role
        self.observing = False
        self.track = False
        self._state: dict[str, Tensor] | None = None
        self._pending = False
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_parameter("step", None)
        self.register_parameter("alpha", None)

    @property
    def fmt(self) -> Any:
        return self.spec.format

    @property
    def granularity(self) -> Any:
        return self.spec.granularity

    @property
    def needs_range(self) -> bool:
        return uses_scale(self.fmt) and self.spec.method != "dorefa"

    @property
    def ready(self) -> bool:
        return not self.needs_range or self._pending or any(t is not None for t in (self.scale, self.step, self.alpha))

    def reset(self) -> None:
        """Forget what the observer has seen."""
        self._state = None
        self._pending = False

    def observe(self, x: Tensor) -> None:
        """Feed `x` to the observer; `finish` turns what it saw into the range."""
        if not self.needs_range:
            return
        fn = lookup(self.spec.observer, "observer")
        with torch.no_grad():
            self._state = fn(x.detach(), self.granularity, self.fmt, self._state, **self.spec.observer_args)
        self._pending = True

    def finish(self) -> None:
        """Set scale / zero point (rtn), or (re-)initialise the LSQ step or PACT alpha, from the observer."""
        if not self._pending:
            return
        fn = lookup(self.spec.observer, "observer")
        with torch.no_grad():
            self._state = fn(None, self.granularity, self.fmt, self._state, **self.spec.observer_args)
            self.set_range(self._state["lo"], self._state["hi"])
        self._pending = False

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        scale, zp = qparams(lo, hi, self.fmt)
        device = self.scale.device if self.scale is not None else lo.device
        if self.spec.method == "lsq":
            self._set_param("step", scale)
        elif self.spec.method == "pact":
            self._set_param("alpha", hi.clamp_min(EPS))
        else:
            self.set_qparams(scale.to(device), zp.to(device))

    def set_qparams(self, scale: Tensor, zero_point: Tensor | None) -> None:
        """Fix scale and zero point; a grid whose zero point is always 0 (symmetric) keeps none, so
        checkpoints store no zero points for it."""
        self.scale = scale
        self.zero_point = None if zero_point is None or not self.has_zero_point else zero_point.to(torch.int32)

    @property
    def has_zero_point(self) -> bool:
        """Only asymmetric integer grids have a zero point that can be nonzero."""
        return isinstance(self.fmt, IntFormat) and not self.fmt.symmetric

    def _set_param(self, name: str, value: Tensor) -> None:
        p = getattr(self, name)
        if p is None or p.shape != value.shape:
            setattr(self, name, nn.Parameter(value.clone()))
        else:
            p.data.copy_(value)

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.observe(x)
            return x
        if self.track and self.training:
            self.observe(distributed.global_rows(x.detach()))  # under torchrun: the whole global batch, as one process
            self.finish()
        return self.quantize(x)

    def quantize(self, x: Tensor) -> Tensor:
        method, fmt = self.spec.method, self.fmt
        self.finish()
        if method == "dorefa":
            return dorefa_weight(x, fmt, self.granularity)
        if not self.needs_range:
            return quantize_ste(x, fmt)
        if not self.ready:
            raise NNCompressError(f"{self.role} quantizer ({self.spec.observer}) has no range yet; calibrate first: "
                                  "`with calibrating(model): model(x)` or run the quantize transform with data")
        if method == "lsq":
            per_step = (x[0].numel() if self.role == "activation" else x.numel()) // max(self.step.numel(), 1)
            return lsq_quantize(x, self._expand(self.step, x), fmt, per_step)
        if method == "pact":
            return pact_quantize(x, self._expand(self.alpha, x), fmt)
        zero = None if self.zero_point is None else self._expand(self.zero_point, x)
        return quantize_ste(x, fmt, self._expand(self.scale, x), zero)

    def _expand(self, t: Tensor, x: Tensor) -> Tensor:
        return expand_scale(t, self.granularity, x.shape)

    # ---- manifest: structure only, the tensors' values are in the checkpoint ---------------------

    _TENSORS = ("scale", "zero_point", "step", "alpha")

    def describe(self) -> dict[str, Any]:
        """The spec and the shape of every tensor this quantizer holds (values: the checkpoint's)."""
        tensors = {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                   for name in self._TENSORS if (t := getattr(self, name)) is not None}
        return {"role": self.role, "spec": self.spec.to_dict(), "tensors": tensors, "track": self.track}

    @classmethod
    def rebuild(cls, desc: dict[str, Any]) -> "FakeQuant":
        """A quantizer with `describe`'s spec and zero-filled tensors of its shapes, without data."""
        fq = cls(QuantSpec.from_dict(desc["spec"], "spec"), desc["role"])
        fq.track = bool(desc.get("track", False))
        for name, t in (desc.get("tensors") or {}).items():
            if name not in cls._TENSORS:
                raise NNCompressError(f"manifest: unknown quantizer tensor {name!r}; the manifest is corrupt")
            value = torch.zeros(t["shape"], dtype=getattr(torch, t["dtype"]))
            setattr(fq, name, nn.Parameter(value) if name in ("step", "alpha") else value)
        return fq

    def extra_repr(self) -> str:
        f = format_to_dict(self.fmt)
        return f"{self.role}, {f}, {type(self.granularity).__name__}, {self.spec.method}"


# ------------------------------------------------------------------------------------- wrappers

class QuantWrapper(Wrapper):
    """A layer with fake-quantized weight (and optionally input); the original is `.base`.

    `weight_quant` None means the weight is already on its grid (QAT convert baked it in).
    """

    holds_values = True

    def __init__(self, base: nn.Module, weight: QuantSpec | FakeQuant | None = None,
                 activation: QuantSpec | FakeQuant | None = None, calibrate_weight: bool = True):
        super().__init__()
        self.base = base
        self.weight_quant = weight if not isinstance(weight, QuantSpec) else FakeQuant(weight, "weight")
        self.input_quant = activation if not isinstance(activation, QuantSpec) else FakeQuant(activation, "activation")
        if self.weight_quant is not None and calibrate_weight:
            self.calibrate_weight()

    def calibrate_weight(self) -> None:
        """(Re)compute the weight quantizer's range from the current weight."""
        self.weight_quant.reset()
        self.weight_quant.observe(self.base.weight.flatten(1))   # (O, I * kernel)
        self.weight_quant.finish()

    def quantized_weight(self) -> Tensor:
        """The dequantized weight the forward uses, in the base layer's shape."""
        w = self.base.weight
        if self.weight_quant is None:
            return w
        return self.weight_quant(w.flatten(1)).reshape(w.shape)  # (O, I*k) -> (O, I, k...)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self._layer(x, self.quantized_weight())

    def _layer(self, x: Tensor, w: Tensor) -> Tensor:
        raise NotImplementedError

    def merge(self) -> nn.Module:
        """A plain copy of `base` with the dequantized weight baked in (input quantization is dropped:
        the numbers are kept exactly for weight-only wrappers)."""
        merged = copy.deepcopy(self.base)
        with torch.no_grad():
            merged.weight = nn.Parameter(self.quantized_weight().detach().clone(),
                                         requires_grad=self.base.weight.requires_grad)
        return merged

    # ---- the wrapper protocol (core.surgery) ----------------------------------------------------

    @property
    def stands_for(self) -> type:
        return type(self.base)

    def describe(self, child: Any) -> dict[str, Any]:
        return {"base": child(self.base),
                "weight": None if self.weight_quant is None else self.weight_quant.describe(),
                "input": None if self.input_quant is None else self.input_quant.describe()}

    @classmethod
    def rebuild(cls, desc: dict[str, Any], child: Any) -> "QuantWrapper":
        weight = FakeQuant.rebuild(desc["weight"]) if desc.get("weight") else None
        act = FakeQuant.rebuild(desc["input"]) if desc.get("input") else None
        return cls(child(desc["base"]), weight, act, calibrate_weight=False)

    def rewrap(self, layer: nn.Module, first: bool) -> "QuantWrapper":
        """The same weight spec on `layer` (scales fitted to its weights); the input quantizer goes to
        the layer that reads this one's input (`first`), the others stay weight-only (their inputs were
        never calibrated)."""
        weight = None if self.weight_quant is None else self.weight_quant.spec
        act = copy.deepcopy(self.input_quant) if first and type(layer) is type(self.base) else None
        return wrap(layer, weight, act)

    def cut(self, cuts: dict[str, dict[int, list[int]]], attrs: dict[str, Any]) -> None:
        """Slice `base` like the view; per-output-channel quantizer state follows the kept rows, a
        grid whose groups run along a cut input dimension is fitted again to the kept weights."""
        cut_plain(self.base, cuts, attrs)
        fq = self.weight_quant
        if fq is not None and fq.needs_range and fq.ready:
            g = fq.granularity
            if 0 in cuts.get("weight", {}) and not isinstance(g, PerTensor):
                for name in FakeQuant._TENSORS:
                    keep_indices(fq, name, 0, cuts["weight"][0])
            refit = any(d != 0 for d in cuts.get("weight", {})) and not (
                isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis == 0))
            if refit:
                self.calibrate_weight()
        iq, kept_inputs = self.input_quant, cuts.get("weight", {}).get(1)
        if iq is not None and kept_inputs is not None and isinstance(iq.granularity, PerChannel):
            for name in FakeQuant._TENSORS:  # a per-channel input range follows the kept input channels
                t = getattr(iq, name)
                if t is not None and t.dim():
                    keep_indices(iq, name, iq.granularity.axis % t.dim(), kept_inputs)

    def summary(self) -> str:
        w = "float weights" if self.weight_quant is None else f"{_short(self.weight_quant)} weights"
        a = "" if self.input_quant is None else f", {_short(self.input_quant)} inputs"
        return f"quantized ({w}{a})"


def _short(fq: FakeQuant) -> str:
    f = format_to_dict(fq.fmt)
    return f"{f['kind']}{f.get('bits', '')}"


@wrapper("quant_linear")
class QuantLinear(QuantWrapper):
    """`nn.Linear` with fake quantization; input (N, ..., I), weight (O, I)."""

    rewrap_types = (nn.Linear,)

    def _layer(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w, self.base.bias)


@wrapper("quant_conv")
class QuantConv(QuantWrapper):
    """`nn.Conv1d/2d/3d` with fake quantization; the base layer's padding mode, stride, groups apply."""

    rewrap_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def _layer(self, x: Tensor, w: Tensor) -> Tensor:
        return self.base._conv_forward(x, w, self.base.bias)


@wrapper("quant_embedding")
class QuantEmbedding(QuantWrapper):
    """`nn.Embedding` with a fake-quantized table (V, D): weight only, since its inputs are indices.
    Per channel (axis 0) is a scale per token row; per group runs along the embedding dimension.

    >>> m = QuantEmbedding(nn.Embedding(10, 8), weight=QuantSpec(format=IntFormat(bits=4)))
    >>> ids = torch.tensor([[1, 2], [3, 9]])
    >>> torch.equal(m(ids), m.quantized_weight()[ids])
    True
    """

    def __init__(self, base: nn.Module, weight: QuantSpec | FakeQuant | None = None,
                 activation: QuantSpec | FakeQuant | None = None, calibrate_weight: bool = True):
        if activation is not None:
            raise NNCompressError("an embedding's input is token indices: quantize its weight only "
                                  "(activation: null), or exclude it from the targets")
        super().__init__(base, weight, None, calibrate_weight)

    rewrap_types = (nn.Embedding,)

    def _layer(self, x: Tensor, w: Tensor) -> Tensor:
        b = self.base
        return F.embedding(x, w, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)


QUANTIZABLE: dict[type, type] = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv, nn.Conv2d: QuantConv,
                                  nn.Conv3d: QuantConv, nn.Embedding: QuantEmbedding}


def wrap(module: nn.Module, weight: QuantSpec | FakeQuant | None, activation: QuantSpec | FakeQuant | None = None,
         calibrate_weight: bool = True) -> QuantWrapper:
    """The wrapper for a Linear / Conv layer (exact types: subclasses such as attention projections
    may be read directly by their owner, so they are left alone)."""
    cls = QUANTIZABLE.get(type(module))
    if cls is None:
        raise NNCompressError(f"cannot quantize a {type(module).__name__}; quantizable layers are "
                              f"{', '.join(t.__name__ for t in QUANTIZABLE)}")
    return cls(module, weight, activation, calibrate_weight)


@contextlib.contextmanager
def calibrating(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, activation quantizers observe their inputs (and pass them through
    unquantized); on exit they keep the range they found and the previous modes come back.

    >>> m = QuantLinear(nn.Linear(3, 2), activation=QuantSpec(format=IntFormat(bits=8, signed=False)))
    >>> with calibrating(m):
    ...     _ = m(torch.tensor([[0.0, 1.0, 2.55]]))
    >>> round(m.input_quant.scale.item(), 6), m.input_quant.observing
    (0.01, False)
    """
    quants = [m for m in model.modules() if isinstance(m, FakeQuant) and m.role == "activation"]
    before = [m.observing for m in quants]
    for m in quants:
        m.reset()
        m.observing = True
    try:
        yield model
        for m in quants:
            m.finish()
    finally:
        for m, flag in zip(quants, before):
            m.observing = flag
