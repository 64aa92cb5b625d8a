"""Kernel-level pruning into grouped convolutions: the grouped module equals the masked dense conv."""
import copy
import itertools

import pytest
import torch
import torch.nn as nn

import nncompress
from nncompress.core import TargetError
from nncompress.core import ConfigError, Targets, apply
from nncompress.prune.kernels import (GroupConvConfig, GroupedConv, balanced_assign, group_partition,
                                      kernel_group_mask, kernel_scores)
from nncompress.zoo.loaders import build_model


def _masked_reference(conv: nn.Module, out_group, in_group, x: torch.Tensor) -> torch.Tensor:
    """float64 dense conv with the cross-group kernels zeroed: the oracle."""
    mask = kernel_group_mask(out_group, in_group).double()  # (O, I)
    w = conv.weight.detach().double() * mask.view(*mask.shape, *[1] * (conv.weight.dim() - 2))
    b = None if conv.bias is None else conv.bias.detach().double()
    return conv._conv_forward(x.double(), w, b)


CASES = [
    (nn.Conv1d(8, 12, 3, padding=1, bias=True), (2, 8, 17), 2),
    (nn.Conv1d(8, 8, 5, stride=2, padding=2, bias=False), (2, 8, 16), 4),
    (nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=True), (2, 8, 9, 9), 4),
    (nn.Conv2d(6, 6, 3, padding=1, dilation=1, bias=True), (2, 6, 7, 7), 3),  # seed 001: 6 -> 6 in 3 groups
    (nn.Conv2d(8, 16, 1, bias=False), (2, 8, 5, 5), 2),
]


