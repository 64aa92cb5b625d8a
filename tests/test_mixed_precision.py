"""Mixed precision under a budget: the solver is exact, the budget holds on disk, the plan is a recipe."""
import copy
import itertools
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

import nncompress
from nncompress.core import ConfigError, Context, TargetError, history
from nncompress.export.checkpoint import checkpoint_bytes
from nncompress.formats import IntFormat, PerGroup
from nncompress.export.onnx_qdq import export_qdq_onnx, optimized_op_counts
from nncompress.quant import Choice, MixedPrecisionConfig, QuantSpec, plan_yaml, solve_plan
from nncompress.quant.mixed import MixedLatency
from nncompress.quant.mixed_costs import bops_per_layer
from nncompress.recipe.schema import parse_stage
from nncompress.zoo.loaders import build_data, build_model

from helpers import TinyData

W4 = Choice(weight=QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=32)))
W8 = Choice(weight=QuantSpec(format=IntFormat(bits=8)))
CANDIDATES = (W4, W8, Choice())


@pytest.fixture(scope="module")
def digits():
    return build_data({"name": "digits"})


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 64}})
    return model.eval()


def mixed(model, data, **budget):
    cfg = MixedPrecisionConfig(candidates=CANDIDATES, **budget)
    return nncompress.apply(copy.deepcopy(model), cfg, context=Context(data=data))


def brute_force(cost, use, budget):
    best = None
    for plan in itertools.product(*[range(cost.shape[1])] * cost.shape[0]):
        u = sum(use[l, c] for l, c in enumerate(plan))
        if u <= budget and np.isfinite(cost[np.arange(len(plan)), plan]).all():
            total = sum(cost[l, c] for l, c in enumerate(plan))
            if best is None or total < best[0] - 1e-12:
                best = (total, list(plan))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_milp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    cost, use = rng.random((6, 3)), rng.integers(1, 20, (6, 3)).astype(float)
    cost[rng.random((6, 3)) < 0.15] = np.inf                   # some formats some layers may not take
    cost[np.arange(6), rng.integers(0, 3, 6)] = rng.random(6)  # but every layer takes one
    for budget in (use.min(1).sum(), use.mean() * 6, use.max(1).sum(), use.min(1).sum() - 1):
        want = brute_force(cost, use, budget)
        got = solve_plan(cost, use, budget)
        if want is None:
            assert got is None
            continue
        assert sum(use[l, c] for l, c in enumerate(got)) <= budget
        assert sum(cost[l, c] for l, c in enumerate(got)) == pytest.approx(want[0], rel=1e-9, abs=1e-12)


def test_tighter_budget_never_costs_less():
    rng = np.random.default_rng(7)
    cost, use = rng.random((8, 3)), rng.integers(1, 30, (8, 3)).astype(float)
    totals = []
    for budget in np.linspace(use.min(1).sum(), use.max(1).sum(), 12):
        plan = solve_plan(cost, use, budget)
        totals.append(sum(cost[l, c] for l, c in enumerate(plan)))
    assert all(a >= b - 1e-12 for a, b in zip(totals, totals[1:]))


def test_size_budget_holds_on_disk_and_reloads_exactly(tmp_path, digits, mlp):
    nncompress.save(mlp, tmp_path / "fp32")
    before = checkpoint_bytes(tmp_path / "fp32")["total"]
    distortions = []
    for ratio in (2, 3, 5):
        q = mixed(mlp, digits, size_ratio=ratio)
        record = history(q)[-1]["record"]
        nncompress.save(q, tmp_path / f"r{ratio}")
        assert checkpoint_bytes(tmp_path / f"r{ratio}")["total"] <= before / ratio
        again = nncompress.load(tmp_path / f"r{ratio}")
        x = digits.example_batch(32)
        with torch.no_grad():
            assert torch.equal(again(x), q(x))
        distortions.append(record["predicted_distortion"])
        assert sum(record["counts"].values()) == 3
    assert distortions == sorted(distortions)  # a tighter budget never gives a lower total sensitivity


