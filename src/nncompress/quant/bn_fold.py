"""Eager edits that prepare a model for quantization without changing what it computes:
BatchNorm folding and cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019).

    pairs = fold_batchnorm(model.eval())          # [("stem.0", "stem.1"), ...]; BNs become Identity
    pairs = equalize(model)                       # [("net.0", "net.2"), ...]; same outputs, even ranges

Which layer feeds which is found, in this order of preference:
1. `torch.fx.symbolic_trace` (exact data flow, functional ReLUs included);
2. if fx cannot trace the model (data-dependent control flow) and example inputs are given: one
   forward pass with hooks, reading consumers off the autograd graph (module-to-module edges only);
3. otherwise adjacent children of `nn.Sequential` containers (whose outputs feed only the next child).

Limits: a producer is edited only when its output feeds nothing but the BN (or the activation), and
each module is called once. Transposed convs, grouped convs (for equalization), BNs without running
statistics and activations that are not positively homogeneous (ReLU6, GELU) are left alone.
Folding is an inference-time edit: it is exact in eval mode only.

>>> m = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3)).eval()
>>> fold_batchnorm(m)
[('0', '1')]
>>> type(m[1]).__name__
'Identity'
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core import Edits

__all__ = ["fold_batchnorm", "fold_bn_weights", "find_conv_bn_pairs", "equalize", "equalization_scales",
           "find_equalization_pairs"]

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU)


@dataclasses.dataclass
class _Node:
    module: nn.Module | None      # None: a functional relu
    users: list[str]              # consumers (names) that are known
    sole: bool                    # the output has exactly one consumer in the whole graph
    calls: int = 1


# ------------------------------------------------------------------------------------ data flow

def _fx_flow(model: nn.Module) -> dict[str, _Node]:
    gm = torch.fx.symbolic_trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    def label(n: torch.fx.Node) -> str:
        if n.op == "call_module":
            return n.target
        if ((n.op == "call_function" and n.target in (F.relu, torch.relu))
                or (n.op == "call_method" and n.target == "relu")):
            return f"<relu:{n.name}>"
        return f"<{n.op}:{n.name}>"

    flow: dict[str, _Node] = {}
    for n in gm.graph.nodes:
        name = label(n)
        if n.op == "call_module" or name.startswith("<relu:"):
            users = [label(u) for u in n.users]
            node = flow.get(name)
            if node is None:
                flow[name] = _Node(modules.get(n.target) if n.op == "call_module" else None, users,
                                   len(users) == 1, calls.get(n.target, 1))
            else:  # a module called again: never a candidate (calls > 1)
                node.users += users
                node.sole = False
    return flow


def _autograd_flow(model: nn.Module, inputs: Any) -> dict[str, _Node]:
    leaves = [(n, m) for n, m in model.named_modules() if n and next(m.children(), None) is None]
    fn_in, fn_out, calls = {}, {}, Counter()

    def pre(name):
        def hook(_m, args):
            if args and isinstance(args[0], Tensor):
                fn_in[name] = args[0].grad_fn
        return hook

    def post(name):
        def hook(_m, _args, out):
            calls[name] += 1
            if isinstance(out, Tensor):
                fn_out[name] = out.grad_fn
        return hook

    handles = [h for n, m in leaves for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            if isinstance(inputs, dict):
                out = model(**inputs)
            else:
                x = inputs.detach().clone()
                if x.is_floating_point():
                    x.requires_grad_(True)
                out = model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    roots = [t.grad_fn for t in (out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list))
                                 else [out]) if isinstance(t, Tensor) and t.grad_fn is not None]
    refs, seen, stack = Counter(), set(), list(roots)
    while stack:  # how many edges point at each autograd node: its number of consumers
        f = stack.pop()
        for nf, _ in f.next_functions:
            if nf is not None:
                refs[id(nf)] += 1
                if id(nf) not in seen:
                    seen.add(id(nf))
                    stack.append(nf)
    owner = {id(f): n for n, f in fn_out.items() if f is not None}
    modules = dict(leaves)
    flow = {n: _Node(modules[n], [], refs[id(fn_out[n])] == 1 if fn_out.get(n) is not None else False, calls[n])
            for n in fn_out}
    for consumer, f in fn_in.items():
        producer = owner.get(id(f)) if f is not None else None
        if producer is not None and producer != consumer:
            flow[producer].users.append(consumer)
    return flow


def _sequential_flow(model: nn.Module) -> dict[str, _Node]:
    flow: dict[str, _Node] = {}
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (a, ma), (b, _) in zip(children, children[1:]):
            flow[f"{name}.{a}" if name else a] = _Node(ma, [f"{name}.{b}" if name else b], True)
    return flow


def _flow(model: nn.Module, example_inputs: Any = None) -> dict[str, _Node]:
    try:
        return _fx_flow(model)
    except Exception:  # fx cannot trace data-dependent control flow; fall back as documented
        if example_inputs is not None:
            return _autograd_flow(model, example_inputs)
        return _sequential_flow(model)


def _next(flow: dict[str, _Node], name: str) -> str | None:
    """The one consumer of `name`'s output, looking through `nn.Identity` (a folded BN); else None."""
    node = flow.get(name)
    while True:
        if node is None or not node.sole or node.calls != 1 or len(node.users) != 1:
            return None
        user = node.users[0]
        node = flow.get(user)
        if node is None or not isinstance(node.module, nn.Identity):
            return user


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


# ------------------------------------------------------------------------------------ BN folding

