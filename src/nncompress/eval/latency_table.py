"""Latency tables measured on the target: what each layer costs at a given width, and the whole model
predicted from its layers (HALP's lookup table, measured rather than modelled).

A table is built for one model, example input, runtime ("torch" on CPU or CUDA, "onnxruntime" on CPU),
thread count and batch. Every Linear / Conv is rebuilt alone at sampled widths (input and output
channels at multiples of `step`, the widths kernels care about, from the smallest to the full one)
and timed on an input of its real shape; between samples the latency is bilinear. The model's other
ops (norms, activations, adds, pooling) are measured once, as the full model minus its layers, and
scaled with the volume of the layers' outputs, which is what they read and write. Measurements are
cached on disk, keyed by the layer's shape, runtime, threads, device and machine, so a second table
for the same layers costs nothing.

Each layer's time is net of the cost of an empty call (an identity timed the same way). Layers timed
alone still do not add up to the model timed whole (caches, the framework's fixed cost per op), so a table is calibrated on whole-model measurements at other widths:
`fit([(widths, ms), ...])` sets `ms = a * layers + b * rest + c` by least squares (pulled towards
a = b = 1, c = 0 when the points are few). Its prediction error on a model it was not fitted on is
what a table's accuracy means.

    table = build_table(model, x, runtime="torch", threads=2)
    table.predict(model)              # ms per batch, from the layers' current widths
    table.layers["conv1"].at(32, 64)  # one layer at 32 input and 64 output channels

>>> import torch.nn as nn
>>> net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
>>> t = build_table(net, torch.randn(4, 32), threads=1, warmup=1, repeats=3, points=3)
>>> sorted(t.layers), t.layers["0"].ins, t.layers["0"].outs
(['0', '2'], [8, 24, 32], [8, 40, 64])
>>> t.predict(net) > 0
True
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from ..core import register
from ..core.calibration import io_shapes
from ..core.errors import ConfigError, DataError
from ..core.logs import quiet_loggers
from .latency import compare_latency, compare_onnx_latency, measure_latency, measure_onnx_latency

__all__ = ["LayerSpec", "LayerTable", "LatencyTable", "build_table", "table_layers", "machine_id"]

Runtime = Literal["torch", "onnxruntime"]
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What a layer's latency depends on besides its widths: its kind, full widths, geometry and the
    shape of its input (batch included; the channel entry is replaced by the width measured)."""

    kind: str
    in_ch: int
    out_ch: int
    geometry: tuple
    input_shape: tuple[int, ...]
    per_channel: int = 1          # output elements per output channel (batch x positions)

    @property
    def depthwise(self) -> bool:
        """One channel per group: the input and output widths move together."""
        groups = dict(self.geometry).get("groups", 1)
        return groups > 1 and groups == self.in_ch == self.out_ch

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def build(self, c_in: int, c_out: int) -> tuple[nn.Module, torch.Tensor]:
        """The layer at `c_in` -> `c_out` channels and a random input of its shape."""
        g = dict(self.geometry)
        shape = list(self.input_shape)
        if self.kind == "Linear":
            shape[-1] = c_in
            return nn.Linear(c_in, c_out, bias=g["bias"]), torch.randn(shape)
        shape[1] = c_in
        groups = c_in if self.depthwise else g.get("groups", 1)
        layer = getattr(nn, self.kind)(c_in, c_out, g["kernel_size"], stride=g["stride"], padding=g["padding"],
                                       dilation=g["dilation"], groups=groups, bias=g["bias"])
        return layer, torch.randn(shape)


def layer_spec(module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> LayerSpec | None:
    """The spec of a plain Linear / Conv, or None for a layer whose width a table cannot vary."""
    per_channel = max(math.prod(output_shape) // max(getattr(module, "out_features", 0) or
                                                     getattr(module, "out_channels", 1), 1), 1)
    if type(module) is nn.Linear:
        return LayerSpec("Linear", module.in_features, module.out_features,
                         (("bias", module.bias is not None),), tuple(input_shape), per_channel)
    if type(module) in _CONVS and not isinstance(module.padding, str):
        geometry = (("bias", module.bias is not None), ("dilation", tuple(module.dilation)),
                    ("groups", module.groups), ("kernel_size", tuple(module.kernel_size)),
                    ("padding", tuple(module.padding)), ("stride", tuple(module.stride)))
        spec = LayerSpec(type(module).__name__, module.in_channels, module.out_channels, geometry, tuple(input_shape),
                         per_channel)
        if module.groups == 1 or spec.depthwise:
            return spec
    return None