def test_max_bytes_budget_and_plan_recipe_reproduces_the_weights(tmp_path, digits, mlp):
    q = mixed(mlp, digits, max_bytes=70_000)
    nncompress.save(q, tmp_path / "m")
    assert checkpoint_bytes(tmp_path / "m")["total"] <= 70_000
    stages = yaml.safe_load(plan_yaml(history(q)[-1]["record"]["stages"]))["stages"]
    assert stages and all(s["kind"] == "quantize" for s in stages)
    again = copy.deepcopy(mlp)
    for i, raw in enumerate(stages):
        stage = parse_stage(raw, i)
        again = nncompress.apply(again, stage.config, targets=stage.targets, context=Context(data=digits))
    a, b = q.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gptq_candidate_is_measured_as_gptq_rounds_it_and_the_plan_replays(tmp_path, digits, mlp):
    gptq = Choice(weight=W4.weight, method="gptq")
    cfg = MixedPrecisionConfig(candidates=(gptq, W4, W8, Choice()), size_ratio=5)
    q = nncompress.apply(copy.deepcopy(mlp), cfg, context=Context(data=digits))
    record = history(q)[-1]["record"]
    sens = record["layer_sensitivity"]
    # error-corrected rounding: less output distortion than rounding to nearest, on every layer of this MLP
    assert all(sens[n]["W4 g32 gptq"] < sens[n]["W4 g32"] for n in sens)
    assert "W4 g32" not in record["plan"].values() and "W4 g32 gptq" in record["plan"].values()
    stages = yaml.safe_load(plan_yaml(record["stages"]))["stages"]
    assert [s["kind"] for s in stages][0] == "gptq" and stages[0]["sequential"] is False
    again = copy.deepcopy(mlp)  # the plan as a recipe: the same weights
    for i, raw in enumerate(stages):
        stage = parse_stage(raw, i)
        again = nncompress.apply(again, stage.config, targets=stage.targets, context=Context(data=digits))
    a, b = q.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    nncompress.save(q, tmp_path / "m")
    x = digits.example_batch(16)
    with torch.no_grad():
        assert torch.equal(nncompress.load(tmp_path / "m")(x), q(x))
    with pytest.raises(ConfigError, match="sensitivity: fisher predicts .* use sensitivity: distortion"):
        MixedPrecisionConfig(candidates=(gptq, Choice()), size_ratio=5, sensitivity="fisher")
    with pytest.raises(ConfigError, match="activation: gptq quantizes weights only"):
        Choice(weight=W8.weight, activation=W8.weight, method="gptq")


def test_unreachable_budget_names_the_field_and_the_closest_point(digits, mlp):
    with pytest.raises(ConfigError, match=r"size_ratio.*out of reach.*closest plan.*measured ([\d,]+) bytes") as e:
        mixed(mlp, digits, size_ratio=50)
    closest = int(re.search(r"measured ([\d,]+) bytes", str(e.value)).group(1).replace(",", ""))
    # the closest point is real: a budget 300 bytes above it (the record of a met plan is longer) is met
    q = mixed(mlp, digits, max_bytes=closest + 300)
    assert set(history(q)[-1]["record"]["plan"].values()) == {"W4 g32"}
    with pytest.raises(ConfigError, match=r"max_bops.*out of reach.*closest plan"):
        mixed(mlp, digits, max_bops=10)


def test_bops_budget_is_met_exactly(digits, mlp):
    float_bops = sum(bops_per_layer(m, (1, m.out_features), None, None) for m in mlp.modules()
                     if isinstance(m, nn.Linear))
    q = mixed(mlp, digits, max_bops=float_bops / 5)
    record = history(q)[-1]["record"]
    assert record["predicted"] <= float_bops / 5
    layers = {n: m for n, m in mlp.named_modules() if isinstance(m, nn.Linear)}
    bits = {"W4 g32": 4, "W8": 8, "float": 32}
    spent = sum(m.out_features * m.in_features * bits[record["plan"][n]] * 32 for n, m in layers.items())
    assert spent == record["predicted"]


def test_nothing_quantizable_is_a_typed_error(digits):
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    with pytest.raises(TargetError, match="mixed_precision"):
        nncompress.apply(model, MixedPrecisionConfig(size_ratio=2), context=Context(data=digits))


