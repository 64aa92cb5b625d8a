"""eval/report.py: JSON round trip, the Markdown table (n/m, hand-checked ratios) and the Pareto PNG."""
from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn as nn

from nncompress.core.errors import DataError
from nncompress.eval import Latency, Report, StageMetrics, pareto_png, run_info
from nncompress.eval import report as report_mod


def lat(median: float, batch: int, *, runtime: str = "torch", threads: int = 2) -> Latency:
    return Latency(median, median * 0.9, median * 1.1, 30, threads, batch, "cpu", runtime)


def sample_report() -> Report:
    report = Report(run=run_info(threads=2))
    report.add(StageMetrics("baseline", "baseline", "accuracy", 0.916, params=61_706, nonzero=61_706,
                            macs=4_000_000, file_bytes=412_300,
                            latencies=[lat(4.0, 1), lat(40.0, 64), lat(3.0, 1, runtime="onnxruntime")],
                            seconds=0.0))
    report.add(StageMetrics("prune 50%", "prune", "accuracy", 0.912, extra={"overlap@10": 0.93},
                            params=61_706, nonzero=30_853, macs=1_000_000, file_bytes=None,
                            latencies=[lat(2.0, 1), lat(30.0, 64, threads=1), lat(1.5, 1, runtime="onnxruntime")],
                            seconds=12.5))
    report.add(StageMetrics("quant", "quant", "accuracy", None))
    return report


def table(markdown: str) -> dict[str, dict[str, str]]:
    """The Markdown table as {stage: {column header: cell}}."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    header, rows = split[0], split[2:]
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_docstring_examples_run():
    result = doctest.testmod(report_mod)
    assert result.attempted > 0 and result.failed == 0


def test_json_round_trip_is_exact(tmp_path):
    report = sample_report()
    again = Report.from_json(report.to_json())
    assert again == report
    assert again.stages[0].latencies[2] == lat(3.0, 1, runtime="onnxruntime")
    assert again.stages[0].file_bytes == 412_300  # exact bytes, whatever the table shows
    path = report.save_json(tmp_path / "report.json")
    assert Report.from_json(path.read_text()) == report
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_from_json_rejects_foreign_json_in_one_line():
    with pytest.raises(DataError, match="format"):
        Report.from_json('{"stages": []}')
    with pytest.raises(DataError, match=r"stages\[0\].colour"):
        Report.from_json('{"format": "nncompress.report/1", "stages": [{"stage": "a", "kind": "b", "colour": 1}]}')


def test_add_fills_the_quality_delta_against_the_baseline():
    report = sample_report()
    assert report.stages[0].delta is None
    assert report.stages[1].delta == pytest.approx(0.912 - 0.916)
    assert report.stages[2].delta is None  # quality not measured: no delta


def test_markdown_shows_measured_figures_ratios_and_nm():
    rows = table(sample_report().to_markdown())
    base, pruned, quant = rows["baseline"], rows["prune 50%"], rows["quant"]
    assert base["quality"] == "91.6%"
    assert pruned["quality"] == "91.2% (-0.4); overlap@10 0.930"
    assert base["file size"] == "412.3 kB" and pruned["file size"] == "n/m"
    assert pruned["nonzero"] == "30.85k" and base["params"] == "61.71k"
    # measured: 4.0 ms / 2.0 ms at batch 1 in torch; 3.0 / 1.5 in onnxruntime
    assert pruned["speedup torch b=1 (measured)"] == "2.00x"
    assert pruned["speedup ort b=1 (measured)"] == "2.00x"
    assert base["speedup torch b=1 (measured)"] == "1.00x"
    # batch 64 was timed with 1 thread for "prune" but 2 for the baseline: no speedup shown
    assert pruned["torch b=64 (ms)"] == "30.00"
    assert pruned["speedup torch b=64 (measured)"] == "n/m"
    assert pruned["MAC speedup (theoretical)"] == "4.00x"
    assert pruned["stage time (s)"] == "12.5"
    assert set(quant.values()) - {"quant"} == {"n/m"}


def test_markdown_footer_names_threads_device_and_versions():
    md = sample_report().to_markdown()
    assert "threads: 2" in md and "device: cpu" in md and f"torch {torch.__version__}" in md
    assert "n/m: not measured" in md and "theoretical" in md


def test_cosine_quality_is_shown_with_its_name_and_delta():
    report = Report()
    report.add(StageMetrics("baseline", "baseline", "cosine", 1.0))
    report.add(StageMetrics("int8", "quant", "cosine", 0.9875))
    assert table(report.to_markdown())["int8"]["quality"] == "0.9875 cosine (-0.0125)"


def test_pareto_png_is_a_png_written_without_temporaries(tmp_path):
    path = pareto_png(sample_report(), tmp_path / "plots" / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["pareto.png"]
    empty = pareto_png(Report([StageMetrics("baseline", "baseline")]), tmp_path / "empty.png")
    assert empty.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speedup_prefers_the_baseline_timed_beside_the_stage():
    def lat(ms):
        return Latency(ms, ms, ms, 5, 2, 1, "cpu")
    base = StageMetrics("baseline", "baseline", quality=0.9, latencies=[lat(100.0)])
    # Baseline re-timed alongside the stage at 10 ms (the machine was quieter then): 10 / 5 = 2x,
    # not the 100 / 5 = 20x that comparing across the run would claim.
    stage = StageMetrics("s", "k", quality=0.9, latencies=[lat(5.0)], reference=[lat(10.0)])
    report = Report([base, stage])
    assert "2.00x" in report.to_markdown() and "20.00x" not in report.to_markdown()
    assert Report.from_json(report.to_json()) == report


def test_compare_latency_times_every_model_alike():
    from nncompress.eval.latency import compare_latency
    a, b = nn.Linear(32, 32), nn.Linear(32, 4)
    threads = torch.get_num_threads()
    la, lb = compare_latency([a, b], torch.randn(3, 32), warmup=1, repeats=4, threads=1)
    assert la.comparable(lb) and la.repeats == lb.repeats == 4 and la.batch == 3
    assert torch.get_num_threads() == threads
