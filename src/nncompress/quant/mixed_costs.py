"""What each layer costs in each candidate format, for `mixed_precision`: its sensitivity (the damage)
and what it spends of a budget (bytes on disk, bit operations, latency).

Sensitivity is the relative output distortion `sum ||y - y_ref||^2 / sum ||y_ref||^2` over the
calibration batches when only that layer takes that format (for L2-normalised embeddings this is
`2 (1 - cosine)`, so a cosine target is a distortion budget):

- "distortion" measures it: the layer is swapped for its quantized wrapper (inputs calibrated when
  the format quantizes them) and the model is run (HAWQ's question, answered by measurement).
- "fisher" predicts it without running a quantized model: `sum F * (q(w) - w)^2`, with F the diagonal
  of the output Fisher (Gauss-Newton) `sum_n J_n^T J_n`, estimated from squared gradients of
  `<y, v>` with random +-1 probes v (E[v v^T] = I, so E[g^2] is exactly that diagonal); HAWQ-style
  trace-times-noise, per weight. It sees weight noise only: formats that quantize inputs need
  "distortion".

Both are additive over layers to first order (independent noise sources add their powers), which is
what lets the solver sum them.

>>> import torch.nn as nn
>>> from nncompress.formats import IntFormat
>>> from .fake_quant import QuantSpec
>>> bops_per_layer(nn.Linear(64, 32), (2, 32), QuantSpec(format=IntFormat(bits=4)), None)  # 2 x 32 x 64 MACs x 4 x 32
524288
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..core import ConfigError, set_module
from ..core.calibration import feed, first_tensor, gradient_sums, take
from .fake_quant import QuantSpec, QuantWrapper, wrap
from .gptq import GPTQConfig, _gptq_capable, _hessians, _quantize_layer
from .ptq import calibrate

__all__ = ["fit_wrapper", "fit_gptq", "layer_hessians", "output_distortion", "fisher_distortion", "bops_per_layer", "bits_of"]


def fit_wrapper(layer: nn.Module, weight: QuantSpec | None, activation: QuantSpec | None) -> QuantWrapper | str:
    """`layer` wrapped in the format (weight scales fitted), or why the format does not fit it."""
    if type(layer) is nn.Embedding and activation is not None:
        activation = None  # an embedding reads token ids: its input is never quantized
    try:
        return wrap(layer, weight, activation).eval()
    except (ConfigError, RuntimeError) as e:
        return str(e)


def layer_hessians(model: nn.Module, names: Sequence[str], loader: Any, batches: int, device: Any = None
                   ) -> dict[str, Tensor]:
    """GPTQ's input Hessian of each named layer that GPTQ can take, from one calibration pass over the
    model as it is (every candidate of a layer is fitted on the same float inputs)."""
    capable = [n for n in names if _gptq_capable(model.get_submodule(n))]
    return _hessians(model, capable, loader, batches, device) if capable else {}


def fit_gptq(layer: nn.Module, weight: QuantSpec, hessian: Tensor | None) -> QuantWrapper | str:
    """A copy of `layer` quantized by GPTQ with `hessian` (round to nearest where GPTQ cannot run: an
    embedding, a grouped convolution), or why the format does not fit it."""
    try:
        return _quantize_layer(copy.deepcopy(layer), hessian, GPTQConfig(weight=weight)).eval()
    except (ConfigError, RuntimeError) as e:
        return str(e)


def _outputs(model: nn.Module, loader: Any, batches: int, device: Any) -> list[Tensor]:
    with torch.no_grad():
        return [first_tensor(feed(model, b, device)).detach().float() for b in take(loader, batches)]


def _distortion(model: nn.Module, loader: Any, batches: int, device: Any, refs: list[Tensor], norm: float) -> float:
    err = 0.0
    with torch.no_grad():
        for ref, b in zip(refs, take(loader, batches)):
            err += float((first_tensor(feed(model, b, device)).float() - ref).pow(2).sum())
    return err / norm


def output_distortion(model: nn.Module, names: Sequence[str], options: list[list[QuantWrapper | None]],
                      loader: Any, batches: int, device: Any = None) -> np.ndarray:
    """(L, C) relative output distortion with only layer l in format c (`options[l][c]`; None: the
    layer as it is, distortion 0). The model is left as it was."""
    refs = _outputs(model, loader, batches, device)
    norm = max(sum(float(r.pow(2).sum()) for r in refs), 1e-30)
    out = np.zeros((len(names), len(options[0])))
    for i, name in enumerate(names):
        original = model.get_submodule(name)
        for j, w in enumerate(options[i]):
            if w is None:
                continue
            model = set_module(model, name, w)
            try:
                if w.input_quant is not None:
                    calibrate(model, loader, batches, device)
                out[i, j] = _distortion(model, loader, batches, device, refs, norm)
            finally:
                model = set_module(model, name, original)
    return out


def fisher_distortion(model: nn.Module, names: Sequence[str], options: list[list[QuantWrapper | None]],
                      loader: Any, batches: int, device: Any = None, seed: int = 0) -> np.ndarray:
    """(L, C) predicted relative output distortion `sum F (q(w) - w)^2 / sum ||y||^2` (module doc)."""
    for i, row in enumerate(options):
        for w in row:
            if w is not None and w.input_quant is not None:
                raise ConfigError("sensitivity", f"fisher predicts weight noise only; a candidate that quantizes "
                                  f"inputs ({names[i]!r}) needs sensitivity: distortion")
    gen = torch.Generator().manual_seed(seed)
    norm = [0.0]

    def probe_loss(m: nn.Module, batch: Any) -> Tensor:
        y = first_tensor(feed(m, batch, device)).float()
        norm[0] += float(y.detach().pow(2).sum())
        v = torch.randint(0, 2, y.shape, generator=gen).to(y) * 2 - 1     # Rademacher: E[v v^T] = I
        return (y * v).sum()

    weights = {n: model.get_submodule(n).weight for n in names}
    frozen = [p for p in weights.values() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        _, sq = gradient_sums(model, loader, probe_loss, batches, params=weights, squares=True)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    out = np.zeros((len(names), len(options[0])))
    with torch.no_grad():
        for i, name in enumerate(names):
            fisher = sq.get(name)
            for j, w in enumerate(options[i]):
                if w is None or fisher is None:
                    continue
                noise = (w.quantized_weight() - weights[name]).double().pow(2)  # to the float weight (GPTQ moves base)
                out[i, j] = float((fisher.double() * noise).sum()) / max(norm[0], 1e-30)
    return out


def bits_of(spec: QuantSpec | None, shape: tuple[int, int] | None = None) -> float:
    """Bits per element of a spec's format (32 for float): an integer's width, else the format's
    `bit_cost` on `shape` (block formats amortise their shared exponents)."""
    if spec is None:
        return 32.0
    bits = getattr(spec.format, "bits", None)
    if isinstance(bits, int):
        return float(bits)
    spec = spec.resolved("weight")
    return float(spec.format.bit_cost(shape or (1, 32), spec.granularity))


def bops_per_layer(layer: nn.Module, out_shape: tuple[int, ...], weight: QuantSpec | None,
                   activation: QuantSpec | None) -> int:
    """Bit operations of one forward of `layer` (the batch of `out_shape`): MACs x weight bits x input
    bits (BOPs, as HAQ and Baskin et al. count them; an embedding is a lookup: 0 MACs)."""
    if type(layer) is nn.Embedding:
        return 0
    w = layer.weight                                     # (O, I/groups, k...) or (O, I)
    fan_in = w[0].numel() if w.dim() > 2 else w.shape[1]  # every output element reads one filter / row
    macs = int(np.prod(out_shape)) * fan_in
    return int(macs * bits_of(weight, tuple(w.flatten(1).shape)) * bits_of(activation))