def widths(full: int, step: int, points: int) -> list[int]:
    """Sample widths: multiples of `step` spread from the smallest to `full` (always included).

    >>> widths(64, 8, 4), widths(6, 8, 4), widths(20, 8, 3)
    ([8, 24, 48, 64], [6], [8, 16, 20])
    """
    grid = list(range(step, full, step)) + [full]
    if len(grid) <= points:
        return grid
    picks = {round(i * (len(grid) - 1) / (points - 1)) for i in range(points)}
    return [grid[i] for i in sorted(picks)]


@dataclasses.dataclass
class LayerTable:
    """Measured latency (ms) of one layer on a grid of widths; bilinear in between, the nearest edge
    outside (a width below the smallest sample costs what the smallest does)."""

    spec: LayerSpec
    ins: list[int]
    outs: list[int]
    ms: list[list[float]]          # ms[i][j]: ins[i] input and outs[j] output channels

    def at(self, c_in: int, c_out: int) -> float:
        if self.spec.depthwise:
            c_in = c_out
        (i0, i1, ti), (j0, j1, tj) = _bracket(self.ins, c_in), _bracket(self.outs, c_out)
        top = self.ms[i0][j0] * (1 - tj) + self.ms[i0][j1] * tj
        bottom = self.ms[i1][j0] * (1 - tj) + self.ms[i1][j1] * tj
        return top * (1 - ti) + bottom * ti

    @property
    def full_ms(self) -> float:
        return self.at(self.spec.in_ch, self.spec.out_ch)


def _bracket(grid: list[int], x: float) -> tuple[int, int, float]:
    """Indices around `x` in the sorted `grid` and the interpolation weight of the upper one."""
    if x <= grid[0]:
        return 0, 0, 0.0
    if x >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    j = bisect.bisect_left(grid, x)
    lo, hi = grid[j - 1], grid[j]
    return j - 1, j, (x - lo) / (hi - lo)


