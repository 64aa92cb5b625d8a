"""The `progressive_distill` stage: stage-wise (block-by-block) distillation, seed 002.

Seed 002 ("Progressive PTQ-KD", after Elthakeb et al.'s Divide and Conquer) compares compressing and
fine-tuning the whole network in one stage with doing it stage by stage: the drop between stages is
smaller and the result better, for less training. This stage is the "fine-tune stage by stage" half:

1. for each block k in `stages` (in forward order): train only block k of the student, fed by the
   student's own earlier blocks, which are frozen (parameters and BatchNorm statistics: they run in
   eval mode). What block k is trained towards (`target`):
   - `outputs` (default): the student's block-k output, through an adapter when the widths differ,
     replaces the teacher's block-k output and the teacher's remaining layers run on it; the loss is
     the stage's objective between that grafted network's outputs and the teacher's (logits KD plus
     labels; the embedding distance for embedding models). The block learns what the task needs
     from its output, not every channel of the teacher's;
   - `features`: FitNets' hint loss, MSE between the adapted block-k output and the teacher's (the
     forward stops at block k, so it is cheaper, but a pruned block spends its fewer channels on
     reproducing all of the teacher's, discriminative or not);
   - `both`: the sum.
   The adapter (a linear map of the channel axis) starts as the damped least-squares map from the
   student's block output to the teacher's on calibration inputs (for a pruned student, close to
   picking the kept channels), trains with the block and is discarded;
2. then `head_epochs` of training with logits KD plus the label loss: `final: all` (default) trains the
   whole student end to end (stage-wise distillation as the start of an ordinary KD fine-tune);
   `final: head` trains only what is in no stage (typically the classifier head), every stage frozen.

Why (the MNIST-1D CNN with half its channels pruned, no reconstruction, 14% one-shot; 99.0% before):
with the adapter randomly initialised and a `features` target, 2 epochs per block + 2 head epochs
recovered 71-77% where 2 epochs of plain KD recover 98.6%: the adapter drifts into a basis the next
blocks and the head do not read, a pruned block spends its channels on every teacher channel, and a
head-only last phase is a linear probe of features trained for MSE. The least-squares adapter brought
it to 85%, the `outputs` target to 92%, a final phase over all layers to 98%; `make
bench-distill-recovery` (one epoch per block + 2 final epochs against 6 epochs of plain KD, 3 seeds):
99.1% vs 98.9%.

The "compress stage by stage" half composes through a recipe, since a technique never calls another:
after the whole model is compressed, one `progressive_distill` over all blocks; or, to compress block
by block, alternate `{kind: <compress>, targets: {include: [layers.0*]}}` and
`{kind: progressive_distill, stages: [layers.0], head_epochs: 0}` per block, the last one with a head
phase. Nothing structural changes here, so a saved model reloads from its weights alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Literal

import torch
import torch.nn as nn

from ..core import ConfigError, Context, TrainConfig, check, fit, register
from ..core.calibration import batch_inputs, feed, intercepting, move
from ..core.objectives import Objective, objective, require_data
from ..core.train import make_optimizer
from ..core.zeros import zero_keeper
from .features import FeatureAdapter, FeaturePair, adapter_for, find_module, output_of, pairs_of
from .finetune import probe_inputs
from .losses import feature_kd_loss


@dataclasses.dataclass(frozen=True)
class ProgressiveConfig(TrainConfig):
    """Stage-wise distillation options (the training loop's `epochs` are per stage).

    stages:            the blocks, in forward order: a module name (the same in student and teacher)
                       or a [student, teacher] pair, e.g. [stem, layers.0, layers.1, layers.2]
    target:            what each block trains towards: outputs (the teacher's remaining layers run on the
                       block's adapted output; the loss is the stage objective on the result), features
                       (MSE to the teacher's block output), or both
    head_epochs:       epochs of the final phase (0: skip it)
    final:             what the final phase trains: all (the whole student, end to end; what recovers a
                       pruned model best) or head (what no stage holds, every stage frozen)
    kd_alpha:          weight of logits KD in the head phase; the label loss gets 1 - kd_alpha
    temperature:       softening temperature T of the logits KD loss
    feature_normalize: compare L2-normalized block outputs instead of raw MSE
    """

    stages: tuple[FeaturePair, ...] = ()
    target: Literal["outputs", "features", "both"] = "outputs"
    head_epochs: int = 1
    final: Literal["head", "all"] = "all"
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
    """Distill block by block from the teacher with finished blocks frozen, then the final phase with logits KD."""
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
    ctx.record["stage_losses"] = {}
    for (s, t), block in zip(pairs, blocks):
        ctx.record["stage_losses"][s] = _fit_block(model, teacher, head, block, s, t, config, ctx)
    if config.head_epochs:
        ctx.record["head_losses"] = _fit_head(model, head, blocks, config, ctx)
    model.eval()
    return model


def _fit_block(model: nn.Module, teacher: nn.Module, head: Objective, block: nn.Module, s: str, t: str,
               config: ProgressiveConfig, ctx: Context) -> list[float]:
    """Train `block` alone towards the teacher at `t` (see `target`)."""
    adapter = fitted_adapter(model, teacher, s, t, probe_inputs(ctx.data, ctx.device, 64))
    grafted = _Grafted(model, s, adapter, teacher, t)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        _freeze_modes(m, [block])
        if config.target == "outputs":
            return head(grafted, batch)
        x = move(batch_inputs(batch), ctx.device)
        with torch.no_grad():
            wanted = output_of(teacher, t, x, feed)
        hint = feature_kd_loss(adapter(output_of(m, s, x, feed)), wanted, config.feature_normalize)
        return hint if config.target == "features" else hint + head(grafted, batch)

    cfg = TrainConfig.of(config)
    with training_only(model, [block]) as params:
        opt = make_optimizer(list(params) + list(adapter.parameters()), cfg, f"progressive_distill: stage {s}")
        losses = fit(model, ctx.data.train, loss_fn, cfg, optimizer=opt, after_step=zero_keeper(model),
                     progress=ctx.progress, desc=f"progressive {s}")
    return [round(x, 6) for x in losses]


def fitted_adapter(model: nn.Module, teacher: nn.Module, s: str, t: str, inputs: Any, damp: float = 1e-2
                   ) -> nn.Module:
    """The adapter from the student's output at `s` to the teacher's at `t` (Identity when the widths
    agree), set to the least-squares map on `inputs` (damped by `damp` * the mean of diag(S^T S)): for a
    pruned student, near the selection of the channels it kept, so the block starts where it is."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out_s, out_t = output_of(model, s, inputs, feed), output_of(teacher, t, inputs, feed)
        adapter = adapter_for(out_s, out_t, f"stages: {s} -> {t}")
        if isinstance(adapter, FeatureAdapter):
            rows_s = out_s.movedim(adapter.dim, -1).reshape(-1, out_s.shape[adapter.dim]).double()
            rows_t = out_t.movedim(adapter.dim, -1).reshape(-1, out_t.shape[adapter.dim]).double()
            gram = rows_s.T @ rows_s
            gram.diagonal().add_(damp * gram.diagonal().mean().clamp_min(1e-12))
            adapter.proj.weight.copy_(torch.linalg.solve(gram, rows_s.T @ rows_t).T.to(adapter.proj.weight.dtype))
    model.train(was)
    return adapter


class _Grafted:
    """The student up to `s`, the adapter, then the teacher after `t`: the teacher runs with its output
    at `t` replaced by the adapted student output, so gradients reach the student's block through the
    teacher's (frozen) remaining layers. Called like a model; holds no state of its own."""

    def __init__(self, student: nn.Module, s: str, adapter: nn.Module, teacher: nn.Module, t: str):
        self.student, self.s, self.adapter, self.teacher, self.t = student, s, adapter, teacher, t

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        mapped = self.adapter(output_of(self.student, self.s, None, lambda m, _: m(*args, **kwargs)))
        with intercepting(self.teacher, [self.t], lambda out, _x: _with_first(out, mapped)):
            return self.teacher(*args, **kwargs)


def _with_first(out: Any, value: torch.Tensor) -> Any:
    """`out` with its tensor (or a tuple's first item, as Hugging Face layers return) replaced by `value`."""
    return (value, *out[1:]) if isinstance(out, tuple) else value


def _fit_head(model: nn.Module, head: Objective, blocks: list[nn.Module], config: ProgressiveConfig,
              ctx: Context) -> list[float]:
    """The final phase with logits KD (+ labels): every layer (`final: all`), or what no stage holds, every
    stage frozen (`final: head`)."""
    staged = set() if config.final == "all" else {id(p) for b in blocks for p in b.parameters()}
    rest = [m for m in model.modules() if not list(m.children())
            and any(id(p) not in staged for p in m.parameters(recurse=False))]
    if not rest:
        raise ConfigError("head_epochs", "every parameter belongs to a stage, so the head phase has nothing "
                                         "to train; set head_epochs: 0, or final: all to fine-tune every layer")
    head.feature_term, head.student_features, head.teacher_features = None, (), ()

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        _freeze_modes(m, rest)
        return head(m, batch)

    cfg = TrainConfig.of(config, epochs=config.head_epochs)
    with training_only(model, rest) as params:
        losses = fit(model, ctx.data.train, loss_fn, cfg, optimizer=make_optimizer(params, cfg, "progressive_distill: head"),
                     after_step=zero_keeper(model), progress=ctx.progress, desc="progressive head")
    return [round(x, 6) for x in losses]