def test_a_layer_no_candidate_fits_is_named():
    x = torch.randn(8, 24)
    net = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))
    g16 = Choice(weight=QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=16)))
    with pytest.raises(ConfigError, match=r"candidates: layer '0' takes none of the formats.*group size 16"):
        nncompress.apply(net, MixedPrecisionConfig(candidates=(g16,), max_bops=1e9), context=Context(data=TinyData(x, None)))
    # with float allowed, the layer that fits no quantized format stays float; the other may take it
    out = nncompress.apply(net, MixedPrecisionConfig(candidates=(g16, Choice()), max_bops=1e9),
                           context=Context(data=TinyData(x, None)))
    record = history(out)[-1]["record"]
    assert record["plan"]["0"] == "float" and "0" in record["unavailable"]


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="budget"):
        MixedPrecisionConfig()
    with pytest.raises(ConfigError, match="size_ratio"):
        MixedPrecisionConfig(max_bytes=10, size_ratio=2)
    with pytest.raises(ConfigError, match="candidates"):
        MixedPrecisionConfig(candidates=(Choice(),), size_ratio=2)


def test_fisher_predicts_the_measured_distortion_of_a_linear_layer():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    data = TinyData(x, torch.zeros(256, dtype=torch.long))
    net = nn.Sequential(nn.Linear(64, 32))
    records = {}
    for sensitivity in ("distortion", "fisher"):
        cfg = MixedPrecisionConfig(candidates=CANDIDATES, size_ratio=1.5, sensitivity=sensitivity, calib_batches=1)
        q = nncompress.apply(copy.deepcopy(net), cfg, context=Context(data=data))
        records[sensitivity] = history(q)[-1]["record"]["layer_sensitivity"]["0"]
    # one linear layer: the output Fisher is exactly sum_n x x^T; its diagonal misses only the cross terms
    # of independent rounding noise, which average out
    for label in ("W4 g32", "W8"):
        assert records["fisher"][label] == pytest.approx(records["distortion"][label], rel=0.2)


def test_recipe_yaml_stage_round_trips():
    raw = yaml.safe_load("""
kind: mixed_precision
size_ratio: 6
candidates:
  - {weight: {format: {kind: int, bits: 4}, granularity: {kind: per_group, axis: 1, size: 128}}}
  - {weight: {format: {kind: int, bits: 8}}}
  - {}
""")
    stage = parse_stage(raw, 0)
    assert stage.config.size_ratio == 6 and stage.config.candidates[2].is_float
    assert parse_stage(stage.to_dict(), 0) == stage


W8A8 = Choice(weight=QuantSpec(format=IntFormat(bits=8)),
              activation=QuantSpec(format=IntFormat(bits=8, signed=False, symmetric=False)))
ORT = MixedLatency(runtime="onnxruntime", batch=64, threads=1)


def test_a_latency_target_is_refused_where_no_format_runs_faster():
    with pytest.raises(ConfigError, match="latency.runtime.*fake quantization in torch eager"):
        MixedPrecisionConfig(target_latency="2x")
    with pytest.raises(ConfigError, match="candidates.*needs a W8A8 candidate"):
        MixedPrecisionConfig(candidates=CANDIDATES, target_latency="2x", latency=ORT)


@pytest.fixture(scope="module")
def wide_mlp():
    torch.manual_seed(0)
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 64, "hidden": [512, 512]}})
    return model.eval()


@pytest.mark.slow  # ~5 s: exports and times in onnxruntime (the solver's loop is tested below, in the default tier)
def test_an_onnxruntime_latency_target_is_planned_from_the_format_table_and_measured(digits, wide_mlp, tmp_path):
    cfg = MixedPrecisionConfig(candidates=(W8A8, W4, Choice()), target_latency="1.2x", latency=ORT)
    out = nncompress.apply(copy.deepcopy(wide_mlp), cfg, context=Context(data=digits, cache_dir=str(tmp_path)))
    r = history(out)[-1]["record"]
    assert r["budget"]["field"] == "target_latency" and r["budget"]["unit"] == "ms"
    # W4 has no int8 kernel in onnxruntime: never chosen; all float cannot be 1.2x faster: some layer is int8
    assert set(r["plan"].values()) <= {"W8A8", "float"} and "W8A8" in r["plan"].values()
    assert all(isinstance(x["met"], bool) and x["measured"] > 0 and x["predicted"] > 0 for x in r["rounds"]), r["rounds"]
    assert [s["targets"]["include"] for s in r["stages"]] == [[n for n, c in r["plan"].items() if c == "W8A8"]]
    # the plan as it deploys: every W8A8 layer an int8 kernel in onnxruntime
    path = export_qdq_onnx(out, digits.example_batch(4), tmp_path / "plan.onnx")
    assert optimized_op_counts(path)["QGemm"] == list(r["plan"].values()).count("W8A8")
    assert list((tmp_path / "latency").glob("*.json"))   # the table's measurements are cached


