"""Measure a model it is given: counts, MACs, bytes on disk, latency, quality, and the per-stage report.

Knows nothing of techniques; imports only `nncompress.core`.

>>> import torch, torch.nn as nn
>>> count_macs(nn.Linear(64, 32), torch.randn(1, 64))
2048
"""
from .latency import Latency, measure_latency, measure_onnx_latency, num_threads
from .latency_table import LatencyTable, build_table
from .measure import (batch_size, call_model, count_macs, count_nonzero_params, count_params, evaluating,
                      file_bytes, move_inputs)
from .metrics import accuracy, embed, embedding_fidelity
from .report import Report, StageMetrics, human_bytes, pareto_png, run_info

__all__ = [
    "Latency", "LatencyTable", "build_table", "measure_latency", "measure_onnx_latency", "num_threads", "batch_size", "call_model",
    "count_macs", "count_nonzero_params", "count_params", "evaluating", "file_bytes", "move_inputs",
    "accuracy", "embed", "embedding_fidelity", "Report", "StageMetrics", "human_bytes", "pareto_png", "run_info",
]
