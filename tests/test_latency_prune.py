"""Latency tables measured on this machine and latency-aware pruning (HALP): the table's arithmetic,
its calibration, its disk cache, the knapsack against a brute-force oracle, and `prune` with a
`target_latency` end to end (real timings; no timing is asserted, only that the record tells the
truth about what was measured)."""
import doctest
import itertools
import json

import pytest
import torch
import torch.nn as nn

import nncompress
from nncompress.core import ConfigError, Context
from nncompress.eval import latency_table
from nncompress.eval.latency_table import LatencyTable, LayerSpec, LayerTable, build_table
from nncompress.graph import build_graph
from nncompress.prune import latency
from nncompress.prune.latency import LatencyTarget, plan_for_latency
from nncompress.prune.structured import PruneConfig
from helpers import TinyData


class Net(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv1d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(width)
        self.fc = nn.Linear(width, 3)
        self.input_shape = (1, 24)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean(-1))


def _spec(i, o):
    return LayerSpec("Linear", i, o, (("bias", True),), (1, i), 1)


def test_layer_table_is_bilinear_between_samples_and_flat_outside():
    t = LayerTable(_spec(16, 16), ins=[8, 16], outs=[8, 16], ms=[[1.0, 2.0], [3.0, 5.0]])
    assert t.at(8, 8) == 1.0 and t.at(16, 16) == 5.0 == t.full_ms
    assert t.at(12, 8) == pytest.approx(2.0)             # halfway between 1 and 3
    assert t.at(12, 12) == pytest.approx(2.75)           # mean of the four corners
    assert t.at(4, 4) == 1.0 and t.at(20, 20) == 5.0     # outside the grid: the nearest edge


def _linear_table(costs: dict[str, float], rest: float = 0.0) -> LatencyTable:
    """A table whose layers cost `cost * out_width` ms: exact at every width."""
    layers = {}
    for name, c in costs.items():
        outs = [8, 16, 24, 32]
        layers[name] = LayerTable(_spec(32, 32), ins=[8, 32], outs=outs, ms=[[c * o for o in outs]] * 2)
    full = sum(t.full_ms for t in layers.values()) + rest
    return LatencyTable("torch", "cpu", 1, 1, "test", layers, full, rest)


def test_fit_recovers_the_scale_of_whole_model_measurements():
    table = _linear_table({"a": 0.1, "b": 0.2})
    full = {"a": (32, 32), "b": (32, 32)}
    # the real model runs 1.5x what its layers add up to, plus a fixed 0.4 ms
    points = [({"a": (32, w), "b": (32, w)}, 1.5 * (0.3 * w) + 0.4) for w in (8, 16, 24)]
    table.full_ms = 1.5 * table.predict(full) + 0.4
    table.fit(points, prior=1e-6)
    a, _, c = table.coef
    assert a == pytest.approx(1.5, rel=1e-3) and c == pytest.approx(0.4, rel=1e-2)
    assert table.predict({"a": (32, 20), "b": (32, 12)}) == pytest.approx(1.5 * (2 + 2.4) + 0.4, rel=1e-3)


class _Group:
    """The slice of a graph group the planner reads: its size and which layer widths it sets."""

    def __init__(self, layer, size):
        self.size = size
        self.members = (type("M", (), {"module": layer, "param": "weight", "role": "out", "stride": 1})(),)
        self.producers = (layer,)


def test_knapsack_matches_brute_force_on_a_table_it_can_solve_exactly():
    # two groups of 32 channels whose layers cost 0.1 and 0.3 ms per output channel; scores rise
    # within each group (convex loss), so removing the cheapest importance per ms first is optimal
    table = _linear_table({"a": 0.1, "b": 0.3})
    model = nn.Module()
    model.a, model.b = nn.Linear(32, 32), nn.Linear(32, 32)
    torch.manual_seed(0)
    scores = {"a": torch.rand(32).sort().values * 2, "b": torch.rand(32).sort().values}
    scored = [(_Group(n, 32), scores[n]) for n in ("a", "b")]
    cfg = PruneConfig(target_latency="2x", max_ratio=0.75, latency=LatencyTarget(step=8))
    budget = table.full_ms * 0.45
    plan, predicted = plan_for_latency(model, scored, table, budget, cfg)
    assert predicted <= budget
    removed = {g.producers[0]: len(drop) for g, drop in plan}

    def lost(k, s):   # the k least important, normalised per group as the planner does
        return float((s / s.abs().mean()).sort().values[:k].sum())

    best = min(((ka, kb) for ka, kb in itertools.product(range(0, 25, 8), repeat=2)
                if table.predict({"a": (32, 32 - ka), "b": (32, 32 - kb)}) <= budget),
               key=lambda k: lost(k[0], scores["a"]) + lost(k[1], scores["b"]))
    assert (removed.get("a", 0), removed.get("b", 0)) == best
    for g, drop in plan:  # the least important channels of each group go
        assert drop == sorted(torch.argsort(scores[g.producers[0]])[:len(drop)].tolist())


