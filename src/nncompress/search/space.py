"""The search space of a recipe (its `search:` section) and the concrete recipes it stands for.

The stages of a recipe with a `search:` section are a valid recipe themselves (the point "as
written"); the section names which of their fields vary, by YAML path, and over what:

    search:
      space:
        stages[0].ratio: [0.3, 0.5, 0.7]              # a list: these values (any YAML value)
        stages[2].weight.format.bits: [4, 8]
        stages[0].overrides[blocks.0]: {low: 0.0, high: 0.8}  # a range; integers when low and high are
      optional: ["stages[1]"]                         # stages a trial may leave out (which to chain)
      proxy: {epochs: 0}                              # rung 1: each stage field so named capped there
      promote: 6                                      # proxy-front points that get the full recipe
      sampler: tpe                                    # or nsga2
      runtime: torch                                  # latency timed in torch eager, or onnxruntime
      baselines:                                      # measured in the same run, drawn beside the front
        - {name: prune 0.5, set: {"stages[0].ratio": 0.5}, drop: ["stages[1]"]}

A path is `stages[i]` followed by `.field` or `[key]` (a mapping key that holds dots, such as a
module name; inside `[...]` or `{...}` quote it: `["stages[1]"]`); `i` counts the stages as written (a `progressive` entry is one). Every value of the
space and every baseline is validated by building its recipe, so a mistake is reported here, with
its path, before any work. Without `baselines`, each listed value of the space is one baseline (the
recipe as written with that field alone changed).

>>> import yaml
>>> raw = yaml.safe_load('''
... model: {name: mlp, kwargs: {in_features: 64}}
... data: digits
... stages:
...   - {kind: prune, ratio: 0.5}
...   - {kind: finetune, epochs: 2}
... search:
...   space: {"stages[0].ratio": [0.25, 0.75]}
...   optional: ["stages[1]"]
... ''')
>>> spec = parse_search(raw)
>>> [d.name for d in spec.dimensions], [b.name for b in spec.baselines]
(['stages[1]', 'stages[0].ratio'], ['stages[0].ratio=0.25', 'stages[0].ratio=0.75'])
>>> r = spec.recipe({"stages[0].ratio": 0.75, "stages[1]": False})
>>> [(s.config.kind, getattr(s.config, "ratio", None)) for s in r.stages]
[('prune', 0.75)]
>>> spec.proxy(spec.recipe({"stages[0].ratio": 0.25, "stages[1]": True})).stages[1].config.epochs
1
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
from typing import Any

from ..core.errors import ConfigError
from ..recipe.schema import Recipe, parse_recipe

PRIMITIVE = (type(None), bool, int, float, str)
SAMPLERS = ("tpe", "nsga2")
_SECTION = {"space", "optional", "proxy", "promote", "sampler", "baselines", "runtime"}
RUNTIMES = ("torch", "onnxruntime")
_BASELINE = {"name", "set", "drop"}
_RANGE = {"low", "high", "step", "log"}
_STAGE = re.compile(r"stages\[(\d+)\]")
_KEY = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[([^\[\]]+)\]")


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One axis of the space: a stage field (`choices` or a `low`..`high` range), or whether an
    optional stage is kept (`keys == ()`, choices `(True, False)`)."""

    name: str                       # the YAML path, also the Optuna parameter name
    stage: int                      # index in the recipe's `stages` as written
    keys: tuple[str, ...]           # the field inside the stage; () for an optional stage
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high)) and \
            (self.step is None or isinstance(self.step, int))

    @property
    def by_index(self) -> bool:
        """Choices Optuna cannot store as values (mappings, lists) are suggested by their index."""
        return self.choices is not None and not all(isinstance(c, PRIMITIVE) for c in self.choices)

    def suggest(self, trial: Any) -> Any:
        """This dimension's value for an Optuna trial (fixed when the trial was enqueued)."""
        if self.choices is not None:
            if self.by_index:
                return self.choices[trial.suggest_categorical(self.name, list(range(len(self.choices))))]
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def value(self, param: Any) -> Any:
        """The YAML value of an Optuna parameter value."""
        return self.choices[param] if self.by_index else param

    def endpoints(self) -> tuple[Any, ...]:
        """The values to validate (and, for a list, the one-factor baselines)."""
        return self.choices if self.choices is not None else (self.low, self.high)


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A fixed recipe measured beside the front: the recipe as written with fields set and stages dropped."""

    name: str
    values: dict[str, Any]          # path -> value
    drop: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """A recipe's validated `search:` section, with the recipe as written (`raw`, plain YAML values)."""

    raw: dict[str, Any]
    dimensions: tuple[Dimension, ...]
    caps: dict[str, float]
    promote: int
    sampler: str
    baselines: tuple[Baseline, ...]
    runtime: str = "torch"  # where the latency objective is timed: torch eager or ONNX Runtime (CPU)

    @property
    def name(self) -> str:
        return self.as_written().name

    def as_written(self) -> Recipe:
        return parse_recipe(_without_search(self.raw))

    def key(self) -> str:
        """A hash of everything that defines the study: the recipe and its search section. The same
        recipe file gives the same study (so a rerun resumes); any change starts another."""
        text = json.dumps(self.raw, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample a point: optional stages first, then the fields of the stages kept (a field of a
        dropped stage is not sampled, so equal recipes are equal points)."""
        point: dict[str, Any] = {}
        kept = {d.stage: d.suggest(trial) for d in self.dimensions if not d.keys}
        point.update({f"stages[{i}]": k for i, k in kept.items()})
        for d in self.dimensions:
            if d.keys and kept.get(d.stage, True):
                point[d.name] = d.suggest(trial)
        return point

    def params_to_point(self, params: dict[str, Any]) -> dict[str, Any]:
        """The YAML values of a trial's Optuna parameters."""
        by_name = {d.name: d for d in self.dimensions}
        return {k: by_name[k].value(v) if k in by_name else v for k, v in params.items()}

    def raw_recipe(self, point: dict[str, Any], drop: tuple[int, ...] = ()) -> dict[str, Any]:
        """The recipe (plain YAML values, no search section) of `point`: its fields set, the optional
        stages it leaves out and the stages in `drop` removed."""
        out = _without_search(self.raw)
        stages = copy.deepcopy(out.get("stages") or [])
        gone = set(drop) | {d.stage for d in self.dimensions if not d.keys and point.get(d.name) is False}
        for d in self.dimensions:
            if d.keys and d.name in point and d.stage not in gone:
                stages[d.stage] = _set_field(stages[d.stage], d.keys, point[d.name], d.name)
        for path, value in point.items():  # a baseline may set a field that is not a dimension
            if path not in {d.name for d in self.dimensions}:
                index, keys = parse_path(path, len(stages), "search.baselines")
                if index not in gone:
                    stages[index] = _set_field(stages[index], keys, value, path)
        out["stages"] = [s for i, s in enumerate(stages) if i not in gone]
        return out

    def recipe(self, point: dict[str, Any], drop: tuple[int, ...] = ()) -> Recipe:
        """The concrete, validated recipe of `point` (what `nncompress run` would run)."""
        return parse_recipe(self.raw_recipe(point, drop))

    def proxy(self, recipe: Recipe) -> Recipe:
        """`recipe` with every stage field named in `proxy` capped at its value: the cheap rung."""
        return cap_fields(recipe, self.caps)

    def space_size(self) -> int | None:
        """How many distinct points the space holds, or None when a dimension is a float range."""
        n = 1
        for d in self.dimensions:
            if d.choices is not None:
                n *= len(d.choices)
            elif d.is_int:
                n *= (int(d.high) - int(d.low)) // int(d.step or 1) + 1
            else:
                return None
        return n


def cap_fields(recipe: Recipe, caps: dict[str, float]) -> Recipe:
    """`recipe` with each stage field named in `caps` set to at most that value (e.g. epochs)."""
    if not caps:
        return recipe
    data = recipe.to_dict()
    for stage in data["stages"]:
        for name, cap in caps.items():
            value = stage.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
                stage[name] = type(value)(cap)
    return parse_recipe(data)


def parse_search(raw: Any) -> SearchSpec:
    """Validate a recipe (plain YAML values) that has a `search:` section; errors name the YAML path."""
    recipe = parse_recipe(_without_search(raw) if isinstance(raw, dict) else raw)  # the stages as written
    section = raw.get("search")
    if not isinstance(section, dict):
        raise ConfigError("search", "a search needs a `search:` section with a `space:` (see `nncompress search --help`)")
    unknown = sorted(set(section) - _SECTION)
    if unknown:
        raise ConfigError(f"search.{unknown[0]}", f"unknown field; a search section has {', '.join(sorted(_SECTION))}")
    n_stages = len(raw.get("stages") or [])
    dims = _optional(section.get("optional") or [], n_stages) + _space(section.get("space"), n_stages)
    if not dims:
        raise ConfigError("search.space", "names no field and no optional stage: nothing to search; "
                          "add e.g. `stages[0].ratio: [0.3, 0.5]`")
    caps = _caps(section.get("proxy", {"epochs": 1}))
    promote = section.get("promote", 6)
    if isinstance(promote, bool) or not isinstance(promote, int) or promote < 0:
        raise ConfigError("search.promote", f"must be an integer >= 0 (proxy-front points given the full recipe), got {promote!r}")
    sampler = section.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise ConfigError("search.sampler", f"must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    runtime = section.get("runtime", "torch")
    if runtime not in RUNTIMES:
        raise ConfigError("search.runtime", f"must be one of {', '.join(RUNTIMES)} (where latency is timed), got {runtime!r}")
    spec = SearchSpec(dict(raw), tuple(dims), caps, promote, sampler, (), runtime)
    baselines = _baselines(section["baselines"], spec, n_stages) if "baselines" in section else _one_factor(spec)
    spec = dataclasses.replace(spec, baselines=tuple(baselines))
    _validate(spec, recipe)
    return spec


def parse_path(path: Any, n_stages: int, where: str) -> tuple[int, tuple[str, ...]]:
    """`stages[2].weight.format.bits` -> (2, ('weight', 'format', 'bits')).

    >>> parse_path("stages[0].overrides[blocks.0].x", 1, "search.space")
    (0, ('overrides', 'blocks.0', 'x'))
    """
    if not isinstance(path, str):
        raise ConfigError(where, f"a path is a string like stages[0].ratio, got {path!r}")
    m = _STAGE.match(path)
    if not m:
        raise ConfigError(f"{where}.{path}", "a path starts with stages[i], e.g. stages[0].ratio")
    index, keys, pos = int(m.group(1)), [], m.end()
    while pos < len(path):
        k = _KEY.match(path, pos)
        if not k:
            raise ConfigError(f"{where}.{path}", f"cannot read {path[pos:]!r}; write .field or [key] after stages[i]")
        keys.append(k.group(1) or k.group(2))
        pos = k.end()
    if index >= n_stages:
        raise ConfigError(f"{where}.{path}", f"the recipe has {n_stages} stages (stages[0]..stages[{n_stages - 1}])")
    return index, tuple(keys)


def _without_search(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in raw.items() if k != "search"}


def _set_field(stage: Any, keys: tuple[str, ...], value: Any, path: str) -> dict[str, Any]:
    if not isinstance(stage, dict):
        raise ConfigError(path, "the stage is not a mapping")
    out = dict(stage)
    if len(keys) == 1:
        out[keys[0]] = copy.deepcopy(value)
        return out
    inner = out.get(keys[0], {})
    if not isinstance(inner, dict):
        raise ConfigError(path, f"{keys[0]!r} is not a mapping in the stage, so it has no field {keys[1]!r}")
    out[keys[0]] = _set_field(inner, keys[1:], value, path)
    return out


def _optional(entries: Any, n_stages: int) -> list[Dimension]:
    if not isinstance(entries, list):
        raise ConfigError("search.optional", f"expected a list of stages like [stages[1]], got {entries!r}")
    out = []
    for i, path in enumerate(entries):
        index, keys = parse_path(path, n_stages, f"search.optional[{i}]")
        if keys:
            raise ConfigError(f"search.optional[{i}]", f"names a field ({path}); name a whole stage, e.g. stages[{index}]")
        out.append(Dimension(f"stages[{index}]", index, (), choices=(True, False)))
    return out


def _space(space: Any, n_stages: int) -> list[Dimension]:
    if space is None:
        return []
    if not isinstance(space, dict):
        raise ConfigError("search.space", f"expected a mapping of paths to values, got {space!r}")
    dims = []
    for path, values in space.items():
        index, keys = parse_path(path, n_stages, "search.space")
        where = f"search.space.{path}"
        if not keys:
            raise ConfigError(where, "names a whole stage; list it under search.optional, or name a field")
        if isinstance(values, list):
            if not values:
                raise ConfigError(where, "an empty list of values; give at least one")
            dims.append(Dimension(path, index, keys, choices=tuple(values)))
        elif isinstance(values, dict):
            dims.append(_range(values, path, index, keys, where))
        else:
            raise ConfigError(where, f"expected a list of values or a range {{low: .., high: ..}}, got {values!r}")
    return dims


def _range(spec: dict[str, Any], path: str, index: int, keys: tuple[str, ...], where: str) -> Dimension:
    unknown = sorted(set(spec) - _RANGE)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"unknown field; a range has {', '.join(sorted(_RANGE))}")
    nums = {k: spec.get(k) for k in ("low", "high", "step")}
    for k, v in nums.items():
        if (v is not None or k != "step") and (isinstance(v, bool) or not isinstance(v, (int, float))
                                               or not math.isfinite(v)):
            raise ConfigError(f"{where}.{k}", f"expected a number, got {v!r}")
    low, high, step, log = nums["low"], nums["high"], nums["step"], spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log", f"expected true or false, got {log!r}")
    if not low < high:
        raise ConfigError(where, f"low must be below high, got {low} .. {high}")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}.step", f"must be > 0, got {step}")
    if log and (low <= 0 or step is not None):
        raise ConfigError(f"{where}.log", "a log range needs low > 0 and no step")
    return Dimension(path, index, keys, low=low, high=high, step=step, log=log)


