"""Channel rules for shape ops: view/reshape/flatten, permutes, expand, slicing, split, cat, getitem.

A merge of a channel dim with trailing dims of total size L becomes a segment with stride L; an
exact inverse split restores the channel dim. A split of a whole channel dim into (H, D), the
attention heads of a Q/K/V projection, makes a new space of H heads, each a block of D channels:
heads are then pruned as units. Any other split or partial slice of a channel dim blocks its space:
removing channel i there would shift what every later index means.
"""
from __future__ import annotations

import math
from typing import Any

from torch.fx import Node

from .spaces import scale
from .walk import Labels, Walk, rule


@rule("view", "_unsafe_view", "reshape", "view_copy", "_reshape_alias", "flatten", "unflatten", "squeeze",
      "unsqueeze", "squeeze_copy", "unsqueeze_copy")
def reshape(g: Walk, node: Node) -> Any:
    x = node.args[0]
    xs, ys, xl = g.shape(x), g.shape(node), g.lab(x)
    if 0 in xs or 0 in ys:
        return NotImplemented
    where, op = g.where(node), g.op(node)
    if _one_head(node, xs, ys):
        reason = (f"{where}: {op} splits a dim of {xs[-1]} into (1, {xs[-1]}), a single attention head whose "
                  f"size is fixed in code")
        g.sp.block(xl[-1], reason)
        return list(xl[:-1]) + [None, g.fresh(ys[-1], reason)]
    a = [i for i, s in enumerate(xs) if s != 1]
    b = [j for j, s in enumerate(ys) if s != 1]
    out: Labels = [None] * len(ys)
    i = j = 0
    while i < len(a) and j < len(b):
        gi, gj = [a[i]], [b[j]]
        pa, pb = xs[a[i]], ys[b[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(a[i]); pa *= xs[a[i]]; i += 1  # noqa: E702
            elif pb < pa and j < len(b):
                gj.append(b[j]); pb *= ys[b[j]]; j += 1  # noqa: E702
            else:
                return NotImplemented
        _regroup(g, [xl[k] for k in gi], [xs[k] for k in gi], gj, ys, out, f"{where}: {op}")
    if i != len(a) or j != len(b):
        return NotImplemented
    return out


def _one_head(node: Node, xs: tuple[int, ...], ys: tuple[int, ...]) -> bool:
    """Is this `(..., D) -> (..., 1, D)` by view/reshape/unflatten: a split into one head of D?

    With several heads, `(H*D) -> (H, D)` keeps D (written in code as `self.head_dim`) and heads
    are pruned as units. With one head the split looks like a no-op, but D is still fixed in code
    (`view(..., -1, self.head_dim)`, and the scaling `head_dim ** -0.5`): its channels cannot be
    removed. `unsqueeze` adds a dim without fixing any size, so it is not one.
    """
    name = node.target._schema.name.partition("::")[2] if hasattr(node.target, "_schema") else ""
    return (name in ("view", "_unsafe_view", "reshape", "view_copy", "_reshape_alias", "unflatten")
            and len(ys) == len(xs) + 1 >= 4 and ys[:-2] == xs[:-1] and ys[-2:] == (1, xs[-1]) and xs[-1] > 1)


def _regroup(g: Walk, labels: Labels, sizes: list[int], gj: list[int], ys: tuple[int, ...], out: Labels,
             at: str) -> None:
    """Map one block of input dims (equal total size) onto output dims `gj`."""
    if len(labels) == 1 and len(gj) == 1:
        out[gj[0]] = labels[0]
    elif len(gj) == 1:  # merge: the outer dim's channels become blocks of `inner` indices
        inner = math.prod(sizes[1:])
        for label in labels[1:]:
            g.sp.block(label, f"{at} merges this dim into a wider one")
        out[gj[0]] = scale(labels[0], inner)
    elif len(labels) == 1:
        label = g.sp.resolve(labels[0])
        inner = math.prod(ys[k] for k in gj[1:])
        if label is None:  # a broadcast dim: nothing to track
            return
        restored = tuple((s, o // inner, st // inner) for s, o, st in label)
        if all(o % inner == 0 and st % inner == 0 for _, o, st in label) and g.sp.width(restored) == ys[gj[0]]:
            out[gj[0]] = restored  # the exact inverse of an earlier flatten
            for k in gj[1:]:
                out[k] = g.fresh(ys[k], f"{at} splits off this dim")
            return
        if len(label) == 1 and label[0][1:] == (0, 1) and g.sp.size[label[0][0]] == sizes[0]:
            # heads: (H*D) -> (H, D). Head i of a new space of H covers the block of D channels
            # i*D ... i*D+D-1, so removing head i removes that block from every member at once
            heads = g.sp.new(ys[gj[0]])
            g.sp.unify(label, ((heads, 0, inner),), "(heads)", at)
            out[gj[0]] = ((heads, 0, 1),)
            for k in gj[1:]:
                out[k] = g.fresh(ys[k], f"{at} splits off this dim (the channels within a head)")
            return
        reason = f"{at} splits a dim of {sizes[0]} into {tuple(ys[k] for k in gj)}"
        g.sp.block(label, reason)
        for k in gj:
            out[k] = g.fresh(ys[k], reason)
    else:
        reason = f"{at} reshapes {tuple(sizes)} into {tuple(ys[k] for k in gj)}"
        for label in labels:
            g.sp.block(label, reason)
        for k in gj:
            out[k] = g.fresh(ys[k], reason)


@rule("permute", "permute_copy", "transpose", "transpose_copy", "swapaxes", "swapdims", "t", "numpy_T", "movedim")
def permute(g: Walk, node: Node) -> Any:
    x = node.args[0]
    xl = list(g.lab(x))
    n = len(xl)
    name = node.target._schema.name.partition("::")[2]
    if name in ("permute", "permute_copy"):
        return [xl[int(d) % n] for d in node.args[1]]
    if name in ("t", "numpy_T"):
        return xl[::-1]
    if name == "movedim":
        src, dst = node.args[1], node.args[2]
        src, dst = ([src], [dst]) if isinstance(src, int) else (list(src), list(dst))
        src, dst = [d % n for d in src], [d % n for d in dst]
        rest = iter(i for i in range(n) if i not in src)
        order = [src[dst.index(k)] if k in dst else next(rest) for k in range(n)]
        return [xl[i] for i in order]
    d0, d1 = int(node.args[1]) % n, int(node.args[2]) % n
    xl[d0], xl[d1] = xl[d1], xl[d0]
    return xl


@rule("expand", "expand_copy", "expand_as", "broadcast_to")
def expand(g: Walk, node: Node) -> Any:
    """Expanded dims are copies that follow the other operand's size: they couple with nothing."""
    x = node.args[0]
    xs, ys, xl = g.shape(x), g.shape(node), g.lab(x)
    lead = len(ys) - len(xs)
    return [None] * lead + [xl[i] if xs[i] == ys[lead + i] else None for i in range(len(xs))]


@rule("repeat")
def repeat(g: Walk, node: Node) -> Any:
    x = node.args[0]
    xs, ys, xl = g.shape(x), g.shape(node), g.lab(x)
    lead = len(ys) - len(xs)
    reason = f"{g.where(node)}: {g.op(node)} tiles this dim"
    out = [g.fresh(s, reason) for s in ys[:lead]]
    for i, label in enumerate(xl):
        if xs[i] == ys[lead + i]:
            out.append(label)
        else:
            g.sp.block(label, reason)
            out.append(g.fresh(ys[lead + i], reason))
    return out


@rule("slice", "slice_copy", "narrow", "index_select", "select", "unbind", "split", "split_with_sizes", "chunk",
      "tensor_split", "unsafe_split", "split_copy", "unsafe_chunk")
def take(g: Walk, node: Node) -> Any:
    """Slicing, selecting or splitting along a dim: fine for batch/sequence dims, blocks channel dims."""
    x = node.args[0]
    xs, xl = g.shape(x), g.lab(x)
    a = g.bind(node)
    d = int(a.get("dim") or 0) % len(xs)
    reason = f"{g.where(node)}: {g.op(node)} takes part of a dim of {xs[d]}"
    val = node.meta["val"]
    vals = list(val) if isinstance(val, (tuple, list)) else [val]
    pieces = []
    for v in vals:
        shape = tuple(int(s) for s in v.shape)
        if len(shape) == len(xs):
            if shape[d] != xs[d] or len(vals) > 1:
                g.sp.block(xl[d], reason)
                pieces.append(xl[:d] + [g.fresh(shape[d], reason)] + xl[d + 1:])
            else:
                pieces.append(list(xl))
        elif len(shape) == len(xs) - 1:  # select / unbind drop the dim
            g.sp.block(xl[d], reason)
            pieces.append(xl[:d] + xl[d + 1:])
        else:
            return NotImplemented
    return tuple(pieces) if isinstance(val, (tuple, list)) else pieces[0]


@rule("constant_pad_nd", "pad")
def pad(g: Walk, node: Node) -> Any:
    x = node.args[0]
    xs, ys, xl = g.shape(x), g.shape(node), g.lab(x)
    reason = f"{g.where(node)}: {g.op(node)} pads this dim"
    out = []
    for label, s, t in zip(xl, xs, ys):
        if s == t:
            out.append(label)
        else:
            g.sp.block(label, reason)
            out.append(g.fresh(t, reason))
    return out


@rule("cat", "concat", "concatenate")
def cat(g: Walk, node: Node) -> Any:
    """Concatenation along a dim makes a layout of segments, one per input, at running offsets."""
    tensors = [t for t in node.args[0] if g.shape(t) != (0,)]  # legacy empty tensors take no part
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    ys = g.shape(node)
    d = int(dim) % len(ys)
    where = g.where(node)
    segs, offset = [], 0
    for t in tensors:
        label = g.sp.resolve(g.lab(t)[d])
        size = g.shape(t)[d]
        if label is None:
            label = g.fresh(size, f"{where}: broadcast dim concatenated by {g.op(node)}")
        segs += [(s, o + offset, st) for s, o, st in label or ()]
        offset += size
    others = [(g.lab(t)[:d] + [None] + g.lab(t)[d + 1:], g.shape(t)) for t in tensors]
    out = g.broadcast(ys, others, where)
    out[d] = tuple(segs) if segs else None
    return out


@rule("stack")
def stack(g: Walk, node: Node) -> Any:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    ys = g.shape(node)
    d = int(dim) % len(ys)
    xs = g.shape(tensors[0])
    out = g.broadcast(xs, [(g.lab(t), g.shape(t)) for t in tensors], g.where(node))
    return out[:d] + [g.fresh(ys[d], f"{g.where(node)}: stacked by {g.op(node)}")] + out[d:]


@rule("getitem")
def getitem(g: Walk, node: Node) -> Any:
    src, idx = node.args
    labels = g.labels.get(src) if isinstance(src, Node) else None
    if not isinstance(labels, tuple) or not isinstance(idx, int):
        return NotImplemented
    return labels[idx]
