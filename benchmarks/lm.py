"""One-shot W4 and 2:4 on a causal LM, nncompress beside llm-compressor, on the same model and windows.

    python benchmarks/lm.py --out BENCHMARKS.md      (or: make bench-lm, which also builds .venv-peers)

The model is `tiny_llama` (LLaMA architecture, 3.3M parameters, byte vocabulary) pretrained by the
recipe machinery on data `text` (cached by content hash). Every method compresses every Linear of the
decoder blocks (not lm_head, as llm-compressor's examples leave it) from the same 128 calibration
windows of 128 bytes (train split), and is judged by perplexity on the held-out topics of the manual
(in domain) and on the stdlib licences (out of domain), never calibrated on.

Each method runs in a fresh process: time is its compression call, memory is the growth of the peak
resident set during it (the peak reset through /proc/self/clear_refs before the call, the model
already loaded). llm-compressor runs in its own virtual environment (.venv-peers: it pins transformers <= 5.17) from a Hugging Face folder
of the same weights, and measures perplexity with the same formula (benchmarks/peers/llmcompressor_lm.py).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))

from common import checkpoint_size, update_section  # noqa: E402
from memory import peak_mb, reset_peak  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
RECIPE = {
    "name": "bench-lm",
    "model": {"name": "tiny_llama", "pretrain": {"epochs": 5, "lr": 0.003}},
    "data": {"name": "text", "kwargs": {"batch_size": 16, "seq_len": 128, "calib": 128}},
    "stages": [],
}
OURS = {  # label -> (scheme, stages as recipe dicts)
    "RTN": ("W4 g128", [("quantize", {})]),
    "GPTQ": ("W4 g128", [("gptq", {"calib_batches": 8})]),
    "GPTQ act-order": ("W4 g128", [("gptq", {"calib_batches": 8, "act_order": True})]),
    "AWQ + GPTQ act-order": ("W4 g128", [("awq", {"calib_batches": 8}),
                                         ("gptq", {"calib_batches": 8, "act_order": True})]),
    "GPTQ act-order, 1 window per batch": ("W4 g128", [("gptq", {"calib_batches": 128, "act_order": True})]),
    "magnitude": ("2:4", [("sparsify", {"importance": "magnitude"})]),
    "Wanda": ("2:4", [("sparsify", {"importance": "wanda", "calib_batches": 8})]),
    "SparseGPT": ("2:4", [("sparsify", {"importance": "sparsegpt", "calib_batches": 8})]),
    "SparseGPT, 1 window per batch": ("2:4", [("sparsify", {"importance": "sparsegpt", "calib_batches": 128})]),
}
ONE_BY_ONE = ", 1 window per batch"  # the same 128 windows fed one at a time, as llm-compressor feeds them
PEERS = {"gptq_w4a16": ("llm-compressor GPTQ (W4A16)", "W4 g128"),
         "wanda_24": ("llm-compressor Wanda", "2:4"),
         "sparsegpt_24": ("llm-compressor SparseGPT", "2:4")}
W4 = {"format": {"kind": "int", "bits": 4}, "granularity": {"kind": "per_group", "size": 128}}
BLOCKS = {"include": ["*layers*"], "types": ["Linear"]}


def prepared(cache: Path, stages: list[dict] = ()):
    """(recipe, pretrained model, data, the licences as test data) for `RECIPE` with `stages`."""
    from nncompress.recipe import parse_recipe
    from nncompress.recipe.runner import prepare, seed_everything
    from nncompress.zoo.lm import text

    recipe = parse_recipe({**RECIPE, "stages": list(stages)})
    seed_everything(recipe.seed)
    model, data = prepare(recipe, cache, log=lambda m: print(m, flush=True))
    return recipe, model, data, text(**{**RECIPE["data"]["kwargs"], "domain": "legal"})


def run_ours(label: str, cache: Path) -> dict:
    """One of our methods, in this (fresh) process: the JSON row."""
    from nncompress.core import Context
    from nncompress.eval.metrics import perplexity
    from nncompress.recipe.runner import apply_stage

    torch.set_num_threads(2)
    scheme, stages = OURS[label]
    raw = [{"kind": kind, **({"weight": W4} if kind in ("quantize", "gptq", "awq") else
                             {"granularity": {"kind": "nm", "n": 2, "m": 4}}), **fields, "targets": BLOCKS}
           for kind, fields in stages]
    recipe, model, data, legal = prepared(cache, raw)
    if label.endswith(ONE_BY_ONE):
        data = dataclasses.replace(data, calib=DataLoader(data.calib.dataset, batch_size=1, shuffle=False))
    before = reset_peak()
    start = time.perf_counter()
    for stage in recipe.stages:
        model = apply_stage(recipe, stage, model, Context(data=data))
    seconds = time.perf_counter() - start
    peak = peak_mb()
    with tempfile.TemporaryDirectory() as tmp:
        size = checkpoint_size(model, Path(tmp) / "m")
    return {"label": label, "scheme": scheme, "seconds": seconds, "memory_mb": peak - before,
            "ppl": perplexity(model, data.test)["perplexity"], "ppl_ood": perplexity(model, legal.test)["perplexity"],
            "bytes": size}


def export_for_peers(model, data, legal, folder: Path) -> Path:
    from safetensors.torch import save_file

    model.model.save_pretrained(folder / "hf")
    windows = lambda ds: (torch.stack([ds[i][0] for i in range(len(ds))]), torch.stack([ds[i][1] for i in range(len(ds))]))  # noqa: E731
    tx, ty = windows(data.test.dataset)
    ox, oy = windows(legal.test.dataset)
    calib = torch.cat([x for x, _ in data.calib])
    save_file({"calib": calib.contiguous(), "test_x": tx, "test_y": ty, "ood_x": ox, "ood_y": oy},
              str(folder / "tokens.safetensors"))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--cache", default=None, help="where the pretrained model is cached (default ~/.cache/nncompress)")
    p.add_argument("--quick", action="store_true", help="a 2-block model trained 60 steps (smoke run)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one of our methods
    args = p.parse_args()
    if args.quick:
        RECIPE["model"] = {"name": "tiny_llama", "kwargs": {"hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2,
                                                            "intermediate": 256},
                           "pretrain": {"epochs": 1, "lr": 0.003, "max_steps": 60}}
    from nncompress.zoo.data import default_cache_dir

    cache = Path(args.cache) if args.cache else default_cache_dir()
    if args.one:
        print("ROW " + json.dumps(run_ours(args.one, cache)), flush=True)
        return
    torch.set_num_threads(2)
    from nncompress.eval.metrics import perplexity

    _, model, data, legal = prepared(cache)  # trains once, then every child loads it from the cache
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = {"label": "fp32", "scheme": "-", "seconds": None, "memory_mb": None,
                "ppl": perplexity(model, data.test)["perplexity"], "ppl_ood": perplexity(model, legal.test)["perplexity"],
                "bytes": checkpoint_size(model, Path(tmp) / "fp32", compress=False)}
        rows = [fp32]
        folder = export_for_peers(model, data, legal, Path(tmp))
        del model
        for label in OURS:
            rows.append(_child([sys.executable, __file__, "--one", label, "--cache", str(cache)]
                               + ["--quick"] * args.quick, "nncompress " + label))
        for method, (label, scheme) in PEERS.items():
            if not PEER_PYTHON.is_file():
                rows.append({"label": label, "scheme": scheme, "missing": f"{PEER_PYTHON} not built (make bench-lm)"})
                continue
            row = _child([str(PEER_PYTHON), str(ROOT / "benchmarks/peers/llmcompressor_lm.py"), "--model",
                          str(folder / "hf"), "--tokens", str(folder / "tokens.safetensors"), "--method", method], label)
            row.update(label=label, scheme=scheme, bytes=None)
            rows.append(row)
    onnx_rows = onnx_w4(cache, args.quick)
    body = _table(rows, len(data.test.dataset), len(legal.test.dataset)) + "\n\n" + onnx_rows
    if args.quick:
        body += "\n\nQUICK RUN (2 blocks, 60 training steps): not the reference figures."
    update_section(args.out, "lm", body)
    print(body)


def onnx_w4(cache: Path, quick: bool) -> str:
    """The GPTQ act-order W4 g128 model in ONNX Runtime: exported as float (merged) and with MatMulNBits,
    bytes of each file, perplexity through ONNX Runtime and latency timed interleaved."""
    import numpy as np

    from nncompress.core import Context
    from nncompress.eval.latency import compare_onnx_latency, ort_feed, ort_session
    from nncompress.export.onnx import export_onnx
    from nncompress.export.onnx_nbits import export_nbits_onnx
    from nncompress.core.merge import merge
    from nncompress.recipe.runner import apply_stage

    torch.set_num_threads(2)
    _, stages = OURS["GPTQ act-order"]
    raw = [{"kind": k, "weight": W4, **f, "targets": BLOCKS} for k, f in stages]
    recipe, model, data, _ = prepared(cache, raw)
    model = apply_stage(recipe, recipe.stages[0], model, Context(data=data))
    lines = ["| ONNX file | bytes | perplexity (ONNX Runtime) | ORT b=1 (ms) | ORT b=16 (ms) |",
             "| --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        x = data.example_batch(2)
        files = {"fp32 (dequantized weights)": export_onnx(merge(copy.deepcopy(model)), x, Path(tmp) / "f32.onnx"),
                 "MatMulNBits W4 g128": export_nbits_onnx(model, x, Path(tmp) / "w4.onnx")}
        lat = {b: compare_onnx_latency(list(files.values()), data.example_batch(b), repeats=10 if quick else 30,
                                       threads=2) for b in (1, 16)}
        for i, (label, path) in enumerate(files.items()):
            session = ort_session(path, 2)
            nll = n = 0.0
            for xb, yb in data.test:
                logits = torch.from_numpy(session.run(None, ort_feed(session, xb))[0])
                nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), yb.flatten(),
                                                               reduction="sum"))
                n += yb.numel()
            size = sum(f.stat().st_size for f in Path(tmp).iterdir() if f.name.startswith(path.stem))
            lines.append(f"| {label} | {size:,} | {np.exp(nll / n):.4f} | {lat[1][i].median_ms:.2f} | "
                         f"{lat[16][i].median_ms:.2f} |")
    print("\n".join(lines), flush=True)
    return ("ONNX Runtime 4-bit: the GPTQ act-order W4 g128 model exported as float ONNX (weights dequantized) and "
            "with every quantized Linear as a `MatMulNBits` node (`nncompress export --format onnx-nbits`); "
            "windows of 128 bytes, medians of interleaved runs, 2 threads.\n\n" + "\n".join(lines))


def _child(cmd: list[str], label: str) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    found = [line for line in out.stdout.splitlines() if line.startswith("ROW ") or line.startswith("{")]
    if out.returncode != 0 or not found:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"{label}: failed ({tail})", flush=True)
        return {"label": label, "missing": f"failed: {tail[:160]}"}
    row = json.loads(found[-1].removeprefix("ROW "))
    print(row, flush=True)
    return {"label": label, **{k: v for k, v in row.items() if k != "label"}}


def _table(rows: list[dict], n_test: int, n_ood: int) -> str:
    head = ["method", "scheme", "perplexity (held-out topics)", "perplexity (licences, out of domain)",
            "file bytes", "compress time (s)", "peak memory growth (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        if "missing" in r:
            lines.append(f"| {r['label']} | {r.get('scheme', '-')} | {r['missing']} | | | | |")
            continue
        cells = [r["label"], r["scheme"], f"{r['ppl']:.3f}", f"{r['ppl_ood']:.3f}",
                 f"{r['bytes']:,}" if r.get("bytes") else "-",
                 f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-",
                 f"{r['memory_mb']:.0f}" if r.get("memory_mb") is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return ("## Causal LM: W4 and 2:4 one-shot beside llm-compressor (`make bench-lm`)\n\n"
            f"`tiny_llama` (3.3M parameters, bytes as tokens) pretrained on the reference manual; every Linear "
            f"of the decoder blocks compressed from the same 128 calibration windows of 128 bytes; perplexity "
            f"per byte on {n_test} windows of held-out topics and {n_ood} windows of the stdlib licences (never "
            "calibrated on). Each method in a fresh process: compress time is the compression call, memory the "
            "growth of the peak resident set during it (most of it the activations of the calibration batches: "
            "nncompress feeds the data's batches of 16 windows unless told otherwise, llm-compressor one window at "
            "a time, hence the rows with 1 window per batch; at this model size the figure also moves by tens of MB "
            "from run to run with the allocator's high-water mark: a second run gave 119-121 MB for the 1-window "
            "rows). llm-compressor 0.14 in its own environment (.venv-peers), "
            "same weights and windows; its file bytes are not measured (it saves in its own format). "
            "CPU, 2 threads.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
