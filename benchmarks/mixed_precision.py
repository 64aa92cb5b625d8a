"""Mixed precision under a budget (issue 11 part 3) on all-MiniLM-L6-v2, against uniform formats.

    python benchmarks/mixed_precision.py --out BENCHMARKS.md      (section "mixed_precision";
                                                                   or: make bench-mixed-precision)

1. File budget. Every Linear and the embedding tables (the word embedding is half the parameters: a
   file 6x smaller than fp32 cannot keep it fp32) take W4 g128, W8 (per channel) or stay float, chosen
   by `mixed_precision` (measured output distortion of each layer in each format on the calibration
   sentences, exact 0/1 programme, HiGHS) so that every file of the saved checkpoint (weights +
   manifest) is at most 1/6 (and 1/7) of the dense fp32 file; against uniform W4 g128 and uniform W8
   on the same layers. Fidelity: mean cosine to the fp32 embeddings on the held-out sentences of the
   calibration corpus (the Python reference manual) and on text from a domain the calibration never
   saw (the licence agreements shipped with Python: legal prose). Bytes are measured on the folders
   `nncompress.save` writes; every saved model is reloaded and checked bit for bit.
2. ONNX Runtime INT8 (`--skip-ort` to leave out): which encoder Linear layers stay float so that the
   int8 model keeps cosine >= 0.998 to fp32, at the best measured speedup (see `ort_rows`).
Each part rewrites the section when it ends, so an interrupted run leaves what it measured.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))

from common import update_section  # noqa: E402
from quantize_lowbit import dense_bytes, saved, table, w4  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import Context, Targets, history  # noqa: E402
from nncompress.eval.measure import file_bytes  # noqa: E402
from nncompress.eval.metrics import embed, embedding_fidelity  # noqa: E402
from nncompress.export.checkpoint import checkpoint_bytes  # noqa: E402
from nncompress.formats import IntFormat  # noqa: E402
from nncompress.quant import Choice, GPTQConfig, MixedPrecisionConfig, QuantizeConfig, QuantSpec  # noqa: E402
from nncompress.zoo.loaders import build_data, build_model  # noqa: E402

WHOLE = Targets(types=(nn.Linear, nn.Embedding))
W8 = QuantSpec(format=IntFormat(bits=8))


# ------------------------------------------------------------------------------------ data

def legal_sentences() -> list[str]:
    """Sentences of the licence agreements shipped with the interpreter (`LICENSE.txt` of the stdlib):
    legal prose, a domain the calibration corpus (the reference manual) does not cover."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        joined = " ".join(line.strip() for line in para.split("\n"))
        for s in re.split(r"(?<=[.!?;])\s+(?=[A-Z0-9])", joined):
            s = s.strip()
            if 30 <= len(s) <= 400 and sum(c.isalpha() or c == " " for c in s) / len(s) >= 0.85 and s not in out:
                out.append(s)
    return out


