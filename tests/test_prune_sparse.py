"""Fine-grained and N:M sparsity: masks by counting, masks that stay enforced, schedules, soft
masking, second-order one-shot (SparseGPT) and Wanda, SNIP, lottery tickets and the EPI."""
import copy
import dataclasses
import doctest

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import nncompress
from nncompress.core import ConfigError, Context, Targets, TrainConfig, apply, fit
from nncompress.prune import NM, Pattern, Vector, epi, lottery, masks, penalties, sparsity
from nncompress.prune.epi import EarlyPruningIndicator, mask_distance
from nncompress.prune.lottery import LotteryConfig
from nncompress.prune.masks import (global_masks, kernel_patterns, magnitude_scores, nm_mask, pattern_mask,
                                    pruned_count, sparsegpt_prune, unstructured_mask, vector_mask)
from nncompress.prune.penalties import group_lasso, l1_penalty, regularizer
from nncompress.prune.sparsity import SparsityConfig, cubic_sparsity
from nncompress.recipe import parse_recipe
from nncompress.zoo.data import DataBundle
from nncompress.zoo.loaders import build_model


def _bundle(x, y=None, batch_size=32, seed=0):
    ds = TensorDataset(x, y) if y is not None else TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    gen = torch.Generator().manual_seed(seed)
    return DataBundle(DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen),
                      DataLoader(ds, batch_size=batch_size), DataLoader(ds, batch_size=batch_size))


