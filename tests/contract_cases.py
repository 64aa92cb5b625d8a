"""The tiny models, data and one representative config per registered transform that the contract
suite (tests/test_contract.py) and the composition matrix (benchmarks/composition.py) run."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn

from nncompress.cluster import ClusterConfig
from nncompress.core import Config, MergeConfig
from nncompress.distill import FinetuneConfig, ProgressiveConfig
from nncompress.formats import IntFormat
from nncompress.lowrank import LowRankConfig
from nncompress.prune import NM, DropLayersConfig, GroupConvConfig, LotteryConfig, PruneConfig, SparsityConfig
from nncompress.quant import AWQConfig, Choice, GPTQConfig, MixedPrecisionConfig, QATConfig, QuantizeConfig, QuantSpec, SmoothQuantConfig
from nncompress.quant.native import Int8DynamicConfig
from nncompress.zoo.hf import hf_from_config
from nncompress.zoo.models import mlp, mnist1d_cnn

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 32}


@dataclasses.dataclass
class Data:
    """A one-batch data bundle (train = calib = test), the interface stages read from `ctx.data`."""

    x: Any
    y: torch.Tensor | None
    task: str
    num_classes: int | None = None

    def __post_init__(self):
        batch = self.x if self.y is None else (self.x, self.y)
        self.train = self.calib = self.test = [batch]

    def example_batch(self, n: int):
        return {k: v[:n] for k, v in self.x.items()} if isinstance(self.x, dict) else self.x[:n]


def _mlp() -> tuple[nn.Module, dict[str, Any], Data]:
    g = torch.Generator().manual_seed(0)
    data = Data(torch.randn(16, 24, generator=g), torch.randint(0, 4, (16,), generator=g), "classification", 4)
    return mlp(in_features=24, hidden=(32, 16), num_classes=4), {"name": "mlp", "kwargs": {
        "in_features": 24, "hidden": [32, 16], "num_classes": 4}}, data


def _cnn() -> tuple[nn.Module, dict[str, Any], Data]:
    g = torch.Generator().manual_seed(0)
    data = Data(torch.randn(16, 40, generator=g), torch.randint(0, 10, (16,), generator=g), "classification", 10)
    kwargs = {"widths": [8, 16, 16]}
    return mnist1d_cnn(widths=(8, 16, 16)), {"name": "mnist1d_cnn", "kwargs": kwargs}, data


def _bert() -> tuple[nn.Module, dict[str, Any], Data]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = {"input_ids": torch.randint(0, 100, (8, 6), generator=g),
         "attention_mask": torch.tensor([[1] * 6] * 6 + [[1] * 4 + [0] * 2] * 2)}
    return hf_from_config(TINY_BERT), {"name": "hf_config", "kwargs": {"config": TINY_BERT}}, Data(x, None, "embedding")


MODELS: dict[str, Callable[[], tuple[nn.Module, dict[str, Any], Data]]] = {"mlp": _mlp, "cnn": _cnn, "bert": _bert}

STAGES = {"mlp": ("net.0", "net.2"), "cnn": ("stem", "layers.0"), "bert": ("model.encoder.layer.0",)}

W8A8 = QuantizeConfig(activation=QuantSpec(format=IntFormat(bits=8, signed=False, symmetric=False)), calib_batches=1)
W4 = QuantizeConfig(weight=QuantSpec(format=IntFormat(bits=4)))
MIXED_CANDIDATES = (Choice(weight=W4.weight), Choice(weight=W8A8.weight), Choice())
# a third of each model's float bit operations (exact: no trial saves). A bytes budget is no contract
# case: on these tiny models a manifest entry per quantized layer outweighs the layer, and after a
# stage that already shrank the file a ratio of the new size may be out of reach (tests/test_mixed_precision.py)
MIXED_BUDGET = {"mlp": {"max_bops": 458752}, "cnn": {"max_bops": 20698453}, "bert": {"max_bops": 33903957}}


def transforms(model: str) -> dict[str, Config]:
    """One representative config per registered transform (the quantize and sparsify of the issue's
    list twice: W8A8 / W4, 50% / 2:4), cheap enough to run thousands of times."""
    return {
        "quantize_w8a8": W8A8,
        "quantize_w4": W4,
        "gptq": GPTQConfig(calib_batches=1),
        "qat": QATConfig(weight=QuantSpec(format=IntFormat(bits=4)), epochs=1, max_steps=1),
        "int8_dynamic": Int8DynamicConfig(),
        "mixed_precision": MixedPrecisionConfig(candidates=MIXED_CANDIDATES, calib_batches=1, **MIXED_BUDGET[model]),
        "smoothquant": SmoothQuantConfig(calib_batches=1),
        "awq": AWQConfig(weight=W4.weight, calib_batches=1, grid=4),
        "lowrank": LowRankConfig(rank=4),
        "cluster": ClusterConfig(bits=3, iters=10),
        "sparsify_50": SparsityConfig(ratio=0.5),
        "sparsify_24": SparsityConfig(granularity=NM(2, 4)),
        "prune": PruneConfig(ratio=0.25),
        "drop_layers": DropLayersConfig(count=1, calib_batches=1),
        "group_conv": GroupConvConfig(groups=2, restarts=0, iterations=2),
        "finetune": FinetuneConfig(epochs=1, max_steps=1),
        "lottery": LotteryConfig(ratio=0.5, rounds=1, epochs=1),
        "progressive_distill": ProgressiveConfig(stages=STAGES[model], epochs=1, max_steps=1, head_epochs=0),
        "merge": MergeConfig(),
    }


_NO_NORM = "the model has no LayerNorm"
_QUANTIZED = ("quantize_w8a8", "quantize_w4", "gptq", "qat")


def refusal(model: str, first: str | None, second: str) -> str | None:
    """The typed error (a regex of its message) expected when `second` is applied after `first` (or
    alone, `first=None`) on `model`; None when the two compose. Every refusal has its reason here."""
    if first is not None and second in ("smoothquant", "awq"):  # they move scales into *float* Linears
        # (mixed_precision on the CNN keeps its one Linear float: smoothquant then looks for norms)
        mixed = first == "mixed_precision" and model != "cnn"
        wrapped = "is already quantized" if first in _QUANTIZED or mixed else {
            "int8_dynamic": "is already int8", "cluster": "is already clustered",
            "smoothquant": "is already smoothed", "awq": "is already smoothed"}.get(first)
        if wrapped and not _not_applicable(model, first):
            return wrapped  # said before looking for norms: run it first, or after a merge
    for stage in (first, second):
        why = _not_applicable(model, stage)
        if why:
            return why
    if first is None:
        return None
    if second == "int8_dynamic" and first in _QUANTIZED:  # it keeps 8-bit symmetric weight-only codes only
        return "converts weight-only QuantLinear" if first == "quantize_w8a8" else "keeps QuantLinear codes only for 8-bit"
    if model == "bert" and first == "mixed_precision" and second == "int8_dynamic":  # its plan has 4-bit layers
        return "keeps QuantLinear codes only for 8-bit"
    if second == "drop_layers" and first == "drop_layers":  # a stack of one layer, or no same-shape block left
        return "no removable residual block"
    if model == "bert" and first == "lowrank" == second:
        return "factors of low-rank layers are not factorized again"
    if model == "cnn" and first == "group_conv":
        if second == "prune":  # every channel group of the tiny CNN meets a grouped conv
            return "no prunable channel group"
        if second == "group_conv":
            return "no targeted conv can be split"
    if model == "mlp" and first == "int8_dynamic" and second in ("finetune", "progressive_distill"):
        return "nothing to train"  # every layer is int8: no float weight left
    if model == "cnn" and first == "drop_layers" and second == "progressive_distill":
        return "nothing to train"  # its first stage is the dropped block
    return None


def _not_applicable(model: str, stage: str | None) -> str | None:
    if stage == "smoothquant" and model in ("mlp", "cnn"):
        return _NO_NORM
    if stage == "group_conv" and model in ("mlp", "bert"):
        return "no Conv1d/2d/3d layer among the targets"
    if stage == "drop_layers" and model == "mlp":
        return "no removable residual block"
    return None
