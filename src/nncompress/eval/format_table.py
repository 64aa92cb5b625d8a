"""Latency of each layer in each candidate format, measured on the target (the per-format half of the
latency tables; `latency_table` is the per-width half).

For one model, example input, runtime and thread count, every named layer is timed alone on the input
it really receives in the model (captured on one forward of `inputs`), once as it is ("current") and
once per candidate module: in torch the module as given (a fake-quant wrapper costs what fake
quantization costs in eager mode; a native int8 layer what its kernel costs), in onnxruntime the module
exported by `to_onnx` as it deploys (the providers in `export.deployed` pass `export_deployed`: float
layers as float ONNX, int8 wrappers as a QDQ graph that onnxruntime fuses into its int8 kernels). Each time is net of an empty call on the
same input. The model whole is timed once; a plan is predicted as

    full_ms + sum over changed layers (ms[layer][format] - ms[layer]["current"])

Measurements are cached on disk per machine, runtime and threads, keyed by the module's structure
(its repr, which names its shapes and formats) and its input shape, so layers of one shape (a
transformer's q/k/v/o projections) are timed once.

    table = build_format_table(model, x, {"fc": {"W8A8": wrapper}}, runtime="onnxruntime", threads=2,
                               to_onnx=export_deployed)
    table.ms["fc"]["W8A8"], table.ms["fc"]["current"], table.full_ms
    table.predict({"fc": "W8A8"})

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
>>> t = build_format_table(net, torch.randn(4, 32), {"0": {"half": nn.Linear(32, 64).half().float()}},
...                        threads=1, warmup=1, repeats=3)
>>> sorted(t.ms["0"]), t.predict({}) == t.full_ms
(['current', 'half'], True)
"""
from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn as nn

from ..core.calibration import capturing, feed
from ..core.errors import ConfigError, DataError
from .latency import measure_latency, measure_onnx_latency
from .latency_table import _Cache, _Copy, machine_id
from .measure import batch_size

__all__ = ["FormatTable", "build_format_table"]

Runtime = Literal["torch", "onnxruntime"]
CURRENT = "current"
ToOnnx = Callable[[nn.Module, Any, Path], Path]


@dataclasses.dataclass
class FormatTable:
    """ms[layer][label]: the layer alone in that format (net of an empty call); "current" is the
    layer as it is in the model. full_ms: the model whole, as it is (fp32 ONNX in onnxruntime)."""

    runtime: str
    threads: int
    batch: int
    machine: str
    ms: dict[str, dict[str, float]]
    full_ms: float

    def predict(self, plan: Mapping[str, str]) -> float:
        """Predicted ms per batch with each named layer in the format `plan[layer]` (others as they are)."""
        return self.full_ms + sum(self.ms[n][label] - self.ms[n][CURRENT] for n, label in plan.items())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _layer_inputs(model: nn.Module, names: list[str], inputs: Any) -> dict[str, torch.Tensor]:
    """The first input each named layer receives on one forward of `inputs` (a layer that did not
    run is a DataError naming it)."""
    with torch.no_grad(), capturing(model, names, inputs=True) as got:
        feed(model, inputs)
    missing = [n for n in names if n not in got]
    if missing:
        raise DataError(f"format table: layer {missing[0]!r} did not run on the example input; time only layers "
                        "the forward reaches")
    return {n: got[n].detach() for n in names}


def _key(module: nn.Module, x: torch.Tensor) -> str:
    text = f"{repr(module)}|{tuple(x.shape)}|{x.dtype}"
    return "format|" + hashlib.sha256(text.encode()).hexdigest()[:24]


def _time(module: nn.Module, x: torch.Tensor, runtime: Runtime, threads: int, warmup: int, repeats: int,
          scratch: Path, to_onnx: ToOnnx | None) -> float:
    if runtime == "torch":
        return measure_latency(module, x, warmup=warmup, repeats=repeats, threads=threads).median_ms
    path = to_onnx(module, x, scratch / "layer.onnx")
    return measure_onnx_latency(path, x, warmup=warmup, repeats=repeats, threads=threads).median_ms


def build_format_table(model: nn.Module, inputs: Any, formats: Mapping[str, Mapping[str, nn.Module]], *,
                       runtime: Runtime = "torch", threads: int | None = None, warmup: int = 3,
                       repeats: int = 15, cache_dir: str | Path | None = None,
                       to_onnx: ToOnnx | None = None) -> FormatTable:
    """Time every layer named in `formats` as it is and as each candidate module (module doc).

    formats:   {layer name: {label: module standing in for the layer in that format}}
    cache_dir: where measurements are kept (per machine, runtime and threads); None: not cached
    to_onnx:   for runtime onnxruntime, `(module, inputs, path) -> path` writing the module as it deploys
    """
    if runtime not in ("torch", "onnxruntime"):
        raise ConfigError("runtime", f"must be 'torch' or 'onnxruntime', got {runtime!r}")
    if runtime == "onnxruntime" and to_onnx is None:
        raise ConfigError("to_onnx", "an onnxruntime table needs the function that exports a layer as it deploys "
                          "(nncompress.export.deployed.export_deployed)")
    if CURRENT in {label for row in formats.values() for label in row}:
        raise ConfigError("formats", f"{CURRENT!r} is the label of the layer as it is; name the candidates otherwise")
    threads = threads or torch.get_num_threads()
    names = list(formats)
    model = model.eval()
    xs = _layer_inputs(model, names, inputs)
    cache = _Cache(cache_dir, f"{machine_id()}|{runtime}|formats|{threads}")
    ms: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        scratch = Path(d)
        for name in names:
            x = xs[name]
            empty = _cached(cache, _Copy() if runtime == "onnxruntime" else nn.Identity(), x, runtime, threads,
                            warmup, repeats, scratch, to_onnx)
            row = {CURRENT: model.get_submodule(name), **formats[name]}
            ms[name] = {}
            for label, module in row.items():
                t = _cached(cache, module.eval(), x, runtime, threads, warmup, repeats, scratch, to_onnx)
                ms[name][label] = max(t - empty, 0.05 * t)  # the layer's own work, not the timing call's
        cache.save()
        if runtime == "torch":
            full = measure_latency(model, inputs, warmup=warmup, repeats=repeats, threads=threads).median_ms
        else:
            path = to_onnx(model, inputs, scratch / "model.onnx")
            full = measure_onnx_latency(path, inputs, warmup=warmup, repeats=repeats, threads=threads).median_ms
    return FormatTable(runtime, threads, batch_size(inputs), machine_id(), ms, full)


def _cached(cache: _Cache, module: nn.Module, x: torch.Tensor, runtime: Runtime, threads: int, warmup: int,
            repeats: int, scratch: Path, to_onnx: ToOnnx | None) -> float:
    key = _key(module, x)
    t = cache.get(key)
    if t is None:
        t = _time(module, x, runtime, threads, warmup, repeats, scratch, to_onnx)
        cache.put(key, t)
    return t
