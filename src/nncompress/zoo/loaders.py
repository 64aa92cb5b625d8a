"""Resolve a model or data spec `{"name": ..., "kwargs": {...}}` to objects.

A name is one of:
  - a built-in registered name (`mnist1d_cnn`, `digits`, ...: see `names("model")`, `names("data")`)
  - `"module:factory"`: `module` is imported (the current directory is importable for the import only)
    and `factory(**kwargs)` is called
  - for models only, `"hf:minilm"` or `"hf:/path/to/folder"`: a local Hugging Face encoder
  - for models only, `"saved:/path/to/folder"`: a model `nncompress.save` wrote (a run's `model/`), to
    compress further; a folder whose manifest names a `module:factory` needs `trust_code=True`

>>> model, tok = build_model({"name": "mlp", "kwargs": {"in_features": 64}})
>>> data = build_data({"name": "digits"})
>>> tuple(model(data.example_batch(2)).shape), tok is None
((2, 10), True)
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from typing import Any, Callable, Iterator

import torch.nn as nn
from torch.utils.data import DataLoader

from ..core import DataError, ModelLoadError, lookup, names, tag_source
from ..core.errors import NNCompressError, RegistryError
from . import lm as _lm  # noqa: F401  (registers the language-model workload: data "text", model "tiny_llama")
from . import models as _models  # noqa: F401  (registers the built-in models)
from .data import DataBundle, batch_inputs  # importing .data registers the built-in data
from .hf import load_hf, load_hf_tokenizer

__all__ = ["build_data", "build_model", "import_factory"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _parse_spec(spec: Any, what: str, error: type[NNCompressError]) -> tuple[str, dict[str, Any]]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise error(f"{what} spec {spec!r}: expected a mapping with a 'name' string and optional 'kwargs', "
                    f"e.g. {{'name': 'mnist1d_cnn', 'kwargs': {{}}}}")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise error(f"{what} {spec['name']!r}: kwargs must be a mapping, got {type(kwargs).__name__}")
    return spec["name"], dict(kwargs)


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """Put the current directory first on `sys.path` for the duration only."""
    entry = os.getcwd()
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)  # the first occurrence: the one inserted above


def import_factory(target: str, what: str = "model", error: type[NNCompressError] = ModelLoadError) -> Callable:
    """The callable named by `"module:attr"` (dotted attr allowed), importing `module` from the cwd too.

    >>> import_factory("nncompress.zoo.models:mlp").__name__
    'mlp'
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise error(f"{what} {target!r}: expected 'module:factory', e.g. 'mypkg.models:make_model'")
    importlib.invalidate_caches()  # the module may have been written after the last import
    try:
        with _cwd_importable():
            obj: Any = importlib.import_module(module_name)
    except Exception as e:  # any failure inside the user's module is reported the same way
        detail = str(e).strip() if isinstance(e, ImportError) and str(e).strip() else _first_line(e)
        raise error(f"{what} {target!r}: cannot import module {module_name!r} ({detail}); "
                    f"check the module is importable from the current directory") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{what} {target!r}: module {module_name!r} has no attribute {attr!r}; "
                        f"check the factory name")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{what} {target!r}: {attr!r} is a {type(obj).__name__}, not callable; name a factory function")
    return obj


def _call(factory: Callable, kwargs: dict[str, Any], what: str, name: str,
          error: type[NNCompressError]) -> Any:
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise error(f"{what} {name!r}: bad kwargs ({e}); it takes {_params(factory)}") from None
    except ValueError:  # no signature (a builtin): let the call itself check
        pass
    try:
        return factory(**kwargs)
    except NNCompressError:
        raise
    except Exception as e:
        raise error(f"{what} {name!r}: the factory raised {_first_line(e)}; fix the factory or its kwargs") from None


def _params(fn: Callable) -> str:
    try:
        return ", ".join(inspect.signature(fn).parameters) or "no arguments"
    except ValueError:
        return "unknown arguments"


SAVED = "saved:"


def build_model(spec: dict[str, Any], trust_code: bool = False) -> tuple[nn.Module, Any]:
    """`(model, tokenizer)` for a spec; the tokenizer is None except for models from `hf:` folders.

    The model is tagged with its spec (`core.model_source`), so `nncompress.save` knows how to rebuild it;
    a `saved:` model keeps the source its manifest names. trust_code: see `nncompress.load`.

    >>> model, _ = build_model({"name": "resnet20", "kwargs": {"num_classes": 100}})
    >>> model.fc.out_features
    100
    """
    name, kwargs = _parse_spec(spec, "model", ModelLoadError)
    if name.startswith(SAVED):
        return _load_saved(name, kwargs, trust_code)
    model, tokenizer = _build_model(name, kwargs)
    return tag_source(model, {"name": name, "kwargs": kwargs}), tokenizer


