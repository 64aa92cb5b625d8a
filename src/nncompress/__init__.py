"""nncompress: compress PyTorch models with measured results.

    import nncompress
    from nncompress.distill import FinetuneConfig
    model = nncompress.apply(model, FinetuneConfig(epochs=1), context=nncompress.Context(data=data))
    nncompress.save(model, "out/")          # safetensors + manifest, no pickle
    same = nncompress.load("out/")          # rebuilt architecture, identical outputs
"""
from .core import (CompositionError, Config, ConfigError, Context, NNCompressError, Targets, TrainConfig, apply,
                   history, merge, names, register)
from . import cluster, distill, lowrank, prune, quant  # noqa: F401  (importing registers their stages)
from . import eval  # noqa: F401,A004  (registers the latency measurements techniques look up: HALP's tables)
from .export import deployed  # noqa: F401  (registers the per-format latency table mixed_precision looks up)
from .saving import load, save

__version__ = "0.1.0"

__all__ = ["CompositionError", "Config", "ConfigError", "Context", "NNCompressError", "Targets", "TrainConfig",
           "apply", "history", "load", "merge", "names", "register", "save", "__version__"]
