"""lowrank/: truncated SVD, spatial SVD, Tucker-2, rank selection and the `lowrank` transform (tiny, seeded)."""
import copy
import doctest

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nncompress
from nncompress.core import ConfigError, Context, Targets, history, replay
from nncompress.lowrank import (Ladder, LowRankConfig, LowRankConv, LowRankLinear, allocate, energy_rank,
                                residual_energy, spatial_kernel, spatial_matrix,
                                spatial_svd, truncated_svd, tucker2, tucker2_kernel, whitening)
from nncompress.lowrank import factorize, layers, rank, svd
from nncompress.zoo.loaders import build_model


@pytest.mark.parametrize("module", [svd, layers, rank, factorize], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- pure maths

@pytest.mark.parametrize("shape", [(7, 5), (5, 9)])
def test_svd_full_rank_is_exact(shape):
    w = torch.randn(*shape, generator=gen(), dtype=torch.float64)
    a, b = truncated_svd(w, min(shape))
    assert a.shape == (shape[0], min(shape)) and b.shape == (min(shape), shape[1])
    torch.testing.assert_close(a @ b, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("r", [1, 2, 4])
def test_svd_truncation_error_is_the_dropped_singular_values(r):
    w = torch.randn(8, 6, generator=gen(1), dtype=torch.float64)
    s = torch.linalg.svdvals(w)  # oracle: Eckart-Young
    a, b = truncated_svd(w, r)
    err = w - a @ b
    torch.testing.assert_close(err.pow(2).sum(), s[r:].pow(2).sum(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.linalg.matrix_norm(err, ord=2), s[r], rtol=1e-10, atol=1e-12)
    assert residual_energy(s, r) == pytest.approx(float(s[r:].pow(2).sum() / s.pow(2).sum()))


def test_svd_factors_are_balanced_and_keep_dtype():
    w = torch.randn(6, 4, generator=gen(2))
    a, b = truncated_svd(w, 3)
    assert a.dtype == b.dtype == torch.float32
    # a = U sqrt(S), b = sqrt(S) V^T: the column norms of a equal the row norms of b
    torch.testing.assert_close(a.norm(dim=0), b.norm(dim=1))


def test_svd_rejects_an_impossible_rank():
    with pytest.raises(ValueError, match=r"rank must be in \[1, 4\]"):
        truncated_svd(torch.randn(4, 6), 5)


def test_spatial_svd_full_rank_exact_and_truncation_error():
    k = torch.randn(4, 3, 3, 2, generator=gen(3), dtype=torch.float64)  # (O, C, kh, kw)
    m = spatial_matrix(k)  # (C*kh, O*kw) = (9, 8)
    torch.testing.assert_close(spatial_kernel(*spatial_svd(k, 8)), k, rtol=0, atol=1e-12)
    s = torch.linalg.svdvals(m)
    approx = spatial_kernel(*spatial_svd(k, 3))
    torch.testing.assert_close((k - approx).pow(2).sum(), s[3:].pow(2).sum(), rtol=1e-10, atol=1e-12)


def test_spatial_matrix_rank_one_kernel_needs_one_pair():
    v = torch.randn(2, 3, generator=gen(4), dtype=torch.float64)  # (C, kh)
    h = torch.randn(5, 4, generator=gen(5), dtype=torch.float64)  # (O, kw)
    k = torch.einsum("ci,oj->ocij", v, h)  # separable: rank 1 by construction
    torch.testing.assert_close(spatial_kernel(*spatial_svd(k, 1)), k, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kshape", [(5, 4, 3), (6, 3, 3, 3)])
def test_tucker2_full_rank_exact(kshape):
    k = torch.randn(*kshape, generator=gen(6), dtype=torch.float64)
    first, core, last = tucker2(k, kshape[0], kshape[1])
    assert first.shape == (kshape[1], kshape[1]) and last.shape == (kshape[0], kshape[0])
    torch.testing.assert_close(tucker2_kernel(first, core, last), k, rtol=0, atol=1e-12)


def test_tucker2_hooi_never_worse_than_hosvd_and_factors_orthonormal():
    k = torch.randn(8, 6, 3, 3, generator=gen(7), dtype=torch.float64)
    errs = []
    for iters in (0, 1, 5):
        first, core, last = tucker2(k, 3, 2, iters)
        errs.append(float((k - tucker2_kernel(first, core, last)).pow(2).sum()))
        torch.testing.assert_close(first @ first.T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-10)
        torch.testing.assert_close(last.T @ last, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)
    assert errs[1] <= errs[0] + 1e-10 and errs[2] <= errs[1] + 1e-10


# ------------------------------------------------------------------------------------- rank selection

def test_energy_rank_hand_computed():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert [energy_rank(s, e) for e in (0.5, 9 / 14, 0.92, 13 / 14, 0.93, 1.0)] == [1, 1, 2, 2, 3, 3]


def test_allocate_prefers_energy_per_cost_and_respects_budget():
    steep = Ladder("steep", [(1,), (2,), (3,)], [10, 20, 30], [0.1, 0.05, 0.0], 50)
    flat = Ladder("flat", [(1,), (2,), (3,)], [10, 20, 30], [0.6, 0.3, 0.1], 50)
    chosen, spent = allocate([steep, flat], 50)
    # flat's two steps gain 0.03 and 0.02 per unit cost, steep's 0.005; flat's jump to dense (cost 20)
    # no longer fits after them, so the last 10 units go to steep
    assert chosen == {"steep": (2,), "flat": (3,)} and spent == 50
    with pytest.raises(ValueError, match="over the budget"):
        allocate([steep, flat], 15)


def test_allocate_goes_dense_past_break_even():
    lad = Ladder("a", [(1,)], [10], [0.5], 12)
    assert allocate([lad], 100) == ({"a": None}, 12.0)


# ------------------------------------------------------------------------------------- layers

@pytest.mark.parametrize("method,conv,kwargs", [
    ("svd", nn.Conv1d, {"stride": 2, "padding": 1}),
    ("svd", nn.Conv2d, {"stride": (2, 1), "padding": (1, 2), "dilation": 2}),
    ("spatial", nn.Conv2d, {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}),
    ("spatial", nn.Conv2d, {"padding": 1, "padding_mode": "reflect"}),
    ("spatial", nn.Conv2d, {"padding": "same", "padding_mode": "circular"}),
    ("tucker2", nn.Conv1d, {"stride": 2, "padding": 2, "padding_mode": "replicate"}),
    ("tucker2", nn.Conv2d, {"stride": 2, "padding": 1}),
])
def test_lowrank_conv_full_rank_reproduces_the_layer(method, conv, kwargs):
    torch.manual_seed(0)
    dense = conv(4, 6, 3, **kwargs).double()
    x = torch.randn(2, 4, *([9, 10] if conv is nn.Conv2d else [11]), dtype=torch.float64)
    full = layers.full_ranks(dense, method)
    low = LowRankConv.factorize(dense, method, full)
    torch.testing.assert_close(low(x), dense(x), rtol=0, atol=1e-10)
    merged = low.merge()
    assert type(merged) is conv
    torch.testing.assert_close(merged(x), dense(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["svd", "spatial", "tucker2"])
def test_truncated_lowrank_conv_equals_conv_with_its_kernel(method):
    torch.manual_seed(1)
    dense = nn.Conv2d(5, 6, 3, stride=(1, 2), padding=1).double()
    low = LowRankConv.factorize(dense, method, (2, 2) if method == "tucker2" else (2,))
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    ref = F.conv2d(x, low.dense_kernel(), dense.bias, stride=(1, 2), padding=1)  # oracle: one conv
    torch.testing.assert_close(low(x), ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(low.merge()(x), ref, rtol=0, atol=1e-10)
    assert layers.weight_params(dense, method, low.ranks) == sum(m.weight.numel() for m in low)


def test_lowrank_linear_truncated_output_error_and_merge():
    torch.manual_seed(2)
    dense = nn.Linear(8, 6).double()
    low = LowRankLinear.from_linear(dense, 3)
    x = torch.randn(5, 8, dtype=torch.float64)
    a, b = truncated_svd(dense.weight, 3)
    torch.testing.assert_close(low(x), x @ (a @ b).T + dense.bias, rtol=0, atol=1e-12)
    torch.testing.assert_close(low.merge()(x), low(x), rtol=0, atol=1e-12)
    assert low.first.bias is None and low.second.bias is not None


def test_grouped_conv_rejected_by_layer():
    with pytest.raises(ValueError, match="ungrouped"):
        LowRankConv(nn.Conv2d(4, 4, 3, groups=2), "svd", (2,))


# ------------------------------------------------------------------------------------- the transform

def tiny_mlp():
    torch.manual_seed(0)
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 16, "hidden": [32, 32], "num_classes": 4}})
    return model.eval()


def tiny_cnn():
    torch.manual_seed(0)
    model, _ = build_model({"name": "mnist1d_cnn", "kwargs": {"widths": [8, 16], "length": 20}})
    return model.eval()


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("bad,field", [
    ({}, "rank"),
    ({"rank": 2, "energy": 0.9}, "energy"),
    ({"keep_params": 1.0}, "keep_params"),
    ({"energy": 0.0}, "energy"),
    ({"rank": 0}, "rank"),
    ({"rank": 2, "hooi_iters": 2}, "hooi_iters"),
    ({"rank": 2, "round_to": 0}, "round_to"),
])
def test_config_rejects_mistakes_naming_the_field(bad, field):
    with pytest.raises(ConfigError) as e:
        LowRankConfig(**bad)
    assert e.value.path == field


def test_config_round_trips_through_dict():
    cfg = LowRankConfig(method="tucker2", keep_macs=0.4, round_to=4, hooi_iters=2)
    assert LowRankConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["kind"] == "lowrank"


def test_full_rank_transform_keeps_outputs():
    model = tiny_mlp()
    x = torch.randn(4, 16, generator=gen(8))
    ref = model(x)
    # full rank never saves weights: every layer is skipped, nothing changes
    model = nncompress.apply(model, LowRankConfig(rank=1000))
    assert not history(model)[-1]["record"]["layers"]
    assert set(history(model)[-1]["record"]["skipped"]) == set(linear_names(model))
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_fixed_rank_and_merge_keeps_the_numbers():
    model = tiny_mlp()
    ref = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    model = nncompress.apply(model, LowRankConfig(rank=3))
    rec = history(model)[-1]["record"]
    assert set(rec["layers"]) == set(ref) and all(v["ranks"] == [3] for v in rec["layers"].values())
    for name, w in ref.items():
        low = model.get_submodule(name)
        assert isinstance(low, LowRankLinear)
        a, b = truncated_svd(w, 3)  # oracle: the truncated SVD of the original weight
        torch.testing.assert_close(low.merge().weight, a @ b, rtol=1e-5, atol=1e-6)
        assert rec["layers"][name]["energy_lost"] == pytest.approx(
            residual_energy(torch.linalg.svdvals(w.double()), 3), abs=1e-6)


def test_energy_rule_picks_the_energy_rank():
    model = tiny_mlp()
    w = model.get_submodule(linear_names(model)[1]).weight
    want = energy_rank(torch.linalg.svdvals(w.double()), 0.6)
    model = nncompress.apply(model, LowRankConfig(energy=0.6), targets=Targets(types=("Linear",)))
    assert model.get_submodule(linear_names(tiny_mlp())[1]).rank == want


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_param_budget_is_met_and_nearly_spent(ratio):
    model = tiny_mlp()
    names = linear_names(model)
    dense = sum(model.get_submodule(n).weight.numel() for n in names)
    model = nncompress.apply(model, LowRankConfig(keep_params=ratio))
    rec = history(model)[-1]["record"]
    kept = sum(p.numel() for n in names for p in model.get_submodule(n).parameters() if p.dim() > 1)
    assert rec["weights_before"] == dense and rec["weights_after"] == kept
    assert kept <= ratio * dense
    assert kept >= ratio * dense - 60  # within one rank step of the largest layer (16 + 32 + ... < 60)


def test_mac_budget_on_convs_is_met_as_torch_counts_macs():
    from nncompress.eval.measure import count_macs

    model = tiny_cnn()
    x = torch.randn(2, 20, generator=gen(9))
    convs = Targets(types=("Conv1d",), include=("layers.*",))
    targeted = [m for _, m in convs.select(model)]
    outs = {}

    def hook(m, args, y):
        outs[m] = y.shape  # (N, O, L_out)

    hooks = [m.register_forward_hook(hook) for m in targeted]
    before = count_macs(model, x)
    for h in hooks:
        h.remove()
    dense = sum(m.weight.numel() * outs[m][0] * outs[m][2] for m in targeted)  # oracle: O*C*k per output
    model = nncompress.apply(model, LowRankConfig(method="tucker2", keep_macs=0.5), targets=convs)
    assert all(v["method"] == "tucker2" for v in history(model)[-1]["record"]["layers"].values())
    low = count_macs(model, x) - (before - dense)  # the untargeted layers are unchanged
    assert 0.3 * dense < low <= 0.5 * dense


def test_already_factorized_layers_are_not_refactorized():
    model = nncompress.apply(tiny_mlp(), LowRankConfig(rank=4))
    # the 32 -> 4 head: rank 4 is its full rank, so it stayed dense; the factors are not factorized again
    assert list(history(model)[-1]["record"]["skipped"]) == ["net.4"]
    model = nncompress.apply(model, LowRankConfig(rank=2))
    assert list(history(model)[-1]["record"]["layers"]) == ["net.4"]
    with pytest.raises(ConfigError, match="no nn.Linear"):
        nncompress.apply(model, LowRankConfig(rank=2))


def test_spatial_on_conv1d_names_the_layer():
    with pytest.raises(ConfigError, match=r"stem\.0: spatial SVD .* Conv1d"):
        nncompress.apply(tiny_cnn(), LowRankConfig(method="spatial", rank=2), targets=Targets(types=("Conv1d",)))


def test_budget_below_rank_one_raises():
    with pytest.raises(ConfigError, match="raise keep_params"):
        nncompress.apply(tiny_mlp(), LowRankConfig(keep_params=0.01))


def test_grouped_conv_is_skipped_with_reason():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 8, 3))
    model = nncompress.apply(model, LowRankConfig(rank=2))
    rec = history(model)[-1]["record"]
    assert "grouped" in rec["skipped"]["0"] and list(rec["layers"]) == ["1"]


@pytest.mark.parametrize("model_fn,cfg,targets", [
    (tiny_mlp, LowRankConfig(keep_params=0.5), None),
    (tiny_cnn, LowRankConfig(method="tucker2", keep_params=0.5, hooi_iters=1), Targets(types=("Conv1d",))),
    (tiny_cnn, LowRankConfig(method="svd", energy=0.8), None),
])
def test_save_load_reproduces_outputs_exactly(tmp_path, model_fn, cfg, targets):
    model = nncompress.apply(model_fn(), cfg, targets=targets)
    x = torch.randn(3, model.input_shape[0], generator=gen(10))
    nncompress.save(model, tmp_path)
    loaded = nncompress.load(tmp_path)
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.eval().modules()]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_replay_rebuilds_shapes_without_data():
    model = nncompress.apply(tiny_cnn(), LowRankConfig(method="tucker2", rank=3), targets=Targets(types=("Conv1d",)))
    rebuilt = replay(tiny_cnn(), history(model))
    rebuilt.load_state_dict(model.state_dict(), strict=True)  # strict: same names and shapes
    x = torch.randn(2, 20, generator=gen(11))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_factors_train():
    model = nncompress.apply(tiny_mlp(), LowRankConfig(rank=2))
    loss = model(torch.randn(4, 16, generator=gen(12))).pow(2).sum()
    loss.backward()
    low = next(m for m in model.modules() if isinstance(m, LowRankLinear))
    assert low.first.weight.grad is not None and low.first.weight.grad.abs().sum() > 0


