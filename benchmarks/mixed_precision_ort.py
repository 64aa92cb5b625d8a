"""Part 2 of benchmarks/mixed_precision.py: ONNX Runtime INT8 with the most sensitive layers kept float.

Every encoder Linear's sensitivity to static W8A8 (int8 weights per channel, uint8 inputs per tensor,
min/max on the calibration sentences) is measured alone, as the relative output distortion in torch
(`quant.mixed_costs.output_distortion`, what `mixed_precision` solves on). Keeping the k most
sensitive layers float, for a ladder of k, gives QDQ models (`export_qdq_onnx`); each is run in
onnxruntime for its cosine to fp32 and timed against the fp32 ONNX session and the peers in the same
interleaved rounds. The pick is the fastest measured model with cosine >= 0.998 on the in-domain test
sentences. Peers: onnxruntime's quantize_static (QDQ, per channel, MinMax; defaults and MatMul only),
quantize_dynamic (per channel), and NNCF's post-training quantization of the ONNX model
(`nncf.quantize`, transformer preset), calibrated on the same sentences.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

import nncompress
from nncompress.core import ConfigError, Context, Targets
from nncompress.eval.latency import compare_onnx_latency
from nncompress.eval.measure import file_bytes
from nncompress.eval.metrics import embedding_fidelity
from nncompress.export.onnx import export_onnx
from nncompress.export.onnx_qdq import export_qdq_onnx
from nncompress.formats import IntFormat
from nncompress.quant import Choice, MixedPrecisionConfig, QuantizeConfig, QuantSpec
from nncompress.quant.mixed import MixedLatency
from nncompress.quant.mixed_costs import fit_wrapper, output_distortion

from quantize_int8 import ENCODER, Reader, onnx_embed, ort_peers
from quantize_lowbit import table

TARGET = 0.998
W8 = QuantSpec(format=IntFormat(bits=8))
A8 = QuantSpec(format=IntFormat(bits=8, signed=False, symmetric=False))


def sensitivities(model: nn.Module, data, batches: int) -> list[tuple[str, float]]:
    """(layer, relative output distortion with only that layer at W8A8), most sensitive first."""
    names = [n for n, _ in ENCODER.select(model)]
    options = [[fit_wrapper(model.get_submodule(n), W8, A8)] for n in names]
    d = output_distortion(model, names, options, data.calib, batches)
    return sorted(zip(names, d[:, 0].tolist()), key=lambda t: -t[1])


def static_keeping(model: nn.Module, data, keep: list[str], batches: int) -> nn.Module:
    cfg = QuantizeConfig(weight=W8, activation=A8, calib_batches=batches)
    targets = Targets(include=ENCODER.include, exclude=tuple(keep), types=ENCODER.types)
    return nncompress.apply(copy.deepcopy(model), cfg, targets=targets, context=Context(data=data)).eval()


def nncf_peer(fp32: Path, data, batches: int, out: Path) -> Path | str:
    """NNCF's PTQ of the ONNX model; the reason as a string when it cannot run."""
    try:
        import nncf
        import onnx
    except ImportError as e:
        return f"not installed ({e})"
    try:
        feeds = Reader(data.calib, batches).batches
        q = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(feeds))  # its items are batches
        onnx.save(q, str(out))
        return out
    except Exception as e:  # noqa: BLE001  (a peer's failure is a row of the report, not the end of the run)
        return f"failed: {type(e).__name__}: {str(e)[:200]}"


