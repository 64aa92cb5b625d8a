"""Low-bit quantization (issue 5): W4 RTN vs GPTQ, W8A8 and MX on all-MiniLM-L6-v2; PTQ vs QAT at
W8A8..W2A8, binary/ternary, and progressive vs direct 2-bit QAT on the MNIST-1D reference CNN.

    python benchmarks/quantize_lowbit.py --out BENCHMARKS.md      (section "quantize_lowbit")

1. all-MiniLM-L6-v2, every encoder Linear (36 layers), no fine-tune: W4 weight-only with groups of
   32/64/128 along the fan-in by round to nearest (`quantize`) and by GPTQ (`gptq`); W8A8
   (`quantize` with an activation spec); MX formats (MXINT8/MXFP8/MXFP6 weights and inputs, MXFP4
   weights only and weights and inputs). Fidelity to the fp32 embeddings on the held-out sentences
   (mean cosine, overlap@10), the time of the compression step, bits per weight computed from the
   format (`bit_cost`, 16-bit scales), and bytes on disk measured from `nncompress.save`: of the
   quantized layers' tensors and of the whole file (the 11.7M-parameter word embedding is not a
   Linear and stays fp32). Every saved model is reloaded with `nncompress.load` and checked to give
   the same outputs bit for bit.
2. The MNIST-1D reference CNN (BatchNorm folded first; every Conv/Linear, first and last included):
   PTQ and QAT (the same epochs for every QAT row) at W8A8, W4A8, W4A4, W2A8, binary and ternary
   weights with 8-bit inputs; then direct QAT at W2A8 vs the progressive schedule 8 -> 4 -> 2 bits
   with the same total epochs (seed 002 reports progressive helps), over several seeds.
Each phase rewrites the section when it ends, so an interrupted run leaves what it measured.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))

from common import trained_reference, update_section  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import Context, Targets  # noqa: E402
from nncompress.eval.measure import file_bytes  # noqa: E402
from nncompress.eval.metrics import accuracy, embed, embedding_fidelity  # noqa: E402
from nncompress.export.checkpoint import write_checkpoint  # noqa: E402
from nncompress.formats import (MXFP4, MXFP6, MXFP8, MXINT8, BinaryFormat, IntFormat,  # noqa: E402
                                PerChannel, PerGroup, TernaryFormat)
from nncompress.quant import GPTQConfig, QATConfig, QuantizeConfig, QuantSpec  # noqa: E402
from nncompress.zoo.loaders import build_data, build_model  # noqa: E402

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
LM_TARGETS = Targets(include=("*encoder*",), types=(nn.Linear,))


# ------------------------------------------------------------------------------------ measuring

def _header(path: Path) -> dict[str, Any]:
    """The safetensors header of a checkpoint (a folder: its weights file)."""
    path = path / "model.safetensors" if path.is_dir() else path
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def tensor_bytes(path: Path) -> dict[str, int]:
    """{tensor key: bytes} from a safetensors file's header (no tensor is read)."""
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in _header(path).items() if k != "__metadata__"}


def weight_codecs(path: Path, layers: list[str]) -> str:
    """How the checkpoint stored the weights of `layers` (its per-tensor codecs, e.g. int_codes)."""
    codecs = json.loads(_header(path)["__metadata__"]["codecs"])
    names = {f"{n}.weight" for n in layers} | {f"{n}.base.weight" for n in layers}
    return "+".join(sorted({c["codec"] for k, c in codecs.items() if k in names}))


def layer_bytes(path: Path, layers: list[str]) -> int:
    """Bytes of every stored tensor under the modules `layers` (weights, biases, scales, codes)."""
    prefixes = tuple(f"{n}." for n in layers)
    return sum(b for k, b in tensor_bytes(path).items() if k.startswith(prefixes))


def bits_per_weight(layers: dict[str, nn.Module], spec: QuantSpec) -> float:
    """Mean storage bits per weight of `layers` under `spec` (the format's `bit_cost`: elements plus
    16-bit scales, zero points and shared exponents amortised), weighted by the layers' sizes."""
    spec = spec.resolved("weight")
    total = bits = 0.0
    for m in layers.values():
        shape = tuple(m.weight.flatten(1).shape)      # (O, I * k): the view quantizers work on
        n = m.weight.numel()
        bits += n * spec.format.bit_cost(shape, spec.granularity)
        total += n
    return bits / total


