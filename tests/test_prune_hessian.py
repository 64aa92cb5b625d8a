"""The second-order (Hessian-vector product) structured criterion against exact oracles."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from nncompress.core import ConfigError, Context, Targets, apply
from nncompress.graph import build_graph
from nncompress.graph.groups import Group, Member
from nncompress.prune.importance import collect_stats, hessian_importance
from nncompress.prune.structured import PruneConfig
from helpers import TinyData


def _stats(model, batches, loss_fn):
    return collect_stats(model, batches, loss_fn, "hessian")


def _mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _zeroed_loss(model, group, channel, batches, loss_fn) -> float:
    """The oracle: mean calibration loss after zeroing `channel` in every member, in float64."""
    twin = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for m in group.members:
        t = twin[m.name].movedim(m.dim, 0)
        t[m.offset + channel * m.stride: m.offset + (channel + 1) * m.stride] = 0
    model = model.double()
    with torch.no_grad():
        return sum(float(loss_fn(lambda x: functional_call(model, twin, (x,)), (x.double(), y)))
                   for x, y in batches) / len(batches)


def test_quadratic_loss_score_is_the_exact_loss_change():
    # linear producer + fixed linear readout + MSE: the loss is quadratic in the group's parameters
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3)).double()
    group = Group(6, (Member("0", "weight", 0, role="out"), Member("0", "bias", 0, role="out")))
    batches = [(torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)) for _ in range(3)]
    scores = hessian_importance(model, group, _stats(model, batches, _mse), chunk=4)  # 2 chunks, one ragged
    base = sum(_mse(model, b).item() for b in batches) / len(batches)
    exact = torch.tensor([_zeroed_loss(model, group, c, batches, _mse) - base for c in range(6)], dtype=torch.float64)
    torch.testing.assert_close(scores.double(), exact, rtol=1e-5, atol=1e-6)


def test_real_group_matches_dense_hessian_taylor_expansion():
    # a traced producer/consumer group under cross-entropy: oracle is g.d + 0.5 d.H.d with the full
    # Hessian in float64 (so cross-layer curvature of one channel counts, other channels' does not)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    batches = [(torch.randn(6, 4), torch.randint(0, 3, (6,))) for _ in range(2)]
    group = next(g for g in build_graph(model, batches[0][0]).groups() if g.prunable)
    scores = hessian_importance(model, group, _stats(model, batches, _ce))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().double().flatten() for _, p in model.named_parameters()])
    model64 = model.double()

    def loss(v):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = v[i: i + s.numel()].view(s)
            i += s.numel()
        return sum(F.cross_entropy(functional_call(model64, params, (x.double(),)), y) for x, y in batches) / len(batches)

    g = torch.autograd.functional.jacobian(loss, flat)
    h = torch.autograd.functional.hessian(loss, flat)
    for c in range(group.size):
        d = torch.zeros_like(flat)
        start = 0
        for n, s in zip(names, shapes):
            for m in (m for m in group.members if m.name == n):
                view = d[start: start + s.numel()].view(s).movedim(m.dim, 0)
                view[c] = -flat[start: start + s.numel()].view(s).movedim(m.dim, 0)[c]
            start += s.numel()
        expected = float(g @ d + 0.5 * d @ h @ d)  # L(w + d) - L(w) to second order
        assert scores[c].item() == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_dead_channels_score_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))  # tanh(0) = 0: zero weights = dead
    with torch.no_grad():
        for c in (1, 4):
            model[0].weight[c] = 0
            model[0].bias[c] = 0
            model[2].weight[:, c] = 0
    batches = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]
    group = next(g for g in build_graph(model, batches[0][0]).groups() if g.prunable)
    scores = hessian_importance(model, group, _stats(model, batches, _ce))
    assert scores[1].item() == 0.0 and scores[4].item() == 0.0
    assert (scores[[0, 2, 3, 5]] != 0).all()


def test_stage_removes_the_lowest_scoring_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Conv1d(8, 4, 3, padding=1), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3))
    model.eval()
    x, y = torch.randn(6, 1, 16), torch.randint(0, 3, (6,))
    data = TinyData(x, y)
    group = next(g for g in build_graph(model, x[:2]).groups() if g.producers == ("0",))
    scores = hessian_importance(model, group, _stats(model, data.calib, _ce))
    keep = sorted(torch.argsort(scores, descending=True, stable=True)[:6].tolist())
    expected = model[0].weight.detach()[keep].clone()
    pruned = apply(model, PruneConfig(ratio=0.25, importance="hessian"), targets=Targets(include=("0",)),
                   context=Context(data=data))
    assert pruned[0].out_channels == 6 and pruned[1].num_features == 6 and pruned[3].in_channels == 6
    torch.testing.assert_close(pruned[0].weight, expected, rtol=0, atol=0)


def test_needs_labelled_data():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    model.input_shape = (4,)
    with pytest.raises(ConfigError, match="importance: needs calibration data for 'hessian'"):
        apply(model, PruneConfig(importance="hessian"))
