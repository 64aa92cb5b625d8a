"""Fine-grained sparsity vs torch.nn.utils.prune, lottery tickets, SNIP, and 2:4 on MiniLM, in one run.

    python benchmarks/sparsity.py --out BENCHMARKS.md      (or: make bench-sparsity)

1. The MNIST-1D reference CNN, trained once; global magnitude pruning of every Conv/Linear weight at
   50/80/90/95% sparsity by nncompress (`sparsify`, scope global) and by
   `torch.nn.utils.prune.global_unstructured(L1Unstructured)`, each without and with the same
   fine-tune (masks kept; the peer's hooks stay in place while training, then `prune.remove`).
   Accuracy, nonzero parameters and file bytes: ours with the compact codecs of `write_checkpoint`,
   the peer's state_dict as torch users get it (dense safetensors) and with the same codecs.
2. Lottery ticket (rewind to init) vs the same masks on a random re-initialisation, 80% and 90%.
3. SNIP at initialisation, then trained as long as the dense reference was from scratch.
4. all-MiniLM-L6-v2, 2:4 on every encoder Linear by magnitude, Wanda and SparseGPT, no fine-tune:
   embedding fidelity to the dense model, the time each took and file bytes.
Each phase rewrites the section when it ends, so an interrupted run leaves what it measured.
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
from torch.nn.utils import prune

sys.path.insert(0, str(Path(__file__).parent))

from common import checkpoint_size, trained_reference, update_section  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import Context, Targets, TrainConfig, fit  # noqa: E402
from nncompress.eval.measure import count_nonzero_params, count_params  # noqa: E402
from nncompress.eval.metrics import accuracy, embed, embedding_fidelity  # noqa: E402
from nncompress.prune.lottery import LotteryConfig  # noqa: E402
from nncompress.prune import NM  # noqa: E402
from nncompress.prune.sparsity import SparsityConfig  # noqa: E402
from nncompress.zoo.loaders import build_data, build_model  # noqa: E402

PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def saved_bytes(model: nn.Module, where: Path, compress: bool) -> int:
    return checkpoint_size(model, where, compress)


def weight_sparsity(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, PRUNABLE)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def ours(reference, data, sparsity, epochs, lr):
    torch.manual_seed(1)  # the same data order for both tools' fine-tune
    cfg = SparsityConfig(ratio=sparsity, scope="global", importance="magnitude", epochs=epochs, lr=lr)
    return nncompress.apply(copy.deepcopy(reference), cfg, context=Context(data=data)).eval()


def peer(reference, data, sparsity, epochs, lr):
    m = copy.deepcopy(reference)
    params = [(mod, "weight") for mod in m.modules() if isinstance(mod, PRUNABLE)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    if epochs:
        torch.manual_seed(1)
        fit(m, data.train, ce, TrainConfig(epochs=epochs, lr=lr))  # weight_orig * mask in every forward
    for mod, name in params:
        prune.remove(mod, name)
    return m.eval()


def magnitude_rows(reference, data, args, tmp):
    rows = []
    for s in args.sparsities:
        for ft in (0, args.finetune_epochs):
            for tool, fn in (("nncompress", ours), ("torch.nn.utils.prune", peer)):
                m = fn(reference, data, s, ft, args.lr)
                d = Path(tmp) / f"{tool}-{s}-{ft}"
                row = {"sparsity": s, "ft": ft, "tool": tool, "acc": accuracy(m, data.test),
                       "real": weight_sparsity(m), "nnz": count_nonzero_params(m)}
                if tool == "nncompress":
                    row["bytes"] = saved_bytes(m, d, True)
                else:
                    row["bytes_plain"], row["bytes"] = saved_bytes(m, d / "plain", False), saved_bytes(m, d, True)
                rows.append(row)
                print(row, flush=True)
    return rows


def lottery_rows(data, args):
    rows = []
    for s in args.lottery_sparsities:
        for reinit in (False, True):
            torch.manual_seed(0)  # the same initialisation as the dense reference
            model, _ = build_model({"name": "mnist1d_cnn"})
            cfg = LotteryConfig(ratio=s, rounds=args.lottery_rounds, epochs=args.lottery_epochs, lr=3e-3,
                                final_epochs=args.lottery_final, reinit=reinit)
            start = time.perf_counter()
            model = nncompress.apply(model, cfg, context=Context(data=data))
            rows.append({"sparsity": s, "reinit": reinit, "acc": accuracy(model, data.test),
                         "real": weight_sparsity(model), "s": time.perf_counter() - start})
            print(rows[-1], flush=True)
    return rows


def snip_rows(data, args):
    rows = []
    for s in args.lottery_sparsities:
        torch.manual_seed(0)
        model, _ = build_model({"name": "mnist1d_cnn"})
        cfg = SparsityConfig(ratio=s, scope="global", importance="snip", epochs=args.train_epochs, lr=3e-3)
        model = nncompress.apply(model, cfg, context=Context(data=data)).eval()
        rows.append({"sparsity": s, "acc": accuracy(model, data.test), "real": weight_sparsity(model)})
        print(rows[-1], flush=True)
    return rows


def minilm_rows(args, tmp):
    model, tok = build_model({"name": "hf:minilm"})
    model.eval()
    data = build_data({"name": "sentences"}, tokenizer=tok)
    ref = embed(model, data.test)
    from mixed_precision import encoded, legal_sentences

    ood = encoded(tok, legal_sentences())  # another domain (legal prose), never calibrated on
    ref_ood = embed(model, ood)
    dense = {"plain": saved_bytes(model, Path(tmp) / "minilm", False), "n": ref.shape[0], "n_ood": ref_ood.shape[0]}
    targets = Targets(include=("*encoder*",), types=(nn.Linear,))
    rows = []
    for crit in ("magnitude", "wanda", "sparsegpt"):
        m = copy.deepcopy(model)
        start = time.perf_counter()
        m = nncompress.apply(m, SparsityConfig(granularity=NM(2, 4), importance=crit), targets=targets,
                             context=Context(data=data)).eval()
        seconds = time.perf_counter() - start
        fid = embedding_fidelity(ref, embed(m, data.test), k=10)
        fid["cosine_ood"] = embedding_fidelity(ref_ood, embed(m, ood), k=10)["cosine"]
        rows.append({"crit": crit, "s": seconds, **fid, "bytes": saved_bytes(m, Path(tmp) / f"minilm-{crit}", True)})
        print(rows[-1], flush=True)
    return dense, rows


def table(header, rows):
    lines = [header, ["---"] * len(header)] + rows
    return "\n".join("| " + " | ".join(x) + " |" for x in lines)


def render(args, base, mag, lot, snip, lm) -> str:
    parts = [f"## Fine-grained sparsity vs torch.nn.utils.prune (`make bench-sparsity`)\n\n"
             f"MNIST-1D reference CNN trained {args.train_epochs} epochs (AdamW, lr 3e-3, cosine): "
             f"{base['acc']:.1%} test accuracy, {base['params']:,} params, dense file {base['plain']:,} bytes "
             f"({base['packed']:,} with the compact codecs). CPU, 2 threads, torch eager. One seed; the test set has "
             f"{base['n']:,} samples, so one sample is {1 / base['n']:.1%} and gaps of a few tenths of a point "
             f"are within noise."
             f"{' QUICK RUN: not the reference figures.' if args.quick else ''}"]
    if mag:
        rows = []
        for r in mag:
            plain = f"{r['bytes_plain']:,} ({base['plain'] / r['bytes_plain']:.2f}x)" if "bytes_plain" in r else "-"
            rows.append([f"{r['sparsity']:.0%}", f"{r['ft']}", r["tool"], f"{r['acc']:.1%}",
                         f"{r['acc'] - base['acc']:+.1%}", f"{r['real']:.1%}", f"{r['nnz']:,}", plain,
                         f"{r['bytes']:,} ({base['plain'] / r['bytes']:.2f}x)"])
        parts.append(
            f"### Global magnitude pruning of every Conv/Linear weight\n\nBoth tools prune the same trained "
            f"model with one global |w| threshold (ours: `sparsify` scope global; peer: "
            f"`prune.global_unstructured(L1Unstructured)`); the fine-tune is {args.finetune_epochs} epoch(s) of "
            f"the same AdamW (lr {args.lr}, cosine, same data order) with masks enforced. File bytes are "
            f"the safetensors file and its shrink vs the dense file: 'plain' is `write_checkpoint(compress=False)` "
            f"(dense tensors with zeros, what `torch.save`/safetensors of a state_dict gives), 'compact' the "
            f"smallest exact codec per tensor (both tools' models go through the same writer).\n\n"
            + table(["sparsity", "FT epochs", "tool", "accuracy", "vs dense", "weight zeros", "nonzero params",
                     "bytes plain", "bytes compact"], rows))
    if lot:
        rows = [[f"{r['sparsity']:.0%}", "random re-init" if r["reinit"] else "rewind to init (ticket)",
                 f"{r['acc']:.1%}", f"{r['acc'] - base['acc']:+.1%}", f"{r['real']:.1%}", f"{r['s']:.0f}"]
                for r in lot]
        parts.append(
            f"### Lottery ticket vs random re-initialisation\n\n`lottery`: {args.lottery_rounds} rounds of "
            f"{args.lottery_epochs} epoch(s) of training (lr 3e-3) and global magnitude pruning, rewinding the "
            f"survivors to the reference's initial weights; then {args.lottery_final} epoch(s) of training of "
            f"the ticket. The control (`reinit: true`) keeps the same masks on fresh random weights.\n\n"
            + table(["sparsity", "weights", "accuracy", "vs dense", "weight zeros", "time (s)"], rows))
    if snip:
        rows = [["0% (dense, from scratch)", f"{base['acc']:.1%}", "+0.0%", "0.0%"]]
        rows += [[f"{r['sparsity']:.0%} (SNIP at init)", f"{r['acc']:.1%}", f"{r['acc'] - base['acc']:+.1%}",
                  f"{r['real']:.1%}"] for r in snip]
        parts.append(
            f"### SNIP at initialisation\n\n`sparsify` with importance snip (scope global) on the reference's "
            f"initial weights, then {args.train_epochs} epochs of the same training as the dense reference, "
            f"masks enforced.\n\n" + table(["sparsity", "accuracy", "vs dense", "weight zeros"], rows))
    if lm:
        dense, rows_ = lm
        rows = [["dense", "1.0000", "1.0000", "1.000", "-", f"{dense['plain']:,}"]]
        rows += [[r["crit"], f"{r['cosine']:.4f}", f"{r['cosine_ood']:.4f}", f"{r['overlap_at_k']:.3f}",
                  f"{r['s']:.1f}", f"{r['bytes']:,} ({dense['plain'] / r['bytes']:.2f}x)"] for r in rows_]
        parts.append(
            f"### 2:4 on all-MiniLM-L6-v2, no fine-tune\n\nEvery encoder Linear at 2:4 (2 kept of every 4 "
            f"inputs); fidelity to the dense model's embeddings on the {dense['n']} test sentences of the "
            f"calibration corpus (mean cosine, overlap of the 10 nearest neighbours) and on {dense['n_ood']} "
            f"sentences of legal text the calibration never saw (cosine out-of-domain); time is the whole "
            f"`sparsify` call (calibration passes included); bytes with the compact codecs (2:4 packed) vs the "
            f"dense file.\n\n"
            + table(["criterion", "cosine", "cosine out-of-domain", "overlap@10", "time (s)", "file bytes"], rows))
    if mag:
        parts.append(COMPARISON.format(**_comparison(base, mag, snip)))
    return "\n\n".join(parts)


COMPARISON = """### Against seed 001's fine-grained results

