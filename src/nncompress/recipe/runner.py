"""Run a validated recipe: build, (pre)train, measure the baseline, apply stages in order measuring
after each, then publish the run directory in one rename.

Run directory layout:
    recipe.yaml         the recipe as resolved (every default filled in)
    report.json/.md     per-stage figures;  pareto.png   quality vs latency and size
    stages/NN_kind/     checkpoint (model.safetensors + manifest.json) and model.onnx per stage
    model/              the final compressed model (load with nncompress.load)

Until it finishes, a run lives in the hidden folder `.OUT.partial` beside OUT (`partial_dir`): the
resolved recipe, each completed stage's folder, and `progress.json`, the one file that says which
stages are complete (their report rows, in order). A stage folder is measured into a scratch
temporary and renamed into place when whole, then `progress.json` is replaced: an interruption at
any point leaves each stage complete or absent. A run stopped by Ctrl-C (or SIGTERM under the CLI)
keeps that folder and raises `RunInterrupted`; `run_recipe(..., resume=True)` continues it from its
last completed stage. Every stage starts from RNG states derived from the recipe seed and its index
only, so a resumed run ends with the same model, tensor for tensor, as one never interrupted.
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

from ..core import Context, TrainConfig, apply, distributed, fit, history
from ..core.errors import DataError, NNCompressError
from ..core.objectives import tokens_as_rows
from ..eval.report import Report, pareto_png
from ..export.atomic import atomic_path, atomic_write_text, remove_stale_temps
from ..saving import load, save
from ..export.checkpoint import read_checkpoint
from ..zoo.hf import load_hf_tokenizer
from ..zoo.loaders import SAVED, build_data, build_model
from .measure import Measurer, call_model
from .partial import PartialRun, RunInterrupted, interrupted_note, interrupted_recipe, partial_dir  # noqa: F401
from .schema import Recipe, Stage, check_sources



def default_cache_dir() -> Path:
    return Path(os.environ.get("NNCOMPRESS_CACHE", Path.home() / ".cache" / "nncompress"))


@dataclasses.dataclass
class RunResult:
    path: Path
    report: Report
    model: nn.Module


def run_recipe(recipe: Recipe, out: str | Path | None = None, *, cache_dir: str | Path | None = None,
               progress: bool = True, log: Callable[[str], None] = print, resume: bool = False,
               trust_code: bool = False) -> RunResult:
    """Run `recipe`; returns the run directory, the report and the final model.

    resume:     continue the interrupted run that was to finish as `out`, from its last completed
                stage; `recipe` must be the one it started with.
    trust_code: a `saved:` model whose manifest names a `module:factory` may import it (see `nncompress.load`)
    """
    if resume and out is None:
        raise NNCompressError("resume: give the run directory of the interrupted run (out=...)")
    final = Path(out) if out else Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_sources(recipe, trust_code)
    distributed.init_from_env(recipe.measure.device)
    if not distributed.is_main():
        return _follow(recipe, final, Path(cache_dir) if cache_dir else default_cache_dir(), resume, trust_code)
    check_out_dir(final)
    _remove_stale_temps(final.parent, log)
    run = PartialRun.reopen(final, recipe, log) if resume else PartialRun.start(final, recipe)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        result = _run(recipe, run, cache, progress, log, trust_code)
    except KeyboardInterrupt as e:
        raise run.interrupted(final, len(recipe.stages)) from e
    except BaseException:
        # A fresh run that fails would fail the same way again: leave nothing. A resumed run keeps
        # what the interrupted run had completed (the failure may be of this machine, e.g. disk full).
        if resume:
            run.release()
        else:
            run.discard()
        raise
    run.publish(final)
    result.path = final
    return result


def _run(recipe: Recipe, run: "PartialRun", cache: Path, progress: bool, log, trust_code: bool) -> RunResult:
    model, teacher, data = _starting_point(recipe, run, cache, progress, log, trust_code)
    measurer = Measurer(recipe.measure, data, teacher, run.path)
    run.restore(measurer)
    if not run.report.stages:
        log(f"measuring baseline ({recipe.model.name} on {recipe.data.name})")
        run.measure(measurer, model, "baseline", "baseline", 0.0)
    ctx = Context(data=data, teacher=teacher, device=torch.device(recipe.measure.device), progress=progress, log=log,
                  cache_dir=str(cache))
    for stage in recipe.stages[run.stages_done:]:
        log(f"stage {stage.label}: {stage.config.kind}")
        start = time.perf_counter()
        model = apply_stage(recipe, stage, model, ctx)
        note = _latency_note(stage.label, history(model)[-1].get("record", {}))
        if note:
            measurer.warnings.append(note)
        run.measure(measurer, model, stage.label, stage.config.kind, time.perf_counter() - start)
    report = run.report
    report.run = measurer.run_info(recipe)
    save(model, run.path / "model", extra={"recipe": recipe.to_dict()})
    report.save_json(run.path / "report.json")
    atomic_write_text(run.path / "report.md", report.to_markdown() + "\n")
    pareto_png(report, run.path / "pareto.png")
    return RunResult(run.path, report, model)


def _follow(recipe: Recipe, final: Path, cache: Path, resume: bool, trust_code: bool) -> RunResult:
    """A rank other than 0 under torchrun: the same stages on the same data, training its shard of
    each batch beside rank 0; it measures nothing and writes nothing (rank 0 owns the run directory)."""
    def quiet(_: str) -> None:
        pass

    run = PartialRun.peek(final, recipe) if resume else PartialRun(partial_dir(final))
    model, teacher, data = _starting_point(recipe, run, cache, False, quiet, trust_code)
    ctx = Context(data=data, teacher=teacher, device=torch.device(recipe.measure.device), progress=False, log=quiet,
                  cache_dir=str(cache))
    for stage in recipe.stages[run.stages_done:]:
        model = apply_stage(recipe, stage, model, ctx)
    return RunResult(final, Report(), model)


def apply_stage(recipe: Recipe, stage: Stage, model: nn.Module, ctx: Context) -> nn.Module:
    """Run one stage of `recipe` on `model` (seeded from the recipe seed and the stage's index only,
    see `seed_stage`) and return the model in eval mode: what a run does for each stage, and what a
    search does for each stage of a candidate recipe."""
    seed_stage(recipe.seed, stage.index, ctx.data)
    return apply(model, stage.config, targets=stage.targets, context=ctx).eval()


def _latency_note(label: str, record: dict[str, Any]) -> str | None:
    """What a stage with a latency target measured while compressing, for the report's notes."""
    lat = record.get("latency")
    if not lat:
        return None
    where = f"{lat.get('runtime', 'torch')}, batch {lat.get('batch', '?')}, {lat.get('threads', '?')} threads"
    verdict = "met" if lat.get("met") else "NOT met (the closest plan found is kept)"
    return (f"{label}: target_latency {lat['target']} ({where}): measured {lat['measured_speedup']:.2f}x "
            f"while pruning, {verdict}; the table columns are this run's own measurement")


