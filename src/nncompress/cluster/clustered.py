"""`ClusteredLayer`: a Linear or Conv whose weight is `codebook[index]`, with a trainable codebook.

The wrapper keeps the original layer as `.base`, the shared values as the parameter `centroids`
(G, K) (G = 1 per layer, G = out channels per channel) and the fixed assignment as a buffer. The
forward builds `weight = [0 | centroids].gather(1, assignment)`, so autograd pools the gradient of
every weight into its centroid (the sum over the cluster, as in Deep Compression's fine-tune) and a
fine-tune trains the K shared values, never the assignment. Index 0 is a zero slot outside the
codebook: pruned weights stay exactly zero whatever the optimizer does.

Storage is Deep Compression's: the state dict holds `centroids`, the `assignment` (integers in
[0, K], which the checkpoint packs at b bits each, with a 1-bit mask first when most are the zero
slot) and `base.bias`; `base.weight` is derived from them and not stored, so no value is stored
twice and per-channel codebooks cost b bits per weight too.

>>> import torch.nn as nn
>>> layer = ClusteredLayer.from_layer(nn.Linear(64, 8), k=4)
>>> int(torch.unique(layer.shared_weight()).numel()) <= 4, layer.base.weight.requires_grad
(True, False)
>>> x = torch.randn(2, 64)
>>> torch.equal(layer(x), layer.merge()(x))
True
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core import Wrapper, wrapper
from ..core.errors import ModelLoadError
from ..core.surgery import cut_plain, keep_indices
from .kmeans import Init, cluster_weight

CLUSTERABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@wrapper("clustered")
class ClusteredLayer(Wrapper):
    """A Linear / Conv computing with shared weights `centroids[g, assignment]` (see the module doc).

    base:        the original layer; its weight no longer trains (`requires_grad=False`)
    centroids:   (G, K) the trainable codebook, one row per group
    assignment:  (G, numel / G) int64 in [0, K]; 0 is the zero slot, i the centroid i - 1
    """

    holds_values = True
    rewrap_types = CLUSTERABLE

    def __init__(self, base: nn.Module, centroids: Tensor, assignment: Tensor):
        super().__init__()
        if not isinstance(base, CLUSTERABLE):
            raise TypeError(f"ClusteredLayer wraps {', '.join(c.__name__ for c in CLUSTERABLE)}, "
                            f"not {type(base).__name__}")
        groups = centroids.shape[0]
        assert assignment.shape == (groups, base.weight.numel() // groups), (assignment.shape, centroids.shape)
        self.base = base
        base.weight.requires_grad_(False)  # the codebook trains instead; the weight is derived from it
        self.centroids = nn.Parameter(centroids.to(base.weight.dtype).clone())
        self.register_buffer("assignment", assignment.long().clone())
        self._register_state_dict_hook(_without_base_weight)
        self._register_load_state_dict_pre_hook(_with_base_weight, with_module=True)

    @classmethod
    def from_layer(cls, base: nn.Module, k: int, granularity: str = "layer", init: Init = "linear",
                   keep_zeros: bool = True, iters: int = 100,
                   generator: torch.Generator | None = None) -> "ClusteredLayer":
        """Cluster `base`'s weight into k shared values per layer or per output channel."""
        groups = base.weight.shape[0] if granularity == "channel" else 1
        centroids, assignment = cluster_weight(base.weight, k, groups, init, keep_zeros, iters, generator)
        return cls(base, centroids, zero_slot_first(assignment, k))

    @classmethod
    def empty(cls, base: nn.Module, k: int, groups: int) -> "ClusteredLayer":
        """The structure only (zero codebook, everything in slot 0), for replay; the checkpoint fills it."""
        return cls(base, torch.zeros(groups, k), torch.zeros(groups, base.weight.numel() // groups,
                                                             dtype=torch.long))

    @property
    def k(self) -> int:
        return self.centroids.shape[1]

    @property
    def groups(self) -> int:
        return self.centroids.shape[0]

    def shared_weight(self) -> Tensor:
        """The weight the forward uses, in the base layer's shape."""
        return _shared(self.centroids, self.assignment).view_as(self.base.weight)  # (G, R) -> weight shape

    def forward(self, x: Tensor) -> Tensor:
        w = self.shared_weight()
        if isinstance(self.base, nn.Linear):
            return F.linear(x, w, self.base.bias)
        return self.base._conv_forward(x, w, self.base.bias)

    def merge(self) -> nn.Module:
        """A plain copy of `base` whose weight is the shared one (trainable again)."""
        merged = copy.deepcopy(self.base)
        merged.weight = nn.Parameter(self.shared_weight().detach().clone())
        return merged

    def extra_repr(self) -> str:
        return f"k={self.k}, groups={self.groups}"

    # ---- the wrapper protocol (core.surgery) ----------------------------------------------------

    @property
    def stands_for(self) -> type:
        return type(self.base)

    def describe(self, child: Any) -> dict[str, Any]:
        return {"base": child(self.base), "k": self.k, "groups": self.groups}

    @classmethod
    def rebuild(cls, desc: dict[str, Any], child: Any) -> "ClusteredLayer":
        return cls.empty(child(desc["base"]), int(desc["k"]), int(desc["groups"]))

    def rewrap(self, layer: nn.Module, first: bool) -> "ClusteredLayer":
        """`layer` clustered the same way (k shared values per layer, or per output channel)."""
        per_channel = self.groups > 1 and self.groups == self.base.weight.shape[0]
        return ClusteredLayer.from_layer(layer, self.k, "channel" if per_channel else "layer")

    def cut(self, cuts: dict[str, dict[int, list[int]]], attrs: dict[str, Any]) -> None:
        """Keep the same entries of the base and of the assignment (viewed in the weight's shape); a
        per-channel codebook keeps the rows of the kept channels."""
        shape = self.base.weight.shape
        assign = self.assignment.reshape(shape)                           # (O, I, k...) as the weight
        for dim, keep in cuts.get("weight", {}).items():
            idx = torch.as_tensor(keep, dtype=torch.long, device=assign.device)
            assign = assign.index_select(dim, idx)
            if dim == 0 and self.groups > 1:
                keep_indices(self, "centroids", 0, keep)
        cut_plain(self.base, cuts, attrs)
        self.base.weight.requires_grad_(False)
        self.assignment = assign.reshape(self.groups, -1).clone()

    def summary(self) -> str:
        return f"clustered ({self.k} shared values per {'channel' if self.groups > 1 else 'layer'})"


