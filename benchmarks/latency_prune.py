"""Latency-aware pruning (HALP) vs MAC-driven pruning at the same measured latency, and how well the
latency tables predict a whole model.

    python benchmarks/latency_prune.py --out BENCHMARKS.md      (or: make bench-latency-prune)

Section latency_prune. On the MNIST-1D reference CNN, for each batch (1, 256) and target speedup
(2x, 3x), torch eager on CPU (and ONNX Runtime at batch 1), 2 threads:
- nncompress HALP: `PruneConfig(target_latency="2x", latency=LatencyTarget(batch=b))`: per-group widths
  by a knapsack of importance against a latency table measured here, then timed and tightened;
- nncompress MAC-driven: global ranking to a MAC budget (`keep_macs`), the budget bisected so that
  its *measured* latency is the closest to HALP's model;
- Torch-Pruning: MetaPruner with global ranking, its ratio bisected the same way.
All three use the same criterion and then get the same fine-tune; the final speedups of the three are
timed in one interleaved call with the unpruned model. A target no channel pruning can reach on this
CPU says so, with the speedup of the most pruning the groups allow, measured.

Section latency_table: tables built for torch and onnxruntime at batch 1 and 256, calibrated on three
uniformly pruned copies, then asked to predict randomly pruned models they never saw; predicted vs
measured whole-model latency (each measured interleaved with the unpruned model).
"""
from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import checkpoint_size, trained_reference, update_section  # noqa: E402
from prune_structured import CALIB_BATCHES, CRITERIA, tp_at_ratio, train  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import ConfigError, Context  # noqa: E402
from nncompress.eval.latency import compare_latency, compare_onnx_latency  # noqa: E402
from nncompress.eval.latency_table import build_table  # noqa: E402
from nncompress.eval.measure import count_macs, count_params  # noqa: E402
from nncompress.eval.metrics import accuracy  # noqa: E402
from nncompress.prune.latency import LatencyTarget, uniform_plan  # noqa: E402
from nncompress.prune.structural import remove_groups  # noqa: E402
from nncompress.prune.structured import PruneConfig, example_inputs, score_groups  # noqa: E402

THREADS = 2


def speedups(reference, models, x, repeats, runtime="torch"):
    """Speedups of `models` over `reference`, all timed in one interleaved call in `runtime`."""
    if runtime == "torch":
        ms = timed(runtime, [reference, *models], None, x, repeats)
    else:
        with tempfile.TemporaryDirectory() as d:
            paths = [export(m, x, Path(d) / f"{i}.onnx") for i, m in enumerate([reference, *models])]
            ms = timed(runtime, None, paths, x, repeats)
    return [ms[0] / t for t in ms[1:]], ms[0]


def halp(reference, data, criterion, target, batch, runtime):
    cfg = PruneConfig(target_latency=f"{target}x", latency=LatencyTarget(runtime=runtime, batch=batch, threads=THREADS),
                      importance=criterion, scope="global", max_ratio=0.9, calib_batches=CALIB_BATCHES)
    with tempfile.TemporaryDirectory() as cache:
        model = nncompress.apply(copy.deepcopy(reference), cfg, context=Context(data=data, cache_dir=cache))
    return model, nncompress.history(model)[-1]["record"]["latency"]


def by_mac_budget(reference, data, criterion, keep):
    return nncompress.apply(copy.deepcopy(reference), PruneConfig(
        keep_macs=keep, scope="global", importance=criterion, max_ratio=0.9, calib_batches=CALIB_BATCHES),
        context=Context(data=data))


def tp_by_ratio(reference, data, criterion, ratio):
    return tp_at_ratio(reference, data, criterion, ratio, data.example_batch(1)).eval()


def matched(reference, build, lo, hi, goal, x, repeats, runtime, steps=6):
    """The budget in [lo, hi] (more pruning towards `hi`) whose model's measured speedup is closest to
    `goal`: bisection, each candidate timed interleaved with the reference; the closest one tried."""
    tried = {}
    for _ in range(steps):
        mid = (lo + hi) / 2
        m = build(mid)
        tried[mid] = (speedups(reference, [m], x, repeats, runtime)[0][0], m)
        if tried[mid][0] < goal:
            lo = mid
        else:
            hi = mid
    best = min(tried, key=lambda v: abs(tried[v][0] - goal))
    return best, tried[best][1]


def floor_speedup(reference, data, criterion, x, repeats, runtime):
    """The measured speedup when every prunable group is cut to its floor (max_ratio 0.9)."""
    model = copy.deepcopy(reference)
    cfg = PruneConfig(importance=criterion, max_ratio=0.9, latency=LatencyTarget(step=8), target_latency="2x")
    scored = score_groups(model, cfg, Context(data=data), example_inputs(model, Context(data=data)))
    remove_groups(model, uniform_plan(scored, 0.9, cfg))
    return speedups(reference, [model], x, repeats, runtime)[0][0]


