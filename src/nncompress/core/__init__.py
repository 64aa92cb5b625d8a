"""The lowest layer: configs, the registry, `apply`, `Targets`, errors and the training loop."""
from .apply import apply, history, model_source, replay, tag_source
from .config import Config, check
from .context import Context
from .errors import (ConfigError, DataError, ModelLoadError, NNCompressError, RegistryError,
                     TargetError, TrainingError, UnsupportedOpError)
from .registry import lookup, names, register, transform_for
from .targets import Targets
from .train import TrainConfig, fit

__all__ = [
    "apply", "history", "model_source", "replay", "tag_source", "Config", "check", "Context", "ConfigError", "DataError",
    "ModelLoadError", "NNCompressError", "RegistryError", "TargetError", "TrainingError",
    "UnsupportedOpError", "lookup", "names", "register", "transform_for", "Targets", "TrainConfig", "fit",
]