@pytest.mark.parametrize("conv, shape, groups", CASES)
def test_grouped_conv_equals_masked_dense_conv(conv, shape, groups):
    x = torch.randn(*shape)
    o, i = group_partition(kernel_scores(conv.weight), groups)
    grouped = GroupedConv(conv, o, i, groups)
    ref = _masked_reference(conv, o, i, x)
    with torch.no_grad():
        assert torch.allclose(grouped(x).double(), ref, atol=1e-5)
        assert torch.allclose(grouped.merge()(x).double(), ref, atol=1e-5)  # merge keeps the numbers
    dense_w = conv.weight.numel()
    assert grouped.conv.weight.numel() * groups == dense_w  # weights drop exactly by G
    assert grouped.conv.groups == groups
    # every output channel keeps exactly I/G kernels (12 of 36 for 6 x 6 in 3 groups)
    assert kernel_group_mask(o, i).sum(1).eq(conv.in_channels // groups).all()


def test_seed_example_counts():
    conv = nn.Conv2d(6, 6, 3)
    o, i = group_partition(kernel_scores(conv.weight), 3)
    assert int(kernel_group_mask(o, i).sum()) == 3 * 2 * 2  # 3 groups of 2 x 2 kernels: 12 of 36


@pytest.mark.parametrize("n, groups", [(6, 2), (6, 3), (4, 2)])
def test_balanced_assign_is_optimal_by_brute_force(n, groups):
    gain = torch.rand(n, groups, dtype=torch.float64)
    got = balanced_assign(gain)
    assert torch.bincount(got, minlength=groups).eq(n // groups).all()
    best = max(sum(float(gain[k, a[k]]) for k in range(n))
               for a in itertools.product(range(groups), repeat=n)
               if all(a.count(g) == n // groups for g in range(groups)))
    assert sum(float(gain[k, got[k]]) for k in range(n)) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("n, groups", [(16, 4), (24, 2)])
def test_partition_finds_a_hidden_grouping(n, groups):
    gen = torch.Generator().manual_seed(1)
    true_o, true_i = torch.randperm(n, generator=gen) % groups, torch.randperm(n, generator=gen) % groups
    true = kernel_group_mask(true_o, true_i)
    s = true.double() * (1 + torch.rand(n, n, generator=gen, dtype=torch.float64)) \
        + 0.2 * torch.rand(n, n, generator=gen, dtype=torch.float64)
    o, i = group_partition(s, groups)
    assert torch.equal(kernel_group_mask(o, i), true)


def test_partition_never_keeps_less_than_unpermuted_groups():
    s = torch.rand(12, 8, dtype=torch.float64)
    o, i = group_partition(s, 4, restarts=0)
    ident = kernel_group_mask(torch.arange(12) * 4 // 12, torch.arange(8) * 4 // 8)
    assert s[kernel_group_mask(o, i)].sum() >= s[ident].sum() - 1e-12


def _model():
    model, _ = build_model({"name": "mnist1d_cnn", "kwargs": {"widths": [8, 16, 16]}})
    model.train()
    model(torch.randn(8, 40))  # move BN statistics off their defaults
    return model.eval()


def test_transform_on_a_model_equals_masking_and_reloads(tmp_path):
    model = _model()
    x = torch.randn(4, 40)
    masked = _model()
    masked.load_state_dict(model.state_dict())
    params = sum(p.numel() for p in model.parameters())
    out = apply(model, GroupConvConfig(groups=2))
    record = nncompress.core.history(out)[-1]["record"]
    assert "stem.0" in record["skipped"]  # 1 input channel cannot be split
    assert set(record["convs"]) and all(0.5 <= f <= 1 for f in record["kept_fraction"].values())
    with torch.no_grad():  # oracle: the unpruned model with the same kernels zeroed
        for name in record["convs"]:
            conv = masked.get_submodule(name)
            mask = kernel_group_mask(*out.get_submodule(name).partition())
            conv.weight.mul_(mask.view(*mask.shape, 1).to(conv.weight.dtype))
        assert torch.allclose(out(x), masked(x), atol=1e-5)
    assert sum(p.numel() for p in out.parameters()) < params
    nncompress.save(out, tmp_path / "ck")
    again = nncompress.load(tmp_path / "ck")
    assert isinstance(again.layers[0].conv1, GroupedConv)
    with torch.no_grad():
        assert torch.equal(out(x), again(x))


def test_targets_and_errors():
    model = _model()
    out = apply(model, GroupConvConfig(groups=4), targets=Targets(include=("layers.1.*",)))
    convs = nncompress.core.history(out)[-1]["record"]["convs"]
    assert set(convs) == {"layers.1.conv1", "layers.1.conv2", "layers.1.shortcut.0"}
    with pytest.raises(ConfigError, match="groups: must be >= 2"):
        GroupConvConfig(groups=1)
    with pytest.raises(ConfigError, match="no targeted conv can be split into 3 groups"):
        apply(_model(), GroupConvConfig(groups=3))
    with pytest.raises(TargetError, match="group_conv: no Conv1d/2d/3d layer among the targets"):
        apply(_model(), GroupConvConfig(groups=2), targets=Targets(include=("fc",)))


def test_grouped_convs_are_refit_to_the_dense_outputs_when_there_is_data():
    """With calibration data each grouped conv is refit (in group order, against the dense conv's outputs
    put in that order): every layer's error drops and the model tracks the dense one better on new inputs."""
    from helpers import TinyData

    from nncompress.core import Context

    model = _model()
    g = torch.Generator().manual_seed(0)
    data = TinyData(torch.randn(64, 40, generator=g), torch.zeros(64, dtype=torch.long))
    held_out = torch.randn(64, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(held_out)
    err = {}
    for how in ("auto", "none"):
        out = apply(copy.deepcopy(model), GroupConvConfig(groups=2, reconstruct=how), context=Context(data=data))
        with torch.no_grad():
            err[how] = float((out(held_out) - ref).pow(2).mean())
        if how == "auto":
            rec = nncompress.core.history(out)[-1]["record"]["reconstruct"]
            assert set(rec) == set(nncompress.core.history(out)[-1]["record"]["convs"])
            assert all(e["after"] < e["before"] for e in rec.values())
    assert err["auto"] < err["none"]
