"""Measure a model after each recipe stage: quality, size, MACs, bytes on disk, latency.

Every figure is measured here, on the stage's real model and files: the checkpoint written for the
stage is the file whose bytes are reported, and the ONNX file whose latency is reported is the one
exported from that stage's model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core.errors import DataError, UnsupportedOpError
from ..eval.latency import compare_latency, compare_onnx_latency
from ..eval.measure import call_model, count_macs, count_nonzero_params, count_params
from ..export.checkpoint import checkpoint_bytes
from ..eval.metrics import accuracy, embed, embedding_fidelity, perplexity
from ..eval.report import StageMetrics, run_info
from ..export.onnx import export_onnx
from ..export.onnx_qdq import export_qdq_onnx
from ..quant.fake_quant import QuantWrapper
from ..saving import save
from .schema import MeasureConfig

__all__ = ["Measurer", "QUALITY", "call_model", "inputs_of_batch"]

QUALITY = {"classification": "accuracy", "embedding": "cosine", "language_model": "perplexity"}  # by data task


def inputs_of_batch(data, batch: int):
    """`batch` real samples from the calibration set, repeated cyclically when it holds fewer."""
    try:
        return data.example_batch(batch)
    except DataError:
        pass
    parts = []
    for b in data.calib:
        parts.append(b if isinstance(b, dict) else b[0])
    if isinstance(parts[0], dict):
        full = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        n = len(next(iter(full.values())))
        idx = torch.arange(batch) % n
        return {k: v[idx] for k, v in full.items()}
    full = torch.cat(parts)
    return full[torch.arange(batch) % len(full)]


@dataclasses.dataclass
class Measurer:
    """Measures stages of one run the same way, against the same reference."""

    config: MeasureConfig
    data: Any
    teacher: nn.Module
    out: Path
    warnings: list[str] = dataclasses.field(default_factory=list)
    baseline_onnx: Path | None = None

    def __post_init__(self):
        self.inputs = {b: inputs_of_batch(self.data, b) for b in self.config.batch_sizes}
        self.reference = embed(self.teacher, self.data.test) if self.data.task == "embedding" else None

    def quality(self, model: nn.Module) -> tuple[str, float, dict[str, float]]:
        device = self.config.device
        if self.data.task == "embedding":
            fid = embedding_fidelity(self.reference, embed(model, self.data.test, device=device))
            return "cosine", fid["cosine"], {k: v for k, v in fid.items() if k != "cosine"}
        if self.data.task == "language_model":
            ppl = perplexity(model, self.data.test, device=device)
            return "perplexity", ppl["perplexity"], {"nll": ppl["nll"]}
        return "accuracy", accuracy(model, self.data.test, device=device), {}

    def measure(self, model: nn.Module, label: str, kind: str, seconds: float) -> StageMetrics:
        cfg = self.config
        folder = self.out / "stages" / (label if label != "baseline" else "00_baseline")
        save(model, folder / "checkpoint")
        size = checkpoint_bytes(folder / "checkpoint")  # every file load needs, manifest included
        name, value, extra = self.quality(model)
        small = self.inputs[min(cfg.batch_sizes)]
        onnx_path = self.export(model, small, folder, label) if cfg.onnx else None
        latencies, reference = self.latencies(model, onnx_path, is_baseline=label == "baseline")
        return StageMetrics(
            stage=label, kind=kind, quality_name=name, quality=value, extra=extra,
            params=count_params(model), nonzero=count_nonzero_params(model),
            macs=count_macs(model, self.inputs[1] if 1 in self.inputs else inputs_of_batch(self.data, 1)),
            file_bytes=size["total"], manifest_bytes=size["manifest"],
            latencies=latencies, reference=reference, seconds=round(seconds, 3))

    def export(self, model: nn.Module, inputs, folder: Path, label: str) -> Path | None:
        """The ONNX file whose latency is reported: int8 QDQ for a quantized model when it can be
        exported that way (ONNX Runtime then runs int8 kernels), fp32 otherwise."""
        if any(isinstance(m, QuantWrapper) for m in model.modules()):
            try:
                path = export_qdq_onnx(model, inputs, folder / "model.int8.onnx")
                self.warnings.append(f"{label}: ONNX Runtime figures are of the int8 QDQ export")
                return path
            except UnsupportedOpError as e:
                self.warnings.append(f"{label}: no int8 ONNX ({e}); ONNX latency is of the fake-quant graph")
        try:
            return export_onnx(model, inputs, folder / "model.onnx")
        except UnsupportedOpError as e:  # reported, not fatal: the torch figures still stand
            self.warnings.append(f"{label}: no ONNX latency ({e})")
            return None

    def latencies(self, model: nn.Module, onnx_path: Path | None, is_baseline: bool):
        """The stage's latencies, and the baseline's timed in the same interleaved rounds.

        Timing the baseline again beside every stage makes each speedup a ratio of two medians taken
        under the same machine load, rather than minutes apart.
        """
        cfg = self.config
        opts = dict(warmup=cfg.warmup, repeats=cfg.repeats, threads=cfg.threads)
        latencies, reference = [], []
        for b in cfg.batch_sizes:
            if is_baseline:
                latencies += compare_latency([model], self.inputs[b], device=cfg.device, **opts)
            else:
                ref, lat = compare_latency([self.teacher, model], self.inputs[b], device=cfg.device, **opts)
                latencies.append(lat)
                reference.append(ref)
        if onnx_path is not None:
            if is_baseline:
                self.baseline_onnx = onnx_path
            for b in cfg.batch_sizes:
                if is_baseline or self.baseline_onnx is None:
                    latencies += compare_onnx_latency([onnx_path], self.inputs[b], **opts)
                else:
                    ref, lat = compare_onnx_latency([self.baseline_onnx, onnx_path], self.inputs[b], **opts)
                    latencies.append(lat)
                    reference.append(ref)
        return latencies, reference

    def run_info(self, recipe) -> dict[str, Any]:
        info = run_info(threads=self.config.threads, device=self.config.device)
        info.update(recipe=recipe.name, model=recipe.model.name, data=recipe.data.name)
        if self.warnings:
            info["warnings"] = self.warnings
        return info