def test_build_table_measures_real_layers_and_reads_them_back_from_its_cache(tmp_path):
    net = Net().eval()
    x = torch.randn(4, 1, 24)
    first = build_table(net, x, threads=1, warmup=1, repeats=3, points=3, cache_dir=tmp_path)
    assert set(first.layers) == {"conv1", "conv2", "fc"}
    assert first.layers["conv2"].ins == [8, 24, 32] and first.layers["conv1"].ins == [1]
    assert all(ms > 0 for t in first.layers.values() for row in t.ms for ms in row)
    [cache] = list((tmp_path / "latency").iterdir())
    # every (in, out) measured once, and an empty call per distinct input shape (all three differ)
    assert len(json.loads(cache.read_text())) == 3 * 3 + 1 * 3 + 3 * 1 + 3
    again = build_table(net, x, threads=1, warmup=1, repeats=3, points=3, cache_dir=tmp_path)
    assert {n: t.ms for n, t in again.layers.items()} == {n: t.ms for n, t in first.layers.items()}


def _data(length: int = 24):
    torch.manual_seed(0)
    x = torch.randn(64, 1, length)
    return TinyData(x, (x.mean((1, 2)) > 0).long() + (x[:, 0, 0] > 1).long())


def test_prune_to_a_latency_target_records_what_it_measured_and_reloads(tmp_path):
    # 64 x 512 positions through a 64-wide conv: compute-bound, so pruning can make it faster
    net, data = Net(64).eval(), _data(512)
    cfg = PruneConfig(target_latency="1.3x", scope="global", latency=LatencyTarget(batch=64, threads=1, rounds=2))
    pruned = nncompress.apply(net, cfg, context=Context(data=data, cache_dir=str(tmp_path)))
    lat = nncompress.history(pruned)[-1]["record"]["latency"]
    assert lat["target"] == "1.3x" and lat["batch"] == 64 and lat["threads"] == 1
    chosen = [r for r in lat["rounds"] if r["measured_speedup"] == lat["measured_speedup"]]
    assert chosen, lat  # the speedup reported is one that was measured
    assert lat["met"] == any(r["measured_speedup"] >= 1.3 * (1 - cfg.latency.tolerance) for r in lat["rounds"])
    for name in ("conv1", "conv2"):   # widths move in steps of 8, the widths the table sampled
        assert getattr(pruned, name).out_channels % 8 == 0
    assert pruned.conv1.out_channels < 64 or pruned.conv2.out_channels < 64
    nncompress.save(pruned, tmp_path / "ck", source={"name": "test_latency_prune:Net", "kwargs": {"width": 64}})
    again = nncompress.load(tmp_path / "ck", trust_code=True)
    assert torch.equal(again(data.x), pruned(data.x))


def test_unreachable_latency_target_says_how_far_pruning_can_go(tmp_path):
    with pytest.raises(ConfigError, match=r"prune.target_latency: .* ms is out of reach: the table predicts .*x\)"):
        nncompress.apply(Net().eval(), PruneConfig(target_latency="50x", latency=LatencyTarget(batch=8, threads=1)),
                         context=Context(data=_data()))


@pytest.mark.parametrize("fields, message", [
    ({"target_latency": "2"}, "expected a speedup like '2x' or milliseconds like '12ms'"),
    ({"target_latency": "0.5x"}, "a speedup target must be above 1x"),
    ({"target_latency": "2x", "keep_macs": 0.5}, "give one budget, not keep_macs and target_latency"),
])
def test_latency_target_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**fields)


def test_a_millisecond_target_above_todays_latency_is_refused():
    with pytest.raises(ConfigError, match="no faster than the model already runs"):
        nncompress.apply(Net().eval(), PruneConfig(target_latency="1000ms", latency=LatencyTarget(batch=8, threads=1)),
                         context=Context(data=_data()))


def test_graph_groups_of_the_test_net_are_what_the_planner_expects():
    groups = [g for g in build_graph(Net().eval(), torch.randn(2, 1, 24)).groups() if g.prunable]
    assert sorted(g.producers for g in groups) == [("conv1",), ("conv2",)]


def test_latency_target_round_trips_through_yaml_form():
    cfg = PruneConfig(target_latency="12.5ms", latency=LatencyTarget(runtime="onnxruntime", batch=32, threads=2))
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("module", [latency_table, latency], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    assert doctest.testmod(module).failed == 0
