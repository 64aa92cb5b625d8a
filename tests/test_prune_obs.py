"""Structured OBS importance: its greedy costs are the exact least-squares errors, it ranks across layers
in output-error units, and with reconstruction it beats magnitude on held-out data."""
import copy

import pytest
import torch
import torch.nn as nn

import nncompress
from nncompress.core import ConfigError, Context
from nncompress.graph import build_graph
from nncompress.prune.importance import collect_stats, obs_importance, obs_rounds
from nncompress.prune.structured import PruneConfig, plan_from_scores
from nncompress.zoo.loaders import build_data


def _batches(shape, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), None) for _ in range(n)]


def _run(model, batch):
    return model(batch[0])


def _exact_errors(w: torch.Tensor, h: torch.Tensor, cols: list[list[int]], order: list[int]) -> list[float]:
    """After removing order[:k] (each channel its columns), the least-squares error of the best weights on
    the remaining columns, straight from the Gram: tr(W H W^T) - tr(W H_:K H_KK^-1 H_K: W^T)."""
    total = float(torch.trace(w @ h @ w.T))
    out = []
    for k in range(1, len(order)):
        gone = {c for ch in order[:k] for c in cols[ch]}
        keep = [i for i in range(h.shape[0]) if i not in gone]
        hk = h[:, keep]
        out.append(total - float(torch.trace(w @ hk @ torch.linalg.solve(h[keep][:, keep], hk.T) @ w.T)))
    return out


@pytest.mark.parametrize("kind", ["linear", "conv", "flatten"])
def test_greedy_errors_are_the_exact_least_squares_errors_of_each_removal_prefix(kind):
    """One channel per round (steps = width), no damping: the errors of the first k rounds add up to the
    error of refitting the consumer on the channels left, for every k. Conv: a channel owns its kernel
    window's columns; flatten: a channel owns its positions in the Linear that reads it (blocks). The
    scores rank channels in the greedy order."""
    torch.manual_seed(0)
    if kind == "linear":
        model, shape, consumer = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).eval(), (64, 6), "2"
    elif kind == "conv":
        model = nn.Sequential(nn.Conv1d(2, 5, 3), nn.Tanh(), nn.Conv1d(5, 3, 3, padding=1)).eval()
        shape, consumer = (16, 2, 12), "2"
    else:
        model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4, 3)).eval()
        shape, consumer = (64, 2, 6), "3"
    batches = _batches(shape)
    group = next(g for g in build_graph(model, batches[0][0]).groups() if g.prunable)
    stats = collect_stats(model, batches, _run, "grams", [consumer], max_batches=len(batches))
    rounds = obs_rounds(model, group, stats["grams"], steps=group.size, damp=1e-12)
    order = [int(p) for p, _ in rounds]
    w = model.get_submodule(consumer).weight.detach().double()
    per = (w.shape[1] // group.size) if kind == "flatten" else w[0, 0].numel()
    cols = [list(range(c * per, (c + 1) * per)) for c in range(group.size)]
    w, h = w.reshape(w.shape[0], -1), stats["grams"][consumer].double()
    exact = _exact_errors(w, h, cols, order)
    summed = torch.tensor([e for _, e in rounds], dtype=torch.float64).cumsum(0)[:-1].tolist()
    assert summed == pytest.approx(exact, rel=1e-4, abs=1e-6 * exact[-1])
    singles = [_exact_errors(w, h, cols, [c, 0])[0] for c in range(group.size)]
    assert order[0] == min(range(group.size), key=singles.__getitem__)   # the cheapest single removal first
    scores = obs_importance(model, group, stats, steps=group.size, damp=1e-12)
    assert torch.argsort(scores).tolist() == order


def test_global_obs_ranks_in_output_error_and_finds_the_redundant_layer():
    """Layer 0's 16 hidden units are 8 pairs of twins (the consumer can read one twin twice as hard), layer
    1's are not: removing a quarter of all 32 channels globally, on the scores as they are (not normalised
    per group as magnitudes are), takes one twin of each pair and nothing from layer 1."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        ref[0].weight[8:], ref[0].bias[8:] = ref[0].weight[:8], ref[0].bias[:8]
    data = build_data({"name": "digits"})
    groups = [g for g in build_graph(ref, data.example_batch(2)).groups() if g.prunable]
    stats = collect_stats(ref, data.calib, _run, "grams", ["2", "4"], max_batches=8)
    scored = [(g, obs_importance(ref, g, stats, damp=1e-9)) for g in groups]
    plan = dict((g.producers[0], drop) for g, drop in
                plan_from_scores(scored, PruneConfig(ratio=0.25, importance="obs", scope="global"), 0.25))
    assert plan["2"] == [] and len(plan["0"]) == 8
    assert {c % 8 for c in plan["0"]} == set(range(8))    # one of each pair


def test_obs_with_reconstruction_beats_magnitude_on_held_out_digits(digits_mlp):
    data, model = digits_mlp
    x = torch.cat([b[0] for b in data.test])     # never seen by calibration
    err = {}
    for crit in ("l2", "obs"):
        pruned = nncompress.apply(copy.deepcopy(model), PruneConfig(ratio=0.75, importance=crit),
                                  context=Context(data=data))
        with torch.no_grad():
            err[crit] = float((pruned(x) - model(x)).pow(2).mean())
    assert err["obs"] < err["l2"]


def test_obs_without_calibration_data_is_refused():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    net.input_shape = (4,)
    with pytest.raises(ConfigError, match="importance.*calibration data"):
        nncompress.apply(net, PruneConfig(ratio=0.5, importance="obs", reconstruct="none"))
