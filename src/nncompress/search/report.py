"""The search's output folder: report.md / report.json, pareto.png, and every front point as a
runnable recipe `front/NNN.yaml` (fastest first). The folder is written whole into a temporary beside
it and renamed into place, replacing the output of an earlier search only."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import NNCompressError
from ..eval.report import human_bytes
from ..export.atomic import scratch_dir
from .front import Point, front_2d, quality_text, score
from .results import FORMAT, SearchResult


def front_files(result: SearchResult) -> dict[str, str]:
    """label -> file name under front/, fastest point first."""
    return {p.label: f"{i + 1:03d}.yaml" for i, p in enumerate(result.front)}


def front_recipe(result: SearchResult, p: Point, file: str) -> str:
    """The YAML of a front point: the recipe it measured, every default filled in, no search section."""
    recipe = dict(p.info["recipe"])
    recipe["name"] = f"{result.spec.name}-front-{file[:3]}"
    head = (f"# {result.spec.name}: front point {file[:3]} (trial {p.label}, rung {p.info.get('rung')}) of study "
            f"{result.study}\n# measured: {_quality(result, p.quality)}, latency {p.latency:.3f}x the baseline "
            f"({p.latency_ms:.3g} ms), {human_bytes(p.bytes)} on disk\n# picked: {picked(p)}\n"
            f"# run it: nncompress run {file} --out runs/{recipe['name']}\n")
    return head + yaml.safe_dump(recipe, sort_keys=False)


def picked(p: Point) -> str:
    """What the search chose for this point, in the words of the space."""
    point = p.info.get("point") or {}
    if "set" in point:  # a baseline
        parts = [f"{k}={_short(v)}" for k, v in point["set"].items()] + [f"without {s}" for s in point["drop"]]
        return ", ".join(parts) or "as written"
    return ", ".join(f"{k}={'on' if v is True else 'off' if v is False else _short(v)}" for k, v in point.items())


def to_markdown(result: SearchResult, wall_s: float) -> str:
    r, c = result, result.counts
    files = front_files(r)
    lines = [f"# Search: {r.spec.name}", "",
             f"Study `{r.study}` in `{r.storage}` · sampler {r.spec.sampler} · {r.workers} worker(s)", "",
             f"**Goal** ({r.verdict.goal.describe()}): {r.verdict.message}", "",
             f"Trials: {c['trials']} rung-1 (proxy: {_caps(r)}; {c['distinct']} distinct points, {c['repeated']} "
             f"repeats not re-measured, {c['failed']} failed, {c['exact']} already full recipes), {c['promoted']} "
             f"promoted to the full recipe (rung 2), {c['baselines']} baselines, {c['interrupted']} interrupted and "
             f"retried. Compute: {r.compute_s:.0f} s over all trials; study wall time "
             f"{_secs(r.study_wall_s)}; this command {wall_s:.0f} s.", "",
             f"## Pareto front ({len(r.front)} of {len(r.points)} fully measured points)", "",
             _table(r, r.front, files), "",
             f"## Uniform baselines, measured in the same study: the front dominates {r.dominated} of "
             f"{len(r.baselines)}", "", _baseline_table(r), "",
             "Quality on the test split (never used to calibrate or fine-tune). Latency: "
             f"{_runtime(r)}, batch {_batch(r)}, median of the candidate over the median of the uncompressed model timed in the same "
             "interleaved rounds (1.000x = the baseline); ms: the candidate's own median. Bytes: every file of "
             "the saved checkpoint. Dominated: a front point at least as good in all three and better in one.",
             "", "![pareto](pareto.png)"]
    if r.failures:
        lines += ["", "Failed candidates (recorded in the study, not retried):"] + [f"- {f}" for f in r.failures[:20]]
    info = r.run_info
    lines += ["", f"threads: {info.get('threads')} · " + " · ".join(str(info[k]) for k in ("device", "torch", "cpu", "date")
                                                              if info.get(k))]
    return "\n".join(lines) + "\n"


def _table(r: SearchResult, points: list[Point], files: dict[str, str]) -> str:
    rows = ["| file | trial | quality | latency (x baseline) | latency (ms) | size | rung | picked |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| - | baseline | {_quality(r, r.reference.quality)} | 1.000x | {r.reference.latency_ms:.3g} | "
            f"{human_bytes(r.reference.bytes)} | - | uncompressed |"]
    for p in points:
        rows.append(f"| front/{files.get(p.label, '-')} | {p.label} | {_quality(r, p.quality, delta=True)} | "
                    f"{p.latency:.3f}x | {p.latency_ms:.3g} | {human_bytes(p.bytes)} | {p.info.get('rung')} | "
                    f"{picked(p)} |")
    return "\n".join(rows)


def _baseline_table(r: SearchResult) -> str:
    rows = ["| baseline | quality | latency (x) | size | dominated by | front's best quality within its latency | "
            "within its size |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for b, row in zip(r.baselines, r.comparison):
        rows.append(f"| {b.label} | {_quality(r, b.quality, delta=True)} | {b.latency:.3f}x | "
                    f"{human_bytes(b.bytes)} | {row['dominated_by'] or 'no'} | {_opt_q(r, row['best_within_latency'])} | "
                    f"{_opt_q(r, row['best_within_bytes'])} |")
    return "\n".join(rows)


def pareto_plot(result: SearchResult, path: Path) -> None:
    """Quality vs latency and quality vs bytes: every fully measured point, the front joined in each
    panel, rung-1 proxies hollow, the baselines as squares and the uncompressed model as a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = result
    fig = Figure(figsize=(12, 5), dpi=110)
    FigureCanvasAgg(fig)
    name = r.reference.info.get("quality_name", "accuracy")
    scale = 100.0 if name == "accuracy" else score(name, 1.0)  # a perplexity axis shows perplexity, better up
    for k, (cost, xlabel, xs) in enumerate((
            ("latency", f"latency, {r.spec.runtime} b={_batch(r)} (x the uncompressed model, interleaved)", lambda p: p.latency),
            ("bytes", "size on disk (kB)", lambda p: p.bytes / 1e3))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.scatter([xs(p) for p in r.proxy], [p.quality * scale for p in r.proxy], s=14, facecolors="none",
                   edgecolors="0.6", label="rung 1 (proxy)")
        ax.scatter([xs(p) for p in r.points], [p.quality * scale for p in r.points], s=18, color="C0", alpha=0.5,
                   label="full recipe")
        line = front_2d(r.front, cost)
        ax.plot([xs(p) for p in line], [p.quality * scale for p in line], "-o", color="C0", label="Pareto front")
        for p in r.front:
            ax.annotate(p.label, (xs(p), p.quality * scale), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.scatter([xs(b) for b in r.baselines], [b.quality * scale for b in r.baselines], marker="s", s=40,
                   color="C3", label="uniform baselines")
        for b in r.baselines:
            ax.annotate(b.label, (xs(b), b.quality * scale), textcoords="offset points", xytext=(4, -9), fontsize=7,
                        color="C3")
        ax.scatter([xs(r.reference)], [r.reference.quality * scale], marker="*", s=120, color="k", label="uncompressed")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)" if name == "accuracy" else name if scale > 0 else f"{name} (lower is better)")
        if scale < 0:
            ax.invert_yaxis()
        ax.grid(True, alpha=0.3)
        if k == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"search {r.spec.name}: {len(r.front)} front points, {len(r.baselines)} baselines (same study)")
    fig.tight_layout()
    fig.savefig(path, format="png")


