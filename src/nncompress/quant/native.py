"""PyTorch-native INT8 Linear: int8 weights, activations quantized at run time, int32 GEMM.

    from nncompress.quant.native import Int8DynamicConfig
    model = nncompress.apply(model, Int8DynamicConfig(), targets=Targets(include=("*encoder*",)))

Each targeted eval-mode `nn.Linear` (or a weight-only `QuantLinear` with an 8-bit symmetric integer
weight grid, whose codes are kept as they are) becomes an `Int8DynamicLinear` holding int8 codes per
output channel, symmetric (s_w = max|w_row| / 127). Two kernels run the same weight codes:

kernel="fbgemm" (default, the fast one): `torch.ops.quantized.linear_dynamic` on weights prepacked
    once from our codes (`torch._make_per_channel_quantized_tensor` + `quantized.linear_prepack`);
    fbgemm fuses the activation quantization into the GEMM. Its activation grid is fbgemm's choice:
    uint8, asymmetric, one scale per tensor over [min(0, x.min()), max(0, x.max())]
    (`fbgemm_linear_reference` is the float64 oracle of that arithmetic):

        s_x = (hi - lo) / 255, z = round(-lo / s_x), x_q = clamp(round(x / s_x) + z, 0, 255)
        y = ((x_q - z) @ W_q^T) * s_x * s_w + b

    CPU only (fbgemm); on a GPU use kernel="int_mm".

    reduce_range: on x86 CPUs without AVX512-VNNI (AVX2, e.g. AMD EPYC before Zen 4), fbgemm's u8 x s8
    kernel multiplies with VPMADDUBSW, which adds two u8 * s8 products into an int16 and saturates:
    255 * 127 * 2 = 64770 > 32767, so full 8-bit activations against large weight codes give wrong
    sums (measured on an AVX2 EPYC: 514 instead of 1016 for 8 activations at 255 against codes 127).
    With 7-bit activations (qmax 127, `reduce_range=True`, torch.ao's quantize_dynamic default) a pair
    is at most 127 * 127 * 2 = 32258 and the GEMM is exact. The default `reduce_range=None` decides on
    the machine that runs the layer: `fbgemm_saturates()` runs the kernel once on such a crafted input
    and compares with the exact integer sum. Where it is True, the layer keeps 8-bit activations and
    packs its weight codes at half resolution instead (round(q / 2) in [-64, 64], scales doubled; the
    stored 8-bit codes do not change): a pair is at most 255 * 64 * 2 = 32640, exact, and per-tensor
    activations, the coarser of the two grids, keep their precision (all-MiniLM-L6-v2: 0.9909 cosine
    to fp32, against 0.9761 with 7-bit activations; 0.9933 with 8-bit codes on a VNNI CPU). On
    VNNI CPUs, whose VPDPBUSD accumulates in int32, codes and activations are 8-bit. `kernel_operands()`
    says what the GEMM runs. The setting is stored as given (None stays auto), so a checkpoint moved to
    another CPU picks that CPU's answer. An explicit False on a saturating CPU runs as asked, with a
    one-time warning that the results are saturated.
kernel="int_mm" (the oracle, slower): one symmetric scale per row, our own elementwise code, then
    `torch._int_mm` (exact int32 GEMM; CPU kernels in torch >= 2.4):

        s_x = max|x_row| / 127, x_q = round(x / s_x), y = (x_q @ W_q^T) * s_x * s_w + b

    More accurate (per-row activations), but the quantization and rescale run as separate eager
    elementwise passes, which on CPU cost more than the int8 GEMM saves: on all-MiniLM-L6-v2 it is
    slower than fp32 (measured ~0.6-0.8x). It equals `int8_linear_reference` up to float32 rounding.

As a recipe stage: `- kind: int8_dynamic`. The record lists the converted layers, so `nncompress.load`
rebuilds them (int8 codes and scales come from the safetensors file).

>>> layer, x = nn.Linear(16, 4), torch.randn(3, 16)
>>> q = Int8DynamicLinear.from_linear(layer, kernel="int_mm")
>>> bool(torch.allclose(q(x), int8_linear_reference(x, q.weight_q, q.weight_scale, q.bias).float(), atol=1e-5))
True
>>> f = Int8DynamicLinear.from_linear(layer)   # fbgemm: same weight codes, per-tensor activations
>>> codes, scale, reduce_range = f.kernel_operands()   # where fbgemm saturates: codes at half resolution
>>> ref = fbgemm_linear_reference(x, codes, scale, f.bias, reduce_range=reduce_range)
>>> bool(torch.allclose(f(x), ref.float(), atol=1e-4))
True
>>> q.weight_q.dtype, tuple(q.weight_scale.shape)
(torch.int8, (4,))
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Literal

import torch
import torch.nn as nn
from torch import Tensor

from ..core import Config, Context, Site, Wrapper, check, layer_transform, wrapper
from ..core.errors import UnsupportedOpError
from ..core.surgery import keep_indices
from ..formats import IntFormat, PerChannel
from .fake_quant import QuantLinear
from .storage import weight_codes

__all__ = ["Int8DynamicConfig", "Int8DynamicLinear", "quantize_rows", "int8_linear",
           "int8_linear_reference", "fbgemm_prepack", "fbgemm_linear_reference", "fbgemm_saturates"]

Kernel = Literal["fbgemm", "int_mm"]

QMAX = 127  # symmetric int8 grid [-127, 127]: no zero point, so no correction term in the GEMM
HALF = 64   # the codes fbgemm packs at half resolution where it saturates: 255 * 64 * 2 fits int16
_TINY = torch.finfo(torch.float32).tiny


# ------------------------------------------------------------------------------------ pure maths

def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes per row of `x` (M, K): (codes int8 (M, K), scale float32 (M, 1)).

    An all-zero row gets scale `tiny` and zero codes (no division by zero).

    >>> q, s = quantize_rows(torch.tensor([[0.5, -1.27, 0.0]]))
    >>> q.tolist(), round(s.item(), 6)
    ([[50, -127, 0]], 0.01)
    """
    x = x.float()
    # one pass for the range, one for the codes: eager elementwise passes cost as much as the int8 GEMM
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_min(_TINY * QMAX)  # (M, 1)
    codes = (x * (QMAX / amax)).round_().to(torch.int8)   # (M, K); |x| * 127 / amax <= 127: no clamp needed
    return codes, amax / QMAX


