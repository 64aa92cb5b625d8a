"""The `finetune` stage: recover accuracy with the shared training loop, optionally distilling
from the model as it was before the recipe (`ctx.teacher`), or from any teacher in the context.

What is distilled (seed 004, "multi-level distillation"):
- logits: (1 - kd_alpha) * CE(labels) + kd_alpha * T^2 KL(teacher_T || student_T)      (kd_alpha > 0)
- features: for each (student module, teacher module) pair in `features`, FitNets' hint loss
  MSE(adapter(student feature), teacher feature), the adapter a learned 1x1 conv created from the
  first batch's shapes when the widths differ (e.g. a pruned student), discarded after training
- attention transfer on the same pairs (Zagoruyko & Komodakis), which needs no adapter
- embedding models (no labels): cosine or MSE to the teacher's embeddings

    features: [layers.1, layers.2]             # same names in both models
    features: [[layers.2, encoder.block3]]     # (student name, teacher name)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn as nn

from ..core import Context, TrainConfig, check, fit, register
from ..core.calibration import feed
from ..core.objectives import objective, require_data
from ..core.train import make_optimizer
from ..core.zeros import zero_keeper
from ..optim import optimizer_state_bytes
from .features import FeaturePair, adapter_for, capture, find_module, pairs_of
from .losses import attention_transfer_loss, feature_kd_loss


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """Fine-tune options: the training loop's, plus distillation from a teacher.

    kd_alpha:          weight of the logits distillation term; the label loss gets 1 - kd_alpha (0: labels
                       only). Embedding models have no labels and always distill (kd_alpha is ignored).
    temperature:       softening temperature T of the logits KD loss
    features:          module pairs for feature distillation: a name (the same in student and teacher)
                       or a [student, teacher] pair; several pairs = multi-level distillation
    feature_weight:    weight of the hint (MSE) loss, averaged over the pairs (0: none)
    feature_normalize: compare L2-normalized features (scale-free, 2 - 2 cos) instead of raw MSE
    attention_weight:  weight of attention transfer on the same pairs, averaged over pairs (0: none)
    attention_p:       exponent p of the attention maps sum_c |a_c|^p
    embedding_loss:    for embedding models: "cosine" (1 - cos) or "mse" to the teacher's embeddings
    """

    kd_alpha: float = 0.0
    temperature: float = 4.0
    features: tuple[FeaturePair, ...] = ()
    feature_weight: float = 1.0
    feature_normalize: bool = False
    attention_weight: float = 0.0
    attention_p: float = 2.0
    embedding_loss: Literal["cosine", "mse"] = "cosine"

    def __post_init__(self):
        super().__post_init__()
        check(0.0 <= self.kd_alpha <= 1.0, "kd_alpha", f"must be in [0, 1], got {self.kd_alpha}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.feature_weight >= 0, "feature_weight", f"must be >= 0, got {self.feature_weight}")
        check(self.attention_weight >= 0, "attention_weight", f"must be >= 0, got {self.attention_weight}")
        check(self.attention_p > 0, "attention_p", f"must be > 0, got {self.attention_p}")
        check(self.attention_weight == 0 or bool(self.features), "attention_weight",
              "attention transfer needs module pairs; list them in features, e.g. features: [layers.1]")

    @property
    def uses_features(self) -> bool:
        return bool(self.features) and (self.feature_weight > 0 or self.attention_weight > 0)


def build_adapters(model: nn.Module, teacher: nn.Module, pairs: list[tuple[str, str]], inputs: Any,
                   field: str = "features") -> nn.ModuleList:
    """One adapter per pair (Identity when widths agree), sized from one probe forward of both models.

    Both models run in eval mode under no_grad for the probe, so nothing they hold changes.
    """
    for s, t in pairs:  # unknown names fail here, before any training, naming the model they miss from
        find_module(model, s, field)
        find_module(teacher, t, field)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture(model, [s for s, _ in pairs], field) as sf, \
                capture(teacher, [t for _, t in pairs], field) as tf:
            feed(model, inputs)
            feed(teacher, inputs)
    finally:
        model.train(was_training)
    return nn.ModuleList([adapter_for(sf[s], tf[t], f"{field}: {s} -> {t}") for s, t in pairs])


def feature_terms(sf: dict[str, torch.Tensor], tf: dict[str, torch.Tensor], pairs: list[tuple[str, str]],
                  adapters: nn.ModuleList, config: FinetuneConfig) -> torch.Tensor:
    """feature_weight * mean hint loss + attention_weight * mean attention-transfer loss over the pairs."""
    total = torch.zeros((), device=next(iter(sf.values())).device)
    for (s, t), adapter in zip(pairs, adapters):
        if config.feature_weight > 0:
            total = total + config.feature_weight * feature_kd_loss(adapter(sf[s]), tf[t], config.feature_normalize)
        if config.attention_weight > 0:
            total = total + config.attention_weight * attention_transfer_loss(sf[s], tf[t], config.attention_p)
    return total / len(pairs)


@register("finetune", config=FinetuneConfig)
def _finetune(model: nn.Module, config: FinetuneConfig, ctx: Context) -> nn.Module:
    """Train the model on the recipe's training data, with optional logits/feature distillation."""
    require_data(ctx, "finetune")
    pairs = pairs_of(config.features) if config.uses_features else []
    loss_fn = objective(ctx, "finetune.features" if pairs else "finetune.kd_alpha", kd_alpha=config.kd_alpha,
                        temperature=config.temperature, embedding_loss=config.embedding_loss, features=pairs)
    device = ctx.device
    model.to(device)
    adapters = nn.ModuleList()
    if pairs:
        adapters = build_adapters(model, loss_fn.teacher, pairs, probe_inputs(ctx.data, device), "features")
        loss_fn.feature_term = lambda sf, tf: feature_terms(sf, tf, pairs, adapters, config)
        ctx.record["adapters"] = {s: type(a).__name__ for (s, _), a in zip(pairs, adapters)}
    train_cfg = TrainConfig.of(config)
    # Only the targeted modules train (with the default targets, the whole model), plus the adapters.
    params = {id(p): p for _, m in ctx.targets.select(model) for p in m.parameters()}
    params.update({id(p): p for p in adapters.parameters()})
    optimizer = make_optimizer(params.values(), train_cfg, "finetune")
    adapters.train()
    # weights pruned by an earlier stage stay pruned: recovery must not regrow them
    losses = fit(model, ctx.data.train, loss_fn, train_cfg, optimizer=optimizer, after_step=zero_keeper(model),
                 progress=ctx.progress, desc="finetune")
    ctx.record["epoch_losses"] = [round(x, 6) for x in losses]
    ctx.record["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)  # adam8bit: ~4x less than adamw
    ctx.log(f"finetune: optimizer state {ctx.record['optimizer_state_bytes'] / 2**20:.1f} MiB ({train_cfg.optimizer})")
    model.eval()
    return model


def probe_inputs(data: Any, device: torch.device) -> Any:
    """Two inputs from the calibration set, for sizing adapters without touching the train order."""
    inputs = data.example_batch(2)
    return {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)
