"""`Config`: the frozen dataclass every technique's options derive from.

A config round-trips through plain dicts (and so YAML): `Cfg.from_dict(cfg.to_dict()) == cfg`.
`from_dict` checks every field's type and reports the first problem with its path:

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Demo(Config):
...     ratio: float = 0.5
>>> Demo.from_dict({"ratio": "x"}, path="stages[0]")
Traceback (most recent call last):
...
nncompress.core.errors.ConfigError: stages[0].ratio: expected a number, got 'x'
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from .errors import ConfigError


_TARGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(x|ms)\s*$")


def parse_target(text: str) -> tuple[float, str]:
    """`"2x"` -> (2.0, "x"), a speedup; `"12.5ms"` -> (12.5, "ms"), milliseconds per batch.

    >>> parse_target("2x"), parse_target(" 12.5 ms")
    ((2.0, 'x'), (12.5, 'ms'))
    """
    m = _TARGET.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError("target_latency", f"expected a speedup like '2x' or milliseconds like '12ms', got {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "x" and value <= 1.0:
        raise ConfigError("target_latency", f"a speedup target must be above 1x, got {text!r}")
    return value, unit


def check(condition: bool, field: str, message: str) -> None:
    """Raise `ConfigError(field, message)` unless `condition`; for `__post_init__` validation."""
    if not condition:
        raise ConfigError(field, message)


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class for configs: frozen dataclasses with typed, path-aware (de)serialisation."""

    kind: ClassVar[str] = ""  # set by the registry at the definition site
    renamed: ClassVar[dict[str, str]] = {}  # old field -> what to write instead (recipes get a one-line hint)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every config checks its fields' types before its own `__post_init__` runs, so a config built
        in Python (`PruneConfig(ratio="half")`) fails as clearly as one read from YAML."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_checks_types", False):
            def __post_init__(self, _own=own):
                self._check_types()
                _own(self)
            __post_init__._checks_types = True
            cls.__post_init__ = __post_init__

    def __post_init__(self) -> None:
        self._check_types()

    def _check_types(self) -> None:
        """Each field against its type hint, as `from_dict` checks YAML (lists become tuples, a mapping
        where a config goes becomes that config); a mismatch is a `ConfigError` naming the field."""
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            converted = _coerce(value, hints[f.name], f.name)
            if converted is not value:
                object.__setattr__(self, f.name, converted)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind} if self.kind else {}
        for f in dataclasses.fields(self):
            out[f.name] = _to_plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> "Config":
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ConfigError(path, f"expected a mapping of {cls.__name__} fields, got {_show(data)}")
        data = {k: v for k, v in data.items() if k != "kind"}
        hints = _hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        old = [u for u in unknown if u in cls.renamed]
        if old:
            raise ConfigError(_join(path, old[0]), f"renamed: write {cls.renamed[old[0]]} instead")
        if unknown:
            raise ConfigError(_join(path, unknown[0]), f"unknown field; {cls.__name__} takes {', '.join(sorted(fields)) or 'no fields'}")
        values = {name: _coerce(value, hints[name], _join(path, name)) for name, value in data.items()}
        missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(_join(path, missing[0]), "required field is missing")
        try:
            return cls(**values)
        except ConfigError as e:
            raise e.under(path) if path else e


def tagged(data: Any, path: str, kinds: dict[str, type], what: str) -> Any:
    """A value of one of several Config classes from YAML: `{kind: nm, n: 2, m: 4}`, a bare kind name
    (`element`), or an instance (returned as is). `what` names the family in messages.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class NM(Config):
    ...     n: int = 2
    >>> tagged({"kind": "nm", "n": 1}, "granularity", {"nm": NM}, "granularity")
    NM(n=1)
    """
    if isinstance(data, tuple(kinds.values())):
        return data
    data = as_tagged(data, path, f"a {what} such as {{kind: {next(iter(kinds))}}}")
    kind = data.get("kind")
    if kind not in kinds:
        raise ConfigError(_join(path, "kind"), f"unknown {what} {kind!r}; known: {', '.join(kinds)}")
    return kinds[kind].from_dict({k: v for k, v in data.items() if k != "kind"}, path)


def as_tagged(data: Any, path: str, example: str) -> dict[str, Any]:
    """A YAML value as a `{kind: ..., **fields}` mapping: a bare string names the kind."""
    if isinstance(data, str):
        return {"kind": data}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected {example}, got {_show(data)}")
    return data


def tagged_dict(value: Any, kinds: dict[str, type]) -> dict[str, Any]:
    """The YAML form `{kind: ..., **fields}` of a value made by `tagged`."""
    kind = next(k for k, cls in kinds.items() if type(value) is cls)
    return {"kind": kind, **value.to_dict()}


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _to_plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, type):
        return value.__name__
    return value


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against the type `hint` and convert YAML-shaped values (lists -> tuples)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # Optional[X]: X's own error, with its own path
            return _coerce(value, candidates[0], path)
        errors = []
        for arg in candidates:
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(path, " or ".join(dict.fromkeys(errors)))
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {', '.join(map(repr, args))}, got {_show(value)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {_show(value)}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(path, f"expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item = args[0] if args else Any
            items = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_show(value)}")
        vt = args[1] if args else Any
        return {k: _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Config):
        return hint.from_dict(value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_show(value)}")
        return value
    return value
