"""The `progressive_distill` stage: stage-wise (block-by-block) distillation, seed 002.

Seed 002 ("Progressive PTQ-KD", after Elthakeb et al.'s Divide and Conquer) compares compressing and
fine-tuning the whole network in one stage with doing it stage by stage: the drop between stages is
smaller and the result better, for less training. This stage is the "fine-tune stage by stage" half:

1. for each block k in `stages` (in forward order): train only block k of the student so that its
   output matches the teacher's block-k output (FitNets hint loss through a learned adapter when the
   widths differ), fed by the student's own earlier blocks, which are frozen (parameters and
   BatchNorm statistics: they run in eval mode). The forward stops at block k, so later blocks cost
   nothing;
2. then train everything that is in no stage (typically the classifier head) with logits KD plus
   the label loss, all stages frozen (`head_epochs: 0` skips this).

The "compress stage by stage" half composes through a recipe, since a technique never calls another:
after the whole model is compressed, one `progressive_distill` over all blocks; or, to compress block
by block, alternate `{kind: <compress>, targets: {include: [layers.0*]}}` and
`{kind: progressive_distill, stages: [layers.0], head_epochs: 0}` per block, the last one with a head
phase. Nothing structural changes here, so a saved model reloads from its weights alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..core import ConfigError, Context, TrainConfig, check, fit, register
from ..core.calibration import batch_inputs, feed, move
from ..core.objectives import Objective, objective, require_data
from ..core.train import make_optimizer
from ..core.zeros import zero_keeper
from .features import FeaturePair, adapter_for, find_module, output_of, pairs_of
from .finetune import probe_inputs
from .losses import feature_kd_loss


@dataclasses.dataclass(frozen=True)
class ProgressiveConfig(TrainConfig):
    """Stage-wise distillation options (the training loop's `epochs` are per stage).

    stages:            the blocks, in forward order: a module name (the same in student and teacher)
                       or a [student, teacher] pair, e.g. [stem, layers.0, layers.1, layers.2]
    head_epochs:       epochs of the final phase that trains what no stage holds (0: skip it)
    kd_alpha:          weight of logits KD in the head phase; the label loss gets 1 - kd_alpha
    temperature:       softening temperature T of the logits KD loss
    feature_normalize: compare L2-normalized block outputs instead of raw MSE
    """

    stages: tuple[FeaturePair, ...] = ()
    head_epochs: int = 1
    kd_alpha: float = 0.9
    temperature: float = 4.0
    feature_normalize: bool = False

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.stages), "stages", "list the blocks to distill in forward order, e.g. "
                                           "stages: [stem, layers.0, layers.1]")
        check(self.head_epochs >= 0, "head_epochs", f"must be >= 0, got {self.head_epochs}")
        check(0.0 <= self.kd_alpha <= 1.0, "kd_alpha", f"must be in [0, 1], got {self.kd_alpha}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")


@contextlib.contextmanager
def training_only(model: nn.Module, trained: list[nn.Module]) -> Iterator[list[nn.Parameter]]:
    """Inside: only the parameters of `trained` require grad; yields them. Flags are restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.requires_grad_(False)
        for m in trained:
            m.requires_grad_(True)
        yield [p for p in model.parameters() if p.requires_grad]
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _freeze_modes(model: nn.Module, trained: list[nn.Module]) -> None:
    """Eval mode for every module outside `trained`, so frozen BatchNorm keeps its running statistics."""
    inside = {id(x) for m in trained for x in m.modules()}
    for m in model.modules():
        if id(m) not in inside:
            m.training = False


@register("progressive_distill", config=ProgressiveConfig)
def _progressive_distill(model: nn.Module, config: ProgressiveConfig, ctx: Context) -> nn.Module:
    """Distill block by block from the teacher with finished blocks frozen, then the head with logits KD."""
    require_data(ctx, "progressive_distill")
    head = objective(ctx, "progressive_distill", kd_alpha=config.kd_alpha, temperature=config.temperature,
                     needs_teacher=True)  # the blocks distill from the teacher's blocks
    teacher = head.teacher
    device = ctx.device
    model.to(device)
    pairs = pairs_of(config.stages)
    blocks = [find_module(model, s, "stages") for s, _ in pairs]
    for _, t in pairs:
        find_module(teacher, t, "stages")
    probe = probe_inputs(ctx.data, device)
    ctx.record["stage_losses"] = {}
    for (s, t), block in zip(pairs, blocks):
        ctx.record["stage_losses"][s] = _fit_block(model, teacher, block, s, t, probe, config, ctx)
    if config.head_epochs:
        ctx.record["head_losses"] = _fit_head(model, head, blocks, config, ctx)
    model.eval()
    return model


def _fit_block(model: nn.Module, teacher: nn.Module, block: nn.Module, s: str, t: str, probe: Any,
               config: ProgressiveConfig, ctx: Context) -> list[float]:
    """Train `block` alone so the student's output at `s` matches the teacher's at `t`."""
    with torch.no_grad():
        was = model.training
        model.eval()
        adapter = adapter_for(output_of(model, s, probe, feed), output_of(teacher, t, probe, feed),
                              f"stages: {s} -> {t}")
        model.train(was)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        x = move(batch_inputs(batch), ctx.device)
        _freeze_modes(m, [block])
        with torch.no_grad():
            target = output_of(teacher, t, x, feed)
        return feature_kd_loss(adapter(output_of(m, s, x, feed)), target, config.feature_normalize)

    cfg = TrainConfig.of(config)
    with training_only(model, [block]) as params:
        opt = make_optimizer(list(params) + list(adapter.parameters()), cfg, f"progressive_distill: stage {s}")
        losses = fit(model, ctx.data.train, loss_fn, cfg, optimizer=opt, after_step=zero_keeper(model),
                     progress=ctx.progress, desc=f"progressive {s}")
    return [round(x, 6) for x in losses]


def _fit_head(model: nn.Module, head: Objective, blocks: list[nn.Module], config: ProgressiveConfig,
              ctx: Context) -> list[float]:
    """Train what no stage holds with logits KD (+ labels), every stage frozen."""
    staged = {id(p) for b in blocks for p in b.parameters()}
    rest = [m for m in model.modules() if not list(m.children())
            and any(id(p) not in staged for p in m.parameters(recurse=False))]
    if not rest:
        raise ConfigError("head_epochs", "every parameter belongs to a stage, so the head phase has nothing "
                                         "to train; set head_epochs: 0")
    head.feature_term, head.student_features, head.teacher_features = None, (), ()

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        _freeze_modes(m, rest)
        return head(m, batch)

    cfg = TrainConfig.of(config, epochs=config.head_epochs)
    with training_only(model, rest) as params:
        losses = fit(model, ctx.data.train, loss_fn, cfg, optimizer=make_optimizer(params, cfg, "progressive_distill: head"),
                     after_step=zero_keeper(model), progress=ctx.progress, desc="progressive head")
    return [round(x, 6) for x in losses]
