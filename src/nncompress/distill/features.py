"""Feature capture and width adapters for feature distillation (FitNets hints, attention transfer).

`capture(model, names)` records the outputs of named modules with forward hooks for the duration of
a `with` block; `FeatureAdapter` maps a student's channel width to the teacher's (a learned 1x1
convolution, written as a Linear over the channel axis) when the two differ, e.g. when the student
is a pruned copy of the teacher with the same module names and fewer channels.
For transformers, `attention_modules` / `block_of` find the attention modules and the blocks holding
them, and `capture_attention` records attention probabilities (N, H, Q, K) the same way.

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
import functools
from typing import Any, Iterable, Iterator, Sequence, Union

import torch
import torch.nn as nn

from ..core.calibration import capturing, intercepting
from ..core.calibration import output_of as _output_of
from ..core.errors import ConfigError, DataError

__all__ = ["FeatureAdapter", "FeaturePair", "adapter_for", "attention_modules", "block_of", "capture",
           "capture_attention", "channel_axis", "find_module", "output_of", "pairs_of"]

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


# ------------------------------------------------------------------------------------ transformers

# what marks an attention module: an int head count or head size (the names Hugging Face models use)
_HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head", "attention_head_size", "head_dim")


def attention_modules(model: nn.Module) -> list[str]:
    """Names of the attention modules (those holding an int head count or head size), in the order they are
    registered, i.e. layer order; a module inside another one found is left out (the outer one is kept).

    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16))
    >>> attention_modules(bert)
    ['encoder.layer.0.attention.self', 'encoder.layer.1.attention.self']
    """
    found: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(f + ".") for f in found):
            continue
        if any(isinstance(getattr(m, a, None), int) and not isinstance(getattr(m, a), bool) for a in _HEAD_ATTRS):
            found.append(name)
    return found


def block_of(model: nn.Module, name: str) -> str | None:
    """The block holding module `name`: its nearest ancestor that is an item of a ModuleList / Sequential
    (`encoder.layer.3` for `encoder.layer.3.attention.self`), or None.

    >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    >>> block_of(net, "0.0")
    '0.0'
    """
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        parent = model.get_submodule(".".join(parts[:i - 1])) if i > 1 else model
        if parts[i - 1].isdigit() and isinstance(parent, (nn.ModuleList, nn.Sequential)):
            return ".".join(parts[:i])
    return None


def _record_probabilities(out: dict[str, torch.Tensor], name: str, output: Any, _x: Any) -> Any:
    """`intercepting`'s function: keep the attention probabilities an attention module returns (the second
    item of `(output, probabilities)`), hand its output on unchanged."""
    probs = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
    if not torch.is_tensor(probs) or probs.dim() not in (3, 4):
        raise DataError(f"attention_kl_weight: module {name!r} returned no attention probabilities (it must return "
                        "(output, probabilities (N, H, Q, K)), as Hugging Face attention does when eager); "
                        "set attention_kl_weight: 0 for this model")
    out[name] = probs if probs.dim() == 4 else probs.unsqueeze(1)  # (N, Q, K), averaged over heads: one head
    return output


def _hf_models(model: nn.Module) -> list[nn.Module]:
    """The outermost Hugging Face models inside `model` (they choose their attention kernel)."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if hasattr(m, "set_attn_implementation") and not any(name.startswith(f + ".") or not f for f, _ in found):
            found.append((name, m))
    return [m for _, m in found]


@contextlib.contextmanager
def capture_attention(model: nn.Module, names: Sequence[str], field: str = "attention_kl_weight"
                      ) -> Iterator[dict[str, torch.Tensor]]:
    """Record the attention probabilities (N, H, Q, K) of each named attention module while inside.

    Attention kernels (SDPA, flash) never form the probabilities, so inside, Hugging Face models inside
    `model` compute attention eagerly, and the named modules do so without attention dropout: dropout
    zeroes random probabilities (a zero's KL is infinite) and rescales the others. Everything else (the
    rest of the dropout included) runs as it was; the kernel and the modules' modes come back on exit.
    The probabilities keep their autograd graph; padded keys have probability 0 (the models' masks).

    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    >>> with capture_attention(bert, ["encoder.layer.0.attention.self"]) as probs:
    ...     _ = bert(input_ids=torch.ones(3, 5, dtype=torch.long))
    >>> p = probs["encoder.layer.0.attention.self"]
    >>> tuple(p.shape), bool(torch.allclose(p.sum(-1), torch.ones(3, 2, 5)))
    ((3, 2, 5, 5), True)
    """
    modules = [find_module(model, n, field) for n in names]
    out: dict[str, torch.Tensor] = {}
    kernels = [(m, m.config._attn_implementation) for m in _hf_models(model)]
    modes = [(m, m.training) for m in modules]
    with contextlib.ExitStack() as stack:
        for n in dict.fromkeys(names):  # one interception per module, so each knows its name
            stack.enter_context(intercepting(model, [n], functools.partial(_record_probabilities, out, n)))
        try:
            for m, _ in kernels:
                m.set_attn_implementation("eager")
            for m in modules:
                m.training = False  # this module only (not .eval(), which recurses): no dropout on its softmax
            yield out
        finally:
            for m, was in modes:
                m.training = was
            for m, kernel in kernels:
                if isinstance(kernel, str):
                    m.set_attn_implementation(kernel)
                else:
                    m.config._attn_implementation = kernel
