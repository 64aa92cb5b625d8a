"""AWQ scales before weight-only 4-bit quantization vs round-to-nearest and GPTQ alone, on all-MiniLM-L6-v2.

    python benchmarks/awq.py --out BENCHMARKS.md      (or: make bench-awq)

Every encoder Linear at W4 (per group of 32 / 128 inputs), no fine-tune: `quantize` (RTN) and `gptq`,
each alone and after `awq` (`AWQConfig(weight=w4)`: alpha searched on a grid of 20 for each group of
Linears sharing an input). Fidelity to the float model's embeddings on the test split of the calibration
corpus and on legal text calibration never saw; time is all stages; bytes are every file load needs.
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

sys.path.insert(0, str(Path(__file__).parent))

from common import checkpoint_size, minilm_in_and_out_of_domain, update_section  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import Context, Targets, history  # noqa: E402
from nncompress.eval.metrics import embed, embedding_fidelity  # noqa: E402
from nncompress.formats import IntFormat, PerGroup  # noqa: E402
from nncompress.quant import AWQConfig, GPTQConfig, QuantizeConfig, QuantSpec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--quick", action="store_true", help="g128 only (smoke run)")
    args = p.parse_args()
    torch.set_num_threads(2)
    model, data, ood, ref, ref_ood = minilm_in_and_out_of_domain()
    targets = Targets(include=("*encoder*",), types=(nn.Linear,))
    lines = [["format", "method", "cosine", "cosine out-of-domain", "alpha (min-max)", "file bytes", "time (s)"]]
    lines.append(["---"] * len(lines[0]))
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = checkpoint_size(model, Path(tmp) / "fp32", compress=False)
        lines.append(["fp32", "-", "1.0000", "1.0000", "-", f"{fp32:,}", "-"])
        for g in (128,) if args.quick else (32, 128):
            w = QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=g))
            for name, stages in (("RTN", [QuantizeConfig(weight=w)]),
                                 ("AWQ + RTN", [AWQConfig(weight=w), QuantizeConfig(weight=w)]),
                                 ("GPTQ", [GPTQConfig(weight=w)]),
                                 ("AWQ + GPTQ", [AWQConfig(weight=w), GPTQConfig(weight=w)])):
                start = time.perf_counter()
                m = copy.deepcopy(model)
                for stage in stages:
                    m = nncompress.apply(m, stage, targets=targets, context=Context(data=data))
                seconds = time.perf_counter() - start
                alphas = [gr["alpha"] for h in history(m) for gr in h.get("record", {}).get("groups", [])
                          if "alpha" in gr]
                row = [f"W4 g{g}", name, f"{embedding_fidelity(ref, embed(m, data.test))['cosine']:.4f}",
                       f"{embedding_fidelity(ref_ood, embed(m, ood))['cosine']:.4f}",
                       f"{min(alphas):.2f}-{max(alphas):.2f}" if alphas else "-",
                       f"{checkpoint_size(m, Path(tmp) / f'{g}-{name}'.replace(' ', '')):,}", f"{seconds:.1f}"]
                print(row, flush=True)
                lines.append(row)
    body = ("## AWQ before 4-bit weights (`make bench-awq`)\n\n"
            f"all-MiniLM-L6-v2, every encoder Linear at W4, no fine-tune; {len(ref)} test sentences of the "
            f"calibration corpus (cosine) and {len(ref_ood)} sentences of legal text never calibrated on "
            "(cosine out-of-domain). AWQ: `awq` (scales rms(x)^alpha, alpha on a grid of 20 per group of Linears "
            "sharing an input, for the least output error of the quantized weights on 8 calibration batches), "
            "then the same `quantize` / `gptq` stage; file bytes: every file load needs (fp32: dense). CPU, 2 threads."
            f"{' QUICK RUN: not the reference figures.' if args.quick else ''}\n\n"
            + "\n".join("| " + " | ".join(x) + " |" for x in lines))
    update_section(args.out, "awq", body)
    print(body)


if __name__ == "__main__":
    main()
