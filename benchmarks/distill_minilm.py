"""Recovering a structurally pruned all-MiniLM-L6-v2: embedding-only distillation vs adding attention-probability
KL and hidden-state distillation, in and out of domain.

    python benchmarks/distill_minilm.py                      (figures to stdout)
    python benchmarks/distill_minilm.py --out BENCHMARKS.md  (rewrites the section distill_minilm)

The encoder loses 50% of every layer's attention heads and FFN neurons in one shot (`prune`, l2, local scope,
least-squares reconstruction as by default), then each recovery gets the same budget: the same epochs,
learning rate, optimiser, schedule and data order (the train loader's generator and torch's seed reset per run),
from the same pruned model; only the loss differs. The teacher is the unpruned encoder.

- one-shot:              no recovery
- embedding:             1 - cos to the teacher's embeddings (`FinetuneConfig`'s objective for embedding models)
- + attention KL:        plus attention_kl_weight * KL(teacher attention || student attention), every layer,
                         each kept head paired with the teacher head it was cut from (attention_heads "matched")
- + hidden states:       plus hidden_weight * MSE of every layer's output hidden states (over real tokens)
- + both:                plus both terms

Training reads only the train split (384 sentences of the stdlib reference manual); cosine to the teacher's
embeddings on the 128 test sentences (in domain) and on legal sentences (the licence texts shipped with
Python, out of domain, never seen by pruning or training). Mean over seeds, with the spread (max - min) when
there is more than one. Training seconds are wall-clock of the finetune stage on 2 CPU threads.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import minilm_in_and_out_of_domain, update_section  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import Context  # noqa: E402
from nncompress.distill import FinetuneConfig  # noqa: E402
from nncompress.eval.metrics import embed, embedding_fidelity  # noqa: E402
from nncompress.prune.structured import PruneConfig  # noqa: E402

METHODS = {  # name -> the extra FinetuneConfig fields (None: no recovery)
    "one-shot": None,
    "embedding": {},
    "+ attention KL": {"attention_kl_weight": 1.0},
    "+ hidden states": {"hidden_weight": 1.0},
    "+ both": {"attention_kl_weight": 1.0, "hidden_weight": 1.0},
}


def recover(pruned, teacher, data, extra, args, seed: int):
    """A copy of `pruned` after the finetune stage with `extra` fields; (model, seconds, record)."""
    student = copy.deepcopy(pruned)
    if extra is None:
        return student, 0.0, {}
    torch.manual_seed(seed)  # dropout
    data.train.generator.manual_seed(seed)  # the data order
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, **extra)
    start = time.perf_counter()
    out = nncompress.apply(student, cfg, context=Context(data=data, teacher=teacher))
    return out, time.perf_counter() - start, nncompress.history(out)[-1]["record"]


def cell(values: list[float], digits: int = 4) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ({max(values) - min(values):.{digits}f})" if len(values) > 1 else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="Markdown file whose section distill_minilm is rewritten")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="one seed, 2 training steps per method (smoke run)")
    args = p.parse_args()
    torch.set_num_threads(2)
    teacher, data, ood, ref, ref_ood = minilm_in_and_out_of_domain()
    if args.quick:
        args.seeds = args.seeds[:1]
    start = time.perf_counter()
    pruned = nncompress.apply(copy.deepcopy(teacher), PruneConfig(ratio=0.5, importance="l2", scope="local"),
                              context=Context(data=data))
    prune_s = time.perf_counter() - start
    layers = pruned.model.encoder.layer
    heads = sorted({layer.attention.self.num_attention_heads for layer in layers})
    ffn = sorted({layer.intermediate.dense.out_features for layer in layers})
    results: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        for name, extra in METHODS.items():
            if seed != args.seeds[0] and extra is None:
                continue  # one-shot does not depend on the seed
            if args.quick and extra is not None:
                extra = {**extra, "max_steps": 2}
            model, seconds, record = recover(pruned, teacher, data, extra, args, seed)
            row = {"cosine": embedding_fidelity(ref, embed(model, data.test))["cosine"],
                   "cosine_ood": embedding_fidelity(ref_ood, embed(model, ood))["cosine"], "seconds": seconds}
            for k, v in row.items():
                results.setdefault(name, {}).setdefault(k, []).append(v)
            print({"seed": seed, "method": name, **row, "epoch_losses": record.get("epoch_losses")}, flush=True)
    lines = [["recovery", "cosine (test, in domain)", "cosine (legal, out of domain)", "training (s)"],
             ["---"] * 4]
    for name, r in results.items():
        lines.append([name, cell(r["cosine"]), cell(r["cosine_ood"]), cell(r["seconds"], 0)])
    seeds = ", ".join(map(str, args.seeds))
    body = ("## Distilling attention and hidden states into a pruned MiniLM (`make bench-distill-minilm`)\n\n"
            f"all-MiniLM-L6-v2 with 50% of each layer's heads and FFN neurons removed in one shot (l2, least-squares "
            f"reconstruction; {heads[0]} heads of 12 and {ffn[0]} FFN neurons of 1536 per layer left; "
            f"{prune_s:.0f} s), then recovered for {args.epochs} epoch(s) of the {len(data.train.dataset)} train "
            f"sentences (batch 32, AdamW, lr {args.lr:g}, cosine schedule), the same data order for every method. "
            f"Weights: attention_kl_weight 1.0, hidden_weight 1.0, every layer. Cosine to the unpruned model's "
            f"embeddings on {len(ref)} test sentences of the training corpus and {len(ref_ood)} sentences of legal "
            f"text never seen; mean over seeds {seeds} (spread max - min in brackets). Training seconds: wall-clock "
            f"on 2 CPU threads."
            f"{' QUICK RUN: not the reference figures.' if args.quick else ''}\n\n"
            + "\n".join("| " + " | ".join(x) + " |" for x in lines))
    if args.out:
        update_section(args.out, "distill_minilm", body)
    print(body)


if __name__ == "__main__":
    main()
