"""Non-uniform layer budgets for one-shot sparsity (OWL) vs uniform, on all-MiniLM-L6-v2, no fine-tune.

    python benchmarks/owl.py --out BENCHMARKS.md      (or: make bench-owl)

Every encoder Linear pruned element-wise (unstructured) to 50 / 60 / 70% by Wanda and by SparseGPT, once
with every layer at that ratio and once with OWL's layer ratios (outlier-weighted layer-wise sparsity,
Yin et al. 2024: `SparsityConfig(layer_budgets="owl")`, M = 5, lambda = 0.08, the parameter-weighted mean
at the same ratio). Fidelity to the dense model's embeddings on the test split of the calibration corpus
and on legal text calibration never saw; time is the whole `sparsify` call.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))

from common import minilm_in_and_out_of_domain, update_section  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import Context, Targets, history  # noqa: E402
from nncompress.eval.metrics import embed, embedding_fidelity  # noqa: E402
from nncompress.prune.sparsity import SparsityConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--quick", action="store_true", help="50%% only (smoke run)")
    args = p.parse_args()
    torch.set_num_threads(2)
    model, data, ood, ref, ref_ood = minilm_in_and_out_of_domain()
    targets = Targets(include=("*encoder*",), types=(nn.Linear,))
    lines = [["ratio", "criterion", "layer budgets", "layer ratios", "cosine", "cosine out-of-domain", "time (s)"]]
    lines.append(["---"] * len(lines[0]))
    for ratio in (0.5,) if args.quick else (0.5, 0.6, 0.7):
        for crit in ("wanda", "sparsegpt"):
            for budgets in ("uniform", "owl"):
                start = time.perf_counter()
                m = nncompress.apply(copy.deepcopy(model), SparsityConfig(ratio=ratio, importance=crit,
                                                                          layer_budgets=budgets),
                                     targets=targets, context=Context(data=data))
                seconds = time.perf_counter() - start
                layers = history(m)[-1]["record"]["layers"].values()
                row = [f"{ratio:.0%}", crit, budgets, f"{min(layers):.3f}-{max(layers):.3f}",
                       f"{embedding_fidelity(ref, embed(m, data.test))['cosine']:.4f}",
                       f"{embedding_fidelity(ref_ood, embed(m, ood))['cosine']:.4f}", f"{seconds:.1f}"]
                print(row, flush=True)
                lines.append(row)
    body = ("## Layer budgets for one-shot sparsity: OWL vs uniform (`make bench-owl`)\n\n"
            f"all-MiniLM-L6-v2, every encoder Linear unstructured, no fine-tune; {len(ref)} test sentences of the "
            f"calibration corpus (cosine) and {len(ref_ood)} sentences of legal text never calibrated on "
            "(cosine out-of-domain). OWL: `SparsityConfig(layer_budgets=\"owl\")`, each layer's ratio lowered "
            "with its share of Wanda-score outliers (above 5x the layer's mean), within ratio +- 0.08, the "
            "parameter-weighted mean unchanged. CPU, 2 threads."
            f"{' QUICK RUN: not the reference figures.' if args.quick else ''}\n\n"
            + "\n".join("| " + " | ".join(x) + " |" for x in lines))
    update_section(args.out, "owl", body)
    print(body)


if __name__ == "__main__":
    main()
