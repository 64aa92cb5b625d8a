"""Distillation: losses as functions, feature capture, the fine-tune stage that can distill from the
pre-recipe model (logits, features, attention), and stage-wise (progressive) distillation."""
from .features import FeatureAdapter, adapter_for, capture, find_module, output_of, pairs_of
from .finetune import FinetuneConfig
from .losses import (attention_kl_loss, attention_map, attention_transfer_loss, embedding_distill_loss,
                     feature_kd_loss, kd_logits_loss, kd_loss)
from .progressive import ProgressiveConfig

__all__ = ["FeatureAdapter", "FinetuneConfig", "ProgressiveConfig", "adapter_for", "attention_kl_loss",
           "attention_map", "attention_transfer_loss", "capture", "embedding_distill_loss", "feature_kd_loss",
           "find_module", "kd_logits_loss", "kd_loss", "output_of", "pairs_of"]
