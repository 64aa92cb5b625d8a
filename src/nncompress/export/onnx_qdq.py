"""INT8 deployment: a fake-quantized model as an ONNX QDQ graph that ONNX Runtime runs with int8 kernels.

Each quantized layer becomes `QuantizeLinear -> DequantizeLinear` on its input (the wrapper's own
activation scale / zero point), `DequantizeLinear` on an 8-bit weight initializer (the wrapper's
per-channel or per-tensor weight codes, exactly what the fake-quant forward uses) and, when its input
is quantized, an int32 bias dequantized with scale `s_x * s_w` (the layout ONNX Runtime's QDQ
transformer fuses into QLinearConv / QGemm / QLinearMatMul / MatMulIntegerToFloat). Everything else
stays float.

Weights and activations are written as uint8 (the U8U8 format): signed codes c with zero point z are
stored as c + 128 with zero point z + 128 (`uint8_codes`), the same numbers and the same bytes
(symmetric int8 weights: codes 1..255, zero point 128). ONNX Runtime's x86 U8S8 kernels (int8
weights) multiply with VPMADDUBSW, which adds two u8 * s8 products into an int16 and saturates on
CPUs without AVX512-VNNI (AVX2; 255 * 127 * 2 = 64770 > 32767): an MLP on digits came out 10%
(relative L2) off the fake-quant model on an AVX2 EPYC. Its U8U8 kernels widen to int16 before
multiplying and accumulate in int32, exact on every CPU, so a file checked on one machine computes
the same integers on the one it is deployed to (measured on AVX2: QGemm, QLinearMatMul,
MatMulIntegerToFloat, QLinearConv 1x1 / 3x3 / depthwise and DynamicQuantizeMatMul all fuse and equal
the integer arithmetic). The cost: U8U8 GEMMs run slower than U8S8 ones where those are exact
(AVX2: ~1.2x on a 2048x384x1536 GEMM; AVX512-VNNI CPUs lose more, their VPDPBUSD being U8S8 only).

The numbers match the PyTorch fake-quant model up to the int32 bias rounding (|error| <= s_x s_w / 2
per output) and rare rounding ties; `export_qdq_onnx` checks the relative L2 error in onnxruntime
before the file replaces `path`. In a deep network a tie that rounds the other way (float sums run in
another order) moves later activations across rounding boundaries too: on all-MiniLM-L6-v2 (6 layers,
36 quantized Linear) the error to the fake-quant model is a few percent, so pass `tolerance=0.1` there.

BERT-style encoders (Hugging Face, wrapped as `SentenceEncoder`) export as they are: each Linear is a
MatMul (+ Add) that onnxruntime fuses into MatMulIntegerToFloat / QLinearMatMul; a quantized layer
the exporter dropped as dead code (a BERT pooler under mean pooling) is skipped. Q/K/V read one tensor
with one set of qparams and share a QuantizeLinear. The embedding tables are stored as int8 rows with
a scale per row (`quantize_embeddings=True`, `quantize_gather_tables`): on all-MiniLM-L6-v2 that takes
the file from 59 MB to 24 MB (fp32: 91 MB) at the same fidelity (~0.993 cosine to fp32).

>>> import os, tempfile, torch, torch.nn as nn
>>> from nncompress.core import Context
>>> from nncompress.formats import IntFormat
>>> import nncompress
>>> from nncompress.quant import QuantizeConfig, QuantSpec
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<...>
>>> x = torch.randn(32, 16)
>>> class Data: calib = [(x, None)]; example_batch = lambda self, n: x[:n]
>>> cfg = QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=8)), calib_batches=1,
...                      activation=QuantSpec(format=IntFormat(bits=8, signed=True)))
>>> q = nncompress.apply(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), cfg, context=Context(data=Data()))
>>> with tempfile.TemporaryDirectory() as d:
...     path = export_qdq_onnx(q, x[:2], os.path.join(d, "q.onnx"))
...     ops = qdq_op_counts(path)
>>> ops["QuantizeLinear"], ops["DequantizeLinear"]
(2, 6)
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import ConfigError, UnsupportedOpError
from ..eval.latency import ort_feed, ort_session
from ..eval.measure import Inputs, call_model, evaluating
from ..formats import IntFormat, PerChannel, PerTensor
from ..core import set_module
from ..quant.fake_quant import QuantWrapper
from ..quant.storage import weight_codes
from .onnx import Exporter, export_onnx

__all__ = ["export_qdq_onnx", "quantize_gather_tables", "qdq_op_counts", "optimized_op_counts", "uint8_codes"]

DEFAULT_TOLERANCE = 0.05  # relative L2 error vs the fake-quant model: bias rounding and rare activation ties
_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def export_qdq_onnx(model: nn.Module, inputs: Inputs, path: str | os.PathLike, *, opset: int | None = None,
                    tolerance: float = DEFAULT_TOLERANCE, verify: bool = True,
                    unfused: Literal["float", "int8"] = "float", quantize_embeddings: bool = True,
                    exporter: Exporter = "auto") -> Path:
    """Export a PTQ'd model (QuantLinear / QuantConv wrappers) as an ONNX QDQ graph at `path`, atomically.

    Weights: integer formats of at most 8 bits, per output channel or per tensor (per group has
    no int8 kernel). Activations (optional): 8-bit integer, per tensor.
    unfused: what a Conv whose output is not quantized again (it feeds a residual Add, or the
             output) stores: onnxruntime has no int8 Conv with a float output, so it would run it in
             float after a DequantizeLinear of the weight on every call; "float" stores the
             dequantized weight instead (same numbers, faster), "int8" the codes (smaller file).
    quantize_embeddings: store every float table read by a Gather (token / position embeddings) as
             int8 rows with one scale per row (`quantize_gather_tables`): 4x fewer bytes for the
             largest tensor of a transformer, outside the fake-quant model (`verify` covers it).
    exporter: how the float graph is exported first (`export_onnx`)
    verify: the QDQ file in onnxruntime must reproduce the PyTorch fake-quant model within
            `tolerance` (relative L2 error) at `inputs`, or nothing is written and
            `UnsupportedOpError` says by how much it differed.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, QuantWrapper)}
    if not wrappers:
        raise UnsupportedOpError(f"{type(model).__name__}: no QuantLinear/QuantConv layer; quantize the model "
                                 "first (kind: quantize) or export it with export_onnx")
    plans = {n: _layer_plan(n, w) for n, w in wrappers.items()}
    deploy = copy.deepcopy(model)
    for name, w in wrappers.items():  # a float model computing with the dequantized weights
        deploy = set_module(deploy, name, w.merge())
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        float_path = export_onnx(deploy, inputs, tmpdir / "float.onnx", opset=opset, exporter=exporter)
        proto = onnx.load(str(float_path))
        if unfused not in ("float", "int8"):
            raise ConfigError("unfused", f"must be 'float' or 'int8', got {unfused!r}")
        _insert_qdq(proto, plans, unfused == "int8")
        if quantize_embeddings:
            quantize_gather_tables(proto)
        target = tmpdir / path.name
        onnx.save(proto, str(target))
        if verify:
            verify_onnx(model, inputs, target, tolerance)
        os.replace(target, path)
        return path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


