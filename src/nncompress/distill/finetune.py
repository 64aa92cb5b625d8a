"""The `finetune` stage: recover accuracy with the shared training loop, optionally distilling
from the model as it was before the recipe (`ctx.teacher`), or from any teacher in the context.

What is distilled (seed 004, "multi-level distillation"):
- logits: (1 - kd_alpha) * CE(labels) + kd_alpha * T^2 KL(teacher_T || student_T)      (kd_alpha > 0)
- features: for each (student module, teacher module) pair in `features`, FitNets' hint loss
  MSE(adapter(student feature), teacher feature), the adapter a learned 1x1 conv created from the
  first batch's shapes when the widths differ (e.g. a pruned student), discarded after training
- attention transfer on the same pairs (Zagoruyko & Komodakis), which needs no adapter
- embedding models (no labels): cosine or MSE to the teacher's embeddings
- transformers: KL(teacher attention probabilities || student's) (MiniLM, TinyBERT) and the MSE of the
  blocks' hidden states (TinyBERT), on the layers `distill_layers` picks, padding left out

    features: [layers.1, layers.2]             # same names in both models
    features: [[layers.2, encoder.block3]]     # (student name, teacher name)
    attention_kl_weight: 1.0                   # every layer's attention; distill_layers: [-1] for the last only
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn as nn

from ..core import ConfigError, Context, TrainConfig, check, fit, register
from ..core.calibration import batch_inputs, evaluating, feed, move
from ..core.objectives import Objective, objective, require_data
from ..core.train import make_optimizer
from ..core.zeros import zero_keeper
from ..optim import optimizer_state_bytes
from .features import (FeaturePair, adapter_for, attention_modules, block_of, capture, capture_attention, find_module,
                       pairs_of)
from .losses import (attention_kl_loss, attention_kl_matrix, attention_transfer_loss, feature_kd_loss,
                     hidden_state_loss)


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

    Transformers (attention modules are those with an int head count or head size, e.g. BERT's
    `attention.self`; a block is the list item holding one, e.g. `encoder.layer.3`):
    attention_kl_weight: weight of KL(teacher attention probabilities || student's), averaged over the
                       layers, heads and real (not padded) query positions (0: none). Hugging Face models
                       compute attention eagerly while distilling (kernels never form the probabilities),
                       and the distilled attention runs without attention dropout (see `capture_attention`)
    hidden_weight:     weight of the MSE between the blocks' output hidden states over real tokens, averaged
                       over the layers (0: none); a learned adapter maps the student's width when it differs
    distill_layers:    which layers both terms read: indices into the student's attention layers in order,
                       negative from the end ([-1]: the last, as MiniLM distils); empty: every layer. When
                       the teacher is deeper, student layer i reads teacher layer (i + 1) * L_t // L_s - 1
                       (uniform, last to last)
    attention_heads:   how heads are paired when the student has fewer (its heads were pruned): "matched"
                       compares each student head with one teacher head, the pairing (one-to-one, least total
                       KL on a probe batch before training) finding the teacher head each was cut from, since
                       pruning keeps a head's query and key rows as they were; "mean" compares the
                       head-averaged distributions. Equal counts pair head i with head i under "matched"
    """

    kd_alpha: float = 0.0
    temperature: float = 4.0
    features: tuple[FeaturePair, ...] = ()
    feature_weight: float = 1.0
    feature_normalize: bool = False
    attention_weight: float = 0.0
    attention_p: float = 2.0
    embedding_loss: Literal["cosine", "mse"] = "cosine"
    attention_kl_weight: float = 0.0
    hidden_weight: float = 0.0
    distill_layers: tuple[int, ...] = ()
    attention_heads: Literal["matched", "mean"] = "matched"

    def __post_init__(self):
        super().__post_init__()
        check(0.0 <= self.kd_alpha <= 1.0, "kd_alpha", f"must be in [0, 1], got {self.kd_alpha}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.feature_weight >= 0, "feature_weight", f"must be >= 0, got {self.feature_weight}")
        check(self.attention_weight >= 0, "attention_weight", f"must be >= 0, got {self.attention_weight}")
        check(self.attention_p > 0, "attention_p", f"must be > 0, got {self.attention_p}")
        check(self.attention_weight == 0 or bool(self.features), "attention_weight",
              "attention transfer needs module pairs; list them in features, e.g. features: [layers.1]")
        check(self.attention_kl_weight >= 0, "attention_kl_weight", f"must be >= 0, got {self.attention_kl_weight}")
        check(self.hidden_weight >= 0, "hidden_weight", f"must be >= 0, got {self.hidden_weight}")
        check(len(set(self.distill_layers)) == len(self.distill_layers), "distill_layers",
              f"lists a layer twice: {list(self.distill_layers)}")
        check(not self.distill_layers or self.uses_layers, "distill_layers",
              "picks layers for attention_kl_weight and hidden_weight; set one of them > 0, or drop distill_layers")

    @property
    def uses_layers(self) -> bool:
        """Whether the transformer terms (attention KL, hidden states) are on."""
        return self.attention_kl_weight > 0 or self.hidden_weight > 0

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
    if config.uses_layers and ctx.teacher is None:
        raise ConfigError("attention_kl_weight" if config.attention_kl_weight > 0 else "hidden_weight",
                          "distilling attention or hidden states needs a teacher (the recipe provides the pre-recipe "
                          "model); set it to 0 or pass Context(teacher=...)")
    loss_fn = objective(ctx, "finetune.features" if pairs else "finetune.kd_alpha", kd_alpha=config.kd_alpha,
                        temperature=config.temperature, embedding_loss=config.embedding_loss, features=pairs)
    device = ctx.device
    model.to(device)
    adapters = nn.ModuleList()
    if pairs:
        adapters = build_adapters(model, loss_fn.teacher, pairs, probe_inputs(ctx.data, device), "features")
        loss_fn.feature_term = lambda sf, tf: feature_terms(sf, tf, pairs, adapters, config)
        ctx.record["adapters"] = {s: type(a).__name__ for (s, _), a in zip(pairs, adapters)}
    if config.uses_layers:
        loss_fn = TransformerTerms.build(model, loss_fn, config, probe_inputs(ctx.data, device, 8))
        adapters.extend(loss_fn.adapters)
        ctx.record.update(loss_fn.describe())
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


def probe_inputs(data: Any, device: torch.device, n: int = 2) -> Any:
    """`n` inputs from the calibration set, for sizing adapters without touching the train order."""
    inputs = data.example_batch(n)
    return {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)


# ------------------------------------------------------------------------------------ transformers

def token_mask(inputs: Any) -> torch.Tensor | None:
    """The (N, T) `attention_mask` of dict inputs (1: a real token), or None (every position counts)."""
    return inputs.get("attention_mask") if isinstance(inputs, Mapping) else None


def layer_pairs(model: nn.Module, teacher: nn.Module, config: FinetuneConfig) -> list[tuple[str, str]]:
    """(student, teacher) attention module names of the layers `distill_layers` picks (see FinetuneConfig)."""
    field = "attention_kl_weight" if config.attention_kl_weight > 0 else "hidden_weight"
    found = []
    for which, m in (("student", model), ("teacher", teacher)):
        names = attention_modules(m)
        if not names:
            raise ConfigError(field, f"the {which} ({type(m).__name__}) has no attention module (none holds "
                                     "num_attention_heads, num_heads or head_dim); attention and hidden-state "
                                     "distillation are for transformers: set it to 0 and use features: [...]")
        found.append(names)
    s_att, t_att = found
    n_s, n_t = len(s_att), len(t_att)
    for i in config.distill_layers:
        check(-n_s <= i < n_s, "distill_layers", f"layer {i} does not exist: the student has {n_s} attention layers "
                                                 f"(0..{n_s - 1}, or -1 for the last)")
    picked = sorted({i % n_s for i in config.distill_layers}) if config.distill_layers else range(n_s)
    return [(s_att[i], t_att[i if n_s == n_t else (i + 1) * n_t // n_s - 1]) for i in picked]


def block_pairs(model: nn.Module, teacher: nn.Module, layers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(student, teacher) names of the blocks that hold each layer's attention (their outputs: hidden states)."""
    out = []
    for s, t in layers:
        sb, tb = block_of(model, s), block_of(teacher, t)
        if sb is None or tb is None:
            raise ConfigError("hidden_weight", f"attention module {s if sb is None else t!r} is not inside a list of "
                                               "blocks, so its hidden states cannot be found; set hidden_weight: 0 "
                                               "and name the modules in features: [...]")
        out.append((sb, tb))
    return out


def match_heads(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
    """The teacher head paired with each student head: one-to-one, least total KL (`attention_kl_matrix`)."""
    from scipy.optimize import linear_sum_assignment  # scipy comes with scikit-learn

    cost = attention_kl_matrix(student.double(), teacher.double(), mask)  # (Hs, Ht)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return [int(c) for _, c in sorted(zip(rows, cols))]


@dataclasses.dataclass
class TransformerTerms:
    """The stage's objective plus attention_kl_weight * mean attention KL + hidden_weight * mean hidden MSE.

    Wraps `base` (which runs both forwards), recording the probabilities and hidden states it needs through
    `capture_attention` / `capture` around it. `heads[i]`: the teacher head paired with each student head of
    layer i, or None for head-averaged distributions (see FinetuneConfig.attention_heads).
    """

    base: Objective
    config: FinetuneConfig
    layers: list[tuple[str, str]]
    blocks: list[tuple[str, str]]
    heads: list[list[int] | None]
    adapters: nn.ModuleList

    @classmethod
    def build(cls, model: nn.Module, base: Objective, config: FinetuneConfig, inputs: Any) -> "TransformerTerms":
        """Pick the layers, and from one probe forward of both models pair the heads and size the adapters."""
        layers = layer_pairs(model, base.teacher, config)
        blocks = block_pairs(model, base.teacher, layers) if config.hidden_weight > 0 else []
        terms = cls(base, config, layers, blocks, [], nn.ModuleList())
        with evaluating(model), torch.no_grad(), terms.capturing(model) as (sa, sh), \
                terms.capturing(base.teacher, teacher=True) as (ta, th):
            feed(model, inputs)
            feed(base.teacher, inputs)
        mask = token_mask(inputs)
        if config.attention_kl_weight > 0:
            terms.heads = [cls.pair_heads(sa[s], ta[t], mask, config.attention_heads) for s, t in layers]
        terms.adapters.extend(adapter_for(sh[s], th[t], f"hidden_weight: {s} -> {t}") for s, t in blocks)
        return terms

    @staticmethod
    def pair_heads(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None,
                   mode: str) -> list[int] | None:
        h_s, h_t = student.shape[1], teacher.shape[1]
        if mode == "mean" or h_s > h_t:  # more student heads than teacher heads: no one-to-one pairing
            return None
        return list(range(h_s)) if h_s == h_t else match_heads(student, teacher, mask)

    @contextlib.contextmanager
    def capturing(self, model: nn.Module, teacher: bool = False):
        """`(attention probabilities, hidden states)` of `model` (the student's or, `teacher`, the teacher's
        names), recorded by the library's capture while inside."""
        side = 1 if teacher else 0
        with contextlib.ExitStack() as stack:
            probs = stack.enter_context(capture_attention(model, [p[side] for p in self.layers])) \
                if self.config.attention_kl_weight > 0 else {}
            hidden = stack.enter_context(capture(model, [b[side] for b in self.blocks], "hidden_weight")) \
                if self.blocks else {}
            yield probs, hidden

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        loss, terms = self.parts(model, batch)
        weights = {"attention_kl": self.config.attention_kl_weight, "hidden": self.config.hidden_weight}
        return loss + sum(weights[k] * v for k, v in terms.items())

    def parts(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the base objective's loss, the unweighted transformer terms of `terms`) on one batch."""
        inputs = move(batch_inputs(batch), self.base.device)
        with self.capturing(model) as (sa, sh), self.capturing(self.base.teacher, teacher=True) as (ta, th):
            loss = self.base(model, batch)
            if len(ta) < len(sa) or len(th) < len(sh):  # the base objective had no use for the teacher's outputs
                with torch.no_grad():
                    feed(self.base.teacher, inputs)
        return loss, self.terms(sa, ta, sh, th, token_mask(inputs))

    def terms(self, sa: dict[str, torch.Tensor], ta: dict[str, torch.Tensor], sh: dict[str, torch.Tensor],
              th: dict[str, torch.Tensor], mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """`{"attention_kl": mean KL over the layers, "hidden": mean MSE over the blocks}` (those switched on)."""
        out = {}
        if self.config.attention_kl_weight > 0:
            kl = [self.attention_term(sa[s], ta[t], heads, mask) for (s, t), heads in zip(self.layers, self.heads)]
            out["attention_kl"] = torch.stack(kl).mean()
        if self.blocks:
            mse = [hidden_state_loss(a(sh[s]), th[t], mask) for (s, t), a in zip(self.blocks, self.adapters)]
            out["hidden"] = torch.stack(mse).mean()
        return out

    @staticmethod
    def attention_term(student: torch.Tensor, teacher: torch.Tensor, heads: list[int] | None,
                       mask: torch.Tensor | None) -> torch.Tensor:
        if heads is None:  # head-averaged distributions (N, 1, Q, K)
            student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
        elif heads != list(range(teacher.shape[1])):
            teacher = teacher[:, heads]  # (N, Hs, Q, K): each student head's teacher head
        return attention_kl_loss(student, teacher, mask=mask)

    def describe(self) -> dict[str, Any]:
        """What the stage records: the layers read, the head pairing, the hidden-state adapters."""
        out: dict[str, Any] = {"distill_layers": [s if s == t else [s, t] for s, t in self.layers]}
        if self.config.attention_kl_weight > 0:
            out["attention_heads"] = {s: "mean" if h is None else h for (s, _), h in zip(self.layers, self.heads)}
        if self.blocks:
            out["hidden_adapters"] = {s: type(a).__name__ for (s, _), a in zip(self.blocks, self.adapters)}
        return out
