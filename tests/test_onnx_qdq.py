"""INT8 ONNX QDQ export: Q/DQ around activations, int8 weight initializers, numbers of the fake-quant model."""
import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import nncompress
from nncompress.core import Context, Targets, UnsupportedOpError
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
    # U8U8: the symmetric int8 codes c stored as c + 128 with zero point 128 (one byte each, as int8)
    assert len(weights) == 3 and all(a.dtype == np.uint8 for a in weights)
    assert all(inits[n.replace("weight_q", "weight_zero")].tolist() == [128] * len(a) for n, a in inits.items()
               if n.endswith("weight_q"))
    assert not [n for n, a in inits.items() if a.dtype == np.float32 and a.ndim == 2]   # no float weight left
    # the codes are the wrapper's own: dequantized, they are the fake-quant weight bit for bit
    w, s = inits["net_0.weight_q"], inits["net_0.weight_scale"]
    assert np.array_equal((w.astype(np.float32) - 128) * s[:, None], q.net[0].quantized_weight().detach().numpy())
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


def test_a_lone_int8_gemm_before_a_relu_runs_as_qgemm(digits, tmp_path):
    """onnxruntime fuses Gemm + Relu into a float FusedGemm before its QDQ pass; the exporter writes
    that Relu as Max(x, 0) so the int8 layer still becomes a QGemm, with the same numbers."""
    torch.manual_seed(0)
    model, _ = build_model({"name": "mlp", "kwargs": {"in_features": 64, "hidden": [32, 32]}})
    q = nncompress.apply(model, W8A8, targets=Targets(include=("net.2",)), context=Context(data=digits)).eval()
    path = export_qdq_onnx(q, digits.example_batch(4), tmp_path / "lone.onnx")   # verified inside
    ops = optimized_op_counts(path)
    assert ops["QGemm"] == 1 and ops["Max"] == 1   # without the Max: a FusedGemm on dequantized weights
    x = digits.example_batch(16)
    with torch.no_grad():
        assert np.allclose(onnx_run(path, x), q(x).numpy(), atol=2e-2 * float(q(x).abs().max()))


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


# ------------------------------------------------------------------------------------ BERT-style encoders

class _Sentences:
    """Token batches for a tiny random BERT (the interface `quantize` reads from ctx.data)."""

    task = "embedding"

    def __init__(self, n=16, t=12, vocab=100):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, vocab, (n, t), generator=g)
        mask = torch.ones(n, t, dtype=torch.long)
        mask[::2, t // 2:] = 0   # half the rows padded
        self.batch = {"input_ids": ids, "attention_mask": mask}
        self.calib = self.test = self.train = [self.batch]

    def example_batch(self, n):
        return {k: v[:n] for k, v in self.batch.items()}


@pytest.fixture(scope="module")
def tiny_bert():
    from nncompress.zoo.hf import hf_from_config
    torch.manual_seed(0)
    cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 32}
    return hf_from_config(cfg).eval(), _Sentences()


def _assert_int8_tables(path, model):
    """Every weight (embedding tables included) is stored as int8: no float matrix left, ~1/4 of the bytes."""
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    assert not [n for n, a in inits.items() if a.dtype == np.float32 and a.ndim == 2 and min(a.shape) > 1]
    words = model.model.embeddings.word_embeddings.weight.detach().numpy()
    table = "model_embeddings_word_embeddings_weight"
    codes, scale = inits[f"{table}.int8"], inits[f"{table}.row_scale"]
    assert codes.dtype == np.int8 and scale.shape == (len(words), 1)
    assert np.abs(codes * scale - words).max() <= scale.max() / 2 * (1 + 1e-6)   # half a step per row
    fp32_bytes = 4 * sum(p.numel() for n, p in model.named_parameters() if "pooler" not in n)
    assert sum(a.nbytes for a in inits.values()) < 0.4 * fp32_bytes   # (node metadata dominates a tiny file)


