"""Recipe schema: YAML -> validated configs, every error reported with its YAML path.

A recipe is the model, the data, how to measure, and a list of stages `{kind: <registered name>,
targets: {...}, ...config fields}`. Stages go through the same `Config.from_dict` as Python configs.

A `progressive` entry applies one compression stage in several increasing steps with recovery
stages after each (seed 002: smaller drops between stages end better). It is expanded here into
plain stages, so the report measures every step and the manifest replays them:

    - kind: progressive
      vary: ratio                    # a field of `stage` (dotted for nested: weight.format.bits)
      values: [0.5, 0.75, 0.9]       # as the stage reads them: sparsify's ratio is of all weights,
                                     # prune's keep_macs is of the model as it is at that step
      stage: {kind: sparsify, ratio: 0.9}
      recover: [{kind: finetune, epochs: 1}]
"""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from ..core import Config, ConfigError, Targets, TrainConfig, check, lookup, names
from ..core.errors import DataError, ModelLoadError, NNCompressError, RegistryError
from ..zoo.hf import resolve_hf_path
from ..zoo.loaders import import_factory


@dataclasses.dataclass(frozen=True)
class ModelSpec(Config):
    """Where the model comes from.

    name: a built-in (`mnist1d_cnn`), `module:factory`, `hf:minilm`, `hf:/path/to/folder`, or
          `saved:/path/to/folder` (a model nncompress saved, e.g. a run's `model/`, to compress further)
    kwargs: passed to the factory
    pretrain: train the model on the recipe's data before the baseline (cached by content hash)
    """

    name: str = "mnist1d_cnn"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    pretrain: TrainConfig | None = None

    def __post_init__(self):
        check(not (self.name.startswith("saved:") and self.pretrain is not None), "pretrain",
              "a saved model is already trained; remove pretrain (add a finetune stage to train it further)")


