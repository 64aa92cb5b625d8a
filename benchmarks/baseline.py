"""Baseline benchmark: the uncompressed reference models, measured the way every stage is measured.

    python benchmarks/baseline.py --out BENCHMARKS.md      (or: make bench-baseline)

- MNIST-1D reference CNN and the MLP, trained by the project's training loop, against the published
  MNIST-1D test accuracies (logistic 32%, MLP 68%, CNN 94%).
- all-MiniLM-L6-v2 (the packaged pretrained model) on the sentence corpus: torch eager vs ONNX Runtime
  fp32 latency at batch 1 and 32, file bytes, MACs.
These are the "before" columns every compression benchmark is compared with.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import update_section  # noqa: E402

from nncompress.recipe import parse_recipe, run_recipe  # noqa: E402

PUBLISHED = {"mnist1d_cnn": "CNN 94%", "mlp": "MLP 68%"}


def recipes(quick: bool) -> list[dict]:
    epochs = 2 if quick else None
    cnn = {"epochs": epochs or 10, "lr": 0.003}
    mlp = {"epochs": epochs or 60, "lr": 0.002, "weight_decay": 0.0005}
    measure = {"batch_sizes": [1, 256], "threads": 2, "repeats": 10 if quick else 50, "warmup": 5}
    return [
        {"name": "cnn", "model": {"name": "mnist1d_cnn", "pretrain": cnn}, "data": "mnist1d", "measure": measure},
        {"name": "mlp", "model": {"name": "mlp", "pretrain": mlp}, "data": "mnist1d", "measure": measure},
        {"name": "minilm", "model": "hf:minilm", "data": {"name": "sentences"},
         "measure": {**measure, "batch_sizes": [1, 32]}},
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--quick", action="store_true", help="2 training epochs, few repeats (smoke run)")
    args = p.parse_args()
    rows, info = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for raw in recipes(args.quick):
            recipe = parse_recipe(raw)
            start = time.perf_counter()
            # a fresh cache: the training time below is real, not a cache hit
            result = run_recipe(recipe, Path(tmp) / recipe.name, cache_dir=Path(tmp) / "cache",
                                progress=False, log=lambda m: None)
            base = result.report.baseline
            info = result.report.run
            lat = {(x.runtime, x.batch): x.median_ms for x in base.latencies}
            batches = recipe.measure.batch_sizes
            quality = (f"{base.quality:.1%} accuracy" if base.quality_name == "accuracy"
                       else f"{base.quality:.4f} cosine (self)")
            cells = [recipe.model.name, recipe.data.name, quality, PUBLISHED.get(recipe.model.name, "-"),
                     f"{base.params:,}", f"{base.macs:,}", f"{base.file_bytes:,}"]
            for b in batches:
                t, o = lat.get(("torch", b)), lat.get(("onnxruntime", b))
                cells += [f"b={b}: {t:.3f} / {o:.3f} ms ({t / o:.2f}x)" if t and o else f"b={b}: n/m"]
            cells.append(f"{time.perf_counter() - start:.0f}")
            rows.append(cells)
    header = ["model", "data", "measured quality", "published", "params", "MACs (b=1)", "file bytes",
              "latency small batch: torch / ORT", "latency large batch: torch / ORT", "train + measure wall time (s)"]
    table = "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header)] + rows)
    body = (f"## Baseline models (`make bench-baseline`)\n\n{table}\n\n"
            f"Machine: {info.get('cpu', 'n/m')}, {info['threads']} threads, torch {info['torch']}, "
            f"onnxruntime {info.get('onnxruntime', 'n/m')}, {info['date']}."
            f"{' QUICK RUN (2 epochs): not the reference figures.' if args.quick else ''}\n"
            "ORT = ONNX Runtime on the fp32 ONNX export of the same model; the ratio is torch median / ORT median.")
    update_section(args.out, "baseline", body)
    print(body)


if __name__ == "__main__":
    main()
