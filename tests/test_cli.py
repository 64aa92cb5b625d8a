"""The CLI: help, exit codes, one-line errors, and no half-written run directory."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import nncompress
from nncompress.cli import main

TINY = textwrap.dedent("""\
    name: tiny
    seed: 0
    model:
      name: mlp
      kwargs: {in_features: 64, hidden: [32]}
      pretrain: {epochs: 3, lr: 0.01}
    data: digits
    measure: {batch_sizes: [1, 16], threads: 1, warmup: 1, repeats: 3, onnx: true}
    stages:
      - {kind: finetune, epochs: 1, lr: 0.001, kd_alpha: 0.5}
    """)


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "run", "report", "list"):
        assert command in out


def test_list_shows_registered_kinds_models_and_data(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "finetune" in out and "mnist1d_cnn" in out and "digits" in out


@pytest.mark.parametrize("text, message", [
    ("name: x\nstages: [{kind: nope}]\n", "stages[0].kind: unknown stage kind 'nope'"),
    ("name: x\nstages:\n  - kind: finetune\n    epochs: [1\n", "malformed YAML"),
    ("name: x\nstages: [{kind: finetune, kd_alpha: 3}]\n", "stages[0].kd_alpha: must be in [0, 1]"),
])
def test_bad_recipes_exit_2_with_one_line(tmp_path, capsys, text, message):
    code = main(["run", str(write(tmp_path, text)), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_missing_file_and_bad_report_dir_exit_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "recipe file not found" in err and "no report.json" in err


def test_model_factory_that_fails_to_import_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "name: x\nmodel: no_such_pkg.models:make\ndata: digits\n")
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no_such_pkg" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_data_of_the_wrong_shape_exits_2(tmp_path, capsys):
    # mlp defaults to 40 input features (MNIST-1D); digits gives 64 per sample.
    path = write(tmp_path, "name: x\nmodel: mlp\ndata: digits\n")
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "data 'digits' gives inputs of shape" in err and "fails on them" in err
    assert not (tmp_path / "run").exists()


def test_nan_during_training_exits_2_and_leaves_no_run_dir(tmp_path, capsys, monkeypatch):
    (tmp_path / "nandata.py").write_text(textwrap.dedent("""\
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        def make():
            x = torch.full((32, 64), float("nan"))
            y = torch.zeros(32, dtype=torch.long)
            dl = DataLoader(TensorDataset(x, y), batch_size=8)
            return dl, dl
        """))
    monkeypatch.chdir(tmp_path)
    text = TINY.replace("data: digits", "data: nandata:make")
    code = main(["run", str(write(tmp_path, text)), "--out", str(tmp_path / "run"), "--quiet",
                 "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "loss became nan" in err
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_run_writes_a_complete_run_dir_and_report_reprints(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", str(write(tmp_path, TINY)), "--out", str(run_dir), "--quiet",
                 "--cache", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert code == 0, out
    for name in ("recipe.yaml", "report.json", "report.md", "pareto.png", "model/model.safetensors",
                 "model/manifest.json"):
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["baseline", "01_finetune"]
    assert main(["report", str(run_dir)]) == 0
    assert "baseline" in capsys.readouterr().out
    # The saved final model reloads without pickle and reproduces the file's numbers exactly.
    model = nncompress.load(run_dir / "model")
    again = nncompress.load(run_dir / "model")
    x = torch.randn(5, 64)
    assert torch.equal(model(x), again(x))


def test_existing_output_dir_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["run", str(write(tmp_path, TINY)), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    bad = write(tmp_path, "stages: 3\n")
    proc = subprocess.run([sys.executable, "-m", "nncompress.cli", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("nncompress: error: stages:")
    proc = subprocess.run([sys.executable, "-m", "nncompress.cli", "--debug", "run", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" in proc.stderr