@dataclasses.dataclass
class LatencyTable:
    """The layers' tables of one model on one target, plus the rest of the model (see the module doc).

    full_ms:   the whole model measured at full width
    rest_ms:   full_ms minus the layers' full-width latencies (ops that are no Linear / Conv)
    """

    runtime: str
    device: str
    threads: int
    batch: int
    machine: str
    layers: dict[str, LayerTable]
    full_ms: float
    rest_ms: float
    coef: tuple[float, float, float] = (1.0, 1.0, 0.0)
    points: list[tuple[dict[str, tuple[int, int]], float]] = dataclasses.field(default_factory=list)

    def widths_of(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """(input, output) widths of the table's layers as they are in `model` now."""
        out = {}
        for name in self.layers:
            m = model.get_submodule(name)
            w = getattr(m, "weight", None)
            if w is None:
                raise DataError(f"latency table: {name} holds no weight; the model changed since the table was built")
            out[name] = (w.shape[1] * getattr(m, "groups", 1), w.shape[0])
        return out

    def predict(self, model_or_widths: nn.Module | dict[str, tuple[int, int]]) -> float:
        """Predicted ms per batch at the given layer widths (or those of `model`)."""
        wid = self.widths_of(model_or_widths) if isinstance(model_or_widths, nn.Module) else model_or_widths
        a, b, c = self.coef
        layers, rest = self._terms(wid)
        return a * layers + b * rest + c

    def _terms(self, wid: dict[str, tuple[int, int]]) -> tuple[float, float]:
        layers = sum(t.at(*wid[n]) for n, t in self.layers.items())
        # the other ops read and write the layers' outputs: elements, not channels, are what they cost
        volume = (sum(wid[n][1] * t.spec.per_channel for n, t in self.layers.items())
                  / max(sum(t.spec.out_ch * t.spec.per_channel for t in self.layers.values()), 1))
        return layers, self.rest_ms * volume

    def fit(self, points: list[tuple[dict[str, tuple[int, int]] | nn.Module, float]], prior: float = 0.05) -> None:
        """Calibrate on whole-model measurements `[(widths or model, ms), ...]` (added to earlier ones;
        the full model at `full_ms` is always one). `prior` pulls towards a = b = 1, c = 0, weighted
        relative to the full model's latency, so one or two points only nudge the table."""
        import numpy as np
        from scipy.optimize import nnls

        self.points += [(self.widths_of(w) if isinstance(w, nn.Module) else dict(w), float(ms)) for w, ms in points]
        full = {n: (t.spec.in_ch, t.spec.out_ch) for n, t in self.layers.items()}
        rows, ys = [], []
        for wid, ms in [(full, self.full_ms)] + self.points:
            layers, rest = self._terms(wid)
            rows.append([layers, rest, 1.0])
            ys.append(ms)
        lam = prior * self.full_ms
        rows += [[lam, 0, 0], [0, lam, 0], [0, 0, prior]]
        ys += [lam, lam, 0.0]
        # non-negative: a layer or an op never makes the model faster, a fixed cost is never negative
        coef, _ = nnls(np.array(rows), np.array(ys))
        self.coef = tuple(float(v) for v in coef)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        for t in data["layers"].values():
            t["spec"]["geometry"] = [list(kv) for kv in t["spec"]["geometry"]]
        return json.dumps(data)


def machine_id() -> str:
    """What a measurement is only valid for: CPU model, core count, torch and onnxruntime versions."""
    from .report import _cpu_name

    try:
        import onnxruntime
        ort = onnxruntime.__version__
    except ImportError:
        ort = "-"
    from .latency import steady_allocator

    malloc = "steady" if steady_allocator() else "default"
    return (f"{_cpu_name() or platform.processor() or platform.machine()}|{os.cpu_count()}cpu|torch{torch.__version__}"
            f"|ort{ort}|malloc-{malloc}")


def table_layers(model: nn.Module, inputs: Any) -> dict[str, LayerSpec]:
    """The Linear / Conv layers a table can vary, with their specs (from one forward of `inputs`)."""
    candidates = [n for n, m in model.named_modules() if type(m) in (nn.Linear, *_CONVS)]
    shapes = io_shapes(model, candidates, inputs)
    specs = {}
    for name in candidates:
        if name in shapes:
            spec = layer_spec(model.get_submodule(name), shapes[name][0], shapes[name][1])
            if spec is not None:
                specs[name] = spec
    return specs


class _Cache:
    """Layer grids measured before on this machine and target, in one JSON file per target."""

    def __init__(self, cache_dir: str | Path | None, target: str):
        self.path = None if cache_dir is None else Path(cache_dir) / "latency" / (
            hashlib.sha256(target.encode()).hexdigest()[:16] + ".json")
        self.data: dict[str, float] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                self.data = {}  # a damaged cache is measured again, never trusted

    def get(self, key: str) -> float | None:
        return self.data.get(key)

    def put(self, key: str, ms: float) -> None:
        self.data[key] = ms

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


def _measure_layer(spec: LayerSpec, c_in: int, c_out: int, runtime: Runtime, threads: int, device: str,
                   warmup: int, repeats: int, scratch: Path) -> float:
    layer, x = spec.build(c_in, c_out)
    layer.eval()
    if runtime == "torch":
        return measure_latency(layer, x, warmup=warmup, repeats=repeats, threads=threads, device=device).median_ms
    path = scratch / "layer.onnx"
    with quiet_loggers("torch.onnx", "onnxscript"), torch.no_grad():
        torch.onnx.export(layer, (x,), str(path), dynamo=False, input_names=["input"], output_names=["output"])
    return measure_onnx_latency(path, x, warmup=warmup, repeats=repeats, threads=threads).median_ms


def _call_overhead(spec: LayerSpec, runtime: Runtime, threads: int, device: str, warmup: int, repeats: int,
                   scratch: Path) -> float:
    """What timing one call costs with no work in it (an identity on the layer's input): the part of a
    layer timed alone that the layer does not add inside the model."""
    x = spec.build(spec.in_ch, spec.out_ch)[1]
    if runtime == "torch":
        return measure_latency(nn.Identity(), x, warmup=warmup, repeats=repeats, threads=threads,
                               device=device).median_ms
    path = scratch / "identity.onnx"
    with quiet_loggers("torch.onnx", "onnxscript"), torch.no_grad():
        torch.onnx.export(_Copy(), (x,), str(path), dynamo=False, input_names=["input"], output_names=["output"])
    return measure_onnx_latency(path, x, warmup=warmup, repeats=repeats, threads=threads).median_ms


class _Copy(nn.Module):
    """The smallest graph ONNX export keeps (a bare identity exports to a graph with no node)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


def build_table(model: nn.Module, inputs: Any, *, runtime: Runtime = "torch", threads: int | None = None,
                device: str = "cpu", step: int = 8, points: int = 6, warmup: int = 3, repeats: int = 15,
                cache_dir: str | Path | None = None, full_model_onnx: str | Path | None = None) -> LatencyTable:
    """Measure the latency table of `model` on `inputs` (see the module docstring).

    step, points:    widths sampled at multiples of `step`, at most `points` per dimension
    cache_dir:       where measured layers are kept (per machine and target); None: not cached
    full_model_onnx: for runtime "onnxruntime", the model's ONNX file (its full-width latency)
    """
    if runtime not in ("torch", "onnxruntime"):
        raise ConfigError("runtime", f"must be 'torch' or 'onnxruntime', got {runtime!r}")
    if runtime == "onnxruntime" and device != "cpu":
        raise ConfigError("device", "onnxruntime tables are measured on the CPU; use runtime torch for CUDA")
    if runtime == "onnxruntime" and full_model_onnx is None:
        raise ConfigError("full_model_onnx", "an onnxruntime table needs the model's own ONNX file to measure it whole")
    threads = threads or torch.get_num_threads()
    specs = table_layers(model, inputs)
    if not specs:
        raise DataError(f"{type(model).__name__}: no plain Linear / Conv layer to build a latency table for")
    machine = machine_id()
    batch = next(iter(specs.values())).input_shape[0]
    cache = _Cache(cache_dir, f"{machine}|{runtime}|{device}|{threads}")
    layers: dict[str, LayerTable] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, spec in specs.items():
            ins = widths(spec.in_ch, step, points) if not spec.depthwise else widths(spec.out_ch, step, points)
            outs = widths(spec.out_ch, step, points)
            key = f"overhead|{spec.input_shape}"
            overhead = cache.get(key)
            if overhead is None:
                overhead = _call_overhead(spec, runtime, threads, device, warmup, repeats, Path(scratch))
                cache.put(key, overhead)
            grid = []
            for c_in in ins:
                row = []
                for c_out in outs:
                    if spec.depthwise and c_in != c_out:
                        row.append(math.nan)
                        continue
                    key = f"{spec.key()}|{c_in}|{c_out}"
                    ms = cache.get(key)
                    if ms is None:
                        ms = _measure_layer(spec, c_in, c_out, runtime, threads, device, warmup, repeats, Path(scratch))
                        cache.put(key, ms)
                    row.append(max(ms - overhead, 0.05 * ms))  # the layer's own work, not the timing call's
                grid.append(row)
            if spec.depthwise:  # one free width: the diagonal, copied along rows so `at(w, w)` reads it
                diag = [grid[i][i] for i in range(len(ins))]
                grid = [[diag[j] for j in range(len(outs))] for _ in ins]
            layers[name] = LayerTable(spec, ins, outs, grid)
    cache.save()
    if runtime == "torch":
        full = measure_latency(model, inputs, warmup=warmup, repeats=repeats, threads=threads, device=device).median_ms
    else:
        full = measure_onnx_latency(full_model_onnx, inputs, warmup=warmup, repeats=repeats, threads=threads).median_ms
    rest = max(full - sum(t.full_ms for t in layers.values()), 0.0)
    return LatencyTable(runtime, device, threads, batch, machine, layers, full, rest)


# ------------------------------------------------------------------------------------ for techniques
# Techniques do not import eval: they look these two up in the registry (namespace "measure").

@register("latency_table", namespace="measure")
def table_provider(model: nn.Module, inputs: Any, *, runtime: Runtime = "torch", threads: int | None = None,
                   device: str = "cpu", step: int = 8, cache_dir: str | Path | None = None) -> LatencyTable:
    """`build_table` for a technique; an onnxruntime table exports the model itself for its full latency."""
    if runtime == "torch":
        return build_table(model, inputs, runtime=runtime, threads=threads, device=device, step=step,
                           cache_dir=cache_dir)
    with tempfile.TemporaryDirectory() as d:
        path = _export(model, inputs, Path(d) / "model.onnx")
        return build_table(model, inputs, runtime=runtime, threads=threads, step=step, cache_dir=cache_dir,
                           full_model_onnx=path)


@register("latency", namespace="measure")
def latency_provider(models: list[nn.Module], inputs: Any, *, runtime: Runtime = "torch", threads: int | None = None,
                     device: str = "cpu", repeats: int = 30) -> list[float]:
    """Median ms per batch of each model, timed in interleaved rounds (a ratio of two is a fair speedup)."""
    if runtime == "torch":
        return [lat.median_ms for lat in compare_latency(models, inputs, warmup=5, repeats=repeats, threads=threads,
                                                         device=device)]
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, m in enumerate(models):
            paths.append(_export(m, inputs, Path(d) / f"m{i}.onnx"))
        return [lat.median_ms for lat in compare_onnx_latency(paths, inputs, warmup=5, repeats=repeats,
                                                              threads=threads)]


def _export(model: nn.Module, inputs: Any, path: Path) -> Path:
    """The model's fp32 ONNX file, for timing in onnxruntime; a model that does not export is a
    typed error that points at the torch runtime."""
    if isinstance(inputs, dict):
        raise DataError("latency runtime onnxruntime: times models that take one tensor; for models fed a dict "
                        "(transformers) use runtime torch")
    try:
        with quiet_loggers("torch.onnx", "onnxscript"), torch.no_grad():
            torch.onnx.export(model.eval(), (inputs,), str(path), dynamo=False, input_names=["input"],
                              output_names=["output"])
    except Exception as e:  # torch raises many kinds; the user needs one line and the way out
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{type(model).__name__}: cannot export to ONNX to time it in onnxruntime ({first}); "
                        "use latency runtime torch") from None
    return path
