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
    # the values as they are; the mask Huffman-coded over its bytes: under one bit per weight, above
    # the entropy of a 10%-dense mask (0.469 bits)
    assert "mask_huffman" in meta and "mask" not in parts
    entropy = -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
    assert nnz * 4 + w.numel() * entropy / 8 < _size(parts) < nnz * 4 + w.numel() / 8 * 0.6


def test_two_four_sparsity_stores_values_and_two_bit_indices():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    groups = w.view(-1, 4)
    drop = torch.rand(groups.shape).argsort(1)[:, :2]
    groups.scatter_(1, drop, 0.0)
    parts, meta = encode_tensor(w)
    assert meta["codec"] == "nm" and (meta["n"], meta["m"], meta["combo_bits"]) == (2, 4, 3)
    assert torch.equal(decode_tensor(parts, meta), w)
    # the kept values, and each group's choice of 2 positions of 4 as one of 6 combinations: 3 bits, or
    # Huffman-coded towards log2(6) = 2.58 bits when that is smaller (table and offsets included)
    values, groups = w.numel() // 2 * 4, w.numel() // 4
    assert values + groups * math.log2(6) / 8 < _size(parts) <= values + math.ceil(groups * 3 / 8)


@pytest.mark.parametrize("levels, bits", [(2, 1), (4, 2), (16, 4), (200, 8)])
def test_few_distinct_values_use_a_codebook(levels, bits):
    torch.manual_seed(0)
    grid = torch.linspace(-1, 1, levels)
    w = grid[torch.randint(0, levels, (128, 64))]
    parts, meta = encode_tensor(w)
    assert meta["codec"] == "codebook" and meta["bits"] == bits
    assert torch.equal(decode_tensor(parts, meta), w)
    fixed = math.ceil(w.numel() * bits / 8) + levels * 4
    # 200 uniform levels: log2(200) = 7.64 bits, so the Huffman stream wins over 8; powers of two do not
    assert _size(parts) == fixed if "index_huffman" not in meta else _size(parts) < fixed
    assert ("index_huffman" in meta) == (levels == 200)


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
    w = levels[torch.randint(0, 7, (128, 128))]
    w[torch.rand(128, 128) < 0.9] = 0.0
    parts, meta = encode_tensor(w)
    assert meta["codec"] == "bitmask" and meta["values_bits"] == 3
    nnz = int((w != 0).sum())
    mask = sum(p.numel() for k, p in parts.items() if k.startswith("mask"))
    assert mask < 0.6 * math.ceil(w.numel() / 8)                                  # Huffman: < 0.6 bits per weight
    index = sum(p.numel() for k, p in parts.items() if k.startswith("values_index"))
    assert index <= math.ceil(nnz * 3 / 8)                                        # at most 3 bits per nonzero
    assert torch.equal(decode_tensor(parts, meta), w)


def test_huffman_streams_follow_the_entropy_and_are_chosen_only_when_smaller():
    torch.manual_seed(0)
    grid = torch.linspace(-1, 1, 16)
    skewed = grid[torch.randn(256, 256).mul(2).round().clamp(-8, 7).long() + 8]  # bell-shaped use of 16 levels
    parts, meta = encode_tensor(skewed)
    assert meta["codec"] == "codebook" and meta["bits"] == 4 and "index_huffman" in meta
    counts = torch.bincount(torch.bucketize(skewed.reshape(-1), grid), minlength=16).double()
    p = counts[counts > 0] / counts.sum()
    entropy_bytes = float(-(p * p.log2()).sum()) * skewed.numel() / 8
    assert entropy_bytes < _size(parts) < 1.03 * entropy_bytes + 16 * 4 + 300  # codebook, lengths, offsets
    assert _size(parts) < 0.9 * (skewed.numel() // 2 + 16 * 4)                  # vs fixed 4-bit
    assert torch.equal(decode_tensor(parts, meta), skewed)
    uniform = grid[torch.randint(0, 16, (256, 256))]
    parts, meta = encode_tensor(uniform)
    assert "index_huffman" not in meta and _size(parts) == uniform.numel() // 2 + 16 * 4


def test_signed_int_codes_huffman_round_trip():
    from nncompress.export.codecs import encode_int_codes
    torch.manual_seed(0)
    codes = torch.randn(128, 128).mul(1.5).round().clamp(-8, 7).to(torch.int32)
    s = torch.rand(128, 1) + 0.1
    hint = {"codes": codes, "bits": 4, "signed": True, "kind": "affine", "scale": "s", "zero_point": None,
            "granularity": {"kind": "per_channel", "axis": 0}, "values": codes * s}
    parts, meta = encode_int_codes(hint, {"s": s})
    assert "codes_huffman" in meta and _size(parts) < 0.85 * codes.numel() // 2
    assert torch.equal(decode_tensor(parts, meta, {"s": s}), codes * s)


def test_a_corrupt_huffman_stream_is_refused_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from nncompress.core import ModelLoadError
    from nncompress.export.checkpoint import load_weights, read_checkpoint
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) < 0.1)
    folder = nncompress.save(model, tmp_path / "m", source={"name": "torch.nn:Sequential"})
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    key = next(k for k in tensors if k.endswith("::mask_lengths"))
    tensors[key] = torch.full_like(tensors[key], 1)  # 256 one-bit codes: no Huffman code has them
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_weights(nn.Sequential(nn.Linear(256, 256)), read_checkpoint(folder))


def test_files_written_before_huffman_and_combinations_still_decode():
    from nncompress.formats import pack
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]] * 64)
    pos = torch.tensor([[1, 3], [0, 3]] * 64)
    old_nm = {"values": w[w != 0].clone(), "index": pack(pos.reshape(-1), 2)}
    meta = {"codec": "nm", "n": 2, "m": 4, "bits": 2, "shape": [64, 8], "dtype": "float32"}
    assert torch.equal(decode_tensor(old_nm, meta), w)
    codebook = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    idx = torch.bucketize(w.reshape(-1), codebook)
    old_cb = {"codebook": codebook, "index": pack(idx, 3)}
    assert torch.equal(decode_tensor(old_cb, {"codec": "codebook", "bits": 3, "shape": [64, 8], "dtype": "float32"}), w)


def test_huffman_code_lengths_stay_within_the_limit_for_very_skewed_counts():
    import numpy as np
    from nncompress.formats import huffman
    fib = [1, 1]
    while len(fib) < 60:
        fib.append(fib[-1] + fib[-2])  # Fibonacci counts: the deepest Huffman tree (59 levels unlimited)
    lengths = huffman.code_lengths(np.array(fib[::-1] + [0] * 196))
    assert lengths.max() <= huffman.MAX_BITS and (lengths[:60] > 0).all() and (lengths[60:] == 0).all()
    assert float((2.0 ** -lengths[:60]).sum()) <= 1.0  # still a prefix code
    symbols = np.repeat(np.arange(60), 3)
    parts, meta = huffman.encode(symbols, 256)
    assert (huffman.decode(parts, meta, symbols.size) == symbols).all()
    assert huffman.code_lengths(np.zeros(4, dtype=np.int64)).tolist() == [0, 0, 0, 0]
