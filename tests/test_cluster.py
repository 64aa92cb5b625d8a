"""Weight sharing by clustering: k-means, Huffman sizes, the wrapper, the stage, save/load and bytes."""
import copy
import doctest
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import TinyData
from safetensors import safe_open

import nncompress
from nncompress.core import MergeConfig, TargetError
from nncompress.cluster import (
    ClusterConfig,
    ClusteredLayer,
    assignment_from_values,
    cluster_weight,
    clustered,
    huffman_bits,
    huffman_lengths,
    kmeans,
    kmeans_1d,
)
from nncompress.core import ConfigError, Context, Targets, apply, history, replay
from nncompress.distill import FinetuneConfig
from nncompress.recipe import parse_recipe
from nncompress.zoo.loaders import build_model


@pytest.mark.parametrize("module", [kmeans, clustered, nncompress.cluster], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def mlp():
    torch.manual_seed(0)
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 16, "hidden": [32], "num_classes": 3}})
    return model.eval()


def small_cnn():
    torch.manual_seed(0)
    model, _ = build_model({"name": "mnist1d_cnn", "kwargs": {"widths": [8, 16], "num_classes": 3}})
    return model.eval()


def prune_half(model):
    """Zero the smaller half of every Linear / Conv weight (what `sparsify` leaves behind)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                w = m.weight
                w[w.abs() <= w.abs().flatten().median()] = 0
    return model


def clustered_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, ClusteredLayer)}


# ------------------------------------------------------------------------------------------ k-means


def test_kmeans_matches_sklearn_lloyd_from_the_same_start():
    from sklearn.cluster import KMeans
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, generator=gen) * s + m for m, s in ((-3, .5), (0, .3), (2, .4), (5, 1.))])
    for init in ("linear", "density"):
        start = kmeans.init_centroids(x.double(), 4, init)
        ours_c, ours_a = kmeans_1d(x.double(), 4, init)
        ref = KMeans(4, init=start.numpy()[:, None], n_init=1, tol=0, max_iter=300).fit(x.double().numpy()[:, None])
        assert np.allclose(ours_c.numpy(), ref.cluster_centers_[:, 0], rtol=0, atol=1e-12)
        assert np.array_equal(ours_a.numpy(), ref.labels_)


def test_kmeans_result_is_a_lloyd_fixed_point():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, generator=gen) ** 3  # heavy tails, like weights
    for init in ("linear", "density", "random"):
        c, a = kmeans_1d(x, 8, init, generator=torch.Generator().manual_seed(0))
        xd, cd = x.double(), c.double()
        dist = (xd[:, None] - cd[None, :]).abs()  # (n, k): brute force nearest, in float64
        assert torch.equal(dist.gather(1, a[:, None])[:, 0], dist.min(1).values)
        for j in a.unique():
            assert abs(float(xd[a == j].mean()) - float(cd[j])) <= 1e-6 * max(1.0, abs(float(cd[j])))  # float32


def optimal_sse(x, k):
    """Exact 1-D k-means by dynamic programming over the sorted values (the oracle)."""
    s = np.sort(np.asarray(x, dtype=np.float64))
    n = len(s)
    p1, p2 = np.concatenate([[0], np.cumsum(s)]), np.concatenate([[0], np.cumsum(s * s)])

    def sse(i, j):  # cost of s[i:j] as one cluster
        return p2[j] - p2[i] - (p1[j] - p1[i]) ** 2 / (j - i)
    best = np.full((k + 1, n + 1), np.inf)
    best[0, 0] = 0
    for m in range(1, k + 1):
        for j in range(m, n + 1):
            best[m, j] = min(best[m - 1, i] + sse(i, j) for i in range(m - 1, j))
    return best[k, n]


def test_linear_init_is_near_the_exact_optimum():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(80, generator=gen).double()
    c, a = kmeans_1d(x, 4)
    ours = float(((x - c[a]) ** 2).sum())
    assert ours <= 1.05 * optimal_sse(x.numpy(), 4)


def test_kmeans_recovers_exactly_k_distinct_values():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).repeat(25)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    c, a = kmeans_1d(x, 4)
    assert torch.equal(c[a], x)


# ------------------------------------------------------------------------------------------ Huffman


def test_huffman_hand_cases():
    assert huffman_lengths([5, 2, 1, 1]) == [1, 2, 3, 3]
    assert huffman_bits(torch.tensor([0] * 5 + [1] * 2 + [2, 3])) == 5 * 1 + 2 * 2 + 3 + 3
    assert huffman_bits(torch.arange(4).repeat(10)) == 40 * 2  # uniform over 4 symbols: 2 bits each
    assert huffman_bits(torch.zeros(7, dtype=torch.long)) == 7  # one symbol still costs a bit


def test_huffman_is_a_complete_prefix_code_within_entropy_plus_one():
    gen = torch.Generator().manual_seed(3)
    idx = (torch.randn(4000, generator=gen).abs() * 3).long().clamp(max=15)
    counts = torch.bincount(idx, minlength=16).tolist()
    lengths = huffman_lengths(counts)
    assert sum(2.0 ** -n for n, c in zip(lengths, counts, strict=True) if c) == 1.0  # Kraft equality
    p = torch.tensor([c for c in counts if c], dtype=torch.float64) / idx.numel()
    entropy = float(-(p * p.log2()).sum())
    mean = huffman_bits(idx) / idx.numel()
    assert entropy <= mean < entropy + 1


# ------------------------------------------------------------------------------------------ wrapper


def test_cluster_weight_keeps_zeros_and_uses_at_most_k_values():
    w = torch.randn(8, 32)
    w[w.abs() < 0.5] = 0
    c, a = cluster_weight(w, 7)
    shared = torch.cat([c, torch.zeros(1, 1)], 1).gather(1, a).view_as(w)
    assert torch.equal(shared == 0, w == 0)
    assert shared.unique().numel() <= 8


def test_centroid_gradient_is_the_sum_over_its_cluster():
    torch.manual_seed(0)
    layer = ClusteredLayer.from_layer(nn.Conv1d(3, 4, 3, padding=1).double(), k=5)
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    layer(x).square().sum().backward()
    plain = layer.merge()  # the same weight as a plain parameter: its gradient per weight
    plain(x).square().sum().backward()
    g = plain.weight.grad.reshape(1, -1)  # (1, R)
    pooled = torch.zeros(1, 6, dtype=torch.float64).scatter_add_(1, layer.assignment, g)[:, 1:]  # slot 0: zero
    assert torch.allclose(layer.centroids.grad, pooled, rtol=1e-12, atol=1e-12)
    assert layer.base.weight.grad is None


def test_assignment_rebuilt_from_values_gives_the_same_weight():
    layer = ClusteredLayer.from_layer(prune_half(nn.Sequential(nn.Linear(16, 6)))[0], k=7, granularity="channel")
    again = assignment_from_values(layer.shared_weight(), layer.centroids)
    assert torch.equal(again, layer.assignment)
    with pytest.raises(nncompress.NNCompressError, match="no centroid"):
        assignment_from_values(layer.shared_weight() + 0.5, layer.centroids)


# ------------------------------------------------------------------------------------------ the stage


@pytest.mark.parametrize("bits,granularity", [(2, "layer"), (4, "layer"), (3, "channel")])
def test_stage_distinct_values_zeros_and_merge(bits, granularity):
    model = prune_half(mlp())
    x = torch.randn(5, 16)
    zeros = {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = apply(model, ClusterConfig(bits=bits, granularity=granularity))
    layers = clustered_layers(out)
    assert set(layers) == set(zeros)
    for name, layer in layers.items():
        w = layer.shared_weight()
        rows = w.reshape(layer.groups, -1)
        assert max(int(r.unique().numel()) for r in rows) <= 2 ** bits  # zero included
        assert torch.equal(w == 0, zeros[name])
    y = out(x)
    merged = apply(out, MergeConfig())
    assert not clustered_layers(merged) and torch.equal(merged(x), y)


def test_record_sizes_by_hand():
    model = prune_half(nn.Sequential(nn.Linear(64, 8, bias=False)))
    out = apply(model, ClusterConfig(bits=4))
    rec = history(out)[-1]["record"]["layers"]["0"]
    # 15 nonzero centroids + the zero slot: 4-bit indices for 512 weights, 15 float32 centroids
    assert (rec["k"], rec["bits"], rec["zeros"]) == (15, 4, 256)
    assert rec["packed_bytes"] == 512 * 4 // 8 + 15 * 4
    assert rec["sparse_bytes"] == 512 // 8 + 256 * 4 // 8 + 15 * 4  # mask + 4-bit indices of the nonzeros
    assert rec["huffman_bytes"] < rec["packed_bytes"]  # half the indices are the zero slot: ~1 bit each
    json.dumps(history(out))  # the record is JSON-able


def test_finetune_trains_the_centroids_not_the_assignment():
    model = prune_half(mlp())
    out = apply(model, ClusterConfig(bits=3))
    before = {n: (m.centroids.detach().clone(), m.assignment.clone(), m.base.weight.detach().clone())
              for n, m in clustered_layers(out).items()}
    torch.manual_seed(0)
    data = TinyData(torch.randn(32, 16), torch.randint(0, 3, (32,)))
    out = apply(out, FinetuneConfig(epochs=3, lr=1e-2), context=Context(data=data))
    for name, layer in clustered_layers(out).items():
        c, a, w = before[name]
        assert not torch.equal(layer.centroids, c)  # the codebook trained
        assert torch.equal(layer.assignment, a)
        assert not layer.base.weight.requires_grad
        shared = layer.shared_weight()
        assert torch.equal(shared == 0, w == 0) and shared.unique().numel() <= 8


def test_second_stage_reclusters_the_values_it_targets():
    model = small_cnn()
    model = apply(model, ClusterConfig(bits=5), targets=Targets(types=("Conv1d",)))
    n_conv = len(clustered_layers(model))
    x = torch.randn(2, 40)
    model = apply(model, ClusterConfig(bits=5), targets=Targets(types=("Linear",)))
    layers = clustered_layers(model)
    assert len(layers) == n_conv + 1 and all(layer.k == 32 for layer in layers.values())
    fc = layers["fc"].shared_weight().detach().clone()
    fewer = apply(model, ClusterConfig(bits=2), targets=Targets(types=("Conv1d",)))  # the shared values, clustered
    after = clustered_layers(fewer)
    assert all(after[n].k <= 4 for n in layers if n != "fc") and torch.equal(after["fc"].shared_weight(), fc)
    assert fewer(x).shape == (2, 3)


def test_tied_weights_are_left_alone():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4))
    model[2].weight = model[0].weight  # tied: clustering one would rewrite the other
    out = apply(model, ClusterConfig(bits=2))
    assert list(clustered_layers(out)) == ["3"]
    assert set(history(out)[-1]["record"]["skipped"]) == {"0", "2"}


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="bits"):
        ClusterConfig(bits=9)
    with pytest.raises(TargetError, match="cluster: no Linear/Conv layer among the targets"):
        apply(nn.Sequential(nn.ReLU()), ClusterConfig())


def test_recipe_stage_round_trips():
    raw = {"model": {"name": "mlp"}, "data": "digits",
           "stages": [{"kind": "cluster", "bits": 5, "granularity": "channel", "targets": {"types": ["Linear"]}},
                      {"kind": "merge"}]}
    recipe = parse_recipe(raw)
    assert recipe.stages[0].config == ClusterConfig(bits=5, granularity="channel")
    assert ClusterConfig.from_dict(recipe.stages[0].config.to_dict()) == recipe.stages[0].config


# ------------------------------------------------------------------------------------------ save / load


def weight_codecs(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        codecs = json.loads(f.metadata()["codecs"])
        sizes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}
    return codecs, sizes


def test_replay_rebuilds_the_same_structure():
    out = apply(prune_half(mlp()), ClusterConfig(bits=3, granularity="channel"))
    again = replay(mlp(), history(out))
    assert {k: v.shape for k, v in out.state_dict().items()} == {k: v.shape for k, v in again.state_dict().items()}


@pytest.mark.parametrize("granularity,merge", [("layer", False), ("layer", True), ("channel", False)])
def test_save_load_exact_with_b_bit_indices(tmp_path, granularity, merge):
    model = prune_half(small_cnn())
    model = apply(model, ClusterConfig(bits=4, granularity=granularity), targets=Targets(types=("Conv1d", "Linear")))
    torch.manual_seed(1)
    data = TinyData(torch.randn(16, 40), torch.randint(0, 3, (16,)))
    model = apply(model, FinetuneConfig(epochs=1, lr=1e-2), context=Context(data=data)).eval()
    if merge:
        model = apply(model, MergeConfig())
    x = torch.randn(4, 40)
    y = model(x)
    nncompress.save(model, tmp_path / "m")
    back = nncompress.load(tmp_path / "m")
    assert torch.equal(back(x), y)
    for name, layer in clustered_layers(model).items():
        assert torch.equal(clustered_layers(back)[name].assignment, layer.assignment)
    codecs, sizes = weight_codecs(tmp_path / "m")
    for name, m in model.named_modules():
        w = m.weight if merge and isinstance(m, (nn.Linear, nn.Conv1d)) else (
            m.shared_weight() if isinstance(m, ClusteredLayer) else None)
        if w is None or w.numel() < 256 or (merge and granularity == "channel"):
            continue
        # pruned half: a 1-bit mask, then <= 4-bit indices of the nonzeros; stored once: the weight of a
        # merged layer, the assignment (centroid indices, 0 = zero) of a clustered one, per layer or channel
        key, nnz = (f"{name}.weight" if merge else f"{name}.assignment"), int((w != 0).sum())
        meta = codecs[key]
        assert f"{name}.base.weight" not in codecs
        assert meta["codec"] == "bitmask" and meta["values_bits"] <= 4, name
        assert sizes[f"{key}::mask"] == math.ceil(w.numel() / 8)
        assert sizes[f"{key}::values_index"] == math.ceil(nnz * meta["values_bits"] / 8)
        assert sizes[f"{key}::values_codebook"] <= 16 * 4


def test_clustered_file_is_smaller_by_28_bits_per_weight(tmp_path):
    torch.manual_seed(0)
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 32, "hidden": [64], "num_classes": 3}})
    dense = nncompress.save(model, tmp_path / "dense") / "model.safetensors"
    out = apply(copy.deepcopy(model), ClusterConfig(bits=4), targets=Targets(include=("net.0",)))
    small = nncompress.save(out, tmp_path / "c") / "model.safetensors"
    saved = dense.stat().st_size - small.stat().st_size
    # 2048 weights go from 32 to 4 bits; the two codebooks (16 floats each) and headers cost a little back
    assert 2048 * 28 // 8 - 400 <= saved <= 2048 * 28 // 8
