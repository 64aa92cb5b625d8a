"""Quantized weights saved as bit-packed integer codes: bytes follow bits per weight, reload is exact."""
import copy
import json
import struct

import pytest
import torch

import nncompress
from nncompress.core import Context
from nncompress.formats import BinaryFormat, IntFormat, PerChannel, PerGroup, packed_size
from nncompress.quant import QuantizeConfig, QuantSpec, QuantWrapper, dequantize_codes, weight_codes
from nncompress.zoo.loaders import build_data, build_model

SPECS = {
    "w8": (QuantSpec(format=IntFormat(bits=8)), 8),
    "w4g32": (QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=32)), 4),
    "w2": (QuantSpec(format=IntFormat(bits=2)), 2),
    "w4asym": (QuantSpec(format=IntFormat(bits=4, symmetric=False), granularity=PerGroup(axis=1, size=32)), 4),
    "binary": (QuantSpec(format=BinaryFormat(granularity=PerChannel(axis=0))), 1),
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
    # the oracle: codes + every other tensor (scales, zero points, biases) at their dense size
    expected = 0
    for key, t in q.state_dict().items():
        if key.endswith("base.weight"):
            expected += packed_size(t.numel(), bits)
        else:
            expected += t.numel() * t.element_size()
    if name == "binary":  # binary stores alpha and the fix value (one float each per row) beside the codes
        expected += sum(m.base.weight.shape[0] * 8 for m in q.modules() if isinstance(m, QuantWrapper))
    path = tmp_path / "m" / "model.safetensors"
    header, entries = _header_bytes(path)
    assert path.stat().st_size - header == expected
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


def test_training_mode_and_tied_weights_keep_float_weights(tmp_path, digits):
    q = quantized_mlp(SPECS["w8"][0], digits)
    float_q = copy.deepcopy(q).train()   # QAT in progress: master weights must survive
    nncompress.save(float_q, tmp_path / "t")
    again = nncompress.load(tmp_path / "t")
    for (k, a), b in zip(float_q.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
