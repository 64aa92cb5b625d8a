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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from common import trained_reference, update_section  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import Context, Targets, TrainConfig, fit  # noqa: E402
from nncompress.eval.latency import compare_latency  # noqa: E402
from nncompress.eval.measure import count_macs, count_params, file_bytes  # noqa: E402
from nncompress.eval.metrics import accuracy, embed, embedding_fidelity  # noqa: E402
from nncompress.export.checkpoint import write_checkpoint  # noqa: E402
from nncompress.prune.structured import PruneConfig  # noqa: E402
from nncompress.zoo.loaders import build_data, build_model  # noqa: E402

CRITERIA = {"l2": "GroupMagnitudeImportance(p=2)", "taylor": "GroupTaylorImportance()",
            "fpgm": "FPGMImportance()", "bn_scale": "BNScaleImportance()",
            # closest peer to our exact per-channel HVP criterion: grouped OBD (diagonal empirical Fisher)
            "hessian": "GroupHessianImportance()"}
# Second-order criteria see one calibration batch (128 samples) in both tools: Torch-Pruning's needs a
# backward pass per sample at every bisection step, ours one Hessian-vector product per channel.
HESSIAN_BATCHES = 1
CALIB_BATCHES = 8  # both tools' data-driven criteria see the same calibration batches


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
                if i >= CALIB_BATCHES:
                    break
                ce(m, batch).backward()
        if criterion == "hessian":  # their documented recipe: per-sample gradients, accumulated squared
            imp.zero_grad()
            for i, (x, y) in enumerate(data.calib):
                if i >= HESSIAN_BATCHES:
                    break
                for loss in F.cross_entropy(m(x), y, reduction="none"):
                    m.zero_grad()
                    loss.backward(retain_graph=True)
                    imp.accumulate_grad(m)
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
    batches = HESSIAN_BATCHES if criterion == "hessian" else CALIB_BATCHES
    return nncompress.apply(m, PruneConfig(target_macs=keep, scope="global", importance=criterion,
                                           max_ratio=0.9, calib_batches=batches), context=Context(data=data))


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


# ------------------------------------------------------------------------------------------- MiniLM

MINILM_RATIOS = (0.25, 0.5)


def minilm_ours(model, data, ratio: float, ffn_only: bool = False):
    m = copy.deepcopy(model).eval()
    targets = Targets(include=("*.intermediate.dense",)) if ffn_only else None
    return nncompress.apply(m, PruneConfig(ratio=ratio, importance="l2", scope="local"), targets=targets,
                            context=Context(data=data))


