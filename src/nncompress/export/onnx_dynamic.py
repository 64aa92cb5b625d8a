"""INT8 deployment with dynamic activations: int8 weight codes in the file, activations quantized at run time.

`export_dynamic_onnx` takes a model converted by the `int8_dynamic` transform (`Int8DynamicLinear`
layers, quant/native.py) and writes an ONNX graph in which each of those layers is

    DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q + 128, x_zero, 128) -> Cast(float) -> Mul(s_x * s_w)
    [-> Add(b)]     (W_q + 128: the int8 codes stored as uint8, zero point 128: see below)

standard ONNX ops only (opset >= 11), which onnxruntime's CPU optimizer fuses into
`DynamicQuantizeMatMul` / `MatMulIntegerToFloat` int8 kernels (bias folded in; layers reading the same
input, e.g. Q/K/V, share one DynamicQuantizeLinear after its common-subexpression pass): on
all-MiniLM-L6-v2 the optimized graph runs exactly the kernels of onnxruntime's own `quantize_dynamic`
(per-channel), in their U8U8 variant. The weight codes and per-channel scales are the layer's own, and the
embedding tables are stored as int8 rows (`quantize_embeddings`), so the file is about a quarter of the
fp32 one. Activations differ from the torch layer by design: ONNX's DynamicQuantizeLinear is uint8,
asymmetric, one scale per tensor (torch's fbgemm kernel takes the same grid, 7-bit where it would
saturate; its int_mm kernel one symmetric scale per row), so the check against torch is a tolerance on
the relative L2 error, not bit equality.

The weight codes are stored as uint8 with zero point 128 (`onnx_qdq.uint8_codes`: code c as c + 128,
the same numbers and bytes), not as int8: onnxruntime's x86 U8S8 kernels (int8 weights) saturate int16
pair sums on CPUs without AVX512-VNNI (255 * 127 * 2 > 32767; the reason for quantize_dynamic's
`reduce_range`), and a file runs on whatever CPU it is deployed to. Its U8U8 kernels are exact on
every CPU with the full 8-bit activation grid, at some speed (AVX2: ~1.2x slower GEMMs than U8S8).

>>> import os, tempfile, torch, torch.nn as nn
>>> import nncompress
>>> from nncompress.quant.native import Int8DynamicConfig
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<...>
>>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
>>> q = nncompress.apply(model, Int8DynamicConfig())
>>> with tempfile.TemporaryDirectory() as d:
...     path = export_dynamic_onnx(q, torch.randn(8, 16), os.path.join(d, "q.onnx"))
...     ops = qdq_op_counts(path)
>>> ops["DynamicQuantizeLinear"], ops["MatMulInteger"]
(2, 2)
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from ..core.errors import UnsupportedOpError
from ..eval.measure import Inputs
from ..core import set_module
from ..quant.native import Int8DynamicLinear
from .onnx import export_onnx
from .onnx_qdq import _find_layer, qdq_op_counts, quantize_gather_tables, replace_graph, uint8_codes, verify_onnx

__all__ = ["export_dynamic_onnx", "qdq_op_counts"]

# relative L2 error vs the int8-weight float model (~0.99 cosine): per-tensor activation rounding
DEFAULT_TOLERANCE = 0.15


def export_dynamic_onnx(model: nn.Module, inputs: Inputs, path: str | os.PathLike, *, opset: int | None = None,
                        tolerance: float = DEFAULT_TOLERANCE, verify: bool = True,
                        quantize_embeddings: bool = True) -> Path:
    """Export a model holding `Int8DynamicLinear` layers as int8-weight ONNX with dynamic activations.

    verify: onnxruntime must reproduce the float model with the same int8 weights (`merge()` of each
            layer) within `tolerance` (relative L2 error of the first output) at `inputs`, or nothing
            is written and `UnsupportedOpError` says by how much it differed.
    quantize_embeddings: store the float tables read by a Gather (token / position embeddings) as int8
            rows with a scale per row (`quantize_gather_tables`), as onnxruntime's quantize_dynamic does.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int8DynamicLinear)}
    if not layers:
        raise UnsupportedOpError(f"{type(model).__name__}: no Int8DynamicLinear layer; convert the model first "
                                 "(kind: int8_dynamic) or export it with export_onnx")
    deploy = copy.deepcopy(model)
    for name, m in layers.items():  # a float model computing with the dequantized int8 weights
        deploy = set_module(deploy, name, m.merge())
    plans = {n: {"merged": m.dequantized_weight().detach().cpu().numpy(),
                 "codes": m.weight_q.cpu().numpy(), "w_scale": m.weight_scale.detach().cpu().numpy()}
             for n, m in layers.items()}
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        float_path = export_onnx(deploy, inputs, tmpdir / "float.onnx", opset=opset)
        proto = onnx.load(str(float_path))
        _insert_dynamic(proto, plans)
        if quantize_embeddings:
            quantize_gather_tables(proto)
        target = tmpdir / path.name
        onnx.save(proto, str(target))
        if verify:
            verify_onnx(deploy, inputs, target, tolerance, label="int8 ONNX", reference="the int8-weight model",
                        hint="activations with outliers need static quantization (export_qdq_onnx) or a larger tolerance")
        os.replace(target, path)
        return path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _gemm_ok(node: Any) -> bool:
    """A Gemm that is a plain Linear: y = x W^T + b (transB=1, no transA, alpha = beta = 1)."""
    attrs = {a.name: a for a in node.attribute}
    return (attrs.get("transB") is not None and attrs["transB"].i == 1
            and ("transA" not in attrs or attrs["transA"].i == 0) and all(k not in attrs or attrs[k].f == 1.0 for k in ("alpha", "beta")))


