"""eval/ (counts, MACs, bytes, latency, quality metrics) and export/onnx.py, each against an oracle."""
from __future__ import annotations

import doctest
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from nncompress.core.errors import ConfigError, DataError, UnsupportedOpError
from nncompress.eval import (accuracy, call_model, count_macs, count_nonzero_params, count_params, embed,
                             embedding_fidelity, file_bytes, measure_latency, measure_onnx_latency)
from nncompress.eval import latency as latency_mod
from nncompress.eval import measure as measure_mod
from nncompress.eval import metrics as metrics_mod
from nncompress.export import onnx as onnx_mod
from nncompress.export.onnx import export_onnx, onnx_run


@torch.library.custom_op("nncompress_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_opaque.register_fake
def _(x):
    return torch.empty_like(x)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 5, padding=2)
        self.bn = nn.BatchNorm1d(8)
        self.pool = nn.AdaptiveAvgPool1d(4)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):  # (B, 1, 40) -> (B, 10)
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


class Opaque(nn.Module):
    """Calls a custom op that no ONNX exporter can translate."""

    def forward(self, x):
        return _opaque(x) + 1


@pytest.mark.parametrize("module", [measure_mod, latency_mod, metrics_mod, onnx_mod])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---- counts -------------------------------------------------------------------------------------

def test_macs_of_linear_are_in_times_out_per_sample():
    layer = nn.Linear(64, 32)
    assert count_macs(layer, torch.randn(1, 64)) == 64 * 32
    assert count_macs(layer, torch.randn(3, 64)) == 3 * 64 * 32


@pytest.mark.parametrize("cin,cout,k,stride,pad,groups,length", [(3, 8, 5, 2, 1, 1, 20), (4, 8, 3, 1, 0, 2, 10)])
def test_macs_of_conv1d_match_hand_count(cin, cout, k, stride, pad, groups, length):
    conv = nn.Conv1d(cin, cout, k, stride=stride, padding=pad, groups=groups)
    l_out = (length + 2 * pad - k) // stride + 1
    expected = 2 * cout * l_out * (cin // groups) * k  # batch 2
    assert count_macs(conv, torch.randn(2, cin, length)) == expected


def test_count_macs_restores_training_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    count_macs(model, torch.randn(2, 4))
    assert model.training


def test_param_counts_see_known_zeros_and_count_tied_weights_once():
    layer = nn.Linear(10, 4)  # 40 weights + 4 biases
    with torch.no_grad():
        layer.weight[:, :5] = 0  # 20 zeros
        layer.bias[0] = 0
    assert count_params(layer) == 44
    assert count_nonzero_params(layer) == 44 - 21
    tied = nn.Sequential(layer, nn.ReLU(), layer)
    assert count_params(tied) == 44


def test_file_bytes_of_a_file_and_of_a_folder(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1234)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 66)
    assert file_bytes(tmp_path / "a.bin") == 1234
    assert file_bytes(tmp_path) == 1300
    with pytest.raises(DataError, match="missing.bin"):
        file_bytes(tmp_path / "missing.bin")


def test_call_model_feeds_tensors_and_dicts():
    class Two(nn.Module):
        def forward(self, a, b):
            return a - b

    assert call_model(Two(), {"b": torch.tensor(1.0), "a": torch.tensor(3.0)}).item() == 2.0
    assert call_model(nn.Identity(), torch.tensor(5.0)).item() == 5.0
    with pytest.raises(DataError, match="dict"):
        call_model(nn.Identity(), [torch.ones(1)])


# ---- latency (never asserting a timing value) ------------------------------------------------------

def test_latency_is_an_ordered_summary_and_restores_threads_and_mode():
    before = torch.get_num_threads()
    asked = 1 if before != 1 else 2
    model = TinyCNN().train()
    lat = measure_latency(model, torch.randn(3, 1, 40), warmup=1, repeats=7, threads=asked)
    assert torch.get_num_threads() == before
    assert model.training
    assert 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms
    assert (lat.repeats, lat.threads, lat.batch, lat.device, lat.runtime) == (7, asked, 3, "cpu", "torch")


def test_latency_takes_dict_inputs_and_records_current_threads():
    class Two(nn.Module):
        def forward(self, a, b):
            return a @ b

    lat = measure_latency(Two(), {"a": torch.randn(5, 8), "b": torch.randn(8, 8)}, warmup=0, repeats=3)
    assert lat.batch == 5 and lat.threads == torch.get_num_threads() and lat.median_ms > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_latency_on_absent_cuda_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="cuda") as info:
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), device="cuda")
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_latency_on_cuda_moves_the_model_back():
    model = nn.Linear(16, 16)
    lat = measure_latency(model, torch.randn(4, 16), warmup=1, repeats=3, device="cuda")
    assert lat.device == "cuda" and 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms
    assert model.weight.device.type == "cpu"


# ---- ONNX --------------------------------------------------------------------------------------------