def _caps(proxy: Any) -> dict[str, float]:
    if not isinstance(proxy, dict):
        raise ConfigError("search.proxy", f"expected a mapping of stage fields to caps, e.g. {{epochs: 0}}, got {proxy!r}")
    for name, cap in proxy.items():
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap < 0:
            raise ConfigError(f"search.proxy.{name}", f"expected a number >= 0 (the field's value in rung 1), got {cap!r}")
    return dict(proxy)


def _baselines(entries: Any, spec: SearchSpec, n_stages: int) -> list[Baseline]:
    if not isinstance(entries, list):
        raise ConfigError("search.baselines", f"expected a list of {{name, set, drop}}, got {entries!r}")
    out, names = [], set()
    for i, entry in enumerate(entries):
        where = f"search.baselines[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, f"expected a mapping {{name, set, drop}}, got {entry!r}")
        unknown = sorted(set(entry) - _BASELINE)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}", f"unknown field; a baseline has {', '.join(sorted(_BASELINE))}")
        name = entry.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise ConfigError(f"{where}.name", f"must be a non-empty string, unique among baselines, got {name!r}")
        names.add(name)
        values = entry.get("set") or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{where}.set", f"expected a mapping of paths to values, got {values!r}")
        for path in values:
            index, keys = parse_path(path, n_stages, f"{where}.set")
            if not keys:
                raise ConfigError(f"{where}.set.{path}", "names a whole stage; leave stages out with drop: [...]")
        drop = entry.get("drop") or []
        if not isinstance(drop, list):
            raise ConfigError(f"{where}.drop", f"expected a list of stages like [stages[1]], got {drop!r}")
        dropped = []
        for j, path in enumerate(drop):
            index, keys = parse_path(path, n_stages, f"{where}.drop[{j}]")
            if keys:
                raise ConfigError(f"{where}.drop[{j}]", f"names a field ({path}); name a whole stage")
            dropped.append(index)
        out.append(Baseline(name, dict(values), tuple(dropped)))
    return out