def saved(model: nn.Module, where: Path, check: Callable[[nn.Module], torch.Tensor]) -> tuple[Path, bool]:
    """`nncompress.save` the model, reload it and say whether the outputs are bit for bit the same."""
    path = nncompress.save(model, where)
    with torch.no_grad():
        same = torch.equal(check(model), check(nncompress.load(path)))
    return path, same  # the folder: weights + manifest, every byte load needs


def dense_bytes(model: nn.Module, where: Path) -> Path:
    """The fp32 file as torch users get it: every tensor dense (no compact codecs)."""
    return write_checkpoint(model, where, {"name": "-"}, [], compress=False) / "model.safetensors"


def timed(fn: Callable[[], nn.Module]) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    out = fn()
    return out.eval(), time.perf_counter() - start


# ------------------------------------------------------------------------------------ MiniLM

def w4(g: int) -> QuantSpec:
    return QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=g))


def lm_configs(groups: tuple[int, ...], calib: int) -> list[tuple[str, str, Any]]:
    """(method, format label, config) of every MiniLM row."""
    a8 = QuantSpec(format=IntFormat(bits=8, symmetric=False), observer="percentile",
                   observer_args={"percentile": 99.99})
    rows: list[tuple[str, str, Any]] = []
    for g in groups:
        rows.append(("RTN", f"W4 g{g}", QuantizeConfig(weight=w4(g))))
        rows.append(("GPTQ", f"W4 g{g}", GPTQConfig(weight=w4(g), calib_batches=calib)))
    a8_minmax = QuantSpec(format=IntFormat(bits=8, symmetric=False), observer="minmax")
    for obs, act in (("percentile 99.99", a8), ("minmax", a8_minmax)):
        rows.append(("RTN", f"W8A8, inputs {obs}",
                     QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=8)), activation=act, calib_batches=calib)))
    for name, fmt in (("MXINT8", MXINT8), ("MXFP8", MXFP8), ("MXFP6", MXFP6), ("MXFP4", MXFP4)):
        rows.append(("MX", f"{name} W+A", QuantizeConfig(weight=QuantSpec(format=fmt), activation=QuantSpec(format=fmt),
                                                           calib_batches=calib)))
    rows.append(("MX", "MXFP4 W only", QuantizeConfig(weight=QuantSpec(format=MXFP4))))
    return rows


def minilm_rows(args, tmp: Path, write: Callable[[dict], None]) -> dict:
    model, tok = build_model({"name": "hf:minilm"})
    model.eval()
    data = build_data({"name": "sentences"}, tokenizer=tok)
    ref = embed(model, data.test)
    probe = next(iter(data.test))
    check = lambda m: m(**probe)  # noqa: E731
    targets = Targets(include=("*encoder.layer.0.*",), types=(nn.Linear,)) if args.quick else LM_TARGETS
    layers = {n: m for n, m in targets.select(model) if type(m) is nn.Linear}
    fp32 = dense_bytes(model, tmp / "lm-fp32")
    out = {"n": ref.shape[0], "layers": len(layers), "file": file_bytes(fp32),
           "layer_bytes": layer_bytes(fp32, list(layers)), "rows": []}
    for method, label, cfg in lm_configs(args.groups, args.calib_batches):
        if args.quick and label.startswith(("MXINT8", "MXFP8", "MXFP6", "MXFP4 W+A")):
            continue
        m, seconds = timed(lambda cfg=cfg: nncompress.apply(copy.deepcopy(model), cfg, targets=targets,
                                                           context=Context(data=data)))
        fid = embedding_fidelity(ref, embed(m, data.test), k=10)
        path, same = saved(m, tmp / f"lm-{method}-{label}".replace(" ", "_"), check)
        row = {"method": method, "format": label, "s": seconds, **fid, "bits": bits_per_weight(layers, cfg.weight),
               "layer_bytes": layer_bytes(path, list(layers)), "file": file_bytes(path), "reload": same,
               "codec": weight_codecs(path, list(layers))}
        out["rows"].append(row)
        print(row, flush=True)
        write(out)
    if not args.quick:  # the whole model: every Linear and the embedding tables at W4 g128 too
        whole = Targets(types=(nn.Linear, nn.Embedding))
        for method, cfg in (("RTN", QuantizeConfig(weight=w4(128))),
                            ("GPTQ", GPTQConfig(weight=w4(128), calib_batches=args.calib_batches))):
            m, seconds = timed(lambda cfg=cfg: nncompress.apply(copy.deepcopy(model), cfg, targets=whole,
                                                               context=Context(data=data)))
            fid = embedding_fidelity(ref, embed(m, data.test), k=10)
            path, same = saved(m, tmp / f"lm-whole-{method}", check)
            row = {"method": method, "format": "W4 g128, all Linear + embeddings", "s": seconds, **fid,
                   "bits": bits_per_weight(layers, cfg.weight), "layer_bytes": layer_bytes(path, list(layers)),
                   "file": file_bytes(path), "reload": same, "codec": weight_codecs(path, list(layers)),
                   "whole": True}
            out["rows"].append(row)
            print(row, flush=True)
            write(out)
    return out


