"""`nncompress sensitivity`: a recipe's model swept unit by unit, CSV and PNG written atomically."""
import csv
import textwrap

import pytest
import yaml

from nncompress.cli import main

RECIPE = textwrap.dedent("""\
    name: tiny
    seed: 0
    model:
      name: mlp
      kwargs: {in_features: 64, hidden: [32]}
      pretrain: {epochs: 2, lr: 0.01}
    data: digits
    """)


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


@pytest.mark.parametrize("unit", ["element", "channel"])
def test_sensitivity_writes_csv_png_and_overrides(tmp_path, capsys, recipe, unit):
    out = tmp_path / "sens"
    code = main(["sensitivity", str(recipe), "--unit", unit, "--out", str(out), "--max-batches", "2",
                 "--target", "0.3", "--threshold", "0.05", "--quiet", "--cache", str(tmp_path / "cache")])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    rows = list(csv.DictReader((out / "sensitivity.csv").open()))
    units = list(dict.fromkeys(r["unit"] for r in rows))
    # element: both Linear layers; channel: the hidden group only (the output layer's channels are the classes)
    assert len(units) == (2 if unit == "element" else 1)
    ratios = [float(r["ratio"]) for r in rows if r["unit"] == units[0]]
    assert ratios[0] == 0.0 and ratios == sorted(ratios)
    assert all(float(r["drop"]) == 0.0 for r in rows if float(r["ratio"]) == 0.0)  # nothing pruned: no drop
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the YAML block parses and names every unit with a ratio in [0, 1)
    block = stdout[stdout.index("overrides:"):stdout.index("\nwritten:")]
    overrides = yaml.safe_load(block)["overrides"]
    assert sorted(overrides) == sorted(units) and all(0.0 <= v < 1.0 for v in overrides.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sens")]


def test_bad_unit_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, recipe):
    out = tmp_path / "sens"
    assert main(["sensitivity", str(recipe), "--unit", "neuron", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--unit: must be 'element' or 'channel'" in err and err.count("\n") == 1
    assert not out.exists()


def test_existing_out_is_refused(tmp_path, capsys, recipe):
    (tmp_path / "sens").mkdir()
    assert main(["sensitivity", str(recipe), "--out", str(tmp_path / "sens")]) == 2
    assert "already exists" in capsys.readouterr().err