def _one_factor(spec: SearchSpec) -> list[Baseline]:
    """The recipe as written with one listed field changed at a time (one baseline per value)."""
    return [Baseline(f"{d.name}={_show(v)}", {d.name: v}) for d in spec.dimensions if d.keys and d.choices is not None
            for v in d.choices]


def _show(value: Any) -> str:
    return json.dumps(value, default=str) if not isinstance(value, str) else value


def _validate(spec: SearchSpec, written: Recipe) -> None:
    """Build the recipe of every listed value (others as written) and of every baseline."""
    for d in spec.dimensions:
        values = [False] if not d.keys else d.endpoints()
        for k, v in enumerate(values):
            where = f"search.space.{d.name}" if d.keys else "search.optional"
            try:
                spec.recipe({d.name: v})
            except ConfigError as e:
                raise ConfigError(f"{where}[{k}]" if d.keys else where,
                                  f"{_show(v) if d.keys else 'leaving out ' + d.name} makes an invalid recipe: {e}") from None
    for i, b in enumerate(spec.baselines):
        try:
            spec.recipe(b.values, b.drop)
        except ConfigError as e:
            raise ConfigError(f"search.baselines[{i}]", f"{b.name!r} makes an invalid recipe: {e}") from None
    try:
        cap_fields(written, spec.caps)
    except ConfigError as e:
        raise ConfigError("search.proxy", f"makes an invalid recipe: {e}") from None
