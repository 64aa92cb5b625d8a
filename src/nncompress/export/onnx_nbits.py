"""ONNX with 4-bit (or 8-bit) weights that ONNX Runtime runs: `MatMulNBits` (com.microsoft).

    export_nbits_onnx(model, inputs, "model.w4.onnx")

The model's weight-only integer Linears (signed symmetric, per group of a power-of-two size >= 16
along the fan-in, as GPTQ / RTN / AWQ leave them) keep their integer codes in the file: each is one
`MatMulNBits` node whose B holds the codes offset to unsigned and packed low-first (two 4-bit codes
per byte), with one float scale per group and the default zero point 2^(bits-1), so it computes
(code + 2^(bits-1) - 2^(bits-1)) * scale = the dequantized weight the nncompress model uses.

How: the model, merged to float layers, is exported as usual (`export_onnx`); every MatMul whose
constant weight is exactly a quantized Linear's transposed dequantized weight is replaced by the
`MatMulNBits` of that Linear's codes and scales. Then ONNX Runtime runs the file and its outputs
must match the nncompress model's (relative L2 error <= 1e-3); otherwise, or when a quantized
Linear is not found or not expressible, an `UnsupportedOpError` names it and nothing is written.
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import UnsupportedOpError
from ..core.merge import merge
from ..eval.latency import ort_feed, ort_session
from ..core.feeding import first_tensor
from ..eval.measure import call_model
from ..formats import IntFormat, PerGroup
from ..quant.fake_quant import QuantWrapper
from .atomic import atomic_path
from .onnx import export_onnx

__all__ = ["export_nbits_onnx", "pack_codes"]

BITS = (4, 8)  # the widths ONNX Runtime's CPU MatMulNBits kernels take here
REL_TOL = 1e-3


def pack_codes(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Signed codes (N, K) -> MatMulNBits' B: uint8 (N, K / block, block * bits / 8), each code
    offset by 2^(bits-1) and packed low-first along K.

    >>> pack_codes(np.array([[-8, 7, 0, 1] * 4]), bits=4, block=16)[0, 0, :2].tolist()  # 0|15<<4, 8|9<<4
    [240, 152]
    """
    n, k = codes.shape
    u = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).reshape(n, k // block, block)
    per = 8 // bits
    u = u.reshape(n, k // block, block // per, per)
    out = np.zeros(u.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= (u[..., i] << (bits * i)).astype(np.uint8)
    return out


def export_nbits_onnx(model: nn.Module, inputs: Any, path: str | os.PathLike) -> Path:
    """Export `model` with its integer weight-only Linears as `MatMulNBits` (see the module docstring)."""
    import onnx
    from onnx import helper, numpy_helper

    layers = _nbits_layers(model)
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=".nncompress-nbits-") as tmp:
        plain = export_onnx(merge(copy.deepcopy(model).eval()), inputs, Path(tmp) / "float.onnx")
        graph_model = onnx.load(str(plain))
    graph = graph_model.graph
    by_value = {}
    for init in graph.initializer:
        if len(init.dims) == 2 and init.data_type == onnx.TensorProto.FLOAT:
            by_value.setdefault((tuple(init.dims), numpy_helper.to_array(init).tobytes()), init.name)
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    replaced, dropped = set(), set()
    nodes = list(graph.node)
    for lname, (weight_t, codes, scales, bits, block) in layers.items():
        key = (weight_t.shape, weight_t.tobytes())
        init = by_value.get(key)
        matmuls = [i for i, nd in enumerate(nodes) if nd.op_type == "MatMul" and init is not None
                   and len(nd.input) == 2 and nd.input[1] == init]
        if not matmuls:
            raise UnsupportedOpError(f"{lname}: its weight is not a MatMul constant in the exported graph, so it "
                                     f"cannot become MatMulNBits; export fp32 or W8A8 QDQ ONNX instead")
        n, k = codes.shape
        b_name, s_name = f"{lname}.nbits_B", f"{lname}.nbits_scales"
        graph.initializer.extend([numpy_helper.from_array(pack_codes(codes, bits, block), b_name),
                                  numpy_helper.from_array(scales.astype(np.float32), s_name)])
        for i in matmuls:
            old = nodes[i]
            nodes[i] = helper.make_node("MatMulNBits", [old.input[0], b_name, s_name], list(old.output),
                                        name=f"{lname}.MatMulNBits", domain="com.microsoft",
                                        K=k, N=n, bits=bits, block_size=block)
        replaced.add(lname)
        if users.get(init, 0) == len(matmuls):
            dropped.add(init)
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(op.domain == "com.microsoft" for op in graph_model.opset_import):
        graph_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as target:
        onnx.save(graph_model, str(target))
        _verify(model, inputs, target)
    return path


def _nbits_layers(model: nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int, int]]:
    """{name: (W^T dequantized float32 (K, N), codes int (N, K), scales (N, K / block), bits, block)}."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantWrapper) or m.weight_quant is None:
            continue
        spec, fq = m.weight_quant.spec, m.weight_quant
        g, fmt = spec.granularity, spec.format
        k = m.base.weight.shape[1] if isinstance(m.base, nn.Linear) else 0
        block = g.size if isinstance(g, PerGroup) else 0
        why = ("activations are quantized too (MatMulNBits is weight-only)" if m.input_quant is not None else
               "not a Linear" if not isinstance(m.base, nn.Linear) else
               f"{fmt} is not a signed symmetric integer grid of {' or '.join(map(str, BITS))} bits"
               if not (isinstance(fmt, IntFormat) and fmt.signed and fmt.symmetric and fmt.bits in BITS) else
               "not per group along the fan-in" if not (isinstance(g, PerGroup) and g.axis in (1, -1)) else
               f"group size {block} is not a power of two >= 16 dividing the fan-in {k}"
               if block < 16 or block & (block - 1) or k % block else
               "no scale (calibrate first)" if fq.scale is None else None)
        if why:
            raise UnsupportedOpError(f"{name}: {why}; export fp32 or W8A8 QDQ ONNX instead")
        with torch.no_grad():
            w = m.quantized_weight().detach().float()                      # (N, K), dequantized
            scales = fq.scale.detach().float().reshape(w.shape[0], k // block)
            codes = torch.round(w / scales.repeat_interleave(block, dim=1)).to(torch.int16)
        out[name] = (w.T.contiguous().numpy(), codes.numpy(), scales.numpy(), fmt.bits, block)
    if not out:
        raise UnsupportedOpError(f"{type(model).__name__}: no weight-only integer Linear to store as MatMulNBits; "
                                 "quantize the weights first (gptq, quantize with a weight spec)")
    return out


def _verify(model: nn.Module, inputs: Any, target: Path) -> None:
    session = ort_session(target)
    got = session.run(None, ort_feed(session, inputs))[0].astype(np.float64)
    with torch.no_grad():
        ref = first_tensor(call_model(model.eval(), inputs)).double().numpy()
    err = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)) if got.shape == ref.shape else np.inf
    if not err <= REL_TOL:
        raise UnsupportedOpError(f"{type(model).__name__}: the MatMulNBits export differs from the model in ONNX "
                                 f"Runtime (relative error {err:.2e} > {REL_TOL:.0e}); export fp32 ONNX instead")