@pytest.mark.slow  # subprocesses / transformers loads: seconds each (CI runs the slow tier)
def test_bert_static_qdq_runs_int8_matmuls(tiny_bert, tmp_path):
    model, data = tiny_bert
    # every Linear, the pooler included: it is dead code for mean pooling, so the exporter drops it
    q = nncompress.apply(copy.deepcopy(model), W8A8, context=Context(data=data)).eval()
    path = export_qdq_onnx(q, data.example_batch(4), tmp_path / "bert.onnx", tolerance=0.1)   # verified inside
    # 2 layers x 4 distinct Linear inputs (Q/K/V share one); no pooler
    assert qdq_op_counts(path)["QuantizeLinear"] == 8
    _assert_int8_tables(path, model)
    ops = optimized_op_counts(path)
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["QGemm"] == 12
    with torch.no_grad():
        ref = q(**data.batch).numpy()
    got = onnx_run(path, data.batch)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.99


def test_dynamic_onnx_equals_hand_computed_integer_arithmetic(tmp_path):
    from nncompress.export.onnx_dynamic import export_dynamic_onnx
    from nncompress.quant.native import Int8DynamicConfig
    torch.manual_seed(0)
    q = nncompress.apply(torch.nn.Sequential(torch.nn.Linear(16, 8)), Int8DynamicConfig())
    x = torch.randn(5, 16)
    path = export_dynamic_onnx(q, x, tmp_path / "lin.onnx")
    # ONNX DynamicQuantizeLinear: uint8, range widened to include 0, zero point rounded half to even
    x64 = x.double().numpy()
    lo, hi = min(0.0, x64.min()), max(0.0, x64.max())
    s = np.float32((hi - lo) / 255)
    z = np.clip(np.round(-lo / s), 0, 255)
    xq = np.clip(np.round(x64 / s) + z, 0, 255)
    layer = q[0]
    w, sw = layer.weight_q.double().numpy(), layer.weight_scale.double().numpy()
    ref = ((xq - z) @ w.T) * float(s) * sw + layer.bias.double().numpy()
    got = onnx_run(path, x)
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-6)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    # the torch layer's own codes, stored as uint8 + 128 with zero point 128 (U8U8: no int16 saturation)
    assert inits["0.weight_q"].dtype == np.uint8 and set(inits["0.weight_zero"].tolist()) == {128}
    assert np.array_equal(inits["0.weight_q"].astype(np.int16) - 128, layer.weight_q.numpy().T)
    assert not [n for n, a in inits.items() if a.dtype == np.float32 and a.ndim == 2]