def _insert_dynamic(proto: Any, plans: dict[str, dict[str, Any]]) -> None:
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    nodes, added, done = [], [], set()

    def const(name: str, arr: np.ndarray) -> str:
        added.append(numpy_helper.from_array(arr, name))
        return name

    for node in list(g.node):
        found = None
        if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2 and node.input[1] in inits:
            found = _find_layer(numpy_helper.to_array(inits[node.input[1]]), plans)
        if found is None or found[0] in done or (node.op_type == "Gemm" and not (found[1] is False and _gemm_ok(node))):
            nodes.append(node)
            continue
        name, _ = found
        done.add(name)
        p, tag = plans[name], name.replace(".", "_") or "layer"
        codes, zero = uint8_codes(np.ascontiguousarray(p["codes"].T), np.zeros(p["codes"].shape[0], np.int32),
                                  signed=True)                                                 # U8U8: exact
        wq = const(f"{tag}.weight_q", codes)                                                   # (I, O) uint8
        wz = const(f"{tag}.weight_zero", zero)                                                 # (O,) 128s
        ws = const(f"{tag}.weight_scale", p["w_scale"].astype(np.float32))                   # (O,)
        x = node.input[0]
        nodes += [
            helper.make_node("DynamicQuantizeLinear", [x], [f"{tag}.x_q", f"{tag}.x_scale", f"{tag}.x_zero"],
                             name=f"{tag}.x_q"),
            helper.make_node("MatMulInteger", [f"{tag}.x_q", wq, f"{tag}.x_zero", wz], [f"{tag}.acc"],
                             name=f"{tag}.matmul_int"),
            helper.make_node("Cast", [f"{tag}.acc"], [f"{tag}.acc_f"], to=TensorProto.FLOAT, name=f"{tag}.cast"),
            helper.make_node("Mul", [f"{tag}.x_scale", ws], [f"{tag}.scale"], name=f"{tag}.scale"),
        ]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        out = node.output[0]
        nodes.append(helper.make_node("Mul", [f"{tag}.acc_f", f"{tag}.scale"], [f"{tag}.y" if has_bias else out],
                                      name=f"{tag}.rescale"))
        if has_bias:
            nodes.append(helper.make_node("Add", [f"{tag}.y", node.input[2]], [out], name=f"{tag}.bias"))
    replace_graph(g, plans, done, nodes, added, "MatMul/Gemm")

