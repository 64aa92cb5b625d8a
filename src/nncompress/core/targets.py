"""`Targets`: which modules a transform touches, the same way for every transform.

>>> import torch.nn as nn
>>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
>>> [name for name, _ in Targets(types=("Linear",), exclude=("2",)).select(m)]
['0']
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import torch.nn as nn

from .config import Config, check
from .errors import TargetError


@dataclasses.dataclass(frozen=True)
class Targets(Config):
    """Select modules by fully qualified name (glob) and by type.

    include: globs a module's name must match (default: every module)
    exclude: globs that remove a module (and, with `.*` forms, its children)
    types:   class names (`Linear`, `Conv1d`, or any class in the model) or classes
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    types: tuple[Any, ...] = ()

    def __post_init__(self):
        check(all(isinstance(p, str) for p in self.include), "include", "must be a list of glob strings")
        check(all(isinstance(p, str) for p in self.exclude), "exclude", "must be a list of glob strings")
        check(all(isinstance(t, (str, type)) for t in self.types), "types", "must be class names or classes")

    def to_dict(self):
        d = super().to_dict()
        d["types"] = [t if isinstance(t, str) else t.__name__ for t in self.types]
        return d

    def matches(self, name: str, module: nn.Module) -> bool:
        return self.matches_name(name) and self.matches_type(module)

    def matches_name(self, name: str) -> bool:
        """`name` is included and not excluded."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not self.excludes(name)

    def excludes(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def matches_type(self, module: nn.Module) -> bool:
        """No `types` given, or `module` is one of them (a wrapper also counts as the layer it stands for)."""
        return not self.types or any(_is_type(module, t) for t in self.types)

    def short(self) -> str:
        """The non-default fields, for messages: `include=['enc.*'], types=['Linear']`."""
        parts = [f"{f}={list(v if f != 'types' else self.to_dict()['types'])}"
                 for f, v in (("include", self.include), ("exclude", self.exclude), ("types", self.types))
                 if v and v != ("*",)]
        return ", ".join(parts) or "every module"

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The `(name, module)` pairs of `model` this selection matches, in model order.

        A type name that is no class in the model nor in `torch.nn` raises, as does an include
        pattern that matches nothing: both are almost always typos.
        """
        modules = list(model.named_modules())
        known = {type(m).__name__ for _, m in modules}
        for t in self.types:
            if isinstance(t, str) and t not in known and not isinstance(getattr(nn, t, None), type):
                raise TargetError(f"targets.types: no class named {t!r} in the model or torch.nn; "
                                  f"the model has {', '.join(sorted(known))}")
        for p in self.include:
            if p != "*" and not any(fnmatch.fnmatchcase(n, p) for n, _ in modules):
                sample = ", ".join(n for n, _ in modules[1:6])
                raise TargetError(f"targets.include: {p!r} matches no module; names look like: {sample}")
        return [(n, m) for n, m in modules if self.matches(n, m)]


def _is_type(module: nn.Module, t) -> bool:
    plain = getattr(module, "stands_for", None)  # a value wrapper (quantized Linear) is still a Linear
    classes = [type(module)] + ([plain] if isinstance(plain, type) else [])
    if isinstance(t, type):
        return any(issubclass(c, t) for c in classes)
    return any(base.__name__ == t for c in classes for base in c.__mro__)
