"""Quantization specs: what a quantizer does (format, granularity, observer, method), and the
YAML/dict forms of formats and granularities.

    spec = QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=64), observer="mse")

In YAML a spec is `{format: {kind: int, bits: 4}, granularity: {kind: per_group, size: 64}, observer: mse}`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Literal


from ..core import Config, ConfigError, check, lookup
from ..core.config import as_tagged
from ..core.errors import RegistryError
from ..formats import (MXFP4, MXFP6, MXFP6_E3M2, MXFP8, MXFP8_E5M2, MXINT8, BinaryFormat, BlockFloat, BlockLog,
                       BlockMinifloat, FixedPoint, FloatFormat, IntFormat, LogFormat, PerChannel, PerGroup,
                       PerTensor, Pow2Format, ScaledCodebook, TernaryFormat)
from . import observers as _observers  # noqa: F401  (registers the observers a spec names)

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
    data = as_tagged(data, path, "a format mapping like {kind: int, bits: 8}")
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
    data = as_tagged(data, path, "{kind: per_tensor | per_channel | per_group, ...}")
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
