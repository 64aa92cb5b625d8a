"""Low-rank factorization on all-MiniLM-L6-v2 and the MNIST-1D reference CNN, in one run.

    python benchmarks/lowrank.py --out BENCHMARKS.md      (--quick: a smoke run in under 2 minutes)

1. all-MiniLM-L6-v2: the FFN Linears (intermediate.dense and output.dense of every layer) by
   truncated SVD keeping 75/50/25% of their weights (ranks allocated globally by `keep_params`), and
   the attention projections (query, key, value, attention.output.dense) at 50%. Embedding fidelity
   to the dense model on the test sentences (mean cosine, overlap of the 10 nearest neighbours)
   without fine-tune and after embedding distillation from the dense model (`finetune`), parameters,
   file bytes (`nncompress.save`) and torch latency vs dense at batch 1 and 32 (interleaved rounds).
2. The MNIST-1D reference CNN: Tucker-2 and channel SVD of its convolutions at 50% of their weights,
   accuracy before and after a short fine-tune, parameters, file bytes and latency vs dense.
Each phase rewrites the section when it ends, so an interrupted run leaves what it measured.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import trained_reference, update_section  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import Context, Targets  # noqa: E402
from nncompress.distill import FinetuneConfig  # noqa: E402
from nncompress.eval.latency import compare_latency  # noqa: E402
from nncompress.eval.measure import count_params, file_bytes  # noqa: E402
from nncompress.eval.metrics import accuracy, embed, embedding_fidelity  # noqa: E402
from nncompress.lowrank import LowRankConfig  # noqa: E402
from nncompress.zoo.loaders import build_data, build_model  # noqa: E402

FFN = Targets(include=("*intermediate.dense", "*.output.dense"), exclude=("*attention*",), types=("Linear",))
ATTN = Targets(include=("*attention.self.query", "*attention.self.key", "*attention.self.value",
                        "*attention.output.dense"), types=("Linear",))


def saved_bytes(model: torch.nn.Module, where: Path) -> int:
    return file_bytes(nncompress.save(model, where))


def targeted_weights(model: torch.nn.Module, targets: Targets) -> int:
    return sum(m.weight.numel() for _, m in targets.select(model) if isinstance(m, torch.nn.Linear))


def speedups(dense, model, inputs: dict[int, object], args) -> dict[int, float]:
    out = {}
    for b, x in inputs.items():
        ld, lm = compare_latency([dense, model], x, warmup=args.warmup, repeats=args.repeats, threads=args.threads)
        out[b] = ld.median_ms / lm.median_ms
    return out


def minilm_rows(args, tmp: Path):
    dense, tok = build_model({"name": "hf:minilm"})
    dense.eval()
    data = build_data({"name": "sentences", "kwargs": {"n": args.sentences}}, tokenizer=tok)
    ref = embed(dense, data.test)
    inputs = {b: data.example_batch(b) for b in (1, 32) if b <= args.sentences // 4 * 3}
    base = {"params": count_params(dense), "bytes": saved_bytes(dense, tmp / "minilm"), "n": ref.shape[0],
            "ffn": targeted_weights(dense, FFN), "attn": targeted_weights(dense, ATTN)}
    rows = []
    plan = [("FFN", FFN, r) for r in args.ratios] + ([] if args.quick else [("attention", ATTN, 0.5)])
    for (part, targets, ratio), whiten in [(p, w) for p in plan for w in (False, True)]:
        torch.manual_seed(0)
        cfg = LowRankConfig(keep_params=ratio, round_to=args.round_to, whiten=whiten)
        m = nncompress.apply(copy.deepcopy(dense), cfg, targets=targets, context=Context(data=data)).eval()
        rec = nncompress.history(m)[-1]["record"]
        ranks = sorted({v["ranks"][0] for v in rec["layers"].values()})
        row = {"part": part, "ratio": ratio, "whiten": whiten, "kept": rec["weights_after"] / rec["weights_before"],
               "ranks": f"{ranks[0]}-{ranks[-1]}" if ranks else "-", "dense_layers": len(rec["skipped"]),
               "params": count_params(m), "bytes": saved_bytes(m, tmp / f"minilm-{part}-{ratio}-{whiten}"),
               "speedup": speedups(dense, m, inputs, args), "raw": embedding_fidelity(ref, embed(m, data.test))}
        if args.ft_epochs:
            torch.manual_seed(1)
            m = nncompress.apply(m, FinetuneConfig(epochs=args.ft_epochs, lr=args.lm_lr),
                                 context=Context(data=data, teacher=dense)).eval()
            row["ft"] = embedding_fidelity(ref, embed(m, data.test))
        rows.append(row)
        print(row, flush=True)
    return base, rows


def cnn_rows(args, tmp: Path):
    data, reference = trained_reference(tmp, args.train_epochs)
    x = {b: data.example_batch(b) for b in (1, 128)}
    base = {"acc": accuracy(reference, data.test), "params": count_params(reference),
            "bytes": saved_bytes(reference, tmp / "cnn"), "n": sum(len(y) for _, y in data.test)}
    rows = []
    for method in ("tucker2", "svd"):
        m = nncompress.apply(copy.deepcopy(reference), LowRankConfig(method=method, keep_params=0.5),
                             targets=Targets(types=("Conv1d",))).eval()
        rec = nncompress.history(m)[-1]["record"]
        row = {"method": method, "kept": rec["weights_after"] / rec["weights_before"], "params": count_params(m),
               "bytes": saved_bytes(m, tmp / f"cnn-{method}"), "acc": accuracy(m, data.test),
               "speedup": speedups(reference, m, x, args)}
        if args.cnn_ft_epochs:
            torch.manual_seed(1)
            m = nncompress.apply(m, FinetuneConfig(epochs=args.cnn_ft_epochs, lr=1e-3), context=Context(data=data))
            row["acc_ft"] = accuracy(m.eval(), data.test)
        rows.append(row)
        print(row, flush=True)
    return base, rows


def table(header, rows):
    lines = [header, ["---"] * len(header)] + rows
    return "\n".join("| " + " | ".join(x) + " |" for x in lines)


def _fid(f: dict | None) -> list[str]:
    return [f"{f['cosine']:.4f}", f"{f['overlap_at_k']:.3f}"] if f else ["-", "-"]


def _x(s: dict[int, float], b: int) -> str:
    return f"{s[b]:.2f}x" if b in s else "-"


def render(args, lm, cnn) -> str:
    parts = [f"## Low-rank factorization (`make bench-lowrank`)\n\n"
             f"CPU, {args.threads} thread(s), torch eager; latency is the median of {args.repeats} interleaved "
             f"rounds (`compare_latency`) and a speedup is dense median / factorized median in the same call. "
             f"Ranks are allocated over all targeted layers by `LowRankConfig(keep_params=...)` (greedy on "
             f"singular-value energy per weight, rounded to multiples of {args.round_to}); 'kept' is the "
             f"factorized targeted weights over the dense ones."
             f"{' QUICK RUN: not the reference figures.' if args.quick else ''}"]
    if lm:
        base, rows = lm
        body = [["dense", "-", "-", "100%", "-", "1.0000", "1.000", "1.0000", "1.000", f"{base['params']:,}",
                 f"{base['bytes']:,}", "1.00x", "1.00x"]]
        for r in rows:
            body.append([f"{r['part']} {r['ratio']:.0%}", "whitened" if r["whiten"] else "weights", r["ranks"],
                         f"{r['kept']:.1%}", str(r["dense_layers"]),
                         *_fid(r["raw"]), *_fid(r.get("ft")), f"{r['params']:,}",
                         f"{r['bytes']:,} ({base['bytes'] / r['bytes']:.2f}x)", _x(r["speedup"], 1),
                         _x(r["speedup"], 32)])
        parts.append(
            f"### all-MiniLM-L6-v2: FFN and attention projections by truncated SVD\n\n"
            f"FFN = intermediate.dense + output.dense of the 6 layers ({base['ffn']:,} weights); attention = "
            f"query, key, value, attention.output.dense ({base['attn']:,} weights). Fidelity to the dense "
            f"model's embeddings on the {base['n']} test sentences, without fine-tune ('raw') and after "
            f"{args.ft_epochs} epoch(s) of embedding distillation from the dense model (`finetune`, lr "
            f"{args.lm_lr}) on the train sentences. 'dense layers' counts targeted layers whose break-even "
            f"rank the budget reached, so they stayed dense. 'SVD of' weights: truncated SVD of W; whitened: "
            f"of W L with L L^T the Gram matrix of the layer's inputs on the 128 calibration sentences "
            f"(`whiten=True`, SVD-LLM's data-aware truncation), so the dropped energy is output error.\n\n"
            + table(["layers, weights kept", "SVD of", "ranks", "kept", "dense layers", "cosine raw",
                     "overlap@10 raw", "cosine distilled", "overlap@10 distilled", "params", "file bytes", "speedup b=1",
                     "speedup b=32"], body))
    if cnn:
        base, rows = cnn
        body = [["dense", "100%", f"{base['acc']:.1%}", "-", f"{base['params']:,}", f"{base['bytes']:,}",
                 "1.00x", "1.00x"]]
        for r in rows:
            body.append([r["method"], f"{r['kept']:.1%}", f"{r['acc']:.1%}",
                         f"{r['acc_ft']:.1%}" if "acc_ft" in r else "-", f"{r['params']:,}",
                         f"{r['bytes']:,} ({base['bytes'] / r['bytes']:.2f}x)", _x(r["speedup"], 1),
                         _x(r["speedup"], 128)])
        parts.append(
            f"### MNIST-1D reference CNN: convolutions at 50% of their weights\n\nThe reference CNN trained "
            f"{args.train_epochs} epoch(s); every Conv1d factorized with `keep_params=0.5` by Tucker-2 (1x1, "
            f"k core, 1x1; HOSVD) or channel SVD (k conv to r channels, then 1x1), accuracy on the "
            f"{base['n']:,} test samples before and after {args.cnn_ft_epochs} epoch(s) of fine-tune (lr 1e-3).\n\n"
            + table(["method", "kept", "accuracy", "after fine-tune", "params", "file bytes", "speedup b=1",
                     "speedup b=128"], body))
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--ft-epochs", type=int, default=3, help="MiniLM distillation epochs")
    p.add_argument("--lm-lr", type=float, default=5e-5)
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--cnn-ft-epochs", type=int, default=3)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--skip-cnn", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer sentences, epochs and repeats (smoke run)")
    args = p.parse_args()
    args.ratios, args.sentences = (0.75, 0.5, 0.25), 512
    if args.quick:
        args.ratios, args.sentences, args.ft_epochs, args.train_epochs, args.cnn_ft_epochs = (0.5,), 48, 1, 1, 1
        args.repeats, args.warmup = 3, 1
    torch.set_num_threads(args.threads)
    lm = cnn = None
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_minilm:
            lm = minilm_rows(args, Path(tmp))
            update_section(args.out, "lowrank", render(args, lm, cnn))
        if not args.skip_cnn:
            cnn = cnn_rows(args, Path(tmp))
            update_section(args.out, "lowrank", render(args, lm, cnn))
    print(render(args, lm, cnn))


if __name__ == "__main__":
    main()
