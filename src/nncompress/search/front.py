"""Pareto fronts and the goals a user states, over measured points (pure functions, no I/O).

A point is better when its quality is higher and its latency and bytes are lower. Seed 002: keep only
the Pareto-optimal networks; a goal then picks one of them. A quality where lower is better
(perplexity) enters as its negation (`score`) and is shown as itself (`quality_text`), so every rule
here reads "higher is better"; `--max-drop X` then lets perplexity rise by X.

>>> a = Point("a", quality=0.95, latency=0.5, latency_ms=5.0, bytes=100)
>>> b = Point("b", quality=0.90, latency=0.6, latency_ms=6.0, bytes=120)
>>> c = Point("c", quality=0.97, latency=0.9, latency_ms=9.0, bytes=300)
>>> [p.label for p in pareto_front([a, b, c])], dominates(a, b)
(['a', 'c'], True)
>>> ref = Point("baseline", quality=0.98, latency=1.0, latency_ms=10.0, bytes=400)
>>> choose(parse_goal(max_drop=0.02), [a, c], ref).picks
[('smallest', 'c'), ('fastest', 'c')]
>>> v = choose(parse_goal(target_latency="4x"), [a, c], ref)
>>> v.met, v.closest.label
(False, 'a')
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from ..core.errors import ConfigError
from ..eval.report import higher_is_better, human_bytes


def score(quality_name: str, value: float) -> float:
    """What the search maximises for a measured quality: itself, or its negation when lower is better.

    >>> score("accuracy", 0.9), score("perplexity", 4.5)
    (0.9, -4.5)
    """
    return value if higher_is_better(quality_name) else -value


def quality_text(quality_name: str, s: float, ref: float | None = None) -> str:
    """A score shown as the quality it stands for, with the change from the score `ref` when given.

    >>> quality_text("accuracy", 0.95, 0.98), quality_text("perplexity", -4.2, -4.0)
    ('95.0% (-3.0)', '4.2000 (+0.2000)')
    """
    value, base = score(quality_name, s), None if ref is None else score(quality_name, ref)
    if quality_name == "accuracy":
        return f"{value * 100:.1f}%" + ("" if base is None else f" ({(value - base) * 100:+.1f})")
    return f"{value:.4f}" + ("" if base is None else f" ({value - base:+.4f})")


@dataclasses.dataclass
class Point:
    """One measured recipe. latency: median relative to the uncompressed model timed interleaved with it."""

    label: str
    quality: float
    latency: float
    latency_ms: float
    bytes: int
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # trial, rung, recipe, what was picked

    def costs(self) -> tuple[float, float, float]:
        return -self.quality, self.latency, float(self.bytes)


def dominates(a: Point, b: Point) -> bool:
    """`a` is at least as good as `b` in every objective and better in one."""
    return all(x <= y for x, y in zip(a.costs(), b.costs())) and a.costs() != b.costs()


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point dominates (equal points: the first kept), fastest first."""
    front: list[Point] = []
    for p in points:
        if any(dominates(q, p) or (q.costs() == p.costs() and q in front) for q in points if q is not p):
            continue
        front.append(p)
    return sorted(front, key=lambda p: (p.latency, p.bytes, -p.quality))


def promising(points: list[Point], tol: float = 0.05) -> list[Point]:
    """The points no other point dominates by more than measurement noise: a latency within `tol`
    (relative) of another counts as equal, so two points that differ only by timing noise are both
    kept (rung 1 uses it to choose what gets the full recipe; the reported front uses `pareto_front`).

    >>> a = Point("a", 0.9, 0.50, 5.0, 100)
    >>> twin = Point("twin", 0.9, 0.51, 5.1, 100)   # the same model, timed a little slower
    >>> [p.label for p in promising([a, twin])], [p.label for p in pareto_front([a, twin])]
    (['a', 'twin'], ['a'])
    """
    def clearly_dominates(q: Point, p: Point) -> bool:
        not_worse = q.quality >= p.quality and q.bytes <= p.bytes and q.latency <= p.latency * (1 + tol)
        better = q.quality > p.quality or q.bytes < p.bytes or q.latency < p.latency * (1 - tol)
        return not_worse and better

    return [p for p in points if not any(clearly_dominates(q, p) for q in points if q is not p)]


