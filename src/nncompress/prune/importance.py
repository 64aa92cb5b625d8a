"""Importance criteria for coupled channel groups: one registered function per criterion.

Each criterion maps a `Group` (from `nncompress.graph`) to one score per channel; higher means keep.
A criterion may return None for a group it cannot score (bn_scale without a BatchNorm): that group
is not pruned.
A group couples several layers, so a score aggregates over every member that carries the channel
(the producer's filters, the consumer's input columns, the norm's scale): pruning is by group, and
so is ranking.

    @register("l2", namespace="importance")
    def l2_importance(model, group, stats) -> Tensor  # (group.size,)

Data-driven criteria (Taylor, Fisher, activation) read what `collect_stats` gathered on
calibration batches; the magnitude ones need no data.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from ..core import register
from ..core.errors import ConfigError

Stats = dict[str, Any]


def member_tensor(model: nn.Module, member) -> torch.Tensor | None:
    """The parameter or buffer a group member names, or None when the module lacks it."""
    module = model.get_submodule(member.module)
    return getattr(module, member.param, None)


def channel_view(t: torch.Tensor, member, size: int) -> torch.Tensor:
    """The slices of `t` that carry the group's channels, as (size, stride * rest).

    Channel i owns indices `offset + i*stride ... offset + i*stride + stride - 1` along `member.dim`.
    """
    t = t.detach().movedim(member.dim, 0)  # (D, ...)
    t = t[member.offset: member.offset + size * member.stride]  # (size*stride, ...)
    return t.reshape(size, -1)  # (size, stride * rest)


def _weights(model: nn.Module, group, roles: tuple[str, ...] = ("out", "in")) -> Iterable[torch.Tensor]:
    for m in group.members:
        if m.role in roles and m.param == "weight":
            t = member_tensor(model, m)
            if t is not None:
                yield channel_view(t.float(), m, group.size)


def _sum(parts: Iterable[torch.Tensor], size: int) -> torch.Tensor:
    total = torch.zeros(size)
    for p in parts:
        total += p.cpu()
    return total


@register("l1", namespace="importance")
def l1_importance(model: nn.Module, group, stats: Stats) -> torch.Tensor:
    """Sum over the group's weights of |w| per channel (seed 001, eq. 3 with p=1)."""
    return _sum((w.abs().sum(1) for w in _weights(model, group)), group.size)


@register("l2", namespace="importance")
def l2_importance(model: nn.Module, group, stats: Stats) -> torch.Tensor:
    """Sum over the group's weights of ||w||_2^2 per channel."""
    return _sum((w.pow(2).sum(1) for w in _weights(model, group)), group.size)


@register("random", namespace="importance")
def random_importance(model: nn.Module, group, stats: Stats) -> torch.Tensor:
    """Seeded random scores: the control every criterion must beat."""
    gen = stats.setdefault("generator", torch.Generator().manual_seed(0))
    return torch.rand(group.size, generator=gen)


@register("bn_scale", namespace="importance")
def bn_scale_importance(model: nn.Module, group, stats: Stats) -> torch.Tensor | None:
    """|gamma| of the group's BatchNorm layers (network slimming, seed 001 eq. 8).

    Groups without a BatchNorm get None: the criterion has nothing to say about them, so they are
    left unpruned (and listed in the stage record) rather than ranked by a different measure.
    """
    parts = [channel_view(member_tensor(model, m).float(), m, group.size).abs().sum(1)
             for m in group.members if m.role == "norm" and m.param == "weight"
             and isinstance(model.get_submodule(m.module), nn.modules.batchnorm._BatchNorm)]
    if not parts:
        return None
    return _sum(parts, group.size)


@register("fpgm", namespace="importance")
def fpgm_importance(model: nn.Module, group, stats: Stats) -> torch.Tensor:
    """Similarity/redundancy (FPGM): a filter close to all others (near the geometric median) is
    replaceable, so its score is its summed distance to the other filters of its producer."""
    producers = list(_weights(model, group, roles=("out",)))
    if not producers:
        return l2_importance(model, group, stats)
    filters = torch.cat(producers, dim=1)  # (size, sum of fan-ins)
    return torch.cdist(filters, filters).sum(1)


