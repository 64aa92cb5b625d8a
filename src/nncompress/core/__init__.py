"""The lowest layer: configs, the registry, `apply`, `Targets`, errors, the training loop, and the two
shared mechanisms every technique uses: layer surgery (`surgery`) and calibration (`calibration`)."""
from .apply import apply, history, layer_transform, model_source, replay, tag_source
from .config import Config, check
from .context import Context
from .errors import (CompositionError, ConfigError, DataError, ModelLoadError, NNCompressError, RegistryError,
                     TargetError, TrainingError, UnsupportedOpError)
from .merge import MergeConfig, merge
from .registry import lookup, names, register, transform_for
from .surgery import Edits, Site, Wrapper, get_module, layer_sites, merge_wrappers, plain_view, set_module, wrapper
from .targets import Targets
from .train import TrainConfig, fit

__all__ = [
    "apply", "history", "layer_transform", "model_source", "replay", "tag_source", "Config", "check", "Context",
    "CompositionError", "ConfigError", "DataError", "ModelLoadError", "NNCompressError", "RegistryError",
    "TargetError", "TrainingError", "UnsupportedOpError", "MergeConfig", "merge", "lookup", "names", "register",
    "transform_for", "Edits", "Site", "Wrapper", "get_module", "layer_sites", "merge_wrappers", "plain_view",
    "set_module", "wrapper", "Targets", "TrainConfig", "fit",
]
