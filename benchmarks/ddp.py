"""Data-parallel training under torchrun (issue 13): every stage that trains, run by the CLI in one
process and under `torchrun --nproc_per_node 2` (gloo, CPU), with the same recipe, cache and global batch.

    python benchmarks/ddp.py --out BENCHMARKS.md      (section "ddp"; make bench-ddp)

For each stage: the per-epoch training losses of both runs (their largest relative difference), the
test quality after the stage, and the stage's wall time (speedup = one process / two). One process uses
both cores for its intra-op threads; torchrun gives each rank one thread (its default OMP_NUM_THREADS=1).
Pretrained weights come from the cache both runs share, so neither times pretraining.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))

from common import update_section  # noqa: E402

CNN_STAGES = [
    {"kind": "finetune", "epochs": 2, "kd_alpha": 0.5, "lr": 0.001},
    {"kind": "sparsify", "ratio": 0.8, "scope": "global", "importance": "magnitude", "epochs": 2, "lr": 0.001},
    {"kind": "lottery", "ratio": 0.5, "rounds": 2, "epochs": 1, "lr": 0.001},
    {"kind": "qat", "weight": {"format": {"kind": "int", "bits": 4}, "granularity": {"kind": "per_channel"},
                               "method": "rtn"},
     "activation": {"format": {"kind": "int", "bits": 8, "signed": False, "symmetric": False}},
     "epochs": 2, "lr": 0.001, "kd_alpha": 0.7, "fold_bn": True},
]
CNN = {"seed": 0, "data": "mnist1d", "model": {"name": "mnist1d_cnn", "pretrain": {"epochs": 10, "lr": 0.003}},
       "measure": {"batch_sizes": [1], "repeats": 3}}
# every stage starts from the same cached pretrained model, so each row compares one stage's training
# alone (chained, a stage's small float differences would change the next stage's starting point)
RECIPES = {
    **{("mnist1d_cnn (BatchNorm)", stage["kind"]): {**CNN, "name": f"ddp-cnn-{stage['kind']}", "stages": [stage]}
       for stage in CNN_STAGES},
    ("tiny_llama (text)", "finetune, gptq"): {
        "name": "ddp-lm", "seed": 0, "data": "text",
        "model": {"name": "tiny_llama"},
        "measure": {"batch_sizes": [1], "repeats": 3},
        "stages": [{"kind": "finetune", "epochs": 1, "max_steps": 40, "lr": 0.0001, "kd_alpha": 0.5},
                   {"kind": "gptq", "weight": {"format": {"kind": "int", "bits": 4},
                                               "granularity": {"kind": "per_group", "size": 32}},
                    "targets": {"include": ["*layers*"], "types": ["Linear"]}}]},
}


def run(recipe: dict, work: Path, out: str, procs: int, cache: Path) -> dict:
    (work / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    cli = ["-m", "nncompress.cli", "run", "r.yaml", "--out", out, "--cache", str(cache), "--quiet"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *cli]
           if procs > 1 else [sys.executable, *cli])
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    report = json.loads((work / out / "report.json").read_text())
    manifest = json.loads((work / out / "model" / "manifest.json").read_text())
    losses = [h.get("record", {}).get("epoch_losses") or [] for h in manifest["history"]]  # one per stage
    return {"stages": report["stages"][1:], "losses": losses, "baseline": report["stages"][0]["quality"]}


def flat(x) -> list[float]:
    return [v for item in x for v in flat(item)] if isinstance(x, list) else [x]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="BENCHMARKS.md")
    args = ap.parse_args()
    cores = os.cpu_count()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = Path(os.environ.get("NNCOMPRESS_CACHE", Path.home() / ".cache" / "nncompress"))
        for (model, _), recipe in RECIPES.items():
            one = run(recipe, work, f"{recipe['name']}-1", 1, cache)
            two = run(recipe, work, f"{recipe['name']}-2", 2, cache)
            trained = recipe["stages"]
            for i, (a, b) in enumerate(zip(one["stages"], two["stages"])):
                la, lb = flat(one["losses"][i]), flat(two["losses"][i])
                rel = max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la, lb)), default=float("nan"))
                rows.append((model, trained[i]["kind"], la, lb, rel, a["quality_name"], a["quality"], b["quality"],
                             a["seconds"], b["seconds"]))
                print(rows[-1], flush=True)
    lines = [
        "## Data-parallel training under torchrun (issue 13)", "",
        f"`make bench-ddp` on this machine ({cores} cores, CPU, gloo): each recipe run by the CLI in one process "
        "and by `torchrun --nproc_per_node 2`, same recipe, seed, cached pretrained weights and global batch; "
        "each CNN stage is its own recipe from the same pretrained model; the LM recipe chains a fine-tune "
        "and GPTQ (its calibration batches dealt across the ranks). "
        "Losses are the per-epoch training losses the stage records (global batch means on both sides, "
        "rounded to 6 digits in the record); "
        "quality is on the test split; time is the stage's wall time (one process: 2 intra-op threads; "
        "each rank: 1).", "",
        "| model | stage | epoch losses, 1 process | 2 processes | max rel. diff | quality 1 / 2 proc. | "
        "time 1 / 2 proc. | speedup |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, kind, la, lb, rel, qname, qa, qb, sa, sb in rows:
        show = lambda xs: ", ".join(f"{x:.4f}" for x in xs) or "- (one-shot)"  # noqa: E731
        diff = "-" if rel != rel else f"{rel:.1e}"
        lines.append(f"| {model} | {kind} | {show(la)} | {show(lb)} | {diff} | {qname} {qa:.4f} / {qb:.4f} | "
                     f"{sa:.1f} s / {sb:.1f} s | {sa / sb:.2f}x |")
    worst = max((r[4] for r in rows if r[4] == r[4]), default=float("nan"))
    lines += ["", f"Largest relative difference between the two loss curves: {worst:.1e}. The CNN's BatchNorm "
              "normalises over the global batch under torchrun (the sums are all-reduced inside the forward, "
              "with gradients: what SyncBatchNorm does on GPUs), QAT's activation observers see the global "
              "batch's rows, and GPTQ deals its calibration batches across the ranks and all-reduces the "
              "Hessian sums; what remains is float summation order, amplified over the steps, most where a "
              "discrete choice reads the weights (a lottery round's magnitude masks, QAT's rounding to the "
              "grid), which a last-bit difference can flip. On 2 cores "
              "the two processes are slower than one process using both cores for its intra-op threads: "
              "these models are too small for the all-reduce per step to pay; the speedup column is what "
              "this machine measured, not a claim for larger ones."]
    update_section(args.out, "ddp", "\n".join(lines))


if __name__ == "__main__":
    main()
