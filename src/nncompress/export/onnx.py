"""ONNX export with a dynamic batch axis, checked against torch in onnxruntime before it is kept.

`export_onnx` tries torch's `torch.export`-based exporter (`dynamo=True`, the default since torch 2.9)
and falls back to the TorchScript exporter, with a warning that says why. Whichever one is used, the
file only replaces `path` once onnxruntime reproduces the torch outputs, at the example batch and at
twice that batch (the dynamic axis); a failed export leaves neither a file nor temporaries behind.

>>> import os, tempfile, torch, torch.nn as nn
>>> model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.randn(1, 4)
>>> with tempfile.TemporaryDirectory() as d:
...     path = export_onnx(model, x, os.path.join(d, "m.onnx"))
...     out = onnx_run(path, torch.ones(5, 4))
>>> out.shape
(5, 8)
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import ConfigError, UnsupportedOpError
from ..core.logs import quiet_loggers
from ..eval.latency import ort_feed, ort_session
from ..eval.measure import Inputs, batch_size, call_model, evaluating

Exporter = Literal["auto", "dynamo", "torchscript"]
_REL_TOL = 1e-3  # relative L2 error; loose enough for fake-quant rounding flips, tight enough for a wrong graph
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a single ONNX file at 2 GB
_NOISY_LOGGERS = ("onnxscript", "torch.onnx")  # "torchvision is not installed", constant-folding notices


def onnx_run(path: str | os.PathLike, inputs: Inputs, *, threads: int | None = None) -> np.ndarray:
    """The first output of the ONNX file at `path` on `inputs`, from an onnxruntime CPU session.

    A tensor feeds the graph's single input; a dict feeds inputs by name.
    """
    session = ort_session(path, threads)
    return session.run(None, ort_feed(session, inputs))[0]


def export_onnx(model: nn.Module, inputs: Inputs, path: str | os.PathLike, *, dynamic_batch: bool = True,
                exporter: Exporter = "auto", verify: bool = True, opset: int | None = None) -> Path:
    """Export `model` (in eval mode) to ONNX at `path`, written atomically; returns the path.

    inputs:        example inputs, a tensor (`model(x)`) or a dict of tensors (`model(**inputs)`)
    dynamic_batch: dim 0 of every input whose dim 0 is the batch becomes the symbolic axis "batch"
    exporter:      "auto" (torch.export-based, then TorchScript), "dynamo" or "torchscript"
    verify:        run the file in onnxruntime and compare with torch (relative L2 error <= 1e-3)

    Raises `UnsupportedOpError` naming the model class and the root cause when no exporter succeeds.
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ConfigError("exporter", f"must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = type(model).__name__
    attempts = {"auto": ("dynamo", "torchscript"), "dynamo": ("dynamo",), "torchscript": ("torchscript",)}[exporter]
    errors: list[tuple[str, BaseException]] = []
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with evaluating(model), torch.no_grad():
            checks = _reference_outputs(model, inputs, dynamic_batch)
            outputs = ["output"] if len(checks[0][1]) == 1 else [f"output_{i}" for i in range(len(checks[0][1]))]
            for how in attempts:
                target = tmpdir / path.name
                try:
                    with _quiet():
                        _EXPORTERS[how](model, inputs, target, dynamic_batch, opset, outputs)
                    if verify:
                        _verify(target, checks)
                except Exception as e:  # any exporter failure: try the next, report the first
                    errors.append((how, e))
                    _empty(tmpdir)
                    continue
                if errors:
                    warnings.warn(f"{name}: the torch.export-based ONNX exporter failed ({_root_line(errors[0][1])}); "
                                  f"exported with the TorchScript exporter instead", stacklevel=2)
                _move_into(tmpdir, path)
                return path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    how, first = errors[0]
    hint = "replace or exclude the layer with that op" + (
        ", or export with dynamic_batch=False if the model fixes its batch size" if dynamic_batch else "")
    raise UnsupportedOpError(f"{name}: ONNX export failed ({how}): {_root_line(first)}; {hint}") from first


def _export_dynamo(model: nn.Module, inputs: Inputs, target: Path, dynamic_batch: bool, opset: int | None,
                   outputs: list[str]) -> None:
    if dynamic_batch and batch_size(inputs) == 1:
        # torch.export specialises a dimension of size 1 to the constant 1 wherever the graph broadcasts
        # it (a causal LM's attention mask does): trace at batch 2, the same rows twice
        inputs = _doubled(inputs)
    shapes = _dynamic_shapes(inputs) if dynamic_batch else None
    args, kwargs = ((inputs,), None) if isinstance(inputs, torch.Tensor) else ((), dict(inputs))
    program = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, verbose=False, dynamic_shapes=shapes,
                                opset_version=opset, output_names=outputs)
    program.save(str(target), external_data=_param_bytes(model) > _EXTERNAL_DATA_BYTES)