# ------------------------------------------------------------------------------------ per layer

def _layer_plan(name: str, w: QuantWrapper) -> dict[str, Any]:
    """Weight codes + qparams and input qparams of one wrapper, checked against what int8 kernels take."""
    fq = w.weight_quant
    if fq is None:
        raise UnsupportedOpError(f"{name}: the weight has no quantizer (QAT convert baked it in); export the "
                                 "model before convert, or with export_onnx")
    if not (isinstance(fq.fmt, IntFormat) and fq.fmt.bits <= 8 and isinstance(fq.granularity, (PerChannel, PerTensor))
            and (isinstance(fq.granularity, PerTensor) or fq.granularity.axis == 0)):
        raise UnsupportedOpError(f"{name}: QDQ export takes integer weights of <= 8 bits per output channel or "
                                 f"per tensor, got {fq.fmt} {fq.granularity}; requantize with that spec")
    codes = weight_codes(w)
    if codes is None:
        raise UnsupportedOpError(f"{name}: weight quantizer ({fq.spec.method}) has no fixed scale; "
                                 "export after PTQ or QAT convert with method rtn")
    plan: dict[str, Any] = {"merged": w.quantized_weight().detach().cpu().numpy(),
                            "codes": codes.codes.cpu().numpy(),
                            "w_scale": codes.scale.detach().cpu().numpy().reshape(-1).astype(np.float32),
                            "w_zero": (np.zeros(codes.scale.numel(), dtype=np.int32) if codes.zero_point is None
                                       else codes.zero_point.cpu().numpy().reshape(-1)),
                            "w_signed": codes.signed, "input": None}
    iq = w.input_quant
    if iq is not None:
        if not (isinstance(iq.fmt, IntFormat) and iq.fmt.bits == 8 and not iq.fmt.narrow_range
                and isinstance(iq.granularity, PerTensor) and iq.spec.method == "rtn" and iq.scale is not None):
            raise UnsupportedOpError(f"{name}: QDQ export takes 8-bit per-tensor rtn activations (full range), "
                                     f"got {iq.fmt} {iq.granularity} {iq.spec.method}; requantize the activations")
        plan["input"] = {"scale": np.float32(iq.scale.detach().cpu().reshape(-1)[0]),
                         "zero": 0 if iq.zero_point is None else int(iq.zero_point.reshape(-1)[0]),
                         "signed": iq.fmt.signed}
    return plan


