"""Channel rules for compute ops: layers, norms, elementwise maths, reductions, pooling, matmul.

Each rule maps an aten op to the labels of its output(s) and couples spaces on the way.
A rule returns `NotImplemented` when a case is outside what it maps exactly; the walk then blocks
every space the op touches (see `Walk.unknown`).
"""
from __future__ import annotations

import re
from typing import Any

import torch.nn as nn
from torch.fx import Node

from .spaces import scale
from .trace import module_of
from .walk import Labels, Walk, rule

_MARKS = {"add": "(+)", "sub": "(-)", "rsub": "(-)", "mul": "(*)", "div": "(/)"}


# --- layers ---------------------------------------------------------------------------------
@rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution",
      "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv(g: Walk, node: Node) -> Any:
    a = g.bind(node)
    x, w, b = a["input"], a["weight"], a.get("bias")
    transposed = bool(a.get("transposed")) or node.target._schema.name.startswith("aten::conv_transpose")
    groups = int(a.get("groups") or 1)
    xs, ws, ys = g.shape(x), g.shape(w), g.shape(node)
    xl, wl = g.lab(x), g.lab(w)
    where, op = g.where(node), g.op(node)
    c = len(xs) - (len(ws) - 2) - 1  # channel dim: 1 for (N, C, *spatial), 0 unbatched
    spatial = f"{where}: spatial dim of {op}"
    for label in xl[c + 1:]:  # a size that changes may not carry channels
        g.sp.block(label, spatial)
    w_out, w_in = (1, 0) if transposed else (0, 1)
    owner = g.tr.modules.get(_owner(g, w))
    if groups == 1:
        g.unify(xl[c], wl[w_in], where)
        g.role(wl[w_in], "in")
        out_c = wl[w_out]
    elif (not transposed and groups == xs[c] == ws[0] and ws[1] == 1
          and isinstance(owner, nn.modules.conv._ConvNd)):  # depthwise: the space passes through
        g.unify(xl[c], wl[0], where)
        out_c = xl[c]
    else:
        reason = f"{where}: grouped {op} (groups={groups}) keeps {xs[c] // groups} channels per group"
        for label in (xl[c], wl[0], wl[1]):
            g.sp.block(label, reason)
        out_c = wl[w_out]
    g.role(wl[w_out], "out")
    if isinstance(b, Node):
        g.unify(out_c, g.lab(b)[0], where)
        g.role(g.lab(b)[0], "out")
    return list(xl[:c]) + [out_c] + [g.fresh(s, spatial) for s in ys[c + 1:]]


@rule("linear")
def linear(g: Walk, node: Node) -> Any:
    a = g.bind(node)
    x, w, b = a["input"], a["weight"], a.get("bias")
    if len(g.shape(w)) != 2:
        return NotImplemented
    xl, wl, where = g.lab(x), g.lab(w), g.where(node)
    g.unify(xl[-1], wl[1], where)
    g.role(wl[1], "in")
    g.role(wl[0], "out")
    if isinstance(b, Node):
        g.unify(wl[0], g.lab(b)[0], where)
        g.role(g.lab(b)[0], "out")
    return list(xl[:-1]) + [wl[0]]


@rule("embedding")
def embedding(g: Walk, node: Node) -> Any:
    w, idx = node.args[0], node.args[1]
    wl = g.lab(w)
    g.sp.block(wl[0], f"{g.where(node)}: embedding rows are indexed by token ids")
    g.role(wl[1], "out")
    return list(g.lab(idx)) + [wl[1]]


@rule("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
      "instance_norm", "cudnn_batch_norm")
def batch_norm(g: Walk, node: Node) -> Any:
    a = g.bind(node)
    x = a["input"]
    xl, xs, where = g.lab(x), g.shape(x), g.where(node)
    c = 1 if len(xs) > 1 else 0
    for key in ("weight", "bias", "running_mean", "running_var"):
        if isinstance(a.get(key), Node):
            g.unify(xl[c], g.lab(a[key])[0], where)
    return _like_input(g, node, list(xl), xs, {(xs[c],): [xl[c]]})


