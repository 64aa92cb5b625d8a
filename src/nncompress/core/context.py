"""`Context`: what a transform may use besides the model and its config."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn

from .surgery import Edits
from .targets import Targets


@dataclasses.dataclass
class Context:
    """Everything a transform gets besides `(model, config)`.

    targets:  the module selection for this application
    data:     a data bundle (train/calibration/test loaders and the task), or None
    teacher:  the model as it was before the recipe, for distillation; None outside recipes
    device:   where to train and calibrate
    record:   what the transform decided and measured (ranks, losses, skipped layers, ...), for the
              report and the manifest; informational: loading does not read it
    edits:    the structural edits (layer swaps, removed channels or blocks), recorded through
              `ctx.edits.swap(...)` / `ctx.edits.add(...)`; `nncompress.load` replays exactly these
    progress: show progress bars
    cache_dir: where measurements that only depend on this machine (latency tables) are kept; None: nowhere
    """

    targets: Targets = dataclasses.field(default_factory=Targets)
    data: Any = None
    teacher: nn.Module | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    edits: Edits = dataclasses.field(default_factory=Edits)
    progress: bool = False
    log: Callable[[str], None] = lambda msg: None
    cache_dir: str | None = None
