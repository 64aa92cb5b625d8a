"""save/load: safetensors + manifest, rebuilt without pickle, outputs identical bit for bit."""
import json

import pytest
import torch
import torch.nn as nn

import nncompress
from nncompress.core import ConfigError, ModelLoadError
from nncompress.zoo.loaders import build_model


@pytest.mark.parametrize("name, kwargs", [("mnist1d_cnn", {}), ("mlp", {}), ("resnet20", {}),
                                          ("mobilenetv2", {})])
def test_round_trip_is_bit_exact(tmp_path, name, kwargs):
    model, _ = build_model({"name": name, "kwargs": kwargs})
    model.train()
    for _ in range(2):  # move BatchNorm running statistics away from their defaults
        model(torch.randn(8, *model.input_shape))
    model.eval()
    nncompress.save(model, tmp_path / "ck", source={"name": name, "kwargs": kwargs})
    again = nncompress.load(tmp_path / "ck")
    x = torch.randn(4, *model.input_shape)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not list(tmp_path.glob("ck/.*.tmp"))


def test_user_factory_and_tied_weights(tmp_path, monkeypatch):
    (tmp_path / "tiedmod.py").write_text(
        "import torch.nn as nn\n"
        "class Tied(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = nn.Embedding(10, 4)\n"
        "        self.out = nn.Linear(4, 10, bias=False)\n"
        "        self.out.weight = self.emb.weight\n"
        "    def forward(self, x):\n"
        "        return self.out(self.emb(x))\n"
        "def make():\n"
        "    return Tied()\n")
    monkeypatch.chdir(tmp_path)
    model, _ = build_model({"name": "tiedmod:make"})
    with torch.no_grad():
        model.emb.weight.mul_(3)
    nncompress.save(model, tmp_path / "ck", source={"name": "tiedmod:make"})
    again = nncompress.load(tmp_path / "ck", trust_code=True)  # the manifest imports the user's module
    assert again.out.weight is again.emb.weight
    x = torch.arange(10)
    assert torch.equal(model(x), again(x))


@pytest.mark.slow  # subprocesses / transformers loads: seconds each (CI runs the slow tier)
def test_hf_minilm_round_trip(tmp_path):
    model, tok = build_model({"name": "hf:minilm"})
    with torch.no_grad():
        model.model.encoder.layer[0].attention.self.query.weight.add_(0.01)
    nncompress.save(model, tmp_path / "ck", source={"name": "hf:minilm"})
    again = nncompress.load(tmp_path / "ck")
    batch = tok(["a small test sentence", "another one"], return_tensors="pt", padding=True)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs), again(**inputs))


def _saved(tmp_path):
    model, _ = build_model({"name": "mlp"})
    return nncompress.save(model, tmp_path / "ck", source={"name": "mlp"})


def test_corrupt_weights_are_refused(tmp_path):
    path = _saved(tmp_path)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="checksum does not match"):
        nncompress.load(path)


def test_truncated_manifest_is_refused(tmp_path):
    path = _saved(tmp_path)
    (path / "manifest.json").write_text((path / "manifest.json").read_text()[:40])
    with pytest.raises(ModelLoadError, match="manifest.json: not valid JSON"):
        nncompress.load(path)


def test_mismatched_architecture_is_refused(tmp_path):
    path = _saved(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["source"] = {"name": "mlp", "kwargs": {"hidden": [16]}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="do not belong together"):
        nncompress.load(path)


def test_missing_folder_and_unknown_source(tmp_path):
    with pytest.raises(ModelLoadError, match="no manifest.json here"):
        nncompress.load(tmp_path)
    with pytest.raises(ModelLoadError, match="architecture source is unknown"):
        nncompress.save(nn.Linear(2, 2), tmp_path / "x")


# ------------------------------------------------------------------------------------- hostile folders


def _edit_manifest(path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    for key, value in changes.items():
        target = manifest
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_manifest_cannot_run_code_without_trust(tmp_path):
    path = _saved(tmp_path)
    marker = tmp_path / "ran"
    _edit_manifest(path, source={"name": "os:system", "kwargs": {"command": f"touch {marker}"}})
    with pytest.raises(ModelLoadError, match="'os:system', which imports and runs code; load it with trust_code=True"):
        nncompress.load(path)
    assert not marker.exists()  # refused before anything was imported or called


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_a_manifest_cannot_name_files_outside_its_folder(tmp_path, name):
    path = _saved(tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    _edit_manifest(path, **{"weights.file": name})
    with pytest.raises(ModelLoadError, match="outside the checkpoint folder"):
        nncompress.load(path)


def test_a_link_out_of_the_folder_is_refused(tmp_path):
    path = _saved(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (path / "model.safetensors").rename(outside)
    (path / "model.safetensors").symlink_to(outside)
    with pytest.raises(ModelLoadError, match="outside the checkpoint folder"):
        nncompress.load(path)


def test_the_checksum_is_of_the_bytes_that_load(tmp_path):
    # a second weights file with a matching checksum does not help: the named file is what loads
    path = _saved(tmp_path)
    other, _ = build_model({"name": "mlp"})
    nncompress.save(other, tmp_path / "other", source={"name": "mlp"})
    (path / "decoy.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    (path / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="checksum does not match"):
        nncompress.load(path)


def test_save_never_replaces_a_users_folder_silently(tmp_path):
    model, _ = build_model({"name": "mlp"})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds files nncompress did not write \\('notes.txt'"):
        nncompress.save(model, mine)
    assert (mine / "notes.txt").read_text() == "keep me" and not (mine / "manifest.json").exists()
    nncompress.save(model, tmp_path / "ck")
    nncompress.save(model, tmp_path / "ck")                      # its own checkpoint: replaced
    nncompress.save(model, mine, overwrite=True)                 # told to
    assert sorted(p.name for p in mine.iterdir()) == ["manifest.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_save_to_a_path_under_a_file_is_a_clear_error(tmp_path):
    model, _ = build_model({"name": "mlp"})
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="a_file is a file, not a folder"):
        nncompress.save(model, tmp_path / "a_file" / "ck")