# ------------------------------------------------------------------------------------ the CNN

def cnn_specs() -> list[tuple[str, QuantSpec, QuantSpec]]:
    """(label, weight spec, activation spec): per-channel weights (MSE range), per-tensor
    asymmetric inputs (the stem's input is signed, the others post-ReLU)."""
    def w(b: int) -> QuantSpec:
        return QuantSpec(format=IntFormat(bits=b), observer="mse")
    a8 = QuantSpec(format=IntFormat(bits=8, symmetric=False), observer="mse")
    a4 = QuantSpec(format=IntFormat(bits=4, symmetric=False), observer="mse")
    per_channel = PerChannel(axis=0)  # one alpha per output channel (XNOR-Net style)
    return [("W8A8", w(8), a8), ("W4A8", w(4), a8), ("W4A4", w(4), a4), ("W2A8", w(2), a8),
            ("binary W, A8", QuantSpec(format=BinaryFormat(), granularity=per_channel), a8),
            ("ternary W, A8", QuantSpec(format=TernaryFormat(), granularity=per_channel), a8)]


def qat_weight(w: QuantSpec) -> QuantSpec:
    """QAT learns integer weight steps (LSQ, initialised from the PTQ spec's MSE range); binary and
    ternary refit their alpha from the weights at every forward."""
    return dataclasses.replace(w, method="lsq") if isinstance(w.format, IntFormat) else w


def qat_activation(a: QuantSpec) -> QuantSpec:
    """QAT keeps observing inputs while training: an exponential moving average of min/max."""
    return QuantSpec(format=a.format, observer="moving_average_minmax")


def qat_config(args, weight: QuantSpec, act: QuantSpec, schedule: tuple[int, ...] = ()) -> QATConfig:
    """The same budget for every QAT row: `qat_epochs` in all; a schedule splits them between widths."""
    stages = max(len(schedule), 1)
    return QATConfig(weight=qat_weight(weight), activation=qat_activation(act), bits_schedule=schedule, fold_bn=True,
                     epochs=args.qat_epochs // stages, lr=args.qat_lr,
                     max_steps=args.qat_steps // stages if args.qat_steps else 0, calib_batches=args.calib_batches)


def cnn_row(reference, data, cfg, tmp: Path, name: str, layers, weight: QuantSpec, seed: int = 0) -> dict:
    torch.manual_seed(seed)  # the data order of QAT
    ctx = Context(data=data, teacher=reference)
    m, seconds = timed(lambda: nncompress.apply(copy.deepcopy(reference), cfg, context=ctx))
    x = next(iter(data.test))[0]
    path, same = saved(m, tmp / name, lambda mm: mm(x))
    return {"acc": accuracy(m, data.test), "s": seconds, "bits": bits_per_weight(layers, weight),
            "file": file_bytes(path), "codec": weight_codecs(path, list(layers)), "reload": same}


def cnn_rows(reference, data, args, tmp: Path, write: Callable[[dict], None]) -> dict:
    layers = {n: m for n, m in reference.named_modules() if type(m) in QUANTIZABLE}
    out: dict[str, Any] = {"ptq": [], "qat": [], "prog": []}
    for label, w, a in cnn_specs():
        if args.quick and label not in ("W2A8", "ternary W, A8"):
            continue
        for kind in ("PTQ", "QAT"):
            cfg = (QuantizeConfig(weight=w, activation=a, fold_bn=True, calib_batches=args.calib_batches)
                   if kind == "PTQ" else qat_config(args, w, a))
            row = {"spec": label, **cnn_row(reference, data, cfg, tmp, f"{kind}-{label}".replace(" ", "_"),
                                            layers, w)}
            out[kind.lower()].append(row)
            print(kind, row, flush=True)
            write(out)
    w2, a8 = cnn_specs()[3][1:]
    for seed in range(args.seeds):
        for sched in ((), (8, 4, 2)):
            done = [r for r in out["qat"] if r["spec"] == "W2A8"]
            if seed == 0 and not sched and done:  # the W2A8 QAT row above: same config, same seed
                out["prog"].append({"seed": 0, "schedule": (), **{k: v for k, v in done[0].items() if k != "spec"}})
                continue
            row = {"seed": seed, "schedule": sched,
                   **cnn_row(reference, data, qat_config(args, w2, a8, sched), tmp, f"prog-{seed}-{len(sched)}",
                             layers, w2, seed)}
            out["prog"].append(row)
            print("progressive" if sched else "direct", row, flush=True)
            write(out)
    return out


# ------------------------------------------------------------------------------------ the report

def table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header)] + rows
    return "\n".join("| " + " | ".join(x) + " |" for x in lines)


