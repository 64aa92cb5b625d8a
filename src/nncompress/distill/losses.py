"""Distillation losses as plain functions.

>>> import torch
>>> s = torch.tensor([[1.0, 2.0]]); t = s.clone()
>>> float(kd_logits_loss(s, t, temperature=4.0))
0.0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_logits_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton's KD: T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch-mean.

    The T^2 factor keeps the gradient scale independent of T (soft-target gradients shrink as 1/T^2).
    """
    t = temperature
    log_p_student = F.log_softmax(student / t, dim=-1)  # (N, C)
    log_p_teacher = F.log_softmax(teacher / t, dim=-1)  # (N, C)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


def embedding_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity between student and teacher embeddings (N, D)."""
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1).mean()
