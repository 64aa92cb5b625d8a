"""Calibration: one pass that captures what a technique asks for (with `feeding`, the one way to feed a
batch, and `hooks`, the library's only forward hooks).

    stats = calibrate(model, data.calib, {"fc1": ("gram",), "fc2": ("absmax", "mean")}, batches=8)
    stats["fc1"].gram()          # (I, I) float64 Gram matrix of fc1's inputs over the calibration rows
    stats["fc2"].absmax          # (I,) max |x| per input channel

Rows are what a layer's weight multiplies: tokens (padding left out when the batch carries an
`attention_mask`) of a Linear's input, pixels of a convolution's channels, or, for `patch_gram`,
a convolution's unfolded patches (GPTQ's Hessian). The forward stops as soon as every module asked
about has run, so calibrating early layers of a deep model costs little. `sequential_blocks` runs
a stack of blocks one at a time on cached inputs, so block k is calibrated on the outputs of the
already compressed blocks before it, with memory bounded by one block's activations.

Under torchrun (every rank calibrating in step, as recipe stages do) the batches are dealt out: rank r
feeds batches r, r + N, ... and the sums are all-reduced (`LayerStats.all_reduce`), so every rank ends
with the statistics of all the batches, as one process computes them up to float summation order.

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
>>> x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]])
>>> s = calibrate(net, [(x, None)], {"0": ("absmax", "count")})
>>> s["0"].absmax.tolist(), s["0"].count
([1.0, 2.0, 1.0], 2)
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .errors import DataError
from .feeding import batch_inputs, evaluating, feed, first_arg, first_tensor, move, take
from .hooks import capturing, collect_block_io, intercepting, output_of  # noqa: F401  (re-exported)

__all__ = ["LayerStats", "calibrate", "io_shapes", "gradient_sums", "sequential_blocks", "BlockInputs", "block_chain",
           "channel_rows", "patch_rows", "STATS",
           # feeding and hooks, re-exported: one import for a technique's calibration needs
           "batch_inputs", "move", "feed", "first_tensor", "evaluating", "capturing", "output_of", "intercepting",
           "collect_block_io"]

STATS = ("count", "mean", "sqnorm", "absmax", "gram", "patch_gram", "out_absmean")


# ------------------------------------------------------------------------------------ statistics

@dataclasses.dataclass
class LayerStats:
    """Running statistics of one module's inputs (rows x channels) and outputs, over calibration batches."""

    want: tuple[str, ...]
    count: int = 0
    sum: Tensor | None = None          # (I,) float64
    sq: Tensor | None = None           # (I,) float64, sum of x^2
    absmax: Tensor | None = None       # (I,) float32
    xtx: Tensor | None = None          # (I, I) float64, sum of x x^T (rows, or conv patches for patch_gram)
    gram_rows: int = 0
    out_abs: Tensor | None = None      # (C,) float64, sum of |y| per output channel
    out_rows: int = 0
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def add_input(self, module: nn.Module, x: Tensor, mask: Tensor | None) -> None:
        rows = channel_rows(module, x, mask).detach()                  # (T, I)
        self.count += rows.shape[0]
        if {"mean", "sqnorm"} & set(self.want):
            r64 = rows.double()
            self.sum = _acc(self.sum, r64.sum(0))
            self.sq = _acc(self.sq, r64.pow(2).sum(0))
        if "absmax" in self.want:
            cur = rows.abs().amax(0).float() if rows.numel() else None
            if cur is not None:
                self.absmax = cur if self.absmax is None else torch.maximum(self.absmax, cur)
        if "gram" in self.want or "patch_gram" in self.want:
            g = patch_rows(module, x) if "patch_gram" in self.want else rows
            g = g.double()
            self.xtx = _acc(self.xtx, (g.T @ g).double())
            self.gram_rows += g.shape[0]

    def add_output(self, module: nn.Module, y: Tensor) -> None:
        y = y.detach()
        y = y.movedim(1, -1) if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) else y
        flat = y.reshape(-1, y.shape[-1]).abs().double()               # (rows, C)
        self.out_abs = _acc(self.out_abs, flat.sum(0))
        self.out_rows += flat.shape[0]

    def all_reduce(self) -> None:
        """Sum (absmax: max) this rank's statistics with the other ranks' (`calibrate` under torchrun)."""
        from . import distributed
        tensors = (self.sum, self.sq, self.absmax, self.xtx, self.out_abs)
        layout = distributed.all_gather_object([None if t is None else tuple(t.shape) for t in tensors])
        if any(other != layout[0] for other in layout):
            raise DataError(f"calibration under torchrun: the ranks' inputs to a module differ in shape ({layout}); "
                            "calibrate in one process")
        device = next((t.device for t in tensors if t is not None), torch.device("cpu"))  # nccl reduces on the GPU
        counts = distributed.all_reduce_sum([float(self.count), float(self.gram_rows), float(self.out_rows)], device)
        self.count, self.gram_rows, self.out_rows = (int(round(v)) for v in counts)
        self.sum, self.sq, self.xtx, self.out_abs = (
            distributed.all_reduce_tensor(t) for t in (self.sum, self.sq, self.xtx, self.out_abs))
        self.absmax = distributed.all_reduce_tensor(self.absmax, op="max")

    def mean(self) -> Tensor:
        """E[x] per input channel (I,)."""
        return self.sum / max(self.count, 1)

    def norm(self) -> Tensor:
        """||X_j||_2 per input channel: Wanda's activation norm."""
        return self.sq.sqrt()

    def gram(self) -> Tensor:
        """X^T X (float64) over every calibration row."""
        return self.xtx

    def hessian(self) -> Tensor:
        """H = 2 X^T X / n: the layer-wise Hessian of ||W X - W' X||^2 (mean over rows)."""
        return 2 * self.xtx / max(self.gram_rows, 1)

    def out_absmean(self) -> Tensor:
        """E|y| per output channel (C,)."""
        return self.out_abs / max(self.out_rows, 1)


