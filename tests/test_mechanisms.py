"""The two shared mechanisms in core: layer surgery (wrapper protocol, recorded edits, replay,
composition) and calibration (one feed, one pass, statistics against float64 oracles)."""
import doctest

import pytest
import torch
import torch.nn as nn

from helpers import TinyData
from nncompress.core import (Context, Edits, ModelLoadError, Targets, apply, calibration, config, feeding, history, hooks,
                             merge, wrappers,
                             objectives, replay, surgery)
from nncompress.core.calibration import calibrate, capturing, feed, gradient_sums, output_of, sequential_blocks
from nncompress.formats import IntFormat
from nncompress.lowrank import LowRankConfig, LowRankLinear
from nncompress.prune import granularity
from nncompress.quant import QuantizeConfig, QuantLinear, QuantSpec


@pytest.mark.parametrize("module", [surgery, wrappers, calibration, feeding, hooks, objectives, config, granularity],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_merge_docstring_runs():
    assert doctest.testmod(__import__("nncompress.core.merge", fromlist=["x"])).failed == 0


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


# ------------------------------------------------------------------------------------ surgery


def test_history_holds_the_edits_and_replay_rebuilds_the_structure_without_running_the_transform():
    model = apply(_mlp(), LowRankConfig(rank=3), targets=Targets(include=("2",)))
    (entry,) = history(model)
    (edit,) = entry["edits"]
    assert edit["edit"] == "swap" and edit["name"] == "2" and edit["module"]["wrapper"] == "lowrank_linear"
    rebuilt = replay(_mlp(), history(model))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_quantizing_low_rank_factors_nests_and_replays():
    data = TinyData(torch.randn(16, 8), torch.randint(0, 4, (16,)))
    model = apply(_mlp(), LowRankConfig(rank=3), targets=Targets(include=("2",)))
    model = apply(model, QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=4))), context=Context(data=data))
    assert isinstance(model[2], LowRankLinear) and isinstance(model[2].first, QuantLinear)
    again = replay(_mlp(), history(model))
    again.load_state_dict(model.state_dict())
    x = torch.randn(5, 8)
    assert torch.equal(again(x), model(x))


def test_low_rank_of_a_quantized_layer_gives_quantized_factors():
    data = TinyData(torch.randn(16, 8), torch.randint(0, 4, (16,)))
    spec = QuantSpec(format=IntFormat(bits=8, signed=False, symmetric=False))
    model = apply(_mlp(), QuantizeConfig(activation=spec, calib_batches=1), context=Context(data=data))
    scale = model[2].input_quant.scale.clone()
    model = apply(model, LowRankConfig(rank=3), targets=Targets(include=("2",)))
    low = model[2]
    assert isinstance(low, LowRankLinear) and isinstance(low.first, QuantLinear) and isinstance(low.second, QuantLinear)
    assert low.second.input_quant is None                 # only the first factor reads layer 2's input...
    assert torch.equal(low.first.input_quant.scale, scale)  # ... and keeps its calibrated range
    assert history(model)[-1]["edits"][0]["module"]["first"]["wrapper"] == "quant_linear"


def test_merge_undoes_every_wrapper_innermost_first_and_is_recorded():
    data = TinyData(torch.randn(16, 8), torch.randint(0, 4, (16,)))
    model = apply(_mlp(), LowRankConfig(rank=3), targets=Targets(include=("2",)))
    model = apply(model, QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=4))), context=Context(data=data))
    x = torch.randn(5, 8)
    y = model(x)
    plain = merge(model)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in plain.modules())
    assert torch.allclose(plain(x), y, atol=1e-5)
    assert [e["config"]["kind"] for e in history(plain)] == ["lowrank", "quantize", "merge"]
    again = replay(_mlp(), history(plain))
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in again.modules())


def test_a_touched_layer_is_described_in_full_not_as_the_layer_that_was_there():
    model = _mlp()
    edits = Edits()
    edits.touch(model, "0")
    model[0].bias = None                                   # an in-place structural change
    (edit,) = edits.finalize(model)
    assert edit["module"] == {"plain": "Linear", "args": {"in_features": 8, "out_features": 16, "bias": False},
                              "dtype": "float32"}
    again = surgery.replay_edits(_mlp(), [edit])
    assert again[0].bias is None


