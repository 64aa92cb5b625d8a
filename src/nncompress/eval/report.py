"""The per-stage report: what each stage of a run measured, as JSON, one Markdown table and a PNG.

Nothing here measures or estimates: a figure that is `None` was not measured and shows as "n/m".
A measured speedup is the ratio of two medians of the same runtime, batch, threads and device in
this report; the MAC speedup is the only theoretical figure and is labelled so.

>>> base = StageMetrics("baseline", "baseline", "accuracy", 0.916, params=1000, macs=4000)
>>> pruned = StageMetrics("prune", "prune", "accuracy", 0.912, params=1000, macs=2000)
>>> report = Report([base, pruned], run={"threads": 2, "device": "cpu"})
>>> Report.from_json(report.to_json()) == report
True
>>> "91.2% (-0.4)" in report.to_markdown()
True
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.errors import DataError
from .latency import Latency

NM = "n/m"  # not measured
_FORMAT = "nncompress.report/1"
_RUNTIME_ORDER = {"torch": 0, "onnxruntime": 1}
_RUNTIME_SHORT = {"onnxruntime": "ort"}


@dataclasses.dataclass
class StageMetrics:
    """What one stage measured. `None` means not measured, never zero.

    quality_name: "accuracy" (a fraction in [0, 1]), "cosine" (embedding fidelity) or "perplexity"
                  (a language model's, lower is better: `higher_is_better`)
    delta:        quality minus the baseline's, same units; filled by `Report.add` when left None
    extra:        further quality figures, e.g. {"overlap@10": 0.93}
    file_bytes:   exact bytes on disk of every file needed to load the saved stage (weights, manifest, ...)
    manifest_bytes: the part of `file_bytes` that is the JSON manifest (structure: kept channels, specs)
    latencies:    torch and, where exported, onnxruntime
    seconds:      wall time the stage took to run (compress, fine-tune, ...)
    """

    stage: str
    kind: str
    quality_name: str = "accuracy"
    quality: float | None = None
    delta: float | None = None
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    params: int | None = None
    nonzero: int | None = None
    macs: int | None = None
    file_bytes: int | None = None
    manifest_bytes: int | None = None
    latencies: list[Latency] = dataclasses.field(default_factory=list)
    reference: list[Latency] = dataclasses.field(default_factory=list)
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["latencies"] = [lat.to_dict() for lat in self.latencies]
        d["reference"] = [lat.to_dict() for lat in self.reference]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "stage") -> "StageMetrics":
        d = _known_fields(cls, data, path)
        d["latencies"] = [Latency(**_known_fields(Latency, lat, f"{path}.latencies[{i}]"))
                          for i, lat in enumerate(d.get("latencies", []))]
        d["reference"] = [Latency(**_known_fields(Latency, lat, f"{path}.reference[{i}]"))
                          for i, lat in enumerate(d.get("reference", []))]
        try:
            return cls(**d)
        except TypeError as e:  # a required field is missing
            raise DataError(f"report JSON {path}: {e}; give the report.json a run wrote") from None

    def latency(self, runtime: str, batch: int) -> Latency | None:
        """The measured latency with this runtime and batch, or None."""
        return next((lat for lat in self.latencies if lat.runtime == runtime and lat.batch == batch), None)

    def reference_latency(self, runtime: str, batch: int) -> Latency | None:
        """The baseline's latency measured interleaved with this stage's, or None."""
        return next((lat for lat in self.reference if lat.runtime == runtime and lat.batch == batch), None)


@dataclasses.dataclass
class Report:
    """The stages of one run, the first being the baseline, and facts about the run (`run_info()`)."""

    stages: list[StageMetrics] = dataclasses.field(default_factory=list)
    run: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def baseline(self) -> StageMetrics | None:
        return self.stages[0] if self.stages else None

    def add(self, stage: StageMetrics) -> StageMetrics:
        """Append `stage`, filling its quality delta against the baseline when both were measured."""
        if stage.delta is None:
            stage.delta = _delta(stage, self.baseline) if self.stages else None
        self.stages.append(stage)
        return stage

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps({"format": _FORMAT, "run": self.run,
                           "stages": [s.to_dict() for s in self.stages]}, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        """The report `to_json` wrote; `Report.from_json(r.to_json()) == r`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"report JSON is not valid JSON ({e}); give the report.json a run wrote") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise DataError(f"report JSON has no 'format': {_FORMAT!r}; give the report.json a run wrote")
        return cls([StageMetrics.from_dict(s, f"stages[{i}]") for i, s in enumerate(data.get("stages", []))],
                   dict(data.get("run", {})))

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write `to_json()` to `path` atomically (temporary file, then rename)."""
        return _atomic_write(Path(path), lambda f: f.write(self.to_json().encode()))

    def to_markdown(self) -> str:
        """One table: a row per stage, then a footer line about the run and a legend."""
        base = self.baseline
        keys = sorted({(lat.runtime, lat.batch) for s in self.stages for lat in s.latencies},
                      key=lambda k: (_RUNTIME_ORDER.get(k[0], 9), k[0], k[1]))
        header = (["stage", "quality", "params", "nonzero", "MACs", "file size", "of which manifest"]
                  + [f"{_RUNTIME_SHORT.get(r, r)} b={b} (ms)" for r, b in keys]
                  + [f"speedup {_RUNTIME_SHORT.get(r, r)} b={b} (measured)" for r, b in keys]
                  + ["MAC speedup (theoretical)", "stage time (s)"])
        rows = [header, ["---"] * len(header)]
        for s in self.stages:
            rows.append([_cell(s.stage), _quality(s, base), _opt(s.params, _count), _opt(s.nonzero, _count),
                         _opt(s.macs, _count), _opt(s.file_bytes, human_bytes), _opt(s.manifest_bytes, human_bytes)]
                        + [_opt(s.latency(r, b), lambda lat: _ms(lat.median_ms)) for r, b in keys]
                        + [_speedup(base, s, r, b) for r, b in keys]
                        + [_mac_speedup(base, s), _opt(s.seconds, lambda v: f"{v:.1f}")])
        table = "\n".join("| " + " | ".join(r) + " |" for r in rows)
        return f"{table}\n\n{self.footer()}\n"

    def footer(self) -> str:
        run = self.run
        facts = [f"threads: {run.get('threads', NM)}", f"device: {run.get('device', NM)}"]
        facts += [f"{k} {run[k]}" for k in ("torch", "onnxruntime", "nncompress", "python") if run.get(k)]
        if run.get("malloc"):
            facts.append(f"malloc: {run['malloc']}")
        facts += [str(run[k]) for k in ("cpu", "date") if run.get(k)]
        legend = ("n/m: not measured. File size: every byte needed to load the stage (weights + manifest). "
                  "Measured speedup: baseline median / stage median, same runtime, batch "
                  "and threads in this run. MAC speedup: baseline MACs / stage MACs, theoretical."
                  + (" malloc steady: glibc's mmap threshold fixed, as in a long-running process (no page "
                     "faults per call)." if run.get("malloc") == "steady" else ""))
        notes = "".join(f"\n- {w}" for w in run.get("warnings", []))
        return " · ".join(facts) + "\n\n" + legend + (f"\n\nNotes:{notes}" if notes else "")


def run_info(threads: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Facts about this run for the report footer: threads, device, versions, date, CPU name.

    >>> info = run_info(threads=2)
    >>> info["threads"], info["device"], info["torch"] == torch.__version__
    (2, 'cpu', True)
    """
    info: dict[str, Any] = {"threads": threads if threads is not None else torch.get_num_threads(),
                            "device": device, "torch": torch.__version__}
    for pkg in ("onnxruntime", "nncompress"):
        try:
            from importlib.metadata import version
            info[pkg] = version(pkg)
        except Exception:  # not installed: say nothing rather than guess
            pass
    info["python"] = platform.python_version()
    from .latency import steady_allocator
    info["malloc"] = "steady" if steady_allocator() else "default"
    cpu = _cpu_name()
    if cpu:
        info["cpu"] = cpu
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return info


