"""Compact storage: exact round trips, and bytes on disk that follow sparsity and distinct values."""
import math

import pytest
import torch
import torch.nn as nn

import nncompress
from nncompress.export.codecs import decode_tensor, encode_tensor


def _size(parts):
    return sum(p.numel() * p.element_size() for p in parts.values())


def test_unstructured_sparsity_bytes_follow_density():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    w[torch.rand_like(w) < 0.9] = 0
    parts, meta = encode_tensor(w)
    assert meta["codec"] == "bitmask" and torch.equal(decode_tensor(parts, meta), w)
    nnz = int((w != 0).sum())
    assert _size(parts) == nnz * 4 + math.ceil(w.numel() / 8)


def test_two_four_sparsity_stores_values_and_two_bit_indices():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    groups = w.view(-1, 4)
    drop = torch.rand(groups.shape).argsort(1)[:, :2]
    groups.scatter_(1, drop, 0.0)
    parts, meta = encode_tensor(w)
    assert meta["codec"] == "nm" and (meta["n"], meta["m"], meta["bits"]) == (2, 4, 2)
    assert torch.equal(decode_tensor(parts, meta), w)
    assert _size(parts) == w.numel() // 2 * 4 + w.numel() // 2 * 2 // 8


@pytest.mark.parametrize("levels, bits", [(2, 1), (4, 2), (16, 4), (200, 8)])
def test_few_distinct_values_use_a_codebook(levels, bits):
    torch.manual_seed(0)
    grid = torch.linspace(-1, 1, levels)
    w = grid[torch.randint(0, levels, (128, 64))]
    parts, meta = encode_tensor(w)
    assert meta["codec"] == "codebook" and meta["bits"] == bits
    assert torch.equal(decode_tensor(parts, meta), w)
    assert _size(parts) == math.ceil(w.numel() * bits / 8) + levels * 4


def test_dense_random_weights_stay_dense_and_nan_is_safe():
    w = torch.randn(64, 64)
    assert encode_tensor(w)[1]["codec"] == "dense"
    w[0, 0] = float("nan")
    parts, meta = encode_tensor(w)
    assert torch.equal(decode_tensor(parts, meta).isnan(), w.isnan())


def test_sparse_model_file_is_smaller_and_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    src = {"name": "torch.nn:Sequential"}  # not rebuildable; only file sizes are compared here
    dense = nncompress.save(model, tmp_path / "dense", source=src)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight[torch.rand_like(m.weight) < 0.9] = 0
    sparse = nncompress.save(model, tmp_path / "sparse", source=src)
    d, s = (p / "model.safetensors" for p in (dense, sparse))
    assert s.stat().st_size < 0.25 * d.stat().st_size
    from nncompress.export.checkpoint import load_weights, read_checkpoint
    fresh = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    load_weights(fresh, read_checkpoint(sparse))
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_pruned_then_clustered_weights_store_mask_plus_packed_indices():
    torch.manual_seed(0)
    levels = torch.tensor([-0.3, -0.1, 0.2, 0.5, 0.7, -0.6, 0.05])  # 7 shared values + zero: 3-bit indices
    w = levels[torch.randint(0, 7, (64, 64))]
    w[torch.rand(64, 64) < 0.9] = 0.0
    parts, meta = encode_tensor(w)
    assert meta["codec"] == "bitmask" and meta["values_bits"] == 3
    nnz = int((w != 0).sum())
    assert parts["mask"].numel() == math.ceil(w.numel() / 8)                      # one bit per weight
    assert parts["values_index"].numel() == math.ceil(nnz * 3 / 8)                # 3 bits per nonzero
    assert torch.equal(decode_tensor(parts, meta), w)
