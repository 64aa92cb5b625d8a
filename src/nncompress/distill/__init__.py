"""Distillation: losses as functions, and the fine-tune stage that can distill from the pre-recipe model."""
from .finetune import FinetuneConfig, finetune
from .losses import embedding_distill_loss, kd_logits_loss

__all__ = ["FinetuneConfig", "finetune", "embedding_distill_loss", "kd_logits_loss"]