LOWER_IS_BETTER = frozenset({"perplexity"})


def higher_is_better(quality_name: str) -> bool:
    """Whether a larger value of the quality named so is better (accuracy, cosine; not perplexity)."""
    return quality_name not in LOWER_IS_BETTER


def pareto_png(report: Report, path: str | os.PathLike) -> Path:
    """Two panels, written atomically to `path`: quality vs latency (largest batch, torch) and quality
    vs file size, one labelled point per stage that measured both; Pareto-optimal points are filled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    base = report.baseline
    qname = base.quality_name if base else "quality"
    scale = 100.0 if qname == "accuracy" else 1.0
    batches = [lat.batch for s in report.stages for lat in s.latencies if lat.runtime == "torch"]
    batch = max(batches) if batches else None
    same = [s for s in report.stages if s.quality is not None and s.quality_name == qname]
    timed = [s.latency("torch", batch) for s in report.stages if batch is not None]
    ref = next((t for t in timed if t is not None), None)  # points share its threads and device
    lat_pts = [(t.median_ms, s.quality * scale, s.stage) for s in same
               if ref is not None and (t := s.latency("torch", batch)) is not None and t.comparable(ref)]
    size_pts = [(s.file_bytes / 1e3, s.quality * scale, s.stage) for s in same if s.file_bytes is not None]
    ylabel = f"{qname} (%)" if qname == "accuracy" else qname
    where = f", {ref.threads} threads" if ref is not None else ""
    names = [s.stage for s in report.stages]
    up = higher_is_better(qname)
    if not up:
        ylabel += " (lower is better)"
    _panel(fig.add_subplot(1, 2, 1), lat_pts, f"latency, torch, batch {batch}{where} (ms)", ylabel, names, up)
    _panel(fig.add_subplot(1, 2, 2), size_pts, "file size (kB)", ylabel, names, up)
    fig.suptitle("quality vs cost per stage (filled: Pareto-optimal)")
    fig.tight_layout()
    return _atomic_write(Path(path), lambda f: fig.savefig(f, format="png"))


def _panel(ax: Any, points: list[tuple[float, float, str]], xlabel: str, ylabel: str, stages: list[str],
           up: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.margins(0.2)
    left_out = [n for n in stages if n not in {label for _, _, label in points}]
    if left_out:  # say which stages are missing rather than let the reader guess
        ax.text(0.01, 0.01, "not measured or not comparable: " + ", ".join(left_out), fontsize=7,
                transform=ax.transAxes, va="bottom")
    if not points:
        ax.text(0.5, 0.5, NM + " (not measured)", ha="center", va="center", transform=ax.transAxes)
        return
    for x, y, label in points:
        optimal = not any(x2 <= x and (y2 >= y if up else y2 <= y) and (x2, y2) != (x, y) for x2, y2, _ in points)
        ax.scatter([x], [y], s=40, color="C0", facecolors="C0" if optimal else "none")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)


def human_bytes(n: int) -> str:
    """Bytes in decimal units: `human_bytes(412_300) == '412.3 kB'`.

    >>> human_bytes(999), human_bytes(412_300), human_bytes(2_500_000)
    ('999 B', '412.3 kB', '2.5 MB')
    """
    if n < 1000:
        return f"{n} B"
    for unit, div in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if n < div * 1000 or unit == "GB":
            return f"{n / div:.1f} {unit}"
    raise AssertionError("unreachable")


def _count(n: int) -> str:
    if n < 10_000:
        return str(n)
    for unit, div in (("k", 1e3), ("M", 1e6), ("G", 1e9)):
        if n < div * 1000 or unit == "G":
            return f"{n / div:.2f}{unit}"
    raise AssertionError("unreachable")


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _opt(value: Any, fmt: Callable[[Any], str]) -> str:
    return NM if value is None else fmt(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _delta(stage: StageMetrics, base: StageMetrics | None) -> float | None:
    if stage.delta is not None:
        return stage.delta
    if base is None or stage is base or stage.quality is None or base.quality is None:
        return None
    return stage.quality - base.quality if stage.quality_name == base.quality_name else None


def _quality(s: StageMetrics, base: StageMetrics | None) -> str:
    if s.quality is None:
        return NM
    pct = s.quality_name == "accuracy"
    text = f"{s.quality * 100:.1f}%" if pct else f"{s.quality:.4f} {s.quality_name}"
    delta = None if s is base else _delta(s, base)
    if delta is not None:
        text += f" ({delta * 100:+.1f})" if pct else f" ({delta:+.4f})"
    extra = ", ".join(f"{k} {v:.3f}" for k, v in s.extra.items())
    return f"{text}; {extra}" if extra else text


def _speedup(base: StageMetrics | None, s: StageMetrics, runtime: str, batch: int) -> str:
    if base is None:
        return NM
    # Prefer the baseline timed in the same interleaved rounds as this stage (see compare_latency).
    b = s.reference_latency(runtime, batch) or base.latency(runtime, batch)
    lat = s.latency(runtime, batch)
    if b is None or lat is None or not b.comparable(lat) or lat.median_ms <= 0:
        return NM
    return f"{b.median_ms / lat.median_ms:.2f}x"


def _mac_speedup(base: StageMetrics | None, s: StageMetrics) -> str:
    if base is None or base.macs is None or not s.macs:
        return NM
    return f"{base.macs / s.macs:.2f}x"


def _known_fields(cls: type, data: Any, path: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise DataError(f"report JSON {path}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DataError(f"report JSON {path}.{unknown[0]}: unknown field; {cls.__name__} has {', '.join(sorted(names))}")
    return dict(data)


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> Path:
    """Write through `write(file)` into a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
