"""The CLI: help, exit codes, one-line errors, and no half-written run directory."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nncompress
from nncompress.cli import main

SRC = Path(nncompress.__file__).parents[1]

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


def test_list_shows_registered_kinds_models_and_data():
    # A fresh process: in this one, other tests have already imported the zoo that registers them.
    proc = subprocess.run([sys.executable, "-m", "nncompress.cli", "list"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "  finetune" in proc.stdout
    models = next(line for line in lines if line.startswith("built-in models: ")).split(": ")[1].split(", ")
    data = next(line for line in lines if line.startswith("built-in data: ")).split(": ")[1].split(", ")
    assert {"mlp", "mnist1d_cnn", "resnet20"} <= set(models) and {"digits", "mnist1d", "sentences"} <= set(data)


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


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("nncompress: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_recipe_that_is_not_utf8_exits_2(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: x\n# fine-tune caf\u00e9\nstages: []\n".encode("latin-1"))
    assert main(["run", str(path), "--check"]) == 2
    assert f"{path}: line 2: not UTF-8 text (byte 0xe9); save the recipe as UTF-8" in one_error_line(capsys)


def test_duplicate_yaml_key_exits_2_naming_key_and_lines(tmp_path, capsys):
    text = "name: x\nstages:\n  - kind: finetune\n    epochs: 1\n    lr: 0.01\n    epochs: 3\n"
    assert main(["run", str(write(tmp_path, text)), "--check"]) == 2
    assert "line 6, column 5: key 'epochs' given twice in one mapping (first on line 4)" in one_error_line(capsys)
    # A YAML merge (`<<`) overridden by an explicit key is not a duplicate.
    merged = "name: x\nmodel: {name: mlp, kwargs: {in_features: 64}}\ndata: digits\nstages:\n" \
             "  - &ft {kind: finetune, epochs: 1}\n  - {<<: *ft, epochs: 2}\n"
    assert main(["run", str(write(tmp_path, merged, "m.yaml")), "--check"]) == 0


LAZY = textwrap.dedent("""\
    import pathlib
    import torch.nn as nn
    def make(width=4):
        pathlib.Path("built").write_text("the factory ran")
        return nn.Linear(64, 10)
    """)


@pytest.mark.parametrize("model, data, message", [
    ("mlpp", "digits", "model 'mlpp': unknown built-in; known: "),
    ("no_such_pkg.nets:make", "digits", "model 'no_such_pkg.nets:make': cannot import module 'no_such_pkg.nets'"),
    ("lazy_nets:make_net", "digits", "module 'lazy_nets' has no attribute 'make_net'"),
    ("{name: lazy_nets:make, kwargs: {depth: 2}}", "digits", "model 'lazy_nets:make': bad kwargs"),
    ("hf:/no/such/folder", "digits", "model 'hf:/no/such/folder': folder /no/such/folder does not exist"),
    ("mlp", "digitz", "data 'digitz': unknown built-in; known: "),
    ("mlp", "{name: digits, kwargs: {batch: 8}}", "data 'digits': bad kwargs"),
])
def test_check_validates_model_and_data_names(tmp_path, capsys, monkeypatch, model, data, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lazy_nets.py").write_text(LAZY)
    path = write(tmp_path, f"name: x\nmodel: {model}\ndata: {data}\n")
    assert main(["run", str(path), "--check"]) == 2
    assert message in one_error_line(capsys)


def test_check_imports_a_factory_without_building_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lazy_nets.py").write_text(LAZY)
    path = write(tmp_path, "name: x\nmodel: {name: lazy_nets:make, kwargs: {width: 8}}\ndata: digits\n")
    assert main(["run", str(path), "--check"]) == 0
    assert "valid (0 stages" in capsys.readouterr().out
    assert not (tmp_path / "built").exists()


def test_out_whose_parent_is_a_file_exits_2_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "sub" / "run"
    for check in (["--check"], []):
        assert main(["run", str(write(tmp_path, TINY)), "--out", str(out), "--quiet",
                     "--cache", str(tmp_path / "cache")] + check) == 2
        assert f"{out}: {tmp_path / 'afile'} is a file, not a folder; choose another --out" in one_error_line(capsys)
    assert not (tmp_path / "cache").exists()  # nothing was built, trained or cached


def test_out_in_a_read_only_folder_exits_2_before_any_work(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: show the check what any other user would see
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    try:
        assert main(["run", str(write(tmp_path, TINY)), "--out", str(locked / "run"), "--quiet",
                     "--cache", str(tmp_path / "cache")]) == 2
    finally:
        locked.chmod(0o755)
    assert f"{locked / 'run'}: cannot create it, {locked} is not writable" in one_error_line(capsys)
    assert not (tmp_path / "cache").exists() and not list(locked.iterdir())


def test_measure_device_missing_on_this_machine_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write(tmp_path, "name: x\nmodel: {name: mlp, kwargs: {in_features: 64}}\ndata: digits\n"
                           "measure: {device: cuda}\n")
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "measure.device: cuda is not available on this machine" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_run_without_a_recipe_or_resume_exits_2(capsys):
    assert main(["run"]) == 2
    assert "give a recipe file, or --resume OUT" in one_error_line(capsys)


UNTRACEABLE = textwrap.dedent("""\
    import torch.nn as nn

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 32), nn.Linear(32, 10)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:          # a branch on a value: torch.export cannot trace it
                h = h * 2
            return self.b(h)

    def make():
        return Branchy()
    """)


def test_a_model_that_cannot_be_traced_gets_one_line_not_a_graph_dump(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "branchy.py").write_text(UNTRACEABLE)
    recipe = write(tmp_path, TINY.replace("name: mlp\n  kwargs: {in_features: 64, hidden: [32]}\n  pretrain: {epochs: 3, lr: 0.01}",
                                          "name: branchy:make").replace(
        "{kind: finetune, epochs: 1, lr: 0.001, kd_alpha: 0.5}", "{kind: prune, ratio: 0.5}").replace(
        "onnx: true", "onnx: false"))
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capfd.readouterr().err.strip()
    assert "\n" not in err, err[:2000]
    assert err.startswith("nncompress: error: prune: Branchy: torch.export cannot trace the model (")
    assert not (tmp_path / "run").exists()


SAVED_NEXT = textwrap.dedent("""\
    name: next
    model: saved:{folder}
    data: digits
    measure: {{batch_sizes: [1], threads: 1, warmup: 1, repeats: 3, onnx: false}}
    stages:
      - {{kind: quantize, activation: null}}
    """)


def test_a_saved_model_is_compressed_further_by_a_new_recipe(tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["run", str(write(tmp_path, TINY)), "--out", str(first), "--quiet",
                 "--cache", str(tmp_path / "cache")]) == 0
    recipe = write(tmp_path, SAVED_NEXT.format(folder=first / "model"), "next.yaml")
    assert main(["run", str(recipe), "--check"]) == 0
    second = tmp_path / "second"
    assert main(["run", str(recipe), "--out", str(second), "--quiet", "--cache", str(tmp_path / "cache")]) == 0
    report = json.loads((second / "report.json").read_text())
    # the baseline of the second run is the first run's final model, measured again
    before = json.loads((first / "report.json").read_text())["stages"][-1]
    assert report["stages"][0]["quality"] == pytest.approx(before["quality"])
    model = nncompress.load(second / "model")
    kinds = [r["config"]["kind"] for r in nncompress.core.history(model)]
    assert kinds == ["finetune", "quantize"]  # both runs' history, so the folder rebuilds from the built-in
    assert json.loads((second / "model" / "manifest.json").read_text())["source"]["name"] == "mlp"
    capsys.readouterr()


def test_a_saved_model_that_imports_code_needs_trust_code(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lazy_nets.py").write_text(LAZY)
    model, _ = nncompress.zoo.loaders.build_model({"name": "lazy_nets:make"})
    nncompress.save(model, tmp_path / "ck")
    recipe = write(tmp_path, SAVED_NEXT.format(folder=tmp_path / "ck"))
    for command in (["run", str(recipe), "--check"], ["run", str(recipe), "--out", str(tmp_path / "r"), "--quiet"]):
        assert main(command) == 2
        assert "'lazy_nets:make', which imports and runs code; load it with trust_code=True (CLI: --trust-code)" \
            in one_error_line(capsys)
    assert not (tmp_path / "r").exists()
    assert main(["run", str(recipe), "--check", "--trust-code"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("model, message", [
    ("saved:/no/such/folder", "/no/such/folder"),
    ("{name: 'saved:ck', kwargs: {width: 2}}", "a saved model takes no kwargs"),
    ("{name: 'saved:ck', pretrain: {epochs: 1}}", "a saved model is already trained; remove pretrain"),
])
def test_bad_saved_model_specs_exit_2(tmp_path, capsys, monkeypatch, model, message):
    monkeypatch.chdir(tmp_path)
    nncompress.save(nncompress.zoo.loaders.build_model({"name": "mlp"})[0], tmp_path / "ck")
    assert main(["run", str(write(tmp_path, f"name: x\nmodel: {model}\ndata: digits\n")), "--check"]) == 2
    assert message in one_error_line(capsys)
