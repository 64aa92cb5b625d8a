"""The README's Python examples run, and every example recipe is valid (and the small one runs)."""
import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

import nncompress
from nncompress.cli import main
from nncompress.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    scopes = []
    for code in blocks:
        scopes.append({})
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), scopes[-1])
        scopes[-1]["printed"] = out.getvalue()
    api, composed = scopes[0], scopes[1]
    x = torch.randn(3, 64)
    assert torch.equal(api["model"].eval()(x), api["same"](x))
    assert [m.out_features for m in api["same"].modules() if hasattr(m, "out_features")] == [128, 128, 10]
    assert composed["printed"] == "LowRankLinear QuantLinear\n"       # what the README says it prints
    assert all(type(m).__name__ in ("MLP", "Sequential", "Linear", "ReLU", "Flatten")
               for m in composed["plain"].modules()), [type(m).__name__ for m in composed["plain"].modules()]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_recipes_are_valid(path):
    assert load_recipe(path).stages


# the slow tier (CI runs it too): all-MiniLM-L6-v2 end to end (~2 min on 2 cores), and the two
# longest CNN pipelines (~35 s and ~14 s), so the default tier stays under 3 minutes
SLOW_EXAMPLES = {"minilm_prune_kd_int8.yaml", "deep_compression_mnist1d.yaml", "progressive_qat_mnist1d.yaml",
                 "prune_mnist1d.yaml",  # ~13 s: 30 timed repeats at batch 256 in torch and ORT
                 "lm_gptq_tiny_llama.yaml"}  # ~70 s: an epoch of the causal LM on 466 kB of text


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name, marks=pytest.mark.slow if p.name in SLOW_EXAMPLES else ())
                                  for p in sorted((ROOT / "examples").glob("*.yaml"))])
def test_example_runs_end_to_end(tmp_path, path):
    """Every example runs (with few latency repeats) and its final model reloads and runs."""
    # a small budget: one epoch wherever the example trains, three latency repeats
    text = re.sub(r"epochs: \d+", "epochs: 1", path.read_text()).replace("repeats: 30", "repeats: 3")
    recipe = tmp_path / path.name
    recipe.write_text(text)
    code = main(["run", str(recipe), "--out", str(tmp_path / "run"), "--quiet", "--cache", str(tmp_path / "cache")])
    assert code == 0
    parsed = load_recipe(recipe)
    report = (tmp_path / "run" / "report.md").read_text()
    assert all(s.label in report for s in parsed.stages)
    model = nncompress.load(tmp_path / "run" / "model")
    if parsed.data.name == "sentences":  # a sentence encoder: token ids in, one embedding per sentence out
        ids = torch.randint(1000, 2000, (2, 12))
        assert model(ids, torch.ones_like(ids)).shape == (2, 384)
    elif parsed.data.name == "text":  # a causal LM over bytes: logits for every position
        assert model(torch.randint(0, 256, (2, 16))).shape == (2, 16, 256)
    else:
        assert model(torch.randn(2, *model.input_shape)).shape == (2, 10)
