"""Observers: from the values a tensor takes to the range its quantization grid should cover.

Every observer is a registered function in the "observer" namespace with one signature,

    fn(x, granularity, fmt, state=None, **options) -> state

where `state` is a dict of tensors. Passing the previous state back folds one more batch in (the
function never mutates its input), so one function serves a weight (one call) and a stream of
calibration batches alike. Calling it with `x=None` finishes: the returned state then holds `lo` and
`hi`, the range to map onto the grid, one pair per group of `granularity`, in the compact layout of
`formats.group_reduce`. (Cheap observers keep `lo`/`hi` current after every batch; the KL search runs
only when finishing.) `int_qparams(lo, hi, fmt)` (or `quant.fake_quant.qparams` for any format)
makes scales of the range; `observe` does the one-shot calls.

>>> x = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 3.0, -4.0]])
>>> lo, hi = observe("minmax", x, PerChannel(axis=0))
>>> lo.flatten().tolist(), hi.flatten().tolist()
([-1.0, -4.0], [2.0, 3.0])

Symmetric formats get symmetric clipping ranges from the clipping observers (percentile, mse, kl):
for them only max(|lo|, |hi|) matters, and those observers search over |x|.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..core import lookup, register
from ..formats import (Granularity, IntFormat, PerChannel, PerGroup, PerTensor, expand_scale,  # noqa: F401
                       fake_quantize, group_min_max, group_reduce, int_qparams, split_groups)

ObserverState = dict[str, Tensor]
Observer = Callable[..., ObserverState]

__all__ = ["ObserverState", "observe", "minmax_observer", "moving_average_minmax_observer", "percentile_observer",
           "mse_observer", "kl_observer", "kl_threshold", "is_symmetric", "grid_max", "group_values"]


def observe(name: str, x: Tensor, granularity: Granularity = PerTensor(), fmt: Any = IntFormat(),
            **options: Any) -> tuple[Tensor, Tensor]:
    """One-shot: the (lo, hi) the observer `name` gives for `x` alone.

    >>> lo, hi = observe("percentile", torch.arange(101.0), percentile=99.0)
    >>> lo.item(), hi.item()
    (-99.0, 99.0)
    """
    fn = lookup(name, "observer")
    state = fn(None, granularity, fmt, fn(x, granularity, fmt, None, **options), **options)
    return state["lo"], state["hi"]


# ------------------------------------------------------------------------------------------ helpers

def is_symmetric(fmt: Any) -> bool:
    """True when the grid is symmetric around 0 (every format but an asymmetric IntFormat)."""
    return not isinstance(fmt, IntFormat) or fmt.symmetric


def grid_max(fmt: Any) -> float:
    """The largest magnitude on the format's unscaled grid (qmax for integers)."""
    if isinstance(fmt, IntFormat):
        return float(fmt.qmax)
    return float(fmt.max)


def group_values(x: Tensor, granularity: Granularity) -> tuple[Tensor, tuple[int, ...]]:
    """`x` as (groups..., M): the reduced dims of `split_groups` moved last and flattened.

    Returns the flat view and the compact stat shape it must be reshaped to afterwards.
    """
    view, dims = split_groups(x, granularity)
    keep = [d for d in range(view.ndim) if d not in dims]
    flat = view.permute(*keep, *dims).reshape(*[view.shape[d] for d in keep], -1)   # (kept..., M)
    compact = [1 if d in dims else view.shape[d] for d in range(view.ndim)]
    if isinstance(granularity, PerGroup):
        del compact[dims[0]]
    return flat, tuple(compact)


def _quantile(flat: Tensor, q: float) -> Tensor:
    """Linear-interpolated quantile along the last dim (torch.quantile's rule, no size limit)."""
    s = flat.sort(dim=-1).values
    pos = q * (s.shape[-1] - 1)
    i = int(pos)
    j = min(i + 1, s.shape[-1] - 1)
    return s[..., i] + (pos - i) * (s[..., j] - s[..., i])


def _running_mean(new: ObserverState, state: ObserverState | None) -> ObserverState:
    """Average the per-batch ranges of clipping observers over the batches seen so far."""
    if not state:
        return {**new, "n": torch.ones(())}
    n = state["n"] + 1
    return {"lo": state["lo"] + (new["lo"] - state["lo"]) / n, "hi": state["hi"] + (new["hi"] - state["hi"]) / n,
            "n": n}


def _prep(x: Tensor) -> Tensor:
    return x.detach().float()