def front_2d(points: list[Point], cost: Literal["latency", "bytes"]) -> list[Point]:
    """The points optimal for quality against one cost alone, cheapest first (what a plot panel joins)."""
    out, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (getattr(p, cost), -p.quality)):
        if p.quality > best:
            out.append(p)
            best = p.quality
    return out


def spread(points: list[Point], k: int) -> list[Point]:
    """At most `k` of `points`, evenly spaced along latency (all of them when there are few)."""
    if len(points) <= k:
        return list(points)
    if k <= 0:
        return []
    ordered = sorted(points, key=lambda p: p.latency)
    if k == 1:
        return [max(ordered, key=lambda p: p.quality)]
    idx = sorted({round(i * (len(ordered) - 1) / (k - 1)) for i in range(k)})
    return [ordered[i] for i in idx]


# ------------------------------------------------------------------------------------------------ goals

@dataclasses.dataclass(frozen=True)
class Goal:
    """What the user asked for. kind: front (the whole front), max_drop (smallest and fastest within
    `value` of the baseline's quality), latency / size (best quality within a budget; `relative`:
    `value` is a factor against the uncompressed model, else milliseconds / bytes)."""

    kind: Literal["front", "max_drop", "latency", "size"] = "front"
    value: float = 0.0
    relative: bool = False
    text: str = ""

    def describe(self) -> str:
        if self.kind == "max_drop":
            return f"max drop {self.text}"
        if self.kind == "latency":
            return f"target latency {self.text}"
        if self.kind == "size":
            return f"target size {self.text}"
        return "whole Pareto front"


_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*"
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}


def parse_goal(max_drop: float | str | None = None, target_latency: str | None = None,
               target_size: str | None = None) -> Goal:
    """The goal of the command-line options (at most one given).

    >>> parse_goal(target_latency="2x"), parse_goal(target_size="50kB").value
    (Goal(kind='latency', value=2.0, relative=True, text='2x'), 50000.0)
    """
    given = [(n, v) for n, v in (("--max-drop", max_drop), ("--target-latency", target_latency),
                                 ("--target-size", target_size)) if v is not None]
    if len(given) > 1:
        raise ConfigError(given[1][0], f"give one goal, not {given[0][0]} and {given[1][0]}")
    if max_drop is not None:
        drop = _number(str(max_drop), "--max-drop", "0.01 (1 point of accuracy)")
        return Goal("max_drop", drop, False, str(max_drop))
    if target_latency is not None:
        return _budget("latency", target_latency, {"": 1.0, "ms": 1.0, "s": 1e3}, "2x (twice as fast) or 5ms")
    if target_size is not None:
        return _budget("size", target_size, _SIZE_UNITS, "4x (a quarter of the bytes) or 50kB")
    return Goal()


def _budget(kind: str, text: str, units: dict[str, float], example: str) -> Goal:
    option = f"--target-{kind}"
    m = re.fullmatch(_NUMBER + r"([a-zA-Z]*)\s*", text)
    if not m:
        raise ConfigError(option, f"cannot read {text!r}; write e.g. {example}")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "x":
        if value <= 1:
            raise ConfigError(option, f"a factor must be > 1 (smaller than the uncompressed model), got {text}")
        return Goal(kind, value, True, text)
    if unit not in units:
        raise ConfigError(option, f"unknown unit {m.group(2)!r} in {text!r}; write e.g. {example}")
    if value <= 0:
        raise ConfigError(option, f"must be > 0, got {text}")
    return Goal(kind, value * units[unit], False, text)


