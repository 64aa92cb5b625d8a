"""The README's Python examples run, and every example recipe is valid (and the small one runs)."""
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
    for code in blocks:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
    x = torch.randn(3, 64)
    assert torch.equal(scope["model"].eval()(x), scope["same"](x))


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_recipes_are_valid(path):
    assert load_recipe(path).stages


def test_small_example_runs_end_to_end(tmp_path, capsys):
    code = main(["run", str(ROOT / "examples/finetune_digits.yaml"), "--out", str(tmp_path / "run"),
                 "--quiet", "--cache", str(tmp_path / "cache")])
    assert code == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "01_finetune" in report
    model = nncompress.load(tmp_path / "run" / "model")
    assert model(torch.randn(2, 64)).shape == (2, 10)