def _correlated(n=256, d=32, rank=6, seed=0):
    """Inputs living near a low-dimensional subspace, with feature scales that differ a lot."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)
    return (x + 0.05 * torch.randn(n, d, generator=g)) * torch.logspace(-1, 1, d)


def _mlp(seed=1, d=32, hidden=32, out=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, out))


def _record(model):
    return nncompress.history(model)[-1]["record"]


@pytest.mark.parametrize("module", [masks, sparsity, penalties, lottery, epi])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("shape", [(7, 13), (8, 3, 3, 3), (5,)])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.37, 0.5, 0.9])
def test_unstructured_mask_prunes_an_exact_count_of_the_lowest(shape, s):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(3)).abs()
    mask = unstructured_mask(scores, s)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert int((~mask).sum()) == round(s * scores.numel()) == pruned_count(scores.numel(), s)
    if (~mask).any():
        assert scores[~mask].max() <= scores[mask].min()


def test_unstructured_mask_ties_still_give_the_exact_count():
    assert int((~unstructured_mask(torch.ones(10, 10), 0.33)).sum()) == 33


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (4, 16)])
def test_nm_mask_keeps_exactly_n_of_every_m(n, m):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4 * m, generator=gen)  # (O, I)
    mask = nm_mask(magnitude_scores(w), n, m)
    per_group = mask.view(6, 4, m).sum(-1)  # (O, I/M)
    assert (per_group == n).all()
    kept = (w * mask).view(6, 4, m).ne(0).sum(-1)
    assert (kept == n).all()
    # the kept ones are the largest of their group
    g = w.abs().view(6, 4, m)
    mk = mask.view(6, 4, m)
    assert (g.masked_fill(~mk, float("inf")).min(-1).values >= g.masked_fill(mk, -1).max(-1).values).all()


def test_nm_mask_on_conv_groups_input_channels():
    w = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(1))  # (O, I, kh, kw)
    mask = nm_mask(magnitude_scores(w), 2, 4, dim=1)
    groups = mask.movedim(1, -1).reshape(4, 3, 3, 2, 4)  # (O, kh, kw, I/M, M)
    assert (groups.sum(-1) == 2).all()
    with pytest.raises(ConfigError, match="m: dimension 1 has 6 entries, not a multiple of m=4"):
        nm_mask(torch.rand(2, 6, 3, 3), 2, 4, dim=1)


def test_global_masks_count_exactly_in_total_with_one_threshold():
    gen = torch.Generator().manual_seed(2)
    scores = {"a": torch.rand(10, 10, generator=gen), "b": 3 * torch.rand(7, 3, generator=gen),
              "c": 0.1 * torch.rand(33, generator=gen)}
    out = global_masks(scores, 0.6)
    total = sum(s.numel() for s in scores.values())
    assert sum(int((~m).sum()) for m in out.values()) == round(0.6 * total)
    kept = torch.cat([scores[n][out[n]] for n in scores])
    pruned = torch.cat([scores[n][~out[n]] for n in scores])
    assert pruned.max() <= kept.min()
    assert int(out["c"].sum()) == 0  # the small layer goes first: one threshold, not one per layer


def test_vector_and_pattern_masks():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(4))
    mask = vector_mask(w.abs(), 0.5, dim=-1)  # whole rows
    rows = mask.all(1) | (~mask).all(1)
    assert rows.all() and int((~mask.all(1)).sum()) == 3
    conv = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(5))
    pm = pattern_mask(conv.abs())
    pats = kernel_patterns().view(8, 9)
    for kernel in pm.view(-1, 9):
        assert (kernel == pats).all(1).any()
    deeper = pattern_mask(conv.abs(), sparsity=0.8)  # patterns give 5/9; the rest are whole kernels
    assert int((~deeper).sum()) >= round(0.8 * conv.numel())
    assert all(k.sum() in (0, 4) for k in deeper.view(-1, 9))


# ---------------------------------------------------------------------------------- the transform


def test_sparsify_exact_per_layer_and_skips_layers_n_m_cannot_divide():
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    out = apply(model, SparsityConfig(granularity=NM(2, 4)))
    rec = _record(out)
    assert rec["skipped"] == {"4": "6 inputs are not a multiple of m=4"}
    assert rec["layers"] == {"0": 0.5, "2": 0.5}
    assert (out[4].weight != 0).all()
    for layer in (out[0], out[2]):
        assert (layer.weight.ne(0).view(layer.out_features, -1, 4).sum(-1) == 2).all()
    assert type(out[0]) is nn.Linear  # plain modules


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


def test_pattern_and_conv_layers_through_the_transform():
    torch.manual_seed(0)
    out = apply(_ConvNet(), SparsityConfig(granularity=Pattern(), ratio=0.7))
    rec = _record(out)
    assert rec["skipped"] == {"fc": "pattern pruning needs 3x3 kernels, got a Linear"}
    pats = kernel_patterns().view(8, 9)
    for conv in (out.conv1, out.conv2):
        kernels = (conv.weight != 0).view(-1, 9)
        assert all((k == pats).all(1).any() or not k.any() for k in kernels)
        assert int((conv.weight == 0).sum()) >= round(0.7 * conv.weight.numel())
    x = torch.randn(16, 3, 6, 6)
    data = _bundle(x, torch.randint(0, 3, (16,)), batch_size=8)
    gpt = apply(_ConvNet(), SparsityConfig(importance="sparsegpt", granularity=NM()), context=Context(data=data))
    rec = _record(gpt)
    assert rec["skipped"] == {"conv1": "3 inputs are not a multiple of m=4"}
    assert rec["notes"] == ["conv2: sparsegpt handles Linear layers; pruned by wanda scores"]
    groups = (gpt.conv2.weight != 0).movedim(1, -1).reshape(8, 3, 3, 2, 4)  # (O, kh, kw, I/M, M)
    assert (groups.sum(-1) == 2).all() and (gpt.fc.weight != 0).view(3, 2, 4).sum(-1).eq(2).all()


@pytest.mark.parametrize("cfg", [
    SparsityConfig(ratio=0.6, epochs=2),
    SparsityConfig(granularity=NM(1, 4), epochs=1, l1=1e-4),
    SparsityConfig(ratio=0.5, granularity=Vector(), epochs=1),
], ids=["element", "nm+l1", "vector"])
def test_pruned_weights_stay_exactly_zero_through_fine_tuning(cfg):
    x = _correlated()
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4] > 0).long()
    model = _mlp()
    data = _bundle(x, y)
    pruned_only = apply(copy.deepcopy(model), dataclasses.replace(cfg, epochs=0))
    zeros = {n: p == 0 for n, p in pruned_only.named_parameters() if n.endswith("weight")}
    trained = apply(model, cfg, context=Context(data=data))
    for name, p in trained.named_parameters():
        if name.endswith("weight"):
            assert torch.equal(p == 0, zeros[name])  # same zeros, no more and no fewer
            assert not torch.equal(p, pruned_only.get_parameter(name))  # and the rest did train
    assert len(_record(trained)["epoch_losses"]) == (cfg.epochs or 0)


def test_cubic_schedule_starts_ends_and_is_monotone():
    values = [cubic_sparsity(t, 50, 0.9, 0.2) for t in range(0, 60)]
    assert values[0] == pytest.approx(0.2) and values[50] == pytest.approx(0.9) and values[-1] == pytest.approx(0.9)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[25] == pytest.approx(0.9 + (0.2 - 0.9) * 0.5 ** 3)


def test_gradual_schedule_reaches_the_target_exactly():
    x = _correlated()
    data = _bundle(x, (x[:, 0] > 0).long())
    model = _mlp()
    cfg = SparsityConfig(ratio=0.8, schedule="gradual", initial_ratio=0.1, epochs=2, frequency=3)
    out = apply(model, cfg, context=Context(data=data))
    rec = _record(out)
    assert rec["layers"] == {"0": pytest.approx(0.8, abs=1 / 1024), "2": pytest.approx(0.8, abs=1 / 128)}
    assert int((out[0].weight == 0).sum()) == round(0.8 * 32 * 32)


def test_soft_masking_lets_a_pruned_weight_regrow():
    # the class is the sign of x1, but the weights on x1 start small and are pruned at 50%; the large
    # weights on x0 (pure noise) cancel out. Hard masks keep the first decision; soft ones revise it.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=gen)
    data = _bundle(x, (x[:, 1] > 0).long(), batch_size=16)

    def run(soft):
        lin = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[0.5, -0.05], [0.5, 0.05]]))
        cfg = SparsityConfig(ratio=0.5, soft=soft, epochs=2, lr=0.05, frequency=4)
        return apply(lin, cfg, context=Context(data=data))

    hard, soft = run(False), run(True)
    assert torch.equal(hard.weight[:, 1], torch.zeros(2)) and (hard.weight[:, 0] != 0).all()
    assert (soft.weight[:, 1] != 0).all() and torch.equal(soft.weight[:, 0], torch.zeros(2))
    assert soft.weight[1, 1] - soft.weight[0, 1] > 1.0  # it grew back and learned the task
    assert type(soft) is nn.Linear and not hasattr(soft, "parametrizations")


def _recon_error(model, ref, x):
    with torch.no_grad():
        return float((model(x) - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("granularity", ["element", "nm"])
def test_sparsegpt_reconstructs_better_than_magnitude(granularity):
    x = _correlated(n=512, d=32)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    with torch.no_grad():
        ref = model(x)
    data = _bundle(x, batch_size=128)
    errors = {}
    for imp in ("magnitude", "wanda", "sparsegpt"):
        cfg = SparsityConfig(importance=imp, granularity=granularity, ratio=None if granularity == "nm" else 0.5)
        out = apply(copy.deepcopy(model), cfg, context=Context(data=data))
        for layer in (out[0], out[2]):
            if granularity == "nm":
                assert (layer.weight.ne(0).view(layer.out_features, -1, 4).sum(-1) == 2).all()
            else:
                assert int((layer.weight == 0).sum()) == layer.weight.numel() // 2
        errors[imp] = _recon_error(out, ref, x)
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"], errors
    assert errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_layer_solver_beats_the_same_mask_without_compensation():
    x = _correlated(n=512, d=32, seed=3).double()
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    hessian = 2 * x.T @ x / len(x)
    err = lambda v: float((x @ (w - v).T).pow(2).sum())
    new, mask = sparsegpt_prune(w, hessian, sparsity=0.5)
    assert int((~mask).sum()) == 128 and torch.equal(new == 0, ~mask)
    assert err(new) < 0.5 * err(w * mask) and err(new) < 0.1 * err(w * unstructured_mask(w.abs(), 0.5))
    new24, mask24 = sparsegpt_prune(w, hessian, nm=(2, 4), block_size=8)  # lazy updates across 4 blocks
    assert (mask24.view(8, 8, 4).sum(-1) == 2).all() and torch.equal(new24 == 0, ~mask24)
    assert err(new24) < 0.75 * err(w * nm_mask(w.abs(), 2, 4))


def test_wanda_weighs_weights_by_their_input_norms():
    # the weight on the large input is small: magnitude prunes it, Wanda keeps it, and Wanda is right
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=gen) * torch.tensor([0.1, 0.1, 10.0, 10.0])
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.9, 0.2, -0.3], [-1.0, 0.8, 0.25, 0.1]]))
        ref = lin(x)
    data = _bundle(x)
    mag = apply(copy.deepcopy(lin), SparsityConfig(ratio=0.5))
    wanda = apply(copy.deepcopy(lin), SparsityConfig(ratio=0.5, importance="wanda"), context=Context(data=data))
    assert torch.equal(mag.weight != 0, torch.tensor([[True, True, False, False]] * 2))
    assert torch.equal(wanda.weight != 0, torch.tensor([[False, False, True, True]] * 2))
    assert _recon_error(wanda, ref, x) < 0.01 * _recon_error(mag, ref, x)


def test_wanda_leaves_padding_tokens_out_of_the_norms():
    lin = nn.Linear(2, 1)
    batch = {"tokens": torch.tensor([[[1.0, 0.0], [0.0, 50.0]]]), "attention_mask": torch.tensor([[1, 0]])}
    stats = sparsity.collect_inputs(_TokenModel(lin), {"lin": lin}, [batch], 1)
    assert stats["lin"].count == 1 and stats["lin"].norm().tolist() == [1.0, 0.0]


class _TokenModel(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, tokens, attention_mask):
        return self.lin(tokens)


class _Attention(nn.Module):
    """q, k and v read the same tensor; out reads their result."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        return self.out(self.q(x) * self.k(x) + self.v(x))


