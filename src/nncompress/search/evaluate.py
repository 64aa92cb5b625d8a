"""Run one concrete recipe of a search and measure it the way a run measures a stage.

The model is the recipe's prepared model (pretrained, or loaded from the cache of that training),
copied for each candidate; the stages run through `recipe.runner.apply_stage`, seeded as a run seeds
them, so `nncompress run` of the recipe a candidate stands for builds the same model. Objectives:

- quality on the test split (never used to calibrate or fine-tune: stages read `train` and `calib`)
- latency at the largest `measure.batch_sizes` in the search's runtime (torch eager, or ONNX Runtime
  on the model's export: int8 QDQ for a quantized model, so its int8 kernels are timed), interleaved
  with the uncompressed model, kept as the ratio of the two medians and as milliseconds
- bytes on disk of every file of the saved checkpoint (weights + manifest)
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..core import Context
from ..core.errors import NNCompressError
from ..eval.report import StageMetrics
from ..recipe.measure import Measurer
from ..recipe.runner import apply_stage, prepare, seed_everything
from ..recipe.schema import Recipe
from .front import score

@dataclasses.dataclass
class Objectives:
    """What a candidate measured: the three objectives and the full row a run's report would show."""

    quality: float  # the score maximised: the quality, negated when lower is better (`front.score`)
    latency: float          # median of the candidate / median of the uncompressed model, timed interleaved
    latency_ms: float
    bytes: int
    metrics: dict[str, Any]  # StageMetrics.to_dict()
    seconds: float          # compress + fine-tune + measure

    def values(self) -> tuple[float, float, float]:
        """The objectives as Optuna sees them: quality up, latency and bytes down."""
        return self.quality, self.latency, float(self.bytes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Objectives":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


class Evaluator:
    """The prepared model and data of a search's recipe, and a `Measurer` that times every candidate
    against that model. Built once per worker process."""

    def __init__(self, recipe: Recipe, cache: Path, *, progress: bool = False,
                 log: Callable[[str], None] = lambda msg: None, trust_code: bool = False, runtime: str = "torch"):
        seed_everything(recipe.seed)
        self.model, self.data = prepare(recipe, cache, progress, log, trust_code)
        # distillation freezes the teacher it is given: candidates start from copies of `model`, and
        # read (and are timed against) this separate copy, as a run does
        self.teacher = copy.deepcopy(self.model).eval()
        self.cache = cache
        self.batch = max(recipe.measure.batch_sizes)
        self.runtime = runtime
        measure = dataclasses.replace(recipe.measure, batch_sizes=(self.batch,), onnx=runtime == "onnxruntime")
        self.measurer = Measurer(measure, self.data, self.teacher, Path(tempfile.gettempdir()))
        # the uncompressed model's export, timed beside every candidate's in ONNX Runtime: kept until
        # this evaluator goes
        self._reference_dir = Path(tempfile.mkdtemp(prefix="nncompress-search-ref-"))
        weakref.finalize(self, shutil.rmtree, self._reference_dir, True)

    def build(self, recipe: Recipe) -> nn.Module:
        """The compressed model of `recipe`: its stages applied, in order, to a copy of the prepared model."""
        model = copy.deepcopy(self.model)
        ctx = Context(data=self.data, teacher=self.teacher, device=torch.device(recipe.measure.device),
                      cache_dir=str(self.cache))  # no progress bars or stage log: the search shows its own
        for stage in recipe.stages:
            model = apply_stage(recipe, stage, model, ctx)
        return model

    def evaluate(self, recipe: Recipe, label: str = "candidate") -> Objectives:
        """Build `recipe`'s model and measure it; a stage that fails raises its typed error."""
        start = time.perf_counter()
        model = self.build(recipe)
        built = time.perf_counter() - start
        if self.measurer.config.onnx and self.measurer.baseline_onnx is None:
            self.reference()  # ONNX Runtime times each candidate beside the uncompressed model's export
        row = self._measure(model, label, built)
        why = [w for w in self.measurer.warnings if w.startswith(f"{label}:")]
        return _objectives(row, self.runtime, time.perf_counter() - start, why)

    def reference(self) -> StageMetrics:
        """The uncompressed model, measured the same way (its latency timed alone)."""
        self.measurer.out = self._reference_dir
        return self.measurer.measure(self.teacher, "baseline", "baseline", 0.0)

    def _measure(self, model: nn.Module, label: str, seconds: float) -> StageMetrics:
        with tempfile.TemporaryDirectory(prefix="nncompress-search-") as tmp:
            self.measurer.out = Path(tmp)
            return self.measurer.measure(model, label, "search", seconds)


def _objectives(row: StageMetrics, runtime: str, seconds: float, why: list[str]) -> Objectives:
    lat = row.latency(runtime, row.latencies[0].batch)
    ref = row.reference_latency(runtime, lat.batch) if lat is not None else None
    if row.quality is None or row.file_bytes is None or ref is None or lat.median_ms <= 0:
        raise NNCompressError(f"{row.stage}: not every objective was measured (quality {row.quality}, "
                              f"bytes {row.file_bytes}, {runtime} latency "
                              f"{'yes' if lat is not None else 'no: ' + ('; '.join(why) or 'not timed')}); "
                              "the candidate cannot be ranked")
    return Objectives(quality=score(row.quality_name, row.quality), latency=lat.median_ms / ref.median_ms, latency_ms=lat.median_ms,
                      bytes=row.file_bytes, metrics=row.to_dict(), seconds=round(seconds, 3))

