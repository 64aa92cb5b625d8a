"""Per-format latency tables: every layer timed alone as it is and in each candidate, cached by shape."""
import json

import pytest
import torch
import torch.nn as nn

from nncompress.core import ConfigError, DataError, lookup
from nncompress.eval.format_table import build_format_table
from nncompress.export.deployed import export_deployed


class Twin(nn.Module):
    """Two layers of one shape on inputs of one shape (a transformer's q and k), and a third."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.out = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.out(self.q(x) * self.k(x))


def test_every_layer_in_every_format_and_the_plan_predicted_from_them(tmp_path):
    torch.manual_seed(0)
    net, x = Twin().eval(), torch.randn(8, 32)
    formats = {"q": {"narrow": nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 32))}, "out": {}}
    t = build_format_table(net, x, formats, threads=1, warmup=1, repeats=3, cache_dir=tmp_path)
    assert sorted(t.ms) == ["out", "q"] and sorted(t.ms["q"]) == ["current", "narrow"]
    assert all(v > 0 for row in t.ms.values() for v in row.values()) and t.batch == 8 and t.threads == 1
    assert t.predict({}) == t.full_ms
    assert t.predict({"q": "narrow"}) == pytest.approx(t.full_ms + t.ms["q"]["narrow"] - t.ms["q"]["current"])
    # cached per (module structure, input shape): q and k would share one entry; the file holds what was timed
    cached = json.loads(next((tmp_path / "latency").glob("*.json")).read_text())
    assert len([k for k in cached if k.startswith("format|")]) == 4   # empty call, q, narrow, out
    again = build_format_table(net, x, {"k": {}}, threads=1, warmup=1, repeats=3, cache_dir=tmp_path)
    assert again.ms["k"]["current"] == t.ms["q"]["current"]           # k is q's shape: read, not timed


def test_onnxruntime_layers_are_timed_as_they_deploy(tmp_path):
    net, x = Twin().eval(), torch.randn(8, 32)
    t = lookup("format_table", "measure")(net, x, {"q": {"same": nn.Linear(32, 32)}}, runtime="onnxruntime",
                                          threads=1)
    assert t.runtime == "onnxruntime" and t.ms["q"]["same"] > 0 and t.full_ms > 0
    with pytest.raises(ConfigError, match="to_onnx"):
        build_format_table(net, x, {"q": {}}, runtime="onnxruntime")
    assert export_deployed(net, x, tmp_path / "m.onnx").is_file()


def test_bad_requests_are_named():
    net, x = Twin().eval(), torch.randn(8, 32)
    with pytest.raises(ConfigError, match="'current' is the label of the layer as it is"):
        build_format_table(net, x, {"q": {"current": nn.Linear(32, 32)}})
    with pytest.raises(ConfigError, match="runtime"):
        build_format_table(net, x, {"q": {}}, runtime="tvm")
    skip = nn.ModuleDict({"used": nn.Linear(32, 4), "unused": nn.Linear(32, 4)})
    skip.forward = lambda x: skip["used"](x)
    with pytest.raises(DataError, match="'unused' did not run"):
        build_format_table(skip, x, {"unused": {}})
