"""Deep Compression (prune -> cluster -> Huffman) on the MNIST-1D CNN: size ratio at equal accuracy.

    python benchmarks/deep_compression.py --out BENCHMARKS.md      (section "deep_compression")

1. The reference CNN (`common.trained_reference`), its file dense (plain fp32) and with the compact codecs.
2. Global magnitude pruning of every Conv/Linear weight to `--sparsity` with a masked fine-tune.
3. Weight sharing on the pruned model for each `--bits conv:fc` pair (`cluster`, zeros kept), then a
   fine-tune that trains only the centroids. Measured: accuracy and the file nncompress writes, whose
   writer Huffman-codes every integer stream when that is smaller (Deep Compression's third step: the
   nonzero mask's bytes and the nonzeros' codebook indices). Computed beside it from the cluster
   stage's record, for comparison: each clustered weight as a nonzero bitmask plus fixed b-bit indices
   of the nonzeros, and as Han et al. count it (every index one Huffman stream, zero a symbol).
4. Peers at similar bytes: weight-only int8 and int4 (per channel, round to nearest) of the dense
   model, and int4 of the pruned model, stored as packed integer codes by the same writer.
Every figure comes from this one run; accuracy is on the MNIST-1D test set.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))

from common import trained_reference, update_section  # noqa: E402

import nncompress  # noqa: E402
from nncompress.cluster import ClusterConfig  # noqa: E402
from nncompress.core import Context, Targets, history  # noqa: E402
from nncompress.distill import FinetuneConfig  # noqa: E402
from nncompress.eval.measure import file_bytes  # noqa: E402
from nncompress.eval.metrics import accuracy  # noqa: E402
from nncompress.export.checkpoint import load_weights, read_checkpoint, write_checkpoint  # noqa: E402
from nncompress.formats import IntFormat  # noqa: E402
from nncompress.prune.sparsity import SparsityConfig  # noqa: E402
from nncompress.quant import QuantizeConfig, QuantSpec  # noqa: E402


def saved(model, where: Path, compress: bool = True) -> Path:
    """The checkpoint folder (weights + manifest with the model's history): its bytes are what loads,
    checked by reading them back into a copy of the model: the same outputs, bit for bit."""
    path = write_checkpoint(model, where, {"name": "-"}, history(model), compress=compress)
    again = copy.deepcopy(model)
    load_weights(again, read_checkpoint(path))
    with torch.no_grad():
        if not torch.equal(again.eval()(PROBE), model.eval()(PROBE)):
            raise SystemExit(f"{where.name}: the reloaded model's outputs differ")
    return path


PROBE = torch.randn(64, 40, generator=torch.Generator().manual_seed(0))  # MNIST-1D inputs: (N, 40)


def tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each state tensor in a checkpoint file (the sum of its stored parts)."""
    out: dict[str, int] = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            name = key.rpartition("::")[0]
            out[name] = out.get(name, 0) + t.numel() * t.element_size()
    return out


def cluster_rows(pruned, data, args, tmp: Path, base: dict) -> list[dict]:
    rows = []
    for pair in args.bits:
        conv_bits, fc_bits = (int(b) for b in pair.split(":"))
        m = copy.deepcopy(pruned)
        m = nncompress.apply(m, ClusterConfig(bits=conv_bits), targets=Targets(types=("Conv1d",)))
        m = nncompress.apply(m, ClusterConfig(bits=fc_bits), targets=Targets(types=("Linear",)))
        records = [h["record"] for h in history(m)[-2:]]
        torch.manual_seed(2)
        m = nncompress.apply(m, FinetuneConfig(epochs=args.cluster_epochs, lr=args.cluster_lr),
                             context=Context(data=data)).eval()
        path = saved(m, tmp / f"cluster-{conv_bits}-{fc_bits}")
        stored = tensor_bytes(path)
        layers = {n: r for rec in records for n, r in rec["layers"].items()}
        in_file = sum(stored[f"{n}.assignment"] + stored[f"{n}.centroids"] for n in layers)
        total = file_bytes(path)
        row = {"label": f"+ cluster conv {conv_bits}-bit / fc {fc_bits}-bit + FT", "acc": accuracy(m, data.test),
               "bytes": total, "cluster_bytes": in_file,
               "sparse": total - in_file + sum(r["sparse_bytes"] for r in layers.values()),
               "huffman": total - in_file + sum(r["huffman_bytes"] for r in layers.values()),
               "bits_per_weight": sum(r["huffman_bits_per_weight"] * r["numel"] for r in layers.values())
               / sum(r["numel"] for r in layers.values())}
        rows.append(row)
        print(row, flush=True)
    return rows


def quant_rows(reference, pruned, data, tmp: Path) -> list[dict]:
    rows = []
    for label, model, bits in (("int8 weight-only (dense)", reference, 8), ("int4 weight-only (dense)", reference, 4),
                               ("int4 weight-only (pruned + FT)", pruned, 4)):
        cfg = QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=bits)))
        q = nncompress.apply(copy.deepcopy(model), cfg, context=Context(data=data)).eval()
        rows.append({"label": label, "acc": accuracy(q, data.test), "bytes": file_bytes(saved(q, tmp / label))})
        print(rows[-1], flush=True)
    return rows


def table(header, rows):
    lines = [header, ["---"] * len(header)] + rows
    return "\n".join("| " + " | ".join(x) + " |" for x in lines)


# Named variants: each writes its own section with the flags it stands for.
VARIANTS = {
    "80": (["--sparsity", "0.8", "--bits", "5:4", "4:4"], "Deep Compression at 80% sparsity",
           "The same benchmark with gentler pruning, to answer the size ratio at equal accuracy."),
}