def find_conv_bn_pairs(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
    """(layer, bn) names where the Linear/Conv output feeds only that BatchNorm."""
    flow = _flow(model, example_inputs)
    pairs = []
    for name, node in flow.items():
        if not isinstance(node.module, _FOLDABLE):
            continue
        bn_name = _next(flow, name)
        bn = flow[bn_name].module if bn_name in flow else dict(model.named_modules()).get(bn_name)
        if (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats
                and bn.running_mean is not None and bn.num_features == _out_channels(node.module)
                and (bn_name not in flow or flow[bn_name].calls == 1)):
            pairs.append((name, bn_name))
    return pairs


def fold_bn_weights(w: Tensor, b: Tensor | None, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """(w', b') with layer'(x) == bn(layer(x)) in eval mode; computed in float64.

    w' = w * gamma / sqrt(var + eps) per output channel; b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    """
    var, mean = bn.running_var.double(), bn.running_mean.double()
    k = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        k = k * bn.weight.detach().double()
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    b0 = b.detach().double() if b is not None else torch.zeros_like(mean)
    w_new = w.detach().double() * k.view(-1, *([1] * (w.ndim - 1)))   # (O, ...) scaled per output channel
    return w_new.to(w.dtype), ((b0 - mean) * k + beta).to(w.dtype)


def fold_batchnorm(model: nn.Module, example_inputs: Any = None, pairs: list[tuple[str, str]] | None = None,
                   edits: Edits | None = None) -> list[tuple[str, str]]:
    """Fold each BatchNorm into the Linear/Conv before it, in place; the BN becomes `nn.Identity`.

    `pairs` skips the search. `edits` (a transform's `ctx.edits`) records the structural changes
    (the BN swapped out, a bias added) for replay. Returns the pairs folded.
    """
    edits = edits or Edits()
    pairs = find_conv_bn_pairs(model, example_inputs) if pairs is None else [tuple(p) for p in pairs]
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        w, b = fold_bn_weights(layer.weight, layer.bias, bn)
        with torch.no_grad():
            layer.weight.copy_(w)
            if layer.bias is None:
                edits.touch(model, layer_name)  # a new bias is structure
                layer.bias = nn.Parameter(b)
            else:
                layer.bias.copy_(b)
        edits.swap(model, bn_name, nn.Identity())
    return [tuple(p) for p in pairs]


# ------------------------------------------------------------------------------------ equalization

def find_equalization_pairs(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
    """(layer1, layer2) where layer1 feeds only a ReLU/LeakyReLU that feeds only layer2."""
    flow = _flow(model, example_inputs)
    pairs = []
    for name, node in flow.items():
        m1 = node.module
        if type(m1) not in _FOLDABLE or getattr(m1, "groups", 1) != 1:
            continue
        act = _next(flow, name)
        if act is None or act not in flow:
            continue
        if not (act.startswith("<relu:") or isinstance(flow[act].module, _HOMOGENEOUS)):
            continue
        second = _next(flow, act)
        m2 = flow[second].module if second in flow else dict(model.named_modules()).get(second)
        if (type(m2) in _FOLDABLE and getattr(m2, "groups", 1) == 1 and
                (m2.in_features if isinstance(m2, nn.Linear) else m2.in_channels) == _out_channels(m1)
                and (second not in flow or flow[second].calls == 1)):
            pairs.append((name, second))
    return pairs


def equalization_scales(w1: Tensor, w2: Tensor) -> Tensor:
    """DFQ's s_i = sqrt(r1_i / r2_i): r1 the range of output channel i of w1 (O1, ...), r2 that of
    input channel i of w2 (O2, O1, ...). Dividing w1's channel by s and multiplying w2's by s leaves
    both with range sqrt(r1 * r2). Channels with a zero range keep s = 1.

    >>> equalization_scales(torch.tensor([[4.0], [1.0]]), torch.tensor([[1.0, 4.0]])).tolist()
    [2.0, 0.5]
    """
    r1 = w1.detach().flatten(1).abs().amax(1).double()                       # (C,)
    r2 = w2.detach().transpose(0, 1).flatten(1).abs().amax(1).double()       # (C,)
    ok = (r1 > 0) & (r2 > 0)
    return torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, 1.0)), 1.0)


def equalize(model: nn.Module, example_inputs: Any = None, pairs: list[tuple[str, str]] | None = None,
             iterations: int = 8) -> list[tuple[str, str]]:
    """Cross-layer equalization of each (layer1, ReLU, layer2) chain, in place; the function the
    model computes is unchanged (ReLU(x / s) = ReLU(x) / s for s > 0). Chains of several pairs are
    swept `iterations` times, as DFQ iterates to convergence. Returns the pairs."""
    pairs = find_equalization_pairs(model, example_inputs) if pairs is None else [tuple(p) for p in pairs]
    for _ in range(iterations):
        for a, b in pairs:
            m1, m2 = model.get_submodule(a), model.get_submodule(b)
            s = equalization_scales(m1.weight, m2.weight)                    # (C,)
            with torch.no_grad():
                m1.weight.copy_((m1.weight.double() / s.view(-1, *([1] * (m1.weight.ndim - 1)))).to(m1.weight.dtype))
                if m1.bias is not None:
                    m1.bias.copy_((m1.bias.double() / s).to(m1.bias.dtype))
                shape = (1, -1, *([1] * (m2.weight.ndim - 2)))
                m2.weight.copy_((m2.weight.double() * s.view(shape)).to(m2.weight.dtype))
    return [tuple(p) for p in pairs]