def _ratio(b: int, ref: int) -> str:
    return f"{b:,} ({b / ref:.3f}x)"


def render_lm(lm: dict) -> str:
    rows = [["fp32", "-", "-", "1.0000", "1.000", "32", "dense", _ratio(lm["layer_bytes"], lm["layer_bytes"]),
             _ratio(lm["file"], lm["file"]), "-"]]
    for r in lm["rows"]:
        rows.append([r["method"], r["format"], f"{r['s']:.1f}", f"{r['cosine']:.4f}", f"{r['overlap_at_k']:.3f}",
                     f"{r['bits']:.3f}", r["codec"], _ratio(r["layer_bytes"], lm["layer_bytes"]),
                     _ratio(r["file"], lm["file"]), "yes" if r["reload"] else "NO"])
    return (f"### all-MiniLM-L6-v2, no fine-tune\n\nThe {lm['layers']} encoder Linear layers quantized; "
            f"weights per output channel (W8) or per group along the fan-in (W4), symmetric, min/max range; "
            f"W8A8 inputs per tensor, asymmetric. Fidelity to the fp32 embeddings of the {lm['n']} held-out sentences (mean cosine, overlap of the "
            f"10 nearest neighbours). Time: the whole `apply` call (calibration and, for GPTQ, the Hessians "
            f"and the sweep). Bits/weight are *computed* from the format (`bit_cost`: elements plus a 16-bit "
            f"scale per group, 8-bit shared exponent per MX block of 32). Bytes are *measured* on the file "
            f"`nncompress.save` writes: 'layers' sums the quantized layers' tensors (weights, biases, scales), "
            f"'file' is the whole safetensors file (the word embedding holds 11.7M of the 22.7M parameters: "
            f"it stays fp32 except in the 'all Linear + embeddings' rows, which quantize every Linear and the "
            f"embedding tables per row group). 'Weights stored as' is the checkpoint's codec for those weights: "
            f"`int_codes` = bit-packed integer codes; MX weights have no packed storage (`dense`: the float "
            f"master weights are kept), so their measured bytes are fp32's and only the computed bits say "
            f"what MX storage would take. 'reload': `nncompress.load` gives the same outputs bit for bit.\n\n"
            + table(["method", "format", "time (s)", "cosine", "overlap@10", "bits/weight (computed)",
                     "weights stored as", "bytes, layers (measured)", "bytes, file (measured)", "reload"], rows))


