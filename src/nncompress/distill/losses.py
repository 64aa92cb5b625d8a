"""Distillation losses as plain functions (seed 004: logits and feature approximation).

Every loss takes the student's tensor first and the teacher's second, returns a scalar and
never detaches: callers produce the teacher's tensors under `no_grad`.

>>> import torch
>>> s = torch.tensor([[1.0, 2.0]]); t = s.clone()
>>> float(kd_logits_loss(s, t, temperature=4.0))
0.0
>>> float(feature_kd_loss(torch.ones(2, 3), torch.zeros(2, 3)))
1.0
>>> a = torch.randn(2, 4, 5)
>>> round(float(attention_transfer_loss(a, 3 * a)), 6)   # AT maps are scale-free
0.0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import DataError
# the task / logits / embedding losses live with the one objective builder in core; re-exported here
from ..core.objectives import embedding_distill_loss, kd_logits_loss, kd_loss  # noqa: F401

__all__ = ["attention_kl_loss", "attention_map", "attention_transfer_loss", "embedding_distill_loss",
           "feature_kd_loss", "kd_logits_loss", "kd_loss"]


def feature_kd_loss(student: torch.Tensor, teacher: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """FitNets' hint loss: mean squared error between same-shaped features (adapt widths first).

    normalize: compare each sample's features divided by their L2 norm (over all non-batch dims)
               and sum over features: ||s/|s| - t/|t|||^2, batch-mean, in [0, 4] = 2 - 2 cos(s, t).
               Scale-free, so a teacher with large activations does not dominate the other terms.
    """
    if student.shape != teacher.shape:
        raise DataError(f"feature_kd_loss: student features {tuple(student.shape)} and teacher features "
                        f"{tuple(teacher.shape)} differ; map the student's width with a FeatureAdapter first")
    if not normalize:
        return F.mse_loss(student, teacher)
    s = F.normalize(student.flatten(1), dim=1)  # (N, F)
    t = F.normalize(teacher.flatten(1), dim=1)  # (N, F)
    return (s - t).pow(2).sum(1).mean()


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis' activation-based attention: mean over channels of |a|^p, per position,
    L2-normalized per sample. (N, C, *spatial) -> (N, prod(spatial)); Conv1d and Conv2d alike.

    >>> attention_map(torch.tensor([[[3.0, 0.0], [0.0, 4.0]]]), p=1.0)   # |a| summed: (3, 4) / 5
    tensor([[0.6000, 0.8000]])
    """
    if features.dim() < 3:
        raise DataError(f"attention_map: needs (N, C, *spatial) features, got shape {tuple(features.shape)}; "
                        f"pick a convolutional module's output")
    q = features.abs().pow(p).mean(1).flatten(1)  # (N, L) or (N, H*W)
    return F.normalize(q, dim=1)


def attention_transfer_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer: ||Q_s/|Q_s| - Q_t/|Q_t|||^2 summed over positions, batch-mean.

    Channel counts may differ (maps are averaged over channels), spatial sizes must match. This is
    the paper's term squared; their reference code takes the mean over positions instead, so its
    weight (beta = 1000) corresponds to about 1000 / positions here.
    """
    qs, qt = attention_map(student, p), attention_map(teacher, p)  # (N, P) each
    if qs.shape != qt.shape:
        raise DataError(f"attention_transfer_loss: spatial sizes differ (student {tuple(student.shape[2:])}, "
                        f"teacher {tuple(teacher.shape[2:])}); pair modules at the same resolution")
    return (qs - qt).pow(2).sum(1).mean()


def attention_kl_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Transformer attention transfer: KL(teacher || student) between attention probabilities
    (N, H, Q, K) (rows sum to 1), mean over batch, heads and queries. When head counts differ,
    both are averaged over heads first (MiniLM-style distillation keeps head counts equal instead).

    >>> a = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    >>> float(attention_kl_loss(a, a))
    0.0
    """
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)  # (N, 1, Q, K)
    if student.shape != teacher.shape:
        raise DataError(f"attention_kl_loss: attention shapes {tuple(student.shape)} and {tuple(teacher.shape)} "
                        f"differ beyond the head count; pair layers with the same sequence length")
    kl = teacher * (teacher.clamp_min(eps).log() - student.clamp_min(eps).log())  # (N, H, Q, K)
    return kl.sum(-1).mean()
