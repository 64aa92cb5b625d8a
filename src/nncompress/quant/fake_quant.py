"""Fake quantization: the spec, the pure functions, the straight-through estimators, the wrappers.

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

import base64
import contextlib
import copy
import dataclasses
import inspect
import math
from typing import Any, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core import Config, ConfigError, NNCompressError, check, lookup
from ..core.errors import RegistryError
from ..formats import (MXFP4, MXFP6, MXFP6_E3M2, MXFP8, MXFP8_E5M2, MXINT8, BinaryFormat, BlockFloat, BlockLog,
                       BlockMinifloat, FixedPoint, FloatFormat, IntFormat, LogFormat, PerChannel, PerGroup,
                       PerTensor, Pow2Format, ScaledCodebook, TernaryFormat, expand_scale, fake_quantize, group_amax,
                       int_qparams)
from . import observers as _observers  # noqa: F401  (registers the observers a spec names)

_RECORD_LIST_MAX = 64  # record tensors up to this size as readable lists, larger ones as base64 bytes
from .observers import grid_max

EPS = torch.finfo(torch.float32).eps

# ------------------------------------------------------------------------------------- spec parsing

FORMAT_KINDS: dict[str, type] = {
    "int": IntFormat, "fixed": FixedPoint, "float": FloatFormat, "pow2": Pow2Format, "log": LogFormat,
    "binary": BinaryFormat, "ternary": TernaryFormat, "codebook": ScaledCodebook,
    "block_float": BlockFloat, "block_minifloat": BlockMinifloat, "block_log": BlockLog,
}
FORMAT_PRESETS: dict[str, Any] = {"mxint8": MXINT8, "mxfp8": MXFP8, "mxfp8_e5m2": MXFP8_E5M2, "mxfp6": MXFP6,
                                  "mxfp6_e3m2": MXFP6_E3M2, "mxfp4": MXFP4}
GRANULARITY_KINDS: dict[str, type] = {"per_tensor": PerTensor, "per_channel": PerChannel, "per_group": PerGroup}
_OWN_GRANULARITY = (BinaryFormat, TernaryFormat, ScaledCodebook)  # formats that fit alpha per group themselves


def format_from_dict(data: Any, path: str = "format") -> Any:
    """A number format from `{kind: int, bits: 4, ...}`, a preset name (`mxfp4`), or a format value.

    >>> format_from_dict({"kind": "float", "exp": 4, "man": 3}).max
    448.0
    >>> format_from_dict({"kind": "int", "bits": 1})
    Traceback (most recent call last):
    ...
    nncompress.core.errors.ConfigError: format.bits: IntFormat takes 2..16 bits, got 1; use BinaryFormat for 1 bit
    """
    if isinstance(data, tuple(FORMAT_KINDS.values())):
        return data
    data = _tagged(data, path, "a format mapping like {kind: int, bits: 8}")
    kind = data.get("kind")
    if kind in FORMAT_PRESETS:
        extra = sorted(set(data) - {"kind"})
        if extra:
            raise ConfigError(f"{path}.{extra[0]}", f"preset {kind!r} takes no fields; spell the block format out")
        return FORMAT_PRESETS[kind]
    if kind not in FORMAT_KINDS:
        known = ", ".join([*FORMAT_KINDS, *FORMAT_PRESETS])
        raise ConfigError(f"{path}.kind", f"unknown format kind {kind!r}; known: {known}")
    fields = {k: v for k, v in data.items() if k != "kind"}
    if "granularity" in fields:  # parse with its own kind, not by which fields happen to fit
        fields["granularity"] = granularity_from_dict(fields["granularity"], f"{path}.granularity")
    return FORMAT_KINDS[kind].from_dict(fields, path)


def _tagged(data: Any, path: str, example: str) -> dict[str, Any]:
    """A YAML value as a `{kind: ..., **fields}` mapping: a bare string names the kind."""
    if isinstance(data, str):
        return {"kind": data}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected {example}, got {data!r}")
    return data


def format_to_dict(fmt: Any) -> dict[str, Any]:
    """The YAML form of a format value (inverse of `format_from_dict`)."""
    kind = next(k for k, cls in FORMAT_KINDS.items() if type(fmt) is cls)
    out = {"kind": kind, **fmt.to_dict()}
    if "granularity" in out:
        out["granularity"] = granularity_to_dict(fmt.granularity)
    return out


def granularity_from_dict(data: Any, path: str = "granularity") -> Any:
    """`{kind: per_group, axis: 1, size: 64}`, `per_tensor`, or a granularity value.

    >>> granularity_from_dict({"kind": "per_channel"})
    PerChannel(axis=0)
    """
    if isinstance(data, (PerTensor, PerChannel, PerGroup)):
        return data
    data = _tagged(data, path, "{kind: per_tensor | per_channel | per_group, ...}")
    kind = data.get("kind")
    fields = {k: v for k, v in data.items() if k != "kind"}
    if kind is None:  # untagged (as formats' own to_dict writes it): the fields decide
        for cls in (PerTensor, PerChannel, PerGroup):
            with contextlib.suppress(ConfigError):
                return cls.from_dict(fields, path)
        raise ConfigError(path, "give a kind: per_tensor, per_channel or per_group")
    if kind not in GRANULARITY_KINDS:
        raise ConfigError(f"{path}.kind", f"unknown granularity {kind!r}; known: {', '.join(GRANULARITY_KINDS)}")
    return GRANULARITY_KINDS[kind].from_dict(fields, path)


def granularity_to_dict(g: Any) -> dict[str, Any]:
    kind = next(k for k, cls in GRANULARITY_KINDS.items() if type(g) is cls)
    return {"kind": kind, **g.to_dict()}


@dataclasses.dataclass(frozen=True)
class QuantSpec(Config):
    """How one tensor is quantized: orthogonal fields, each a value.

    format:        a number format value or its YAML mapping (`{kind: int, bits: 4}`, `mxfp4`, ...)
    granularity:   PerTensor / PerChannel(axis) / PerGroup(axis, size), or its mapping; None picks the
                   role's default: per output channel for weights, per tensor for activations
    observer:      registered observer for the range: minmax, moving_average_minmax, percentile, mse, kl
    observer_args: options of that observer, e.g. {percentile: 99.9}
    method:        rtn (observer range, straight-through gradient), lsq (learned step size),
                   pact (learned activation clip, unsigned int), dorefa (tanh-normalised weights)

    Formats that fit their own scale (binary, ternary, codebooks, block/MX) ignore the observer.

    >>> spec = QuantSpec.from_dict({"format": {"kind": "int", "bits": 4},
    ...                             "granularity": {"kind": "per_group", "size": 64}, "observer": "mse"})
    >>> spec.format, spec.granularity
    (IntFormat(bits=4, signed=True, symmetric=True, narrow_range=False), PerGroup(axis=-1, size=64))
    >>> QuantSpec.from_dict(spec.to_dict()) == spec
    True
    """

    format: Any = IntFormat()
    granularity: Any = None
    observer: str = "minmax"
    observer_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    method: Literal["rtn", "lsq", "pact", "dorefa"] = "rtn"

    def __post_init__(self) -> None:
        fmt = format_from_dict(self.format, "format")
        g = None if self.granularity is None else granularity_from_dict(self.granularity, "granularity")
        if isinstance(fmt, _OWN_GRANULARITY):  # one granularity, not two that disagree
            if g is None or (g == PerTensor() and fmt.granularity != PerTensor()):
                g = fmt.granularity
            fmt = dataclasses.replace(fmt, granularity=g)
        object.__setattr__(self, "format", fmt)
        object.__setattr__(self, "granularity", g)
        try:
            fn = lookup(self.observer, "observer")
        except RegistryError as e:
            raise ConfigError("observer", str(e)) from None
        try:
            inspect.signature(fn).bind(None, None, None, None, **self.observer_args)
        except TypeError as e:
            opts = [p for p in list(inspect.signature(fn).parameters)[4:]]
            raise ConfigError("observer_args",
                              f"{e}; {self.observer} takes {', '.join(opts) or 'no options'}") from None
        if self.method == "lsq":
            check(isinstance(fmt, IntFormat) and fmt.symmetric, "format",
                  "lsq learns the step of a symmetric integer grid; use {kind: int, symmetric: true}")
        if self.method == "pact":
            check(isinstance(fmt, IntFormat) and not fmt.signed, "format.signed",
                  "pact clips activations to [0, alpha]; use an unsigned grid {kind: int, signed: false}")
        if self.method == "dorefa":
            check(isinstance(fmt, IntFormat), "format", "dorefa quantizes onto a k-bit integer grid; use {kind: int}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["format"] = format_to_dict(self.format)
        out["granularity"] = None if self.granularity is None else granularity_to_dict(self.granularity)
        return out

    def resolved(self, role: Literal["weight", "activation"]) -> "QuantSpec":
        """The spec with its granularity made explicit for `role`."""
        if self.granularity is not None:
            return self
        return dataclasses.replace(self, granularity=PerChannel(axis=0) if role == "weight" else PerTensor())

    def with_bits(self, bits: int) -> "QuantSpec":
        """The same spec at another integer width (progressive QAT)."""
        check(isinstance(self.format, IntFormat), "format", "a bit-width schedule needs an integer format")
        return dataclasses.replace(self, format=dataclasses.replace(self.format, bits=bits))


# ------------------------------------------------------------------------------------- pure maths

def uses_scale(fmt: Any) -> bool:
    """True for grids an observer range is mapped onto; False for formats that fit their own scale."""
    return isinstance(fmt, (IntFormat, FixedPoint, FloatFormat, Pow2Format, LogFormat))


def qparams(lo: Tensor, hi: Tensor, fmt: Any) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) mapping [lo, hi] onto any scaled format (int: `int_qparams`).

    >>> s, z = qparams(torch.tensor(-2.0), torch.tensor(448.0), FloatFormat(exp=4, man=3))
    >>> s.item(), z.item()
    (1.0, 0)
    """
    if isinstance(fmt, IntFormat):
        return int_qparams(lo, hi, fmt)
    amax = torch.maximum(lo.abs(), hi.abs())
    scale = (amax / grid_max(fmt)).clamp_min(EPS)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def _as_int(fmt: Any, scale: Tensor) -> tuple[IntFormat, Tensor]:
    if isinstance(fmt, FixedPoint):  # a fixed point number is an integer grid with step 2**-frac_bits
        return fmt.int_format, scale * fmt.resolution
    return fmt, scale


