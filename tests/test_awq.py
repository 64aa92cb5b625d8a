"""quant/awq.py: the scale search beats round-to-nearest where inputs have salient channels, never loses
on its objective, leaves the float model unchanged, and composes with quantize and save/load."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TinyData

import nncompress
from nncompress.core import ConfigError, Context, apply, history
from nncompress.formats import IntFormat, PerGroup
from nncompress.formats import MXFP4
from nncompress.quant import AWQConfig, QuantizeConfig, QuantSpec, SmoothedLinear, awq_scales, round_to_nearest

W4 = QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=8))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _salient(n=512, d=32, seed=0):
    """Inputs whose channels 0-3 are 20x the others (the salient channels AWQ protects)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :4] *= 20
    return x


def test_search_beats_round_to_nearest_on_salient_channels_and_never_loses():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    x = _salient()
    s, alpha, err = awq_scales([w], x.T @ x, x.pow(2).mean(0).sqrt(), W4, grid=20)
    assert alpha > 0 and err["awq"] < 0.7 * err["rtn"]
    out = lambda v: (x @ v.T)  # noqa: E731
    measured = float((out(round_to_nearest(w * s, W4) / s) - out(w)).pow(2).sum())
    assert measured == pytest.approx(err["awq"], rel=1e-3)        # the Gram form is the real output error
    x_flat = torch.randn(512, 32)                                 # no salient channel: alpha 0 (RTN) may win
    _, _, flat = awq_scales([w], x_flat.T @ x_flat, x_flat.pow(2).mean(0).sqrt(), W4, grid=20)
    assert flat["awq"] <= flat["rtn"]


class Block(nn.Module):
    """ln feeds fc1 alone (its scale folds into the norm); fc2 reads a ReLU (scaled alone, explicit)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(32), nn.Linear(32, 64), nn.Linear(64, 8)
        with torch.no_grad():
            self.ln.weight[:4] = 20.0                             # salient channels at fc1's input

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.ln(x))))


def test_awq_then_w4_beats_w4_alone_on_held_out_data_and_round_trips(tmp_path):
    data = TinyData(torch.randn(256, 32), torch.zeros(256, dtype=torch.long))
    held_out = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    model = Block().eval()
    with torch.no_grad():
        ref = model(held_out)
    scaled = apply(copy.deepcopy(model), AWQConfig(weight=W4), context=Context(data=data))
    record = history(scaled)[-1]["record"]
    assert {g["mode"] for g in record["groups"]} == {"folded", "explicit"}
    assert all(g["error_awq"] <= g["error_rtn"] for g in record["groups"])
    assert isinstance(scaled.fc2, SmoothedLinear)
    with torch.no_grad():
        assert torch.allclose(scaled(held_out), ref, atol=1e-4)   # the float model is unchanged
    err = {}
    for name, m in (("rtn", copy.deepcopy(model)), ("awq", scaled)):
        q = apply(m, QuantizeConfig(weight=W4), context=Context(data=data))
        with torch.no_grad():
            err[name] = float((q(held_out) - ref).pow(2).mean())
        if name == "awq":
            nncompress.save(q, tmp_path / "ck", source={"name": "test_awq:Block"})
            with torch.no_grad():
                assert torch.equal(nncompress.load(tmp_path / "ck", trust_code=True)(held_out), q(held_out))
    assert err["awq"] < err["rtn"]


def test_awq_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="weight.format"):
        AWQConfig(weight=QuantSpec(format=MXFP4))
    with pytest.raises(ConfigError, match="grid"):
        AWQConfig(grid=0)
    with pytest.raises(ConfigError, match="calibration data"):
        net = Block()
        net.input_shape = (32,)
        apply(net, AWQConfig())
