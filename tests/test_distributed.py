"""Data-parallel training under torchrun (core.distributed): real 2-process gloo runs on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from nncompress import cli
from nncompress.core import distributed

HERE = Path(__file__).parent


def torchrun(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_shard_splits_every_batch_tensor_and_shares_the_rest():
    x, y, mask = torch.arange(14).view(7, 2), torch.arange(7), torch.ones(3)
    first = distributed.shard({"x": x, "y": y, "mask": mask, "note": "a"}, 7, 0, 2)
    second = distributed.shard((x, y), 7, 1, 2)
    assert first["x"].tolist() == x[:3].tolist() and first["y"].tolist() == [0, 1, 2]
    assert first["mask"] is mask and first["note"] == "a"  # not batch-sized: shared as is
    assert second[1].tolist() == [3, 4, 5, 6] and isinstance(second, tuple)
    assert distributed.batch_size([None, {"input_ids": x}]) == 7


def test_one_process_is_untouched():
    sync = distributed.GradientSync()
    batch = (torch.ones(5, 2), torch.zeros(5))
    assert not sync.active and sync.split(batch) == (batch, 1.0)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    assert sync.reduce([p], 0.5) == 0.5 and p.grad.tolist() == [3.0, 3.0]


def test_commands_that_do_not_train_refuse_torchrun(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["search", str(tmp_path / "none.yaml"), "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "runs in one process" in err and "torchrun" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("case", ["plain", "bn", "qat"])
def test_fit_on_two_processes_matches_one(tmp_path, case):
    """Global batches of 7 split 3 / 4, a parameter trained outside the model, SAM: two ranks end where
    one process does (float reduction order aside); so does a model with BatchNorm, whose statistics
    are taken over the global batch (running ones included), and an activation quantizer whose
    percentile observer keeps tracking while training (it sees the global batch's rows)."""
    done = torchrun(str(HERE / "ddp_fit.py"), str(tmp_path / "r.json"), case, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    a, b = (torch.tensor(s) for s in r["ranks"])
    assert torch.equal(a, b)  # replicas never drift
    assert r["parallel"] == pytest.approx(r["single"], rel=1e-5)
    assert torch.allclose(a, torch.tensor(r["single_state"]), atol=1e-5)


@pytest.mark.slow
def test_recipe_under_torchrun_matches_one_process_and_only_rank0_writes(tmp_path):
    recipe = {"name": "ddp", "seed": 0, "data": "digits",
              "model": {"name": "mlp", "kwargs": {"in_features": 64, "hidden": [64]},
                        "pretrain": {"epochs": 2, "lr": 0.003}},
              "measure": {"batch_sizes": [1], "repeats": 3},
              "stages": [{"kind": "finetune", "epochs": 2, "kd_alpha": 0.5},
                         {"kind": "sparsify", "ratio": 0.5, "importance": "sparsegpt"}]}  # calibration dealt out
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    one = subprocess.run([sys.executable, "-m", "nncompress.cli", "run", "r.yaml", "--out", "one", "--cache", "c1",
                          "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("-m", "nncompress.cli", "run", "r.yaml", "--out", "two", "--cache", "c2", "--quiet", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run directory:") == 1  # rank 0 alone reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1", "c2", "one", "r.yaml", "two"]
    assert len(list((tmp_path / "c2" / "pretrained").iterdir())) == 1

    def history(run):
        manifest = json.loads((tmp_path / run / "model" / "manifest.json").read_text())
        return [h["record"]["epoch_losses"] for h in manifest["history"] if "epoch_losses" in h.get("record", {})]

    def stages(run):
        return [(s["stage"], s["quality"]) for s in json.loads((tmp_path / run / "report.json").read_text())["stages"]]

    assert history("two")[0] == pytest.approx(history("one")[0], rel=1e-4)
    assert [q for _, q in stages("two")] == pytest.approx([q for _, q in stages("one")], abs=0.006)  # 1 digit of 360


@pytest.mark.slow
def test_calibration_deals_batches_across_ranks_and_matches_one_process(tmp_path):
    """3 calibration batches on 2 ranks (two and one): Gram, absmax, means and counts all-reduced equal
    one process's; GPTQ and SparseGPT block by block give the same model on both ranks as alone."""
    done = torchrun(str(HERE / "ddp_calib.py"), str(tmp_path / "r.json"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    a, b = r["ranks"]
    assert (a.pop("fed"), b.pop("fed"), r["single"].pop("fed")) == (2, 1, 3)  # batches 0, 2 | 1 | all
    assert a == b  # every rank holds the same statistics and the same compressed model
    single = r["single"]
    assert sorted(a) == sorted(single) and a["model.model.layers.1.self_attn.q_proj.count"] == 3 * 4 * 32
    for key, value in single.items():
        assert torch.allclose(torch.tensor(a[key], dtype=torch.float64), torch.tensor(value, dtype=torch.float64),
                              rtol=1e-6, atol=1e-6), key