def quantize_values(x: Tensor, fmt: Any, scale: Tensor | None = None, zero_point: Tensor | int | None = None
                    ) -> Tensor:
    """Quantize-dequantize `x` with a broadcastable scale (None for self-scaled formats). No gradient."""
    if not uses_scale(fmt):
        return fmt.quantize(x)
    if isinstance(fmt, (IntFormat, FixedPoint)):
        int_fmt, step = _as_int(fmt, scale)
        return fake_quantize(x, step, 0 if zero_point is None else zero_point, int_fmt)
    return fmt.quantize(x, scale)


def in_range(x: Tensor, fmt: Any, scale: Tensor | None, zero_point: Tensor | int | None) -> Tensor:
    """Where the straight-through gradient passes: the code before clipping lies in [qmin, qmax]
    (PyTorch's FakeQuantize rule). Self-scaled formats never clip: everywhere."""
    if not uses_scale(fmt):
        return torch.ones_like(x, dtype=torch.bool)
    if isinstance(fmt, (IntFormat, FixedPoint)):
        int_fmt, step = _as_int(fmt, scale)
        code = torch.round(x / step) + (0 if zero_point is None else zero_point)
        return (code >= int_fmt.qmin) & (code <= int_fmt.qmax)
    return (x / scale).abs() <= grid_max(fmt)


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to `shape`."""
    while grad.ndim > len(shape):
        grad = grad.sum(0)
    dims = tuple(d for d, n in enumerate(shape) if n == 1 and grad.shape[d] != 1)
    return grad.sum(dims, keepdim=True) if dims else grad


class STEQuantize(torch.autograd.Function):
    """Forward: `quantize_values(x, fmt, scale, zero_point)`. Backward: the straight-through
    estimator, identity for x inside the clip range and zero outside; for a scale that requires
    grad, LSQ's d out / d scale = (out - x) / scale inside and out / scale outside.

    >>> x = torch.tensor([0.2, 0.9, 5.0], requires_grad=True)
    >>> STEQuantize.apply(x, torch.tensor(0.5), 0, IntFormat(bits=3)).sum().backward()   # clip at 3.5
    >>> x.grad.tolist()
    [1.0, 1.0, 0.0]
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor | None, zero_point: Tensor | int | None, fmt: Any) -> Tensor:
        q = quantize_values(x, fmt, scale, zero_point)
        ctx.save_for_backward(x, q, scale if isinstance(scale, Tensor) else None,
                              in_range(x, fmt, scale, zero_point))
        return q

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, q, scale, inside = ctx.saved_tensors
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = _sum_to(grad * torch.where(inside, (q - x) / scale, q / scale), scale.shape)
        return grad_x, grad_scale, None, None


