"""Rank selection: a fixed rank, an energy fraction, or a global parameter / MAC budget.

A layer's options are described by a `Ladder`: ranks in increasing cost, each with its cost (weights
or MACs of the factorized layer) and the fraction of the weight's energy (squared Frobenius norm) it
loses. Under a budget, `allocate` grows every layer's rank greedily, always taking the step that
recovers the most energy per unit of cost, until the budget is spent; a layer whose rank reaches the
break-even point (factors cost as much as the dense weight) stays dense.

>>> s = torch.tensor([3.0, 2.0, 1.0])
>>> energy_rank(s, 0.9)   # 9 + 4 of 14 = 0.93 >= 0.9
2
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Ladder", "allocate", "energy_rank", "ladder", "round_rank"]


def energy_rank(s: Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep at least `energy` of `sum(s**2)`."""
    e = s.detach().double().pow(2)
    total = float(e.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(e, 0) / total  # (R,), non-decreasing to 1
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1


def round_rank(rank: int, multiple: int, full: int) -> int:
    """`rank` rounded up to a multiple of `multiple`, at most `full`.

    >>> round_rank(9, 8, 64), round_rank(60, 8, 62)
    (16, 62)
    """
    return min(full, max(multiple, math.ceil(rank / multiple) * multiple))


@dataclasses.dataclass
class Ladder:
    """The options of one layer, cheapest first: `ranks[i]` costs `costs[i]` and loses `errors[i]`.

    dense_cost: the cost of keeping the layer dense (the last, error-free option)
    """

    name: str
    ranks: list[tuple[int, ...]]
    costs: list[float]
    errors: list[float]
    dense_cost: float


def ladder(name: str, rank_path: list[tuple[int, ...]], cost: Callable[[tuple[int, ...]], float],
           error: Callable[[tuple[int, ...]], float], dense_cost: float) -> Ladder:
    """Keep the ranks of `rank_path` that cost less than the dense layer (the break-even cut)."""
    ranks = [r for r in rank_path if cost(r) < dense_cost]
    costs, errors = [float(cost(r)) for r in ranks], [float(error(r)) for r in ranks]
    return Ladder(name, ranks, costs, errors, float(dense_cost))


def allocate(ladders: list[Ladder], budget: float) -> tuple[dict[str, tuple[int, ...] | None], float]:
    """Greedy ranks within `budget` total cost: `({name: ranks, or None for dense}, cost spent)`.

    Every layer starts at its cheapest rank; the step (to the next rank, or to dense after the last)
    with the largest energy gained per unit of cost is taken while it fits. Raises `ValueError`
    when even the cheapest ranks exceed the budget.

    >>> a = Ladder("a", [(1,), (2,)], [10, 20], [0.5, 0.1], 40)
    >>> b = Ladder("b", [(1,), (2,)], [10, 20], [0.2, 0.1], 40)
    >>> allocate([a, b], 30)
    ({'a': (2,), 'b': (1,)}, 30.0)
    """
    level = {}
    spent = 0.0
    for lad in ladders:
        level[lad.name] = 0 if lad.ranks else -1  # -1: no rank saves cost, dense
        spent += lad.costs[0] if lad.ranks else lad.dense_cost
    if spent > budget * (1 + 1e-9):
        raise ValueError(f"the cheapest factorization costs {spent:.0f}, over the budget {budget:.0f}")
    by_name = {lad.name: lad for lad in ladders}
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        lad, i = by_name[name], level[name]
        if i < 0:
            return
        nxt_cost = lad.costs[i + 1] if i + 1 < len(lad.ranks) else lad.dense_cost
        nxt_err = lad.errors[i + 1] if i + 1 < len(lad.ranks) else 0.0
        gain = (lad.errors[i] - nxt_err) / max(nxt_cost - lad.costs[i], 1e-12)
        heapq.heappush(heap, (-gain, name))

    for lad in ladders:
        push(lad.name)
    while heap:
        _, name = heapq.heappop(heap)
        lad, i = by_name[name], level[name]
        nxt_cost = lad.costs[i + 1] if i + 1 < len(lad.ranks) else lad.dense_cost
        if spent - lad.costs[i] + nxt_cost > budget * (1 + 1e-9):
            continue  # this layer's next step does not fit; cheaper steps of others may
        spent += nxt_cost - lad.costs[i]
        level[name] = i + 1 if i + 1 < len(lad.ranks) else -1
        push(name)
    chosen = {lad.name: (lad.ranks[level[lad.name]] if level[lad.name] >= 0 else None) for lad in ladders}
    return chosen, spent
