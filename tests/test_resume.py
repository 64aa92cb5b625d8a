"""Durable runs: a run stopped by Ctrl-C or SIGTERM keeps its completed stages (each whole or
absent, nothing half-written), `--resume` ends with the same final model, tensor for tensor, as a
run never interrupted, and the temporaries of killed runs are cleaned up by the next run."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nncompress
import nncompress.recipe.measure as measure_module
import sigterm_data  # tests/ helper: digits that signal their own process mid-training
from nncompress.cli import main
from nncompress.export.atomic import current_owner, scratch_dir
from nncompress.recipe import load_recipe, run_recipe, runner
from nncompress.recipe.runner import RunInterrupted, partial_dir

TESTS = Path(__file__).parent
SRC = Path(nncompress.__file__).parents[1]
TRAIN_SAMPLES = 1437  # digits' training split: one epoch reads each sample once

RECIPE = textwrap.dedent("""\
    name: durable
    seed: 7
    model: {name: mlp, kwargs: {in_features: 64, hidden: [32]}}
    data: sigterm_data:make
    measure: {batch_sizes: [1], threads: 1, warmup: 0, repeats: 2, onnx: false}
    stages:
      - {kind: finetune, epochs: 1, lr: 0.003}
      - {kind: finetune, epochs: 1, lr: 0.003, kd_alpha: 0.5}
      - {kind: prune, ratio: 0.5}
      - {kind: finetune, epochs: 1, lr: 0.003, kd_alpha: 0.5}
    """)
QUIET = dict(progress=False, log=lambda msg: None)


def write_recipe(folder: Path, text: str = RECIPE) -> Path:
    path = folder / "r.yaml"
    path.write_text(text)
    return path


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def stage_files(stage: Path) -> list[str]:
    return sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())


WHOLE_STAGE = ["checkpoint/manifest.json", "checkpoint/model.safetensors"]  # onnx: false


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: final state dict and per-stage quality (1 thread, as every test here)."""
    folder = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_recipe(load_recipe(write_recipe(folder)), folder / "run", cache_dir=folder / "cache", **QUIET)
    finally:
        torch.set_num_threads(threads)
    return result.model.state_dict(), [(s.stage, s.quality) for s in result.report.stages]


def interrupt_on_call(monkeypatch, owner, name: str, call: int) -> None:
    """Make `owner.name` raise KeyboardInterrupt on its `call`-th call (1-based), after running when
    `name` is `save` (the checkpoint is then on disk: the stage is stopped mid-measurement)."""
    real = getattr(owner, name)
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call and name != "save":
            raise KeyboardInterrupt
        out = real(*args, **kwargs)
        if len(calls) == call:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(owner, name, wrapped)


# Stage 02 is stopped: while it trains; after its checkpoint is written but before it is measured;
# after its folder is renamed into place but before progress.json counts it.
@pytest.mark.parametrize("owner, name, call", [
    (runner, "apply", 2), (measure_module, "save", 3), (runner.PartialRun, "_write_progress", 4)],
    ids=["training", "measuring", "committing"])
def test_interrupted_run_keeps_whole_stages_and_resumes_to_the_same_model(
        tmp_path, monkeypatch, reference, owner, name, call):
    state, qualities = reference
    recipe = load_recipe(write_recipe(tmp_path))
    out, partial = tmp_path / "run", partial_dir(tmp_path / "run")
    with monkeypatch.context() as m:
        interrupt_on_call(m, owner, name, call)
        with pytest.raises(RunInterrupted) as e:
            run_recipe(recipe, out, cache_dir=tmp_path / "cache", **QUIET)
    assert e.value.partial == partial and "after 01_finetune (1 of 4 stages done)" in str(e.value)
    assert f"resume with: nncompress run --resume {out}" in str(e.value)
    assert not out.exists() and not temporaries(tmp_path) and not (partial / "owner").exists()
    progress = json.loads((partial / "progress.json").read_text())
    assert [s["stage"] for s in progress["report"]["stages"]] == ["baseline", "01_finetune"]
    kept = sorted(p.name for p in (partial / "stages").iterdir())
    # a stage renamed into place but not yet counted is the only extra, and resume removes it
    assert kept == ["00_baseline", "01_finetune"] + (["02_finetune"] if name == "_write_progress" else [])
    for stage in kept:  # each whole: every file there, and the weights match the manifest's checksum
        assert stage_files(partial / "stages" / stage) == WHOLE_STAGE
        nncompress.load(partial / "stages" / stage / "checkpoint")

    result = run_recipe(recipe, out, cache_dir=tmp_path / "cache", resume=True, **QUIET)
    assert_same_state(result.model.state_dict(), state)
    assert_same_state(nncompress.load(out / "model").state_dict(), state)
    assert [(s.stage, s.quality) for s in result.report.stages] == qualities
    assert not partial.exists() and not (out / "progress.json").exists() and not (out / "owner").exists()
    assert json.loads((out / "report.json").read_text())["stages"][1]["stage"] == "01_finetune"