def int8_linear(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """`x` (..., I) float, `weight_q` (O, I) int8, `weight_scale` (O,) -> (..., O) float32, via an int32 GEMM."""
    lead = x.shape[:-1]
    xq, sx = quantize_rows(x.reshape(-1, x.shape[-1]))             # (M, I) int8, (M, 1)
    acc = torch._int_mm(xq, weight_q.t())                          # (M, O) int32, exact
    y = acc.float() * sx * weight_scale                            # (M, O)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight_q.shape[0]).to(x.dtype)


def int8_linear_reference(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """The same arithmetic in float64 (the oracle of the tests): float64 GEMM of the integer codes."""
    xq, sx = quantize_rows(x.reshape(-1, x.shape[-1]))
    y = (xq.double() @ weight_q.double().t()) * sx.double() * weight_scale.double()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


def fbgemm_prepack(weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Any:
    """fbgemm's packed weight built from our int8 codes (O, I) and per-channel scales (O,), codes kept as is."""
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch; fbgemm's prepack still takes them
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(weight_q.cpu(), weight_scale.detach().cpu().double(),
                                                      torch.zeros(weight_q.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().cpu().float())


def fbgemm_linear_reference(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Tensor | None,
                            reduce_range: bool = False) -> Tensor:
    """Float64 oracle of fbgemm's dynamic linear: per-tensor asymmetric uint8 activations, int GEMM, rescale."""
    x64 = x.reshape(-1, x.shape[-1]).double()                                  # (M, I)
    qmax = 127 if reduce_range else 255
    lo, hi = min(0.0, float(x64.min())), max(0.0, float(x64.max()))
    s = float(torch.tensor((hi - lo) / qmax, dtype=torch.float32)) or 0.1      # fbgemm stores the scale in fp32
    z = min(max(round(-lo / s), 0), qmax)
    xq = (torch.round(x64 / s) + z).clamp(0, qmax)                               # (M, I) uint8 grid
    y = ((xq - z) @ weight_q.double().t()) * s * weight_scale.double()          # (M, O)
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


def fbgemm_saturates() -> bool:
    """True when this CPU's fbgemm dynamic linear saturates int16 pair sums with 8-bit activations.

    Runs `quantized.linear_dynamic` once (per quantized engine, then cached) on activations that
    quantize to 255 against weight codes 127, where each pair of products (64770) overflows int16, and
    compares with the exact integer result: x86 CPUs without AVX512-VNNI (VPMADDUBSW) saturate, VNNI
    CPUs (VPDPBUSD, int32 accumulation) do not. `Int8DynamicLinear(reduce_range=None)` packs its
    weight codes at half resolution where this is True (see `Int8DynamicLinear.kernel_operands`).
    """
    return _fbgemm_saturates(torch.backends.quantized.engine)


@functools.lru_cache(maxsize=None)
def _fbgemm_saturates(engine: str) -> bool:
    m, k, n = 4, 64, 8                      # a full SIMD width of K, several rows and columns
    x = torch.ones(m, k)                    # range [0, 1]: s_x = 1/255, zero point 0, every code 255
    w_q = torch.full((n, k), QMAX, dtype=torch.int8)
    w_q[1::2] = -QMAX                       # and rows of -127: negative pair sums saturate at -32768
    scale = torch.ones(n)
    with torch.no_grad():
        got = torch.ops.quantized.linear_dynamic(x, fbgemm_prepack(w_q, scale, None), False)
    ref = fbgemm_linear_reference(x, w_q, scale, None)
    return not torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-3)


_warned_saturation = False


def _warn_saturation() -> None:
    global _warned_saturation
    if not _warned_saturation:
        _warned_saturation = True
        warnings.warn("Int8DynamicLinear(reduce_range=False): fbgemm saturates int16 pair sums on this CPU "
                      "(no AVX512-VNNI), so full 8-bit activations give saturated, inexact outputs; set "
                      "reduce_range=None (auto: half-resolution weight codes here) or True (7-bit activations), "
                      "or use kernel='int_mm'",
                      RuntimeWarning, stacklevel=3)


def weight_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 codes of a weight (O, I): (codes (O, I) int8, scale (O,))."""
    codes, scale = quantize_rows(w.detach())
    return codes, scale.reshape(-1)


# ------------------------------------------------------------------------------------ the module

@wrapper("int8_dynamic_linear")
class Int8DynamicLinear(Wrapper):
    """A Linear holding int8 weight codes (O, I) and per-channel scales (O,); inference only.

    It holds no float copy of the weight (that is the point of int8 storage): `merge()` returns the
    plain `nn.Linear` with the dequantized weight `codes * scale`.
    """

    holds_values = True
    rewrap_types = (nn.Linear,)
    reduce_range: bool | None   # True 7-bit activations, False 8-bit, None auto (per CPU: kernel_operands)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, kernel: Kernel = "fbgemm",
                 reduce_range: bool | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel, self.reduce_range = kernel, reduce_range
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: Any = None   # fbgemm's prepacked weight: a cache of the buffers, rebuilt when they change
        self._packed_key: tuple[int, ...] | None = None

    @classmethod
    def from_linear(cls, layer: nn.Module, *, kernel: Kernel = "fbgemm", reduce_range: bool | None = None
                    ) -> "Int8DynamicLinear":
        """From an `nn.Linear` (weights rounded here) or a weight-only `QuantLinear` (its codes kept)."""
        base = layer.base if isinstance(layer, QuantLinear) else layer
        out = cls(base.in_features, base.out_features, base.bias is not None, kernel=kernel,
                  reduce_range=reduce_range)
        if isinstance(layer, QuantLinear):
            codes = _int8_codes_of(layer)
            q, s = codes.codes.reshape(base.weight.shape).to(torch.int8), codes.scale.reshape(-1).float()
        else:
            q, s = weight_int8(base.weight)
        with torch.no_grad():
            out.weight_q.copy_(q)
            out.weight_scale.copy_(s)
            if base.bias is not None:
                out.bias.copy_(base.bias.detach().float())
        return out.to(base.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            # the int8 kernels have no backward: layers before this one train through the dequantized
            # weight (activation rounding passes straight through), never through a silent zero gradient
            return nn.functional.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        if self.kernel == "int_mm":
            return int8_linear(x, self.weight_q, self.weight_scale, self.bias)
        key = self._buffers_version()
        if self._packed is None or key != self._packed_key:   # the operands are derived once per packing
            codes, scale, _ = self.kernel_operands()
            self._packed = fbgemm_prepack(codes, scale, self.bias)
            self._packed_key = key
        if self.reduce_range is False and fbgemm_saturates():
            _warn_saturation()
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed,
                                                  bool(self.reduce_range)).to(x.dtype)

    def kernel_operands(self) -> tuple[Tensor, Tensor, bool]:
        """(weight codes (O, I), scales (O,), 7-bit activations?) that fbgemm's GEMM runs here: the stored
        codes and the grid `reduce_range` sets; when it is None (auto) on a CPU whose kernel saturates
        (`fbgemm_saturates()`), the codes at half resolution, round(q / 2) in [-64, 64] with the scales
        doubled, against 8-bit activations (exact: a pair of products is at most 255 * 64 * 2 = 32640)."""
        if self.reduce_range is None and fbgemm_saturates():
            halved = torch.round(self.weight_q.float() / 2).clamp(-HALF, HALF).to(torch.int8)
            return halved, self.weight_scale * 2, False
        return self.weight_q, self.weight_scale, bool(self.reduce_range)

    # the prepacked weight is derived state: rebuilt when a buffer is written in place (its version
    # counter moves), loaded or moved
    def _buffers_version(self) -> tuple[int, ...] | None:
        try:
            return tuple(t._version for t in (self.weight_q, self.weight_scale, self.bias) if t is not None)
        except RuntimeError:   # inference-mode tensors have no version counter: the hooks below still apply
            return None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "Int8DynamicLinear":
        self._packed = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_packed": None}

    def dequantized_weight(self) -> Tensor:
        return self.weight_q.float() * self.weight_scale[:, None]   # (O, I)

    def merge(self) -> nn.Linear:
        """A plain `nn.Linear` with weight `codes * scale` (activation rounding is dropped)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer.to(self.weight_q.device)

    def extra_repr(self) -> str:
        rr = "" if self.kernel != "fbgemm" else (", reduce_range=auto" if self.reduce_range is None
                                                else f", reduce_range={self.reduce_range}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.kernel}" + rr)

    # ---- the wrapper protocol (core.surgery) ----------------------------------------------------

    @property
    def stands_for(self) -> type:
        return nn.Linear

    def describe(self, child: Any) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "kernel": self.kernel, "reduce_range": self.reduce_range}

    @classmethod
    def rebuild(cls, desc: dict[str, Any], child: Any) -> "Int8DynamicLinear":
        # the setting as saved: None (auto) resolves on the CPU that loads it; checkpoints written
        # before the auto setting hold a bool, kept as the explicit choice it now means
        rr = desc.get("reduce_range", False)
        return cls(int(desc["in_features"]), int(desc["out_features"]), bool(desc["bias"]), kernel=desc["kernel"],
                   reduce_range=None if rr is None else bool(rr))

    def rewrap(self, layer: nn.Module, first: bool) -> "Int8DynamicLinear":
        return Int8DynamicLinear.from_linear(layer, kernel=self.kernel, reduce_range=self.reduce_range)

    def cut(self, cuts: dict[str, dict[int, list[int]]], attrs: dict[str, Any]) -> None:
        """Keep rows / columns of the codes: each row keeps its own scale, so the kept codes stay exact."""
        for dim, keep in cuts.get("weight", {}).items():
            keep_indices(self, "weight_q", dim, keep)
            if dim == 0:
                keep_indices(self, "weight_scale", 0, keep)
        for dim, keep in cuts.get("bias", {}).items():
            keep_indices(self, "bias", dim, keep)
        self.out_features, self.in_features = self.weight_q.shape
        self._packed = None

    def summary(self) -> str:
        return "int8 (dynamic activations)"


def _int8_codes_of(layer: QuantLinear) -> Any:
    fq = layer.weight_quant
    if layer.input_quant is not None:
        raise UnsupportedOpError("int8_dynamic converts weight-only QuantLinear layers (activations are "
                                 "quantized at run time); this one has a static input quantizer: quantize "
                                 "with activation: null, or export it with export_qdq_onnx")
    ok = (fq is not None and isinstance(fq.fmt, IntFormat) and fq.fmt.bits == 8 and fq.fmt.signed
          and fq.fmt.symmetric and isinstance(fq.granularity, PerChannel) and fq.granularity.axis == 0)
    codes = weight_codes(layer) if ok else None
    if codes is None or (codes.zero_point is not None and bool((codes.zero_point != 0).any())):
        raise UnsupportedOpError(f"int8_dynamic keeps QuantLinear codes only for 8-bit signed symmetric per-channel "
                                 f"weights, got {None if fq is None else fq.fmt} "
                                 f"{None if fq is None else fq.granularity}; requantize with that spec or "
                                 "convert the float model")
    return codes


# ------------------------------------------------------------------------------------ the transform

@dataclasses.dataclass(frozen=True)
class Int8DynamicConfig(Config):
    """Convert Linear layers to `Int8DynamicLinear` (int8 per-channel weights, dynamic int8 activations).

    kernel: "fbgemm" (fast; per-tensor uint8 activations chosen by fbgemm at run time) or "int_mm"
            (per-row symmetric int8 activations, `torch._int_mm`; more accurate, slower on CPU).
    reduce_range: fbgemm only: True 7-bit activations, False 8-bit, None (default) decided on the
            machine that runs the layer: 8-bit activations against weight codes packed at half resolution
            where fbgemm saturates int16 pair sums (x86 without AVX512-VNNI, `fbgemm_saturates()`), 8-bit
            codes elsewhere; kept as None in saved checkpoints.
    Choose the layers with `targets`.
    """

    kernel: Kernel = "fbgemm"
    reduce_range: bool | None = None

    def __post_init__(self) -> None:
        check(self.kernel in ("fbgemm", "int_mm"), "kernel", f"must be 'fbgemm' or 'int_mm', got {self.kernel!r}")
        check(not (self.reduce_range and self.kernel == "int_mm"), "reduce_range",
              "applies to kernel 'fbgemm' only (int_mm uses symmetric int8 rows); drop it")


def _check_kernel(config: Int8DynamicConfig) -> None:
    engines = torch.backends.quantized.supported_engines
    if config.kernel == "fbgemm" and not {"fbgemm", "x86"} & set(engines):
        raise UnsupportedOpError(f"int8_dynamic: this torch build has no fbgemm/x86 quantized engine "
                                 f"(engines: {engines}); use kernel: int_mm")


@layer_transform("int8_dynamic", config=Int8DynamicConfig, layers=(nn.Linear, QuantLinear), on_wrapped="merge",
                 what="Linear")
def _int8_dynamic(model: nn.Module, config: Int8DynamicConfig, ctx: Context, sites: list[Site]) -> nn.Module:
    """Int8 weights and dynamically quantized activations for every targeted Linear (eval mode only)."""
    _check_kernel(config)
    for site in sites:
        site.replace(Int8DynamicLinear.from_linear(site.layer, kernel=config.kernel,
                                                   reduce_range=config.reduce_range))
    ctx.record["layers"] = [s.name for s in sites]
    ctx.log(f"int8_dynamic: {len(sites)} Linear layers converted")
    return sites[0].model.eval()