def test_replaying_an_unknown_wrapper_or_edit_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="unknown edit 'teleport'"):
        surgery.replay_edits(_mlp(), [{"edit": "teleport"}])
    with pytest.raises(ModelLoadError, match="unknown layer wrapper 'magic'"):
        surgery.replay_edits(_mlp(), [{"edit": "swap", "name": "0", "module": {"wrapper": "magic"}}])
    with pytest.raises(ModelLoadError, match="cannot build a 'Bilinear' layer"):
        surgery.replay_edits(_mlp(), [{"edit": "swap", "name": "0", "module": {"plain": "Bilinear", "args": {}}}])


# ------------------------------------------------------------------------------------ calibration


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 8, generator=g), torch.zeros(6, dtype=torch.long)) for _ in range(3)]


def test_statistics_equal_a_float64_oracle():
    model = _mlp().eval()
    stats = calibrate(model, _batches(), {"2": ("gram", "sqnorm", "absmax", "mean", "out_absmean")}, batches=3)
    with torch.no_grad():
        xs = torch.cat([model[1](model[0](x)) for x, _ in _batches()]).double()     # layer 2's inputs
        ys = torch.cat([model[2](model[1](model[0](x))) for x, _ in _batches()]).double()
    st = stats["2"]
    assert st.count == 18
    torch.testing.assert_close(st.gram(), xs.T @ xs)
    torch.testing.assert_close(st.norm(), xs.norm(dim=0))
    torch.testing.assert_close(st.absmax.double(), xs.abs().amax(0))
    torch.testing.assert_close(st.mean(), xs.mean(0))
    torch.testing.assert_close(st.out_absmean(), ys.abs().mean(0))


def test_the_forward_stops_after_the_last_module_asked_about():
    model = _mlp().eval()
    ran = []
    model[4].register_forward_hook(lambda *a: ran.append(1))  # the test's own probe of what runs
    calibrate(model, _batches(), {"0": ("count",)}, batches=3)
    assert ran == []


def test_padding_tokens_are_left_out():
    lin = nn.Linear(4, 2)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, input_ids, attention_mask):
            return self.lin(input_ids.float().unsqueeze(-1).expand(-1, -1, 4))

    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])}
    st = calibrate(Tokens(), [batch], {"lin": ("count", "absmax")}, batches=1)["lin"]
    assert st.count == 4 and st.absmax.tolist() == [4.0] * 4


def test_first_group_shares_one_input():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            return self.o(self.q(x) + self.k(x) * self.v(x))

    model = QKV()
    found = calibrate(model, _batches(), {n: ("gram",) for n in ("q", "k", "v", "o")}, batches=3, first_group=True)
    assert list(found) == ["q", "k", "v"] and found["q"] is found["k"] is found["v"]
    xs = torch.cat([x for x, _ in _batches()]).double()
    torch.testing.assert_close(found["q"].gram(), xs.T @ xs)


def test_gradient_sums_restore_grads_and_mode():
    model = _mlp().train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    grads, sq = gradient_sums(model, _batches(), loss, 3, squares=True)
    ref = torch.zeros_like(model[0].weight)
    for b in _batches():
        g, = torch.autograd.grad(loss(model.eval(), b), [model[0].weight])
        ref += g
    model.train()
    torch.testing.assert_close(grads["0.weight"], ref)
    assert model.training and torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))


def test_capture_and_output_of():
    model = _mlp()
    x = torch.randn(2, 8)
    with capturing(model, ["1"]) as out:
        y = feed(model, x)
    assert out["1"].requires_grad and torch.equal(out["1"], torch.relu(model[0](x)))
    assert torch.equal(output_of(model, "1", x), out["1"])
    assert y.shape == (2, 4)


def test_sequential_blocks_see_the_compressed_outputs_before_them():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)).eval()
    seen = {}

    def step(name, block, inputs):
        seen[name] = torch.cat([a[0] for a, _ in inputs.calls])
        with torch.no_grad():
            block.weight.zero_()                           # "compress" the block: it now outputs its bias
    sequential_blocks(model, ["0", "1", "2"], _batches(), 3, step)
    xs = torch.cat([x for x, _ in _batches()])
    assert torch.equal(seen["0"], xs)
    assert torch.equal(seen["1"], model[0].bias.detach().expand(18, 8))   # block 0 already compressed
    assert torch.equal(seen["2"], model[1].bias.detach().expand(18, 8))