def test_sequential_passes_group_layers_that_read_the_same_tensor():
    model = _Attention()
    layers = dict(model.named_children())
    batches = [(torch.randn(8, 4), None), (torch.randn(8, 4), None)]
    first = sparsity.collect_inputs(model, layers, batches, 2, first_group=True)
    assert list(first) == ["q", "k", "v"] and all(st.count == 16 for st in first.values())
    rest = sparsity.collect_inputs(model, {"out": model.out}, batches, 2, first_group=True)
    assert list(rest) == ["out"] and rest["out"].count == 16
    x = torch.cat([b[0] for b in batches])
    assert torch.allclose(first["q"].norm(), x.double().norm(dim=0))


@pytest.mark.parametrize("schedule,rounds", [("one_shot", 1), ("iterative", 3)])
def test_snip_at_initialization_gives_the_exact_sparsity(schedule, rounds):
    x = _correlated()
    data = _bundle(x, (x[:, 0] > 0).long())
    model = _mlp(seed=3)
    init = copy.deepcopy(model)
    out = apply(model, SparsityConfig(ratio=0.9, importance="snip", scope="global", schedule=schedule,
                                      rounds=rounds), context=Context(data=data))
    zeros = sum(int((out[i].weight == 0).sum()) for i in (0, 2))
    assert zeros == round(0.9 * (32 * 32 + 32 * 4))
    for i in (0, 2):  # surviving weights are the initial ones
        kept = out[i].weight != 0
        assert torch.equal(out[i].weight[kept], init[i].weight[kept])


