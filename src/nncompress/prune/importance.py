"""Importance criteria for coupled channel groups: one registered function per criterion.

Each criterion maps a `Group` (from `nncompress.graph`) to one score per channel; higher means keep.
A criterion may return None for a group it cannot score (bn_scale without a BatchNorm): that group
is not pruned.
A group couples several layers, so a score aggregates over every member that carries the channel
(the producer's filters, the consumer's input columns, the norm's scale): pruning is by group, and
so is ranking.

    @register("l2", namespace="importance")
    def l2_importance(model, group, stats) -> Tensor  # (group.size,)

Data-driven criteria (Taylor, Fisher, Hessian, activation) read what `collect_stats` gathered on
calibration batches; the magnitude ones need no data.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from ..core import register
from ..core.calibration import calibrate, gradient_sums
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


def _per_channel(model: nn.Module, group, grads: dict[str, torch.Tensor], term) -> torch.Tensor:
    """Sum over the group's parameters of `term(w, g)` per channel, g the parameter's gradient statistic."""
    total = torch.zeros(group.size)
    for m in group.members:
        t = member_tensor(model, m)
        g = grads.get(f"{m.module}.{m.param}")
        if isinstance(t, nn.Parameter) and g is not None:
            total += channel_view(term(t.float(), g.float()), m, group.size).sum(1).cpu()
    return total


@register("taylor", namespace="importance")
def taylor_importance(model: nn.Module, group, stats: Stats) -> torch.Tensor:
    """First-order Taylor on the group: (sum over the channel's params of w * dL/dw)^2.

    On a BatchNorm member this is (gamma dL/dgamma + beta dL/dbeta)^2, the BN form.
    """
    return _per_channel(model, group, _grads(stats, "taylor"), lambda w, g: w * g).pow(2)


@register("fisher", namespace="importance")
def fisher_importance(model: nn.Module, group, stats: Stats) -> torch.Tensor:
    """Second-order (diagonal empirical Fisher as the Hessian): 0.5 * sum of E[g^2] * w^2 per channel,
    the loss increase Optimal Brain Damage predicts for zeroing the channel."""
    return 0.5 * _per_channel(model, group, _grads(stats, "fisher", key="grad_sq"), lambda w, g2: g2 * w.pow(2))


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


@register("obs", namespace="importance")
def obs_importance(model: nn.Module, group, stats: Stats, steps: int = 64, damp: float = 0.01) -> torch.Tensor:
    """Structured Optimal Brain Surgeon on the layers that read the group (its consumers): the output
    error a channel's removal adds once the other inputs of each consumer compensate optimally (what
    `reconstruct: lstsq` then does), the criterion that fits least-squares reconstruction.

    `obs_rounds` gives the greedy removal order and each round's error; a channel's score is the error
    its round added per channel and per weight the channel carries (a head: its q, k, v rows and output
    columns; an FFN neuron: one row and one column), made non-decreasing along the order (so ranking
    follows the greedy order). In the consumers' output units, so global ranking compares marginal cost
    per weight removed across layers as it is: under a MAC / parameter budget, the widths that equalise
    it (measured on MiniLM and the CNN: better than per channel, which never removes a head). A group without a Linear / Conv consumer (or whose consumer's
    inputs calibration never reached) falls back to l2.
    """
    grams = stats.get("grams")
    if grams is None:
        raise ConfigError("importance", "'obs' needs calibration data; run it in a recipe or pass data")
    rounds = obs_rounds(model, group, grams, steps, damp)
    if rounds is None:
        return l2_importance(model, group, stats)
    score = torch.zeros(group.size, dtype=torch.float64)
    floor = 0.0
    per = max(sum(w.shape[1] for w in _weights(model, group)), 1)   # weights one channel carries
    for pick, error in rounds:
        floor = max(floor, error / (len(pick) * per))
        score[pick] = floor * (1 + 1e-6 * torch.arange(1, len(pick) + 1, dtype=torch.float64))  # float32-distinct
        floor = float(score[pick].max())
    return score.float()


def obs_rounds(model: nn.Module, group, grams: dict[str, torch.Tensor], steps: int = 64, damp: float = 0.01
               ) -> list[tuple[torch.Tensor, float]] | None:
    """Greedy structured OBS (ZipLM-style) over the group's consumers: `[(channels removed, error added)]`
    per round, in order, until none is left; None when the group has no consumer to measure on.

    Removing channel set S from a consumer with weight W and input Gram H costs tr(W_S (Hinv_SS)^-1 W_S^T)
    (Hinv = (H + damp mean(diag H))^-1, S every column the channels own: a head's head-dim columns, a conv
    channel's kernel window). Each of up to `steps` rounds removes the channels of least summed cost over
    every consumer, then W and Hinv are updated as OBS prescribes, so later costs are measured after the
    removed channels were compensated; the errors add up to the least-squares error of the channels left.
    """
    consumers = [c for c in (_consumer(model, m, group.size, grams, damp) for m in group.members) if c is not None]
    if not consumers:
        return None
    alive = torch.ones(group.size, dtype=torch.bool)
    chunk = max(1, -(-group.size // steps))
    rounds = []
    while alive.any():
        left = alive.nonzero().squeeze(1)
        cost = torch.zeros(len(left), dtype=torch.float64)
        for c in consumers:
            own = c.at(left)                                                 # (left, b) current columns
            if own.shape[1] == 1:  # one column per channel: ||w_c||^2 / Hinv_cc
                cost += c.w[:, own[:, 0]].pow(2).sum(0) / c.hinv.diagonal()[own[:, 0]]
                continue
            blocks = c.hinv[own.unsqueeze(-1), own.unsqueeze(-2)]            # (left, b, b)
            wb = c.w[:, own].permute(1, 2, 0)                                # (left, b, O)
            cost += (wb * torch.linalg.solve(blocks, wb)).sum((1, 2))
        pick = left[torch.argsort(cost)[:chunk]]
        rounds.append((pick, max(sum(c.remove(pick) for c in consumers), 0.0)))
        alive[pick] = False
    return rounds


class _Consumer:
    """One consumer of a group under greedy structured OBS: its weight (O, columns) and inverse damped Gram
    over the columns still present (removed ones are dropped, so each round's update shrinks)."""

    def __init__(self, w: torch.Tensor, h: torch.Tensor, cols: torch.Tensor, damp: float):
        # GPTQ's dampening; a dead input (zero on every row) gets only this, so removing it costs ~nothing
        h.diagonal().add_(max(damp * float(h.diagonal().mean()), 1e-12))
        self.w, self.hinv, self.cols = w, torch.cholesky_inverse(torch.linalg.cholesky(h)), cols
        self.pos = torch.arange(w.shape[1])                   # column -> its index now (-1: removed)

    def at(self, channels: torch.Tensor) -> torch.Tensor:
        return self.pos[self.cols[channels]]

    def remove(self, channels: torch.Tensor) -> float:
        """OBS-remove the channels' columns, compensating with the rest; returns the output error added."""
        s = self.at(channels).reshape(-1)
        inv = torch.linalg.pinv(self.hinv[s][:, s], hermitian=True)
        ws = self.w[:, s]
        error = float((ws @ inv * ws).sum())
        keep = torch.ones(self.hinv.shape[0], dtype=torch.bool)
        keep[s] = False
        rows = self.hinv[s][:, keep]                          # (|s|, kept)
        self.w = self.w[:, keep] - ws @ inv @ rows
        self.hinv = self.hinv[keep][:, keep] - rows.T @ inv @ rows
        gone = self.cols[channels].reshape(-1)
        self.pos[gone] = -1
        present = self.pos >= 0
        self.pos[present] = torch.arange(int(present.sum()))
        return error


def _consumer(model: nn.Module, member, size: int, grams: dict[str, torch.Tensor], damp: float) -> _Consumer | None:
    """A plain Linear / Conv member reading the group's channels (dim 1) whose inputs calibration saw, or None."""
    if member.role != "in" or member.param != "weight" or member.dim != 1 or member.module not in grams:
        return None
    module = model.get_submodule(member.module)
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or getattr(module, "groups", 1) != 1:
        return None
    w = module.weight.detach().double().cpu()
    window = int(w[0, 0].numel())                                           # kernel positions per channel
    w = w.reshape(w.shape[0], -1)
    h = grams[member.module].double().cpu().clone()
    if h.shape[0] != w.shape[1]:
        return None
    channels = member.offset + torch.arange(size * member.stride).view(size, member.stride)
    cols = (channels.unsqueeze(-1) * window + torch.arange(window)).reshape(size, -1)
    return _Consumer(w, h, cols, damp)


def _grads(stats: Stats, name: str, key: str = "grad") -> dict[str, torch.Tensor]:
    if key not in stats:
        raise ConfigError("importance", f"{name!r} needs gradients from calibration data; run it in a recipe "
                          "(the stage collects them) or pass data")
    return stats[key]


@register("hessian", namespace="importance")
def hessian_importance(model: nn.Module, group, stats: Stats, chunk: int = 16) -> torch.Tensor:
    """Second-order loss change of zeroing each channel (SOSP, seed 002), one exact Hessian-vector
    product per channel:  dL_c = g^T d_c + 0.5 d_c^T H d_c,  d_c = -w on channel c's parameters in
    every member (producer filters, norm scale/shift, consumer columns), 0 elsewhere; g and H are of
    the mean calibration loss. (That is L(w + d_c) - L(w) to second order, = -g^T w_c + 0.5 w_c^T H w_c
    as seed 002 writes it; the tests check it against the exact loss change on a quadratic loss.)

    Each channel gets its own direction: d_c^T H d_c keeps the curvature between the channel's
    parameters across layers (the producer-consumer cross terms a diagonal Fisher drops), and no
    term between two channels. We do not use SOSP-H's shortcut H(sum_c d_c), which is one HVP per
    group but charges each channel half of its couplings with every other. Cost is kept down by
    batching, exactly: per calibration batch one forward and one create_graph backward, then `chunk`
    channels' HVPs at a time through one vmapped double backward (`is_grads_batched`).
    Signed: a channel whose removal lowers the loss ranks lowest.
    """
    calib = stats.get("hessian")
    if calib is None:
        raise ConfigError("importance", "'hessian' needs labelled calibration data; run it in a recipe or pass data")
    masks = _channel_masks(model, group)  # name -> (param, bool mask (size, *param.shape))
    if not masks:
        return torch.zeros(group.size)
    params = [p for p, _ in masks.values()]
    first = torch.zeros(group.size, dtype=torch.float64)  # g^T d_c
    second = torch.zeros(group.size, dtype=torch.float64)  # d_c^T H d_c
    batches, loss_fn = calib["batches"], calib["loss_fn"]
    with _scoring(model):
        for batch in batches:
            loss = loss_fn(model, batch) / len(batches)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
            for start in range(0, group.size, chunk):
                rows = slice(start, min(start + chunk, group.size))
                dirs = [-p.detach() * m[rows] for p, m in masks.values()]  # each (k, *param.shape)
                hvps = _batched_hvp(grads, params, dirs)
                for g, d, hd in zip(grads, dirs, hvps):
                    first[rows] += (g.detach() * d).flatten(1).sum(1).double().cpu()
                    second[rows] += (hd * d).flatten(1).sum(1).double().cpu()
    return (first + 0.5 * second).float()


def _channel_masks(model: nn.Module, group) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """For every trainable parameter of the group, which entries each channel owns: (size, *shape)."""
    masks: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    for m in group.members:
        t = member_tensor(model, m)
        if not isinstance(t, nn.Parameter) or not t.requires_grad:
            continue
        own = torch.zeros(group.size, t.shape[m.dim], dtype=torch.bool, device=t.device)  # (size, D)
        cols = m.offset + torch.arange(group.size * m.stride, device=t.device)
        own[torch.arange(group.size, device=t.device).repeat_interleave(m.stride), cols] = True
        shape = [group.size] + [1] * t.dim()
        shape[m.dim + 1] = t.shape[m.dim]
        _, prev = masks.get(m.name, (t, torch.zeros((), dtype=torch.bool, device=t.device)))
        masks[m.name] = (t, prev | own.view(shape))  # a parameter met twice: union of its slices
    return {n: (p, mask.expand(group.size, *p.shape)) for n, (p, mask) in masks.items()}


def _batched_hvp(grads, params, dirs) -> list[torch.Tensor]:
    """H d for k directions at once: the vector-Jacobian products of the gradient (H is symmetric)."""
    try:
        return list(torch.autograd.grad(grads, params, grad_outputs=dirs, retain_graph=True,
                                        is_grads_batched=True, allow_unused=True, materialize_grads=True))
    except RuntimeError:  # an op without a batching rule: one direction at a time, same numbers
        per = [torch.autograd.grad(grads, params, grad_outputs=[d[i] for d in dirs], retain_graph=True,
                                   allow_unused=True, materialize_grads=True) for i in range(len(dirs[0]))]
        return [torch.stack(hs) for hs in zip(*per)]


@contextlib.contextmanager
def _scoring(model: nn.Module) -> Iterator[None]:
    """Eval mode (BN on running statistics, as deployed) with gradients on; the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


# Criteria whose scores estimate the loss change of removing a channel: comparable across groups as
# they are (a latency knapsack trades them against milliseconds); the others are normalised per group
# (obs too: its scores are per weight a channel carries, not per channel, so the knapsack's sum would be off).
LOSS_UNITS = frozenset({"taylor", "fisher", "hessian"})
# Criteria global ranking takes as they are; it mean-normalises every other one per group, the loss-unit ones
# included. Measured (MNIST-1D CNN, 1/4 MACs, reconstructed): fisher 85.5% and hessian 96.1% unnormalised vs
# 97.5% normalised; MiniLM heads+FFN
# at 3/4 MACs: obs as it is 0.92 cosine out of domain vs 0.885 ranked per layer (local).
RANKED_AS_IS = frozenset({"obs"})
NEEDS = {"taylor": "grad", "fisher": "grad_sq", "activation": "activations", "hessian": "hessian", "obs": "grams"}


def collect_stats(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                  need: str, modules: Iterable[str] = (), max_batches: int = 8) -> Stats:
    """Gradients, squared gradients or output activations of `model` on up to `max_batches` batches
    (through the calibration engine; the model's mode and its parameters' .grad are restored)."""
    if need == "activations":
        found = calibrate(model, batches, {n: ("out_absmean",) for n in modules}, batches=max_batches,
                          runner=lambda m, b: loss_fn(m, b))
        return {"activations": {n: st.out_absmean().float() for n, st in found.items()}}
    if need == "grams":  # each named consumer's input Gram (conv: of its unfolded patches; padding tokens left out)
        found = calibrate(model, batches, {n: ("patch_gram",) if isinstance(model.get_submodule(n), nn.modules.conv._ConvNd)
                                           else ("gram",) for n in modules}, batches=max_batches)
        return {"grams": {n: st.gram() for n, st in found.items()}}
    if need == "hessian":  # the criterion runs its own HVPs on these batches, group by group
        return {"hessian": {"batches": [b for _, b in zip(range(max_batches), batches)], "loss_fn": loss_fn}}
    grad, grad_sq = gradient_sums(model, batches, loss_fn, max_batches, squares=True)
    return {"grad": grad, "grad_sq": grad_sq}