Seed 001 reports VGG/AlexNet on ImageNet kept at 7.5-16% density (84-92.5% zeros) for under 0.1%
top-1 loss after retraining. On this ~{params_k}k-parameter CNN with {ft} fine-tune epoch(s), the sparsest
swept level within 0.1 points of dense is {best01} (within 0.5 points: {best05}); at 90% zeros (10%
density, inside seed 001's range) magnitude pruning plus fine-tune gives {at90} ({drop90}), and SNIP at
initialisation trained the full budget gives {snip90}. {verdict}"""


def _best(rows, base, tol):
    ok = [r for r in rows if base["acc"] - r["acc"] <= tol + 1e-9]
    return f"{max(ok, key=lambda r: r['sparsity'])['sparsity']:.0%}" if ok else "none of the swept levels"


def _comparison(base, mag, snip):
    ft = max(r["ft"] for r in mag)
    ours_ft = [r for r in mag if r["tool"] == "nncompress" and r["ft"] == ft]
    r90 = next((r for r in ours_ft if abs(r["sparsity"] - 0.9) < 1e-9), None)
    s90 = next((r for r in snip or [] if abs(r["sparsity"] - 0.9) < 1e-9), None)
    drop = base["acc"] - r90["acc"] if r90 else None
    verdict = ("Not measured at 90%." if drop is None else
               "So the small model lands inside seed 001's regime at that density." if drop <= 0.001 else
               f"So at that density the small model loses {drop:.1%}, more than seed 001's large models "
               "(under 0.1%): a narrow network whose parameters sit in convolutions has less redundancy "
               "than VGG/AlexNet, whose weights are mostly in large fully connected layers, and our "
               "fine-tune is a few epochs, not seed 001's full retraining.")
    return {"params_k": round(base["params"] / 1000), "ft": ft, "best01": _best(ours_ft, base, 0.001),
            "best05": _best(ours_ft, base, 0.005), "at90": f"{r90['acc']:.1%}" if r90 else "not measured",
            "drop90": f"{r90['acc'] - base['acc']:+.1%} vs dense" if r90 else "-",
            "snip90": f"{s90['acc']:.1%}" if s90 else "not measured", "verdict": verdict}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tune learning rate")
    p.add_argument("--lottery-rounds", type=int, default=3)
    p.add_argument("--lottery-epochs", type=int, default=2)
    p.add_argument("--lottery-final", type=int, default=10)
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 epoch each, 2 sparsities, 1 lottery level (smoke run)")
    args = p.parse_args()
    args.sparsities, args.lottery_sparsities = (0.5, 0.8, 0.9, 0.95), (0.8, 0.9)
    if args.quick:
        args.train_epochs, args.finetune_epochs, args.lottery_rounds, args.lottery_epochs = 1, 1, 1, 1
        args.lottery_final, args.sparsities, args.lottery_sparsities = 0, (0.5, 0.9), (0.9,)
    torch.set_num_threads(2)
    mag = lot = snip = lm = None

    def write():
        update_section(args.out, "sparsity", render(args, base, mag, lot, snip, lm))

    with tempfile.TemporaryDirectory() as tmp:
        data, reference = trained_reference(tmp, args.train_epochs)
        base = {"acc": accuracy(reference, data.test), "params": count_params(reference),
                "plain": saved_bytes(reference, Path(tmp) / "ref-plain", False),
                "packed": saved_bytes(reference, Path(tmp) / "ref", True), "n": sum(len(y) for _, y in data.test)}
        print(base, flush=True)
        mag = magnitude_rows(reference, data, args, tmp)
        write()
        if not args.skip_minilm:
            lm = minilm_rows(args, tmp)
            write()
        snip = snip_rows(data, args)
        write()
        lot = lottery_rows(data, args)
        write()
    print(render(args, base, mag, lot, snip, lm))


if __name__ == "__main__":
    main()
