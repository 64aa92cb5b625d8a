"""Kernel-level pruning that leaves a regular computation: a dense convolution becomes a grouped one.

Removing single K x K kernels from the C_out x C_in x K x K volume gives an irregular pattern; keeping
only the kernels that connect input group g to output group g, for a partition of the input and of
the output channels into G equal groups, is exactly a grouped convolution, with 1/G of the kernels
(C_i = C_o = 6 in 3 groups keeps 3 x 2 x 2 = 12 of 36; seed 001's count of 18 has 3 inputs per
group, i.e. overlapping input groups, which a grouped conv cannot express). The partition is free:
channels are permuted first, so it is chosen to keep the most kernel magnitude:

    S[o, i] = ||W[o, i]||_1           the kernel score matrix, (C_out, C_in)
    max  sum_{o, i: out_group[o] == in_group[i]}  S[o, i]    over balanced partitions

solved by alternating exact balanced assignments (outputs given the input partition, then inputs
given the output partition; each step cannot lower the objective) from the identity partition and
a few seeded random ones. The conv is replaced by `GroupedConv`: gather the input channels
(permutation) -> `ConvNd(groups=G)` -> put the output channels back in their original order. It
computes what the dense conv computes with the cross-group kernels zeroed, with 1/G of the weights.

    model = nncompress.apply(model, GroupConvConfig(groups=4), targets=Targets(include=("layer3.*",)))
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Literal

import torch
import torch.nn as nn

from ..core import Config, ConfigError, Context, Site, Wrapper, check, layer_transform, wrapper
from ..core.reconstruct import reconstruction_on, refit_to_reference

__all__ = ["GroupConvConfig", "GroupedConv", "balanced_assign", "group_partition", "kernel_group_mask",
           "kernel_scores"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass(frozen=True)
class GroupConvConfig(Config):
    """Kernel-level pruning of dense convolutions into `groups`-way grouped convolutions.

    groups:     G; a targeted conv whose channel counts G does not divide is skipped (see record.skipped)
    importance: kernel score: l1 (sum |w|) or l2 (sum w^2) over each K x K kernel
    iterations: rounds of the alternating assignment per start
    restarts:   seeded random starts besides the identity partition
    seed:       for the random starts
    reconstruct: "lstsq": re-fit each grouped conv, group by group and in forward order, by least squares so
                its outputs on calibration data match the dense conv's (`core.reconstruct`); "auto": lstsq
                when the context has calibration data; "none": keep the dense weights' blocks as they are
    calib_batches: calibration batches the refit reads
    """

    groups: int = 2
    importance: Literal["l1", "l2"] = "l1"
    iterations: int = 10
    restarts: int = 2
    seed: int = 0
    reconstruct: Literal["auto", "lstsq", "none"] = "auto"
    calib_batches: int = 8

    def __post_init__(self):
        check(self.groups >= 2, "groups", f"must be >= 2 (1 is the dense conv), got {self.groups}")
        check(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")
        check(self.restarts >= 0, "restarts", f"must be >= 0, got {self.restarts}")
        check(self.reconstruct in ("auto", "lstsq", "none"), "reconstruct",
              f"must be auto, lstsq or none, got {self.reconstruct!r}")
        check(self.calib_batches >= 1, "calib_batches", f"must be >= 1, got {self.calib_batches}")


# ---------------------------------------------------------------------------------------------
# pure maths


def kernel_scores(weight: torch.Tensor, importance: str = "l1") -> torch.Tensor:
    """(C_out, C_in) score of each kernel of a dense conv weight (C_out, C_in, *K).

    >>> kernel_scores(torch.tensor([[[1.0, -2.0]], [[0.0, 3.0]]])).tolist()
    [[3.0], [3.0]]
    """
    w = weight.detach().double().flatten(2)  # (O, I, K)
    return w.abs().sum(-1) if importance == "l1" else w.pow(2).sum(-1)


def kernel_group_mask(out_group: torch.Tensor, in_group: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in) bool: the kernels kept, those joining an input and an output of the same group.

    >>> kernel_group_mask(torch.tensor([0, 1]), torch.tensor([1, 0, 1])).int().tolist()
    [[0, 1, 0], [1, 0, 1]]
    """
    return out_group[:, None] == in_group[None, :]


def balanced_assign(gain: torch.Tensor) -> torch.Tensor:
    """Assign N items to G groups of N/G each, maximising the total `gain` (N, G); exact (Hungarian).

    >>> balanced_assign(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])).tolist()
    [1, 0, 1, 0]
    """
    from scipy.optimize import linear_sum_assignment  # scipy comes with scikit-learn

    n, g = gain.shape
    cap = n // g
    cost = -gain.double().repeat_interleave(cap, dim=1)  # (N, N): column c is a seat of group c // cap
    rows, cols = linear_sum_assignment(cost.numpy())
    out = torch.empty(n, dtype=torch.long)
    out[torch.as_tensor(rows)] = torch.as_tensor(cols) // cap
    return out