def test_taylor_needs_labelled_data():
    with pytest.raises(ConfigError, match="importance: 'taylor' needs labelled calibration data"):
        apply(_mlp(), SparsityConfig(importance="taylor"))


# ------------------------------------------------------------------------------ lottery, EPI, penalties


def test_lottery_ticket_rewinds_survivors_to_init_exactly_and_reinit_keeps_the_masks():
    x = _correlated()
    data = lambda: _bundle(x, (x[:, 0] > 0).long())  # noqa: E731  (the same batches for every run)
    model = _mlp(seed=4)
    init = copy.deepcopy(model)
    cfg = LotteryConfig(ratio=0.75, rounds=2, epochs=1, final_epochs=0)
    ticket = apply(copy.deepcopy(model), cfg, context=Context(data=data()))
    rec = _record(ticket)
    assert rec["round_ratio"] == [0.5, 0.75]
    total = 32 * 32 + 32 * 4
    assert sum(int((ticket[i].weight == 0).sum()) for i in (0, 2)) == round(0.75 * total)
    for name, p in ticket.named_parameters():
        q = init.get_parameter(name)
        kept = p != 0
        assert torch.equal(p[kept], q[kept])  # biases too: all rewound
    control = apply(copy.deepcopy(model), LotteryConfig(ratio=0.75, rounds=2, epochs=1, final_epochs=0, reinit=True),
                    context=Context(data=data()))
    for i in (0, 2):
        assert torch.equal(control[i].weight == 0, ticket[i].weight == 0)
        kept = ticket[i].weight != 0
        assert not torch.equal(control[i].weight[kept], ticket[i].weight[kept])
    same_seed = _mlp(seed=0)  # initialised with the seed the control uses: still a different draw
    control = apply(copy.deepcopy(same_seed), LotteryConfig(ratio=0.75, rounds=1, epochs=1, final_epochs=0,
                                                            reinit=True, seed=0), context=Context(data=data()))
    ticket = apply(copy.deepcopy(same_seed), LotteryConfig(ratio=0.75, rounds=1, epochs=1, final_epochs=0, seed=0),
                   context=Context(data=data()))
    for i in (0, 2):
        kept = ticket[i].weight != 0
        assert not torch.equal(control[i].weight[kept], ticket[i].weight[kept])
    trained = apply(copy.deepcopy(model), LotteryConfig(ratio=0.75, rounds=1, epochs=1, rewind_steps=2),
                    context=Context(data=data()))
    assert sum(int((trained[i].weight == 0).sum()) for i in (0, 2)) == round(0.75 * total)


