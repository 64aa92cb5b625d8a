"""Structured pruning vs Torch-Pruning on the MNIST-1D reference CNN, same targets, same fine-tune.

    python benchmarks/prune_structured.py --out BENCHMARKS.md      (or: make bench-prune-structured)

For each MAC target (2x and 4x fewer MACs) and each criterion both tools offer (L2 magnitude,
first-order Taylor, FPGM, BN scale), both prune the same trained model with global ranking to the
same MAC budget (each finds its own channel ratio by bisection on the real MAC count), then both
get the same fine-tune (epochs, optimizer, lr, data order). Reported: accuracy before and after
fine-tune, params, MACs, file bytes, latency speedup measured interleaved with the unpruned model
(batch 1 and 256), and the wall time of the pruning step (search included) for each tool.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from common import update_section  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import Context, TrainConfig, fit  # noqa: E402
from nncompress.eval.latency import compare_latency  # noqa: E402
from nncompress.eval.measure import count_macs, count_params, file_bytes  # noqa: E402
from nncompress.eval.metrics import accuracy  # noqa: E402
from nncompress.export.checkpoint import write_checkpoint  # noqa: E402
from nncompress.prune.structured import PruneConfig  # noqa: E402
from nncompress.zoo.loaders import build_data, build_model  # noqa: E402

CRITERIA = {"l2": "GroupMagnitudeImportance(p=2)", "taylor": "GroupTaylorImportance()",
            "fpgm": "FPGMImportance()", "bn_scale": "BNScaleImportance()"}


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def train(model, data, epochs, lr, seed=0):
    torch.manual_seed(seed)  # the same data order for every fine-tune
    fit(model, data.train, ce, TrainConfig(epochs=epochs, lr=lr))
    return model.eval()


def tp_prune(model, data, criterion: str, keep: float, example):
    """Torch-Pruning at the global channel ratio that meets the MAC budget (bisection, like ours)."""
    import torch_pruning as tp

    base = count_macs(model, example)

    def run(ratio):
        m = copy.deepcopy(model).eval()
        imp = eval(f"tp.importance.{CRITERIA[criterion]}")
        pruner = tp.pruner.MetaPruner(m, example, importance=imp, global_pruning=True, pruning_ratio=ratio,
                                      max_pruning_ratio=0.9, ignored_layers=[m.head if hasattr(m, "head") else m.fc])
        if criterion == "taylor":
            m.zero_grad()
            for i, batch in enumerate(data.calib):
                if i >= 8:
                    break
                ce(m, batch).backward()
        pruner.step()
        m.zero_grad(set_to_none=True)
        return m

    lo, hi = 0.0, 0.95
    best = None
    for _ in range(12):
        mid = (lo + hi) / 2
        m = run(mid)
        if count_macs(m, example) / base > keep:
            lo = mid
        else:
            hi, best = mid, m
    return best if best is not None else run(hi)


def ours_prune(model, data, criterion: str, keep: float):
    m = copy.deepcopy(model).eval()
    return nncompress.apply(m, PruneConfig(target_macs=keep, scope="global", importance=criterion,
                                           max_ratio=0.9), context=Context(data=data))


def measure(name, tool, criterion, keep, reference, pruned, prune_s, data, args, tmp):
    acc0 = accuracy(pruned, data.test)
    train(pruned, data, args.finetune_epochs, args.lr)
    acc1 = accuracy(pruned, data.test)
    path = write_checkpoint(pruned, Path(tmp) / f"{tool}-{criterion}-{keep}", source={"name": "-"}, history=[])
    row = {"tool": tool, "criterion": criterion, "target": f"{1 / keep:.0f}x",
           "acc_pruned": acc0, "acc_ft": acc1, "params": count_params(pruned),
           "macs": count_macs(pruned, data.example_batch(1)), "bytes": file_bytes(path / "model.safetensors"),
           "prune_s": prune_s}
    for b in (1, 256):
        x = data.example_batch(b)
        ref, lat = compare_latency([reference, pruned], x, warmup=5, repeats=args.repeats, threads=2)
        row[f"speedup_b{b}"] = ref.median_ms / lat.median_ms
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="1 epoch each, few repeats, l2 only (smoke run)")
    args = p.parse_args()
    criteria = list(CRITERIA)
    if args.quick:
        args.train_epochs, args.finetune_epochs, args.repeats, criteria = 1, 1, 5, ["l2"]
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data({"name": "mnist1d", "kwargs": {"cache_dir": str(Path(tmp) / "data")}})
        torch.manual_seed(0)
        reference, _ = build_model({"name": "mnist1d_cnn"})
        fit(reference, data.train, ce, TrainConfig(epochs=args.train_epochs, lr=3e-3))
        reference.eval()
        base_acc = accuracy(reference, data.test)
        base_macs = count_macs(reference, data.example_batch(1))
        base_params = count_params(reference)
        base_bytes = file_bytes(write_checkpoint(reference, Path(tmp) / "ref", {"name": "-"}, []) / "model.safetensors")
        rows = []
        for keep in (0.5, 0.25):
            for criterion in criteria:
                for tool in ("nncompress", "torch-pruning"):
                    start = time.perf_counter()
                    pruned = (ours_prune(reference, data, criterion, keep) if tool == "nncompress"
                              else tp_prune(reference, data, criterion, keep, data.example_batch(1)))
                    prune_s = time.perf_counter() - start
                    rows.append(measure("", tool, criterion, keep, reference, pruned, prune_s, data, args, tmp))
                    print(rows[-1], flush=True)
    header = ["MAC target", "criterion", "tool", "acc. pruned", "acc. after FT", "params", "MACs (x fewer)",
              "file bytes", "speedup b=1", "speedup b=256", "prune time (s)"]
    lines = [header, ["---"] * len(header)]
    for r in rows:
        lines.append([r["target"], r["criterion"], r["tool"], f"{r['acc_pruned']:.1%}", f"{r['acc_ft']:.1%}",
                      f"{r['params']:,}", f"{r['macs']:,} ({base_macs / r['macs']:.2f}x)", f"{r['bytes']:,}",
                      f"{r['speedup_b1']:.2f}x", f"{r['speedup_b256']:.2f}x", f"{r['prune_s']:.1f}"])
    table = "\n".join("| " + " | ".join(x) + " |" for x in lines)
    body = (f"## Structured pruning vs Torch-Pruning (`make bench-prune-structured`)\n\n"
            f"MNIST-1D reference CNN: {base_acc:.1%} test accuracy, {base_params:,} params, {base_macs:,} MACs, "
            f"{base_bytes:,} bytes. Both tools: global ranking, max 90% per group, the same MAC budget "
            f"(each bisects its own ratio on the real MAC count), then {args.finetune_epochs} epochs of the same "
            f"fine-tune (AdamW, lr {args.lr}, cosine, same data order). Speedups: the unpruned model and the "
            f"pruned one timed interleaved, medians of {args.repeats}, 2 threads, torch eager on CPU."
            f"{' QUICK RUN: not the reference figures.' if args.quick else ''}\n\n{table}")
    update_section(args.out, "prune_structured", body)
    print(body)


if __name__ == "__main__":
    main()