@rule("layer_norm", "native_layer_norm", "rms_norm")
def layer_norm(g: Walk, node: Node) -> Any:
    a = g.bind(node)
    x, k = a["input"], len(a["normalized_shape"])
    xl, xs, where, op = g.lab(x), g.shape(x), g.where(node), g.op(node)
    params = [a[key] for key in ("weight", "bias") if isinstance(a.get(key), Node)]
    module = g.module(node)
    if k != 1:
        reason = f"{where}: {op} normalizes over {k} dims"
        g.block([*xl[-k:], *(l for p in params for l in g.lab(p))], reason)
    elif not isinstance(module, (nn.LayerNorm, nn.RMSNorm)):  # a functional call: its shape is in code
        g.sp.block(xl[-1], f"{where}: {op} in {type(module).__name__ if module else 'forward'} takes its "
                           f"normalized_shape from code")
    else:
        for p in params:
            g.unify(xl[-1], g.lab(p)[0], where)
        if not params:  # no weight to slice: the module's normalized_shape still has to shrink
            g.sp.attach(xl[-1], _fqn(node), "normalized_shape", 0)
    stats = list(xl[:-k]) + [None] * k
    return _like_input(g, node, list(xl), xs, {tuple(xs[:-k]) + (1,) * k: stats})


@rule("group_norm", "native_group_norm")
def group_norm(g: Walk, node: Node) -> Any:
    a = g.bind(node)
    x = a["input"]
    groups = a.get("num_groups", a.get("group"))
    xl, xs, where = g.lab(x), g.shape(x), g.where(node)
    c = xs[1]
    params = [a[key] for key in ("weight", "bias") if isinstance(a.get(key), Node)]
    module = g.module(node)
    if groups == 1 or (groups == c and isinstance(module, nn.GroupNorm)):
        for p in params:
            g.unify(xl[1], g.lab(p)[0], where)
        if not params and isinstance(module, nn.GroupNorm):
            g.sp.attach(xl[1], _fqn(node), "num_channels", 0)
    else:
        reason = f"{where}: group_norm with {groups} groups of {c // max(int(groups), 1)} channels"
        g.block([xl[1], *(g.lab(p)[0] for p in params)], reason)
    return _like_input(g, node, list(xl), xs, {})


@rule("prelu", "_prelu_kernel")
def prelu(g: Walk, node: Node) -> Any:
    x, w = node.args[0], node.args[1]
    xl = g.lab(x)
    if g.shape(w) != (1,) and len(g.shape(x)) > 1:
        g.unify(xl[1], g.lab(w)[0], g.where(node))
    return list(xl)


# --- elementwise ----------------------------------------------------------------------------
_UNARY = ("relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid",
          "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "softsign", "threshold", "exp", "exp2",
          "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "abs", "neg", "reciprocal", "erf", "erfc",
          "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "square", "sign", "sgn", "floor", "ceil",
          "round", "trunc", "frac", "logical_not", "bitwise_not", "isnan", "isinf", "isfinite", "nan_to_num")
_BINARY = ("add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow",
           "maximum", "minimum", "fmax", "fmin", "where", "masked_fill", "lerp", "addcmul", "addcdiv", "clamp",
           "clip", "clamp_min", "clamp_max", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
           "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "__and__", "__or__", "__xor__", "atan2",
           "hypot", "copysign", "xlogy", "copy")


@rule(*_UNARY, *_BINARY)
def elementwise(g: Walk, node: Node) -> Any:
    operands = [(g.lab(x), g.shape(x)) for x in [*node.args, *node.kwargs.values()] if g.is_tensor(x)]
    name = node.target._schema.name.partition("::")[2]
    return g.broadcast(g.shape(node), operands, g.where(node), _MARKS.get(name, f"({name})"))


@rule("dropout", "native_dropout", "feature_dropout", "alpha_dropout", "clone", "contiguous", "_to_copy", "to",
      "type_as", "detach", "alias", "lift_fresh_copy", "softmax", "_softmax", "log_softmax", "_log_softmax",
      "cumsum", "cumprod", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "fill",
      "_safe_softmax")
def passthrough(g: Walk, node: Node) -> Any:
    """Same shape as the first argument, channel for channel."""
    xl = list(g.lab(node.args[0]))
    val = node.meta["val"]
    return tuple(xl for _ in val) if isinstance(val, (tuple, list)) else xl


