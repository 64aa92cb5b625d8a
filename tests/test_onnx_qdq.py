"""INT8 ONNX QDQ export: Q/DQ around activations, int8 weight initializers, numbers of the fake-quant model."""
import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import nncompress
from nncompress.core import Context, UnsupportedOpError
from nncompress.export.onnx import onnx_run
from nncompress.export.onnx_qdq import export_qdq_onnx, optimized_op_counts, qdq_op_counts
from nncompress.formats import IntFormat, PerGroup
from nncompress.quant import QuantizeConfig, QuantSpec
from nncompress.zoo.loaders import build_data, build_model

W8A8 = QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=8)),
                      activation=QuantSpec(format=IntFormat(bits=8, signed=False, symmetric=False)))


@pytest.fixture(scope="module")
def digits():
    return build_data({"name": "digits"})


@pytest.fixture(scope="module")
def mlp_qdq(digits, tmp_path_factory):
    torch.manual_seed(0)
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 64}})
    q = nncompress.apply(model, W8A8, context=Context(data=digits)).eval()
    path = export_qdq_onnx(q, digits.example_batch(4), tmp_path_factory.mktemp("qdq") / "mlp.onnx")
    return q, path


def test_file_holds_qdq_nodes_and_int8_weights(mlp_qdq):
    q, path = mlp_qdq
    ops = qdq_op_counts(path)
    assert ops["QuantizeLinear"] == 3 and ops["DequantizeLinear"] == 9   # per layer: input Q+DQ, weight, bias
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    weights = [a for n, a in inits.items() if n.endswith("weight_q")]
    assert len(weights) == 3 and all(a.dtype == np.int8 for a in weights)
    assert not [n for n, a in inits.items() if a.dtype == np.float32 and a.ndim == 2]   # no float weight left
    # the int8 codes are the wrapper's own: dequantized, they are the fake-quant weight bit for bit
    w, s = inits["net_0.weight_q"], inits["net_0.weight_scale"]
    assert np.array_equal(w.astype(np.float32) * s[:, None], q.net[0].quantized_weight().detach().numpy())
    assert {"QGemm"} <= set(optimized_op_counts(path))   # onnxruntime fused them into int8 kernels


def test_onnxruntime_agrees_with_the_fake_quant_model(mlp_qdq, digits):
    q, path = mlp_qdq
    agree = total = 0
    worst = 0.0
    with torch.no_grad():
        for x, _ in digits.test:
            ref, got = q(x).numpy(), onnx_run(path, x)
            agree += int((ref.argmax(1) == got.argmax(1)).sum())
            total += len(x)
            worst = max(worst, float(np.abs(ref - got).max() / np.abs(ref).max()))
    assert agree / total >= 0.99
    assert worst < 0.02   # int32 bias rounding and rare activation ties only


def test_conv_layers_become_qlinearconv(tmp_path):
    torch.manual_seed(0)
    data = build_data({"name": "mnist1d", "kwargs": {"batch_size": 64}})
    model, _ = build_model({"name": "mnist1d_cnn", "kwargs": {"widths": [16, 32, 32]}})
    cfg = QuantizeConfig(weight=W8A8.weight, activation=W8A8.activation, calib_batches=2, fold_bn=True)
    q = nncompress.apply(model, cfg, context=Context(data=data)).eval()
    path = export_qdq_onnx(q, data.example_batch(4), tmp_path / "cnn.onnx")   # verified inside
    assert optimized_op_counts(path)["QLinearConv"] >= 3
    small = export_qdq_onnx(q, data.example_batch(4), tmp_path / "cnn8.onnx", unfused="int8")
    assert small.stat().st_size < path.stat().st_size


def test_failure_leaves_no_file(mlp_qdq, digits, tmp_path):
    q, _ = mlp_qdq
    with pytest.raises(UnsupportedOpError, match="relative L2 error"):
        export_qdq_onnx(q, digits.example_batch(4), tmp_path / "m.onnx", tolerance=0.0)
    grouped = copy.deepcopy(q)
    cfg = QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=4), granularity=PerGroup(axis=1, size=32)))
    grouped = nncompress.apply(grouped, cfg)
    with pytest.raises(UnsupportedOpError, match="per output channel"):
        export_qdq_onnx(grouped, digits.example_batch(4), tmp_path / "g.onnx")
    assert list(tmp_path.iterdir()) == []