def _number(text: str, option: str, example: str) -> float:
    m = re.fullmatch(_NUMBER, text)
    if not m:
        raise ConfigError(option, f"cannot read {text!r}; write e.g. {example}")
    return float(m.group(1))


@dataclasses.dataclass
class Verdict:
    """What the goal picked from the front: `picks` (role, label) when met, else the `closest` point."""

    goal: Goal
    met: bool
    picks: list[tuple[str, str]]
    closest: Point | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"goal": dataclasses.asdict(self.goal), "met": self.met, "picks": self.picks,
                "closest": self.closest.label if self.closest else None, "message": self.message}


def within(goal: Goal, p: Point, ref: Point) -> bool:
    """Whether `p` meets `goal`'s budget (always true for the whole front)."""
    if goal.kind == "max_drop":
        return p.quality >= ref.quality - goal.value - 1e-12
    if goal.kind == "latency":
        return p.latency <= 1.0 / goal.value if goal.relative else p.latency_ms <= goal.value
    if goal.kind == "size":
        return p.bytes <= ref.bytes / goal.value if goal.relative else p.bytes <= goal.value
    return True


def choose(goal: Goal, front: list[Point], ref: Point) -> Verdict:
    """Apply `goal` to the front; an unreachable budget names the closest point found."""
    if not front:
        return Verdict(goal, False, [], None, "no candidate was measured: nothing to choose from")
    if goal.kind == "front":
        return Verdict(goal, True, [], None, f"whole Pareto front: {len(front)} points")
    ok = [p for p in front if within(goal, p, ref)]
    name = ref.info.get("quality_name", "accuracy")

    def _q(p: Point) -> str:
        return quality_text(name, p.quality)

    def _show(p: Point) -> str:
        return f"{p.label} ({_q(p)}, {1 / p.latency:.2f}x faster / {p.latency_ms:.3g} ms, {human_bytes(p.bytes)})"

    if goal.kind == "max_drop":
        if ok:
            small = min(ok, key=lambda p: (p.bytes, -p.quality))
            fast = min(ok, key=lambda p: (p.latency, -p.quality))
            return Verdict(goal, True, [("smallest", small.label), ("fastest", fast.label)], None,
                           f"within {goal.text} of the baseline's quality ({_q(ref)}): smallest {_show(small)}; "
                           f"fastest {_show(fast)}")
        near = max(front, key=lambda p: p.quality)
        return Verdict(goal, False, [], near, f"NOT met: no point is within {goal.text} of the baseline's quality "
                       f"({_q(ref)}); closest: {_show(near)}, a drop of {ref.quality - near.quality:.4f}")
    if ok:
        best = max(ok, key=lambda p: (p.quality, -p.latency, -p.bytes))
        return Verdict(goal, True, [("best quality", best.label)], None,
                       f"best quality within {goal.describe()}: {_show(best)}")
    cost = (lambda p: p.latency if goal.relative else p.latency_ms) if goal.kind == "latency" else (lambda p: p.bytes)
    near = min(front, key=lambda p: (cost(p), -p.quality))
    return Verdict(goal, False, [], near, f"NOT met: no point reaches {goal.describe()}; closest: {_show(near)}")


def baseline_table(front: list[Point], baselines: list[Point]) -> list[dict[str, Any]]:
    """Per baseline: the front point that dominates it (if any), and the front's best quality within
    the baseline's latency and within its bytes (each a budget point of the comparison)."""
    rows = []
    for b in baselines:
        by = next((p.label for p in sorted(front, key=lambda p: -p.quality) if dominates(p, b)), None)
        lat = [p.quality for p in front if p.latency <= b.latency]
        size = [p.quality for p in front if p.bytes <= b.bytes]
        rows.append({"baseline": b.label, "dominated_by": by,
                     "best_within_latency": max(lat) if lat else None,
                     "best_within_bytes": max(size) if size else None})
    return rows