@register("taylor", namespace="importance")
def taylor_importance(model: nn.Module, group, stats: Stats) -> torch.Tensor:
    """First-order Taylor on the group: (sum over the channel's params of w * dL/dw)^2.

    On a BatchNorm member this is (gamma dL/dgamma + beta dL/dbeta)^2, the BN form.
    """
    grads = _grads(stats, "taylor")
    total = torch.zeros(group.size)
    for m in group.members:
        t = member_tensor(model, m)
        g = grads.get(f"{m.module}.{m.param}")
        if t is None or g is None or not isinstance(t, nn.Parameter):
            continue
        total += channel_view(t.float() * g.float(), m, group.size).sum(1).cpu()
    return total.pow(2)


@register("fisher", namespace="importance")
def fisher_importance(model: nn.Module, group, stats: Stats) -> torch.Tensor:
    """Second-order (diagonal empirical Fisher as the Hessian): 0.5 * sum of E[g^2] * w^2 per channel,
    the loss increase Optimal Brain Damage predicts for zeroing the channel."""
    sq = _grads(stats, "fisher", key="grad_sq")
    total = torch.zeros(group.size)
    for m in group.members:
        t = member_tensor(model, m)
        h = sq.get(f"{m.module}.{m.param}")
        if t is None or h is None or not isinstance(t, nn.Parameter):
            continue
        total += 0.5 * channel_view(h.float() * t.float().pow(2), m, group.size).sum(1).cpu()
    return total


@register("activation", namespace="importance")
def activation_importance(model: nn.Module, group, stats: Stats) -> torch.Tensor:
    """Mean |activation| of the channel at its producers' outputs (seed 001 eq. 4)."""
    acts = stats.get("activations")
    if acts is None:
        raise ConfigError("importance", "'activation' needs calibration data; run it in a recipe or pass data")
    total = torch.zeros(group.size)
    for m in group.members:
        a = acts.get(m.module)
        if m.role == "out" and m.param == "weight" and a is not None:
            total += a[m.offset: m.offset + group.size * m.stride].view(group.size, -1).sum(1)
    return total


def _grads(stats: Stats, name: str, key: str = "grad") -> dict[str, torch.Tensor]:
    if key not in stats:
        raise ConfigError("importance", f"{name!r} needs gradients from calibration data; run it in a recipe "
                          "(the stage collects them) or pass data")
    return stats[key]


NEEDS = {"taylor": "grad", "fisher": "grad_sq", "activation": "activations"}


def collect_stats(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                  need: str, producers: Iterable[str] = (), max_batches: int = 8) -> Stats:
    """Gradients, squared gradients or output activations of `model` on up to `max_batches` batches.

    The model's mode and its parameters' .grad are restored afterwards.
    """
    stats: Stats = {}
    was_training = model.training
    model.eval()  # BN uses running statistics: scores reflect the deployed network
    saved = {n: p.grad for n, p in model.named_parameters()}
    try:
        if need == "activations":
            stats["activations"] = _activations(model, batches, loss_fn, set(producers), max_batches)
            return stats
        grad: dict[str, torch.Tensor] = {}
        grad_sq: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    grad[n] = grad.get(n, 0) + p.grad.detach()
                    grad_sq[n] = grad_sq.get(n, 0) + p.grad.detach().pow(2)
        stats["grad"], stats["grad_sq"] = grad, grad_sq
        return stats
    finally:
        for n, p in model.named_parameters():
            p.grad = saved.get(n)
        model.train(was_training)


def _activations(model, batches, loss_fn, producers: set[str], max_batches: int) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(module, inputs, output):
            out = output.detach().abs()
            # channels are dim 1 for convolutions and BN, the last dim for Linear
            out = out.movedim(1, -1) if isinstance(module, nn.modules.conv._ConvNd) else out
            flat = out.reshape(-1, out.shape[-1])  # (samples, C)
            sums[name] = sums.get(name, 0) + flat.sum(0)
            counts[name] = counts.get(name, 0) + flat.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in producers]
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if i >= max_batches:
                    break
                loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}
