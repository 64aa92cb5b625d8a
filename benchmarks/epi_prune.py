"""When to prune (seed 000, Shen et al. 2022): pruning when the early pruning indicator fires, against
pruning after full training and pruning at initialisation. MNIST-1D CNN from random weights, 3 seeds.

    python benchmarks/epi_prune.py --out BENCHMARKS.md      (section "epi_prune"; make bench-epi-prune)

Every schedule ends at the same budget (a quarter of the MACs, l2, global, least-squares
reconstruction on by default) followed by the same fine-tune; what differs is when pruning happens:
- after full training: `--train-epochs` epochs, prune, fine-tune;
- early pruning indicator: `prune` with `until_stable: {max_epochs: --train-epochs}` trains until the
  dominant sub-network is stable, prunes, then the same fine-tune;
- at initialisation: prune the random network, then train it for the epochs the first schedule
  spends in total (training plus fine-tune), so it gets the same number of epochs.
Training cost: epochs (dense and pruned) and wall time of the whole schedule on this machine. Accuracy
on the test split, never trained on.
"""
from __future__ import annotations

import argparse
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
from nncompress.core import Context, TrainConfig, fit, history  # noqa: E402
from nncompress.eval.metrics import accuracy  # noqa: E402
from nncompress.eval.measure import count_macs  # noqa: E402
from nncompress.prune.structured import PruneConfig  # noqa: E402
from nncompress.zoo.loaders import build_data, build_model  # noqa: E402

LR = 3e-3


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def prune(model, data, keep: float, **extra):
    cfg = PruneConfig(keep_macs=keep, scope="global", importance="l2", max_ratio=0.9, lr=LR, **extra)
    return nncompress.apply(model, cfg, context=Context(data=data)).eval()


def train(model, data, epochs: int):
    fit(model, data.train, ce, TrainConfig(epochs=epochs, lr=LR))
    return model.eval()


def schedule(name: str, data, seed: int, args) -> dict:
    torch.manual_seed(seed)
    model, _ = build_model({"name": "mnist1d_cnn"})
    macs = count_macs(model, data.example_batch(1))
    torch.manual_seed(1000 + seed)  # the same data order for every schedule of a seed
    start = time.perf_counter()
    fired = None
    if name == "after full training":
        model = prune(train(model, data, args.train_epochs), data, args.keep)
        dense = args.train_epochs
    elif name == "early pruning indicator":
        model = prune(model, data, args.keep, until_stable={"max_epochs": args.train_epochs,
                                                             "threshold": args.threshold})
        fired = history(model)[-1]["record"]["until_stable"]
        dense = fired["epochs"]
        fired = fired["fired_epoch"]
    else:
        model = prune(model, data, args.keep, reconstruct="none")  # nothing learnt to reconstruct yet
        dense = 0
    pruned_epochs = args.finetune_epochs if dense else args.train_epochs + args.finetune_epochs
    train(model, data, pruned_epochs)
    return {"schedule": name, "seed": seed, "acc": accuracy(model, data.test), "dense": dense,
            "pruned": pruned_epochs, "fired": fired, "seconds": time.perf_counter() - start,
            "macs": count_macs(model, data.example_batch(1)) / macs}


def render(rows: list[dict], args) -> str:
    names = list(dict.fromkeys(r["schedule"] for r in rows))
    body = []
    for r in rows:
        body.append([str(r["seed"]), r["schedule"], f"{r['acc']:.1%}", f"{r['macs']:.3f}", str(r["dense"]),
                     str(r["pruned"]), "-" if r["schedule"] != "early pruning indicator" else
                     (str(r["fired"]) if r["fired"] else f"no (stopped at {args.train_epochs})"),
                     f"{r['seconds']:.0f}"])
    summary = []
    for n in names:
        sel = [r for r in rows if r["schedule"] == n]
        acc = [r["acc"] for r in sel]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        summary.append([f"mean of {len(sel)}", f"**{n}**", f"{statistics.mean(acc):.1%} ± {sd:.1%}",
                        f"{statistics.mean(r['macs'] for r in sel):.3f}",
                        f"{statistics.mean(r['dense'] for r in sel):.1f}", f"{statistics.mean(r['pruned'] for r in sel):.1f}",
                        "", f"{statistics.mean(r['seconds'] for r in sel):.0f}"])
    head = ["seed", "schedule", "accuracy", "MACs (x dense)", "dense epochs", "pruned epochs", "indicator fired at epoch",
            "time (s)"]
    return ("## When to prune: early pruning indicator vs after training vs at initialisation (`make bench-epi-prune`)\n\n"
            f"MNIST-1D CNN from random weights, {len(set(r['seed'] for r in rows))} seeds, AdamW lr {LR:g}, the same "
            f"data order within a seed. Every schedule prunes to {args.keep:.0%} of the MACs (l2, global, max 90% per "
            "group; least-squares reconstruction on calibration batches of the training split, except at "
            f"initialisation) and ends with the same {args.finetune_epochs}-epoch fine-tune; 'after full training' "
            f"trains {args.train_epochs} epochs first; the indicator (`prune` with `until_stable: {{max_epochs: "
            f"{args.train_epochs}, threshold: {args.threshold:g}}}`, channels ranked by L2 norm at the share the "
            "budget removes, patience 2) stops the dense training when the dominant sub-network is stable; 'at "
            f"initialisation' prunes the random network and trains it {args.train_epochs + args.finetune_epochs} "
            "epochs. Cost: epochs of dense and of pruned training, and the wall time of the whole schedule (2 "
            "threads). Accuracy on the 1,000 test samples.\n\n"
            + table(head, body + summary))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--threshold", type=float, default=0.02)
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data({"name": "mnist1d", "kwargs": {"cache_dir": str(Path(tmp) / "data")}})
        for seed in range(args.seeds):
            for name in ("after full training", "early pruning indicator", "at initialisation"):
                rows.append(schedule(name, data, seed, args))
                print(rows[-1], flush=True)
    update_section(args.out, "epi_prune", render(rows, args))


if __name__ == "__main__":
    main()
