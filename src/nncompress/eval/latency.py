"""Wall-clock latency: the median of repeated runs after warm-up, in torch or in onnxruntime.

Every figure is a measurement; the thread count, batch, device and runtime it was taken with travel
with it, so a speedup is only ever computed between like and like.

Torch on CPU is timed with the allocator in its steady state (`steady_allocator`): glibc's malloc
otherwise hands every activation above its (growing) mmap threshold fresh pages from the kernel, so
a young process pays page faults on each call that a long-running server does not (measured here:
the MNIST-1D CNN at batch 256, 21.5 ms per batch in a fresh process, 10.9 ms in steady state).

>>> import torch, torch.nn as nn
>>> lat = measure_latency(nn.Linear(8, 8), torch.randn(4, 8), warmup=1, repeats=5, threads=1)
>>> (lat.batch, lat.threads, lat.runtime, lat.p10_ms <= lat.median_ms <= lat.p90_ms)
(4, 1, 'torch', True)
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import ConfigError, DataError
from .measure import Inputs, batch_size, call_model, evaluating, move_inputs


@dataclasses.dataclass(frozen=True)
class Latency:
    """One latency measurement: milliseconds per forward of a whole batch.

    median_ms, p10_ms, p90_ms: over `repeats` timed runs after warm-up
    threads: intra-op threads used; batch: dim 0 of the inputs
    device: "cpu" or "cuda"; runtime: "torch" or "onnxruntime"
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    threads: int
    batch: int
    device: str
    runtime: str = "torch"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Latency":
        return cls(**data)

    def comparable(self, other: "Latency") -> bool:
        """True when a ratio of the two medians is a fair speedup: same runtime, batch, threads, device."""
        return (self.runtime, self.batch, self.threads, self.device) == (
            other.runtime, other.batch, other.threads, other.device)


_STEADY: list[bool] = []