def heading(args) -> str:
    if not args.variant:
        return "## Deep Compression on the MNIST-1D CNN (`make bench-deep-compression`)\n\n"
    flags, title, why = VARIANTS[args.variant]
    return f"## {title} (`make bench-deep-compression-{args.variant}`: {' '.join(flags)})\n\n{why}\n\n"


def render(args, base, steps, clusters, quants) -> str:
    def line(label, acc, size, how):
        return [label, f"{acc:.1%}", f"{acc - base['acc']:+.1%}", f"{size:,}", f"{base['plain'] / size:.1f}x", how]

    rows = [line("dense reference", base["acc"], base["plain"], "file, plain fp32"),
            line("dense reference", base["acc"], base["compact"], "file, compact codecs")]
    rows += [line(s["label"], s["acc"], s["bytes"], "file") for s in steps]
    for c in clusters:
        rows += [line(c["label"], c["acc"], c["bytes"], "file"),
                 line(c["label"], c["acc"], c["sparse"], "computed: nonzero bitmask + b-bit indices"),
                 line(c["label"], c["acc"], c["huffman"],
                      f"computed: one Huffman stream of all indices, zero a symbol ({c['bits_per_weight']:.2f} "
                      "bits/weight)")]
    rows += [line(q["label"], q["acc"], q["bytes"], "file, packed int codes") for q in quants]
    candidates = [(r[0], int(r[3].replace(",", "")), r[5]) for r in rows[2:]
                  if float(r[2].rstrip("%")) >= -0.5 - 1e-9]
    best = min(candidates, key=lambda c: c[1]) if candidates else None
    verdict = (f"Smallest within 0.5 points of dense accuracy: **{best[0]}**, {best[1]:,} bytes "
               f"({base['plain'] / best[1]:.1f}x smaller than the plain fp32 file; {best[2]})."
               if best else "No compressed model stayed within 0.5 points of dense accuracy in this run.")
    return (heading(args) +
            f"Reference CNN trained {args.train_epochs} epochs: {base['acc']:.1%} test accuracy "
            f"({base['n']:,} test samples: one sample is {1 / base['n']:.2%}). Pipeline (Han et al. 2016): global "
            f"magnitude pruning to {args.sparsity:.0%} zeros of every Conv/Linear weight with {args.finetune_epochs} "
            f"epoch(s) of masked fine-tune; k-means weight sharing per layer (linear init, zeros kept as their "
            f"own value, so 2^b - 1 centroids) then {args.cluster_epochs} epoch(s) of fine-tune of the centroids only "
            f"(lr {args.cluster_lr}); Huffman coding. 'file' is the safetensors file nncompress writes and loads back "
            f"bit for bit (smallest exact codec per tensor, each integer stream Huffman-coded when that is "
            f"smaller: a pruned and clustered weight is its nonzero mask's bytes and its nonzeros' codebook "
            f"indices, each Huffman-coded, plus the codebook); 'computed' rows replace the clustered weights' "
            f"stored bytes in that file by sizes the cluster stage records, not written: fixed-width indices of "
            f"the nonzeros after a 1-bit mask, or one Huffman stream of every index with zero a symbol (Han et "
            f"al.'s count). Ratio is against the plain fp32 file. "
            f"CPU, one seed.{' QUICK RUN: not the reference figures.' if args.quick else ''}\n\n"
            + table(["model", "accuracy", "vs dense", "bytes", "ratio", "bytes are"], rows) + "\n\n" + verdict)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--cluster-epochs", type=int, default=2)
    p.add_argument("--cluster-lr", type=float, default=3e-4)
    p.add_argument("--bits", nargs="+", default=["5:4", "4:4", "3:3"], help="conv:fc index widths")
    p.add_argument("--quick", action="store_true", help="1 epoch each, one bit width (smoke run)")
    p.add_argument("--variant", choices=sorted(VARIANTS), help="a named variant: its flags, its own section")
    args = p.parse_args()
    if args.variant:
        args = p.parse_args(sys.argv[1:] + VARIANTS[args.variant][0])
    section = "deep_compression" + (f"_{args.variant}" if args.variant else "")
    if args.quick:
        args.train_epochs, args.finetune_epochs, args.cluster_epochs, args.bits = 1, 1, 1, ["5:4"]
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, reference = trained_reference(tmp, args.train_epochs)
        base = {"acc": accuracy(reference, data.test), "plain": file_bytes(saved(reference, tmp / "plain", False)),
                "compact": file_bytes(saved(reference, tmp / "compact")), "n": sum(len(y) for _, y in data.test)}
        print(base, flush=True)
        torch.manual_seed(1)
        cfg = SparsityConfig(ratio=args.sparsity, scope="global", epochs=args.finetune_epochs, lr=1e-3)
        pruned = nncompress.apply(copy.deepcopy(reference), cfg, context=Context(data=data)).eval()
        steps = [{"label": f"pruned {args.sparsity:.0%} + FT", "acc": accuracy(pruned, data.test),
                  "bytes": file_bytes(saved(pruned, tmp / "pruned"))}]
        print(steps[-1], flush=True)
        update_section(args.out, section, render(args, base, steps, [], []))
        clusters = cluster_rows(pruned, data, args, tmp, base)
        update_section(args.out, section, render(args, base, steps, clusters, []))
        quants = quant_rows(reference, pruned, data, tmp)
        text = render(args, base, steps, clusters, quants)
        update_section(args.out, section, text)
    print(text)
    print(json.dumps({"base": base}, default=str))


if __name__ == "__main__":
    main()