@rule("arange", "zeros", "ones", "full", "empty", "empty_strided", "rand", "randn", "randint", "scalar_tensor",
      "new_zeros", "new_ones", "new_full", "new_empty", "linspace", "eye")
def creation(g: Walk, node: Node) -> Any:
    """A fresh tensor: its sizes are written in the code, so no channel may live in them."""
    return g.fresh_like(node.meta["val"], f"{g.where(node)}: size fixed by {g.op(node)}")


# --- reductions and pooling -----------------------------------------------------------------
@rule("mean", "sum", "amax", "amin", "prod", "std", "var", "std_mean", "var_mean", "logsumexp", "linalg_vector_norm",
      "norm", "max", "min", "argmax", "argmin", "any", "all", "nansum", "aminmax", "count_nonzero")
def reduce(g: Walk, node: Node) -> Any:
    if node.target._overloadname in ("other", "Tensor") and node.target._schema.name in ("aten::max", "aten::min"):
        return elementwise(g, node)
    x = node.args[0]
    xl, n = g.lab(x), len(g.shape(x))
    a = g.bind(node)
    dims = a.get("dim")
    if dims is None or dims == [] or dims == ():
        dims = range(n)
    dims = {int(d) % max(n, 1) for d in ([dims] if isinstance(dims, int) else dims)}
    keep = bool(a.get("keepdim"))
    out = [None if i in dims else xl[i] for i in range(n) if keep or i not in dims]
    val = node.meta["val"]
    return tuple(out for _ in val) if isinstance(val, (tuple, list)) else out


_SPATIAL = ("max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
            "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
            "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
            "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d",
            "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d",
            "upsample_bicubic2d", "upsample_trilinear3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
            "_upsample_nearest_exact3d", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
            "replication_pad1d", "replication_pad2d", "replication_pad3d")


@rule(*_SPATIAL)
def spatial(g: Walk, node: Node) -> Any:
    """Pooling, resizing, padding of the trailing k spatial dims; leading (batch, channel) dims pass."""
    k = int(re.search(r"(\d)d", node.target._schema.name).group(1))
    x = node.args[0]
    xl, ys = g.lab(x), g.shape(node)
    lead = len(xl) - k
    reason = f"{g.where(node)}: spatial dim of {g.op(node)}"
    for label in xl[lead:]:
        g.sp.block(label, reason)
    out = list(xl[:lead]) + [g.fresh(s, reason) for s in ys[lead:]]
    val = node.meta["val"]
    return tuple(out for _ in val) if isinstance(val, (tuple, list)) else out


# --- contractions ---------------------------------------------------------------------------
def _contract(g: Walk, node: Node, a: Labels, ash: tuple[int, ...], b: Labels,
              bsh: tuple[int, ...]) -> Labels | None:
    """`a @ b` with numpy matmul semantics; the contracted dims are the same channels."""
    where = g.where(node)
    a1, b1 = len(ash) == 1, len(bsh) == 1
    if a1:
        a, ash = [None, a[0]], (1, ash[0])
    if b1:
        b, bsh = [b[0], None], (bsh[0], 1)
    if ash[-1] != bsh[-2]:
        return None
    g.unify(a[-1], b[-2], where)
    for label in (a[-1], b[-2]):
        g.role(label, "in")
    for label in (a[-2], b[-1]):
        g.role(label, "out")
    ba, bb = ash[:-2], bsh[:-2]
    n = max(len(ba), len(bb))
    batch_shape = tuple(max(([ba[i - n + len(ba)]] if i - n + len(ba) >= 0 else [])
                            + ([bb[i - n + len(bb)]] if i - n + len(bb) >= 0 else [])) for i in range(n))
    batch = g.broadcast(batch_shape, [(a[:-2], ba), (b[:-2], bb)], where)
    return batch + ([] if a1 else [a[-2]]) + ([] if b1 else [b[-1]])


@rule("matmul", "mm", "bmm")
def matmul(g: Walk, node: Node) -> Any:
    x, y = node.args[0], node.args[1]
    out = _contract(g, node, g.lab(x), g.shape(x), g.lab(y), g.shape(y))
    return NotImplemented if out is None else out