def _int16_saturating_case(k=128, n=16, m=6):
    """Inputs where a u8 x s8 kernel that adds product pairs in int16 (VPMADDUBSW, x86 without
    AVX512-VNNI) saturates: activations at 255 against weight codes +-127 (pairs of 64770)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.where(torch.rand(n, k, generator=g) < 0.5, 127, -127).to(torch.int8)
    codes[::2] = 127
    x = torch.rand(m, k, generator=g) * 0.1
    x[:, ::2] = 1.0
    return x, codes


def test_dynamic_onnx_is_exact_where_int8_weights_saturate(tmp_path):
    """The uint8 weights run onnxruntime's U8U8 kernels: the hand-computed integer arithmetic on every CPU,
    also on inputs where int8 weights (U8S8) would saturate int16 pair sums on AVX2-only CPUs."""
    from nncompress.export.onnx_dynamic import export_dynamic_onnx
    from nncompress.quant.native import Int8DynamicConfig
    x, codes = _int16_saturating_case()
    q = nncompress.apply(torch.nn.Sequential(torch.nn.Linear(codes.shape[1], codes.shape[0])), Int8DynamicConfig())
    with torch.no_grad():
        q[0].weight_q.copy_(codes)
    path = export_dynamic_onnx(q, x, tmp_path / "sat.onnx")
    x64 = x.double().numpy()
    s = np.float32(x64.max() / 255)                       # range [0, max]: zero point 0
    xq = np.clip(np.round(x64 / s), 0, 255)
    layer = q[0]
    ref = (xq @ codes.double().numpy().T) * float(s) * layer.weight_scale.double().numpy() + layer.bias.double().numpy()
    assert np.allclose(onnx_run(path, x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    ops = optimized_op_counts(path)
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] == 1   # still one fused int8 kernel


def test_qdq_onnx_is_exact_where_int8_weights_saturate(tmp_path):
    """Static QDQ, signed and unsigned activations: QGemm on uint8 weights equals the integer arithmetic."""
    x, codes = _int16_saturating_case()
    for signed in (False, True):
        act = QuantSpec(format=IntFormat(bits=8, signed=signed, symmetric=signed))
        model = torch.nn.Sequential(torch.nn.Linear(codes.shape[1], codes.shape[0]))
        with torch.no_grad():
            model[0].weight.copy_(codes.float() * 0.01)
        data = type("D", (), {"calib": [(x, None)], "example_batch": lambda self, n: x[:n]})()
        q = nncompress.apply(model, QuantizeConfig(weight=W8A8.weight, activation=act, calib_batches=1),
                             context=Context(data=data)).eval()
        path = export_qdq_onnx(q, x, tmp_path / f"sat{signed}.onnx", tolerance=1e-4)
        assert optimized_op_counts(path)["QGemm"] == 1
        with torch.no_grad():
            ref = q(x).double().numpy()
        assert np.allclose(onnx_run(path, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow  # subprocesses / transformers loads: seconds each (CI runs the slow tier)
def test_bert_dynamic_onnx_fuses_and_keeps_fidelity(tiny_bert, tmp_path):
    from nncompress.core import Targets
    from nncompress.export.onnx_dynamic import export_dynamic_onnx
    from nncompress.quant.native import Int8DynamicConfig
    model, data = tiny_bert
    q = nncompress.apply(copy.deepcopy(model), Int8DynamicConfig(), targets=Targets(types=(torch.nn.Linear,)))
    path = export_dynamic_onnx(q, data.example_batch(4), tmp_path / "bert_dyn.onnx")
    assert qdq_op_counts(path)["DynamicQuantizeLinear"] == 12   # pooler dropped as dead code
    _assert_int8_tables(path, model)
    ops = optimized_op_counts(path)
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] == 12 and ops["MatMulInteger"] == 0
    with torch.no_grad():
        ref = model(**data.batch).numpy()
    got = onnx_run(path, data.batch)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.99
    with pytest.raises(UnsupportedOpError, match="int8_dynamic"):
        export_dynamic_onnx(model, data.example_batch(4), tmp_path / "none.onnx")
    with pytest.raises(UnsupportedOpError, match="relative L2 error"):
        export_dynamic_onnx(q, data.example_batch(4), tmp_path / "tight.onnx", tolerance=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert_dyn.onnx"]


def test_gather_tables_become_int8_rows_dequantized_after_the_gather():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from nncompress.export.onnx_qdq import quantize_gather_tables
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 64)).astype(np.float32)
    table[3] = 0.0   # an all-zero row: no division by zero
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 64])],
        [numpy_helper.from_array(table, "table")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = proto.ByteSize()
    assert quantize_gather_tables(proto) == ["table"]
    assert proto.ByteSize() < before / 3   # int8 codes + one float per row instead of float rows
    ids = np.array([[0, 3, 49, 3], [7, 7, 1, 2]])
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    # oracle: symmetric per-row codes in float64
    scale = np.abs(table.astype(np.float64)).max(1, keepdims=True) / 127
    codes = np.round(table / np.where(scale > 0, scale, 1))
    assert np.abs(codes).max() <= 127
    ref = (codes * scale)[ids]
    assert np.allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert np.abs(got - table[ids]).max() <= scale.max() / 2 + 1e-7   # half a step per row at most
    assert not np.any(got[0, 1])
