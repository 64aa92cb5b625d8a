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

__all__ = ["attention_kl_loss", "attention_kl_matrix", "attention_map", "attention_transfer_loss",
           "embedding_distill_loss", "feature_kd_loss", "hidden_state_loss", "kd_logits_loss", "kd_loss"]


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


def _query_mask(mask: torch.Tensor | None, n: int, q: int, device: torch.device) -> torch.Tensor:
    """The token mask (N, Q) as floats (1: a real token); all ones when None."""
    if mask is None:
        return torch.ones(n, q, device=device)
    if tuple(mask.shape) != (n, q):
        raise DataError(f"attention / hidden-state distillation: token mask {tuple(mask.shape)} does not match "
                        f"{n} sequences of {q} tokens; pass the batch's attention_mask (N, T)")
    return mask.to(device=device, dtype=torch.float32)


def attention_kl_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-12,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Transformer attention transfer: KL(teacher || student) between attention probabilities
    (N, H, Q, K) (rows sum to 1), mean over batch, heads and queries. When head counts differ,
    both are averaged over heads first (MiniLM-style distillation keeps head counts equal instead).

    mask: (N, Q) token mask (1: real token); padded queries are left out of the mean (padded keys
          already have probability 0 in both, so they add nothing).

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
    if mask is None:
        return kl.sum(-1).mean()
    m = _query_mask(mask, student.shape[0], student.shape[2], student.device)  # (N, Q)
    return (kl.sum(-1) * m[:, None, :]).sum() / (m.sum().clamp_min(1) * student.shape[1])


def attention_kl_matrix(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                        eps: float = 1e-12) -> torch.Tensor:
    """(H_s, H_t): the KL of `attention_kl_loss` between every student head and every teacher head.

    >>> a = torch.softmax(torch.randn(2, 3, 4, 4), -1)
    >>> attention_kl_matrix(a[:, [2, 0]], a).argmin(1).tolist()   # each head finds the one it was cut from
    [2, 0]
    """
    m = _query_mask(mask, student.shape[0], student.shape[2], student.device)  # (N, Q)
    log_s = student.clamp_min(eps).log()  # (N, Hs, Q, K)
    log_t = teacher.clamp_min(eps).log()  # (N, Ht, Q, K)
    entropy = (teacher * log_t).sum(-1)  # (N, Ht, Q): sum_k t log t
    cross = torch.einsum("nhqk,ngqk->nhgq", teacher, log_s)  # (N, Ht, Hs, Q): sum_k t log s
    kl = entropy[:, :, None, :] - cross  # (N, Ht, Hs, Q)
    return (kl * m[:, None, None, :]).sum((0, 3)).T / m.sum().clamp_min(1)  # (Hs, Ht)


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """TinyBERT's hidden-state loss: MSE between same-shaped token features (N, T, D) (adapt widths
    first), over real tokens only when a (N, T) token `mask` is given.

    >>> s, t = torch.zeros(1, 2, 2), torch.tensor([[[1.0, 1.0], [9.0, 9.0]]])
    >>> float(hidden_state_loss(s, t, mask=torch.tensor([[1, 0]])))   # the padded token is left out
    1.0
    """
    if student.shape != teacher.shape:
        raise DataError(f"hidden_state_loss: student hidden states {tuple(student.shape)} and teacher hidden states "
                        f"{tuple(teacher.shape)} differ; map the student's width with a FeatureAdapter first")
    if mask is None:
        return F.mse_loss(student, teacher)
    m = _query_mask(mask, student.shape[0], student.shape[1], student.device)  # (N, T)
    sq = (student - teacher).pow(2).mean(-1)  # (N, T)
    return (sq * m).sum() / m.sum().clamp_min(1)
