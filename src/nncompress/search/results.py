"""What a study holds, read back from storage: the final points and their Pareto front, the baselines,
the failures, and the counts and times the report states."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..eval.report import StageMetrics, higher_is_better
from .front import Point, Verdict, baseline_table, choose, Goal, pareto_front, score
from .space import SearchSpec
from .study import as_point, proxy_points

FORMAT = "nncompress.search/1"


@dataclasses.dataclass
class SearchResult:
    """A search's outcome. `points`: every candidate measured with its full recipe (rung 2, or rung 1
    when the proxy caps changed nothing); `front`: their Pareto front; `proxy`: every rung-1 point."""

    spec: SearchSpec
    study: str
    storage: str
    reference: Point
    points: list[Point]
    front: list[Point]
    proxy: list[Point]
    baselines: list[Point]
    verdict: Verdict
    comparison: list[dict[str, Any]]
    counts: dict[str, int]
    failures: list[str]
    workers: int
    compute_s: float          # sum over trials of build + fine-tune + measure
    study_wall_s: float | None  # first trial start to last trial end, across runs and workers
    run_info: dict[str, Any]

    @property
    def dominated(self) -> int:
        return sum(1 for row in self.comparison if row["dominated_by"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; qualities as measured (a perplexity stays positive), whichever way is better."""
        name = self.reference.info.get("quality_name", "accuracy")

        def q(v: float | None) -> float | None:
            return None if v is None else score(name, v)  # its own inverse: the score back to the quality

        def pt(p: Point) -> dict[str, Any]:
            return {"label": p.label, "quality": q(p.quality), "latency": p.latency, "latency_ms": p.latency_ms,
                    "bytes": p.bytes, **{k: v for k, v in p.info.items() if k != "metrics"}}
        comparison = [{**row, "best_within_latency": q(row["best_within_latency"]),
                       "best_within_bytes": q(row["best_within_bytes"])} for row in self.comparison]
        best = "max" if higher_is_better(name) else "min"
        return {"format": FORMAT, "recipe": self.spec.name, "study": self.study, "storage": self.storage,
                "objectives": [f"{name} ({best})", "latency relative to the baseline (min)", "bytes (min)"],
                "reference": pt(self.reference), "front": [pt(p) for p in self.front],
                "points": [pt(p) for p in self.points], "proxy": [pt(p) for p in self.proxy],
                "baselines": [pt(p) for p in self.baselines], "goal": self.verdict.to_dict(),
                "comparison": comparison, "dominated_baselines": self.dominated, "counts": self.counts,
                "failures": self.failures, "workers": self.workers, "compute_s": self.compute_s,
                "study_wall_s": self.study_wall_s, "run": self.run_info}


def collect(spec: SearchSpec, proxy_study: Any, full_study: Any, reference: StageMetrics, goal: Goal,
            storage: str, run_info: dict[str, Any]) -> SearchResult:
    from optuna.trial import TrialState

    proxy_trials = proxy_study.get_trials(deepcopy=False)
    full_trials = full_study.get_trials(deepcopy=False)
    proxy = proxy_points(proxy_study)
    exact = [p for p in proxy if p.info["exact"]]
    promoted, baselines, seen = [], [], set()
    for t in full_trials:
        key = t.user_attrs.get("key")
        if t.state != TrialState.COMPLETE or key in seen or "objectives" not in t.user_attrs:
            continue
        seen.add(key)
        if t.user_attrs["role"] == "baseline":
            base = as_point(t, t.user_attrs["name"])
            base.info["point"] = {"set": t.user_attrs["values"], "drop": t.user_attrs["drop"]}
            baselines.append(base)
        else:
            p = as_point(t, f"#{t.user_attrs['parent']}")
            p.info.update(trial=t.user_attrs["parent"], rung=2, full_trial=t.number)
            promoted.append(p)
    for p in exact:
        p.info["rung"] = 1
    points = exact + promoted
    front = pareto_front(points)
    ref = reference_point(reference)
    failures = [f"rung {r} trial {t.number}: {t.user_attrs['error']}" for r, ts in ((1, proxy_trials), (2, full_trials))
                for t in ts if t.state == TrialState.FAIL and "error" in t.user_attrs]
    counts = {
        "trials": sum(1 for t in proxy_trials if t.state == TrialState.COMPLETE),
        "distinct": len(proxy),
        "repeated": sum(1 for t in proxy_trials if "duplicate_of" in t.user_attrs),
        "failed": sum(1 for t in proxy_trials if t.state == TrialState.FAIL and "error" in t.user_attrs),
        "interrupted": sum(1 for t in proxy_trials + full_trials if t.user_attrs.get("interrupted")),
        "exact": len(exact),
        "promoted": len(promoted),
        "baselines": len(baselines),
    }
    measured = [t for t in proxy_trials + full_trials if "objectives" in t.user_attrs and "duplicate_of" not in t.user_attrs]
    starts = [t.datetime_start for t in proxy_trials + full_trials if t.datetime_start]
    ends = [t.datetime_complete for t in proxy_trials + full_trials if t.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    workers = {t.user_attrs.get("worker") for t in proxy_trials + full_trials if t.user_attrs.get("worker")}
    return SearchResult(
        spec=spec, study=proxy_study.study_name, storage=storage, reference=ref, points=points, front=front,
        proxy=proxy, baselines=baselines, verdict=choose(goal, front, ref),
        comparison=baseline_table(front, baselines), counts=counts, failures=failures, workers=len(workers),
        compute_s=round(sum(t.user_attrs["objectives"]["seconds"] for t in measured), 1),
        study_wall_s=round(wall, 1) if wall is not None else None, run_info=run_info)


def reference_point(reference: StageMetrics) -> Point:
    """The uncompressed model as a point (latency 1.0: every ratio is against it)."""
    return Point("baseline", score(reference.quality_name, reference.quality), 1.0, reference.latencies[0].median_ms, reference.file_bytes,
                 info={"quality_name": reference.quality_name})