def steady_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds (32 MiB, 256 MiB) once per process, as they end up in a
    process that has run for a while, so latency is not a measure of page faults. True when set;
    False where the C library is not glibc or `NNCOMPRESS_STEADY_MALLOC=0` asks to leave it alone."""
    if not _STEADY:
        ok = False
        if os.environ.get("NNCOMPRESS_STEADY_MALLOC", "1") != "0":
            try:
                import ctypes
                libc = ctypes.CDLL("libc.so.6")
                ok = bool(libc.mallopt(-3, 32 << 20)) and bool(libc.mallopt(-1, 256 << 20))  # M_MMAP/M_TRIM_THRESHOLD
            except (OSError, AttributeError):
                ok = False
        _STEADY.append(ok)
    return _STEADY[0]


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Run the block with `torch.set_num_threads(threads)`; the previous count is restored after.

    >>> before = torch.get_num_threads()
    >>> with num_threads(1) as n:
    ...     n, torch.get_num_threads()
    (1, 1)
    >>> torch.get_num_threads() == before
    True
    """
    steady_allocator()  # every measurement passes here
    before = torch.get_num_threads()
    if threads is None:
        yield before
        return
    if threads < 1:
        raise ConfigError("threads", f"must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def _check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{device!r} was asked for but no CUDA device is available; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError("device", f"latency is measured on 'cpu' or 'cuda', got {device!r}")
    return dev


def _summary(samples_ms: list[float]) -> tuple[float, float, float]:
    p10, p90 = np.percentile(samples_ms, [10, 90])
    return float(statistics.median(samples_ms)), float(p10), float(p90)


def _time_runs(run: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None]) -> list[float]:
    if repeats < 1 or warmup < 0:
        raise ConfigError("repeats", f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        run()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        run()
        sync()  # CUDA launches are asynchronous: time to completion, not to launch
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return samples


def measure_latency(model: nn.Module, inputs: Inputs, *, warmup: int = 5, repeats: int = 30,
                    threads: int | None = None, device: str = "cpu") -> Latency:
    """Median latency (ms per batch) of `model` on `inputs` in torch, eval mode, `inference_mode`.

    threads: intra-op threads for the measurement only (None: the current count, recorded)
    device:  "cpu" or "cuda"; the model is moved there for the measurement and moved back after

    >>> lat = measure_latency(nn.Linear(4, 2), torch.randn(1, 4), warmup=1, repeats=3)
    >>> lat.median_ms > 0
    True
    """
    dev = _check_device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batch = batch_size(inputs)
    x = move_inputs(inputs, dev)
    with num_threads(threads) as used, evaluating(model, dev), torch.inference_mode():
        samples = _time_runs(lambda: call_model(model, x), warmup, repeats, sync)
    median, p10, p90 = _summary(samples)
    return Latency(median, p10, p90, repeats, used, batch, dev.type)


def _time_interleaved(runs: list[Callable[[], Any]], warmup: int, repeats: int,
                      sync: Callable[[], None]) -> list[list[float]]:
    """Time several candidates in alternating rounds, so drift (other load, clocks) hits all alike."""
    if repeats < 1 or warmup < 0:
        raise ConfigError("repeats", f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for run in runs:
        for _ in range(warmup):
            run()
    sync()
    samples: list[list[float]] = [[] for _ in runs]
    for r in range(repeats):
        for j in range(len(runs)):
            i = (j + r) % len(runs)  # rotate the order: no candidate always runs first
            start = time.perf_counter_ns()
            runs[i]()
            sync()
            samples[i].append((time.perf_counter_ns() - start) / 1e6)
    return samples


def compare_latency(models: list[nn.Module], inputs: Inputs, *, warmup: int = 5, repeats: int = 30,
                    threads: int | None = None, device: str = "cpu") -> list[Latency]:
    """Latency of several models on the same inputs, measured in interleaved rounds.

    A speedup between two of them is then a ratio taken under the same conditions, not across
    minutes in which the machine's load may have changed.

    >>> a, b = nn.Linear(64, 64), nn.Linear(64, 8)
    >>> la, lb = compare_latency([a, b], torch.randn(2, 64), warmup=1, repeats=5, threads=1)
    >>> la.comparable(lb)
    True
    """
    dev = _check_device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batch = batch_size(inputs)
    x = move_inputs(inputs, dev)
    with contextlib.ExitStack() as stack:
        used = stack.enter_context(num_threads(threads))
        for m in models:
            stack.enter_context(evaluating(m, dev))
        stack.enter_context(torch.inference_mode())
        samples = _time_interleaved([lambda m=m: call_model(m, x) for m in models], warmup, repeats, sync)
    return [Latency(*_summary(s), repeats, used, batch, dev.type) for s in samples]


def compare_onnx_latency(onnx_paths: list[str | os.PathLike], inputs: Inputs, *, warmup: int = 5,
                         repeats: int = 30, threads: int | None = None) -> list[Latency]:
    """`compare_latency` for ONNX files, each in its own onnxruntime CPU session."""
    used = threads if threads is not None else torch.get_num_threads()
    sessions = [ort_session(p, used) for p in onnx_paths]
    feeds = [ort_feed(s, inputs) for s in sessions]
    runs = [lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)]
    samples = _time_interleaved(runs, warmup, repeats, lambda: None)
    return [Latency(*_summary(x), repeats, used, batch_size(inputs), "cpu", runtime="onnxruntime")
            for x in samples]


def ort_feed(session: Any, inputs: Inputs) -> dict[str, np.ndarray]:
    """The onnxruntime feed for `inputs`: a tensor goes to the first graph input, a dict by name."""
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, torch.Tensor):
        if len(names) != 1:
            raise DataError(f"the ONNX graph takes {len(names)} inputs ({', '.join(names)}); give a dict keyed by those names")
        return {names[0]: inputs.detach().cpu().numpy()}
    if not isinstance(inputs, Mapping):
        raise DataError(f"inputs must be a tensor or a dict of tensors, got {type(inputs).__name__}")
    missing = [n for n in names if n not in inputs]
    if missing:
        raise DataError(f"the ONNX graph needs input {missing[0]!r}; the inputs have {', '.join(inputs) or 'no keys'}")
    return {n: inputs[n].detach().cpu().numpy() for n in names}


def ort_session(onnx_path: str | os.PathLike, threads: int | None = None) -> Any:
    """A CPU onnxruntime session with `threads` intra-op threads (None: torch's current count), inter-op 1."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: shape-inference notices are not results
    if not os.path.isfile(onnx_path):
        raise DataError(f"{onnx_path}: no such ONNX file; export the model first (nncompress.export.onnx.export_onnx)")
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


def measure_onnx_latency(onnx_path: str | os.PathLike, inputs: Inputs, *, warmup: int = 5, repeats: int = 30,
                         threads: int | None = None) -> Latency:
    """Median latency (ms per batch) of an ONNX file in a real onnxruntime CPU session.

    threads: intra-op threads of the session (None: torch's current count, so both runtimes match)

    >>> import tempfile, os
    >>> from nncompress.export.onnx import export_onnx
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = export_onnx(nn.Linear(4, 2), torch.randn(1, 4), os.path.join(d, "m.onnx"))
    ...     lat = measure_onnx_latency(path, torch.randn(3, 4), warmup=1, repeats=3, threads=1)
    >>> (lat.runtime, lat.batch, lat.threads)
    ('onnxruntime', 3, 1)
    """
    used = threads if threads is not None else torch.get_num_threads()
    if used < 1:
        raise ConfigError("threads", f"must be >= 1, got {used}")
    session = ort_session(onnx_path, used)
    feed = ort_feed(session, inputs)
    samples = _time_runs(lambda: session.run(None, feed), warmup, repeats, lambda: None)
    median, p10, p90 = _summary(samples)
    return Latency(median, p10, p90, repeats, used, batch_size(inputs), "cpu", runtime="onnxruntime")
