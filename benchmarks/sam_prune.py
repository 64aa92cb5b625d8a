"""Robust pruning (seed 000): does training with sharpness-aware minimisation leave a network that
prunes better? MNIST-1D reference CNN, 3 seeds.

    python benchmarks/sam_prune.py --out BENCHMARKS.md      (section "sam_prune"; make bench-sam-prune)

For each seed the CNN is trained twice with the same data order, optimizer (AdamW), schedule and
epochs: plainly, and with SAM (`TrainConfig(sam_rho=...)`: each step takes the gradient at the worst
point of a ball of radius rho). Each is pruned to a quarter of its MACs (l2, global, the same
`PruneConfig`), one-shot (with and without the least-squares reconstruction) and then after the same
fine-tune (plain AdamW, 3 epochs). Accuracy on the test split (never trained or calibrated on).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from common import update_section  # noqa: E402
from quantize_lowbit import table  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import Context, TrainConfig, fit  # noqa: E402
from nncompress.eval.metrics import accuracy  # noqa: E402
from nncompress.prune.structured import PruneConfig  # noqa: E402
from nncompress.zoo.loaders import build_data, build_model  # noqa: E402


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def trained(data, seed: int, epochs: int, rho: float):
    torch.manual_seed(seed)
    model, _ = build_model({"name": "mnist1d_cnn"})
    torch.manual_seed(1000 + seed)  # the same data order for plain and SAM
    fit(model, data.train, ce, TrainConfig(epochs=epochs, lr=3e-3, sam_rho=rho))
    return model.eval()


def pruned(model, data, keep: float, reconstruct: str):
    cfg = PruneConfig(keep_macs=keep, scope="global", importance="l2", max_ratio=0.9, reconstruct=reconstruct)
    return nncompress.apply(copy.deepcopy(model), cfg, context=Context(data=data)).eval()


def run(args) -> tuple[list[dict], int]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data({"name": "mnist1d", "kwargs": {"cache_dir": str(Path(tmp) / "data")}})
        for seed in range(args.seeds):
            for name, rho in (("plain", 0.0), (f"SAM rho={args.rho:g}", args.rho)):
                start = time.perf_counter()
                model = trained(data, seed, args.epochs, rho)
                row = {"seed": seed, "training": name, "train_s": time.perf_counter() - start,
                       "acc": accuracy(model, data.test)}
                row["one_shot_none"] = accuracy(pruned(model, data, args.keep, "none"), data.test)
                small = pruned(model, data, args.keep, "auto")
                row["one_shot"] = accuracy(small, data.test)
                torch.manual_seed(2000 + seed)
                fit(small.train(), data.train, ce, TrainConfig(epochs=args.finetune_epochs, lr=1e-3))
                row["finetuned"] = accuracy(small.eval(), data.test)
                rows.append(row)
                print(row, flush=True)
        n_test = sum(len(b[1]) for b in data.test)
    return rows, n_test


def render(args, rows: list[dict], n_test: int) -> str:
    body = [[str(r["seed"]), r["training"], f"{r['acc']:.1%}", f"{r['one_shot_none']:.1%}", f"{r['one_shot']:.1%}",
             f"{r['finetuned']:.1%}", f"{r['train_s']:.0f}"] for r in rows]
    for name in dict.fromkeys(r["training"] for r in rows):
        mine = [r for r in rows if r["training"] == name]
        mean = lambda k: statistics.mean(r[k] for r in mine)  # noqa: E731
        sd = lambda k: statistics.pstdev(r[k] for r in mine)  # noqa: E731
        body.append([f"mean of {len(mine)}", f"**{name}**"] + [f"{mean(k):.1%} ± {sd(k):.1%}" for k in
                    ("acc", "one_shot_none", "one_shot", "finetuned")] + [f"{mean('train_s'):.0f}"])
    plain = [r for r in rows if r["training"] == "plain"]
    sam = [r for r in rows if r["training"] != "plain"]
    gap = statistics.mean(s["finetuned"] - p["finetuned"] for s, p in zip(sam, plain))
    gap0 = statistics.mean(s["one_shot_none"] - p["one_shot_none"] for s, p in zip(sam, plain))
    quick = " QUICK RUN: not the reference figures." if args.quick else ""
    return (f"## Robust pruning: SAM before pruning vs plain training (`make bench-sam-prune`)\n\n"
            f"MNIST-1D CNN, {args.seeds} seeds, {args.epochs} training epochs (AdamW, lr 3e-3, cosine, the same "
            f"data order for both), SAM radius {args.rho:g}; then pruned to {args.keep:.0%} of the MACs (l2, "
            f"global), one-shot without and with least-squares reconstruction, and after the same "
            f"{args.finetune_epochs}-epoch fine-tune (from the reconstructed model). Accuracy on the "
            f"{n_test:,} test samples, never trained or calibrated on. CPU, {torch.get_num_threads()} threads.{quick}\n\n"
            + table(["seed", "training", "accuracy", f"{args.keep:.0%} MACs, one-shot, no reconstruction",
                     "one-shot, reconstructed", "after fine-tune", "train time (s)"], body)
            + f"\n\nSAM minus plain, mean over seeds: {gap0:+.1%} one-shot without reconstruction, "
              f"{gap:+.1%} after the fine-tune.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--quick", action="store_true", help="1 seed, 1 epoch each (smoke run)")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.finetune_epochs = 1, 1, 1
    torch.set_num_threads(2)
    rows, n_test = run(args)
    body = render(args, rows, n_test)
    update_section(args.out, "sam_prune", body)
    print(body)


if __name__ == "__main__":
    main()