def prune_rows(args, data, reference, tmp) -> list[dict]:
    rows = []
    for runtime, batch in (("torch", 1), ("torch", 256), ("onnxruntime", 1)):
        x = data.example_batch(batch)
        for target in (2, 3):
            row = {"batch": batch, "target": target, "runtime": runtime}
            start = time.perf_counter()
            try:
                model, rec = halp(reference, data, args.criterion, target, batch, runtime)
            except ConfigError as e:
                row["unreachable"] = str(e).split(": ", 1)[1]
                row["floor"] = floor_speedup(reference, data, args.criterion, x, args.repeats, runtime)
                rows.append(row)
                print(row, flush=True)
                continue
            row["halp_s"], row["rec"] = time.perf_counter() - start, rec
            goal = speedups(reference, [model], x, args.repeats, runtime)[0][0]
            removed, mac_model = matched(reference, lambda r: by_mac_budget(reference, data, args.criterion, 1 - r),
                                         0.2, 0.95, goal, x, args.repeats, runtime)
            keep = 1 - removed
            ratio, tp_model = matched(reference, lambda r: tp_by_ratio(reference, data, args.criterion, r),
                                      0.1, 0.9, goal, x, args.repeats, runtime)
            models = {"HALP (nncompress)": model, f"MAC-driven (nncompress, keep_macs {keep:.3g})": mac_model,
                      f"MAC-driven (Torch-Pruning, ratio {ratio:.3g})": tp_model}
            row["tools"] = {}
            for name, m in models.items():
                row["tools"][name] = {"acc0": accuracy(m, data.test), "macs": count_macs(m, data.example_batch(1)),
                                      "params": count_params(m)}
                train(m, data, args.finetune_epochs, args.lr)
                row["tools"][name]["acc1"] = accuracy(m, data.test)
                row["tools"][name]["bytes"] = checkpoint_size(m, Path(tmp) / f"{batch}-{target}-{len(row['tools'])}")
            final, base_ms = speedups(reference, list(models.values()), x, args.repeats, runtime)
            for (name, t), s in zip(row["tools"].items(), final):
                t["speedup"] = s
            row["base_ms"] = base_ms
            rows.append(row)
            print({k: v for k, v in row.items() if k != "rec"}, flush=True)
    return rows


def random_plan(scored, rng, config):
    plan = []
    for g, s in scored:
        keep = max(8, round(g.size * rng.uniform(0.15, 1.0) / 8) * 8)
        if keep < g.size:
            plan.append((g, sorted(torch.argsort(s, stable=True)[:g.size - keep].tolist())))
    return plan


def table_rows(args, data, reference) -> list[dict]:
    """Tables calibrated on uniform prunings, asked about random ones they never saw."""
    rows = []
    cfg = PruneConfig(importance="l2", latency=LatencyTarget(step=8), target_latency="2x")
    scored = score_groups(reference, cfg, Context(data=data), example_inputs(reference, Context(data=data)))
    rng = random.Random(0)
    unseen = []
    for _ in range(args.unseen):
        m = copy.deepcopy(reference)
        remove_groups(m, random_plan(scored, rng, cfg))
        unseen.append(m)
    uniform = []
    for f in (0.3, 0.6, 0.9):  # as prune_to_latency calibrates: the deepest at max_ratio
        m = copy.deepcopy(reference)
        remove_groups(m, uniform_plan(scored, f, cfg))
        uniform.append(m)
    with tempfile.TemporaryDirectory() as d:
        for runtime in ("torch", "onnxruntime"):
            for batch in (1, 256):
                x = data.example_batch(batch)
                start = time.perf_counter()
                onnx = None
                if runtime == "onnxruntime":
                    onnx = [export(m, x, Path(d) / f"{batch}-{i}.onnx") for i, m in enumerate([reference, *uniform, *unseen])]
                table = build_table(reference, x, runtime=runtime, threads=THREADS, cache_dir=Path(d) / "cache",
                                    full_model_onnx=onnx[0] if onnx else None)
                raw = [table.predict(m) for m in unseen]
                ms = timed(runtime, [reference, *uniform], onnx[:4] if onnx else None, x, args.repeats)
                table.fit([(m, t * table.full_ms / ms[0]) for m, t in zip(uniform, ms[1:])])
                built = time.perf_counter() - start
                ms = timed(runtime, [reference, *unseen], [onnx[0], *onnx[4:]] if onnx else None, x, args.repeats)
                measured = [t * table.full_ms / ms[0] for t in ms[1:]]
                fitted = [table.predict(m) for m in unseen]
                rows.append({"runtime": runtime, "batch": batch, "full_ms": table.full_ms, "seconds": built,
                             "raw": [p / t - 1 for p, t in zip(raw, measured)],
                             "fitted": [p / t - 1 for p, t in zip(fitted, measured)],
                             "speedups": [table.full_ms / t for t in measured]})
                print(rows[-1], flush=True)
    return rows


def export(model, x, path):
    from nncompress.core.logs import quiet_loggers
    with quiet_loggers("torch.onnx", "onnxscript"), torch.no_grad():
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, input_names=["input"], output_names=["output"])
    return path