class GradScale(torch.autograd.Function):
    """Identity forward (bit for bit), gradient times `factor` (LSQ's g)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def quantize_ste(x: Tensor, fmt: Any, scale: Tensor | None = None, zero_point: Tensor | int | None = None) -> Tensor:
    """`quantize_values` with the straight-through gradient when autograd needs one."""
    needs = torch.is_grad_enabled() and (x.requires_grad or (isinstance(scale, Tensor) and scale.requires_grad))
    return STEQuantize.apply(x, scale, zero_point, fmt) if needs else quantize_values(x, fmt, scale, zero_point)


def lsq_quantize(x: Tensor, step: Tensor, fmt: IntFormat, per_step: int) -> Tensor:
    """LSQ (Esser et al. 2020): quantize with a learned step whose gradient is scaled by
    g = 1 / sqrt(per_step * qmax), `per_step` the number of elements sharing one step."""
    g = 1.0 / math.sqrt(max(per_step, 1) * fmt.qmax)
    s = GradScale.apply(step, g).abs().clamp_min(EPS)
    return quantize_ste(x, fmt, s, 0)


def pact_quantize(x: Tensor, alpha: Tensor, fmt: IntFormat) -> Tensor:
    """PACT (Choi et al. 2018): clip to [0, alpha] (alpha learned: gradient 1 where x >= alpha),
    then quantize [0, alpha] onto the unsigned grid with the straight-through estimator."""
    alpha = alpha.abs().clamp_min(EPS)
    y = torch.minimum(x.clamp_min(0), alpha)
    return quantize_ste(y, fmt, (alpha / fmt.qmax).detach(), 0)


def dorefa_weight(w: Tensor, fmt: IntFormat, granularity: Any) -> Tensor:
    """DoReFa-Net weights: 2 * Q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1 with k = fmt.bits, in [-1, 1].

    The grid has no scale of the layer's weights: the paper relies on a normalisation after it.
    """
    t = torch.tanh(w)
    amax = expand_scale(group_amax(t, granularity), granularity, w.shape).clamp_min(EPS)
    u = t / (2 * amax) + 0.5                                           # in [0, 1]
    n = 2 ** fmt.bits - 1
    return 2 * quantize_ste(u, IntFormat(bits=fmt.bits, signed=False), torch.tensor(1.0 / n), 0) - 1


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
            self.scale, self.zero_point = scale.to(device), zp.to(device)

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
            self.observe(x)
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
        return quantize_ste(x, fmt, self._expand(self.scale, x), self._expand(self.zero_point, x))

    def _expand(self, t: Tensor, x: Tensor) -> Tensor:
        return expand_scale(t, self.granularity, x.shape)

    # ---- manifest ----------------------------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """The spec and every tensor this quantizer holds, JSON-able: small tensors as lists, larger
        ones as base64 of their little-endian bytes (a list of per-row scales of a 30k-token embedding
        is megabytes of decimal text in the manifest; the bytes are exact and a quarter of that)."""
        tensors = {}
        for name in ("scale", "zero_point", "step", "alpha"):
            t = getattr(self, name)
            if t is not None:
                t = t.detach().cpu().contiguous()
                entry: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                if t.numel() <= _RECORD_LIST_MAX:
                    entry["values"] = t.flatten().tolist()
                else:
                    entry["base64"] = base64.b64encode(t.numpy().astype(t.numpy().dtype.newbyteorder("<"))
                                                       .tobytes()).decode("ascii")
                tensors[name] = entry
        return {"role": self.role, "spec": self.spec.to_dict(), "tensors": tensors}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "FakeQuant":
        """Rebuild a quantizer from `to_record` output, without data."""
        fq = cls(QuantSpec.from_dict(record["spec"]), record["role"])
        for name, t in record.get("tensors", {}).items():
            dtype = getattr(torch, t["dtype"])
            if "base64" in t:
                raw = bytearray(base64.b64decode(t["base64"]))
                value = torch.frombuffer(raw, dtype=dtype).reshape(t["shape"]).clone()
            else:
                value = torch.tensor(t["values"], dtype=dtype).reshape(t["shape"])
            if name in ("step", "alpha"):
                setattr(fq, name, nn.Parameter(value))
            else:
                setattr(fq, name, value)
        return fq

    def extra_repr(self) -> str:
        f = format_to_dict(self.fmt)
        return f"{self.role}, {f}, {type(self.granularity).__name__}, {self.spec.method}"


# ------------------------------------------------------------------------------------- wrappers

class QuantWrapper(nn.Module):
    """A layer with fake-quantized weight (and optionally input); the original is `.base`.

    `weight_quant` None means the weight is already on its grid (QAT convert baked it in).
    """

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


class QuantLinear(QuantWrapper):
    """`nn.Linear` with fake quantization; input (N, ..., I), weight (O, I)."""

    def _layer(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w, self.base.bias)


class QuantConv(QuantWrapper):
    """`nn.Conv1d/2d/3d` with fake quantization; the base layer's padding mode, stride, groups apply."""

    def _layer(self, x: Tensor, w: Tensor) -> Tensor:
        return self.base._conv_forward(x, w, self.base.bias)


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