def test_lottery_rewind_steps_beyond_the_first_round_is_a_config_error():
    x = _correlated(n=64)
    with pytest.raises(ConfigError, match="rewind_steps: 100 is more than the 2 steps"):
        apply(_mlp(), LotteryConfig(rewind_steps=100, epochs=1), context=Context(data=_bundle(x, (x[:, 0] > 0).long())))


def test_epi_distance_is_zero_for_identical_and_one_for_disjoint_masks():
    gen = torch.Generator().manual_seed(0)
    a = {"x": torch.rand(10, 10, generator=gen) > 0.5, "y": torch.rand(5, generator=gen) > 0.5}
    assert mask_distance(a, a) == 0.0
    assert mask_distance(a, {k: ~v for k, v in a.items()}) == 1.0
    half = {"x": a["x"], "y": ~a["y"]}
    assert mask_distance(a, half) == pytest.approx(0.5)


def test_epi_callback_stabilizes_when_training_stops_moving_the_subnetwork():
    model = nn.Linear(8, 16)
    indicator = EarlyPruningIndicator(sparsity=0.5, threshold=0.05, patience=2, window=2)
    first = indicator(model)
    assert first.psi == 1.0 and not first.stable
    with torch.no_grad():  # the kept half shrinks below the pruned half: a disjoint sub-network
        model.weight[indicator.masks[-1]["" ]] *= 0.01
    moved = indicator(model)
    assert moved.distance == 1.0 and moved.epi == 0.0 and not moved.stable
    steps = [indicator(model) for _ in range(3)]
    assert [s.distance for s in steps] == [0.0, 0.0, 0.0]
    assert [s.epi for s in steps] == [0.5, 1.0, 1.0]  # window 2 still remembers the move once
    assert [s.stable for s in steps] == [False, False, True]


def test_prune_until_stable_trains_until_the_indicator_fires_then_prunes():
    import nncompress
    from nncompress.core import Context, history
    from nncompress.prune import PruneConfig
    from nncompress.zoo.loaders import build_data, build_model

    torch.manual_seed(0)
    data = build_data({"name": "digits"})
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 64, "hidden": [64]}})  # untrained
    pruned = nncompress.apply(model, PruneConfig(ratio=0.5, until_stable={"max_epochs": 12, "threshold": 0.05},
                                                 lr=3e-3), context=Context(data=data))
    rec = history(pruned)[-1]["record"]["until_stable"]
    assert rec["fired_epoch"] is not None and rec["epochs"] == rec["fired_epoch"] < 12  # stopped early
    assert len(rec["distance"]) == rec["epochs"] and all(d < 0.05 for d in rec["distance"][-2:])  # patience 2
    assert pruned.net[0].out_features == 32
    from nncompress.eval.metrics import accuracy
    assert accuracy(pruned, data.test) > 0.5  # trained, then pruned (no fine-tune): far above 10% chance
    never = nncompress.apply(build_model({"name": "mlp", "kwargs": {"in_features": 64, "hidden": [64]}})[0],
                             PruneConfig(ratio=0.5, until_stable={"max_epochs": 2, "threshold": 1e-9}),
                             context=Context(data=data))
    rec = history(never)[-1]["record"]["until_stable"]
    assert rec["fired_epoch"] is None and rec["epochs"] == 2 and "did not fire within 2 epochs" in rec["note"]
    with pytest.raises(ConfigError, match="until_stable.max_epochs"):
        PruneConfig.from_dict({"until_stable": {"max_epochs": 0}})
    with pytest.raises(ConfigError, match="sparsity"):
        EarlyPruningIndicator(sparsity=1.5)