def _load_saved(name: str, kwargs: dict[str, Any], trust_code: bool) -> tuple[nn.Module, Any]:
    from ..core import model_source
    from ..saving import load

    if kwargs:
        raise ModelLoadError(f"model {name!r}: a saved model takes no kwargs (its manifest has them), got "
                             f"{', '.join(sorted(kwargs))}; remove them")
    model = load(name[len(SAVED):], trust_code=trust_code)
    base = model_source(model)["name"]
    return model, (load_hf_tokenizer(base[3:]) if base.startswith("hf:") else None)


def _build_model(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, Any]:
    if name.startswith("hf:"):
        if kwargs:
            raise ModelLoadError(f"model {name!r}: hf models take no kwargs, got {', '.join(sorted(kwargs))}; "
                                 f"remove them")
        return load_hf(name[3:])
    if ":" in name:
        model = _call(import_factory(name, "model", ModelLoadError), kwargs, "model", name, ModelLoadError)
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"model {name!r}: the factory returned {type(model).__name__}, not an "
                                 f"nn.Module; return the model itself")
        return model, None
    try:
        factory = lookup(name, namespace="model")
    except RegistryError:
        raise ModelLoadError(f"model {name!r}: unknown built-in; known: {', '.join(names('model'))}; "
                             f"or give 'module:factory' or 'hf:<folder>'") from None
    return _call(factory, kwargs, "model", name, ModelLoadError), None


def build_data(spec: dict[str, Any], tokenizer: Any = None) -> DataBundle:
    """A `DataBundle` for a spec. `tokenizer` is passed to builders that take a `tokenizer` argument.

    A `module:factory` may return a DataBundle, a dict `{"train", "test"[, "calib", "task",
    "num_classes"]}` or a tuple `(train, test[, calib])` of DataLoaders; calib defaults to train and
    the task is read from the first training batch (`(x, y)`: classification, dict: embedding).

    >>> build_data({"name": "digits", "kwargs": {"batch_size": 8}}).task
    'classification'
    """
    name, kwargs = _parse_spec(spec, "data", DataError)
    if ":" in name:
        factory = import_factory(name, "data", DataError)
    else:
        try:
            factory = lookup(name, namespace="data")
        except RegistryError:
            raise DataError(f"data {name!r}: unknown built-in; known: {', '.join(names('data'))}; "
                            f"or give 'module:factory'") from None
    if tokenizer is not None and "tokenizer" not in kwargs and _takes(factory, "tokenizer"):
        kwargs["tokenizer"] = tokenizer
    out = _call(factory, kwargs, "data", name, DataError)
    return out if isinstance(out, DataBundle) else _wrap(out, name)


def _takes(fn: Callable, param: str) -> bool:
    try:
        return param in inspect.signature(fn).parameters
    except ValueError:
        return False


def _wrap(out: Any, name: str) -> DataBundle:
    """A DataBundle around what a user data factory returned."""
    extra: dict[str, Any] = {}
    if isinstance(out, dict):
        unknown = sorted(set(out) - {"train", "test", "calib", "task", "num_classes"})
        if unknown or "train" not in out or "test" not in out:
            raise DataError(f"data {name!r}: the factory returned a dict with keys {sorted(out)}; it needs "
                            f"'train' and 'test' loaders and may add 'calib', 'task', 'num_classes'")
        loaders = [out["train"], out["test"], out.get("calib") or out["train"]]
        extra = {k: out[k] for k in ("task", "num_classes") if k in out}
    elif isinstance(out, (tuple, list)) and len(out) in (2, 3):
        loaders = [out[0], out[1], out[2] if len(out) == 3 else out[0]]
    else:
        raise DataError(f"data {name!r}: the factory returned {type(out).__name__}; return a DataBundle, "
                        f"a dict {{'train': ..., 'test': ...}} or a tuple (train, test[, calib]) of DataLoaders")
    for role, loader in zip(("train", "test", "calib"), loaders):
        if not isinstance(loader, DataLoader):
            raise DataError(f"data {name!r}: {role} is a {type(loader).__name__}, not a DataLoader; "
                            f"wrap it in torch.utils.data.DataLoader")
    try:
        first = next(iter(loaders[0]))
    except StopIteration:
        raise DataError(f"data {name!r}: the train loader is empty; give it at least one batch") from None
    inputs = batch_inputs(first)  # raises DataError for a batch that is neither (x, y) nor a dict
    task = extra.get("task") or ("embedding" if isinstance(inputs, dict) else "classification")
    if task not in ("classification", "embedding", "language_model"):
        raise DataError(f"data {name!r}: task must be 'classification', 'embedding' or 'language_model', got {task!r}")
    return DataBundle(*loaders, task=task, num_classes=extra.get("num_classes"), name=name)