def _starting_point(recipe: Recipe, run: "PartialRun", cache: Path, progress: bool,
                    log, trust_code: bool) -> tuple[nn.Module, nn.Module, Any]:
    """(model, teacher, data): fresh from the recipe, or, for a resumed run, the teacher and the
    model after the last completed stage rebuilt from their checkpoints."""
    seed_everything(recipe.seed)
    if not run.report.stages:
        model, data = prepare(recipe, cache, progress, log, trust_code)
        return model, copy.deepcopy(model).eval(), data
    last = run.report.stages[-1].stage
    log(f"resuming {run.path} after {last}")
    data = build_recipe_data(recipe, cache, _tokenizer(recipe))
    # A recipe naming a `module:factory` trusts it already; a `saved:` folder's factory needs trust_code.
    trusted = trust_code or not recipe.model.name.startswith(SAVED)
    teacher = load(run.checkpoint("baseline"), trust_code=trusted)
    model = load(run.checkpoint(last), trust_code=trusted) if last != "baseline" else copy.deepcopy(teacher)
    return model, teacher, data


def prepare(recipe: Recipe, cache: Path, progress: bool = False,
            log: Callable[[str], None] = print, trust_code: bool = False) -> tuple[nn.Module, Any]:
    """The recipe's model (pretrained, or loaded from the cache of that training) in eval mode, and
    its data: what every stage of a run starts from. Shared by `run_recipe` and `nncompress sensitivity`."""
    model, tokenizer = build_model(recipe.model.to_dict(), trust_code)
    data = build_recipe_data(recipe, cache, tokenizer)
    check_compatible(model, data, recipe)
    if recipe.model.pretrain is not None:
        pretrain(model, data, recipe, cache, progress, log)
    return model.eval(), data