def test_sparsify_until_stable_trains_until_the_weights_settle_then_sparsifies():
    import nncompress
    from nncompress.core import Context, history
    from nncompress.prune.sparsity import SparsityConfig
    from nncompress.zoo.loaders import build_data, build_model

    torch.manual_seed(0)
    data = build_data({"name": "digits"})
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 64, "hidden": [64]}})  # untrained
    cfg = SparsityConfig.from_dict({"ratio": 0.5, "scope": "global", "lr": 3e-3,
                                    "until_stable": {"max_epochs": 12, "threshold": 0.05}})
    sparse = nncompress.apply(model, cfg, context=Context(data=data))
    rec = history(sparse)[-1]["record"]["until_stable"]
    assert rec["fired_epoch"] is not None and rec["epochs"] == rec["fired_epoch"] < 12
    assert len(rec["distance"]) == rec["epochs"] and all(d < 0.05 for d in rec["distance"][-2:])
    weights = [m.weight for m in sparse.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zeros - 0.5) < 0.01
    from nncompress.eval.metrics import accuracy
    assert accuracy(sparse, data.test) > 0.5  # trained before sparsifying: far above 10% chance
    with pytest.raises(ConfigError, match="until_stable: the early pruning indicator watches single weights"):
        SparsityConfig.from_dict({"granularity": {"kind": "nm", "n": 2, "m": 4}, "until_stable": {}})
    assert SparsityConfig.from_dict(cfg.to_dict()) == cfg


def test_fit_stops_after_the_epoch_its_callback_says():
    x = _correlated(n=64)
    data = _bundle(x, (x[:, 0] > 0).long())
    seen = []
    losses = fit(_mlp(), data.train, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                 TrainConfig(epochs=10, lr=1e-2), stop_after_epoch=lambda e: seen.append(e) or e == 3)
    assert seen == [1, 2, 3] and len(losses) == 3


def test_penalties_are_usable_as_extra_losses():
    model = _mlp()
    targets = Targets(include=("0",))
    assert float(l1_penalty(model, targets).detach()) == pytest.approx(float(model[0].weight.detach().abs().sum()))
    rows = model[0].weight.detach().norm(dim=1).sum() * 32 ** 0.5
    assert float(group_lasso(model, targets).detach()) == pytest.approx(float(rows), rel=1e-6)
    x = _correlated(n=64)
    data = _bundle(x, (x[:, 0] > 0).long())
    before = float(l1_penalty(model, targets).detach())
    fit(model, data.train, lambda m, b: torch.zeros(()) + 0 * m(b[0]).sum(), TrainConfig(epochs=3, lr=1e-2),
        extra_losses=(regularizer(l1_penalty, 1.0, targets=targets),))
    assert float(l1_penalty(model, targets).detach()) < 0.8 * before


# ------------------------------------------------------------------------------ recipe, save/load


def test_sparsify_stage_validates_through_a_recipe():
    stage = {"kind": "sparsify", "ratio": 0.5, "granularity": {"kind": "nm", "n": 2, "m": 4}, "optimizer": "sgd"}
    recipe = parse_recipe({"stages": [stage, {"kind": "lottery", "ratio": 0.9, "optimizer": "adam8bit"}]})
    assert recipe.stages[0].config == SparsityConfig(ratio=0.5, granularity=NM(2, 4), optimizer="sgd")
    assert recipe.stages[1].config.optimizer == "adam8bit"
    assert SparsityConfig.from_dict(recipe.stages[0].config.to_dict()) == recipe.stages[0].config


