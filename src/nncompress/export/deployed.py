"""A model as it deploys to onnxruntime, and the latency measurements techniques look up that need it.

`export_deployed` writes float modules as float ONNX and modules holding int8 quantize wrappers as a
QDQ graph (`export_qdq_onnx`), which onnxruntime fuses into its int8 kernels: what `mixed_precision`
times a layer (or a whole plan) in when its latency target is measured in onnxruntime.

Providers (namespace "measure"; eval never imports export, so they are registered here):
  format_table       `eval.format_table.build_format_table` with `export_deployed` for onnxruntime
  deployed_latency   whole models timed in interleaved rounds, in torch as they are or in onnxruntime
                     as `export_deployed` writes them

>>> import os, tempfile, torch, torch.nn as nn
>>> with tempfile.TemporaryDirectory() as d:
...     path = export_deployed(nn.Linear(8, 4), torch.randn(2, 8), os.path.join(d, "m.onnx"))
...     path.name
'm.onnx'
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal, Mapping

import torch.nn as nn

from ..core import register
from ..eval.format_table import FormatTable, build_format_table
from ..eval.latency import compare_onnx_latency
from ..eval.latency_table import latency_provider
from ..quant.fake_quant import QuantWrapper
from .onnx import Exporter, export_onnx
from .onnx_qdq import export_qdq_onnx

__all__ = ["export_deployed", "deployed_latency"]

Runtime = Literal["torch", "onnxruntime"]


def export_deployed(model: nn.Module, inputs: Any, path: str | Path, exporter: Exporter = "auto") -> Path:
    """`model` as an ONNX file onnxruntime runs as it deploys: QDQ (int8 kernels) when it holds
    quantize wrappers, else float. Not verified against torch (the caller times it; `export_qdq_onnx`
    verifies a deployment); embeddings stay as they are in the model."""
    if isinstance(model, QuantWrapper):
        model = nn.Sequential(model)  # the QDQ pass finds wrappers by name: the root has none
    if any(isinstance(m, QuantWrapper) for m in model.modules()):
        return export_qdq_onnx(model, inputs, path, verify=False, quantize_embeddings=False, exporter=exporter)
    return export_onnx(model, inputs, path, verify=False, exporter=exporter)


def _layer_onnx(module: nn.Module, x: Any, path: Path) -> Path:
    return export_deployed(module, x, path, exporter="torchscript")  # one layer: the fast exporter suffices


@register("format_table", namespace="measure")
def format_table(model: nn.Module, inputs: Any, formats: Mapping[str, Mapping[str, nn.Module]], *,
                 runtime: Runtime = "torch", threads: int | None = None,
                 cache_dir: str | Path | None = None) -> FormatTable:
    """Every named layer timed as it is and in each candidate format (`build_format_table`)."""
    return build_format_table(model, inputs, formats, runtime=runtime, threads=threads, cache_dir=cache_dir,
                              to_onnx=_layer_onnx if runtime == "onnxruntime" else None)


@register("deployed_latency", namespace="measure")
def deployed_latency(models: list[nn.Module], inputs: Any, *, runtime: Runtime = "torch", threads: int | None = None,
                     repeats: int = 30) -> list[float]:
    """Median ms per batch of each model as it deploys, timed in interleaved rounds."""
    if runtime == "torch":  # as they are: the plain latency provider's interleaved rounds
        return latency_provider(models, inputs, runtime="torch", threads=threads, repeats=repeats)
    with tempfile.TemporaryDirectory() as d:
        paths = [export_deployed(m, inputs, Path(d) / f"m{i}.onnx") for i, m in enumerate(models)]
        return [lat.median_ms for lat in compare_onnx_latency(paths, inputs, warmup=5, repeats=repeats,
                                                              threads=threads)]