# ---------------------------------------------------------------------------------------- observers

@register("minmax", namespace="observer")
def minmax_observer(x: Tensor | None, granularity: Granularity, fmt: Any, state: ObserverState | None = None
                    ) -> ObserverState:
    """The running min and max: nothing is clipped.

    >>> s = minmax_observer(torch.tensor([1.0, -2.0]), PerTensor(), IntFormat())
    >>> s = minmax_observer(torch.tensor([3.0, 0.0]), PerTensor(), IntFormat(), s)
    >>> s["lo"].item(), s["hi"].item()
    (-2.0, 3.0)
    """
    if x is None:
        return dict(state)
    lo, hi = group_min_max(_prep(x), granularity)
    if state:
        lo, hi = torch.minimum(state["lo"], lo), torch.maximum(state["hi"], hi)
    return {"lo": lo, "hi": hi}


@register("moving_average_minmax", namespace="observer")
def moving_average_minmax_observer(x: Tensor | None, granularity: Granularity, fmt: Any,
                                   state: ObserverState | None = None, momentum: float = 0.01) -> ObserverState:
    """An exponential moving average of each batch's min and max (PyTorch's averaging_constant).

    range <- range + momentum * (batch range - range); the first batch sets it.

    >>> s = moving_average_minmax_observer(torch.tensor([0.0, 1.0]), PerTensor(), IntFormat(), momentum=0.5)
    >>> s = moving_average_minmax_observer(torch.tensor([0.0, 3.0]), PerTensor(), IntFormat(), s, momentum=0.5)
    >>> s["hi"].item()
    2.0
    """
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum}")
    if x is None:
        return dict(state)
    lo, hi = group_min_max(_prep(x), granularity)
    if state:
        lo = state["lo"] + momentum * (lo - state["lo"])
        hi = state["hi"] + momentum * (hi - state["hi"])
    return {"lo": lo, "hi": hi}