def _tokenizer(recipe: Recipe) -> Any:
    """The tokenizer the recipe's data needs, without building the model: an `hf:` model's, or that of
    the `hf:` model a `saved:` one was built from; None for other models."""
    name = recipe.model.name
    if name.startswith(SAVED):
        name = str(read_checkpoint(name[len(SAVED):]).source.get("name", ""))
    return load_hf_tokenizer(name[3:]) if name.startswith("hf:") else None


def build_recipe_data(recipe: Recipe, cache: Path, tokenizer: Any = None):
    data_kwargs = dict(recipe.data.kwargs)
    if recipe.data.name == "mnist1d":
        data_kwargs.setdefault("cache_dir", str(cache / "data"))
    return build_data({"name": recipe.data.name, "kwargs": data_kwargs}, tokenizer=tokenizer)


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
    if data.task == "language_model" and (out.ndim != 3 or out.shape[:2] != inputs.shape
                                          or (data.num_classes and out.shape[2] != data.num_classes)):
        raise DataError(f"model {recipe.model.name!r} outputs shape {tuple(out.shape)} for tokens "
                        f"{tuple(inputs.shape)} but data {recipe.data.name!r} is next-token prediction over "
                        f"{data.num_classes} tokens; the model must return logits (B, T, {data.num_classes})")


def pretrain(model: nn.Module, data, recipe: Recipe, cache: Path, progress: bool, log) -> None:
    """Train from scratch on the recipe's data, or load the cached result of the same training."""
    from safetensors.torch import load_model, save_model

    key = hashlib.sha256(json.dumps({"model": recipe.model.to_dict(), "data": recipe.data.to_dict(),
                                     "seed": recipe.seed, "torch": torch.__version__},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache / "pretrained" / f"{recipe.model.name.replace(':', '_').replace('/', '_')}-{key}.safetensors"
    if path.is_file():
        log(f"pretrained weights from cache: {path}")
        load_model(model, str(path))
        return
    if data.task not in ("classification", "language_model"):
        raise NNCompressError("model.pretrain: only classification and language-model data have targets to train on")
    cfg: TrainConfig = recipe.model.pretrain
    log(f"training {recipe.model.name} on {recipe.data.name} for {cfg.epochs} epochs (cached afterwards)")
    seed_everything(recipe.seed)

    def loss_fn(m, batch):
        x, y = batch
        out, _, y = tokens_as_rows(call_model(m, x), None, y)
        return torch.nn.functional.cross_entropy(out, y)

    fit(model, data.train, loss_fn, cfg, progress=progress, desc="pretrain")
    model.eval()
    if not distributed.is_main():
        return
    _remove_stale_temps(path.parent, log)
    with atomic_path(path) as tmp:
        save_model(model, str(tmp))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_stage(seed: int, index: int, data: Any = None) -> None:
    """Seed every RNG stage `index` can draw from (Python, NumPy, torch, the private shuffle
    generators of `data`'s loaders) from the recipe seed and the index alone.

    The stage then draws the same numbers whether the run started at stage 0 or was resumed here,
    in a process that never ran (nor drew for) the stages before it.
    """
    # SeedSequence mixes (seed, index) into well-separated streams; seed + index would make
    # stage 1 of seed 0 replay stage 0 of seed 1.
    stage_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    seed_everything(stage_seed)
    for gen in _loader_generators(data):
        gen.manual_seed(stage_seed)


def _loader_generators(data: Any) -> list[torch.Generator]:
    """The distinct torch generators `data`'s loaders shuffle with (a DataLoader's `generator=`)."""
    found: dict[int, torch.Generator] = {}
    for role in ("train", "test", "calib"):
        loader = getattr(data, role, None)
        sampler = getattr(loader, "sampler", None)
        inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        for gen in (getattr(loader, "generator", None), getattr(sampler, "generator", None),
                    getattr(inner, "generator", None)):
            if isinstance(gen, torch.Generator):
                found[id(gen)] = gen
    return list(found.values())


# --------------------------------------------------------------------------------- checks before work

def check_out_dir(out: str | Path) -> None:
    """Fail before any work when the run directory `out` could not be created: a parent is a
    file, or the nearest existing parent is not writable."""
    out = Path(out)
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), out.parent)
    if not parent.is_dir():
        raise NNCompressError(f"{out}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NNCompressError(f"{out}: cannot create it, {parent} is not writable; choose another --out")


def _remove_stale_temps(folder: Path, log) -> None:
    for path in remove_stale_temps(folder):
        log(f"removed {path} (a temporary left by a run that was killed)")