@pytest.mark.slow  # subprocesses / transformers loads: seconds each (CI runs the slow tier)
def test_sigterm_stops_the_cli_cleanly_and_resume_finishes_the_run(tmp_path, reference):
    state, _ = reference
    recipe, out = write_recipe(tmp_path), tmp_path / "run"
    # The SIGTERM comes from the data, halfway through stage 02's epoch (see sigterm_data).
    env = {**os.environ, sigterm_data.ENV: str(TRAIN_SAMPLES + TRAIN_SAMPLES // 2), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "nncompress.cli", "run", str(recipe), "--out", str(out), "--quiet",
                           "--cache", str(tmp_path / "cache")], capture_output=True, text=True, env=env)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.splitlines() == [
        f"nncompress: interrupted by SIGTERM: after 01_finetune (1 of 4 stages done), kept in {partial_dir(out)}; "
        f"resume with: nncompress run --resume {out}"]
    assert not out.exists() and not temporaries(tmp_path)
    assert sorted(p.name for p in (partial_dir(out) / "stages").iterdir()) == ["00_baseline", "01_finetune"]

    assert main(["run", "--resume", str(out), "--quiet", "--cache", str(tmp_path / "cache")]) == 0
    assert_same_state(nncompress.load(out / "model").state_dict(), state)
    assert not partial_dir(out).exists()


def test_a_killed_run_resumes_too(tmp_path, reference):
    """SIGKILL cannot be handled: the run dies where it stands, its owner file naming a dead process,
    and resuming it still ends with the uninterrupted run's model."""
    state, _ = reference
    recipe, out = write_recipe(tmp_path), tmp_path / "run"
    env = {**os.environ, sigterm_data.ENV: str(TRAIN_SAMPLES + 10), sigterm_data.SIGNAL_ENV: "KILL",
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "nncompress.cli", "run", str(recipe), "--out", str(out), "--quiet",
                             "--cache", str(tmp_path / "cache")], env=env)
    assert proc.wait() == -signal.SIGKILL
    assert (partial_dir(out) / "owner").read_text() == f"{proc.pid} {current_owner()[1]}\n"
    assert main(["run", "--resume", str(out), "--quiet", "--cache", str(tmp_path / "cache")]) == 0
    assert_same_state(nncompress.load(out / "model").state_dict(), state)
    assert not partial_dir(out).exists()


def interrupted_run(tmp_path, monkeypatch) -> Path:
    """A run stopped while training stage 02, as `run` leaves it."""
    recipe = load_recipe(write_recipe(tmp_path))
    with monkeypatch.context() as m:
        interrupt_on_call(m, runner, "apply", 2)
        with pytest.raises(RunInterrupted):
            run_recipe(recipe, tmp_path / "run", cache_dir=tmp_path / "cache", **QUIET)
    return tmp_path / "run"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_resume_refusals_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    out = interrupted_run(tmp_path, monkeypatch)
    changed = write_recipe(tmp_path, RECIPE.replace("ratio: 0.5", "ratio: 0.25"))
    assert main(["run", str(changed), "--resume", str(out), "--quiet"]) == 2
    assert "the recipe differs from the interrupted run's at stages[2].ratio (0.5 then, 0.25 now)" in one_error_line(capsys)
    assert main(["run", str(changed), "--out", str(out), "--quiet"]) == 2
    assert f"an interrupted run of it is kept in {partial_dir(out)}; continue it with" in one_error_line(capsys)
    assert main(["report", str(out)]) == 2
    assert f"the run was interrupted and is not finished; continue it with `nncompress run --resume {out}`" \
        in one_error_line(capsys)
    assert main(["run", "--resume", str(tmp_path / "never")]) == 2
    assert "no interrupted run to resume" in one_error_line(capsys)
    assert main(["run", "--resume", str(out), "--out", str(out)]) == 2
    assert "give either --out (a new run) or --resume" in one_error_line(capsys)

    (partial_dir(out) / "owner").write_text(f"{os.getppid()} {current_owner()[1]}\n")
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    assert f"process {os.getppid()} is running it now" in one_error_line(capsys)
    (partial_dir(out) / "owner").unlink()

    assert main(["run", "--resume", str(out), "--quiet", "--cache", str(tmp_path / "cache")]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    assert "the run is already complete; nothing to resume" in one_error_line(capsys)


def test_stale_temporaries_of_killed_runs_are_removed_and_live_data_kept(tmp_path, capsys):
    # A process that dies inside atomic_dir, as a killed run does: its temporary stays behind.
    script = ("import os, sys; from nncompress.export.atomic import atomic_dir\n"
              "writing = atomic_dir(sys.argv[1]); tmp = writing.__enter__(); (tmp / 'half.bin').write_bytes(b'x')\n"
              "os._exit(9)")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "killed")],
                   env={**os.environ, "PYTHONPATH": str(SRC)}, check=False)
    stale = temporaries(tmp_path)
    assert len(stale) == 1 and (stale[0] / "half.bin").is_file()
    with scratch_dir(tmp_path / "live") as live:  # this process's own: alive
        (tmp_path / ".other.partial").mkdir()  # another run's resumable data
        (tmp_path / ".legacy.abc123.tmp").mkdir()  # no owner in its name: cannot tell, kept
        recipe = load_recipe(write_recipe(tmp_path, RECIPE.split("stages:")[0]))
        logged = []
        run_recipe(recipe, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False, log=logged.append)
        assert not stale[0].exists() and live.is_dir()
    assert (tmp_path / ".other.partial").is_dir() and (tmp_path / ".legacy.abc123.tmp").is_dir()
    assert f"removed {stale[0]} (a temporary left by a run that was killed)" in logged


@pytest.mark.parametrize("module", ["nncompress.export.atomic", "nncompress.recipe.partial",
                                    "nncompress.recipe.schema", "nncompress.cli"])
def test_docstring_examples_run(module):
    import doctest
    import importlib
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