@pytest.mark.parametrize("stage,message", [
    ({"ratio": 1.0}, "stages[0].ratio: must be in [0, 1), got 1.0"),
    ({"ratio": "lots"}, "stages[0].ratio: expected a number, got 'lots'"),
    ({"sparsity": 0.5}, "stages[0].sparsity: renamed: write ratio"),
    ({"n": 2}, "stages[0].n: renamed: write granularity: {kind: nm, n: 2, m: 4}"),
    ({"granularity": "block"}, "stages[0].granularity.kind: unknown sparsity granularity 'block'"),
    ({"granularity": {"kind": "nm", "n": 5, "m": 4}}, "stages[0].granularity.n: must be in [1, m=4], got 5"),
    ({"granularity": "nm", "ratio": 0.7}, "stages[0].ratio: 2:4 keeps 2 of every 4, i.e. ratio 0.5"),
    ({"importance": "magic"}, "stages[0].importance: unknown criterion 'magic'"),
    ({"schedule": "gradual"}, "stages[0].epochs: soft masks and the gradual schedule act while training"),
    ({"granularity": "nm", "scope": "global"}, "stages[0].scope: global applies to granularity element"),
    ({"importance": "sparsegpt", "schedule": "iterative"}, "stages[0].schedule: sparsegpt is one-shot"),
])
def test_bad_sparsify_stages_name_the_field(stage, message):
    with pytest.raises(ConfigError) as info:
        parse_recipe({"stages": [{"kind": "sparsify", **stage}]})
    assert str(info.value).startswith(message)


def test_save_and_load_of_a_sparse_model_keep_the_zeros(tmp_path):
    base, _ = build_model({"name": "mlp", "kwargs": {"in_features": 32, "hidden": [16], "num_classes": 4}})
    model = apply(base, SparsityConfig(granularity=NM(1, 4))).eval()
    nncompress.save(model, tmp_path / "m")
    same = nncompress.load(tmp_path / "m")
    x = torch.randn(5, 32)
    assert torch.equal(same(x), model(x))
    for (name, p), q in zip(model.named_parameters(), same.parameters()):
        assert torch.equal(p == 0, q == 0), name


@pytest.mark.parametrize("crit", ["wanda", "sparsegpt"])
def test_owl_gives_the_outlier_heavy_layer_the_lowest_ratio_and_keeps_the_mean(crit):
    """The last layer gets a few weights 50x larger (outliers of |W| ||X||; downstream of nothing, so no
    other layer's inputs change): OWL prunes it least, at ratio - lambda, the others more, and the
    parameter-weighted mean stays the target."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[4].weight.view(-1)[::97] *= 50
    data = _bundle(torch.randn(256, 32, generator=torch.Generator().manual_seed(0)))
    cfg = SparsityConfig(ratio=0.5, importance=crit, layer_budgets="owl", owl_lambda=0.1)
    out = apply(copy.deepcopy(model), cfg, context=Context(data=data))
    rec = _record(out)
    ratios = rec["layers"]
    assert min(ratios, key=ratios.get) == "4"
    assert max(ratios.values()) - min(ratios.values()) == pytest.approx(0.2, abs=0.01)
    sizes = {n: out.get_submodule(n).weight.numel() for n in ratios}
    mean = sum(ratios[n] * sizes[n] for n in ratios) / sum(sizes.values())
    assert mean == pytest.approx(0.5, abs=0.005) and rec["ratio"] == pytest.approx(0.5, abs=0.005)
    assert any(n.startswith("owl: layer ratios") for n in rec["notes"])
    uniform = _record(apply(copy.deepcopy(model), dataclasses.replace(cfg, layer_budgets="uniform"),
                            context=Context(data=data)))["layers"]
    assert set(uniform.values()) == {0.5}


@pytest.mark.parametrize("kw, field", [({"importance": "magnitude"}, "layer_budgets"),
                                       ({"importance": "wanda", "owl_lambda": 0.6}, "owl_lambda"),
                                       ({"importance": "wanda", "granularity": NM(2, 4)}, "layer_budgets")])
def test_owl_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        SparsityConfig(ratio=0.5 if "granularity" not in kw else None, layer_budgets="owl", **kw)
