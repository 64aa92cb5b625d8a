"""Run a validated recipe: build, (pre)train, measure the baseline, apply stages in order measuring
after each, then write the run directory atomically.

Run directory layout:
    recipe.yaml         the recipe as resolved (every default filled in)
    report.json/.md     per-stage figures;  pareto.png   quality vs latency and size
    stages/NN_kind/     checkpoint (model.safetensors + manifest.json) and model.onnx per stage
    model/              the final compressed model (load with nncompress.load)
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import yaml

from ..core import Context, TrainConfig, apply, fit
from ..core.errors import DataError, NNCompressError
from ..eval.report import Report, pareto_png
from ..export.atomic import atomic_dir
from ..core import tag_source
from ..saving import save
from ..zoo.loaders import build_data, build_model
from .measure import Measurer, call_model
from .schema import Recipe


def default_cache_dir() -> Path:
    return Path(os.environ.get("NNCOMPRESS_CACHE", Path.home() / ".cache" / "nncompress"))


@dataclasses.dataclass
class RunResult:
    path: Path
    report: Report
    model: nn.Module


def run_recipe(recipe: Recipe, out: str | Path | None = None, *, cache_dir: str | Path | None = None,
               progress: bool = True, log: Callable[[str], None] = print) -> RunResult:
    """Run `recipe`; returns the run directory, the report and the final model."""
    final = Path(out) if out else Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if final.exists():
        raise NNCompressError(f"{final}: output folder already exists; choose another --out or remove it")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    seed_everything(recipe.seed)
    with atomic_dir(final) as tmp:
        result = _run(recipe, tmp, cache, progress, log)
    result.path = final
    return result


def _run(recipe: Recipe, out: Path, cache: Path, progress: bool, log) -> RunResult:
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    model, data = prepare(recipe, cache, progress, log)
    teacher = copy.deepcopy(model).eval()
    measurer = Measurer(recipe.measure, data, teacher, out)
    log(f"measuring baseline ({recipe.model.name} on {recipe.data.name})")
    report = Report()
    report.add(measurer.measure(model, "baseline", "baseline", seconds=0.0))
    ctx = Context(data=data, teacher=teacher, device=torch.device(recipe.measure.device), progress=progress, log=log)
    for stage in recipe.stages:
        log(f"stage {stage.label}: {stage.config.kind}")
        start = time.perf_counter()
        model = apply(model, stage.config, targets=stage.targets, context=ctx)
        model.eval()
        report.add(measurer.measure(model, stage.label, stage.config.kind, time.perf_counter() - start))
    save(model, out / "model", extra={"recipe": recipe.to_dict()})
    report.run = measurer.run_info(recipe)
    (out / "report.json").write_text(report.to_json())
    (out / "report.md").write_text(report.to_markdown() + "\n")
    pareto_png(report, out / "pareto.png")
    return RunResult(out, report, model)


def prepare(recipe: Recipe, cache: Path, progress: bool = False,
            log: Callable[[str], None] = print) -> tuple[nn.Module, Any]:
    """The recipe's model (pretrained, or loaded from the cache of that training) in eval mode, and
    its data: what every stage of a run starts from. Shared by `run_recipe` and `nncompress sensitivity`."""
    model, tokenizer = build_model(recipe.model.to_dict())
    tag_source(model, recipe.model.to_dict())
    data_kwargs = dict(recipe.data.kwargs)
    if recipe.data.name == "mnist1d":
        data_kwargs.setdefault("cache_dir", str(cache / "data"))
    data = build_data({"name": recipe.data.name, "kwargs": data_kwargs}, tokenizer=tokenizer)
    check_compatible(model, data, recipe)
    if recipe.model.pretrain is not None:
        pretrain(model, data, recipe, cache, progress, log)
    return model.eval(), data


def check_compatible(model: nn.Module, data, recipe: Recipe) -> None:
    """Run one small batch through the model so a shape mismatch fails early, with one clear line."""
    inputs = data.example_batch(2)
    try:
        with torch.no_grad():
            out = call_model(model.eval(), inputs)
    except Exception as e:  # any failure here is a data/model mismatch the user must fix
        shape = {k: tuple(v.shape) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(inputs.shape)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data {recipe.data.name!r} gives inputs of shape {shape} but model "
                        f"{recipe.model.name!r} fails on them ({first}); use data that matches the model") from None
    if data.task == "classification" and data.num_classes and (out.ndim != 2 or out.shape[1] != data.num_classes):
        raise DataError(f"model {recipe.model.name!r} outputs shape {tuple(out.shape)} but data "
                        f"{recipe.data.name!r} has {data.num_classes} classes; set the model's num_classes")


def pretrain(model: nn.Module, data, recipe: Recipe, cache: Path, progress: bool, log) -> None:
    """Train from scratch on the recipe's data, or load the cached result of the same training."""
    from safetensors.torch import load_model, save_model

    from ..export.atomic import atomic_path

    key = hashlib.sha256(json.dumps({"model": recipe.model.to_dict(), "data": recipe.data.to_dict(),
                                     "seed": recipe.seed, "torch": torch.__version__},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache / "pretrained" / f"{recipe.model.name.replace(':', '_').replace('/', '_')}-{key}.safetensors"
    if path.is_file():
        log(f"pretrained weights from cache: {path}")
        load_model(model, str(path))
        return
    if data.task != "classification":
        raise NNCompressError("model.pretrain: only classification data has labels to train on")
    cfg: TrainConfig = recipe.model.pretrain
    log(f"training {recipe.model.name} on {recipe.data.name} for {cfg.epochs} epochs (cached afterwards)")
    seed_everything(recipe.seed)

    def loss_fn(m, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(call_model(m, x), y)

    fit(model, data.train, loss_fn, cfg, progress=progress, desc="pretrain")
    model.eval()
    with atomic_path(path) as tmp:
        save_model(model, str(tmp))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