def minilm_tp(model, data, ratio: float, ffn_only: bool = False):
    """Torch-Pruning's HF BERT recipe (examples/transformers/prune_hf_bert.py): whole heads of q/k/v at
    head_pruning_ratio, FFN neurons at pruning_ratio, the hidden (residual) width left alone."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    m = copy.deepcopy(model).eval()
    bert = m.model
    attentions = [a for a in m.modules() if isinstance(a, BertSelfAttention)]
    num_heads = {lin: a.num_attention_heads for a in attentions for lin in (a.query, a.key, a.value)}
    ignored = [bert.embeddings] + ([bert.pooler] if bert.pooler is not None else [])
    for layer in bert.encoder.layer:  # producers of the hidden width
        ignored += [layer.attention.output.dense, layer.output.dense]
        if ffn_only:
            ignored += [layer.attention.self]
    ex = data.example_batch(2)
    pruner = tp.pruner.MetaPruner(m, (ex["input_ids"], ex["attention_mask"]),
                                  importance=tp.importance.GroupMagnitudeImportance(p=2), global_pruning=False,
                                  pruning_ratio=ratio, ignored_layers=ignored,
                                  num_heads={} if ffn_only else num_heads, prune_num_heads=not ffn_only,
                                  prune_head_dims=False, head_pruning_ratio=0.0 if ffn_only else ratio)
    pruner.step()
    for a in attentions:  # their recipe: the attention modules read these, Torch-Pruning does not set them
        a.num_attention_heads = pruner.num_heads.get(a.query, a.num_attention_heads)
        a.attention_head_size = a.query.out_features // a.num_attention_heads
        a.all_head_size = a.query.out_features
    return m


def minilm_row(tool, ratio, scope, reference, ref_emb, pruned, prune_s, data, args, tmp):
    fid = embedding_fidelity(ref_emb, embed(pruned, data.test), k=10)
    layer = pruned.model.encoder.layer[0]
    path = write_checkpoint(pruned, Path(tmp) / f"minilm-{tool}-{ratio}-{scope}", source={"name": "-"}, history=[])
    row = {"tool": tool, "ratio": ratio, "scope": scope, "cosine": fid["cosine"], "overlap": fid["overlap_at_k"],
           "heads": layer.attention.self.num_attention_heads, "ffn": layer.intermediate.dense.out_features,
           "params": count_params(pruned), "macs": count_macs(pruned, data.example_batch(1)),
           "bytes": file_bytes(path / "model.safetensors"), "prune_s": prune_s}
    for b in (1, 32):
        ref, lat = compare_latency([reference, pruned], data.example_batch(b), warmup=3, repeats=args.repeats,
                                   threads=2)
        row[f"speedup_b{b}"] = ref.median_ms / lat.median_ms
    return row


def minilm_rows(args, tmp) -> tuple[list[dict], dict, str]:
    reference, tok = build_model({"name": "hf:minilm"})
    reference.eval()
    data = build_data({"name": "sentences"}, tok)
    ref_emb = embed(reference, data.test)
    base = {"params": count_params(reference), "macs": count_macs(reference, data.example_batch(1)),
            "bytes": file_bytes(write_checkpoint(reference, Path(tmp) / "minilm-ref", {"name": "-"}, [])
                                / "model.safetensors"), "n_test": len(ref_emb)}
    failed, rows = "", []
    for ratio in (MINILM_RATIOS[:1] if args.quick else MINILM_RATIOS):
        for scope in ("heads+FFN", "FFN only") if failed else ("heads+FFN",):
            for tool, fn in (("nncompress", minilm_ours), ("torch-pruning", minilm_tp)):
                start = time.perf_counter()
                try:
                    pruned = fn(reference, data, ratio, ffn_only=scope == "FFN only")
                    embed(pruned, [data.example_batch(2)])
                except Exception as e:  # reported in the table, then FFN-only for both tools
                    failed = failed or f"{tool}: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    continue
                rows.append(minilm_row(tool, ratio, scope, reference, ref_emb, pruned,
                                       time.perf_counter() - start, data, args, tmp))
                print(rows[-1], flush=True)
    return rows, base, failed


def minilm_table(rows, base) -> str:
    header = ["removed", "pruned", "tool", "heads/layer", "FFN width", "cosine", "overlap@10", "params",
              "MACs (x fewer)", "file bytes", "speedup b=1", "speedup b=32", "prune time (s)"]
    lines = [header, ["---"] * len(header)]
    for r in rows:
        lines.append([f"{r['ratio']:.0%}", r["scope"], r["tool"], str(r["heads"]), str(r["ffn"]),
                      f"{r['cosine']:.4f}", f"{r['overlap']:.1%}", f"{r['params']:,}",
                      f"{r['macs']:,} ({base['macs'] / r['macs']:.2f}x)", f"{r['bytes']:,}",
                      f"{r['speedup_b1']:.2f}x", f"{r['speedup_b32']:.2f}x", f"{r['prune_s']:.1f}"])
    return "\n".join("| " + " | ".join(x) + " |" for x in lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quick", action="store_true",
                   help="1 epoch each, few repeats, l2 only, MiniLM at 25%% only (smoke run)")
    args = p.parse_args()
    criteria = list(CRITERIA)
    if args.quick:
        args.train_epochs, args.finetune_epochs, args.repeats, criteria = 1, 1, 5, ["l2"]
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        data, reference = trained_reference(tmp, args.train_epochs)
        base_acc = accuracy(reference, data.test)
        base_macs = count_macs(reference, data.example_batch(1))
        base_params = count_params(reference)
        base_bytes = file_bytes(write_checkpoint(reference, Path(tmp) / "ref", {"name": "-"}, []) / "model.safetensors")
        rows = []
        for keep in (0.5, 0.25):
            for criterion in criteria:
                for tool in ("nncompress", "torch-pruning"):
                    start = time.perf_counter()
                    try:
                        pruned = (ours_prune(reference, data, criterion, keep) if tool == "nncompress"
                                  else tp_prune(reference, data, criterion, keep, data.example_batch(1)))
                    except Exception as e:  # a peer criterion that does not run here: n/a in the table
                        rows.append({"tool": tool, "criterion": criterion, "target": f"{1 / keep:.0f}x",
                                     "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                        continue
                    prune_s = time.perf_counter() - start
                    rows.append(measure("", tool, criterion, keep, reference, pruned, prune_s, data, args, tmp))
                    print(rows[-1], flush=True)
        minilm, minilm_base, minilm_failed = minilm_rows(args, tmp)
    header = ["MAC target", "criterion", "tool", "acc. pruned", "acc. after FT", "params", "MACs (x fewer)",
              "file bytes", "speedup b=1", "speedup b=256", "prune time (s)"]
    lines = [header, ["---"] * len(header)]
    for r in rows:
        if "failed" in r:
            lines.append([r["target"], r["criterion"], r["tool"], f"n/a ({r['failed']})"] + ["n/a"] * 7)
            continue
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
            f"{' QUICK RUN: not the reference figures.' if args.quick else ''}\n\n"
            f"Criterion `hessian`: ours is the exact second-order loss change of zeroing each channel "
            f"(g.d + 0.5 d.Hd, one Hessian-vector product per channel, batched); Torch-Pruning's closest is "
            f"GroupHessianImportance (grouped OBD: diagonal empirical Fisher from per-sample gradients). "
            f"Both on the same {CALIB_BATCHES} calibration batches.\n\n{table}\n\n"
            f"### all-MiniLM-L6-v2: attention heads and FFN neurons, no fine-tune\n\n"
            f"The unpruned encoder: {minilm_base['params']:,} params, {minilm_base['macs']:,} MACs per sentence "
            f"(64 tokens), {minilm_base['bytes']:,} bytes. Each tool removes the same fraction of every layer's "
            f"heads and FFN neurons by L2 magnitude; the hidden (residual) width is kept. nncompress: "
            f"`PruneConfig(ratio=r, importance=\"l2\", scope=\"local\")` on the SentenceEncoder (heads are "
            f"graph groups); Torch-Pruning: MetaPruner with num_heads for q/k/v, prune_num_heads=True, "
            f"head_pruning_ratio=r, pruning_ratio=r, the hidden-width producers in ignored_layers "
            f"(their examples/transformers/prune_hf_bert.py). Fidelity: cosine and overlap@10 of the "
            f"embeddings of the {minilm_base['n_test']} test sentences against the unpruned model's. "
            f"Speedups interleaved with the unpruned model, medians of {args.repeats}, 2 threads."
            f"{(' Torch-Pruning on heads failed: ' + minilm_failed + '; FFN-only rows for both.') if minilm_failed else ''}"
            f"\n\n{minilm_table(minilm, minilm_base)}")
    update_section(args.out, "prune_structured", body)
    print(body)


if __name__ == "__main__":
    main()
