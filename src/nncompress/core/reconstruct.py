"""Reconstruction after compression: re-fit layers so the compressed model reproduces a reference.

After channels, heads or neurons are removed, the layers that read them (the consumers) see fewer
inputs. `refit_to_reference` re-fits each named Linear / convolution, in turn, by damped least
squares so that on the calibration data its output in the compressed model matches the output of the
layer of the same name in the reference (the model before the edit), restricted to the output
channels the layer keeps:

    [W b] = argmin sum_rows || [x 1] [W b]^T - y ||^2 + damp * mean(diag X^T X) * ||W - W_now||^2

with x the layer's input rows in the compressed model (tokens, pixels, or a convolution's unfolded
patches; padding tokens left out) and y the reference's output rows on the same batch. Layers are
refitted in the order given (forward order), each on the inputs the already refitted layers before
it produce, so errors do not pile up (block k sees the compressed blocks before it). The sums are
accumulated in float64 by `regression_stats`, one batch at a time; memory is one layer's Gram.

`recalibrate_norms` re-estimates BatchNorm running statistics on calibration data (cumulative
average over the batches), for CNNs whose channel statistics moved.

>>> import torch, torch.nn as nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<...>
>>> ref = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
>>> small = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
>>> with torch.no_grad():  # the first 12 hidden units kept, the last layer cut to read them
...     _ = small[0].weight.copy_(ref[0].weight[:12]), small[0].bias.copy_(ref[0].bias[:12])
...     _ = small[2].weight.copy_(ref[2].weight[:, :12]), small[2].bias.copy_(ref[2].bias)
>>> data = [(torch.randn(64, 8), None) for _ in range(4)]
>>> err = refit_to_reference(small, ref, ["2"], data, batches=4)
>>> err["2"]["after"] < err["2"]["before"]
True
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .errors import DataError
from .feeding import batch_inputs, evaluating, feed, take
from .hooks import capturing, output_of
from .objectives import require_data

__all__ = ["regression_stats", "refit_to_reference", "recalibrate_norms", "refittable", "reconstruction_on"]

_CONVS = (nn.Conv1d, nn.Conv2d)
DAMP = 0.1  # measured: MiniLM FFN 50% out-of-domain cosine 0.80 at 0.01, 0.84 at 0.1; the CNN within 0.2 pt


def reconstruction_on(mode: str, ctx: Any, field: str) -> bool:
    """Whether a technique's `reconstruct` option (auto / none / a method) refits: "auto" when the
    context has calibration data, a named method always (a ConfigError on `field` without data)."""
    if mode == "none":
        return False
    if mode != "auto":
        require_data(ctx, field, "calibration data")
    return ctx.data is not None and getattr(ctx.data, "calib", None) is not None


def refittable(module: nn.Module) -> bool:
    """A plain Linear, Conv1d or Conv2d (grouped too: one solve per group): what a least-squares refit can solve."""
    return type(module) is nn.Linear or (type(module) in _CONVS and not isinstance(module.padding, str))


def _rows_in(module: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    from .calibration import patch_rows

    if type(module) in _CONVS:
        return patch_rows(module, x)                                     # (N * L, C * k)
    return _token_rows(x, mask)


def _rows_out(module: nn.Module, y: Tensor, mask: Tensor | None) -> Tensor:
    if type(module) in _CONVS:
        return y.movedim(1, -1).reshape(-1, y.shape[1])                  # (N * L, O), the patches' order
    return _token_rows(y, mask)


def _token_rows(t: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None and t.dim() >= 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        t = t[mask.to(t.device).bool()]
    return t.reshape(-1, t.shape[-1])


def regression_stats(model: nn.Module, reference: nn.Module, name: str, loader: Iterable, batches: int,
                     device: Any = None, outputs: Sequence[int] | None = None, source: str | None = None
                     ) -> tuple[Tensor, Tensor, float, int]:
    """`(H, C, yy, rows)` for module `name`: H = A^T A and C = A^T Y (float64), A = [input rows of
    `name` in `model`, 1], Y = output rows of module `source` (default: `name`) in `reference` on the
    same batches (columns `outputs`; None: all), yy = sum of Y^2. Each forward stops at the layer."""
    layer = model.get_submodule(name)
    source = name if source is None else source
    run = (lambda m, b: feed(m, b, device))
    h = c = None
    yy, rows = 0.0, 0
    with torch.no_grad(), evaluating(model), evaluating(reference):
        for batch in take(loader, batches):
            inputs = batch_inputs(batch)
            mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            y = output_of(reference, source, batch, run)
            with capturing(model, [name], inputs=True) as got:
                output_of(model, name, batch, run)
            if y is None or name not in got:
                raise DataError(f"refit: layer {name!r} did not run on the calibration data; exclude it or "
                                "give calibration batches that reach it")
            a = _rows_in(layer, got[name], mask).double()
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], 1)
            t = _rows_out(layer, y, mask).double()
            if outputs is not None:
                t = t[:, list(outputs)]
            h = a.T @ a if h is None else h + a.T @ a
            c = a.T @ t if c is None else c + a.T @ t
            yy += float(t.pow(2).sum())
            rows += a.shape[0]
    if h is None:
        raise DataError("refit: the calibration loader yielded no batches; give the data a calib split")
    return h, c, yy, rows


def _solve(h: Tensor, c: Tensor, now: Tensor, bias: bool, damp: float) -> Tensor:
    """[W b]^T (I + 1, O) minimising the least squares plus `damp * mean(diag H) * ||W - W_now||^2`:
    pulled towards the layer's current weights, so directions the calibration rows barely visit keep
    what training put there (a pull towards zero would erase them). Without a bias, the ones column
    is left out (b = 0)."""
    n = h.shape[0] - 1
    if not bias:
        h, c, now = h[:n, :n], c[:n], now[:n]
    h = h.clone()
    idx = torch.arange(n)
    lam = damp * h[idx, idx].mean().clamp_min(1e-12)
    h[idx, idx] += lam
    c = c.clone()
    c[:n] += lam * now[:n]
    try:
        sol = torch.linalg.solve(h, c)
    except RuntimeError:  # singular even when damped (a dead input): the least-norm solution
        sol = torch.linalg.lstsq(h, c).solution
    return sol if bias else torch.cat([sol, torch.zeros(1, c.shape[1], dtype=sol.dtype)], 0)


def _groups(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1) if type(layer) in _CONVS else 1


def _blocks_to_full(wb: Tensor, groups: int) -> Tensor:
    """A grouped conv's [W b]^T ((I/G) k + 1, O) as the block-diagonal (I k + 1, O) one over every input
    column (group j's outputs read only group j's inputs)."""
    if groups == 1:
        return wb
    n, o = wb.shape[0] - 1, wb.shape[1]
    full = torch.zeros(n * groups + 1, o, dtype=wb.dtype)
    co = o // groups
    for j in range(groups):
        full[j * n:(j + 1) * n, j * co:(j + 1) * co] = wb[:n, j * co:(j + 1) * co]
    full[-1] = wb[-1]
    return full


def _full_to_blocks(full: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return full
    o = full.shape[1]
    n, co = (full.shape[0] - 1) // groups, o // groups
    out = torch.empty(n + 1, o, dtype=full.dtype)
    for j in range(groups):
        out[:n, j * co:(j + 1) * co] = full[j * n:(j + 1) * n, j * co:(j + 1) * co]
    out[-1] = full[-1]
    return out


def _solve_grouped(h: Tensor, c: Tensor, now: Tensor, bias: bool, damp: float, groups: int) -> Tensor:
    """`_solve` for each group's block (its inputs' rows and columns of H, the bias row, its outputs), assembled
    block-diagonal; one group is the plain solve."""
    if groups == 1:
        return _solve(h, c, now, bias, damp)
    n, o = (h.shape[0] - 1) // groups, c.shape[1]
    co = o // groups
    out = torch.zeros_like(now)
    for j in range(groups):
        rows = torch.cat([torch.arange(j * n, (j + 1) * n), torch.tensor([h.shape[0] - 1])])
        cols = slice(j * co, (j + 1) * co)
        sol = _solve(h[rows][:, rows], c[rows, cols], now[rows, cols], bias, damp)
        out[rows, cols] = sol
    return out


def _error(h: Tensor, c: Tensor, yy: float, wb: Tensor) -> float:
    """sum ||A wb - Y||^2 from the sums: wb^T H wb - 2 tr(wb^T C) + yy."""
    return float((wb * (h @ wb)).sum() - 2 * (wb * c).sum() + yy)


def refit_to_reference(model: nn.Module, reference: nn.Module, names: Sequence[str], loader: Iterable,
                       batches: int, device: Any = None, damp: float = DAMP,
                       outputs: Mapping[str, Sequence[int]] | None = None,
                       sources: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Refit each named layer of `model` (in the order given; a grouped conv group by group) by least squares to reproduce the
    reference's layer of the same name, or `sources[name]` (a factorized layer's last factor refit to
    the dense layer it stands for) (module doc). `outputs[name]`: which of the reference layer's
    output channels the layer keeps (None: the same count, in order). Returns per layer the relative
    output error before and after; a refit that would not lower it is not applied."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        layer = model.get_submodule(name)
        if not refittable(layer):
            continue
        keep = (outputs or {}).get(name)
        h, c, yy, _ = regression_stats(model, reference, name, loader, batches, device, keep,
                                       (sources or {}).get(name))
        w = layer.weight.detach().flatten(1).double().cpu()
        b = layer.bias.detach().double().cpu() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        now = _blocks_to_full(torch.cat([w.T, b[None]], 0), _groups(layer))
        if now.shape != c.shape:
            raise DataError(f"refit: {name} has {now.shape[1]} outputs x {now.shape[0] - 1} inputs but the reference "
                            f"gives {c.shape[1]} outputs; pass which outputs it keeps")
        before = _error(h, c, yy, now)
        wb = _solve_grouped(h, c, now, layer.bias is not None, damp, _groups(layer))
        after = _error(h, c, yy, wb)
        scale = max(yy, 1e-30)
        out[name] = {"before": before / scale, "after": min(after, before) / scale}
        if after < before:
            wb = _full_to_blocks(wb, _groups(layer))
            with torch.no_grad():
                layer.weight.copy_(wb[:-1].T.reshape(layer.weight.shape).to(layer.weight.dtype))
                if layer.bias is not None:
                    layer.bias.copy_(wb[-1].to(layer.bias.dtype))
    return out


def recalibrate_norms(model: nn.Module, loader: Iterable, batches: int, device: Any = None) -> int:
    """Re-estimate every BatchNorm's running mean / variance on `batches` calibration batches
    (cumulative average), the rest of the model in eval mode; returns how many norms were reset."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m, m.momentum) for m in norms]
    with torch.no_grad(), evaluating(model), contextlib.ExitStack() as stack:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None                                            # cumulative moving average
            m.train()
        stack.callback(lambda: [setattr(m, "momentum", mom) for m, mom in saved])
        for batch in take(loader, batches):
            feed(model, batch, device)
    return len(norms)                                                    # (the model's mode is restored)