def uint8_codes(codes: np.ndarray, zero: np.ndarray | int, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """8-bit codes and zero point(s) as uint8 (ONNX Runtime's U8U8 format, exact on every CPU): signed
    codes shift by 128 with their zero point, so `(c + 128) - (z + 128) = c - z`; unsigned ones stay.

    >>> c, z = uint8_codes(np.array([-127, 0, 127]), np.zeros(3, np.int32), signed=True)
    >>> c.tolist(), z.tolist(), c.dtype.name
    ([1, 128, 255], [128, 128, 128], 'uint8')
    """
    shift = 128 if signed else 0
    c, z = np.asarray(codes).astype(np.int32) + shift, np.asarray(zero).astype(np.int32) + shift
    if c.size and (c.min() < 0 or c.max() > 255) or z.size and (z.min() < 0 or z.max() > 255):
        raise UnsupportedOpError(f"codes outside the {'signed' if signed else 'unsigned'} 8-bit range "
                                 f"({int(c.min()) - shift}..{int(c.max()) - shift}); no 8-bit kernel takes them")
    return c.astype(np.uint8), z.astype(np.uint8)


def _find_layer(arr: np.ndarray, plans: dict[str, dict[str, Any]]) -> tuple[str, bool] | None:
    """(layer, transposed) whose dequantized weight equals the initializer `arr` exactly."""
    for name, p in plans.items():
        m = p["merged"]
        if arr.shape == m.shape and np.array_equal(arr, m):
            return name, False
        if m.ndim == 2 and arr.shape == m.T.shape and np.array_equal(arr, m.T):
            return name, True
    return None


def _requantized(index: int, nodes: list[Any], consumers: dict[str, list[int]], quantized_inputs: set[int]) -> bool:
    """True when every path from node `index`'s output (through Relu) ends in a quantized layer's
    input: then onnxruntime can fold the Q of that input into an int8 kernel for the node."""
    def ok(tensor: str) -> bool:
        users = consumers.get(tensor, [])
        return bool(users) and all(u in quantized_inputs or (nodes[u].op_type == "Relu" and ok(nodes[u].output[0]))
                                   for u in users)
    return ok(nodes[index].output[0])


def _relus_to_keep_apart(nodes: list[Any], layers: dict[int, tuple[str, bool]], consumers: dict[str, list[int]],
                         quantized_inputs: set[int]) -> set[int]:
    """Relu nodes to write as `Max(x, 0)`: the sole consumer of an int8 Gemm whose output stays float.
    onnxruntime fuses Gemm + Relu into a float FusedGemm before its QDQ pass would make the Gemm a
    QGemm, so such a layer ran in float with its weight dequantized on every call (measured: an MLP
    with only its middle 512x512 layer int8, 0.42 ms per batch of 64 against 0.30 ms in fp32; 0.14 ms
    with the Relu as Max). A Relu feeding quantized inputs is folded into their QuantizeLinear instead."""
    out = set()
    for i in quantized_inputs:
        users = consumers.get(nodes[i].output[0], [])
        if (nodes[i].op_type == "Gemm" and len(users) == 1 and nodes[users[0]].op_type == "Relu"
                and not _requantized(i, nodes, consumers, quantized_inputs)):
            out.add(users[0])
    return out


def _insert_qdq(proto: Any, plans: dict[str, dict[str, Any]], int8_unfused: bool) -> None:
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    old = list(g.node)  # protobuf hands out a new wrapper per access: key nodes by index, never by id()
    nodes, added, done = [], [], set()

    def const(name: str, arr: np.ndarray) -> str:
        added.append(numpy_helper.from_array(arr, name))
        return name

    shared: dict[tuple[Any, ...], str] = {}   # (input, qparams) -> its DequantizeLinear output
    layers: dict[int, tuple[str, bool]] = {}  # node index -> (layer, transposed)
    for i, node in enumerate(old):
        if node.op_type in _WEIGHT_OPS and len(node.input) >= 2 and node.input[1] in inits:
            found = _find_layer(numpy_helper.to_array(inits[node.input[1]]), plans)
            if found is not None and found[0] not in {v[0] for v in layers.values()}:
                layers[i] = found
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(old):
        for t in node.input:
            consumers.setdefault(t, []).append(i)
    quantized_inputs = {i for i, (name, _) in layers.items() if plans[name]["input"] is not None}
    relu_as_max = _relus_to_keep_apart(old, layers, consumers, quantized_inputs)
    for i, node in enumerate(old):
        if i in relu_as_max:  # the same numbers; onnxruntime's Gemm+activation fusion does not match Max
            nodes.append(helper.make_node("Max", [node.input[0], const(f"{node.output[0]}.zero", np.zeros((), np.float32))],
                                          list(node.output), name=node.name or f"{node.output[0]}.max"))
            continue
        if i not in layers:
            nodes.append(node)
            continue
        name, transposed = layers[i]
        if node.op_type == "Conv" and not int8_unfused and not _requantized(i, old, consumers, quantized_inputs):
            if plans[name]["input"] is not None:  # activation fake-quant only; the weight stays float
                _quantize_input(node, name.replace(".", "_") or "layer", plans[name]["input"], nodes, const, shared)
            done.add(name)
            nodes.append(node)
            continue
        done.add(name)
        p, tag = plans[name], name.replace(".", "_") or "layer"
        # weight: uint8 codes (signed ones + 128, `uint8_codes`), dequantized per output channel (axis 1
        # when stored (in, out))
        codes = p["codes"].reshape(p["merged"].shape)
        codes = codes.T if transposed else codes
        per_tensor = p["w_scale"].size == 1
        w_scale = p["w_scale"][:1].reshape(()) if per_tensor else p["w_scale"]
        codes, w_zero = uint8_codes(codes, p["w_zero"][:1].reshape(()) if per_tensor else p["w_zero"], p["w_signed"])
        wq = const(f"{tag}.weight_q", codes)
        attrs = {} if per_tensor else {"axis": 1 if transposed else 0}
        nodes.append(helper.make_node("DequantizeLinear", [wq, const(f"{tag}.weight_scale", w_scale),
                                                           const(f"{tag}.weight_zero", w_zero)],
                                      [f"{tag}.weight_dq"], name=f"{tag}.weight_dq", **attrs))
        node.input[1] = f"{tag}.weight_dq"
        if p["input"] is not None:
            a = p["input"]
            _quantize_input(node, tag, a, nodes, const, shared)
            if len(node.input) > 2 and node.input[2] in inits:  # int32 bias on the accumulator's grid
                bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
                b_scale = (np.float64(a["scale"]) * p["w_scale"].astype(np.float64)).astype(np.float32)
                b_scale = np.broadcast_to(b_scale, bias.shape).copy()
                b_codes = np.clip(np.round(bias / b_scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
                nodes.append(helper.make_node("DequantizeLinear", [
                    const(f"{tag}.bias_q", b_codes), const(f"{tag}.bias_scale", b_scale),
                    const(f"{tag}.bias_zero", np.zeros_like(b_codes))], [f"{tag}.bias_dq"],
                    name=f"{tag}.bias_dq", axis=0))
                node.input[2] = f"{tag}.bias_dq"
        nodes.append(node)
    replace_graph(g, plans, done, nodes, added, "Conv/Gemm/MatMul")
    if max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0) < 13:
        raise UnsupportedOpError("per-channel DequantizeLinear needs ONNX opset >= 13; export with opset=13 or newer")


def _dead(plan: dict[str, Any], initializers: Any) -> bool:
    """True when no initializer holds the layer's weight (in any layout): the exporter dropped the layer
    as dead code (e.g. a BERT pooler whose output the model never returns), so there is nothing to quantize.
    A weight that is there but not fed to a Conv/Gemm/MatMul is a rewrite we cannot follow: not dead."""
    from onnx import numpy_helper

    m = plan["merged"]
    for init in initializers:
        if tuple(init.dims) in (m.shape, m.T.shape) and init.data_type == 1:  # FLOAT
            arr = numpy_helper.to_array(init)
            if np.array_equal(arr, m) or np.array_equal(arr, m.T):  # False on a shape mismatch
                return False
    return True


def _quantize_input(node: Any, tag: str, a: dict[str, Any], nodes: list[Any], const: Any,
                    shared: dict[tuple[Any, ...], str]) -> None:
    """QuantizeLinear -> DequantizeLinear in front of `node`'s first input, with the wrapper's qparams.

    uint8 like the weights (signed activations: zero point + 128, the same grid shifted): U8U8 layers.
    Layers reading the same tensor with the same qparams (Q/K/V calibrate on one input) share one pair.
    """
    from onnx import helper

    _, zero = uint8_codes(np.zeros(0), a["zero"], a["signed"])
    key = (node.input[0], float(a["scale"]), int(zero))
    if key in shared:
        node.input[0] = shared[key]
        return
    shared[key] = f"{tag}.input_dq"
    s = const(f"{tag}.input_scale", np.array(a["scale"], np.float32))
    z = const(f"{tag}.input_zero", zero)
    nodes.append(helper.make_node("QuantizeLinear", [node.input[0], s, z], [f"{tag}.input_q"], name=f"{tag}.input_q"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{tag}.input_q", s, z], [f"{tag}.input_dq"],
                                  name=f"{tag}.input_dq"))
    node.input[0] = f"{tag}.input_dq"


def replace_graph(g: Any, plans: dict[str, Any], done: set[str], nodes: list[Any], added: list[Any],
                  ops: str) -> None:
    """Install the rewritten `nodes` and the `added` initializers in graph `g`, dropping unused ones;
    every planned layer must have been rewritten (`done`) unless the exporter removed it as dead code."""
    missing = sorted(n for n in set(plans) - done if not _dead(plans[n], g.initializer))
    if missing:
        raise UnsupportedOpError(f"{missing[0]}: no {ops} in the exported graph holds this layer's weight "
                                 "(the exporter rewrote it); export with exporter='torchscript' or file an issue")
    used = {i for n in nodes for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + added)
    del g.node[:]
    g.node.extend(nodes)


def verify_onnx(model: nn.Module, inputs: Inputs, target: Path, tolerance: float, *, label: str = "QDQ ONNX",
                reference: str = "the fake-quant model",
                hint: str = "check the activation ranges or raise tolerance") -> None:
    """Run `target` in ONNX Runtime and compare with `model` in torch (relative L2 error)."""
    with evaluating(model), torch.no_grad():
        ref = call_model(model, inputs)
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).detach().cpu().numpy().astype(np.float64)
    session = ort_session(target)
    got = session.run(None, ort_feed(session, inputs))[0].astype(np.float64)
    if got.shape != ref.shape:
        raise UnsupportedOpError(f"{label} output has shape {got.shape}, {reference} gives {ref.shape}")
    err = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
    if not err <= tolerance:
        raise UnsupportedOpError(f"{label} output differs from {reference} (relative L2 error "
                                 f"{err:.2e} > {tolerance:g}); {hint}")


# ------------------------------------------------------------------------------------ embeddings

def quantize_gather_tables(proto: Any) -> list[str]:
    """Rewrite each `Gather(table, ids)` on a float 2-D initializer (axis 0, no other reader) in place as

        Gather(table_q int8 (V, D), ids) -> Cast(float) -> Mul(Gather(row_scale (V, 1), ids))

    with symmetric int8 codes and one scale per row (`max|row| / 127`, quant/native.py's grid): only
    the gathered rows are dequantized, never the whole table (a DequantizeLinear in front of the Gather
    would expand all V x D floats on every call). Returns the names of the tables it quantized.
    """
    from onnx import TensorProto, helper, numpy_helper

    from ..quant.native import weight_int8

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    readers = Counter(t for n in g.node for t in n.input)
    outputs = {o.name for o in g.output}
    nodes, added, done = [], [], []
    for node in list(g.node):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = node.input[0] if node.op_type == "Gather" else ""
        init = inits.get(table)
        if (init is None or axis != 0 or init.data_type != TensorProto.FLOAT or len(init.dims) != 2
                or readers[table] != 1 or table in outputs):
            nodes.append(node)
            continue
        codes, scale = weight_int8(torch.from_numpy(numpy_helper.to_array(init).copy()))   # (V, D) int8, (V,)
        tag, ids, out = table.replace(".", "_"), node.input[1], node.output[0]
        added += [numpy_helper.from_array(codes.numpy(), f"{tag}.int8"),
                  numpy_helper.from_array(scale.numpy().reshape(-1, 1), f"{tag}.row_scale")]   # (V, 1)
        nodes += [helper.make_node("Gather", [f"{tag}.int8", ids], [f"{tag}.rows_q"], name=f"{tag}.gather_q"),
                  helper.make_node("Gather", [f"{tag}.row_scale", ids], [f"{tag}.rows_scale"],
                                   name=f"{tag}.gather_scale"),                            # (..., 1)
                  helper.make_node("Cast", [f"{tag}.rows_q"], [f"{tag}.rows_f"], to=TensorProto.FLOAT,
                                   name=f"{tag}.cast"),
                  helper.make_node("Mul", [f"{tag}.rows_f", f"{tag}.rows_scale"], [out], name=f"{tag}.dequant")]
        done.append(table)
    keep = [i for i in g.initializer if i.name not in done]
    del g.initializer[:]
    g.initializer.extend(keep + added)
    del g.node[:]
    g.node.extend(nodes)
    return done


# ------------------------------------------------------------------------------------ inspection

def qdq_op_counts(path: str | os.PathLike) -> Counter:
    """How many nodes of each op type the ONNX file holds (as written, before onnxruntime optimizes it)."""
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def optimized_op_counts(path: str | os.PathLike, threads: int = 1) -> Counter:
    """The op types onnxruntime actually runs for `path` (CPU, all graph optimizations): e.g.
    QLinearConv / QGemm / QLinearMatMul when its QDQ transformer fused a layer into int8 kernels."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