@dataclasses.dataclass(frozen=True)
class DataSpec(Config):
    """Where the data comes from: a built-in (`mnist1d`, `digits`, `sentences`) or `module:factory`."""

    name: str = "mnist1d"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MeasureConfig(Config):
    """How each stage is measured. Latency: median of `repeats` runs after `warmup`, `threads` fixed."""

    batch_sizes: tuple[int, ...] = (1, 256)
    threads: int = 2
    warmup: int = 5
    repeats: int = 30
    device: Literal["cpu", "cuda"] = "cpu"
    onnx: bool = True

    def __post_init__(self):
        # checked here, while validating, rather than as a crash in the middle of the run
        check(self.device != "cuda" or torch.cuda.is_available(), "device",
              f"cuda is not available on this machine (torch {torch.__version__}, "
              f"{torch.cuda.device_count()} GPUs visible); use device: cpu")
        check(len(self.batch_sizes) > 0 and all(b > 0 for b in self.batch_sizes), "batch_sizes",
              "must be a non-empty list of positive integers")
        check(self.threads > 0, "threads", f"must be > 0, got {self.threads}")
        check(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
        check(self.repeats > 0, "repeats", f"must be > 0, got {self.repeats}")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One validated stage: its config, its module selection, and its position for messages."""

    config: Config
    targets: Targets
    index: int

    @property
    def label(self) -> str:
        return f"{self.index + 1:02d}_{self.config.kind}"

    def to_dict(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "targets": self.targets.to_dict()}


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSpec
    data: DataSpec
    measure: MeasureConfig
    stages: tuple[Stage, ...]
    seed: int = 0
    # the `search:` section as written: validated by `nncompress.search` (which runs above recipes);
    # a run runs the stages as written, so it is not part of the resolved recipe
    search: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "model": self.model.to_dict(),
                "data": self.data.to_dict(), "measure": self.measure.to_dict(),
                "stages": [s.to_dict() for s in self.stages]}


_TOP = {"name", "seed", "model", "data", "measure", "stages", "search"}


def parse_recipe(raw: Any, source: str = "recipe") -> Recipe:
    """Validate a whole recipe (a dict as loaded from YAML) before anything runs."""
    if not isinstance(raw, dict):
        raise ConfigError("", f"{source}: a recipe is a mapping with model, data and stages; got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ConfigError(unknown[0], f"unknown recipe section; sections are {', '.join(sorted(_TOP))}")
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\"):
        raise ConfigError("name", f"must be a non-empty string without slashes, got {name!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError("seed", f"expected an integer, got {seed!r}")
    if not 0 <= seed < 2**32:  # what NumPy's seeding accepts
        raise ConfigError("seed", f"must be in [0, 2**32), got {seed}")
    model = ModelSpec.from_dict(_shorthand(raw.get("model", "mnist1d_cnn")), "model")
    data = DataSpec.from_dict(_shorthand(raw.get("data", "mnist1d")), "data")
    measure = MeasureConfig.from_dict(raw.get("measure") or {}, "measure")
    stages_raw = raw.get("stages") or []
    if not isinstance(stages_raw, list):
        raise ConfigError("stages", f"expected a list of stages, got {type(stages_raw).__name__}")
    expanded = [s for i, raw_stage in enumerate(stages_raw) for s in expand_progressive(raw_stage, f"stages[{i}]")]
    stages = tuple(parse_stage(s, i, where) for i, (s, where) in enumerate(expanded))
    search = raw.get("search")
    if search is not None and not isinstance(search, dict):
        raise ConfigError("search", f"expected a mapping with space (and optional, proxy, baselines), got {search!r}")
    return Recipe(name=name, model=model, data=data, measure=measure, stages=stages, seed=seed, search=search)


_PROGRESSIVE = {"kind", "vary", "values", "stage", "recover"}


def expand_progressive(raw: Any, path: str) -> list[tuple[Any, str]]:
    """A plain stage as `[(stage, path)]`; a `progressive` entry as its steps, each followed by the
    recovery stages, with the YAML path of every piece for error messages."""
    if not (isinstance(raw, dict) and raw.get("kind") == "progressive"):
        return [(raw, path)]
    unknown = sorted(set(raw) - _PROGRESSIVE)
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}", f"unknown field; a progressive entry has {', '.join(sorted(_PROGRESSIVE))}")
    stage, vary, values = raw.get("stage"), raw.get("vary"), raw.get("values")
    if not isinstance(stage, dict) or stage.get("kind") in (None, "progressive"):
        raise ConfigError(f"{path}.stage", "must be one stage mapping like {kind: sparsify, ratio: 0.9}")
    if not isinstance(vary, str) or not vary:
        raise ConfigError(f"{path}.vary", "must name the field of `stage` that grows, e.g. sparsity")
    if not isinstance(values, list) or len(values) < 2:
        raise ConfigError(f"{path}.values", f"must list at least two step values, got {values!r}")
    recover = raw.get("recover") or []
    if isinstance(recover, dict):
        recover = [recover]
    if not isinstance(recover, list):
        raise ConfigError(f"{path}.recover", "must be a stage or a list of stages run after every step")
    out: list[tuple[Any, str]] = []
    for k, value in enumerate(values):
        out.append((_with_field(stage, vary.split("."), value, f"{path}.stage"), f"{path}.values[{k}]"))
        out.extend((r, f"{path}.recover[{j}]") for j, r in enumerate(recover))
    return out


def _with_field(mapping: dict[str, Any], keys: list[str], value: Any, path: str) -> dict[str, Any]:
    """A copy of `mapping` with the nested field `keys` set to `value`."""
    out = dict(mapping)
    head, rest = keys[0], keys[1:]
    if not rest:
        out[head] = value
        return out
    inner = out.get(head)
    if not isinstance(inner, dict):
        raise ConfigError(f"{path}.{head}", f"vary names a nested field but {head!r} is not a mapping in the stage")
    out[head] = _with_field(inner, rest, value, f"{path}.{head}")
    return out


def parse_stage(raw: Any, index: int, path: str | None = None) -> Stage:
    path = path or f"stages[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(path, f"a stage is a mapping like {{kind: finetune, epochs: 1}}, got {raw!r}")
    kind = raw.get("kind")
    if not isinstance(kind, str):
        raise ConfigError(f"{path}.kind", f"missing; one of: {', '.join(names())}")
    try:
        transform = lookup(kind)
    except RegistryError:
        raise ConfigError(f"{path}.kind", f"unknown stage kind {kind!r}; known: {', '.join(names())}") from None
    fields = {k: v for k, v in raw.items() if k not in ("kind", "targets")}
    targets = Targets.from_dict(raw.get("targets") or {}, f"{path}.targets")
    return Stage(config=transform.config.from_dict(fields, path), targets=targets, index=index)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; YAML errors (syntax, a key given twice) name the line."""
    return parse_recipe(read_recipe_yaml(path), source=str(path))


def read_recipe_yaml(path: str | Path) -> Any:
    """The recipe file as plain YAML values, not yet validated; YAML errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise NNCompressError(f"{path}: recipe file not found")
    try:
        raw = yaml.load(_recipe_text(path), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        what = problem if isinstance(e, _DuplicateKeyError) else f"malformed YAML ({problem})"
        raise ConfigError("", f"{path}:{where}: {what}") from None
    return raw


def _recipe_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise NNCompressError(f"{path}: cannot read the recipe ({e.strerror}); check its permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError("", f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                          f"save the recipe as UTF-8") from None


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping key given twice (valid YAML syntax, but a value the user wrote would be lost)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`, except that a key given twice in one mapping is an error: PyYAML would
    silently keep the last value, so a setting the user wrote would be ignored without a word."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let PyYAML report it as it does
                continue
            if first is not None:
                raise _DuplicateKeyError(None, None, f"key {key!r} given twice in one mapping (first on line "
                                         f"{first}); YAML would keep only the last, so remove one",
                                         key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _shorthand(value: Any) -> Any:
    """`model: mnist1d_cnn` means `model: {name: mnist1d_cnn}`."""
    return {"name": value} if isinstance(value, str) else value


def check_sources(recipe: Recipe, trust_code: bool = False) -> None:
    """Resolve the recipe's model and data names without building, loading or training anything:
    a built-in is registered, a `module:factory` imports and is callable, an `hf:` folder exists, a
    `saved:` folder holds a readable manifest (whose `module:factory` needs `trust_code`), and the
    kwargs are ones the factory takes. Raises the error the run would raise later."""
    model, data = recipe.model, recipe.data
    if model.name.startswith("hf:"):
        resolve_hf_path(model.name[3:])
    elif model.name.startswith("saved:"):
        _check_saved(model.name[len("saved:"):], model.kwargs, trust_code)
    else:
        _check_factory(model.name, model.kwargs, "model", ModelLoadError)
    _check_factory(data.name, data.kwargs, "data", DataError)


def _check_saved(folder: str, kwargs: dict[str, Any], trust_code: bool) -> None:
    from ..export.checkpoint import read_checkpoint
    from ..saving import needs_trust, untrusted_error

    if kwargs:
        raise ModelLoadError(f"model 'saved:{folder}': a saved model takes no kwargs (its manifest has them), got "
                             f"{', '.join(sorted(kwargs))}; remove them")
    source = read_checkpoint(folder).source
    if needs_trust(source) and not trust_code:
        raise untrusted_error(folder, source)


def _check_factory(name: str, kwargs: dict[str, Any], what: str, error: type[NNCompressError]) -> None:
    if ":" in name:
        factory = import_factory(name, what, error)
    else:
        try:
            factory = lookup(name, namespace=what)
        except RegistryError:
            other = " or 'hf:<folder>'" if what == "model" else ""
            raise error(f"{what} {name!r}: unknown built-in; known: {', '.join(names(what))}; "
                        f"or give 'module:factory'{other}") from None
    try:
        signature = inspect.signature(factory)
    except ValueError:  # no signature (a builtin): the call itself will check
        return
    try:
        signature.bind_partial(**kwargs)
    except TypeError as e:
        raise error(f"{what} {name!r}: bad kwargs ({e}); it takes "
                    f"{', '.join(signature.parameters) or 'no arguments'}") from None


def recipe_difference(old: Recipe, new: Recipe) -> str | None:
    """Where `new` first differs from `old`, as `yaml.path (old then, new now)`; None when equal."""
    return _first_difference(old.to_dict(), new.to_dict())


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """The first place two plain (YAML-like) values differ, as `path (old then, new now)`.

    >>> _first_difference({"a": [1, {"b": 2}]}, {"a": [1, {"b": 3}]})
    'a[1].b (2 then, 3 now)'
    >>> _first_difference({"s": [{}, {}]}, {"s": [{}]})
    's (2 entries then, 1 now)'
    """
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            where = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if where is not None:
                return where
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        if len(old) != len(new):
            return f"{path} ({len(old)} entries then, {len(new)} now)"
        for i, (a, b) in enumerate(zip(old, new)):
            where = _first_difference(a, b, f"{path}[{i}]")
            if where is not None:
                return where
        return None
    return None if old == new else f"{path or 'the top'} ({old!r} then, {new!r} now)"