@register("percentile", namespace="observer")
def percentile_observer(x: Tensor | None, granularity: Granularity, fmt: Any, state: ObserverState | None = None,
                        percentile: float = 99.99) -> ObserverState:
    """Clip at a percentile: of |x| for symmetric grids, of x at both tails for asymmetric ones.

    Batches are combined by averaging their percentiles.

    >>> s = percentile_observer(torch.arange(-100.0, 1.0), PerTensor(), IntFormat(symmetric=False), percentile=99.0)
    >>> s["lo"].item(), s["hi"].item()
    (-99.0, -1.0)
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if x is None:
        return dict(state)
    flat, compact = group_values(_prep(x), granularity)
    q = percentile / 100.0
    if is_symmetric(fmt):
        hi = _quantile(flat.abs(), q).reshape(compact)
        lo = -hi
    else:
        lo, hi = _quantile(flat, 1.0 - q).reshape(compact), _quantile(flat, q).reshape(compact)
    return _running_mean({"lo": lo, "hi": hi}, state)


def _qdq(x: Tensor, lo: Tensor, hi: Tensor, fmt: Any, granularity: Granularity) -> Tensor:
    """x quantized onto the grid that maps [lo, hi] (compact layout) onto `fmt`."""
    if isinstance(fmt, IntFormat):
        scale, zp = int_qparams(lo, hi, fmt)
        return fake_quantize(x, expand_scale(scale, granularity, x.shape), expand_scale(zp, granularity, x.shape),
                             fmt)
    amax = torch.maximum(lo.abs(), hi.abs())
    scale = (amax / grid_max(fmt)).clamp_min(torch.finfo(torch.float32).eps)
    return fmt.quantize(x, expand_scale(scale, granularity, x.shape))


@register("mse", namespace="observer")
def mse_observer(x: Tensor | None, granularity: Granularity, fmt: Any, state: ObserverState | None = None,
                 num: int = 100, min_ratio: float = 0.01) -> ObserverState:
    """The clipping ratio r * (min, max), r on a grid of `num` values in [min_ratio, 1], that minimises
    the squared quantization error per group. Ties keep the widest range. Batches: ranges averaged.

    >>> x = torch.tensor([-1.0, 0.0, 1.0, 2.0])   # int2 codes {-2..1}: error 2(1-s)^2 + (2-s)^2, best s = 4/3
    >>> s = mse_observer(x, PerTensor(), IntFormat(bits=2))
    >>> round(s["hi"].item(), 4)                  # r = 0.67 on the grid: hi = r * 2 = s * qmax
    1.34
    """
    if num < 1 or not 0.0 < min_ratio <= 1.0:
        raise ValueError(f"mse observer needs num >= 1 and min_ratio in (0, 1], got {num}, {min_ratio}")
    if x is None:
        return dict(state)
    x = _prep(x)
    lo, hi = group_min_max(x, granularity)
    if is_symmetric(fmt):
        amax = torch.maximum(lo.abs(), hi.abs())
        lo, hi = -amax, amax
    best_err = best_r = None
    for k in range(num, 0, -1):  # from r = 1 down, so ties keep the wider range
        r = min_ratio + (1.0 - min_ratio) * (k - 1) / max(num - 1, 1)
        err = group_reduce((_qdq(x, r * lo, r * hi, fmt, granularity) - x).square(), granularity,
                           lambda v, d: v.sum(d, keepdim=True))
        if best_err is None:
            best_err, best_r = err, torch.full_like(err, r)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, r, best_r)
    return _running_mean({"lo": best_r * lo, "hi": best_r * hi}, state)


# ---------------------------------------------------------------------------------------- KL / entropy

def kl_threshold(hist: Tensor, levels: int, stride: int = 1) -> Tensor:
    """TensorRT's entropy calibration on histograms of |x| (groups, bins): the number of bins `i`
    (levels <= i <= bins) to keep, minimising KL(P || Q), where P is the first i bins with every
    outlier count added to bin i-1 and Q is those i bins (without outliers) merged into `levels`
    chunks and spread back evenly over each chunk's non-zero bins. Returns i per group (int64); the
    clipping threshold is i * bin_width. Ties keep the smaller i; a P > 0 = Q bin makes KL infinite.

    Each chunk's part of the sum is read off prefix sums of h and h log h, so a candidate costs
    O(levels), not O(bins).

    >>> kl_threshold(torch.ones(1, 16), levels=4).tolist()    # a flat histogram keeps everything
    [16]
    """
    hist = hist.double()
    g, bins = hist.shape
    if levels >= bins:
        return torch.full((g,), bins, dtype=torch.long)
    cands = torch.arange(levels, bins + 1, stride)
    if cands[-1] != bins:
        cands = torch.cat([cands, torch.tensor([bins])])
    zero = torch.zeros(g, 1, dtype=torch.float64)
    pos = hist > 0
    H = torch.cat([zero, hist.cumsum(-1)], -1)                                          # (G, bins + 1)
    HL = torch.cat([zero, torch.where(pos, hist * hist.clamp_min(1e-300).log(), 0.0).cumsum(-1)], -1)
    N = torch.cat([zero, pos.double().cumsum(-1)], -1)
    T = H[:, -1].clamp_min(1e-300)                                                      # (G,)
    c = torch.arange(levels)
    best_kl = torch.full((g,), float("inf"), dtype=torch.float64)
    best_i = torch.full((g,), bins, dtype=torch.long)
    rows = max(1, (1 << 20) // max(g * levels, 1))
    for start in range(0, len(cands), rows):
        ci = cands[start:start + rows]                                                  # (C,)
        lo = -((-c[None] * ci[:, None]) // levels)                                      # (C, L): ceil(c i / L)
        hi = -((-(c[None] + 1) * ci[:, None]) // levels)                                # chunk c: bins [lo, hi)
        def between(P: Tensor) -> Tensor:  # per-chunk sums from prefix sums P (G, bins + 1): (C, G, L)
            take = lambda i: P.index_select(1, i.flatten()).view(g, *i.shape)        # noqa: E731
            return (take(hi) - take(lo)).permute(1, 0, 2)

        S, A, n = between(H), between(HL), between(N)                                   # (C, G, L)
        Sq = H.index_select(1, ci).T                                                    # (C, G): mass kept
        q = S / (n * Sq[..., None])                                                     # Q of a non-zero bin
        logT = T.log()[None, :, None]
        term = torch.where(n > 0, (A - S * (logT + q.log())) / T[None, :, None], 0.0)
        kl = term.sum(-1)                                                               # (C, G)
        h_last, q_last = hist.index_select(1, ci - 1).T, q[..., -1]                     # bin i-1: chunk L-1
        old = torch.where(h_last > 0, h_last / T * (h_last.clamp_min(1e-300).log() - T.log() - q_last.log()), 0.0)
        p_last = (h_last + H[:, -1] - Sq) / T                                           # with the outliers
        new = torch.where(p_last > 0, torch.where(h_last > 0, p_last * (p_last.clamp_min(1e-300).log() - q_last.log()),
                                                  float("inf")), 0.0)
        kl = kl - old + new
        idx = kl.argmin(0)                                                              # first minimum
        val = kl.gather(0, idx[None])[0]
        better = val < best_kl
        best_kl = torch.where(better, val, best_kl)
        best_i = torch.where(better, ci[idx], best_i)
    return best_i


def _kl_levels(fmt: Any) -> int:
    """Quantization levels on the positive side that |x| is merged into."""
    if isinstance(fmt, IntFormat):
        return fmt.qmax + 1 if fmt.symmetric and fmt.signed else fmt.levels // (1 if not fmt.signed else 2)
    return 2 ** (fmt.bits - 1)


def _histogram(a: Tensor, rng: Tensor, bins: int) -> Tensor:
    """Histogram of non-negative values `a` (G, M) over [0, rng] per row: (G, bins)."""
    idx = (a / rng[:, None] * bins).long().clamp(0, bins - 1)
    ones = torch.ones_like(a, dtype=torch.float64)
    return torch.zeros(a.shape[0], bins, dtype=torch.float64).scatter_add_(1, idx, ones)


def _rebin(hist: Tensor, factor: Tensor) -> Tensor:
    """Merge each row's bins by its power-of-two `factor` (the range grew by `factor`)."""
    out = hist.clone()
    bins = hist.shape[1]
    for r in torch.nonzero(factor > 1).flatten().tolist():
        k = int(factor[r])
        merged = hist[r].view(-1, k).sum(-1) if k <= bins else hist[r].sum(-1, keepdim=True)
        out[r] = 0
        out[r, :merged.numel()] = merged
    return out