@rule("addmm", "baddbmm", "addbmm")
def addmm(g: Walk, node: Node) -> Any:
    bias, x, y = node.args[0], node.args[1], node.args[2]
    if node.target._schema.name == "aten::addbmm":
        return NotImplemented
    out = _contract(g, node, g.lab(x), g.shape(x), g.lab(y), g.shape(y))
    if out is None:
        return NotImplemented
    if g.lab(bias):
        g.role(g.lab(bias)[-1], "out")  # the bias of a Linear lowered to addmm
    return g.broadcast(g.shape(node), [(out, g.shape(node)), (g.lab(bias), g.shape(bias))], g.where(node), "(+)")


@rule("einsum")
def einsum(g: Walk, node: Node) -> Any:
    eq, operands = node.args[0], node.args[1]
    if "..." in eq or "->" not in eq:
        return NotImplemented
    ins, out = eq.replace(" ", "").split("->")
    specs = ins.split(",")
    if len(specs) != len(operands):
        return NotImplemented
    where = g.where(node)
    letters: dict[str, list[tuple[Any, int]]] = {}
    for spec, x in zip(specs, operands):
        for ch, label, size in zip(spec, g.lab(x), g.shape(x)):
            letters.setdefault(ch, []).append((label, size))
    labels: dict[str, Any] = {}
    for ch, seen in letters.items():
        size = max(s for _, s in seen)
        cands = [l for l, s in seen if s == size and size != 1 and l is not None]
        for c in cands[1:]:
            g.unify(cands[0], c, where)
        for c in cands:
            g.role(c, "out" if ch in out else "in")
        labels[ch] = cands[0] if cands else None
    return [labels[ch] for ch in out]


@rule("scaled_dot_product_attention")
def sdpa(g: Walk, node: Node) -> Any:
    a = g.bind(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    qs, ks, vs = g.shape(q), g.shape(k), g.shape(v)
    ql, kl, vl, where = g.lab(q), g.lab(k), g.lab(v), g.where(node)
    if ks[:-2] != vs[:-2] or len(qs) != len(ks):
        return NotImplemented
    if qs[:-2] != ks[:-2]:  # grouped-query attention: query head j reads key/value head j // n_rep
        if not (a.get("enable_gqa") and len(qs) >= 3 and qs[:-3] == ks[:-3] and qs[-3] % ks[-3] == 0):
            return NotImplemented
        g.unify(kl[-3], vl[-3], where)
        g.unify(ql[-3], scale(kl[-3], qs[-3] // ks[-3]), where, "(kv group)")
        kl, vl = kl[:-3] + [ql[-3]] + kl[-2:], vl[:-3] + [ql[-3]] + vl[-2:]
        ks, vs = qs[:-2] + ks[-2:], qs[:-2] + vs[-2:]
    batch = g.broadcast(qs[:-2], [(ql[:-2], qs[:-2]), (kl[:-2], ks[:-2]), (vl[:-2], vs[:-2])], where)
    g.unify(ql[-1], kl[-1], where)
    g.unify(kl[-2], vl[-2], where)
    if isinstance(mask, Node):
        scores = batch + [ql[-2], kl[-2]]
        g.broadcast(qs[:-1] + (ks[-2],), [(scores, qs[:-1] + (ks[-2],)), (g.lab(mask), g.shape(mask))], where)
    return batch + [ql[-2], vl[-1]]


# --- helpers ------------------------------------------------------------------------------
def _like_input(g: Walk, node: Node, out: Labels, xs: tuple[int, ...], extra: dict) -> Any:
    """Labels for ops returning `out` or a tuple `(out, stats...)`; stats shaped like a key of `extra`."""
    val = node.meta["val"]
    if not isinstance(val, (tuple, list)):
        return out
    res = []
    for v in val:
        shape = tuple(int(d) for d in v.shape) if hasattr(v, "shape") else None
        if shape == xs:
            res.append(out)
        elif shape in extra:
            res.append(list(extra[shape]))
        else:
            res.append(g.fresh_like(v, f"{g.where(node)}: statistics of {g.op(node)}"))
    return tuple(res)


def _owner(g: Walk, x: Any) -> str:
    """The module that owns parameter placeholder `x` ("" if `x` is computed)."""
    fqn = g.tr.params.get(x.name, "") if isinstance(x, Node) else ""
    return fqn.rpartition(".")[0]


def _fqn(node: Node) -> str:
    return module_of(node)[0]