def render_cnn(args, base: dict, cnn: dict) -> str:
    rows = [["fp32", "-", f"{base['acc']:.1%}", "-", "32", "dense", _ratio(base["file"], base["file"]), "-", "-"]]
    for p, q in zip(cnn["ptq"], cnn["qat"] + [None] * len(cnn["ptq"])):
        for kind, r in (("PTQ", p), (f"QAT {args.qat_epochs} ep", q)):
            if r is not None:
                rows.append([r["spec"], kind, f"{r['acc']:.1%}", f"{r['acc'] - base['acc']:+.1%}", f"{r['bits']:.2f}",
                             r["codec"], _ratio(r["file"], base["file"]), f"{r['s']:.1f}",
                             "yes" if r["reload"] else "NO"])
    steps = f", capped at {args.qat_steps} optimizer steps" if args.qat_steps else ""
    return (f"### MNIST-1D reference CNN: PTQ vs QAT\n\nReference trained {args.train_epochs} epochs: "
            f"{base['acc']:.1%} on the {base['n']:,} test samples (one sample = {1 / base['n']:.1%}; one seed). "
            f"BatchNorm folded, then every Conv/Linear quantized, first and last included. Weights per output "
            f"channel (integers: symmetric, MSE-chosen range; binary: sign x mean|w|; ternary: TWN), inputs per "
            f"tensor, asymmetric 8 or 4 bit (PTQ: MSE range on {args.calib_batches} calibration batches; QAT: "
            f"moving-average min/max while training). QAT learns integer weight steps (LSQ, started from "
            f"the MSE range); binary/ternary alphas are refitted from the weights at every forward. QAT: "
            f"{args.qat_epochs} epochs{steps} for every row, AdamW lr {args.qat_lr} cosine, cross-entropy, "
            f"straight-through rounding; its time is the whole training. Bits/weight are computed from the "
            f"format; file bytes are measured on what `nncompress.save` writes, vs the dense fp32 file. "
            f"'Weights stored as' is the checkpoint's codec: `int_codes` = bit-packed integer codes with their "
            f"scales (QAT's `convert` keeps the learned step as a frozen scale, so QAT weights pack too; a "
            f"layer whose codes cannot reproduce its forward exactly falls back to the generic exact codecs, "
            f"`codebook` or `dense`).\n\n"
            + table(["weights / inputs", "method", "accuracy", "vs fp32", "bits/weight (computed)",
                     "weights stored as", "file bytes (measured)", "time (s)", "reload"], rows))


def render_prog(args, base: dict, cnn: dict) -> str:
    if not cnn["prog"]:
        return ""
    per = args.qat_epochs // 3
    by = {k: [r["acc"] for r in cnn["prog"] if bool(r["schedule"]) == k] for k in (False, True)}
    rows = [[str(r["seed"]), "8 -> 4 -> 2 bits" if r["schedule"] else "2 bits", f"{r['acc']:.1%}",
             f"{r['acc'] - base['acc']:+.1%}", f"{r['s']:.1f}"] for r in cnn["prog"]]
    for k, label in ((False, "2 bits"), (True, "8 -> 4 -> 2 bits")):
        if by[k]:
            sd = statistics.stdev(by[k]) if len(by[k]) > 1 else 0.0
            rows.append(["mean", label, f"{statistics.mean(by[k]):.1%} +/- {sd:.1%}",
                         f"{statistics.mean(by[k]) - base['acc']:+.1%}", "-"])
    return (f"### W2A8 QAT: progressive vs direct\n\nThe same total budget: direct QAT trains "
            f"{args.qat_epochs} epochs at 2 bits; progressive (`bits_schedule: [8, 4, 2]`) trains {per} "
            f"epoch(s) at each width (a fresh optimizer and cosine schedule per width). Seeds change the data "
            f"order; +/- is the sample standard deviation over seeds.\n\n"
            + table(["seed", "schedule", "accuracy", "vs fp32", "time (s)"], rows))


