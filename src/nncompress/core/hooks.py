"""The library's forward hooks, as context managers: capture what named modules output (or read),
stop a forward at a module, replace a module's output. Techniques use these (and `calibrate`); they
never register hooks of their own.

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> with capturing(net, ["1"]) as out:
...     _ = net(torch.zeros(5, 4))
>>> tuple(out["1"].shape)
(5, 3)
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .feeding import feed, first_arg, first_tensor

__all__ = ["capturing", "output_of", "intercepting", "collect_block_io"]


@contextlib.contextmanager
def capturing(model: nn.Module, names: Sequence[str], inputs: bool = False) -> Iterator[dict[str, Tensor]]:
    """Record the output (or, with `inputs`, the first input) of each named module while inside; the
    last call wins. Captured tensors keep their autograd graph (feature distillation trains on them)."""
    out: dict[str, Tensor] = {}
    with contextlib.ExitStack() as stack:
        for n in dict.fromkeys(names):
            m = model.get_submodule(n) if n else model
            if inputs:
                hook = (lambda _m, a, kw, n=n: out.__setitem__(n, first_arg(a, kw)))
                stack.enter_context(m.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                hook = (lambda _m, _a, o, n=n: out.__setitem__(n, first_tensor(o)))
                stack.enter_context(m.register_forward_hook(hook))
        yield out


class _Reached(Exception):
    def __init__(self, value: Any):
        super().__init__()
        self.value = value


def output_of(model: nn.Module, name: str, inputs: Any, run: Callable[[nn.Module, Any], Any] | None = None
              ) -> Tensor | None:
    """The output of module `name` on `inputs` (None if it did not run); the forward stops there."""
    def stop(_m: nn.Module, _a: Any, out: Any) -> None:
        raise _Reached(first_tensor(out))

    m = model.get_submodule(name) if name else model
    with m.register_forward_hook(stop):
        try:
            (run or (lambda mod, x: feed(mod, x)))(model, inputs)
        except _Reached as reached:
            return reached.value
    return None


@contextlib.contextmanager
def intercepting(model: nn.Module, names: Iterable[str], fn: Callable[[Any, Tensor | None], Any]) -> Iterator[None]:
    """Inside, each named module returns `fn(its output, its first input)` instead of its output
    (`fn = lambda out, x: x` skips the modules)."""
    with contextlib.ExitStack() as stack:
        for n in names:
            def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
                return fn(out, first_arg(args, kwargs))
            stack.enter_context(model.get_submodule(n).register_forward_hook(hook, with_kwargs=True))
        yield


def collect_block_io(model: nn.Module, names: Sequence[str], batch: Any, device: Any = None
                     ) -> dict[str, tuple[Tensor, Tensor]]:
    """`{name: (first input, output tensor)}` of each block on one forward of `batch` (first call)."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    with contextlib.ExitStack() as stack:
        for n in names:
            def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any, n: str = n) -> None:
                x, y = first_arg(args, kwargs), first_tensor(out)
                if x is not None and y is not None and n not in seen:
                    seen[n] = (x.detach(), y.detach())
            stack.enter_context(model.get_submodule(n).register_forward_hook(hook, with_kwargs=True))
        with torch.no_grad():
            feed(model, batch, device)
    return seen