def _shared(centroids: Tensor, assignment: Tensor) -> Tensor:
    """(G, R) weights: `[0 | centroids]` (G, K + 1) gathered at the assignment; the zero slot is a constant."""
    zero = centroids.new_zeros(centroids.shape[0], 1)
    return torch.cat([zero, centroids], dim=1).gather(1, assignment)


def zero_slot_first(assignment: Tensor, k: int) -> Tensor:
    """An assignment with the zero slot at K (k-means' layout) -> with it at 0 (the stored layout)."""
    return torch.where(assignment == k, 0, assignment + 1)


def _without_base_weight(module: ClusteredLayer, state: dict, prefix: str, local_metadata: Any) -> None:
    """`state_dict()` leaves out `base.weight`: centroids and assignment determine it."""
    state.pop(f"{prefix}base.weight", None)


def _with_base_weight(module: ClusteredLayer, state: dict, prefix: str, *args: Any) -> None:
    """Before `load_state_dict`: the base's weight from the incoming centroids and assignment."""
    centroids, assignment = state.get(f"{prefix}centroids"), state.get(f"{prefix}assignment")
    if centroids is None or assignment is None:
        return  # reported as missing keys by torch
    if assignment.numel() and (int(assignment.min()) < 0 or int(assignment.max()) > centroids.shape[1]):
        raise ModelLoadError(f"{prefix}assignment holds indices outside [0, {centroids.shape[1]}]; the checkpoint "
                             "is corrupt, re-save the model")
    weight = _shared(centroids.to(module.base.weight.dtype), assignment.long())
    state[f"{prefix}base.weight"] = weight.view(module.base.weight.shape) if weight.numel() == module.base.weight.numel() \
        else weight


def assignment_from_values(weight: Tensor, centroids: Tensor) -> Tensor:
    """The assignment (G, R) that gives back `weight` from `centroids` (G, K) exactly: each value's
    equal centroid (the first of equal ones), else the zero slot 0 for an exact 0; anything else
    raises `ModelLoadError` (the weights are not a clustered layer's)."""
    groups, k = centroids.shape
    w = weight.detach().reshape(groups, -1)  # (G, R)
    c, order = centroids.detach().sort(dim=1, stable=True)  # (G, K)
    pos = torch.searchsorted(c.contiguous(), w.contiguous()).clamp(max=k - 1)  # (G, R)
    hit = c.gather(1, pos) == w
    assign = torch.where(hit, order.gather(1, pos) + 1, torch.zeros_like(pos))
    bad = ~hit & (w != 0)
    if bad.any():
        raise ModelLoadError(f"clustered weight has {int(bad.sum())} values that are no centroid of its codebook; "
                             "the checkpoint was not written from this clustered model, re-save it")
    return assign