@register("kl", namespace="observer")
def kl_observer(x: Tensor | None, granularity: Granularity, fmt: Any, state: ObserverState | None = None,
                bins: int = 2048, stride: int = 1) -> ObserverState:
    """TensorRT-style entropy calibration: a histogram of |x| per group over all batches, clipped
    where KL(P || Q) between the float and the quantized distributions is smallest.

    The histogram range starts at the first batch's max |x| and doubles (merging bin pairs, which is
    exact) whenever a batch exceeds it; `bins` must be a power of two. The range is symmetric for
    symmetric grids; otherwise lo is the observed minimum clipped to -threshold.

    >>> x = torch.cat([torch.randn(100000, generator=torch.Generator().manual_seed(0)), torch.full((10,), 50.0)])
    >>> lo, hi = observe("kl", x, PerTensor(), IntFormat(bits=8))   # clips the 10 outliers, keeps the bulk
    >>> 3.0 < hi.item() < 5.0
    True

    Candidates start at `levels` bins (128 for int8), so the clip is never below 128/2048 of the
    range, and a candidate whose last kept bin is empty while outliers exist has an infinite KL:
    no smoothing is applied (TensorRT's description has none; MXNet's port adds some).
    """
    if bins < 2 or bins & (bins - 1):
        raise ValueError(f"bins must be a power of two >= 2, got {bins}")
    if x is None:  # finish: the threshold search, once over everything seen
        hist, rng, lo_obs, compact = state["hist"], state["range"], state["min"], tuple(state["shape"].tolist())
        thr = (kl_threshold(hist, _kl_levels(fmt), stride).double() * rng / bins).float()
        hi = thr.reshape(compact)
        lo = -hi if is_symmetric(fmt) else torch.maximum(lo_obs, -thr).reshape(compact)
        return {**state, "lo": lo, "hi": hi}
    x = _prep(x)
    flat, compact = group_values(x, granularity)
    a = flat.abs().reshape(-1, flat.shape[-1])                              # (G, M)
    amax = a.amax(-1)
    lo_obs = flat.amin(-1).reshape(-1)
    if not state:
        # a hair above the max: every value sits strictly inside a half-open bin, so doubling the
        # range later maps old bins onto new ones exactly
        rng = torch.where(amax > 0, amax, 1.0).double() * (1 + 2 ** -16)
        hist = _histogram(a, rng, bins)
    else:
        rng, hist, lo_obs = state["range"], state["hist"], torch.minimum(state["min"], lo_obs)
        factor = torch.ones_like(rng)
        while bool((amax >= rng * factor).any()):
            factor = torch.where(amax >= rng * factor, factor * 2, factor)
        hist = _rebin(hist, factor) + _histogram(a, rng * factor, bins)
        rng = rng * factor
    return {"hist": hist, "range": rng, "min": lo_obs, "shape": torch.tensor(compact)}