def _export_torchscript(model: nn.Module, inputs: Inputs, target: Path, dynamic_batch: bool,
                        opset: int | None, outputs: list[str]) -> None:
    if isinstance(inputs, torch.Tensor):
        args, kwargs, names = (inputs,), None, ["input"]
    else:  # the TorchScript exporter orders graph inputs by the signature, whatever the dict order
        kwargs = _by_signature(model, inputs)
        args, names = (), list(kwargs)
    axes = None
    if dynamic_batch:
        b = batch_size(inputs)
        feeds = {"input": inputs} if isinstance(inputs, torch.Tensor) else kwargs
        axes = {n: {0: "batch"} for n, t in feeds.items() if _batched(t, b)}
        axes.update({n: {0: "batch"} for n in outputs})
    torch.onnx.export(model, args, str(target), kwargs=kwargs, dynamo=False, input_names=names,
                      output_names=outputs, dynamic_axes=axes, opset_version=opset)


_EXPORTERS: dict[str, Callable[..., None]] = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _dynamic_shapes(inputs: Inputs) -> Any:
    batch = torch.export.Dim("batch")  # one symbol shared by every batched input
    b = batch_size(inputs)
    if isinstance(inputs, torch.Tensor):
        return ({0: batch},)
    return {k: ({0: batch} if _batched(v, b) else None) for k, v in inputs.items()}


def _batched(t: Any, b: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b


def _by_signature(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    order = list(inspect.signature(model.forward).parameters)
    known = [k for k in order if k in inputs]
    return {k: inputs[k] for k in known + [k for k in inputs if k not in known]}


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _doubled(inputs: Inputs) -> Inputs:
    """`inputs` at twice their batch (each batched tensor concatenated with itself)."""
    b = batch_size(inputs)
    double = (lambda t: torch.cat([t, t]) if _batched(t, b) else t)
    return double(inputs) if isinstance(inputs, torch.Tensor) else {k: double(v) for k, v in inputs.items()}


def _reference_outputs(model: nn.Module, inputs: Inputs, dynamic_batch: bool) -> list[tuple[Inputs, list[np.ndarray]]]:
    """(inputs, torch outputs) at the example batch and, for a dynamic axis, at twice that batch."""
    cases = [inputs, _doubled(inputs)] if dynamic_batch else [inputs]
    return [(x, [t.detach().cpu().numpy() for t in torch.utils._pytree.tree_leaves(call_model(model, x))
                 if isinstance(t, torch.Tensor)]) for x in cases]


def _verify(target: Path, checks: list[tuple[Inputs, list[np.ndarray]]]) -> None:
    session = ort_session(target)
    for x, expected in checks:
        got = session.run(None, ort_feed(session, x))
        pairs = list(zip(got, expected)) if len(got) == len(expected) else [(got[0], expected[0])]
        for i, (o, r) in enumerate(pairs):
            b = batch_size(x)
            if o.shape != r.shape:
                raise UnsupportedOpError(f"ONNX output {i} has shape {o.shape} at batch {b}, torch gives {r.shape}")
            o64, r64 = o.astype(np.float64), r.astype(np.float64)
            err = float(np.linalg.norm(o64 - r64) / max(np.linalg.norm(r64), 1e-12))
            if not err <= _REL_TOL:
                raise UnsupportedOpError(f"ONNX output {i} differs from torch at batch {b} "
                                         f"(relative error {err:.2e} > {_REL_TOL:g})")


def _root_line(e: BaseException) -> str:
    """`Type: first line` of the innermost cause (torch.onnx wraps the useful message in two layers)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    line = lines[0] if lines else "(no message)"
    line = line if len(line) <= 240 else line[:237] + "..."
    return f"{type(e).__name__}: {line}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress chatter and deprecation notices; restore logging and warnings."""
    # torch 2.13's TorchScript exporter switches the global JIT ONNX log on and never back off
    jit_log = torch._C._jit_is_onnx_log_enabled()
    try:
        with quiet_loggers(*_NOISY_LOGGERS):
            yield
    finally:
        torch._C._jit_set_onnx_log_enabled(jit_log)


def _empty(folder: Path) -> None:
    for f in folder.iterdir():
        shutil.rmtree(f) if f.is_dir() else f.unlink()


def _move_into(tmpdir: Path, path: Path) -> None:
    """Move the export into place: companion files (external data) first, the .onnx file last."""
    main = tmpdir / path.name
    for f in tmpdir.iterdir():
        if f != main:
            os.replace(f, path.parent / f.name)
    os.replace(main, path)
