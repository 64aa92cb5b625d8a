"""Structured pruning vs Torch-Pruning on the MNIST-1D reference CNN, same targets, same fine-tune.

    python benchmarks/prune_structured.py --out BENCHMARKS.md      (or: make bench-prune-structured)

For each MAC target (2x and 4x fewer MACs) and each criterion both tools offer (L2 magnitude,
first-order Taylor, FPGM, BN scale), both prune the same trained model with global ranking to the
same MAC budget (each finds its own channel ratio by bisection on the real MAC count), then both
get the same fine-tune (epochs, optimizer, lr, data order). Reported: accuracy before and after
fine-tune, params, MACs, file bytes, latency speedup measured interleaved with the unpruned model
(batch 1 and 256), and the wall time of the pruning step (search included) for each tool.

Section prune_layers (same script, alone with `--only layers`): the coarser and finer granularities
no peer offers, against our own channel/head pruning at the same MAC count. On the CNN: `group_conv`
(G=2, 4: dense convs -> grouped convs) and `drop_layers` (the one residual block whose shape allows
it), before and after the same fine-tune. On all-MiniLM-L6-v2: `drop_layers` of 1, 2, 3 of the 6
encoder layers by angular / cosine / loss importance and contiguous angular, no fine-tune.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from common import checkpoint_size, trained_reference, update_section  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import Context, Targets, TrainConfig, fit  # noqa: E402
from nncompress.core.apply import history  # noqa: E402
from nncompress.eval.latency import compare_latency  # noqa: E402
from nncompress.eval.measure import count_macs, count_params  # noqa: E402
from nncompress.eval.metrics import accuracy, embed, embedding_fidelity  # noqa: E402
from nncompress.prune.kernels import GroupConvConfig  # noqa: E402
from nncompress.prune.layers import DropLayersConfig  # noqa: E402
from nncompress.prune.structured import PruneConfig  # noqa: E402
from nncompress.zoo.loaders import build_data, build_model  # noqa: E402

CRITERIA = {"l2": "GroupMagnitudeImportance(p=2)", "taylor": "GroupTaylorImportance()",
            "fpgm": "FPGMImportance()", "bn_scale": "BNScaleImportance()",
            # closest peer to our exact per-channel HVP criterion: grouped OBD (diagonal empirical Fisher)
            "hessian": "GroupHessianImportance()",
            "obs": None}  # structured OBS on the consumers (ours only: the criterion made for reconstruction)
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


def tp_at_ratio(model, data, criterion: str, ratio: float, example):
    """Torch-Pruning's global pruning of a copy of `model` at channel ratio `ratio`, its criterion fed
    the same calibration batches as ours (taylor: summed gradients; hessian: their per-sample recipe)."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    imp = eval(f"tp.importance.{CRITERIA[criterion]}")  # a constant of this file, not input
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


def tp_prune(model, data, criterion: str, keep: float, example):
    """Torch-Pruning at the global channel ratio that meets the MAC budget (bisection, like ours)."""
    base = count_macs(model, example)

    def run(ratio):
        return tp_at_ratio(model, data, criterion, ratio, example)

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


def ours_prune(model, data, criterion: str, keep: float, reconstruct: str = "auto"):
    m = copy.deepcopy(model).eval()
    batches = HESSIAN_BATCHES if criterion == "hessian" else CALIB_BATCHES
    return nncompress.apply(m, PruneConfig(keep_macs=keep, scope="global", importance=criterion,
                                           max_ratio=0.9, calib_batches=batches, reconstruct=reconstruct),
                            context=Context(data=data))


OURS_PLAIN = "nncompress, reconstruct: none"  # the same pruning without the least-squares refit (l2 only)