def verdict(lm: dict | None, base: dict | None, cnn: dict | None) -> str:
    """The paragraph under the tables, from the figures."""
    parts = []
    if lm:
        w4 = [r for r in lm["rows"] if r["format"].startswith("W4") and not r.get("whole")]
        whole = [r for r in lm["rows"] if r.get("whole")]
        for r in whole:
            met = r["cosine"] >= 0.98 and r["file"] <= 0.17 * lm["file"]
            parts.append(f"Whole model at W4 g128 ({r['method']}, embeddings included): file "
                         f"{r['file'] / lm['file']:.3f}x of fp32 at cosine {r['cosine']:.4f}: the W4 target "
                         f"(<= 0.17x, >= 0.98) is {'met' if met else 'not met'} for the whole file.")
        ok = [r for r in w4 if r["cosine"] >= 0.98 and r["layer_bytes"] <= 0.17 * lm["layer_bytes"]]
        best = max(w4, key=lambda r: r["cosine"])
        if ok:
            r = min(ok, key=lambda r: r["layer_bytes"])
            parts.append(f"Target W4 at <= 0.17x of fp32 bytes with fidelity >= 0.98: met for the quantized "
                         f"layers by {len(ok)} of {len(w4)} W4 rows (smallest: {r['method']} {r['format']}, "
                         f"{r['layer_bytes'] / lm['layer_bytes']:.3f}x, cosine {r['cosine']:.4f}); for the whole "
                         f"file of those rows it is not ({r['file'] / lm['file']:.2f}x): their word embedding stays fp32.")
        else:
            parts.append(f"Target W4 at <= 0.17x bytes with fidelity >= 0.98: not met (best W4 cosine "
                         f"{best['cosine']:.4f}, {best['method']} {best['format']}).")
        pairs = [(r, g) for r in w4 if r["method"] == "RTN" for g in w4
                 if g["method"] == "GPTQ" and g["format"] == r["format"]]
        if pairs:
            wins = sum(g["cosine"] > r["cosine"] for r, g in pairs)
            detail = ", ".join(f"{r['format']}: {r['cosine']:.4f} vs {g['cosine']:.4f}" for r, g in pairs)
            parts.append(f"GPTQ beat RTN in cosine at {wins} of {len(pairs)} group sizes ({detail}).")
    if cnn and cnn["qat"]:
        gains = [f"{q['spec']} {q['acc'] - p['acc']:+.1%}" for p, q in zip(cnn["ptq"], cnn["qat"])]
        parts.append(f"On the CNN, QAT minus PTQ accuracy: {', '.join(gains)}.")
    if cnn and cnn["prog"]:
        d = [r["acc"] for r in cnn["prog"] if not r["schedule"]]
        p = [r["acc"] for r in cnn["prog"] if r["schedule"]]
        if d and p:
            diff = statistics.mean(p) - statistics.mean(d)
            spread = max(statistics.stdev(d) if len(d) > 1 else 0, statistics.stdev(p) if len(p) > 1 else 0)
            said = ("beat" if diff > 0 else "did not beat") + " direct 2-bit QAT"
            noise = (" (one seed: no spread measured)" if len(d) < 2 else
                     " (within the seed-to-seed spread)" if abs(diff) <= spread else "")
            parts.append(f"Progressive 8 -> 4 -> 2 {said} here at equal epochs: {diff:+.1%} mean over {len(d)} "
                         f"seed(s){noise}; seed 002's claim is for long ImageNet schedules, not this budget.")
    return "### What the figures show\n\n" + " ".join(parts) if parts else ""


def render(args, lm, base, cnn) -> str:
    quick = " QUICK RUN: not the reference figures." if args.quick else ""
    head = (f"## Low-bit quantization (`make bench-quantize-lowbit`)\n\nCPU, "
            f"{torch.get_num_threads()} threads, torch eager, one run.{quick}")
    parts = [head]
    if lm:
        parts.append(render_lm(lm))
    if cnn:
        parts.append(render_cnn(args, base, cnn))
        parts.append(render_prog(args, base, cnn))
    parts.append(verdict(lm, base, cnn))
    return "\n\n".join(p for p in parts if p)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--train-epochs", type=int, default=10, help="the reference CNN's training")
    p.add_argument("--qat-epochs", type=int, default=3, help="every QAT row (a multiple of 3: progressive splits it)")
    p.add_argument("--qat-lr", type=float, default=1e-3)
    p.add_argument("--qat-steps", type=int, default=0, help="optimizer-step cap of every QAT row (0: none)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the progressive vs direct comparison")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--skip-cnn", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny budgets, a few rows of each kind (smoke run)")
    args = p.parse_args()
    args.groups = (32, 64, 128)
    if args.quick:
        args.train_epochs, args.qat_epochs, args.qat_steps, args.seeds, args.calib_batches = 1, 3, 6, 1, 2
        args.groups = (128,)
    if args.qat_epochs % 3:
        p.error("--qat-epochs must be a multiple of 3 (the progressive schedule splits it over 8, 4, 2 bits)")
    torch.set_num_threads(2)
    state: dict[str, Any] = {"lm": None, "base": None, "cnn": None}

    def write(key: str) -> Callable[[dict], None]:
        def fn(value: dict) -> None:
            state[key] = value
            update_section(args.out, "quantize_lowbit", render(args, **state))
        return fn

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_cnn:
            data, reference = trained_reference(tmp, args.train_epochs)
            state["base"] = {"acc": accuracy(reference, data.test), "n": sum(len(y) for _, y in data.test),
                             "file": file_bytes(dense_bytes(reference, tmp / "cnn-fp32"))}
            print(state["base"], flush=True)
            cnn_rows(reference, data, args, tmp, write("cnn"))
        if not args.skip_minilm:
            minilm_rows(args, tmp, write("lm"))
    print(render(args, **state))


if __name__ == "__main__":
    main()