def ort_rows(args, model: nn.Module, tok, data, tmp: Path, write: Callable[[dict], None]) -> dict:
    from mixed_precision import encoded, legal_sentences

    ood = encoded(tok, legal_sentences(), max_length=64)
    ref = torch_embed(model, data.test)
    ref_ood = torch_embed(model, ood)
    fp32 = export_onnx(model, data.example_batch(2), tmp / "fp32.onnx")
    sens = sensitivities(model, data, args.calib_batches)
    out: dict[str, Any] = {"sens": sens, "rows": {"fp32 ONNX": {}}, "target": TARGET, "n": ref.shape[0],
                           "n_ood": ref_ood.shape[0], "searched": []}
    paths: dict[str, Path] = {"fp32 ONNX": fp32}
    ours: dict[int, tuple[Path, float]] = {}

    def point(k: int) -> float:
        """Keep the k most sensitive layers float: export, and the cosine onnxruntime gives."""
        if k not in ours:
            m = static_keeping(model, data, [n for n, _ in sens[:k]], args.calib_batches)
            path = export_qdq_onnx(m, data.example_batch(8), tmp / f"ours_keep{k}.onnx", tolerance=0.15)
            ours[k] = (path, embedding_fidelity(ref, onnx_embed(path, data.test))["cosine"])
            out["searched"].append((k, ours[k][1]))
            print("keep float", k, ours[k][1], flush=True)
        return ours[k][1]

    # the fewest float layers that reach the target (cosine rises with k, measured: bisection), then
    # the speed of that point and of its neighbours is measured, not assumed
    lo, hi = 0, len(sens)
    if point(lo) < TARGET:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if point(mid) >= TARGET else (mid, hi)
        first = hi
    else:
        first = 0
    # (k = every layer would leave nothing to quantize: the ladder stops one short)
    for k in sorted(k for k in {0, first, first + 1, first + 2} if k < len(sens)):
        point(k)
        paths[f"nncompress W8A8, {k} most sensitive float"] = ours[k][0]
        out["rows"][f"nncompress W8A8, {k} most sensitive float"] = {"ours": True, "k": k}
    for target in args.latency_targets:  # the same choice made by mixed_precision against a latency budget
        name = f"nncompress mixed_precision target_latency {target}"
        try:
            paths[name], out["rows"][name] = latency_target(model, data, target, args.calib_batches, tmp)
        except ConfigError as e:  # out of reach: said so, with the closest plan measured
            out.setdefault("unreached", []).append(f"{target}: {e}")
    paths.update(ort_peers(fp32, data, args, tmp))
    nn_peer = nncf_peer(fp32, data, args.calib_batches, tmp / "nncf.onnx")
    if isinstance(nn_peer, Path):
        paths["NNCF quantize (ONNX, transformer)"] = nn_peer
    else:
        out["nncf"] = nn_peer
    for name, p in paths.items():
        row = out["rows"].setdefault(name, {})
        row.update(cosine=embedding_fidelity(ref, onnx_embed(p, data.test))["cosine"],
                   cosine_ood=embedding_fidelity(ref_ood, onnx_embed(p, ood))["cosine"], bytes=file_bytes(p))
        print(name, row, flush=True)
    for b, x in (("1", data.example_batch(1)), ("32", data.example_batch(32))):
        lats = compare_onnx_latency(list(paths.values()), x, warmup=args.warmup, repeats=args.repeats, threads=2)
        for name, lat in zip(paths, lats):
            out["rows"][name][f"ms{b}"] = lat.median_ms
            out["rows"][name][f"x{b}"] = lats[0].median_ms / lat.median_ms
    ok = [n for n, r in out["rows"].items() if r.get("ours") and r["cosine"] >= TARGET]
    out["pick"] = max(ok, key=lambda n: out["rows"][n]["x32"]) if ok else None
    write(out)
    return out


def latency_target(model: nn.Module, data, target: str, batches: int, tmp: Path) -> tuple[Path, dict]:
    """`mixed_precision` with candidates W8A8 / float under `target_latency` in onnxruntime at batch 32,
    2 threads: the plan from the per-format table, measured and corrected in its rounds, then exported."""
    cfg = MixedPrecisionConfig(candidates=(Choice(weight=W8, activation=A8), Choice()), target_latency=target,
                               latency=MixedLatency(runtime="onnxruntime", batch=32, threads=2), calib_batches=batches)
    start = time.perf_counter()
    m = nncompress.apply(copy.deepcopy(model), cfg, targets=ENCODER,
                         context=Context(data=data, cache_dir=str(tmp / "latency_cache")))
    rec = nncompress.history(m)[-1]["record"]
    seconds = time.perf_counter() - start
    path = export_qdq_onnx(m, data.example_batch(8), tmp / f"mixed_{target}.onnx", tolerance=0.15)
    print("target_latency", target, rec["counts"], rec["rounds"], f"{seconds:.0f}s", flush=True)
    return path, {"ours": True, "target": target, "float": rec["counts"].get("float", 0), "rounds": rec["rounds"],
                  "budget_ms": rec["budget"]["limit"], "seconds": seconds}