def measure(name, tool, criterion, keep, reference, pruned, prune_s, data, args, tmp):
    acc0 = accuracy(pruned, data.test)
    train(pruned, data, args.finetune_epochs, args.lr)
    acc1 = accuracy(pruned, data.test)
    size = checkpoint_size(pruned, Path(tmp) / f"{tool}-{criterion}-{keep}")
    row = {"tool": tool, "criterion": criterion, "target": f"{1 / keep:.0f}x",
           "acc_pruned": acc0, "acc_ft": acc1, "params": count_params(pruned),
           "macs": count_macs(pruned, data.example_batch(1)), "bytes": size,
           "prune_s": prune_s}
    for b in (1, 256):
        x = data.example_batch(b)
        ref, lat = compare_latency([reference, pruned], x, warmup=5, repeats=args.repeats, threads=2)
        row[f"speedup_b{b}"] = ref.median_ms / lat.median_ms
    return row


# ------------------------------------------------------------------------------------------- MiniLM

MINILM_RATIOS = (0.25, 0.5)


def minilm_ours(model, data, ratio: float, ffn_only: bool = False, reconstruct: str = "auto"):
    m = copy.deepcopy(model).eval()
    targets = Targets(include=("*.intermediate.dense",)) if ffn_only else None
    return nncompress.apply(m, PruneConfig(ratio=ratio, importance="l2", scope="local", reconstruct=reconstruct),
                            targets=targets, context=Context(data=data))


def minilm_plain(model, data, ratio: float, ffn_only: bool = False):
    return minilm_ours(model, data, ratio, ffn_only, reconstruct="none")


OURS_OBS = "nncompress, obs"  # structured OBS, ranked globally, at the MACs the uniform rows keep
OURS_OBS_384 = "nncompress, obs, 384 calib."  # the same, calibrated on the 384 training sentences


def minilm_obs(model, data, ratio: float, ffn_only: bool = False, calib_all: bool = False):
    """`importance="obs"`, scope global: each layer's width found from the consumers' output errors, under
    the MAC budget the uniform l2 rows meet (a uniform prune without refit, counted, gives `keep_macs`)."""
    targets = Targets(include=("*.intermediate.dense",)) if ffn_only else None
    example = data.example_batch(1)
    uniform = minilm_ours(model, data, ratio, ffn_only, reconstruct="none")
    keep = count_macs(uniform, example) / count_macs(model, example)
    if calib_all:
        data = dataclasses.replace(data, calib=data.train)
    batches = len(data.calib)
    return nncompress.apply(copy.deepcopy(model).eval(),
                            PruneConfig(keep_macs=keep, importance="obs", scope="global", calib_batches=batches),
                            targets=targets, context=Context(data=data))


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


def minilm_row(tool, ratio, scope, reference, ref_emb, pruned, prune_s, data, args, tmp, ood):
    fid = embedding_fidelity(ref_emb, embed(pruned, data.test), k=10)
    fid_ood = embedding_fidelity(ood[1], embed(pruned, ood[0]), k=10)
    layers = pruned.model.encoder.layer
    size = checkpoint_size(pruned, Path(tmp) / f"minilm-{tool}-{ratio}-{scope}")
    row = {"tool": tool, "ratio": ratio, "scope": scope, "cosine": fid["cosine"], "overlap": fid["overlap_at_k"],
           "cosine_ood": fid_ood["cosine"],
           "layers": len(pruned.model.encoder.layer), "heads": _span(l.attention.self.num_attention_heads for l in layers),
           "ffn": _span(l.intermediate.dense.out_features for l in layers),
           "params": count_params(pruned), "macs": count_macs(pruned, data.example_batch(1)),
           "bytes": size, "prune_s": prune_s}
    for b in (1, 32):
        ref, lat = compare_latency([reference, pruned], data.example_batch(b), warmup=3, repeats=args.repeats,
                                   threads=2)
        row[f"speedup_b{b}"] = ref.median_ms / lat.median_ms
    return row