def test_onnx_export_matches_torch_at_batch_1_and_7_from_one_file(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics so eval mode matters
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    model.train()
    path = export_onnx(model, torch.randn(1, 1, 40), tmp_path / "cnn.onnx")
    assert model.training  # export used eval mode and gave the mode back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]  # no temporaries
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param  # symbolic batch axis
    model.eval()
    for batch in (1, 7):
        x = torch.randn(batch, 1, 40)
        with torch.no_grad():
            ref = model(x).numpy()
        np.testing.assert_allclose(onnx_run(path, x), ref, atol=1e-4, rtol=0)

    lat = measure_onnx_latency(path, torch.randn(7, 1, 40), warmup=1, repeats=5, threads=1)
    assert (lat.runtime, lat.batch, lat.threads) == ("onnxruntime", 7, 1)
    assert 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms


def test_failed_export_leaves_no_file_and_no_temporaries(tmp_path):
    with pytest.raises(UnsupportedOpError) as info:
        export_onnx(Opaque(), torch.randn(2, 3), tmp_path / "m.onnx")
    message = str(info.value)
    assert message.startswith("Opaque: ONNX export failed") and "opaque" in message.split(":", 1)[1]
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []
    assert not torch._C._jit_is_onnx_log_enabled()  # the TorchScript exporter's global switch is restored

    kept = tmp_path / "kept.onnx"
    kept.write_bytes(b"previous export")
    with pytest.raises(UnsupportedOpError):
        export_onnx(Opaque(), torch.randn(2, 3), kept, exporter="dynamo")
    assert kept.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.onnx"]


def test_onnx_export_of_a_bert_like_encoder_with_dict_inputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(cfg)

        def forward(self, input_ids, attention_mask):  # (B, T) -> (B, H), the [CLS] vector
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

    model = Encoder().eval()

    def batch(b):
        mask = torch.ones(b, 12, dtype=torch.long)
        mask[:, 8:] = 0
        return {"attention_mask": mask, "input_ids": torch.randint(0, 50, (b, 12))}  # not signature order

    path = export_onnx(model, batch(2), tmp_path / "enc.onnx")
    x = batch(5)
    with torch.no_grad():
        ref = call_model(model, x).numpy()
    np.testing.assert_allclose(onnx_run(path, x), ref, atol=1e-4, rtol=0)


# ---- quality metrics ---------------------------------------------------------------------------------

def test_accuracy_counts_argmax_hits_over_tensor_and_dict_batches():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # logits = x
    loader = [(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 1])),  # 2 hits
              (torch.tensor([[1.0, 3.0], [5.0, 1.0]]), torch.tensor([0, 0]))]  # 1 hit
    assert accuracy(model, loader) == pytest.approx(3 / 4)

    class Keyed(nn.Module):
        def forward(self, features):
            return model(features)

    assert accuracy(Keyed(), [({"features": x}, y) for x, y in loader]) == pytest.approx(3 / 4)
    with pytest.raises(DataError, match="labels"):
        accuracy(model, [(torch.ones(2, 2), torch.zeros(3, dtype=torch.long))])


def test_embed_concatenates_dict_batches_in_order():
    class Sum(nn.Module):
        def forward(self, a, b):
            return a + b

    loader = [{"a": torch.full((2, 3), float(i)), "b": torch.ones(2, 3)} for i in range(3)]
    out = embed(Sum(), loader)
    assert out.shape == (6, 3)
    assert out[:, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


def test_fidelity_of_identical_and_rescaled_embeddings_is_perfect():
    torch.manual_seed(0)
    ref = torch.randn(50, 16)
    assert embedding_fidelity(ref, ref.clone(), k=10) == {"cosine": pytest.approx(1.0), "overlap_at_k": 1.0}
    scaled = ref * torch.rand(50, 1).add(0.5)  # cosine and neighbours ignore row norms
    assert embedding_fidelity(ref, scaled, k=10) == {"cosine": pytest.approx(1.0), "overlap_at_k": 1.0}


def _unit(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1)


def test_fidelity_hand_made_case():
    # Points on the unit circle. Nearest neighbours (k=1), by angle:
    #   reference 0, 10, 90, 100, 200 -> 1, 0, 3, 2, 3
    #   candidate 0, 10, 90, 300, 200 -> 1, 0, 1, 0, 3   (item 3 moved from 100 to 300 degrees)
    # items 0, 1, 4 keep their neighbour: overlap 3/5; cosines 1, 1, 1, cos(200 deg), 1.
    ref, cand = _unit([0, 10, 90, 100, 200]), _unit([0, 10, 90, 300, 200])
    got = embedding_fidelity(ref, cand, k=1)
    assert got["overlap_at_k"] == pytest.approx(3 / 5)
    assert got["cosine"] == pytest.approx((4 + math.cos(math.radians(200))) / 5)


def test_fidelity_rejects_mismatched_shapes_and_too_large_k():
    with pytest.raises(DataError, match=r"\(4, 3\).*\(4, 2\)"):
        embedding_fidelity(torch.ones(4, 3), torch.ones(4, 2))
    with pytest.raises(DataError, match="k=4"):
        embedding_fidelity(torch.eye(4), torch.eye(4), k=4)
