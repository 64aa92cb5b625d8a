"""Layer pruning: dropping a residual block equals zeroing its residual branch; replay and reload."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import nncompress
from nncompress.core import ConfigError, Context, Targets, apply, history
from nncompress.prune.layers import (DropLayersConfig, adds_its_input, angular_distance, cosine_distance,
                                     find_blocks)
from nncompress.zoo.loaders import build_model
from nncompress.zoo.models import BasicBlock
from helpers import TinyData


class DictData:
    """A one-batch embedding data bundle of token dicts."""

    task = "embedding"

    def __init__(self, batch):
        self.calib = self.train = self.test = [batch]

    def example_batch(self, n):
        return {k: v[:n] for k, v in self.calib[0].items()}


def _trained_bn(name, kwargs=None, shape=(3, 8, 8)):
    model, _ = build_model({"name": name, "kwargs": kwargs or {}})
    model.train()
    with torch.no_grad():
        model(torch.randn(8, *shape))  # BN statistics off their defaults
    return model.eval()


def test_distances_by_hand():
    x, y = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert float(angular_distance(x, y)) == pytest.approx((0.5 + 0.0) / 2)
    assert float(cosine_distance(x, y)) == pytest.approx((1.0 + 0.0) / 2)
    tokens = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    other = tokens.clone()
    other[0, 2] = -other[0, 2]  # a padded token: ignored under the mask
    assert float(angular_distance(tokens, other, mask)) == pytest.approx(0.0, abs=1e-7)  # arccos near 1
    assert float(angular_distance(tokens, other)) > 0.0
    assert float(angular_distance(x, -x)) == pytest.approx(1.0) and math.isfinite(float(cosine_distance(x, 0 * x)))


def test_candidates_are_found():
    assert adds_its_input(BasicBlock(4, 4)) and not adds_its_input(BasicBlock(4, 8, stride=2))
    assert adds_its_input(_Residual(inplace=True), torch.randn(2, 6)) and not adds_its_input(_Plain())
    model = _trained_bn("resnet20")
    ctx = Context(targets=Targets())
    names = find_blocks(model, ctx, torch.randn(2, 3, 8, 8))
    assert names == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    ctx = Context(targets=Targets(include=("layer3.*",)))
    assert find_blocks(model, ctx, torch.randn(2, 3, 8, 8)) == ["layer3.1", "layer3.2"]
    mbv2 = _trained_bn("mobilenetv2", {"width_mult": 0.25})
    found = find_blocks(mbv2, Context(), torch.randn(2, 3, 8, 8))
    assert found and all(mbv2.get_submodule(n).use_residual for n in found)


class _Residual(nn.Module):
    def __init__(self, d=6, inplace=False):
        super().__init__()
        self.f, self.inplace = nn.Sequential(nn.Linear(d, d), nn.Tanh()), inplace

    def forward(self, x):
        y = self.f(x)
        if self.inplace:
            y += x
            return y
        return x + y


class _Plain(nn.Module):
    """Same shape in and out, no residual: never a candidate."""

    def __init__(self, d=6):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(d, d), nn.Tanh())

    def forward(self, x):
        return self.f(x)


class _Mixed(nn.Module):
    """Loose blocks in a Sequential and a one-block ModuleList; `gate` switches on a value (untraceable)."""

    def __init__(self, gate=False):
        super().__init__()
        self.body = nn.Sequential(_Residual(), _Plain(), _Residual(inplace=True), nn.Sequential(_Residual(), _Plain()))
        self.tail = nn.ModuleList([_Residual()])
        self.gate = gate

    def forward(self, x):
        x = self.body(x)
        if self.gate and float(x.sum()) > 1e9:
            return x
        return self.tail[0](x)


def test_loose_blocks_come_from_one_trace(monkeypatch):
    import nncompress.graph.flow as flow_mod
    from nncompress.graph.trace import trace
    traced = []
    monkeypatch.setattr(flow_mod, "trace", lambda *a: traced.append(1) or trace(*a))
    assert find_blocks(_Mixed(), Context(), torch.randn(4, 6)) == ["body.0", "body.2", "body.3.0", "tail.0"]
    assert len(traced) == 1
    # a Sequential whose first child is residual computes g(x + f(x)): not itself removable as x + f(x)
    assert find_blocks(_Mixed(), Context(targets=Targets(include=("body.3*",))), torch.randn(4, 6)) == ["body.3.0"]


class _GatedStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixed, self.stack = _Mixed(gate=True), nn.ModuleList([_Residual(), _Residual()])

    def forward(self, x):
        x = self.mixed(x)
        for block in self.stack:
            x = block(x)
        return x


def test_untraceable_model_keeps_its_stacks_and_says_why():
    msgs = []
    names = find_blocks(_GatedStack(), Context(log=msgs.append), torch.randn(4, 6))
    assert names == ["stack.0", "stack.1"]                             # the stack needs no trace
    assert len(msgs) == 1 and "targets.types" in msgs[0]
    assert "_GatedStack: torch.export cannot trace the model" in msgs[0]


def _zero_branch(model, names):
    """The oracle: the unpruned model with each named block's residual branch zeroed (last BN -> 0)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n in names:
            block = ref.get_submodule(n)
            bn = block.bn2 if isinstance(block, BasicBlock) else block.conv[-1]
            bn.weight.zero_()
            bn.bias.zero_()
    return ref


@pytest.mark.parametrize("name, kwargs, importance", [("resnet20", {}, "angular"), ("resnet20", {}, "loss"),
                                                      ("mobilenetv2", {"width_mult": 0.25}, "cosine")])