def _acc(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total + value


def _is_conv(module: nn.Module) -> bool:
    plain = getattr(module, "stands_for", None)  # a wrapped conv (quantized) still has conv inputs
    return issubclass(plain if isinstance(plain, type) else type(module), nn.modules.conv._ConvNd)


def channel_rows(module: nn.Module, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """(rows, channels) of a layer input: pixels of a conv's channels, else the last dim's rows
    (tokens; padding left out under `token_mask` (N, T))."""
    if _is_conv(module):
        return x.movedim(1, -1).reshape(-1, x.shape[1])                  # (N * spatial, C)
    if token_mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(token_mask.shape):
        x = x[token_mask.to(x.device).bool()]                            # (tokens, I): padding left out
    return x.reshape(-1, x.shape[-1])                                    # (rows, I)


def patch_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows a layer's weight (O, C) multiplies: (M, C) for a Linear, unfolded patches for a conv."""
    if isinstance(module, nn.Linear) or not isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return x.reshape(-1, x.shape[-1])                                # (N * ..., I)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)                                               # (N, C, 1, L)
        k, s, d = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
    else:
        k, s, d = module.kernel_size, module.stride, module.dilation
    cols = F.unfold(x, k, dilation=d, stride=s)                          # (N, C * k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])               # (N * L, C * k)


class _Stop(Exception):
    """Ends a forward pass once every module asked about has run."""


def calibrate(model: nn.Module, loader: Iterable, wants: Mapping[str, Iterable[str]], *, batches: int = 8,
              device: torch.device | str | None = None, stop_early: bool = True, first_group: bool = False,
              runner: Callable[[nn.Module, Any], Any] | None = None,
              masks: Sequence[Tensor | None] = ()) -> dict[str, LayerStats]:
    """Feed up to `batches` batches of `loader` and accumulate, for each module name in `wants`, the
    statistics it names (any of `STATS`; "shape" adds the first input / output shapes).

    Runs in eval mode without gradients (the mode comes back after); modules the data never reaches
    are absent from the result. `runner(model, batch)` replaces `feed` (e.g. to run under a context);
    `masks[i]` is then batch i's token mask (B, T) (padding left out of the rows), if any.
    first_group: only the first of the modules the forward reaches, with those fed that very same input
    tensor (attention's q, k and v, which can be compressed together); they share one set of sums.
    """
    stats = {n: LayerStats(tuple(w)) for n, w in wants.items()}
    for w in stats.values():
        unknown = set(w.want) - set(STATS) - {"shape"}
        if unknown:
            raise ValueError(f"calibrate: unknown statistic {sorted(unknown)[0]!r}; known: {', '.join(STATS)}")
    state: dict[str, Any] = {"mask": None, "seen": set(), "anchor": None, "batch": 0}
    group: list[str] = []

    def accumulates(name: str, module: nn.Module, x: Tensor) -> bool:
        """first_group: whether this call adds to the sums; raises `_Stop` once past the group."""
        if state["batch"] == 0 and name not in group:  # the first batch finds the group
            if state["anchor"] is None:
                state["anchor"] = x
            elif x is not state["anchor"]:
                raise _Stop
            lead = group[0] if group else None
            group.append(name)
            if lead is not None and type(module) is type(modules[lead]) and stats[name].want == stats[lead].want:
                stats[name] = stats[lead]  # the very same input: one set of sums
        if name not in group:
            raise _Stop
        return name == group[0] or stats[name] is not stats[group[0]]

    def pre(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = first_arg(args, kwargs)
            if x is None or not x.is_floating_point():
                return
            if first_group and not accumulates(name, module, x):
                stats[name].shapes = stats[name].shapes or (tuple(x.shape), ())
                return
            stats[name].add_input(module, x, state["mask"])
            if stats[name].shapes is None:
                stats[name].shapes = (tuple(x.shape), ())
        return hook

    def post(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            st = stats[name]
            y = first_tensor(out)
            if y is not None and "out_absmean" in st.want:
                st.add_output(module, y)
            if y is not None and st.shapes is not None and not st.shapes[1]:
                st.shapes = (st.shapes[0], tuple(y.shape))
            state["seen"].add(name)
            expected = len(group) if first_group and state["batch"] > 0 else len(stats)
            if stop_early and len(state["seen"]) >= expected:
                raise _Stop
        return hook

    modules = {n: model.get_submodule(n) if n else model for n in stats}
    with contextlib.ExitStack() as stack:
        for n, m in modules.items():
            stack.enter_context(m.register_forward_pre_hook(pre(n), with_kwargs=True))
            stack.enter_context(m.register_forward_hook(post(n), with_kwargs=True))
        stack.enter_context(evaluating(model))
        fed = 0
        mine, dealt = _dealt(take(loader, batches))
        for j, (i, batch) in enumerate(mine):
            inputs = batch_inputs(batch) if runner is None else None
            mask = (inputs.get("attention_mask") if isinstance(inputs, Mapping) else None) if runner is None else (
                masks[i] if i < len(masks) else None)
            state.update(batch=j, seen=set(), anchor=None, mask=mask)
            fed += 1
            try:
                (runner or (lambda m, b: feed(m, b, device)))(model, batch)
            except _Stop:
                pass
    if not fed:
        raise DataError("the calibration loader yielded no batches; give the data a calib split with at least one")
    if dealt:
        _all_reduce(stats)
    if first_group:
        return {n: stats[n] for n in group}
    return {n: s for n, s in stats.items() if s.shapes is not None}


def _dealt(batches: Iterable) -> tuple[list[tuple[int, Any]], bool]:
    """This rank's share of the calibration batches, with their indices, and whether they were dealt
    out (under torchrun with at least one batch per rank; otherwise every rank feeds them all)."""
    from . import distributed
    items = list(enumerate(batches))
    size = distributed.world()
    if size == 1 or len(items) < size:
        return items, False
    return items[distributed.rank()::size], True


def _all_reduce(stats: dict[str, LayerStats]) -> None:
    from . import distributed
    reached = sorted(n for n, st in stats.items() if st.shapes is not None)
    everyone = distributed.all_gather_object(reached)
    if any(names != reached for names in everyone):
        raise DataError("calibration under torchrun: the ranks' batches reached different modules "
                        f"({' vs '.join(map(str, everyone))}); calibrate in one process")
    done: set[int] = set()
    for n in reached:  # a first_group's members share one set of sums: reduced once
        if id(stats[n]) not in done:
            done.add(id(stats[n]))
            stats[n].all_reduce()


def io_shapes(model: nn.Module, names: Sequence[str], inputs: Any) -> dict[str, tuple]:
    """`{name: (input shape, output shape)}` of each module on one forward of `inputs`."""
    stats = calibrate(model, [inputs], {n: ("shape",) for n in names}, batches=1)
    return {n: s.shapes for n, s in stats.items()}


def gradient_sums(model: nn.Module, loader: Iterable, loss_fn: Callable[[nn.Module, Any], Tensor], batches: int,
                  params: Mapping[str, Tensor] | None = None, squares: bool = False
                  ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Sum of dL/dp (and of its square, per batch, with `squares`) over up to `batches` batches, for
    `params` (default: every named parameter), in eval mode (BatchNorm uses running statistics: the
    deployed network). The model's mode and the parameters' `.grad` are restored afterwards."""
    params = dict(params) if params is not None else dict(model.named_parameters())
    saved = {n: p.grad for n, p in params.items()}
    grad: dict[str, Tensor] = {}
    grad_sq: dict[str, Tensor] = {}
    was = model.training
    model.eval()
    try:
        for batch in take(loader, batches):
            for p in params.values():
                p.grad = None
            loss_fn(model, batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    grad[n] = _acc(grad.get(n), p.grad.detach())
                    if squares:
                        grad_sq[n] = _acc(grad_sq.get(n), p.grad.detach().pow(2))
    finally:
        for n, p in params.items():
            p.grad = saved[n]
        model.train(was)
    return grad, grad_sq


# ------------------------------------------------------------------------------------ block by block

@dataclasses.dataclass
class BlockInputs:
    """The calls a block received for each calibration batch: positional args and keyword args."""

    calls: list[tuple[tuple, dict]]
    masks: list[Tensor | None] = dataclasses.field(default_factory=list)  # each batch's token mask (B, T)

    def run(self, block: nn.Module) -> list[Any]:
        with torch.no_grad():
            return [block(*a, **k) for a, k in self.calls]

    def stats(self, block: nn.Module, wants: Mapping[str, Iterable[str]], first_group: bool = False
              ) -> dict[str, LayerStats]:
        """`calibrate` over the block alone, fed the cached calls (names relative to the block)."""
        def runner(m: nn.Module, call: Any) -> Any:
            a, k = call
            return m(*a, **k)
        return calibrate(block, self.calls, wants, batches=len(self.calls), runner=runner, masks=self.masks,
                         first_group=first_group)

    def advance(self, outputs: list[Any]) -> "BlockInputs":
        """The next block's calls: this block's output in place of its hidden-state input."""
        return BlockInputs([_with_hidden(call, first_tensor(out)) for call, out in zip(self.calls, outputs)],
                           self.masks)

    def pass_through(self, block: nn.Module) -> None:
        """Run `block` on each call and put its output in place of that call's hidden state, one call
        at a time: the next block's inputs, holding one set of hidden states rather than two."""
        with torch.no_grad():
            for i, (a, k) in enumerate(self.calls):
                self.calls[i] = _with_hidden((a, k), first_tensor(block(*a, **k)))


def _with_hidden(call: tuple[tuple, dict], y: Tensor) -> tuple[tuple, dict]:
    a, k = call
    if a and torch.is_tensor(a[0]):
        return (y, *a[1:]), k
    return a, {**k, "hidden_states": y}


def sequential_blocks(model: nn.Module, blocks: Sequence[str], loader: Iterable, batches: int,
                      step: Callable[[str, nn.Module, BlockInputs], None], device: Any = None) -> None:
    """Compress a chain of blocks one at a time: block k's inputs are block k-1's outputs after
    `step(name, block, inputs)` compressed it (the first block's come from the model on the data).

    Only one block's inputs are held at a time. The blocks must form a chain (each one's output is the
    next one's hidden-state input), as the layer stacks of transformers and residual networks do.
    """
    calls: list[tuple[tuple, dict]] = []
    first = model.get_submodule(blocks[0])

    def catch(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _Stop

    masks: list[Tensor | None] = []
    with first.register_forward_pre_hook(catch, with_kwargs=True), evaluating(model):
        for batch in take(loader, batches):
            inputs = batch_inputs(batch)
            masks.append(inputs.get("attention_mask") if isinstance(inputs, Mapping) else None)
            try:
                feed(model, batch, device)
            except _Stop:
                pass
    if not calls:
        raise DataError(f"calibration never reached {blocks[0]!r}; check the data matches the model")
    inputs = BlockInputs(calls, masks[:len(calls)])
    for name in blocks:
        block = model.get_submodule(name)
        was = block.training
        block.eval()
        step(name, block, inputs)
        inputs.pass_through(block)
        block.train(was)


def block_chain(model: nn.Module, names: Sequence[str], loader: Iterable, device: Any = None) -> list[str]:
    """The blocks of the layer stack (an `nn.ModuleList`) that holds the most of the layers `names`,
    in order, if they form a chain: on a calibration batch, each block's hidden-state input is the
    output of the block before it (transformers' layer stacks). [] when no stack holds any of them or
    the blocks do not chain, so a caller falls back to calibrating through the whole model.

    >>> class Stack(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    ...     def forward(self, x):
    ...         for layer in self.layers:
    ...             x = layer(x)
    ...         return x
    >>> block_chain(Stack(), ["layers.1"], [(torch.randn(2, 4), None)])
    ['layers.0', 'layers.1', 'layers.2']
    """
    best: list[str] = []
    hits = 0
    for prefix, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2:
            continue
        kids = [f"{prefix}.{i}" if prefix else str(i) for i in range(len(m))]
        n = sum(any(name == k or name.startswith(k + ".") for k in kids) for name in names)
        if n > hits:
            best, hits = kids, n
    return best if best and _chained(model, best, loader, device) else []


def _chained(model: nn.Module, blocks: list[str], loader: Iterable, device: Any) -> bool:
    seen_in: dict[str, Tensor | None] = {}
    seen_out: dict[str, Tensor | None] = {}

    def pre(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            seen_in.setdefault(name, first_arg(args, kwargs))
        return hook

    def post(name: str) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            seen_out.setdefault(name, first_tensor(out))
        return hook

    with contextlib.ExitStack() as stack:
        for name in blocks:
            block = model.get_submodule(name)
            stack.enter_context(block.register_forward_pre_hook(pre(name), with_kwargs=True))
            stack.enter_context(block.register_forward_hook(post(name)))
        stack.enter_context(evaluating(model))
        stack.enter_context(torch.no_grad())
        for batch in take(loader, 1):
            feed(model, batch, device)
    pairs = zip(blocks, blocks[1:])
    return all(seen_out.get(a) is not None and seen_in.get(b) is not None and seen_out[a].shape == seen_in[b].shape
               and torch.equal(seen_out[a], seen_in[b]) for a, b in pairs)
