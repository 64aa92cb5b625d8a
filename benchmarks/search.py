"""Multi-objective search on the MNIST-1D reference CNN against uniform baselines, in one study.

    python benchmarks/search.py --out BENCHMARKS.md        (--trials N; --quick: a smoke run)

The model is the demo's reference CNN (the demo recipe's pretraining, cached). The space: a prune
ratio for each of the CNN's six coupled channel groups (`overrides`), fine-tune (3 epochs, KD) on or
off, weight quantization on or off and its width (8 or 4 bits). Rung 1 measures each sampled point
with the fine-tune capped at one epoch (`proxy: {epochs: 1}`: pruned without any fine-tune, every
point scores near chance and the proxy ranks nothing); the proxy points of the rung-1 front get the
full recipe.
The uniform baselines (one prune ratio for every group + fine-tune; one bit width for every layer)
are measured in the same study, the same way. Objectives: test accuracy, torch latency at batch 256
on 2 threads (timed interleaved with the uncompressed model), bytes of the saved checkpoint.
A baseline counts as beaten when a front point dominates it (at least as accurate, as fast and as
small, better in one): each baseline is one budget point.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))

from common import update_section  # noqa: E402

from nncompress.eval.report import human_bytes  # noqa: E402
from nncompress.search import load_search, run_search  # noqa: E402
from nncompress.search.report import front_files, picked  # noqa: E402

GROUPS = ["stem.0", "layers.0.conv1", "layers.1.conv1", "layers.1.conv2", "layers.2.conv1", "layers.2.conv2"]
RATIOS = [0.0, 0.25, 0.5, 0.75]


def recipe(args) -> dict:
    ort = args.variant == "ort"
    uniform = [{"name": f"prune {r} + ft", "set": {"stages[0].ratio": r}, "drop": ["stages[2]"]} for r in (0.25, 0.5, 0.75)]
    if ort:  # W8A8: int8 kernels in ONNX Runtime (QDQ export); the bit width is not searched
        bits = [{"name": "W8A8", "drop": ["stages[0]", "stages[1]"]}]
        both = [{"name": f"prune {r} + ft + W8A8", "set": {"stages[0].ratio": r}} for r in (0.25, 0.5)]
        quant = {"kind": "quantize", "weight": {"format": {"kind": "int", "bits": 8}},
                 "activation": {"format": {"kind": "int", "bits": 8}}}
        space_bits = {}
    else:
        bits = [{"name": f"int{b}", "set": {"stages[2].weight.format.bits": b}, "drop": ["stages[0]", "stages[1]"]}
                for b in (8, 4)]
        both = [{"name": "prune 0.5 + ft + int8"}]
        quant = {"kind": "quantize", "weight": {"format": {"kind": "int", "bits": 8}}}
        space_bits = {"stages[2].weight.format.bits": [4, 8]}
    return {
        "name": "search-mnist1d" + ("-ort" if ort else ""),
        "model": {"name": "mnist1d_cnn", "pretrain": {"epochs": args.train_epochs, "lr": 0.003}},
        "data": "mnist1d",
        "measure": {"batch_sizes": [256], "threads": 2, "warmup": 5, "repeats": args.repeats, "onnx": False},
        "stages": [
            {"kind": "prune", "ratio": 0.5, "importance": "l2", "round_to": 8},
            {"kind": "finetune", "epochs": args.finetune_epochs, "lr": 0.001, "kd_alpha": 0.5},
            quant,
        ],
        "search": {
            "space": {**{f"stages[0].overrides[{g}]": RATIOS for g in GROUPS}, **space_bits},
            "runtime": "onnxruntime" if ort else "torch",
            "optional": ["stages[1]", "stages[2]"],
            "proxy": {"epochs": args.proxy_epochs},
            "promote": args.promote,
            "sampler": args.sampler,
            "baselines": uniform + bits + both,
        },
    }


def render(result, args, wall: float, load: tuple[float, float]) -> str:
    r, c = result, result.counts
    files = front_files(r)
    info = r.run_info
    lines = [
        ("## Search: per-group prune ratios x fine-tune x weight bits on the MNIST-1D CNN (`make bench-search`)"
         if args.variant == "torch" else "## Search in ONNX Runtime: per-group prune ratios x fine-tune x W8A8 on the "
         "MNIST-1D CNN (`make bench-search-ort`)"), "",
        f"`benchmarks/search.py --trials {args.trials}`: {c['trials']} rung-1 trials ({c['distinct']} distinct points, "
        f"proxy: fine-tune capped at {args.proxy_epochs} epoch(s)), {c['promoted']} promoted to the full recipe "
        f"({args.finetune_epochs}-epoch KD fine-tune), {c['baselines']} "
        f"uniform baselines measured in the same study; sampler {r.spec.sampler}; wall time {wall / 60:.1f} min "
        f"(trials' compute {r.compute_s / 60:.1f} min). Load average {load[0]:.1f} when it started (its own 2 threads "
        f"then bring it to ~2: {load[1]:.1f} at the end) on this 2-core machine" +
        (" (other work was running when it started: latency ratios are noisy)" if load[0] > 1.0 else "") + ".", "",
        f"**The front dominates {r.dominated} of {len(r.baselines)} uniform baselines** (a front point at least as "
        f"accurate, as fast and as small, better in one). As budget points: within a baseline's latency the front "
        f"is at least as accurate for {_budget_wins(r, 'best_within_latency')} of {len(r.baselines)}, within its "
        f"size for {_budget_wins(r, 'best_within_bytes')} of {len(r.baselines)}.", "",
        "| front point | accuracy | latency (x uncompressed) | size | what the search picked |",
        "| --- | --- | --- | --- | --- |",
        f"| uncompressed | {r.reference.quality * 100:.1f}% | 1.000x ({r.reference.latency_ms:.2f} ms) | "
        f"{human_bytes(r.reference.bytes)} | - |"]
    for p in r.front:
        lines.append(f"| {files[p.label][:3]} ({p.label}, rung {p.info.get('rung')}) | {p.quality * 100:.1f}% | "
                     f"{p.latency:.3f}x | {human_bytes(p.bytes)} | {picked(p)} |")
    lines += ["", "| uniform baseline | accuracy | latency (x) | size | dominated by | front's best accuracy within "
              "its latency | within its size |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for b, row in zip(r.baselines, r.comparison):
        best = [f"{q * 100:.1f}%" if q is not None else "none" for q in (row["best_within_latency"], row["best_within_bytes"])]
        lines.append(f"| {b.label} | {b.quality * 100:.1f}% | {b.latency:.3f}x | {human_bytes(b.bytes)} | "
                     f"{row['dominated_by'] or 'no'} | {best[0]} | {best[1]} |")
    where = ("torch eager" if args.variant == "torch" else
             "ONNX Runtime on each model's export (int8 QDQ for the W8A8 ones, so int8 kernels run)")
    why = (" Quantized layers run as fake-quant in torch (slower than fp32 there; their gain is bytes)."
           if args.variant == "torch" else "")
    lines += ["", f"Latency: {where}, batch 256, 2 threads, median of the candidate over the median of the "
              f"uncompressed model timed in the same interleaved rounds.{why} Size: every file of the saved checkpoint.",
              f"Measured {info.get('date', 'n/m')} on {info.get('cpu', 'n/m')}, torch {info.get('torch', 'n/m')}."]
    return "\n".join(lines)


def _budget_wins(r, key: str) -> int:
    """Baselines whose budget (latency or bytes) the front meets at least as accurately."""
    return sum(row[key] is not None and row[key] >= b.quality for b, row in zip(r.baselines, r.comparison))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--promote", type=int, default=8)
    p.add_argument("--proxy-epochs", type=int, default=1, help="rung 1's fine-tune epochs (0: one-shot, no fine-tune)")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2"])
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--workdir", type=Path, default=None, help="keep the study, report and front here (default: a temp folder)")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="6 trials, 1 fine-tune epoch, few repeats (smoke run)")
    p.add_argument("--variant", choices=("torch", "ort"), default="torch",
                   help="ort: latency in ONNX Runtime and W8A8 quantization (int8 kernels), section search_ort")
    args = p.parse_args()
    if args.quick:
        args.trials, args.promote, args.finetune_epochs, args.repeats = 6, 2, 1, 5
    work = args.workdir or Path(tempfile.mkdtemp(prefix="nncompress-bench-search-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "search_mnist1d.yaml"
    path.write_text(yaml.safe_dump(recipe(args), sort_keys=False))
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    result = run_search(load_search(path), args.trials, work / "out", cache_dir=args.cache)
    wall = time.perf_counter() - start
    body = render(result, args, wall, (load_start, os.getloadavg()[0]))
    update_section(args.out, "search" if args.variant == "torch" else "search_ort", body + f"\n\nReport, plot and front recipes of this run: `{work / 'out'}`.")
    print(body)


if __name__ == "__main__":
    main()
