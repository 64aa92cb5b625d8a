"""Quantized weights saved as bit-packed integer codes: bytes follow bits per weight, reload is exact."""
import copy
import json
import struct

import pytest
import torch

import nncompress
from nncompress.core import Context
from nncompress.formats import BinaryFormat, IntFormat, PerChannel, PerGroup, TernaryFormat, packed_size
from nncompress.quant import QATConfig, QuantizeConfig, QuantSpec, QuantWrapper, dequantize_codes, weight_codes
from nncompress.zoo.loaders import build_data, build_model

SPECS = {
    "w8": (QuantSpec(format=IntFormat(bits=8)), 8),
    "w4g32": (QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=32)), 4),
    "w2": (QuantSpec(format=IntFormat(bits=2)), 2),
    "w4asym": (QuantSpec(format=IntFormat(bits=4, symmetric=False), granularity=PerGroup(axis=1, size=32)), 4),
    "binary": (QuantSpec(format=BinaryFormat(granularity=PerChannel(axis=0))), 1),
    "ternary": (QuantSpec(format=TernaryFormat(granularity=PerChannel(axis=0))), 2),
    "ternary-tensor": (QuantSpec(format=TernaryFormat()), 2),
}


@pytest.fixture(scope="module")
def digits():
    return build_data({"name": "digits"})


def _header_bytes(path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return 8 + n, json.loads(raw[8:8 + n])


def quantized_mlp(spec: QuantSpec, digits):
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 64}})
    torch.manual_seed(0)
    return nncompress.apply(model, QuantizeConfig(weight=spec), context=Context(data=digits)).eval()


@pytest.mark.parametrize("name", list(SPECS))
def test_packed_bytes_follow_bits_and_reload_is_exact(tmp_path, digits, name):
    spec, bits = SPECS[name]
    q = quantized_mlp(spec, digits)
    nncompress.save(q, tmp_path / "m")
    again = nncompress.load(tmp_path / "m")
    x = digits.example_batch(64)
    with torch.no_grad():
        assert torch.equal(again(x), q(x))
    # the oracle: codes + every other tensor (scales, biases) at its dense size; integer zero points
    # (asymmetric grids) at most that: they take few distinct values and the exact codecs pack them
    expected = 0
    for key, t in q.state_dict().items():
        if key.endswith("base.weight"):
            expected += packed_size(t.numel(), bits)
        elif not key.endswith("zero_point"):
            expected += t.numel() * t.element_size()
    path = tmp_path / "m" / "model.safetensors"
    header, entries = _header_bytes(path)
    zero_points = sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in entries.items()
                      if k.split("::")[0].endswith("zero_point"))
    assert zero_points <= sum(t.numel() * t.element_size() for k, t in q.state_dict().items()
                              if k.endswith("zero_point"))
    expected += zero_points
    if name == "binary":  # binary stores alpha and the fix value (one float each per row) beside the codes
        expected += sum(m.base.weight.shape[0] * 8 for m in q.modules() if isinstance(m, QuantWrapper))
    if name.startswith("ternary"):  # ternary stores alpha (one float per group) beside the codes
        per_row = name == "ternary"
        expected += sum(4 * (m.base.weight.shape[0] if per_row else 1) for m in q.modules() if isinstance(m, QuantWrapper))
    # packed codes, or Huffman-coded ones when that is smaller (codecs.MIN_HUFFMAN codes or more)
    assert path.stat().st_size - header <= expected
    assert path.stat().st_size <= 1.05 * expected + 4096  # the JSON header is the only overhead
    codecs = json.loads(entries["__metadata__"]["codecs"])
    assert {codecs[k]["codec"] for k in codecs if k.endswith("base.weight")} == {"int_codes"}


def test_codes_round_trip_matches_the_fake_quant_forward(digits):
    q = quantized_mlp(SPECS["w4asym"][0], digits)
    for m in q.modules():
        if isinstance(m, QuantWrapper):
            c = weight_codes(m)
            assert c.codes.dtype == torch.int32 and c.bits == 4
            assert -8 <= int(c.codes.min()) and int(c.codes.max()) <= 7   # signed int4, zero point beside
            assert torch.equal(dequantize_codes(c), m.quantized_weight())


def test_ternary_codes_are_two_bit_and_round_trip(digits):
    q = quantized_mlp(SPECS["ternary"][0], digits)
    for m in q.modules():
        if isinstance(m, QuantWrapper):
            c = weight_codes(m)
            assert c.kind == "ternary" and c.bits == 2 and c.signed
            assert set(c.codes.unique().tolist()) <= {-1, 0, 1}
            assert torch.equal(dequantize_codes(c), m.quantized_weight())   # codes * alpha, exactly


