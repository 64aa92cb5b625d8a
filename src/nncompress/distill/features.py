"""Feature capture and width adapters for feature distillation (FitNets hints, attention transfer).

`capture(model, names)` records the outputs of named modules with forward hooks for the duration of
a `with` block; `FeatureAdapter` maps a student's channel width to the teacher's (a learned 1x1
convolution, written as a Linear over the channel axis) when the two differ, e.g. when the student
is a pruned copy of the teacher with the same module names and fewer channels.

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> with capture(net, ["0", "2"]) as feats:
...     _ = net(torch.zeros(5, 4))
>>> {k: tuple(v.shape) for k, v in feats.items()}
{'0': (5, 3), '2': (5, 2)}
>>> with capture(net, ["1.weight"]):
...     pass
Traceback (most recent call last):
...
nncompress.core.errors.ConfigError: features: no module named '1.weight' in Sequential; close names: 1
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Iterable, Iterator, Sequence, Union

import torch
import torch.nn as nn

from ..core.calibration import capturing
from ..core.calibration import output_of as _output_of
from ..core.errors import ConfigError, DataError

__all__ = ["FeatureAdapter", "FeaturePair", "adapter_for", "capture", "channel_axis", "find_module", "output_of",
           "pairs_of"]

FeaturePair = Union[str, tuple[str, str]]  # "layers.1" (same name in both) or ("student name", "teacher name")


def pairs_of(features: Iterable[FeaturePair]) -> list[tuple[str, str]]:
    """(student name, teacher name) pairs from config entries; a bare name means the same in both.

    >>> pairs_of(["layers.0", ("fc1", "encoder.fc")])
    [('layers.0', 'layers.0'), ('fc1', 'encoder.fc')]
    """
    return [(f, f) if isinstance(f, str) else (f[0], f[1]) for f in features]


def find_module(model: nn.Module, name: str, field: str = "features") -> nn.Module:
    """The submodule called `name`; an unknown name raises `ConfigError(field, ...)` listing close names."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    known = [n for n in modules if n]
    parents = [n for n in known if name.startswith(n + ".")]  # e.g. a parameter's name was given
    close = list(dict.fromkeys(parents[::-1] + difflib.get_close_matches(name, known, n=5, cutoff=0.3)))
    close = close[:5] or known[:5]
    raise ConfigError(field, f"no module named {name!r} in {type(model).__name__}; close names: {', '.join(close)}")


@contextlib.contextmanager
def capture(model: nn.Module, names: Sequence[str], field: str = "features") -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each named module (the last call, if a module runs twice) while inside.

    The dict is filled in by every forward inside the block; the hooks are removed on exit.
    Captured tensors keep their autograd graph, so a loss on them trains the student.
    """
    for n in names:  # unknown names fail here, naming close ones
        find_module(model, n, field)
    with capturing(model, list(names)) as out:
        yield out


def output_of(model: nn.Module, name: str, inputs, call=None, field: str = "stages") -> torch.Tensor:
    """The output of module `name` on `inputs`; the forward stops there, so later layers never run.

    `call(model, inputs)` runs the model (default `model(inputs)`).

    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> tuple(output_of(net, "1", torch.zeros(5, 4)).shape)
    (5, 3)
    """
    find_module(model, name, field)
    out = _output_of(model, name, inputs, call)
    if out is None:
        raise DataError(f"{field}: module {name!r} did not run in {type(model).__name__}'s forward (or returned no "
                        "tensor); pick a module the forward calls")
    return out


def channel_axis(student: torch.Size, teacher: torch.Size, where: str) -> int | None:
    """The one axis (not the batch) on which two feature shapes differ: the width. None if equal.

    >>> channel_axis(torch.Size([8, 16, 10]), torch.Size([8, 32, 10]), "x")
    1
    """
    if len(student) != len(teacher):
        raise DataError(f"{where}: student features {tuple(student)} and teacher features {tuple(teacher)} have "
                        f"different ranks; pair modules of the same kind")
    diff = [i for i, (a, b) in enumerate(zip(student, teacher)) if a != b]
    if not diff:
        return None
    if len(diff) > 1 or diff[0] == 0:
        raise DataError(f"{where}: student features {tuple(student)} and teacher features {tuple(teacher)} differ "
                        f"in more than the width (axes {diff}); pair modules at the same resolution")
    return diff[0]


class FeatureAdapter(nn.Module):
    """FitNets' regressor: a learned linear map of the channel axis `dim` from `in_ch` to `out_ch`.

    On (N, C, L) or (N, C, H, W) features with dim=1 it is a 1x1 convolution; on (N, T, D) token
    features with dim=-1 a Linear. It trains with the student and is dropped afterwards: it is not
    part of the student model and not saved.

    >>> a = FeatureAdapter(3, 5, dim=1)
    >>> tuple(a(torch.zeros(2, 3, 7)).shape)
    (2, 5, 7)
    """

    def __init__(self, in_ch: int, out_ch: int, dim: int = 1):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(in_ch, out_ch, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.movedim(self.dim, -1)).movedim(-1, self.dim)  # (N, ..., C_in) -> (N, ..., C_out)


def adapter_for(student: torch.Tensor, teacher: torch.Tensor, where: str) -> nn.Module:
    """A `FeatureAdapter` when the widths differ, else `nn.Identity()` (created from real feature shapes)."""
    axis = channel_axis(student.shape, teacher.shape, where)
    if axis is None:
        return nn.Identity()
    return FeatureAdapter(student.shape[axis], teacher.shape[axis], dim=axis).to(student.device)