def timed(runtime, models, paths, x, repeats):
    if runtime == "torch":
        return [lat.median_ms for lat in compare_latency(models, x, warmup=5, repeats=repeats, threads=THREADS)]
    return [lat.median_ms for lat in compare_onnx_latency(paths, x, warmup=5, repeats=repeats, threads=THREADS)]


def _table(header, lines):
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *lines])


def render(args, base, rows, tables) -> str:
    lines = []
    for r in rows:
        head = [f"{r['target']}x", r["runtime"], f"b={r['batch']}"]
        if "unreachable" in r:
            lines.append(head + [f"HALP: out of reach ({r['unreachable']}); every group at its floor measures "
                                 f"{r['floor']:.2f}x"] + ["-"] * 7)
            continue
        rec = r["rec"]
        for name, t in r["tools"].items():
            extra = (f" (measured {rec['measured_speedup']:.2f}x while pruning, {len(rec['rounds'])} round(s), "
                     f"first plan's table error {rec['table_error']:+.0%})" if name.startswith("HALP") else "")
            lines.append(head + [name + extra, f"{t['speedup']:.2f}x", f"{t['speedup'] / r['target']:.2f}",
                                 f"{t['acc0']:.1%}", f"{t['acc1']:.1%}", f"{t['params']:,}",
                                 f"{t['macs']:,} ({base['macs'] / t['macs']:.2f}x)", f"{t['bytes']:,}"])
    prune = _table(["target", "runtime", "batch", "tool", "measured speedup", "speedup / target", "acc. pruned",
                    "acc. after FT", "params", "MACs (x fewer)", "file bytes"], lines)
    tl = []
    for t in tables:
        def stats(errs):
            return f"{sum(abs(e) for e in errs) / len(errs):.1%} / {max(abs(e) for e in errs):.1%}"
        tl.append([t["runtime"], f"b={t['batch']}", f"{t['full_ms']:.3f}",
                   f"{min(t['speedups']):.2f}x - {max(t['speedups']):.2f}x", stats(t["raw"]), stats(t["fitted"]),
                   f"{t['seconds']:.0f}"])
    table = _table(["runtime", "batch", "unpruned ms", "speedups of the unseen models", "error, layers alone "
                    "(mean / max)", "error, calibrated (mean / max)", "table build + calibration (s)"], tl)
    quick = " QUICK RUN: not the reference figures." if args.quick else ""
    return (f"## Latency-aware pruning (HALP) vs MAC-driven pruning (`make bench-latency-prune`)\n\n"
            f"MNIST-1D reference CNN: {base['acc']:.1%} test accuracy, {base['macs']:,} MACs. Criterion "
            f"`{args.criterion}` in every tool (Torch-Pruning: {CRITERIA[args.criterion]}), global ranking, at most "
            f"90% of a group removed. HALP: `PruneConfig(target_latency=\"Nx\", latency=LatencyTarget(batch=b, "
            f"threads=2))`: widths in steps of 8 chosen by a knapsack of importance per millisecond against a "
            f"latency table measured on this machine, calibrated on three uniform prunings (30%, 60%, 90%), then the pruned model "
            f"is timed and the plan corrected until the measured speedup is within 3% of the target. The "
            f"MAC-driven rows bisect their budget (6 steps, each model timed) to the one whose measured latency "
            f"is closest to HALP's model. Then every model gets the same {args.finetune_epochs}-epoch fine-tune (AdamW, lr {args.lr}, "
            f"cosine, same data order); the speedups are of the fine-tuned models, the three timed in one "
            f"interleaved call with the unpruned model (medians of {args.repeats}, {THREADS} threads; torch eager "
            f"with the steady allocator, or ONNX Runtime on each model's fp32 export: HALP's table and "
            f"closed loop are then measured in ONNX Runtime too). The 1,000 test samples make 0.1 points one sample.{quick}\n\n{prune}\n\n"
            f"### How well a latency table predicts a whole model\n\n"
            f"Tables for the CNN at widths in steps of 8 (6 samples per dimension, bilinear between), built "
            f"on this machine; then {args.unseen} randomly pruned copies (each group keeps 15-100% of its "
            f"channels, in steps of 8) that no table saw are predicted and measured (interleaved with the "
            f"unpruned model, {THREADS} threads). 'Layers alone': each layer timed alone plus the other ops "
            f"scaled by output volume; 'calibrated': after `fit` on three uniformly pruned copies (30/60/90%).\n\n{table}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--criterion", default="taylor", choices=sorted(CRITERIA))
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--unseen", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="1 fine-tune epoch, fewer repeats (smoke run)")
    args = p.parse_args()
    if args.quick:
        args.finetune_epochs, args.repeats, args.unseen = 1, 10, 3
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        data, reference = trained_reference(tmp, 10)
        base = {"acc": accuracy(reference, data.test), "macs": count_macs(reference, data.example_batch(1))}
        tables = table_rows(args, data, reference)
        rows = prune_rows(args, data, reference, tmp)
    text = render(args, base, rows, tables)
    update_section(args.out, "latency_prune", text)
    print(text)


if __name__ == "__main__":
    main()