def check_out(out: Path) -> None:
    """Before any work: `out` must not exist unless it holds an earlier search's output."""
    if out.exists() and not is_search_output(out):
        raise NNCompressError(f"{out}: exists and is not the output of a search; choose another --out or remove it")


def is_search_output(out: Path) -> bool:
    try:
        return json.loads((out / "report.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_output(result: SearchResult, out: Path, wall_s: float) -> None:
    """Write the whole folder beside `out`, then put it in place (replacing an earlier search's output)."""
    check_out(out)
    files = front_files(result)
    with scratch_dir(out) as scratch:
        tmp = scratch / out.name
        (tmp / "front").mkdir(parents=True)
        for p in result.front:
            (tmp / "front" / files[p.label]).write_text(front_recipe(result, p, files[p.label]))
        data = result.to_dict()
        data["front_files"] = files
        data["wall_s"] = round(wall_s, 1)
        (tmp / "report.json").write_text(json.dumps(data, indent=2, default=str))
        (tmp / "report.md").write_text(to_markdown(result, wall_s))
        pareto_plot(result, tmp / "pareto.png")
        _replace(tmp, out)


def _replace(new: Path, out: Path) -> None:
    if not out.exists():
        os.replace(new, out)
        return
    with scratch_dir(out) as old:  # the earlier output moves aside, the new one in, the old one goes
        os.replace(out, old / "previous")
        os.replace(new, out)
        shutil.rmtree(old / "previous", ignore_errors=True)


def _caps(r: SearchResult) -> str:
    return ", ".join(f"{k} <= {v}" for k, v in r.spec.caps.items()) or "none (every trial is the full recipe)"


def _runtime(r: Any) -> str:
    return "ONNX Runtime (int8 QDQ export of quantized models)" if r.spec.runtime == "onnxruntime" else "torch eager"


def _batch(r: SearchResult) -> Any:
    return max(r.spec.as_written().measure.batch_sizes)


def _secs(s: float | None) -> str:
    return "n/m" if s is None else f"{s:.0f} s"


def _quality(r: SearchResult, q: float, delta: bool = False) -> str:
    return quality_text(r.reference.info.get("quality_name", "accuracy"), q, r.reference.quality if delta else None)


def _opt_q(r: SearchResult, q: float | None) -> str:
    return "none within" if q is None else _quality(r, q)


def _short(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)
