"""The `lowrank` transform: Linear layers by truncated SVD, convolutions by channel SVD, spatial SVD
or Tucker-2, with ranks from a fixed rank, an energy fraction or a parameter / MAC budget.

    from nncompress.lowrank import LowRankConfig
    model = nncompress.apply(model, LowRankConfig(keep_params=0.5),
                             targets=Targets(include=("*intermediate.dense", "*output.dense")))

As a recipe stage (fine-tune after it with a `finetune` stage, which distills on embedding data):

    - kind: lowrank
      method: tucker2        # convolutions only; Linear layers always use truncated SVD
      keep_params: 0.5       # keep half of the targeted layers' weights, allocated globally

`ctx.record["layers"]` holds `{name: {"method", "ranks", "energy_lost"}}` for every factorized layer;
the low-rank layers are recorded as layer swaps, and the factors load from the checkpoint. A
quantized (or clustered, int8) layer is factorized from its values and its factors come out quantized
(clustered, int8) the same way.

>>> import nncompress
>>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
>>> model = nncompress.apply(model, LowRankConfig(rank=4), targets=nncompress.Targets(include=("0",)))
>>> type(model[0]).__name__, model[0].rank, nncompress.history(model)[-1]["record"]["layers"]["0"]["ranks"]
('LowRankLinear', 4, [4])
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn

from ..core import Config, ConfigError, Context, Site, check, get_module, layer_transform
from ..core.objectives import require_data
from ..core.calibration import calibrate, io_shapes
from ..core.reconstruct import reconstruction_on, refit_to_reference
from .layers import CONV_TYPES, LowRankConv, LowRankLinear, full_ranks, weight_params
from .rank import allocate, energy_rank, ladder, round_rank
from .svd import mode_singular_values, residual_energy, singular_values, spatial_matrix, whitening

__all__ = ["LowRankConfig"]


@dataclasses.dataclass(frozen=True)
class LowRankConfig(Config):
    """Low-rank factorization of Linear and Conv layers. Give exactly one rank rule.

    method:      how convolutions are factorized: "svd" (kxk conv to r channels, then 1x1), "spatial"
                 (Conv2d: kh x 1 then 1 x kw) or "tucker2" (1x1, kxk core, 1x1). Linear layers always
                 use truncated SVD (the one factorization of a matrix).
    rank:        the same rank for every layer (tucker2: both channel ranks), capped at full rank
    energy:      per layer, the smallest rank keeping this fraction of sum(sigma^2)
    keep_params: keep this fraction of the targeted layers' weights, ranks allocated over all of them
    keep_macs:   the same with multiply-accumulates (needs an example input: data or model.input_shape)
    round_to:    ranks are rounded up to a multiple of this (GEMM kernels like multiples of 8)
    hooi_iters:  tucker2 only: alternating refinement sweeps after the HOSVD start
    whiten:      Linear layers only: minimise the error of the layer's outputs on calibration data
                 instead of its weights (factorize W L, L L^T = X^T X: SVD-LLM's whitening); needs data
    calib_batches: batches of the calibration loader used by `whiten` and by reconstruction
    reconstruct: "lstsq": after factorizing, the last factor of each chain is re-fit by least squares
                 so the chain reproduces the dense layer's outputs on the calibration data, layer by
                 layer in forward order (each on the inputs the already factorized layers before it
                 produce; `core.reconstruct`); "auto": when the context has calibration data; "none"
    Under rank and energy a layer is factorized only when that saves weights.
    """

    method: Literal["svd", "spatial", "tucker2"] = "svd"
    rank: int | None = None
    energy: float | None = None
    keep_params: float | None = None
    keep_macs: float | None = None
    round_to: int = 1
    hooi_iters: int = 0
    whiten: bool = False
    calib_batches: int = 8
    reconstruct: Literal["auto", "lstsq", "none"] = "auto"

    renamed: ClassVar[dict[str, str]] = {"param_ratio": "keep_params (the fraction kept, as in prune)",
                                         "mac_ratio": "keep_macs (the fraction kept, as in prune)"}

    def __post_init__(self):
        rules = [n for n in ("rank", "energy", "keep_params", "keep_macs") if getattr(self, n) is not None]
        check(len(rules) == 1, rules[1] if len(rules) > 1 else "rank",
              "give exactly one rank rule: rank, energy, keep_params or keep_macs; got "
              + (" and ".join(rules) if rules else "none"))
        check(self.rank is None or self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
        check(self.energy is None or 0.0 < self.energy <= 1.0, "energy", f"must be in (0, 1], got {self.energy}")
        for name in ("keep_params", "keep_macs"):
            v = getattr(self, name)
            check(v is None or 0.0 < v < 1.0, name, f"must be a fraction in (0, 1) to keep, got {v}")
        check(self.round_to >= 1, "round_to", f"must be >= 1, got {self.round_to}")
        check(self.calib_batches >= 1, "calib_batches", f"must be >= 1, got {self.calib_batches}")
        check(self.reconstruct in ("auto", "lstsq", "none"), "reconstruct",
              f"must be auto, lstsq or none, got {self.reconstruct!r}")
        check(self.hooi_iters >= 0, "hooi_iters", f"must be >= 0, got {self.hooi_iters}")
        check(self.hooi_iters == 0 or self.method == "tucker2", "hooi_iters",
              f"refines tucker2 only; set method: tucker2 or hooi_iters: 0 (method is {self.method!r})")


LAYERS = (nn.Linear, *CONV_TYPES)


def _factorizable(model: nn.Module, sites: list[Site]) -> list[Site]:
    """The sites that are not already factors of a low-rank layer."""
    out = [s for s in sites if not isinstance(get_module(model, s.name.rpartition(".")[0]), (LowRankLinear, LowRankConv))]
    if not out:
        raise ConfigError("targets", "no nn.Linear or Conv1d/2d/3d among the targeted modules (factors of low-rank "
                          "layers are not factorized again); widen targets (e.g. types: [Linear])")
    return out


def _method(m: nn.Module, config: LowRankConfig) -> str:
    return "linear" if isinstance(m, nn.Linear) else config.method


def _full(m: nn.Module, method: str) -> tuple[int, ...]:
    return (min(m.weight.shape),) if method == "linear" else full_ranks(m, method)


def _weights(m: nn.Module, method: str, ranks: tuple[int, ...]) -> int:
    if method == "linear":
        return ranks[0] * sum(m.weight.shape)  # r * (O + I)
    return weight_params(m, method, ranks)


def _spectra(m: nn.Module, method: str, chol: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    w = m.weight.detach()
    if chol is not None:  # the output error on the calibration data, not the weight error
        return (singular_values(w.double() @ chol.to(w.device)),)
    if method == "tucker2":
        return mode_singular_values(w)
    if method == "spatial":
        return (singular_values(spatial_matrix(w)),)
    return (singular_values(w.reshape(w.shape[0], -1)),)


def _error(spectra: tuple[torch.Tensor, ...], ranks: tuple[int, ...]) -> float:
    """Fraction of the weight's energy lost: exact for SVD; for Tucker-2 the mean of the two modes'."""
    return sum(residual_energy(s, r) for s, r in zip(spectra, ranks)) / len(ranks)


@layer_transform("lowrank", config=LowRankConfig, layers=LAYERS, on_wrapped="through", what="Linear/Conv")
def _lowrank(model: nn.Module, config: LowRankConfig, ctx: Context, sites: list[Site]) -> nn.Module:
    """Factorize the targeted Linear / Conv layers into low-rank chains (truncated SVD, spatial SVD, Tucker-2)."""
    sites = _factorizable(model, sites)
    skipped: dict[str, str] = {}
    chosen_sites = []
    linears = [s.name for s in sites if isinstance(s.layer, nn.Linear)]
    chols = _whitenings(model, linears, config, ctx) if config.whiten else {}
    for site in sites:
        name, m = site.name, site.layer
        method = _method(m, config)
        if method != "linear" and m.groups != 1:
            skipped[name] = f"grouped convolution (groups={m.groups}) is already cheap; not factorized"
            continue
        if method == "spatial" and not isinstance(m, nn.Conv2d):
            raise ConfigError("method", f"{name}: spatial SVD splits the kh x kw kernel of a Conv2d, this is a "
                              f"{type(m).__name__}; use method svd or tucker2, or exclude it from targets")
        chosen_sites.append((site, method, _spectra(m, method, chols.get(name))))
    chosen = _choose(model, [(s.name, s.layer, meth, sp) for s, meth, sp in chosen_sites], config, ctx, skipped)
    record: dict[str, Any] = {}
    before = after = 0
    reference = copy.deepcopy(sites[0].model) if chosen and reconstruction_on(config.reconstruct, ctx, "lowrank.reconstruct") else None
    for site, method, spectra in chosen_sites:
        name, m = site.name, site.layer
        dense = m.weight.numel()
        before += dense
        ranks = chosen.get(name)
        if ranks is None:
            after += dense
            continue
        new = (LowRankLinear.from_linear(m, ranks[0], chols.get(name)) if method == "linear"
               else LowRankConv.factorize(m, method, ranks, config.hooi_iters))
        site.replace(new)
        after += _weights(m, method, ranks)
        record[name] = {"method": method, "ranks": list(ranks), "energy_lost": round(_error(spectra, ranks), 6)}
    ctx.record.update({"layers": record, "skipped": skipped, "weights_before": before, "weights_after": after})
    if reference is not None:
        _reconstruct(sites[0].model, reference, list(record), config, ctx)
    return sites[0].model


def _reconstruct(model: nn.Module, reference: nn.Module, layers: list[str], config: LowRankConfig,
                 ctx: Context) -> None:
    """Refit each chain's last factor to the dense layer's outputs (forward order); the error of each
    chain before and after goes in the record."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    sources = {}
    for name in sorted(layers, key=order.__getitem__):
        last = list(get_module(model, name).named_children())[-1][0]
        sources[f"{name}.{last}"] = name
    errors = refit_to_reference(model, reference, list(sources), ctx.data.calib, config.calib_batches, ctx.device,
                                sources=sources)
    for factor, e in errors.items():
        ctx.record["layers"][sources[factor]].update(output_error_before=float(f"{e['before']:.4g}"),
                                                     output_error_after=float(f"{e['after']:.4g}"))


def _rank_path(full: tuple[int, ...], step: int) -> list[tuple[int, ...]]:
    """Ranks in increasing size; several modes grow in proportion to their full ranks."""
    top = max(full)
    path: list[tuple[int, ...]] = []
    for t in range(1, top + 1):
        ranks = tuple(round_rank(math.ceil(t * f / top), step, f) for f in full)
        if not path or ranks != path[-1]:
            path.append(ranks)
    return path


def _choose(model: nn.Module, sites: list, config: LowRankConfig, ctx: Context,
            skipped: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """The ranks of every layer to factorize (others stay dense, with the reason in `skipped`)."""
    if config.rank is not None or config.energy is not None:
        chosen = {}
        for name, m, method, spectra in sites:
            full = _full(m, method)
            if config.rank is not None:
                ranks = tuple(round_rank(min(config.rank, f), config.round_to, f) for f in full)
            else:
                ranks = tuple(round_rank(energy_rank(s, config.energy), config.round_to, f)
                              for s, f in zip(spectra, full))
            dense, low = m.weight.numel(), _weights(m, method, ranks)
            if low >= dense:
                skipped[name] = f"ranks {list(ranks)} save no weights ({low} factorized vs {dense} dense)"
            else:
                chosen[name] = ranks
        return chosen
    field = "keep_params" if config.keep_params is not None else "keep_macs"
    ratio = config.keep_params if config.keep_params is not None else config.keep_macs
    shapes = _io_shapes(model, [name for name, _, _, _ in sites], ctx) if field == "keep_macs" else {}
    ladders = []
    for name, m, method, spectra in sites:
        if field == "keep_params":
            cost = (lambda r, m=m, method=method: _weights(m, method, r))
            dense = m.weight.numel()
        else:
            cost = (lambda r, m=m, method=method, io=shapes[name]: _macs(m, method, r, io))
            dense = _dense_macs(m, shapes[name])
        path = _rank_path(_full(m, method), config.round_to)
        ladders.append(ladder(name, path, cost, lambda r, s=spectra: _error(s, r), dense))
    budget = ratio * sum(lad.dense_cost for lad in ladders)
    try:
        chosen, _ = allocate(ladders, budget)
    except ValueError as e:
        raise ConfigError(field, f"{e}: rank 1 everywhere already keeps more; raise {field} or target "
                          "larger layers") from None
    for name, ranks in chosen.items():
        if ranks is None:
            skipped[name] = "dense: the budget allows break-even rank or no rank saves cost"
    return {n: r for n, r in chosen.items() if r is not None}


def _whitenings(model: nn.Module, linears: list[str], config: LowRankConfig, ctx: Context
                ) -> dict[str, torch.Tensor]:
    """`{name: L}` with `L L^T` the Gram matrix of the layer's inputs over the calibration batches."""
    data = require_data(ctx, "whiten", "calibration data (or set whiten: false)")
    stats = calibrate(model, data.calib, {n: ("gram",) for n in linears}, batches=config.calib_batches,
                      device=ctx.device)
    return {n: whitening(stats[n].gram()) for n in linears if n in stats}


def _io_shapes(model: nn.Module, names: list[str], ctx: Context) -> dict[str, tuple]:
    """Input and output shapes of each module on one forward of an example batch."""
    if ctx.data is not None and hasattr(ctx.data, "example_batch"):
        inputs = ctx.data.example_batch(2)
    elif getattr(model, "input_shape", None) is not None:
        inputs = torch.zeros((1, *model.input_shape))
    else:
        raise ConfigError("keep_macs", "counting MACs needs an example input; pass Context(data=...) or set "
                          "model.input_shape to one sample's shape, or use keep_params")
    shapes = io_shapes(model, names, inputs)
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ConfigError("keep_macs", f"{len(missing)} targeted layer(s) did not run on the example input "
                          f"(e.g. {missing[0]!r}); exclude them from targets or use keep_params")
    return shapes


def _positions(shape: tuple) -> int:
    return math.prod(shape[2:]) * shape[0]


def _dense_macs(m: nn.Module, io: tuple) -> float:
    _, y = io
    if isinstance(m, nn.Linear):
        return m.weight.numel() * math.prod(y[:-1])
    return m.weight.numel() * _positions(y)


def _macs(m: nn.Module, method: str, ranks: tuple[int, ...], io: tuple) -> float:
    """MACs of the factorized layer on the recorded input / output shapes."""
    x, y = io
    if method == "linear":
        return _weights(m, method, ranks) * math.prod(y[:-1])
    o, c, *k = m.weight.shape
    if method == "svd":
        return _weights(m, method, ranks) * _positions(y)
    if method == "spatial":  # the vertical conv runs on output rows x input columns
        (r,) = ranks
        return r * c * k[0] * y[0] * y[2] * x[3] + o * r * k[1] * _positions(y)
    r_out, r_in = ranks
    return r_in * c * _positions(x) + (r_out * r_in * math.prod(k) + o * r_out) * _positions(y)