def torch_embed(model, loader):
    from nncompress.eval.metrics import embed
    return embed(model, loader)


def render_ort(o: dict) -> str:
    rows = []
    for name, r in o["rows"].items():
        mark = " **(pick)**" if name == o.get("pick") else ""
        rows.append([name + mark, f"{r['cosine']:.4f}", f"{r['cosine_ood']:.4f}", f"{r['bytes']:,}",
                     f"{r['ms1']:.1f} ({r['x1']:.2f}x)" if "ms1" in r else "-",
                     f"{r['ms32']:.0f} ({r['x32']:.2f}x)" if "ms32" in r else "-"])
    worst = ", ".join(f"{n.removeprefix('model.encoder.')} {d:.2e}" for n, d in o["sens"][:6])
    searched = ", ".join(f"k={k}: {c:.4f}" for k, c in o.get("searched", []))
    pick = o.get("pick")
    if pick:
        r = o["rows"][pick]
        said = (f"The search's pick: {pick}, cosine {r['cosine']:.4f} at {r['x32']:.2f}x (batch 32) / "
                f"{r['x1']:.2f}x (batch 1) over fp32 ONNX.")
    else:
        said = f"No measured point of the ladder reached cosine >= {o['target']}."
    peers = [n for n, r in o["rows"].items() if not r.get("ours") and n != "fp32 ONNX"]
    reached = [n for n in peers if o["rows"][n]["cosine"] >= o["target"]]
    said += (f" Peers reaching cosine >= {o['target']}: {', '.join(reached) if reached else 'none'} "
             f"(best: {max(peers, key=lambda n: o['rows'][n]['cosine'])}, "
             f"{max(o['rows'][n]['cosine'] for n in peers):.4f})." if peers else "")
    nncf = f" NNCF: {o['nncf']}." if "nncf" in o else ""
    for line in o.get("unreached", []):
        said += f" `mixed_precision target_latency` {line}."
    for name, r in o["rows"].items():
        if "target" in r:
            rounds = "; ".join(f"{'every layer int8: ' if x.get('plan') == 'cheapest' else ''}predicted "
                               f"{x['predicted']:.1f} ms, measured {x['measured']:.1f} ms"
                               f"{'' if x['met'] else ' (missed)'}" for x in r["rounds"])
            said += (f" `mixed_precision target_latency: {r['target']}` (onnxruntime, batch 32, 2 threads; "
                     f"budget {r['budget_ms']:.1f} ms) kept {r['float']} layers float, in {r['seconds']:.0f} s; its "
                     f"rounds: {rounds}.")
    return (f"### ONNX Runtime INT8: which layers stay float\n\nStatic W8A8 of the encoder Linear layers "
            f"(int8 weights per channel, uint8 inputs per tensor, min/max), the k layers with the largest "
            f"measured W8A8 output distortion kept float, exported as QDQ and run in onnxruntime; the pick is "
            f"the fastest (batch 32) with cosine >= {o['target']} on the {o['n']} in-domain test sentences. "
            f"Cosine out-of-domain: {o['n_ood']} legal sentences. Latency: median ms per batch, interleaved "
            f"rounds, 2 threads, speedup vs the fp32 ONNX session of the same rounds; sequences of 64 tokens. "
            f"Most sensitive layers (distortion): {worst}. The search (bisection on k for the fewest float "
            f"layers reaching the target; cosine in onnxruntime): {searched}; then k and its two neighbours "
            f"are timed with the peers. The `mixed_precision target_latency` rows choose the float layers "
            f"themselves: the least summed distortion whose latency, predicted from a table of every layer alone "
            f"in fp32 and in W8A8 in onnxruntime (`eval.format_table`) and then measured on the exported "
            f"plan, fits the target.{nncf}\n\n"
            + table(["model", "cosine in-domain", "cosine out-of-domain", "bytes (.onnx)", "b=1 ms (speedup)",
                     "b=32 ms (speedup)"], rows) + "\n\n" + said)