def _group_sums(scores: torch.Tensor, assign: torch.Tensor, groups: int) -> torch.Tensor:
    """(C, G) sums of `scores` (R, C) over the rows of each group (index_add: no BLAS call, which is
    needlessly slow for these thin double products on CPU)."""
    return scores.new_zeros(groups, scores.shape[1]).index_add_(0, assign, scores).t()


def _kept(scores: torch.Tensor, out_group: torch.Tensor, in_group: torch.Tensor) -> float:
    return float(scores[kernel_group_mask(out_group, in_group)].sum())


def group_partition(scores: torch.Tensor, groups: int, iterations: int = 10, restarts: int = 2,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced partitions `(out_group (C_out,), in_group (C_in,))` keeping the most of `scores` (C_out, C_in).

    Starts from the identity partition (what an unpermuted grouped conv keeps), so the result never
    keeps less than that; then `restarts` seeded random starts; the best is returned.

    A hidden grouping (outputs {0, 1, 3} read inputs {0, 2, 4}) plus noise is found again:

    >>> true = kernel_group_mask(torch.tensor([0, 0, 1, 0, 1, 1]), torch.tensor([0, 1, 0, 1, 0, 1]))
    >>> s = true.double() + 0.1 * torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    >>> o, i = group_partition(s, 2)
    >>> bool(kernel_group_mask(o, i).equal(true))
    True
    """
    scores = scores.double()
    n_out = scores.shape[0]
    gen = torch.Generator().manual_seed(seed)
    starts = [torch.arange(n_out) * groups // n_out]
    starts += [starts[0][torch.randperm(n_out, generator=gen)] for _ in range(restarts)]
    best, best_kept = None, -1.0
    for out_group in starts:
        kept, in_group = -1.0, None
        for _ in range(iterations):
            in_group = balanced_assign(_group_sums(scores, out_group, groups))  # (I, G) gains
            out_group = balanced_assign(_group_sums(scores.t(), in_group, groups))  # (O, G) gains
            now = _kept(scores, out_group, in_group)
            if now <= kept + 1e-4 * max(1e-12, abs(kept)):
                kept = max(kept, now)
                break
            kept = now
        if kept > best_kept:
            best, best_kept = (out_group, in_group), kept
    return best


# ---------------------------------------------------------------------------------------------
# the module


@wrapper("grouped_conv")
class GroupedConv(Wrapper):
    """gather input channels -> ConvNd(groups=G) -> restore the output channel order.

    Equals the dense conv with the kernels between different groups zeroed. The original is not kept
    as `.base` (it would keep the dense weights the grouping removes); `merge()` rebuilds the masked
    dense conv instead. A container: other techniques reach the grouped `conv` inside.
    """

    def __init__(self, conv: nn.Module, out_group: torch.Tensor, in_group: torch.Tensor, groups: int):
        super().__init__()
        out_group, in_group = torch.as_tensor(out_group).long(), torch.as_tensor(in_group).long()
        in_perm = torch.argsort(in_group, stable=True)  # (I,): inputs of group 0, then group 1, ...
        out_order = torch.argsort(out_group, stable=True)  # (O,): grouped output j is dense output out_order[j]
        w = conv.weight.detach()  # (O, I, *K)
        ci, co = w.shape[1] // groups, w.shape[0] // groups
        self.conv = type(conv)(w.shape[1], w.shape[0], conv.kernel_size, stride=conv.stride, padding=conv.padding,
                               dilation=conv.dilation, groups=groups, bias=conv.bias is not None,
                               padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            blocks = [w[out_order[g * co:(g + 1) * co]][:, in_perm[g * ci:(g + 1) * ci]] for g in range(groups)]
            self.conv.weight.copy_(torch.cat(blocks))  # (O, I/G, *K)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias.detach()[out_order])
        self._set_order(in_perm.to(w.device), out_order.to(w.device))

    def _set_order(self, in_perm: torch.Tensor, out_order: torch.Tensor) -> None:
        # structure, described in the manifest: not saved with the weights
        self.register_buffer("in_perm", in_perm, persistent=False)
        self.register_buffer("out_order", out_order, persistent=False)
        self.register_buffer("out_inverse", torch.argsort(out_order), persistent=False)
        self.identity_in = bool(torch.equal(in_perm.cpu(), torch.arange(len(in_perm))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.identity_in:
            x = x.index_select(1, self.in_perm)  # (N, I, ...) in group order
        y = self.conv(x)  # (N, O, ...) in group order
        return y.index_select(1, self.out_inverse)  # (N, O, ...) in the dense conv's order

    def partition(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(out_group (C_out,), in_group (C_in,))`: the group of every dense output and input channel."""
        conv = self.conv.base if isinstance(self.conv, Wrapper) else self.conv   # a quantized grouped conv
        g, n_out, n_in = conv.groups, len(self.out_order), len(self.in_perm)
        out_group, in_group = torch.empty_like(self.out_order), torch.empty_like(self.in_perm)
        out_group[self.out_order] = torch.arange(n_out, device=self.out_order.device) // (n_out // g)
        in_group[self.in_perm] = torch.arange(n_in, device=self.in_perm.device) // (n_in // g)
        return out_group, in_group

    def describe(self, child: Any) -> dict[str, Any]:
        return {"conv": child(self.conv), "in_perm": self.in_perm.tolist(), "out_order": self.out_order.tolist()}

    @classmethod
    def rebuild(cls, desc: dict[str, Any], child: Any) -> "GroupedConv":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.conv = child(desc["conv"])
        layer._set_order(torch.tensor(desc["in_perm"], dtype=torch.long), torch.tensor(desc["out_order"], dtype=torch.long))
        return layer

    def merge(self) -> nn.Module:
        """The equivalent dense conv (groups=1) with the cross-group kernels zero."""
        c = self.conv.merge() if isinstance(self.conv, Wrapper) else self.conv
        g = c.groups
        o, ci = c.weight.shape[0], c.weight.shape[1]
        dense = type(c)(ci * g, o, c.kernel_size, stride=c.stride, padding=c.padding, dilation=c.dilation,
                        bias=c.bias is not None, padding_mode=c.padding_mode, device=c.weight.device,
                        dtype=c.weight.dtype)
        with torch.no_grad():
            dense.weight.zero_()
            co = o // g
            for k in range(g):
                rows, cols = self.out_order[k * co:(k + 1) * co], self.in_perm[k * ci:(k + 1) * ci]
                dense.weight[rows[:, None], cols[None, :]] = c.weight[k * co:(k + 1) * co]
            if c.bias is not None:
                dense.bias[self.out_order] = c.bias
        return dense


# ---------------------------------------------------------------------------------------------
# the transform


def _why_not(conv: nn.Module, groups: int) -> str | None:
    if conv.groups != 1:
        return f"already grouped (groups={conv.groups})"
    if conv.in_channels % groups or conv.out_channels % groups:
        return f"{conv.in_channels} -> {conv.out_channels} channels are not divisible by groups={groups}"
    return None


@layer_transform("group_conv", config=GroupConvConfig, layers=_CONVS, on_wrapped="through", what="Conv1d/2d/3d")
def _group_conv(model: nn.Module, config: GroupConvConfig, ctx: Context, sites: list[Site]) -> nn.Module:
    """Kernel-level pruning: dense convolutions -> equivalent grouped convolutions with channel permutations."""
    done, skipped, kept = {}, {}, {}
    refit = reconstruction_on(config.reconstruct, ctx, "group_conv.reconstruct")
    reference = copy.deepcopy(sites[0].model) if refit else None
    orders: dict[str, list[int]] = {}
    for site in sites:
        name, conv = site.name, site.layer
        reason = _why_not(conv, config.groups)
        if reason:
            skipped[name] = reason
            continue
        s = kernel_scores(conv.weight, config.importance)  # (O, I)
        out_group, in_group = group_partition(s, config.groups, config.iterations, config.restarts, config.seed)
        done[name] = config.groups
        kept[name] = round(_kept(s, out_group, in_group) / max(float(s.sum()), 1e-30), 6)
        grouped = GroupedConv(conv, out_group, in_group, config.groups)
        orders[f"{name}.conv"] = grouped.out_order.tolist()
        site.replace(grouped)
    if not done:
        first = next(iter(skipped.items()))
        raise ConfigError("groups", f"no targeted conv can be split into {config.groups} groups "
                          f"(e.g. {first[0]}: {first[1]}); choose groups dividing the channel counts")
    ctx.record.update(convs=done, kept_fraction=kept, skipped=skipped)
    model = sites[0].model
    if reference is not None:  # each grouped conv (its outputs in group order) refit to the dense conv's outputs
        errors = refit_to_reference(model, reference, list(orders), ctx.data.calib, config.calib_batches, ctx.device,
                                    outputs=orders, sources={n: n.rpartition(".")[0] for n in orders})
        if errors:
            ctx.record["reconstruct"] = {n.rpartition(".")[0]: {k: float(f"{v:.4g}") for k, v in e.items()}
                                         for n, e in errors.items()}
    ctx.log(f"group_conv: {len(done)} convs grouped {config.groups}-way, {len(skipped)} skipped")
    return model