def test_dropping_blocks_equals_zeroing_their_branch_and_reloads(tmp_path, name, kwargs, importance):
    model = _trained_bn(name, kwargs)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    keep = copy.deepcopy(model)
    out = apply(model, DropLayersConfig(count=2, importance=importance), context=Context(data=TinyData(x, y)))
    removed = history(out)[-1]["record"]["removed"]
    assert len(removed) == 2 and all(isinstance(out.get_submodule(n), nn.Identity) for n in removed)
    with torch.no_grad():
        assert torch.equal(out(x), _zero_branch(keep, removed)(x))
    nncompress.save(out, tmp_path / "ck")
    again = nncompress.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(out(x), again(x))


@pytest.mark.parametrize("importance", ["angular", "cosine", "loss"])
def test_a_dead_block_is_dropped_first(importance):
    model = _zero_branch(_trained_bn("resnet20"), ["layer2.1"])
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    out = apply(model, DropLayersConfig(count=1, importance=importance), context=Context(data=TinyData(x, y)))
    record = history(out)[-1]["record"]
    assert record["scores"]["layer2.1"] == pytest.approx(0.0, abs=1e-6)
    assert record["removed"] == [min(record["scores"], key=record["scores"].get)]
    if importance != "loss":  # distances are >= 0; skipping a live block may also lower the loss
        assert record["removed"] == ["layer2.1"]


def test_dropping_nothing_changes_nothing():
    model = _trained_bn("resnet20")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    with torch.no_grad():
        before = model(x)
    out = apply(model, DropLayersConfig(ratio=0.0), context=Context(data=TinyData(x, y)))
    assert history(out)[-1]["record"]["removed"] == []
    with torch.no_grad():
        assert torch.equal(out(x), before)


def test_contiguous_window_and_ratio():
    model = _trained_bn("resnet20")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    out = apply(model, DropLayersConfig(count=2, contiguous=True), context=Context(data=TinyData(x, y)))
    removed = history(out)[-1]["record"]["removed"]
    parent = {n.rpartition(".")[0] for n in removed}
    idx = sorted(int(n.rpartition(".")[2]) for n in removed)
    assert len(parent) == 1 and idx[1] == idx[0] + 1
    out = apply(_trained_bn("resnet20"), DropLayersConfig(ratio=0.5), context=Context(data=TinyData(x, y)))
    assert len(history(out)[-1]["record"]["removed"]) == 3  # int(0.5 * 7)


def test_config_errors():
    with pytest.raises(ConfigError, match="count: give exactly one"):
        DropLayersConfig()
    with pytest.raises(ConfigError, match="importance: unknown layer criterion"):
        DropLayersConfig(count=1, importance="magic")
    with pytest.raises(ConfigError, match="contiguous"):
        DropLayersConfig(count=1, importance="loss", contiguous=True)
    model = _trained_bn("resnet20")
    with pytest.raises(ConfigError, match="importance: drop_layers scores blocks on calibration data"):
        apply(model, DropLayersConfig(count=1))
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    with pytest.raises(ConfigError, match="count: asks to remove 9 blocks"):
        apply(model, DropLayersConfig(count=9), context=Context(data=TinyData(x, y)))
    with pytest.raises(ConfigError, match="targets: no removable residual block"):
        apply(model, DropLayersConfig(count=1), targets=Targets(include=("fc",)), context=Context(data=TinyData(x, y)))


def _tokens(vocab=100, n=3, t=7):
    ids = torch.randint(0, vocab, (n, t))
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_bert_layers_are_removed_and_save_pretrained_round_trips(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=16)
    model = BertModel(cfg).eval()
    batch = _tokens()
    ref = copy.deepcopy(model)
    out = apply(model, DropLayersConfig(count=2), context=Context(data=DictData(batch)))
    removed = history(out)[-1]["record"]["removed"]
    assert len(removed) == 2 and all(n.startswith("encoder.layer.") for n in removed)
    assert out.config.num_hidden_layers == 2 and len(out.encoder.layer) == 2
    for n in removed:  # oracle: the unpruned model whose removed layers return their input
        ref.get_submodule(n).forward = lambda hidden_states, *a, **k: hidden_states
    with torch.no_grad():
        got = out(**batch).last_hidden_state
        assert torch.allclose(got, ref(**batch).last_hidden_state, atol=1e-6)
        out.save_pretrained(tmp_path / "hf")
        again = BertModel.from_pretrained(tmp_path / "hf").eval()
        assert torch.equal(again(**batch).last_hidden_state, got)
    # replay from the record alone rebuilds the same structure on a fresh model
    fresh = nncompress.core.replay(BertModel(BertConfig(**{**cfg.to_dict(), "num_hidden_layers": 4})),
                                   history(out))
    assert len(fresh.encoder.layer) == 2 and fresh.config.num_hidden_layers == 2


def test_llama_layers_renumber_their_cache_slots():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    batch = {"input_ids": torch.randint(0, 100, (2, 6)), "use_cache": False}
    ref = copy.deepcopy(model)
    out = apply(model, DropLayersConfig(count=1), context=Context(data=DictData(batch)))
    (removed,) = history(out)[-1]["record"]["removed"]
    with torch.no_grad():  # pre-norm residual blocks: zero both output projections == identity
        ref.get_submodule(removed).self_attn.o_proj.weight.zero_()
        ref.get_submodule(removed).mlp.down_proj.weight.zero_()
        assert torch.allclose(out(**batch).logits, ref(**batch).logits, atol=1e-5)
        assert [layer.self_attn.layer_idx for layer in out.model.layers] == [0, 1, 2]
        assert out.config.num_hidden_layers == 3
        cached = out(input_ids=batch["input_ids"], use_cache=True)  # the KV cache has one slot per layer
        assert torch.allclose(cached.logits, out(**batch).logits, atol=1e-5)
