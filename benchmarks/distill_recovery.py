"""Recovering a pruned CNN: stage-wise distillation (seed 002) against plain logits KD, same budget.

    python benchmarks/distill_recovery.py --out BENCHMARKS.md   (section "distill_recovery";
                                                                  make bench-distill-recovery)

The reference MNIST-1D CNN (teacher) has half the channels of every group removed (l2, local: about a
quarter of the MACs), once without reconstruction (a badly damaged start) and once with the default
least-squares reconstruction. Each recovery then trains from that same pruned model, same optimiser
(AdamW, cosine), same data order per seed; the budget is counted in epochs over the training set, a
stage-wise block phase counting as a full epoch although its forward may stop at the block:

- plain KD: `finetune` with logits KD (alpha 0.9, T 4) for `--budget` epochs, and for 2 epochs;
- stage-wise: `progressive_distill` over stem, layers.0-2, one epoch per block, then `--budget - 4`
  epochs of the final phase, with each block's target `features` (FitNets MSE, as the stage trained
  before issue 14, now through a least-squares-initialised adapter) or `outputs` (the teacher's
  remaining layers run on the adapted block output, logits KD), and the final phase over the head
  only or all layers.
Accuracy on the test split (never trained on), mean +- std over seeds; wall seconds of the recovery.
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

sys.path.insert(0, str(Path(__file__).parent))

from common import trained_reference, update_section  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import Context  # noqa: E402
from nncompress.distill import FinetuneConfig, ProgressiveConfig  # noqa: E402
from nncompress.eval.measure import count_macs  # noqa: E402
from nncompress.eval.metrics import accuracy  # noqa: E402
from nncompress.prune.structured import PruneConfig  # noqa: E402

STAGES = ("stem", "layers.0", "layers.1", "layers.2")
LR = 3e-3


def recoveries(budget: int) -> dict[str, object]:
    kd = dict(lr=LR, kd_alpha=0.9, temperature=4.0)
    final = budget - len(STAGES)
    stagewise = dict(stages=STAGES, epochs=1, lr=LR, head_epochs=final)
    return {
        "plain KD, 2 epochs": FinetuneConfig(epochs=2, **kd),
        f"plain KD, {budget} epochs": FinetuneConfig(epochs=budget, **kd),
        f"stage-wise, target features, final head ({len(STAGES)} + {final})":
            ProgressiveConfig(**stagewise, target="features", final="head"),
        f"stage-wise, target outputs, final head ({len(STAGES)} + {final})":
            ProgressiveConfig(**stagewise, target="outputs", final="head"),
        f"stage-wise, target outputs, final all ({len(STAGES)} + {final})":
            ProgressiveConfig(**stagewise, target="outputs", final="all"),
    }


def run(args, tmp: str) -> dict:
    data, teacher = trained_reference(tmp, args.teacher_epochs)
    teacher.eval()
    x = data.example_batch(1)
    out = {"teacher": accuracy(teacher, data.test), "macs": count_macs(teacher, x), "starts": {}}
    starts = {recon: nncompress.apply(copy.deepcopy(teacher), PruneConfig(ratio=0.5, reconstruct=recon),
                                      context=Context(data=data))
              for recon in ("none", "lstsq")}  # before any recovery: a stage freezes its teacher's parameters
    for recon, pruned in starts.items():
        start = {"one-shot": accuracy(pruned.eval(), data.test), "macs": count_macs(pruned, x), "rows": {}}
        print(recon, start["one-shot"], flush=True)
        for name, cfg in recoveries(args.budget).items():
            accs, secs = [], []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                data.train.generator.manual_seed(seed)
                t0 = time.perf_counter()
                m = nncompress.apply(copy.deepcopy(pruned), cfg, context=Context(data=data, teacher=teacher))
                secs.append(time.perf_counter() - t0)
                accs.append(accuracy(m.eval(), data.test))
                print(recon, name, seed, f"{accs[-1]:.4f}", f"{secs[-1]:.1f}s", flush=True)
            start["rows"][name] = (accs, secs)
        out["starts"][recon] = start
    return out


def render(args, r) -> str:
    def pm(v, fmt):
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{fmt.format(statistics.mean(v))} +- {fmt.format(sd)}"

    lines = ["| start | recovery | budget (epochs) | accuracy | recovery seconds |", "| --- | --- | --- | --- | --- |"]
    for recon, start in r["starts"].items():
        label = "no reconstruction" if recon == "none" else "least-squares reconstruction"
        lines.append(f"| {label} | one-shot | 0 | {start['one-shot']:.1%} | - |")
        for name, (accs, secs) in start["rows"].items():
            budget = 2 if "2 epochs" in name else args.budget
            lines.append(f"| {label} | {name} | {budget} | {pm(accs, '{:.1%}')} | {pm(secs, '{:.1f}')} |")
    macs = next(iter(r["starts"].values()))["macs"]
    return ("## Recovering a pruned CNN: stage-wise distillation vs plain KD (`make bench-distill-recovery`)\n\n"
            f"Teacher: the reference MNIST-1D CNN trained {args.teacher_epochs} epochs, {r['teacher']:.1%}. Pruned: "
            f"half the channels of every group (l2, local), {macs:,} of {r['macs']:,} MACs, without and with "
            "least-squares reconstruction. Each recovery starts from that pruned model with the teacher as "
            f"teacher, AdamW lr {LR}, cosine, the same data order per seed; {args.seeds} seeds, mean +- std; "
            "accuracy on the 1,000 test samples. Budget in epochs over the 4,000 training samples, a stage-wise "
            "block phase counting as a full epoch (its forward stops at the block for target features, runs the "
            "teacher's remaining layers for target outputs). Stage-wise: one epoch per block (stem, layers.0-2), "
            "then the final phase (logits KD alpha 0.9, T 4, like plain KD) on the head only or on all layers. "
            "Seconds: wall time of the recovery on this machine's 2 cores."
            f"{' QUICK RUN: not the reference figures.' if args.quick else ''}\n\n" + "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--budget", type=int, default=6, help="epochs of the same-budget rows (>= 5)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 teacher epoch, 1 seed, budget 5")
    args = p.parse_args()
    if args.quick:
        args.teacher_epochs, args.seeds, args.budget = 1, 1, 5
    if args.budget <= len(STAGES):
        p.error(f"--budget must be more than {len(STAGES)} (one epoch per block, then the final phase)")
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, tmp)
    text = render(args, result)
    update_section(args.out, "distill_recovery", text)
    print(text)


if __name__ == "__main__":
    main()
