"""The composition matrix: every ordered pair of registered transforms on a tiny MLP, CNN and BERT.

    python benchmarks/composition.py --out BENCHMARKS.md

Each cell applies the row's transform, then the column's, saves, reloads and compares outputs:
"ok" means both applied and the reloaded model's outputs are identical bit for bit; a letter is a
typed error (the legend gives its message); "CRASH" / "MISMATCH" would be bugs (none are expected:
tests/test_contract.py asserts the same matrix). The configs are those of tests/contract_cases.py.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from common import update_section  # noqa: E402
from contract_cases import MODELS, transforms  # noqa: E402

import nncompress  # noqa: E402
from nncompress.core import Context, NNCompressError, tag_source  # noqa: E402
from nncompress.core.calibration import feed, first_tensor  # noqa: E402


def outcome(net, data, first, second) -> str:
    """"ok", a typed error's "Type: message", or "CRASH ..." / "MISMATCH"."""
    try:
        for cfg in (first, second):
            net = nncompress.apply(net, cfg, context=Context(data=data, teacher=copy.deepcopy(net).eval())).eval()
        with tempfile.TemporaryDirectory() as d:
            nncompress.save(net, Path(d) / "ck")
            again = nncompress.load(Path(d) / "ck")
            x = data.example_batch(8)
            with torch.no_grad():
                same = torch.equal(first_tensor(feed(again, x)), first_tensor(feed(net, x)))
        return "ok" if same else "MISMATCH"
    except NNCompressError as e:
        return f"{type(e).__name__}: {str(e).split(';')[0]}"
    except Exception as e:  # noqa: BLE001  reported, not hidden: a crash is a bug in the matrix
        return f"CRASH {type(e).__name__}: {e}"


def matrix(model: str) -> dict[tuple[str, str], str]:
    torch.manual_seed(0)
    net0, source, data = MODELS[model]()
    tag_source(net0.eval(), source)
    cases = transforms(model)
    return {(a, b): outcome(copy.deepcopy(net0), data, cases[a], cases[b]) for a in cases for b in cases}


def _generic(message: str) -> str:
    """The message without layer names, so equal reasons share a legend letter."""
    head = message.split(": layer ")[0] if ": layer " in message else message
    return head if ": layer " not in message else f"{head}: layer ... {message.split(' is ', 1)[-1]}"


def table(model: str, cells: dict[tuple[str, str], str], legend: dict[str, str]) -> str:
    names = list(dict.fromkeys(a for a, _ in cells))
    short = [n.replace("quantize_", "q_").replace("progressive_distill", "prog_distill") for n in names]
    lines = [f"**{model}** (row first, then column)", "", "| | " + " | ".join(short) + " |",
             "| --- |" + " --- |" * len(names)]
    for a, sa in zip(names, short):
        row = []
        for b in names:
            c = cells[(a, b)]
            if c == "ok":
                row.append("ok")
            elif c.startswith(("CRASH", "MISMATCH")):
                row.append(f"**{c.split(':')[0]}**")
            else:
                key = _generic(c)
                legend.setdefault(key, chr(ord("a") + len(legend)))
                row.append(legend[key])
        lines.append(f"| {sa} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="BENCHMARKS.md")
    args = parser.parse_args()
    start = time.perf_counter()
    results = {m: matrix(m) for m in MODELS}
    seconds = time.perf_counter() - start
    legend: dict[str, str] = {}
    tables = [table(m, cells, legend) for m, cells in results.items()]
    counts = {k: sum(1 for cells in results.values() for c in cells.values() if c.startswith(k))
              for k in ("ok", "CRASH", "MISMATCH")}
    total = sum(len(cells) for cells in results.values())
    typed = total - sum(counts.values())
    body = ["## Composition matrix (`python benchmarks/composition.py`)", "",
            f"Every ordered pair of the {len(transforms('mlp'))} registered transforms (quantize and sparsify "
            f"twice: W8A8 / W4, 50% / 2:4) on a tiny MLP, CNN and BERT: {total} pairs, {counts['ok']} compose "
            f"and reload bit-exact, {typed} refuse with a typed error, {counts['CRASH']} crash, "
            f"{counts['MISMATCH']} reload with different outputs ({seconds:.0f} s on this machine). "
            "The configs are those of `tests/contract_cases.py`; `tests/test_contract.py` asserts the "
            "same matrix.", ""]
    body += [t + "\n" for t in tables]
    body += ["Refusals (each a typed error naming the layer or the stage, with the fix):", ""]
    body += [f"- {letter}: `{reason}`" for reason, letter in legend.items()]
    update_section(args.out, "composition", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
