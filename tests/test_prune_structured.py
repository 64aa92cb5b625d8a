"""Structured pruning: criteria, budgets, schedules, and that the model really shrinks and reloads."""

import pytest
import torch
import torch.nn as nn

import nncompress
from nncompress.core import ConfigError, Context, Targets, apply
from nncompress.graph import build_graph
from nncompress.prune.structured import PruneConfig, count_macs, group_lasso_penalty
from nncompress.zoo.loaders import build_data, build_model
from helpers import TinyData


class ConvBN(nn.Module):
    """conv -> bn -> relu -> conv -> pool -> linear: groups conv1/bn1/conv2[in] and conv2/fc[in]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(8)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv1d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.input_shape = (1, 16)

    def forward(self, x):
        return self.fc(self.conv2(self.act(self.bn1(self.conv1(x)))).mean(-1))


def _dead_channels(model, channels):
    """Make channels of bn1 output exactly zero after ReLU: gamma = 0, beta = -1."""
    with torch.no_grad():
        for c in channels:
            model.bn1.weight[c] = 0.0
            model.bn1.bias[c] = -1.0
    return model.eval()


def test_config_validation():
    with pytest.raises(ConfigError, match="ratio: must be in"):
        PruneConfig(ratio=1.0)
    with pytest.raises(ConfigError, match="importance: unknown criterion 'magic'"):
        PruneConfig(importance="magic")
    with pytest.raises(ConfigError, match="penalty_epochs"):
        PruneConfig(penalty="group_lasso")
    with pytest.raises(ConfigError, match="keep_macs: must be a fraction"):
        PruneConfig(keep_macs=2.0)


@pytest.mark.parametrize("importance", ["bn_scale", "taylor", "fisher", "activation"])
def test_dead_channels_are_found_and_removing_them_changes_nothing(importance):
    torch.manual_seed(0)
    model = _dead_channels(ConvBN(), [1, 5])
    x = torch.randn(6, 1, 16)
    y = torch.randint(0, 3, (6,))
    data = TinyData(x, y)
    before = model(x)
    # only conv1's group (the one with the dead channels) is targeted
    pruned = apply(model, PruneConfig(ratio=0.25, importance=importance), targets=Targets(include=("conv1",)),
                   context=Context(data=data))
    assert pruned.conv1.out_channels == 6 and pruned.bn1.num_features == 6 and pruned.conv2.in_channels == 6
    torch.testing.assert_close(pruned(x), before, rtol=0, atol=1e-6)


def test_l1_prunes_the_smallest_filters():
    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():
        model.conv1.weight[3].mul_(1e-3)
        model.conv1.weight[6].mul_(1e-3)
        model.conv2.weight[:, 3].mul_(1e-3)
        model.conv2.weight[:, 6].mul_(1e-3)
        kept = [c for c in range(8) if c not in (3, 6)]
        expected = model.conv1.weight[kept].clone()
    pruned = apply(model, PruneConfig(ratio=0.25, importance="l1"))
    assert torch.equal(pruned.conv1.weight, expected)


def test_mnist1d_cnn_shrinks_for_real_and_round_to_holds():
    model, _ = build_model({"name": "mnist1d_cnn"})
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(4, 40)
    pruned = apply(model, PruneConfig(ratio=0.5, round_to=8))
    assert pruned(x).shape == (4, 10)
    assert sum(p.numel() for p in pruned.parameters()) < 0.4 * params
    for m in pruned.modules():
        if isinstance(m, nn.Conv1d):
            assert m.out_channels % 8 == 0


def test_keep_macs_is_met_by_the_real_count():
    model, _ = build_model({"name": "resnet20"})
    model.eval()
    x = torch.zeros(2, 3, 32, 32)
    base = count_macs(model, x)
    pruned = apply(model, PruneConfig(keep_macs=0.5, scope="global"))
    macs = count_macs(pruned, x)
    assert 0.35 * base < macs <= 0.5 * base


def test_an_unreachable_budget_is_an_error_not_a_larger_model():
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 16, "hidden": [8]}})
    before = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"keep_params: 0.02 of the parameters is out of reach: removing 95%"):
        apply(model.eval(), PruneConfig(keep_params=0.02))
    assert {k: v.shape for k, v in model.state_dict().items()} == before  # nothing was cut


def test_iterative_schedule_reaches_the_one_shot_width():
    a, _ = build_model({"name": "mlp"})
    b, _ = build_model({"name": "mlp"})
    b.load_state_dict(a.state_dict())
    one = apply(a.eval(), PruneConfig(ratio=0.5))
    three = apply(b.eval(), PruneConfig(ratio=0.5, steps=3))
    assert [m.out_features for m in one.modules() if isinstance(m, nn.Linear)] == \
           [m.out_features for m in three.modules() if isinstance(m, nn.Linear)]


def test_global_scope_ranks_channels_across_groups():
    torch.manual_seed(0)
    model, _ = build_model({"name": "mlp", "kwargs": {"hidden": [64, 64]}})
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():  # half of the first hidden layer's neurons are near-dead
        lin[0].weight[:32].mul_(1e-3)
        lin[1].weight[:, :32].mul_(1e-3)
    # 25% of all 128 hidden neurons = the 32 dead ones, all from the first group
    pruned = apply(model.eval(), PruneConfig(ratio=0.25, scope="global", importance="l1"))
    widths = [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)]
    assert widths[:2] == [32, 64]


def test_group_lasso_penalty_matches_hand_computation():
    model = ConvBN().eval()
    group = build_graph(model, torch.zeros(2, 1, 16)).group_of("conv1")
    # Each channel's parameters across conv1 (weight, bias), bn1 (weight, bias) and conv2's input column.
    per_channel = []
    for c in range(8):
        parts = [model.conv1.weight[c].flatten(), model.conv1.bias[c:c + 1], model.bn1.weight[c:c + 1],
                 model.bn1.bias[c:c + 1], model.conv2.weight[:, c].flatten()]
        per_channel.append(torch.cat(parts).pow(2).sum().sqrt())
    expected = torch.stack(per_channel).sum()
    torch.testing.assert_close(group_lasso_penalty(model, [group], alpha=0.0), expected, rtol=1e-5, atol=1e-6)


def test_pruned_model_saves_and_reloads_bit_exact(tmp_path, cache_dir):
    data = build_data({"name": "mnist1d", "kwargs": {"cache_dir": str(cache_dir)}})
    model, _ = build_model({"name": "mnist1d_cnn"})
    model.eval()
    pruned = apply(model, PruneConfig(ratio=0.3, importance="taylor", calib_batches=2),
                   context=Context(data=data))
    nncompress.save(pruned, tmp_path / "ck")
    again = nncompress.load(tmp_path / "ck")
    x = data.example_batch(8)
    assert torch.equal(pruned(x), again(x))
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in pruned.parameters())


def test_recipe_stage_prune(tmp_path):
    from nncompress.recipe import parse_recipe
    recipe = parse_recipe({"name": "p", "model": {"name": "mlp", "kwargs": {"in_features": 64}},
                           "data": "digits",
                           "stages": [{"kind": "prune", "ratio": 0.5, "importance": "l2",
                                       "targets": {"exclude": ["head*"]}}]})
    assert recipe.stages[0].config.ratio == 0.5
    with pytest.raises(ConfigError, match=r"stages\[0\].ratio: must be in \[0, 1\)"):
        parse_recipe({"stages": [{"kind": "prune", "ratio": 1.5}]})
