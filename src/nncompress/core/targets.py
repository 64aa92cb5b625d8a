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
        if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        if self.types:
            return any(_is_type(module, t) for t in self.types)
        return True

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
    if isinstance(t, type):
        return isinstance(module, t)
    return any(cls.__name__ == t for cls in type(module).__mro__)
