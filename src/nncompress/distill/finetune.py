"""The `finetune` stage: recover accuracy with the shared training loop, optionally distilling
from the model as it was before the recipe (`ctx.teacher`).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import ConfigError, Context, TrainConfig, check, fit, register
from ..core.train import make_optimizer
from ..core.errors import DataError
from .losses import embedding_distill_loss, kd_logits_loss


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """Fine-tune options: the training loop's, plus distillation from the pre-recipe model.

    kd_alpha:    weight of the distillation term; the label loss gets 1 - kd_alpha (0: labels only).
                 Embedding models have no labels and always distill (kd_alpha is ignored).
    temperature: softening temperature T of the logits KD loss
    """

    kd_alpha: float = 0.0
    temperature: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        check(0.0 <= self.kd_alpha <= 1.0, "kd_alpha", f"must be in [0, 1], got {self.kd_alpha}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")


def _call(model: nn.Module, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


@register("finetune", config=FinetuneConfig)
def finetune(model: nn.Module, config: FinetuneConfig, ctx: Context) -> nn.Module:
    """Train the model on the recipe's training data, with optional distillation."""
    if ctx.replay:  # the weights come from the checkpoint; nothing structural to redo
        return model
    if ctx.data is None:
        raise ConfigError("finetune", "needs training data; run it in a recipe or pass Context(data=...)")
    teacher = ctx.teacher
    embedding = ctx.data.task == "embedding"
    if (embedding or config.kd_alpha > 0) and teacher is None:
        raise ConfigError("finetune.kd_alpha", "distillation needs a teacher (the recipe provides the "
                          "pre-recipe model); set kd_alpha: 0 or pass Context(teacher=...)")
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    device = ctx.device
    model.to(device)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        if embedding:
            inputs = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                target = _call(teacher, inputs)
            return embedding_distill_loss(_call(m, inputs), target)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise DataError("finetune: classification batches must be (inputs, labels) pairs")
        x, y = batch[0].to(device), batch[1].to(device)
        logits = _call(m, x)
        loss = F.cross_entropy(logits, y)
        if config.kd_alpha > 0:
            with torch.no_grad():
                t_logits = _call(teacher, x)
            loss = (1 - config.kd_alpha) * loss + config.kd_alpha * kd_logits_loss(logits, t_logits, config.temperature)
        return loss

    train_cfg = TrainConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)})
    # Only the targeted modules train; with the default targets that is the whole model.
    params = {id(p): p for _, m in ctx.targets.select(model) for p in m.parameters()}
    optimizer = make_optimizer(params.values(), train_cfg)
    losses = fit(model, ctx.data.train, loss_fn, train_cfg, optimizer=optimizer, progress=ctx.progress,
                 desc="finetune")
    ctx.record["epoch_losses"] = [round(x, 6) for x in losses]
    model.eval()
    return model