def encoded(tok, texts: list[str], batch: int = 32, max_length: int = 64) -> list[dict[str, torch.Tensor]]:
    enc = tok(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return [{k: enc[k][i:i + batch].long() for k in ("input_ids", "attention_mask")}
            for i in range(0, len(texts), batch)]


# ------------------------------------------------------------------------------------ part 1: file budget

def folder_bytes(path: Path) -> int:
    return checkpoint_bytes(path)["total"]


def candidates(method: str = "rtn") -> tuple[Choice, ...]:
    """W4 g128 (rounded to nearest, or by GPTQ), W8 per channel, float."""
    return (Choice(weight=w4(128), method=method), Choice(weight=W8), Choice())


def size_rows(args, model, tok, data, tmp: Path, write: Callable[[dict], None]) -> dict:
    ood = encoded(tok, legal_sentences())  # 64 tokens, as the calibration sentences (longer ones truncated)
    ref, ref_ood = embed(model, data.test), embed(model, ood)
    probe = next(iter(data.test))
    check = lambda m: m(**probe)  # noqa: E731
    fp32 = file_bytes(dense_bytes(model, tmp / "fp32"))
    out: dict[str, Any] = {"fp32": fp32, "n": ref.shape[0], "n_ood": ref_ood.shape[0], "rows": [],
                           "layers": sum(1 for _ in WHOLE.select(model))}

    def row(label: str, fn: Callable[[], nn.Module], **extra: Any) -> None:
        start = time.perf_counter()
        m = fn().eval()
        seconds = time.perf_counter() - start
        path, same = saved(m, tmp / label.replace(" ", "_").replace("/", "_"), check)
        r = {"method": label, "s": seconds, "file": folder_bytes(path), "reload": same,
             "cosine": embedding_fidelity(ref, embed(m, data.test), k=10)["cosine"],
             "cosine_ood": embedding_fidelity(ref_ood, embed(m, ood), k=10)["cosine"], **extra}
        rec = history(m)[-1]["record"]
        if "counts" in rec:
            r["counts"] = rec["counts"]
            r["floats"] = [n for n, c in rec["plan"].items() if c == "float"]
            r["rounds"] = len(rec["rounds"])
        out["rows"].append(r)
        print({k: v for k, v in r.items() if k != "floats"}, flush=True)
        write(out)

    for label, spec in (("uniform W4 g128", w4(128)), ("uniform W8", W8)):
        row(label, lambda spec=spec: nncompress.apply(copy.deepcopy(model), QuantizeConfig(weight=spec),
                                                      targets=WHOLE, context=Context(data=data)))
    gptq = GPTQConfig(weight=w4(128), calib_batches=args.calib_batches)  # embeddings: round to nearest
    row("uniform W4 g128 GPTQ", lambda: nncompress.apply(copy.deepcopy(model), gptq, targets=WHOLE,
                                                         context=Context(data=data)))
    kinds = ("distortion", "fisher") if args.sensitivity == "both" else (args.sensitivity,)
    runs = [(kind, "rtn") for kind in kinds] + [("distortion", "gptq")]
    for ratio in args.ratios:
        budget = int(fp32 / ratio)
        for kind, method in runs:
            cfg = MixedPrecisionConfig(candidates=candidates(method), max_bytes=budget,
                                       calib_batches=args.calib_batches, sensitivity=kind)
            name = f"mixed ({kind})" if method == "rtn" else "mixed (distortion, W4 by GPTQ)"
            row(f"{name}, file <= fp32/{ratio:g}",
                lambda cfg=cfg: nncompress.apply(copy.deepcopy(model), cfg, targets=WHOLE, context=Context(data=data)),
                budget=budget)
    return out


def render_size(args, s: dict) -> str:
    rows = [["fp32 (dense file)", "-", f"{s['fp32']:,}", "1.00x", "1.0000", "1.0000", "-", "-"]]
    for r in s["rows"]:
        picked = ", ".join(f"{k} x{v}" for k, v in r.get("counts", {}).items()) or "-"
        if r.get("floats"):
            picked += f" (float: {', '.join(n.replace('model.', '') for n in r['floats'])})"
        rows.append([r["method"], f"{r['budget']:,}" if "budget" in r else "-", f"{r['file']:,}",
                     f"{s['fp32'] / r['file']:.2f}x", f"{r['cosine']:.4f}", f"{r['cosine_ood']:.4f}",
                     picked, f"{r['s']:.0f}" + ("" if r["reload"] else " (reload NOT exact)")])
    return (f"### File budget: MiniLM, every Linear and embedding table\n\n{s['layers']} layers (every Linear, "
            f"the pooler included, and the three embedding tables). Candidates W4 g128 (symmetric, groups of "
            f"128 along the fan-in), W8 (per output channel) or float; `mixed_precision` measures each "
            f"layer's output distortion in each format on {args.calib_batches} calibration batch(es) of the "
            f"sentences corpus ('distortion': measured, one layer at a time; 'fisher': predicted from the "
            f"diagonal output Fisher and each format's weight error, no quantized forward) and solves the 0/1 "
            f"programme exactly (scipy `milp`); 'W4 by GPTQ': the W4 candidate is rounded by GPTQ (each layer's "
            f"Hessian from the float model on the same calibration batches, its distortion measured as GPTQ "
            f"leaves it; embeddings have no Hessian and round to nearest), as is 'uniform W4 g128 GPTQ'. The "
            f"budget being every byte of the saved folder (weights + manifest), checked by saving. 'file' "
            f"is every file `nncompress.save` wrote, against the dense fp32 safetensors file. Cosine: mean "
            f"to the fp32 embeddings on the {s['n']} held-out sentences of the calibration corpus "
            f"(in-domain) and on {s['n_ood']} sentences of legal text never seen in calibration "
            f"(out-of-domain). Time: the whole `apply` (sensitivity, solving, the trial saves). Every saved "
            f"model reloads bit for bit unless the last column says otherwise.\n\n"
            + table(["method", "budget (bytes)", "file (bytes)", "smaller than fp32", "cosine in-domain",
                     "cosine out-of-domain", "plan: layers per format", "time (s)"], rows))


def verdict(s: dict | None) -> str:
    if not s:
        return ""
    by = {r["method"]: r for r in s["rows"]}
    parts = []
    for r in s["rows"]:
        if not r["method"].startswith("mixed"):
            continue
        ratio = s["fp32"] / r["file"]
        line = (f"{r['method']}: {ratio:.2f}x smaller than fp32 (the budget {'held' if r['file'] <= r['budget'] else 'BROKEN'}"
                f" on disk), cosine {r['cosine']:.4f} in-domain / {r['cosine_ood']:.4f} out-of-domain")
        parts.append(line + ".")
    for name in ("uniform W4 g128", "uniform W4 g128 GPTQ", "uniform W8"):
        if name in by:
            u = by[name]
            parts.append(f"{name}: {s['fp32'] / u['file']:.2f}x, cosine {u['cosine']:.4f} / {u['cosine_ood']:.4f}.")
    g = by.get("uniform W4 g128 GPTQ")
    rtn7 = [r for r in s["rows"] if r["method"].startswith("mixed (distortion)") and s["fp32"] / r["file"] >= 7]
    g7 = [r for r in s["rows"] if "GPTQ" in r["method"] and r["method"].startswith("mixed") and s["fp32"] / r["file"] >= 7]
    if g and g7:
        parts.append(f"At 7x, mixed precision with GPTQ as the W4 rounding keeps cosine {g7[0]['cosine']:.4f} / "
                     f"{g7[0]['cosine_ood']:.4f}, against {rtn7[0]['cosine']:.4f} for mixed with round-to-nearest "
                     f"and {g['cosine']:.4f} for uniform W4 GPTQ ({s['fp32'] / g['file']:.2f}x)." if rtn7 else "")
    mixed = [r for r in s["rows"] if r["method"].startswith("mixed")]
    if mixed and "uniform W4 g128" in by:
        w4r = by["uniform W4 g128"]
        better = all(r["cosine"] > w4r["cosine"] and r["cosine_ood"] > w4r["cosine_ood"] for r in mixed)
        parts.append(f"Every mixed plan {'beat' if better else 'did not always beat'} uniform W4 g128 in cosine, in "
                     f"and out of domain (it spends the bytes W4 saves below the budget on the most sensitive "
                     f"layers); the out-of-domain cosine checks that a plan chosen on the calibration corpus "
                     f"did not overfit it.")
    return "### What the figures show\n\n" + " ".join(parts) if parts else ""


# ------------------------------------------------------------------------------------ the report

def render(args, size: dict | None, ort: dict | None) -> str:
    quick = " QUICK RUN: not the reference figures." if args.quick else ""
    parts = [f"## Mixed precision under a budget (`make bench-mixed-precision`)\n\nCPU, "
             f"{torch.get_num_threads()} threads, torch eager, one run.{quick}"]
    if size:
        parts.append(render_size(args, size))
    if ort is not None:
        from mixed_precision_ort import render_ort
        parts.append(render_ort(ort))
    elif args.skip_ort:
        parts.append("### ONNX Runtime INT8\n\nNot run (`--skip-ort`).")
    parts.append(verdict(size))
    return "\n\n".join(p for p in parts if p)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--ratios", type=float, nargs="+", default=[6.0, 7.0], help="file budgets: fp32 / ratio")
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--sensitivity", choices=("distortion", "fisher", "both"), default="both",
                   help="how mixed_precision ranks layers; both: a row for each at every budget")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--latency-targets", nargs="*", default=["1.3x", "1.4x", "1.5x"],
                   help="mixed_precision target_latency rows in onnxruntime (batch 32)")
    p.add_argument("--skip-size", action="store_true", help="leave out part 1 (the file budget)")
    p.add_argument("--skip-ort", action="store_true", help="leave out part 2 (ONNX Runtime INT8)")
    p.add_argument("--quick", action="store_true", help="one budget, one calibration batch (smoke run)")
    args = p.parse_args()
    if args.quick:
        args.ratios, args.calib_batches, args.warmup, args.repeats = args.ratios[:1], 1, 1, 3
        args.latency_targets = args.latency_targets[:1]
    torch.set_num_threads(2)
    state: dict[str, Any] = {"size": None, "ort": None}

    def write(key: str) -> Callable[[dict], None]:
        def fn(value: dict) -> None:
            state[key] = value
            update_section(args.out, "mixed_precision", render(args, **state))
        return fn

    model, tok = build_model({"name": "hf:minilm"})
    model.eval()
    data = build_data({"name": "sentences"}, tokenizer=tok)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_size:
            size_rows(args, model, tok, data, Path(tmp), write("size"))
        if not args.skip_ort:
            from mixed_precision_ort import ort_rows
            ort_rows(args, model, tok, data, Path(tmp), write("ort"))
    print(render(args, **state))


if __name__ == "__main__":
    main()