def load_minilm(tmp) -> tuple:
    """The pretrained encoder, the sentence data, its test embeddings and its unpruned figures."""
    reference, tok = build_model({"name": "hf:minilm"})
    reference.eval()
    data = build_data({"name": "sentences"}, tok)
    ref_emb = embed(reference, data.test)
    from mixed_precision import encoded, legal_sentences

    ood = encoded(tok, legal_sentences())  # another domain, never calibrated on
    base = {"params": count_params(reference), "macs": count_macs(reference, data.example_batch(1)),
            "bytes": checkpoint_size(reference, Path(tmp) / "minilm-ref"), "n_test": len(ref_emb),
            "ood": (ood, embed(reference, ood)), "n_ood": sum(len(b["input_ids"]) for b in ood)}
    return reference, data, ref_emb, base


def minilm_rows(args, tmp, mini) -> tuple[list[dict], str]:
    reference, data, ref_emb, base = mini
    failed, rows = "", []
    for ratio in (MINILM_RATIOS[:1] if args.quick else MINILM_RATIOS):
        for scope in ("heads+FFN", "FFN only"):
            for tool, fn in (("nncompress", minilm_ours), (OURS_PLAIN, minilm_plain), (OURS_OBS, minilm_obs),
                             (OURS_OBS_384, functools.partial(minilm_obs, calib_all=True)),
                             ("torch-pruning", minilm_tp)):
                start = time.perf_counter()
                try:
                    pruned = fn(reference, data, ratio, ffn_only=scope == "FFN only")
                    embed(pruned, [data.example_batch(2)])
                except Exception as e:  # reported in the table, then FFN-only for both tools
                    failed = failed or f"{tool}: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    continue
                rows.append(minilm_row(tool, ratio, scope, reference, ref_emb, pruned,
                                       time.perf_counter() - start, data, args, tmp, base["ood"]))
                print(rows[-1], flush=True)
    return rows, failed


def _span(values) -> str:
    """One width, or min-max when the layers differ (obs ranked globally)."""
    v = sorted(set(values))
    return str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"


def minilm_table(rows, base) -> str:
    header = ["removed", "pruned", "tool", "heads/layer", "FFN width", "cosine", "cosine out-of-domain",
              "overlap@10", "params",
              "MACs (x fewer)", "file bytes", "speedup b=1", "speedup b=32", "prune time (s)"]
    lines = [header, ["---"] * len(header)]
    for r in rows:
        lines.append([f"{r['ratio']:.0%}", r["scope"], r["tool"], str(r["heads"]), str(r["ffn"]),
                      f"{r['cosine']:.4f}", f"{r['cosine_ood']:.4f}", f"{r['overlap']:.1%}", f"{r['params']:,}",
                      f"{r['macs']:,} ({base['macs'] / r['macs']:.2f}x)", f"{r['bytes']:,}",
                      f"{r['speedup_b1']:.2f}x", f"{r['speedup_b32']:.2f}x", f"{r['prune_s']:.1f}"])
    return "\n".join("| " + " | ".join(x) + " |" for x in lines)


