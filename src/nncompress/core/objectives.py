"""What a stage that trains minimises: the one builder of task and distillation losses, and the one
"this stage needs data" check.

    loss = objective(ctx, "finetune", kd_alpha=0.5)        # labels + logits KD from ctx.teacher
    fit(model, ctx.data.train, loss, TrainConfig(epochs=1))

Classification data (batches `(x, y)`): cross-entropy on the labels, plus, with `kd_alpha > 0`,
Hinton's T^2-scaled KL to the teacher's softened logits. Language-model data (batches `(input_ids,
targets)`, logits (B, T, V)) is the same with every token a row (`tokens_as_rows`). Embedding data (dict batches, no labels):
distance to the teacher's embeddings (1 - cosine, or MSE); without a teacher in the context, to the
model as it is when the objective is built. `features` adds a term computed from captured
intermediate outputs of student and teacher (feature distillation).

>>> import torch
>>> s = torch.tensor([[1.0, 2.0]])
>>> float(kd_logits_loss(s, s.clone(), temperature=4.0))
0.0
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .calibration import batch_inputs, capturing, feed, first_tensor, move
from .context import Context
from .errors import ConfigError, DataError

__all__ = ["require_data", "objective", "Objective", "kd_logits_loss", "kd_loss", "embedding_distill_loss",
           "tokens_as_rows"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def require_data(ctx: Context, field: str, what: str = "training data") -> Any:
    """`ctx.data`, or a `ConfigError(field)` saying the stage needs data and how to give it."""
    if ctx.data is None:
        raise ConfigError(field, f"needs {what}; run the stage in a recipe or pass Context(data=...)")
    return ctx.data


def kd_logits_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton's KD: T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch-mean.

    The T^2 factor keeps the gradient scale independent of T (soft-target gradients shrink as 1/T^2).
    """
    t = temperature
    log_p_student = F.log_softmax(student / t, dim=-1)  # (N, C)
    log_p_teacher = F.log_softmax(teacher / t, dim=-1)  # (N, C)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


def kd_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor, alpha: float = 0.9,
            temperature: float = 4.0) -> torch.Tensor:
    """Logits KD plus the label loss: (1 - alpha) * CE(student, labels) + alpha * kd_logits_loss.

    alpha = 0 is plain training on labels, alpha = 1 pure distillation (no labels used).

    >>> z = torch.tensor([[2.0, 0.0]]); y = torch.tensor([0])
    >>> round(float(kd_loss(z, z, y, alpha=0.5)), 6) == round(0.5 * float(F.cross_entropy(z, y)), 6)
    True
    """
    ce = F.cross_entropy(student, labels)
    if alpha == 0 or teacher is None:
        return ce
    return (1 - alpha) * ce + alpha * kd_logits_loss(student, teacher, temperature)


def embedding_distill_loss(student: torch.Tensor, teacher: torch.Tensor,
                           mode: Literal["cosine", "mse"] = "cosine") -> torch.Tensor:
    """Embedding-level distillation for sentence encoders (N, D): 1 - mean cosine, or MSE."""
    if mode == "mse":
        return F.mse_loss(student, teacher)
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1).mean()


def tokens_as_rows(out: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Next-token prediction as classification: logits (B, T, V) with targets (B, T) become rows
    (B*T, V) and (B*T,); anything else is returned as it is.

    >>> [tuple(t.shape) for t in tokens_as_rows(torch.zeros(2, 3, 5), None, torch.zeros(2, 3)) if t is not None]
    [(6, 5), (6,)]
    """
    if out.dim() == 3 and labels.dim() == 2:
        return out.flatten(0, 1), None if teacher is None else teacher.flatten(0, 1), labels.flatten()
    return out, teacher, labels


def check_labels(labels: torch.Tensor, logits: torch.Tensor) -> None:
    """Labels must index the model's classes: a `DataError` saying which, not torch's IndexError."""
    if labels.dtype.is_floating_point or labels.dim() != 1:
        raise DataError(f"classification labels must be a 1-D integer tensor (one class index per sample), got "
                        f"{labels.dtype} of shape {tuple(labels.shape)}")
    n = logits.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
        bad = int(labels.max()) if int(labels.max()) >= n else int(labels.min())
        raise DataError(f"a label is {bad} but the model outputs {n} classes (0..{n - 1}); give the model "
                        f"num_classes={int(labels.max()) + 1} or check the data's labels")


FeatureTerm = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


@dataclasses.dataclass
class Objective:
    """`loss(model, batch)` for the shared training loop (see the module docstring)."""

    embedding: bool
    teacher: nn.Module | None
    device: torch.device
    kd_alpha: float = 0.0
    temperature: float = 4.0
    embedding_loss: Literal["cosine", "mse"] = "cosine"
    student_features: Sequence[str] = ()
    teacher_features: Sequence[str] = ()
    feature_term: FeatureTerm | None = None

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = self.split(batch)
        t_out, tf = None, {}
        if self.teacher is not None and (self.embedding or self.kd_alpha > 0 or self.feature_term is not None):
            with torch.no_grad(), capturing(self.teacher, self.teacher_features) as tf:
                t_out = first_tensor(feed(self.teacher, x))
        with capturing(model, self.student_features) as sf:
            out = first_tensor(feed(model, x))
        if self.embedding:
            loss = embedding_distill_loss(out, t_out, self.embedding_loss)
        else:
            out, t_out, y = tokens_as_rows(out, t_out, y)
            check_labels(y, out)
            loss = kd_loss(out, t_out, y, self.kd_alpha, self.temperature)
        if self.feature_term is not None:
            loss = loss + self.feature_term(sf, tf)
        return loss

    def split(self, batch: Any) -> tuple[Any, torch.Tensor | None]:
        """(inputs on the device, labels or None)."""
        if self.embedding:
            return move(batch_inputs(batch), self.device), None
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise DataError("classification batches must be (inputs, labels) pairs")
        return move(batch[0], self.device), batch[1].to(self.device)


def frozen(teacher: nn.Module) -> nn.Module:
    """`teacher` in eval mode with no parameter requiring grad (it is only read)."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def objective(ctx: Context, field: str, model: nn.Module | None = None, *, kd_alpha: float = 0.0,
              temperature: float = 4.0, embedding_loss: Literal["cosine", "mse"] = "cosine",
              features: Sequence[tuple[str, str]] = (), feature_term: FeatureTerm | None = None,
              needs_teacher: bool = False) -> Objective:
    """The loss a training stage minimises on `ctx.data` (see the module docstring).

    field: the config field named when something is missing (no data, a teacher needed but absent)
    model: given, embedding data without a teacher distills from a frozen copy of it as it is now
           (a stage that prunes and then recovers: the copy is the model before its pruning)
    features: (student module, teacher module) pairs whose outputs `feature_term(sf, tf)` reads
    """
    data = require_data(ctx, field)
    embedding = getattr(data, "task", "classification") == "embedding"
    teacher = ctx.teacher
    needs_teacher = needs_teacher or kd_alpha > 0 or bool(features)
    if teacher is None and embedding and model is not None:
        teacher = copy.deepcopy(model)
    if teacher is None and (needs_teacher or embedding):
        raise ConfigError(field, "distillation needs a teacher (the recipe provides the pre-recipe model); set "
                                 "kd_alpha: 0 and features: [] or pass Context(teacher=...)")
    if teacher is not None:
        frozen(teacher).to(ctx.device)
    return Objective(embedding, teacher, ctx.device, kd_alpha, temperature, embedding_loss,
                     [s for s, _ in features], [t for _, t in features], feature_term)