def test_training_mode_and_tied_weights_keep_float_weights(tmp_path, digits):
    q = quantized_mlp(SPECS["w8"][0], digits)
    float_q = copy.deepcopy(q).train()   # QAT in progress: master weights must survive
    nncompress.save(float_q, tmp_path / "t")
    again = nncompress.load(tmp_path / "t")
    for (k, a), b in zip(float_q.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------------------------------ QAT output

def qat_mlp(spec: QuantSpec):
    """A QAT'd MLP whose first layer is Linear(256, 256)."""
    from helpers import TinyData
    torch.manual_seed(0)
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 256, "hidden": [256], "num_classes": 3}})
    data = TinyData(torch.randn(32, 256), torch.randint(0, 3, (32,)))
    cfg = QATConfig(weight=spec, epochs=1, max_steps=3, lr=1e-3, calib_batches=1)
    return nncompress.apply(model, cfg, context=Context(data=data)).eval(), data


@pytest.mark.parametrize("method", ["rtn", "lsq", "ternary"])
def test_qat_output_saves_as_packed_codes(tmp_path, method):
    spec = (QuantSpec(format=TernaryFormat(granularity=PerChannel(axis=0))) if method == "ternary"
            else QuantSpec(format=IntFormat(bits=2), method=method))
    q, data = qat_mlp(spec)
    assert isinstance(q.net[0], QuantWrapper) and q.net[0].base.weight.shape == (256, 256)
    nncompress.save(q, tmp_path / "m")
    again = nncompress.load(tmp_path / "m")
    x = data.example_batch(32)
    with torch.no_grad():
        assert torch.equal(again(x), q(x))
    expected = sum(packed_size(t.numel(), 2) if k.endswith("base.weight") else t.numel() * t.element_size()
                   for k, t in q.state_dict().items())
    if method == "ternary":  # alpha per row beside the codes (the wrapper holds no scale)
        expected += 4 * sum(m.base.weight.shape[0] for m in q.modules() if isinstance(m, QuantWrapper))
    path = tmp_path / "m" / "model.safetensors"
    header, entries = _header_bytes(path)
    assert path.stat().st_size - header <= expected                     # at most 16 KiB of codes for 256 x 256
    assert packed_size(256 * 256, 2) == 16384 and expected < 20_000       # not 256 KiB of float32
    codecs = json.loads(entries["__metadata__"]["codecs"])
    assert {codecs[k]["codec"] for k in codecs if k.endswith("base.weight")} == {"int_codes"}


# ------------------------------------------------------------------------------------------ embeddings

class TokenClassifier(torch.nn.Module):
    """Mean of token embeddings (V=64, D=32), then a Linear head: a tiny model with an Embedding."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 32, padding_idx=0)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def token_classifier() -> TokenClassifier:
    torch.manual_seed(0)
    return TokenClassifier()


@pytest.mark.parametrize("spec", [QuantSpec(format=IntFormat(bits=4)),
                                  QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=8))],
                         ids=["per-row", "per-group"])
def test_embedding_weight_quantization_saves_packed_and_reloads(tmp_path, spec):
    from helpers import TinyData
    from nncompress.core import Targets
    from nncompress.quant.fake_quant import QuantEmbedding
    model = token_classifier()
    ids = torch.randint(0, 64, (16, 5))
    data = TinyData(ids, torch.randint(0, 3, (16,)))
    q = nncompress.apply(model, QuantizeConfig(weight=spec), targets=Targets(types=("Embedding", "Linear")),
                         context=Context(data=data)).eval()
    assert isinstance(q.emb, QuantEmbedding)
    w = q.emb.base.weight.detach()
    rows = w.reshape(w.shape[0], -1, 8) if isinstance(spec.granularity, PerGroup) else w[:, None, :]
    ref_scale = (rows.double().abs().amax(-1, keepdim=True) / 7).clamp_min(torch.finfo(torch.float32).eps)  # oracle
    ref = (torch.round(rows.double() / ref_scale).clamp(-8, 7) * ref_scale).reshape(w.shape)
    assert torch.allclose(q.emb.quantized_weight().double(), ref, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(q.emb(ids), q.emb.quantized_weight()[ids])
    nncompress.save(q, tmp_path / "m", source={"name": "test_quant_storage:token_classifier"})
    again = nncompress.load(tmp_path / "m", trust_code=True)
    with torch.no_grad():
        assert torch.equal(again(ids), q(ids))
    path = tmp_path / "m" / "model.safetensors"
    header, entries = _header_bytes(path)
    expected = sum(packed_size(t.numel(), 4) if k.endswith("base.weight") else t.numel() * t.element_size()
                   for k, t in q.state_dict().items())
    assert path.stat().st_size - header <= expected  # packed, or Huffman-coded when smaller
    codecs = json.loads(entries["__metadata__"]["codecs"])
    assert codecs["emb.base.weight"]["codec"] == "int_codes"


def test_embeddings_stay_float_unless_targeted(digits):
    from helpers import TinyData
    data = TinyData(torch.randint(0, 64, (16, 5)), torch.randint(0, 3, (16,)))
    q = nncompress.apply(token_classifier(), QuantizeConfig(), context=Context(data=data))
    assert type(q.emb) is torch.nn.Embedding and isinstance(q.head, QuantWrapper)