def channel_section(args, tmp, cnn: dict, mini: tuple) -> tuple[str, list[dict]]:
    """Section prune_structured: channels on the CNN (ours vs Torch-Pruning) and MiniLM heads/FFN."""
    data, reference = cnn["data"], cnn["model"]
    rows = []
    for keep in (0.5, 0.25):
        for criterion in cnn["criteria"]:
            tools = ("nncompress", OURS_PLAIN, "torch-pruning") if criterion == "l2" else ("nncompress", "torch-pruning")
            for tool in tools if CRITERIA[criterion] else ("nncompress",):
                start = time.perf_counter()
                try:
                    pruned = (ours_prune(reference, data, criterion, keep) if tool == "nncompress"
                              else ours_prune(reference, data, criterion, keep, "none") if tool == OURS_PLAIN
                              else tp_prune(reference, data, criterion, keep, data.example_batch(1)))
                except Exception as e:  # a peer criterion that does not run here: n/a in the table
                    rows.append({"tool": tool, "criterion": criterion, "target": f"{1 / keep:.0f}x",
                                 "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                    continue
                prune_s = time.perf_counter() - start
                rows.append(measure("", tool, criterion, keep, reference, pruned, prune_s, data, args, tmp))
                print(rows[-1], flush=True)
    minilm, minilm_failed = minilm_rows(args, tmp, mini)
    minilm_base = mini[3]
    header = ["MAC target", "criterion", "tool", "acc. pruned", "acc. after FT", "params", "MACs (x fewer)",
              "file bytes", "speedup b=1", "speedup b=256", "prune time (s)"]
    lines = [header, ["---"] * len(header)]
    for r in rows:
        if "failed" in r:
            lines.append([r["target"], r["criterion"], r["tool"], f"n/a ({r['failed']})"] + ["n/a"] * 7)
            continue
        lines.append([r["target"], r["criterion"], r["tool"], f"{r['acc_pruned']:.1%}", f"{r['acc_ft']:.1%}",
                      f"{r['params']:,}", f"{r['macs']:,} ({cnn['macs'] / r['macs']:.2f}x)", f"{r['bytes']:,}",
                      f"{r['speedup_b1']:.2f}x", f"{r['speedup_b256']:.2f}x", f"{r['prune_s']:.1f}"])
    table = "\n".join("| " + " | ".join(x) + " |" for x in lines)
    body = (f"## Structured pruning vs Torch-Pruning (`make bench-prune-structured`)\n\n"
            f"MNIST-1D reference CNN: {cnn['acc']:.1%} test accuracy, {cnn['params']:,} params, {cnn['macs']:,} "
            f"MACs, {cnn['bytes']:,} bytes. Both tools: global ranking, max 90% per group, the same MAC budget "
            f"(each bisects its own ratio on the real MAC count), then {args.finetune_epochs} epochs of the same "
            f"fine-tune (AdamW, lr {args.lr}, cosine, same data order). Speedups: the unpruned model and the "
            f"pruned one timed interleaved, medians of {args.repeats}, 2 threads, torch eager on CPU."
            f"{' QUICK RUN: not the reference figures.' if args.quick else ''}\n\n"
            f"Criterion `hessian`: ours is the exact second-order loss change of zeroing each channel "
            f"(g.d + 0.5 d.Hd, one Hessian-vector product per channel, batched); Torch-Pruning's closest is "
            f"GroupHessianImportance (grouped OBD: diagonal empirical Fisher from per-sample gradients). "
            f"Both on the same {CALIB_BATCHES} calibration batches.\n\n"
            f"nncompress reconstructs by default (`reconstruct: auto`): once channels are removed, each layer "
            f"that read them is re-fit by least squares (damped towards its current weights) so that its "
            f"outputs on the calibration batches (training images, never the test split) match the unpruned "
            f"model's, layer by layer in forward order; '{OURS_PLAIN}' is the same pruning without it. "
            f"'acc. pruned' is therefore the one-shot figure, no training at all.\n\n{table}\n\n"
            f"### all-MiniLM-L6-v2: attention heads and FFN neurons, no fine-tune\n\n"
            f"The unpruned encoder: {minilm_base['params']:,} params, {minilm_base['macs']:,} MACs per sentence "
            f"(64 tokens), {minilm_base['bytes']:,} bytes. Each tool removes the same fraction of every layer's "
            f"heads and FFN neurons by L2 magnitude; the hidden (residual) width is kept. nncompress: "
            f"`PruneConfig(ratio=r, importance=\"l2\", scope=\"local\")` on the SentenceEncoder (heads are "
            f"graph groups); Torch-Pruning: MetaPruner with num_heads for q/k/v, prune_num_heads=True, "
            f"head_pruning_ratio=r, pruning_ratio=r, the hidden-width producers in ignored_layers "
            f"(their examples/transformers/prune_hf_bert.py). Ours refits each attention output and FFN "
            f"output projection on {CALIB_BATCHES} calibration batches of the sentences corpus (the Python "
            f"reference manual; '{OURS_PLAIN}': without). '{OURS_OBS}': `PruneConfig(keep_macs=m, "
            f"importance=\"obs\", scope=\"global\")` with m the MACs the uniform rows keep: each head / neuron "
            f"scored by structured Optimal Brain Surgeon on the layer that reads it (the output error left after "
            f"the other inputs compensate), ranked across layers, so widths differ layer by layer (min-max "
            f"shown), then the same refit; '{OURS_OBS_384}': the same calibrated on all 384 training sentences "
            f"instead of the 128 of the calib split. Fidelity: cosine and overlap@10 of the "
            f"embeddings of the {minilm_base['n_test']} test sentences against the unpruned model's, and cosine "
            f"on {minilm_base['n_ood']} sentences of legal text (the licence agreements shipped with Python) "
            f"that calibration never saw (out-of-domain). "
            f"Speedups interleaved with the unpruned model, medians of {args.repeats}, 2 threads."
            f"{(' Torch-Pruning on heads failed: ' + minilm_failed + '; FFN-only rows for both.') if minilm_failed else ''}"
            f"\n\n{minilm_table(minilm, minilm_base)}")
    return body, minilm


# ------------------------------------------------------------------ whole layers and kernels (prune_layers)

LAYER_COUNTS = (1, 2, 3)
LAYER_CRITERIA = (("angular", False), ("cosine", False), ("loss", False), ("angular", True))


def layer_cnn_rows(args, tmp, cnn: dict) -> tuple[list[dict], dict]:
    """group_conv G=2/4 and drop_layers on the CNN, each followed by channel pruning (l2, global) to the
    same MAC count; all with the channel rows' fine-tune."""
    data, reference = cnn["data"], cnn["model"]
    rows, notes = [], {}
    variants = [(f"group_conv G={g}", GroupConvConfig(groups=g)) for g in (2, 4)]
    variants.append(("drop_layers (1 block)", DropLayersConfig(count=1, calib_batches=args.layer_calib)))
    for method, config in variants:
        start = time.perf_counter()
        try:
            pruned = nncompress.apply(copy.deepcopy(reference).eval(), config, context=Context(data=data))
        except Exception as e:  # e.g. no removable block: n/a in the table
            rows.append({"tool": method, "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            continue
        prune_s = time.perf_counter() - start
        notes[method] = history(pruned)[-1]["record"]
        keep = count_macs(pruned, data.example_batch(1)) / cnn["macs"]
        rows.append(measure("", method, "-", keep, reference, pruned, prune_s, data, args, tmp))
        print(rows[-1], flush=True)
        start = time.perf_counter()
        peer = ours_prune(reference, data, "l2", keep)
        rows.append(measure("", "channels l2 (same MACs)", "l2", keep, reference, peer,
                            time.perf_counter() - start, data, args, tmp))
        print(rows[-1], flush=True)
    return rows, notes


def layer_minilm_rows(args, tmp, mini: tuple, heads_rows: list[dict]) -> list[dict]:
    """drop_layers on MiniLM (no fine-tune), plus our heads+FFN rows as the same-MACs reference."""
    reference, data, ref_emb, base = mini
    rows = []
    for count in args.layer_counts:
        for criterion, contiguous in LAYER_CRITERIA:
            config = DropLayersConfig(count=count, importance=criterion, contiguous=contiguous,
                                      calib_batches=args.layer_calib)
            start = time.perf_counter()
            pruned = nncompress.apply(copy.deepcopy(reference).eval(), config, context=Context(data=data))
            prune_s = time.perf_counter() - start
            name = f"{criterion}{' contiguous' if contiguous else ''}"
            row = minilm_row("drop_layers", count, name, reference, ref_emb, pruned, prune_s, data, args, tmp,
                             base["ood"])
            removed = history(pruned)[-1]["record"]["removed"]
            rows.append({**row, "removed": ", ".join(r.rpartition(".")[2] for r in removed)})
            print(rows[-1], flush=True)
    ours = [r for r in heads_rows if r["tool"] == "nncompress" and r["scope"] == "heads+FFN"]
    if not ours:  # run alone (--only layers): measure our heads+FFN rows here
        for ratio in (MINILM_RATIOS[:1] if args.quick else MINILM_RATIOS):
            start = time.perf_counter()
            pruned = minilm_ours(reference, data, ratio)
            ours.append(minilm_row("nncompress", ratio, "heads+FFN", reference, ref_emb, pruned,
                                   time.perf_counter() - start, data, args, tmp, base["ood"]))
    return rows + ours


def _row(cells: list) -> str:
    return "| " + " | ".join(cells) + " |"


def layers_section(args, tmp, cnn: dict, mini: tuple, heads_rows: list[dict]) -> str:
    """Section prune_layers: whole blocks (drop_layers) and kernels (group_conv)."""
    cnn_rows, notes = layer_cnn_rows(args, tmp, cnn)
    header = ["method", "acc. pruned", "acc. after FT", "params", "MACs (x fewer)", "file bytes", "speedup b=1",
              "speedup b=256", "prune time (s)"]
    lines = [_row(header), _row(["---"] * len(header)),
             _row(["unpruned", f"{cnn['acc']:.1%}", f"{cnn['acc']:.1%}", f"{cnn['params']:,}", f"{cnn['macs']:,}",
                   f"{cnn['bytes']:,}", "1.00x", "1.00x", "-"])]
    for r in cnn_rows:
        if "failed" in r:
            lines.append(_row([r["tool"], f"n/a ({r['failed']})"] + ["n/a"] * 7))
            continue
        lines.append(_row([r["tool"], f"{r['acc_pruned']:.1%}", f"{r['acc_ft']:.1%}", f"{r['params']:,}",
                           f"{r['macs']:,} ({cnn['macs'] / r['macs']:.2f}x)", f"{r['bytes']:,}",
                           f"{r['speedup_b1']:.2f}x", f"{r['speedup_b256']:.2f}x", f"{r['prune_s']:.1f}"]))
    skipped = notes.get("group_conv G=2", {}).get("skipped", {})
    drop = notes.get("drop_layers (1 block)", {})
    base = mini[3]
    # fewest removed MACs first; the sort is stable, so equal MACs keep the criteria order
    mrows = sorted(layer_minilm_rows(args, tmp, mini, heads_rows), key=lambda r: -r["macs"])
    mheader = ["method", "criterion", "removed", "layers", "heads/layer", "FFN width", "cosine",
               "cosine out-of-domain", "overlap@10",
               "params", "MACs (x fewer)", "file bytes", "speedup b=1", "speedup b=32", "prune time (s)"]
    mlines = [_row(mheader), _row(["---"] * len(mheader))]
    for r in mrows:
        heads = r["tool"] != "drop_layers"
        mlines.append(_row([f"heads+FFN {r['ratio']:.0%}" if heads else f"drop {r['ratio']} layers",
                            "l2" if heads else r["scope"], "-" if heads else r["removed"], str(r["layers"]),
                            str(r["heads"]), str(r["ffn"]), f"{r['cosine']:.4f}", f"{r['cosine_ood']:.4f}",
                            f"{r['overlap']:.1%}",
                            f"{r['params']:,}", f"{r['macs']:,} ({base['macs'] / r['macs']:.2f}x)",
                            f"{r['bytes']:,}", f"{r['speedup_b1']:.2f}x", f"{r['speedup_b32']:.2f}x",
                            f"{r['prune_s']:.1f}"]))
    quick = " QUICK RUN: not the reference figures." if args.quick else ""
    return (f"## Layer and kernel pruning (`make bench-prune-layers`)\n\n"
            f"Written by `benchmarks/prune_structured.py` (alone: `--only layers`). No peer tool prunes whole "
            f"layers or regroups convolutions, so the reference is our own channel/head pruning at the same "
            f"MAC count, measured in the same run.{quick}\n\n"
            f"### MNIST-1D reference CNN: grouped convolutions and a removed block\n\n"
            f"`GroupConvConfig(groups=G)` on every conv whose channel counts G divides (skipped: "
            f"{', '.join(f'`{k}` ({v})' for k, v in skipped.items()) or 'none'}): each becomes a G-way grouped "
            f"conv between channel permutations chosen to keep the most kernel L1 mass, then (reconstruct: auto, "
            f"the default) refit group by group by least squares to the dense conv's outputs on the calibration "
            f"batches, in forward order ('acc. pruned' is that one-shot figure). `DropLayersConfig("
            f"count=1)`: candidates {', '.join(f'`{c}`' for c in drop.get('candidates', [])) or 'none'} (the "
            f"other blocks change width or length, so they are not residual), removed "
            f"{', '.join(f'`{c}`' for c in drop.get('removed', [])) or 'none'}. Each is followed by nncompress "
            f"channel pruning (L2, global, max 90% per group) bisected to the same MAC count. All rows: "
            f"{args.finetune_epochs} epochs of the same fine-tune as section prune_structured; speedups "
            f"interleaved with the unpruned model, medians of {args.repeats}, 2 threads, torch eager on CPU; "
            f"a grouped conv's time includes its channel gathers (index_select before and after).\n\n"
            + "\n".join(lines) +
            f"\n\n### all-MiniLM-L6-v2: whole encoder layers vs heads+FFN, no fine-tune\n\n"
            f"`DropLayersConfig(count=n, importance=c, contiguous=..., calib_batches={args.layer_calib})`: "
            f"`angular` (arccos of the input/output cosine, Gromov et al.), `cosine` (1 - cos, "
            f"ShortGPT), `loss` (output change when the layer is skipped), `angular contiguous` (the n "
            f"consecutive layers whose first input is closest to their last output). `removed` gives the "
            f"encoder layer indices. Reference rows: nncompress heads+FFN at 25%/50% (L2, local, as in "
            f"section prune_structured). Rows sorted by MACs. Fidelity against the unpruned model on the "
            f"{base['n_test']} test sentences; unpruned: {base['params']:,} params, {base['macs']:,} MACs, "
            f"{base['bytes']:,} bytes. Speedups interleaved with the unpruned model, medians of "
            f"{args.repeats}, 2 threads.\n\n" + "\n".join(mlines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--only", choices=("all", "channels", "layers"), default="all",
                   help="channels: section prune_structured only; layers: section prune_layers only")
    p.add_argument("--quick", action="store_true",
                   help="1 epoch each, few repeats, l2 only, MiniLM at 25%% only, 2 dropped layers on 1 "
                        "calibration batch (smoke run)")
    args = p.parse_args()
    criteria = list(CRITERIA)
    args.layer_counts, args.layer_calib = LAYER_COUNTS, DropLayersConfig.calib_batches
    if args.quick:
        args.train_epochs, args.finetune_epochs, args.repeats, criteria = 1, 1, 5, ["l2"]
        args.layer_counts, args.layer_calib = (2,), 1
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        data, reference = trained_reference(tmp, args.train_epochs)
        cnn = {"data": data, "model": reference, "criteria": criteria, "acc": accuracy(reference, data.test),
               "macs": count_macs(reference, data.example_batch(1)), "params": count_params(reference),
               "bytes": checkpoint_size(reference, Path(tmp) / "ref")}
        mini = load_minilm(tmp)
        heads_rows: list[dict] = []
        if args.only in ("all", "channels"):
            body, heads_rows = channel_section(args, tmp, cnn, mini)
            update_section(args.out, "prune_structured", body)
            print(body)
        if args.only in ("all", "layers"):
            body = layers_section(args, tmp, cnn, mini, heads_rows)
            update_section(args.out, "prune_layers", body)
            print(body)


if __name__ == "__main__":
    main()
