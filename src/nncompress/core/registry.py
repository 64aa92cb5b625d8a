"""One registry, one line at the definition site.

Transforms register with their config class; other namespaces (importance criteria, observers, ...)
register plain callables:

    @register("finetune", config=FinetuneConfig)
    def finetune(model, config, ctx): ...

    @register("l1", namespace="importance")
    def l1_importance(weight): ...

Duplicate names raise. `kind` on the config class is set here, so nothing else has to be edited.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .config import Config
from .errors import RegistryError

_TABLES: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class Transform:
    """A registered transform: `fn(model, config, ctx) -> model` with its config class."""

    name: str
    fn: Callable[..., Any]
    config: type[Config]
    doc: str


def register(name: str, *, config: type[Config] | None = None, namespace: str | None = None):
    """Decorator: register `fn` under `name` (a transform when `config` is given)."""
    if config is not None and namespace is not None:
        raise TypeError("a transform lives in the 'transform' namespace; give config or namespace, not both")
    space = "transform" if config is not None else namespace
    if space is None:
        raise TypeError("register() needs config= (a transform) or namespace=")

    def wrap(fn):
        table = _TABLES.setdefault(space, {})
        if name in table:
            raise RegistryError(f"{space} {name!r} is registered twice ({_where(table[name])} and {_where(fn)})")
        if config is not None:
            if config.__dict__.get("kind"):
                raise RegistryError(f"{config.__name__} is already the config of transform {config.kind!r}")
            config.kind = name
            table[name] = Transform(name, fn, config, (fn.__doc__ or "").strip().split("\n")[0])
        else:
            table[name] = fn
        return fn

    return wrap


def _where(obj: Any) -> str:
    fn = obj.fn if isinstance(obj, Transform) else obj
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def lookup(name: str, namespace: str = "transform") -> Any:
    """The entry registered as `name`; an unknown name raises, listing the known ones."""
    table = _TABLES.get(namespace, {})
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise RegistryError(f"unknown {namespace} {name!r}; known: {known}")
    return table[name]


def names(namespace: str = "transform") -> list[str]:
    return sorted(_TABLES.get(namespace, {}))


def transform_for(config: Config) -> Transform:
    """The transform whose config class is `type(config)`."""
    if not isinstance(config, Config) or not type(config).kind:
        raise RegistryError(f"{type(config).__name__} is not the config of a registered transform")
    return lookup(type(config).kind)