@pytest.mark.slow
def test_an_unreachable_latency_target_names_the_closest_plan(digits, wide_mlp, tmp_path):
    cfg = MixedPrecisionConfig(candidates=(W8A8, Choice()), target_latency="100x", latency=ORT)
    with pytest.raises(ConfigError, match=r"target_latency: .* ms is out of reach: the closest plan .* ms \([0-9.]+x"):
        nncompress.apply(copy.deepcopy(wide_mlp), cfg, context=Context(data=digits, cache_dir=str(tmp_path)))


RECIPE = """\
name: mixed
seed: 3
model: {name: mlp, kwargs: {in_features: 64, hidden: [32]}}
data: {name: digits}
measure: {batch_sizes: [1], threads: 1, warmup: 0, repeats: 2, onnx: false}
stages:
"""
MIXED_STAGE = """\
  - kind: mixed_precision
    max_bops: 500000
    calib_batches: 1
    candidates:
      - {weight: {format: {kind: int, bits: 4}, granularity: {kind: per_group, axis: 1, size: 32}}}
      - {weight: {format: {kind: int, bits: 8}}}
      - {}
"""


def test_recipe_stage_and_its_plan_as_a_recipe_give_the_same_weights(tmp_path):
    from nncompress.recipe import parse_recipe, run_recipe

    quiet = dict(progress=False, log=lambda msg: None)
    first = run_recipe(parse_recipe(yaml.safe_load(RECIPE + MIXED_STAGE)), tmp_path / "a",
                       cache_dir=tmp_path / "cache", **quiet)
    record = history(first.model)[-1]["record"]
    assert set(record["plan"].values()) >= {"W4 g32"} and record["predicted"] <= 500000
    plan = yaml.safe_load(plan_yaml(record["stages"]))
    second = run_recipe(parse_recipe({**yaml.safe_load(RECIPE), "stages": plan["stages"]}), tmp_path / "b",
                        cache_dir=tmp_path / "cache", **quiet)
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_budget_the_table_thinks_unreachable_is_measured_before_it_is_refused():
    """The solver's loop on a latency budget whose per-layer prediction is pessimistic (as onnxruntime's
    shared QuantizeLinear makes it): the cheapest plan is measured, found within reach, the budget is
    corrected by the miss and a plan that keeps more layers float is chosen and measured."""
    from nncompress.quant.mixed import _solve
    from nncompress.quant.mixed_budget import Budget

    use = np.array([[1.0, 1.5]] * 3)                        # int8 / float, predicted ms per layer
    sens = np.array([[0.3, 0.0], [0.2, 0.0], [0.1, 0.0]])   # distortion of int8; float is free
    real = lambda plan: 0.6 * sum(use[i, c] for i, c in enumerate(plan))   # the model runs 40% faster

    def record(plan, rounds):
        return {"stages": list(plan)}

    budget = Budget("target_latency", "ms", use, 0.0, 2.9, lambda v: "", lambda stages, rec: real(stages))
    cfg = MixedPrecisionConfig(candidates=(W8A8, Choice()), target_latency="1.2x",
                               latency=MixedLatency(runtime="onnxruntime"))
    plan, rounds = _solve(cfg, sens, budget, record)
    assert rounds[0]["plan"] == "cheapest" and rounds[0]["predicted"] == 3.0 and rounds[0]["met"]
    assert plan == [1, 1, 0] and rounds[-1]["met"] and rounds[-1]["measured"] == pytest.approx(2.4)
    budget.limit = 1.0   # out of reach even measured: refused, naming what the cheapest plan measured
    with pytest.raises(ConfigError, match=r"out of reach: the closest plan .* measured 1\.8 ms"):
        _solve(cfg, sens, budget, record)
