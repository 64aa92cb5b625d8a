"""Latency-aware structured pruning (HALP, Shen et al. 2022; seed 000): every group's width is chosen
by a greedy knapsack of channel importance against the latency a table measured on the target
predicts, and the pruned model's *measured* latency is then checked against the target, tightening
the table's budget until it is met.

    PruneConfig(importance="taylor", target_latency="2x", latency=LatencyTarget(batch=1, threads=2))

The greedy step removes, from the group where it costs least importance per millisecond saved, the
next channels of lowest importance (loss-change criteria as they are, magnitudes normalised per group
by their mean |score| as global scope does); a layer's latency depends on both its input and output widths, so the saving of
every candidate step is re-read from the table at the widths the model has at that point.

>>> knapsack_order([1.0, 3.0], [2.0, 2.0])        # equal savings: the cheaper importance goes first
[0, 1]
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Literal

import torch
import torch.nn as nn

from ..core import Config, ConfigError, Context, check, lookup
from ..core import distributed
from ..core.config import parse_target  # noqa: F401  (re-exported: the prune doc names it here)
from .importance import LOSS_UNITS

__all__ = ["LatencyTarget", "parse_target", "plan_for_latency", "knapsack_order"]


@dataclasses.dataclass(frozen=True)
class LatencyTarget(Config):
    """Where and how the latency a `target_latency` refers to is measured.

    runtime:   torch (eager, on `device`) or onnxruntime (CPU)
    batch:     the batch size timed (samples of the recipe's data)
    threads:   intra-op threads (None: the current count)
    device:    cpu or cuda (torch only)
    step:      the table samples widths at multiples of this (what the kernels care about)
    tolerance: the measured latency may exceed the target by this fraction
    rounds:    at most this many measure-and-tighten rounds
    """

    runtime: Literal["torch", "onnxruntime"] = "torch"
    batch: int = 1
    threads: int | None = None
    device: str = "cpu"
    step: int = 8
    tolerance: float = 0.03
    rounds: int = 4

    def __post_init__(self) -> None:
        check(self.batch >= 1, "batch", f"must be >= 1, got {self.batch}")
        check(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        check(self.step >= 1, "step", f"must be >= 1, got {self.step}")
        check(0.0 <= self.tolerance < 1.0, "tolerance", f"must be in [0, 1), got {self.tolerance}")
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")


def knapsack_order(costs: list[float], savings: list[float]) -> list[int]:
    """Candidate steps by importance lost per millisecond saved, the cheapest first (steps that save
    nothing last)."""
    ratio = [c / s if s > 0 else float("inf") for c, s in zip(costs, savings)]
    return sorted(range(len(costs)), key=lambda i: (ratio[i], costs[i]))


@dataclasses.dataclass
class _GroupState:
    group: Any
    order: list[int]          # channel indices, least important first
    scores: torch.Tensor      # normalised
    removed: int
    ties: list[tuple[str, int, int]]   # (layer, 0 = output / 1 = input width, channels per group channel)
    steps: list[int] = dataclasses.field(default_factory=list)  # sizes of the steps taken, in order

    @property
    def size(self) -> int:
        return self.group.size


def _ties(group: Any, layers: set[str]) -> list[tuple[str, int, int]]:
    out = []
    for m in group.members:
        if m.param == "weight" and m.module in layers and m.role in ("out", "in"):
            out.append((m.module, 0 if m.role == "out" else 1, m.stride))
    return out


def _granule(config: Any) -> int:
    """Channels leave in multiples of this: the table's width step (the widths kernels are fast at)
    or round_to, whichever is coarser."""
    return max(config.round_to, config.latency.step)


def _floor(size: int, config: Any) -> int:
    return max(config.min_channels, size - int(config.max_ratio * size), 1)


def _next_step(st: _GroupState, config: Any) -> int:
    """How many more channels the group's next step removes (0: none may go)."""
    kept = st.size - st.removed
    r = _granule(config)
    step = kept % r or r
    return step if kept - step >= _floor(st.size, config) else 0


def uniform_plan(scored: list[tuple[Any, torch.Tensor]], fraction: float, config: Any) -> list[tuple[Any, list[int]]]:
    """Every group keeps about `1 - fraction` of its channels (on the granule, above the floor), its
    least important ones removed: the calibration points of a table."""
    plan = []
    r = _granule(config)
    for g, s in scored:
        keep = max(_floor(g.size, config), round(g.size * (1 - fraction) / r) * r)
        if keep < g.size:
            plan.append((g, sorted(torch.argsort(s.float(), stable=True)[:g.size - keep].tolist())))
    return plan


def _widths_after(widths: dict[str, tuple[int, int]], st: _GroupState, k: int) -> dict[str, tuple[int, int]]:
    new = dict(widths)
    for layer, side, stride in st.ties:
        w = list(new[layer])
        w[1 - side] -= k * stride  # side 0 (output) is widths[layer][1]
        new[layer] = (w[0], w[1])
    return new


def plan_for_latency(model: nn.Module, scored: list[tuple[Any, torch.Tensor]], table: Any, target_ms: float,
                     config: Any) -> tuple[list[tuple[Any, list[int]]], float]:
    """The channels to remove so the table predicts at most `target_ms`: `([(group, drop)], predicted)`.

    Raises `ConfigError("target_latency")` when even the most pruning the groups allow stays above it.
    """
    widths = table.widths_of(model)
    states = []
    for g, s in scored:
        ties = _ties(g, set(table.layers))
        if not ties:
            continue  # a group the table does not see (its layers' widths cannot be varied) saves nothing
        s = s.float()
        if config.importance not in LOSS_UNITS:  # magnitudes differ in scale from layer to layer
            s = s / s.abs().mean().clamp_min(1e-12)
        states.append(_GroupState(g, torch.argsort(s, stable=True).tolist(), s, 0, ties))
    predicted = table.predict(widths)
    while predicted > target_ms:
        costs, savings, steps = [], [], []
        for st in states:
            k = _next_step(st, config)
            steps.append(k)
            if k == 0:
                costs.append(float("inf"))
                savings.append(0.0)
                continue
            idx = st.order[st.removed:st.removed + k]
            costs.append(float(st.scores[idx].clamp_min(0).sum()))
            savings.append(predicted - table.predict(_widths_after(widths, st, k)))
        best = knapsack_order(costs, savings)[0] if states else None
        if best is None or steps[best] == 0 or savings[best] <= 0:
            raise ConfigError("target_latency", f"{target_ms:.3g} ms is out of reach: the table predicts "
                              f"{predicted:.3g} ms ({table.full_ms / predicted:.2f}x) once every prunable group "
                              "is at its floor (max_ratio, min_channels, round_to); aim lower, or widen targets")
        st = states[best]
        widths = _widths_after(widths, st, steps[best])
        st.removed += steps[best]
        st.steps.append(steps[best])
        predicted = table.predict(widths)
    widths, predicted = _give_back(states, widths, table, target_ms)
    return [(st.group, sorted(st.order[:st.removed])) for st in states if st.removed], predicted


def _give_back(states: list[_GroupState], widths: dict, table: Any, target_ms: float) -> tuple[dict, float]:
    """Undo greedy steps the budget no longer needs (the last steps overshoot it): while one fits,
    restore the removed step worth the most importance. Greedy plus this repair solves the knapsack
    exactly when each group's losses grow with every step (see the test's brute-force oracle)."""
    while True:
        fits = []
        for st in states:
            if st.steps:
                k = st.steps[-1]
                back = _widths_after(widths, st, -k)
                ms = table.predict(back)
                if ms <= target_ms:
                    fits.append((float(st.scores[st.order[st.removed - k:st.removed]].clamp_min(0).sum()), st, back, ms))
        if not fits:
            return widths, table.predict(widths)
        _, st, widths, _ = max(fits, key=lambda f: f[0])
        st.removed -= st.steps.pop()


def prune_to_latency(model: nn.Module, scored: list, config: Any, ctx: Context, inputs: Any,
                     remove: Any, fraction: float = 1.0) -> tuple[list, dict[str, Any]]:
    """Plan against the table, time the pruned copy against the model, correct the table's budget by
    what was measured, repeat; returns the plan and what was measured. `remove(model, plan)` prunes a
    model in place; `fraction` is how far along an iterative schedule this step goes (1: all the way).

    The plan kept is the least pruned one that met the target; when none did within `rounds`, the
    one that came closest (the record says `met: false`).
    """
    spec: LatencyTarget = config.latency
    value, unit = parse_target(config.target_latency)
    if distributed.world() > 1:
        # each rank would time its own copy on shared cores, plan differently and diverge
        raise ConfigError("target_latency", "is measured in one process; run this stage without torchrun "
                                            "(or give keep_macs instead)")
    table = lookup("latency_table", "measure")(model, inputs, runtime=spec.runtime, threads=spec.threads,
                                               device=spec.device, step=spec.step, cache_dir=ctx.cache_dir)
    measure = lookup("latency", "measure")
    now_ms = table.full_ms

    def timed(plans: list[list]) -> list[tuple[Any, float, float]]:
        """Each plan applied to a copy, timed interleaved with the model: (copy, ms, model's ms)."""
        trials = []
        for plan in plans:
            trials.append(copy.deepcopy(model))
            remove(trials[-1], plan)
        ms = measure([model, *trials], inputs, runtime=spec.runtime, threads=spec.threads, device=spec.device)
        return [(t, m, ms[0]) for t, m in zip(trials, ms[1:])]

    # calibrate the table on the model pruned uniformly at three depths, the deepest as far as the
    # groups allow, so the table knows the floor (ms scaled to the table's baseline)
    depths = (config.max_ratio / 3, config.max_ratio * 2 / 3, config.max_ratio)
    table.fit([(t, m * now_ms / base) for t, m, base in timed([uniform_plan(scored, f, config) for f in depths])])
    if unit == "ms" and value >= now_ms:
        raise ConfigError("target_latency", f"{value:g} ms is no faster than the model already runs "
                          f"({now_ms:.3g} ms at batch {spec.batch} on {spec.runtime}); aim lower")
    # the share of today's latency this step may keep: a speedup compounds over the steps of a schedule
    keep = (1 / value) ** fraction if unit == "x" else (value / now_ms) ** fraction
    budget, rounds, best, closest = now_ms * keep, [], None, None
    for _ in range(spec.rounds):
        try:
            plan, predicted = plan_for_latency(model, scored, table, budget, config)
        except ConfigError:
            if not rounds:
                raise
            break  # tightening past what the groups allow: keep the closest plan measured so far
        [(trial, measured, base)] = timed([plan])
        got = measured / base
        rounds.append({"budget_ms": round(budget, 4), "predicted_ms": round(predicted, 4),
                       "baseline_ms": round(base, 4), "measured_ms": round(measured, 4),
                       "measured_speedup": round(base / measured, 3),
                       "table_error": round(predicted / (got * now_ms) - 1, 4)})
        if got <= keep * (1 + spec.tolerance):
            if best is None or got > best[1]:
                best = (plan, got, len(rounds) - 1)
            if got >= keep * (1 - spec.tolerance):
                break  # met, and not by pruning much more than asked
        elif closest is None or got < closest[1]:
            closest = (plan, got, len(rounds) - 1)
        # the table misjudged this plan: learn from the measurement, then aim by the remaining error
        table.fit([(trial, got * now_ms)])
        budget = keep * table.predict(trial) / got
    plan, got, at = best or closest
    chosen = rounds[at]
    record = {"target": config.target_latency, "runtime": spec.runtime, "batch": spec.batch,
              "threads": table.threads, "device": spec.device, "target_keep": round(keep, 4),
              "measured_speedup": chosen["measured_speedup"], "met": best is not None, "rounds": rounds,
              "table_error": rounds[0]["table_error"]}  # the first plan's: the table had not seen it
    return plan, record
