"""`apply(model, config, targets=...)`: the one public verb, and `layer_transform`, the decorator
that turns "given this layer and my config, return the replacement" into a registered transform.

>>> from nncompress.core.registry import names
>>> "finetune" in names()
True
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn

from .config import Config
from .context import Context
from .errors import ConfigError, ModelLoadError, NNCompressError, TargetError
from .registry import register, transform_for
from .surgery import Edits, OnWrapped, Site, layer_sites, replay_edits
from .targets import Targets

HISTORY_ATTR = "_nncompress_history"
SOURCE_ATTR = "_nncompress_source"


def apply(model: nn.Module, config: Config, targets: Targets | Mapping[str, Any] | None = None,
          context: Context | None = None) -> nn.Module:
    """Apply the registered transform for `config` to `model` and return the model.

    The application (config, targets, what the transform recorded and the structural edits it made)
    is appended to the model's history, which `nncompress.save` writes to the manifest so
    `nncompress.load` can replay the edits.
    """
    _check_call(model, config, context)
    ctx = copy.copy(context) if context is not None else Context()
    ctx.device = checked_device(ctx.device, "context.device")
    if targets is not None:
        ctx.targets = _targets(targets)
    ctx.record = {}
    ctx.edits = Edits()
    transform = transform_for(config)
    try:
        with _teacher_kept(ctx.teacher, model):
            out = transform.fn(model, config, ctx)
    except NNCompressError as e:  # every error says which stage it came from
        named = _in_stage(e, config.kind)
        if named is e:
            raise
        raise named from None
    if not isinstance(out, nn.Module):
        raise TypeError(f"transform {config.kind!r} returned {type(out).__name__}, not an nn.Module")
    entry = {"config": config.to_dict(), "targets": ctx.targets.to_dict(), "record": ctx.record,
             "edits": ctx.edits.finalize(out)}
    setattr(out, HISTORY_ATTR, history(model) + [entry])
    if SOURCE_ATTR in vars(model) and out is not model:
        setattr(out, SOURCE_ATTR, getattr(model, SOURCE_ATTR))
    return out


@contextlib.contextmanager
def _teacher_kept(teacher: nn.Module | None, model: nn.Module) -> Iterator[None]:
    """A stage freezes the teacher it reads (eval mode, no gradients); afterwards the teacher's
    `requires_grad` flags and train / eval modes are given back as they were, so a model lent as a
    teacher can still be trained. (A teacher that is the model itself is the stage's to change.)"""
    if teacher is None or teacher is model:
        yield
        return
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    modes = [(m, m.training) for m in teacher.modules()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _in_stage(e: NNCompressError, kind: str) -> NNCompressError:
    """`e` with the stage named first: `prune.keep_macs: ...` for a config field, `prune: ...` else."""
    text = str(e)
    if text.startswith((f"{kind}:", f"{kind}.")) or type(e).__init__ is not NNCompressError.__init__ and \
            not isinstance(e, ConfigError):
        return e  # already named, or an error type whose constructor takes more than a message
    if isinstance(e, ConfigError):
        return e.under(kind)
    return type(e)(f"{kind}: {text}")


def _check_call(model: Any, config: Any, context: Any) -> None:
    """Typed errors for the usual slips when calling `apply` from Python."""
    if isinstance(config, type) and issubclass(config, Config):
        raise ConfigError("config", f"{config.__name__} is a config class; pass an instance, "
                                    f"e.g. apply(model, {config.__name__}())")
    if not isinstance(config, Config):
        raise ConfigError("config", f"expected a config instance such as PruneConfig(ratio=0.5), got "
                                    f"{type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise ConfigError("model", f"expected a torch.nn.Module, got {type(model).__name__}")
    if context is not None and not isinstance(context, Context):
        raise ConfigError("context", f"expected nncompress.Context(...), got {type(context).__name__}")


def checked_device(device: Any, field: str) -> torch.device:
    """`device` as a `torch.device` this machine has, or a `ConfigError(field)` saying what it has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(field, f"{device!r} is not a device; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            have = "no CUDA device" if n == 0 else f"{n} CUDA device(s)"
            raise ConfigError(field, f"{dev} does not exist on this machine ({have}); use 'cpu'"
                              + ("" if n == 0 else f" or cuda:0..{n - 1}"))
    elif dev.type not in ("cpu", "meta", "mps"):
        raise ConfigError(field, f"{dev} is not a device nncompress runs on; use 'cpu' or 'cuda'")
    return dev


def _targets(targets: Any) -> Targets:
    if isinstance(targets, Targets):
        return targets
    if isinstance(targets, Mapping):
        return Targets.from_dict(dict(targets), "targets")
    raise ConfigError("targets", f"expected Targets(include=..., types=...) or a mapping of those fields, got "
                                 f"{type(targets).__name__}")


def history(model: nn.Module) -> list[dict[str, Any]]:
    """The transforms applied to `model` so far, as manifest entries."""
    return list(getattr(model, HISTORY_ATTR, []))


def replay(model: nn.Module, entries: list[dict[str, Any]]) -> nn.Module:
    """Re-apply the structural edits of each entry (used by `load`); weights come from the file."""
    for i, entry in enumerate(entries):
        where = f"manifest.history[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("edits"), list):
            raise ModelLoadError(f"{where}: no list of edits; the checkpoint was written by an older nncompress "
                                 "(manifest version 1) or is corrupt: re-save the model with this version")
        try:
            model = replay_edits(model, entry["edits"], where)
        except NNCompressError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{where}: cannot replay {entry.get('config', {}).get('kind', '?')!r} "
                                 f"({type(e).__name__}: {e}); the manifest does not match the model source") from None
    setattr(model, HISTORY_ATTR, list(entries))
    return model


def model_source(model: nn.Module) -> dict[str, Any] | None:
    """The spec (`{"name": ..., "kwargs": ...}`) the model was built from, if nncompress built it."""
    return getattr(model, SOURCE_ATTR, None)


def tag_source(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Remember how `model` was built, so `save` can write it and `load` can rebuild it."""
    setattr(model, SOURCE_ATTR, {"name": spec["name"], "kwargs": dict(spec.get("kwargs") or {})})
    return model


LayerFn = Callable[[nn.Module, Config, Context, list[Site]], nn.Module]


def layer_transform(name: str, *, config: type[Config], layers: tuple[type, ...], on_wrapped: OnWrapped = "through",
                    what: str = "") -> Callable[[LayerFn], LayerFn]:
    """Register a transform that replaces layers (torchao's handler pattern).

    The library selects the targeted layers of the `layers` classes, decides what the technique sees
    where another technique already wrapped a layer (`on_wrapped`, see `surgery.layer_sites`), records
    every `site.replace(new)` for replay, and raises a `TargetError` naming the stage when nothing is
    selected. The decorated function gets `(model, config, ctx, sites)` and returns the model.

        @layer_transform("lowrank", config=LowRankConfig, layers=(nn.Linear,))
        def _lowrank(model, config, ctx, sites):
            for site in sites:
                site.replace(LowRankLinear.from_linear(site.layer, config.rank))
            return model
    """
    def wrap(fn: LayerFn) -> LayerFn:
        @functools.wraps(fn)
        def transform(model: nn.Module, cfg: Config, ctx: Context) -> nn.Module:
            sites = layer_sites(model, ctx.targets, ctx.edits, layers, name, on_wrapped, what)
            out = fn(model, cfg, ctx, sites)
            return sites[0].model if out is model and sites[0].model is not model else out

        register(name, config=config)(transform)
        return fn
    return wrap
