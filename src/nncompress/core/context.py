"""`Context`: what a transform may use besides the model and its config."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn

from .targets import Targets


@dataclasses.dataclass
class Context:
    """Everything a transform gets besides `(model, config)`.

    targets:  the module selection for this application
    data:     a data bundle (train/calibration/test loaders and the task), or None
    teacher:  the model as it was before the recipe, for distillation; None outside recipes
    device:   where to train and calibrate
    record:   what the transform decided from data (kept channel indices, ranks, ...). It is written
              to the manifest; on load the same transform runs again with `replay=True` and must
              reproduce the structure from `record` alone, without data.
    replay:   True while rebuilding a saved model from its manifest
    progress: show progress bars
    """

    targets: Targets = dataclasses.field(default_factory=Targets)
    data: Any = None
    teacher: nn.Module | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    replay: bool = False
    progress: bool = False
    log: Callable[[str], None] = lambda msg: None
