"""GPTQ (Frantar et al., 2022): weight-only quantization that corrects each rounding error with the
not-yet-quantized weights of the same row, using the inverse Hessian H = 2 X X^T / n of the layer's
inputs on calibration data.

    cfg = GPTQConfig(weight=QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=64)))
    model = nncompress.apply(model, cfg, context=nncompress.Context(data=data))

As a recipe stage: `{kind: gptq, weight: {format: {kind: int, bits: 4}, granularity: {kind: per_group,
size: 64}}, calib_batches: 8}`.

The result is the same `QuantLinear` / `QuantConv` wrapper PTQ leaves, whose base weight already lies
on the grid (fake-quantizing it again with the recorded scales is the identity), so `merge()` and
save / load behave as for PTQ. Replay rebuilds the wrappers and scales; the corrected weights come
from the checkpoint. Per-channel scales are fitted before the sweep; per-group scales when the sweep
reaches the group, from the error-corrected weights (as the reference code does), or before the
sweep with `act_order` ("static groups"). Conv1d/Conv2d inputs are unfolded into patches; grouped and
3-D convolutions fall back to round to nearest.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn
from torch import Tensor

from ..core import Config, ConfigError, Context, Site, check, get_module, layer_transform, lookup
from ..core.objectives import require_data
from ..core.calibration import BlockInputs, block_chain, calibrate, patch_rows, sequential_blocks
from ..core.errors import DataError
from ..formats import IntFormat, PerChannel, PerGroup, PerTensor
from .fake_quant import QuantSpec, QuantWrapper, qparams, quantize_values, wrap  # noqa: F401 (doctest)
from .ptq import QUANT_LAYERS, float_layer, quant_sites

__all__ = ["GPTQConfig", "gptq_quantize", "layer_inputs"]


@dataclasses.dataclass(frozen=True)
class GPTQConfig(Config):
    """GPTQ options.

    weight:        an integer spec; per tensor, per output channel, or per group along the fan-in
    calib_batches: calibration batches that estimate each layer's Hessian
    damp:          dampening, as a fraction of the mean diagonal of H, added to its diagonal
    block_size:    columns updated together (lazy batch updates; a multiple of the group size)
    act_order:     quantize columns by decreasing diag(H) (with static group scales)
    sequential:    collect each layer's inputs with the layers before it already quantized: in a layer
                   stack (a transformer's blocks) block by block, one calibration pass per block on the
                   cached outputs of the quantized blocks before it; elsewhere layer by layer
    """

    weight: QuantSpec = QuantSpec(format=IntFormat(bits=4))
    calib_batches: int = 8
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    sequential: bool = True

    def __post_init__(self) -> None:
        w = self.weight
        check(isinstance(w.format, IntFormat), "weight.format", "GPTQ quantizes onto an integer grid; use {kind: int}")
        check(w.method == "rtn", "weight.method", "GPTQ computes the weights itself; use method rtn")
        g = w.granularity
        check(g is None or isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis == 0)
              or (isinstance(g, PerGroup) and g.axis in (1, -1)), "weight.granularity",
              "GPTQ takes per_tensor, per_channel (axis 0) or per_group along the fan-in (axis 1)")
        check(self.calib_batches >= 1, "calib_batches", f"must be >= 1, got {self.calib_batches}")
        check(self.damp > 0, "damp", f"must be > 0, got {self.damp}")
        check(self.block_size >= 1, "block_size", f"must be >= 1, got {self.block_size}")


# ------------------------------------------------------------------------------------ inputs -> H

layer_inputs = patch_rows  # the rows a layer's weight multiplies (conv inputs unfolded into patches)


def _gptq_capable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (type(layer) in (nn.Conv1d, nn.Conv2d) and layer.groups == 1)


def _hessians(model: nn.Module, names: list[str], loader, batches: int, device) -> dict[str, Tensor]:
    """H = 2 X^T X / n (float64) per layer (conv inputs unfolded into patches), from one pass over
    `batches` calibration batches that stops after the last of `names`."""
    found = calibrate(model, loader, {n: ("patch_gram",) for n in names}, batches=batches, device=device)
    missing = sorted(set(names) - set(found))
    if missing:
        raise DataError(f"gptq: layer {missing[0]!r} saw no calibration input; exclude it with "
                        f"targets.exclude: [{missing[0]!r}]")
    return {n: st.hessian() for n, st in found.items()}


# ------------------------------------------------------------------------------------ the sweep

def _fit(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) per row of `w` (O, G) from the spec's observer: (O, 1) each."""
    fn = lookup(spec.observer, "observer")
    g = PerTensor() if isinstance(spec.granularity, PerTensor) else PerChannel(0)
    state = fn(None, g, spec.format, fn(w.float(), g, spec.format, None, **spec.observer_args),
               **spec.observer_args)
    scale, zp = qparams(state["lo"], state["hi"], spec.format)
    return scale.expand(w.shape[0], 1), zp.expand(w.shape[0], 1)


def _inverse_hessian(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (C, C), computed in float64."""
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(len(h), dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@contextlib.contextmanager
def _one_thread():
    """Run on one thread, restoring the count after. The sweep is thousands of small ops; with two or
    more OpenMP threads on a busy machine each waits for a descheduled worker (measured on 2 loaded
    cores, 384 x 1536: 1 to 12 s on two threads, 0.45 s on one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _sweep_block(W1: Tensor, hinv1: Tensor, cols: list[int], group: int, lazy: bool, spec: QuantSpec,
                 scales: Tensor, zps: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize the block W1 (O, B) column by column, passing each column's error on to the columns
    after it inside the block. `cols[i]` is the original index of column i (for its group).
    Returns (Q1, E1), both (O, B): the quantized columns and the scaled errors for the lazy update."""
    fmt = spec.format
    Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)
    s = z = None
    for i, col in enumerate(cols):
        gi = col // group
        if lazy and col % group == 0:  # group scales from the error-corrected weights, once per group
            scales[:, gi:gi + 1], zps[:, gi:gi + 1] = _fit(W1[:, i:i + group], spec)
        if i == 0 or gi != cols[i - 1] // group or (lazy and col % group == 0):
            s, z = scales[:, gi].to(W1.dtype), zps[:, gi].to(W1.dtype)                # (O,)
        w = W1[:, i]                                                                 # (O,)
        q = ((torch.round(w / s) + z).clamp_(fmt.qmin, fmt.qmax) - z) * s           # fake_quantize, inline
        Q1[:, i] = q
        err = (w - q) / hinv1[i, i]                                                  # (O,)
        W1[:, i + 1:].addr_(err, hinv1[i, i + 1:], alpha=-1)
        E1[:, i] = err
    return Q1, E1


def gptq_quantize(w: Tensor, h: Tensor, spec: QuantSpec, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ on a weight (O, C) with Hessian `h` (C, C). Returns (Q (O, C) on the grid, in w's dtype,
    scale and zero point in the compact layout of the spec's granularity).

    The inverse Hessian is factored in float64; the sweep runs in float32 in blocks of `block_size`
    columns (the paper's lazy batch update: inside a block, rank-1 updates; after it, one matmul).

    With a diagonal H no error can be passed on, so GPTQ is round to nearest:

    >>> w = torch.randn(4, 8)
    >>> q, s, _ = gptq_quantize(w, torch.eye(8), QuantSpec(format=IntFormat(bits=3)))
    >>> torch.equal(q, quantize_values(w, IntFormat(bits=3), s, 0))
    True
    """
    with _one_thread():
        return _gptq(w, h, spec.resolved("weight"), damp, block_size, act_order)


def _gptq(w: Tensor, h: Tensor, spec: QuantSpec, damp: float, block_size: int, act_order: bool
          ) -> tuple[Tensor, Tensor, Tensor]:
    gran = spec.granularity
    O, C = w.shape
    group = gran.size if isinstance(gran, PerGroup) else C
    if C % group:
        raise ConfigError("weight.granularity.size", f"group size {group} does not divide the fan-in {C}")
    W, H = w.detach().float().clone(), h.double().clone()                   # (O, C), (C, C)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(C)
    lazy = isinstance(gran, PerGroup) and not act_order
    n_groups = C // group
    scales = torch.zeros(O, n_groups)
    zps = torch.zeros(O, n_groups, dtype=torch.int32)
    if not lazy:  # scales fitted before the sweep
        for gi in range(n_groups):
            scales[:, gi:gi + 1], zps[:, gi:gi + 1] = _fit(W[:, gi * group:(gi + 1) * group], spec)
    W = W[:, perm]
    hinv = _inverse_hessian(H[perm][:, perm], damp).float()                  # (C, C) upper
    block = max(block_size // group, 1) * group if lazy else block_size      # groups never straddle blocks
    order = perm.tolist()
    Q = torch.zeros_like(W)
    for i1 in range(0, C, block):
        i2 = min(i1 + block, C)
        Q[:, i1:i2], E1 = _sweep_block(W[:, i1:i2].clone(), hinv[i1:i2, i1:i2], order[i1:i2], group, lazy,
                                       spec, scales, zps)
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]                                   # (O, B) @ (B, C - i2)
    Q = Q[:, torch.argsort(perm)].to(w.dtype)
    if isinstance(gran, PerTensor):
        return Q, scales[:1, :1], zps[:1, :1]                                # (1, 1)
    return Q, scales, zps                                                    # (O, 1) or (O, C / group)


# ------------------------------------------------------------------------------------ the transform

def _quantize_layer(layer: nn.Module, h: Tensor | None, config: GPTQConfig) -> QuantWrapper:
    wrapper = wrap(layer, config.weight)                                     # RTN scales; replaced below
    if h is None:
        return wrapper
    w = layer.weight
    q, scale, zp = gptq_quantize(w.flatten(1), h, config.weight, config.damp, config.block_size, config.act_order)
    with torch.no_grad():
        layer.weight.copy_(q.reshape(w.shape))
    wrapper.weight_quant.set_qparams(scale.to(w.device), zp.to(w.device))
    return wrapper


@layer_transform("gptq", config=GPTQConfig, layers=QUANT_LAYERS, on_wrapped="merge", what="Linear/Conv")
def _gptq_transform(model: nn.Module, config: GPTQConfig, ctx: Context, sites: list[Site]) -> nn.Module:
    """GPTQ weight quantization with calibration data (error-corrected rounding, layer by layer)."""
    require_data(ctx, "gptq", "calibration data")
    model.eval()
    sites = quant_sites(sites, ctx.targets, "gptq")
    layers = {s.name: float_layer(s.layer) for s in sites}
    for s in sites:  # the float layers go in first: the Hessians are those of the float model's inputs
        if layers[s.name] is not get_module(model, s.name):
            s.replace(layers[s.name])
    model = sites[0].model
    capable = {n: m for n, m in layers.items() if _gptq_capable(m)}
    done: set[str] = set()

    def quantize(site: Site, h: Tensor | None) -> None:
        try:
            wrapper = _quantize_layer(layers[site.name], h, config)
        except ConfigError as e:
            path = e.path if e.path.startswith("weight") else f"weight.granularity.{e.path}"
            raise ConfigError(path, f"layer {site.name!r}: {e.message}; or exclude it with "
                                    f"targets.exclude: [{site.name!r}]") from None
        site.replace(wrapper)
        done.add(site.name)

    def block_step(block_name: str, block: nn.Module, inputs: BlockInputs) -> None:
        """The block's layers group by group (those reading one tensor together, as q, k and v), each
        group's Hessian from the block's cached inputs run through the groups already quantized."""
        inside = {s.name[len(block_name) + 1:]: s for s in sites if s.name.startswith(block_name + ".")}
        pending = {r for r, s in inside.items() if s.name in capable}
        for r in set(inside) - pending:
            quantize(inside[r], None)
        while pending:
            found = inputs.stats(block, {r: ("patch_gram",) for r in pending}, first_group=True)
            if not found:
                name = inside[min(pending)].name
                raise DataError(f"gptq: layer {name!r} saw no calibration input; exclude it with "
                                f"targets.exclude: [{name!r}]")
            for r, st in found.items():
                quantize(inside[r], st.hessian())
                pending.discard(r)

    blocks = block_chain(model, list(capable), ctx.data.calib, ctx.device) if config.sequential else []
    if blocks:  # a layer stack: one calibration pass per block, on the outputs of the quantized blocks before
        sequential_blocks(model, blocks, ctx.data.calib, config.calib_batches, block_step, ctx.device)
    rest = [s for s in sites if s.name not in done]  # no stack, or layers outside it (a head, embeddings)
    hs: dict[str, Tensor] = {}
    if not config.sequential:
        hs = _hessians(model, [s.name for s in rest if s.name in capable], ctx.data.calib, config.calib_batches,
                       ctx.device)
    for site in rest:
        if config.sequential and site.name in capable:
            hs[site.name] = _hessians(model, [site.name], ctx.data.calib, config.calib_batches, ctx.device)[site.name]
        quantize(site, hs.pop(site.name, None))
    ctx.record["rtn"] = [n for n in layers if n not in capable]
    if blocks:
        ctx.record["blocks"] = len(blocks)
    return sites[0].model.eval()