def test_whiten_output_error_is_the_dropped_singular_values_of_w_l():
    from helpers import TinyData

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 10)).double()
    x = torch.randn(64, 12, dtype=torch.float64) * torch.linspace(0.1, 3.0, 12, dtype=torch.float64)  # skewed
    data = TinyData(x, torch.zeros(64, dtype=torch.long))
    w, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    plain = nncompress.apply(copy.deepcopy(model), LowRankConfig(rank=3))
    white = nncompress.apply(model, LowRankConfig(rank=3, whiten=True, reconstruct="none"), context=Context(data=data))
    chol = whitening(x.T @ x)
    s = torch.linalg.svdvals(w @ chol)  # oracle: SVD-LLM's truncation error
    with torch.no_grad():
        err_white = (white(x) - (x @ w.T + bias)).pow(2).sum()
        err_plain = (plain(x) - (x @ w.T + bias)).pow(2).sum()
    w_low = white[0].merge().weight.detach()
    torch.testing.assert_close(((w - w_low) @ chol).pow(2).sum(), s[3:].pow(2).sum(), rtol=1e-9, atol=1e-12)
    # L L^T = X^T X + a 1e-6 relative damping: the output error on X is that value to ~1e-5
    torch.testing.assert_close(err_white, s[3:].pow(2).sum(), rtol=1e-4, atol=0)
    assert err_white < 0.9 * err_plain


def test_whiten_needs_data():
    with pytest.raises(ConfigError, match="whiten: needs calibration data"):
        nncompress.apply(tiny_mlp(), LowRankConfig(rank=2, whiten=True))


@pytest.mark.slow
def test_minilm_ffn_factorized_save_load_exact(tmp_path):
    model, tok = build_model({"name": "hf:minilm"})
    targets = Targets(include=("*layer.0.intermediate.dense", "*layer.0.output.dense"), types=("Linear",))
    model = nncompress.apply(model.eval(), LowRankConfig(keep_params=0.5, round_to=8), targets=targets)
    assert len(history(model)[-1]["record"]["layers"]) == 2
    enc = tok(["A short sentence.", "Another, longer sentence here."], padding=True, return_tensors="pt")
    batch = {k: enc[k] for k in ("input_ids", "attention_mask")}
    nncompress.save(model, tmp_path)
    loaded = nncompress.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch), model.eval()(**batch))
