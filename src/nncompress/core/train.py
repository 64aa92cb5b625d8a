"""The one training loop every stage that trains reuses (fine-tune, QAT, distillation, ...).

A loss is a function `loss_fn(model, batch) -> scalar tensor`; distillation and regularizers are
extra terms added through `extra_losses`, so the loop itself never changes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Iterable, Literal

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed
from .config import Config, check
from .errors import TrainingError

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """Options of the shared training loop."""

    epochs: int = 1
    lr: float = 1e-3
    optimizer: Literal["adam", "adamw", "adam8bit", "sgd"] = "adamw"  # adam8bit: AdamW, 8-bit moments
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    weight_decay: float = 0.0
    momentum: float = 0.9
    max_grad_norm: float = 0.0  # 0 disables clipping
    max_steps: int = 0  # 0: no limit; a budget in optimizer steps across epochs
    sam_rho: float = 0.0  # > 0: sharpness-aware minimisation (Foret et al. 2021) with this radius, any optimizer

    renamed: ClassVar[dict[str, str]] = {"schedule": "lr_schedule (schedule is the pruning schedule of sparsify)"}

    @classmethod
    def of(cls, config: Config, **override: Any) -> "TrainConfig":
        """The training-loop options of a stage config that extends TrainConfig, with `override`s
        (e.g. the epochs of one phase)."""
        return cls(**{**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}, **override})

    def __post_init__(self):
        check(self.epochs >= 0, "epochs", f"must be >= 0, got {self.epochs}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        check(self.max_steps >= 0, "max_steps", f"must be >= 0, got {self.max_steps}")
        check(self.sam_rho >= 0, "sam_rho", f"must be >= 0 (0: plain descent; SAM's usual radius is 0.05), "
                                            f"got {self.sam_rho}")


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig, what: str = "training") -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise TrainingError(f"{what}: nothing to train: the targeted modules hold no trainable parameter (int8 layers "
                            "and removed blocks hold none); target other modules, or drop the stage")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam8bit":
        from ..optim import Adam8bit  # lazily: optim is a low layer beside core, not below it
        return Adam8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(model: nn.Module, loader: Iterable, loss_fn: LossFn, cfg: TrainConfig, *,
        extra_losses: tuple[LossFn, ...] = (), optimizer: torch.optim.Optimizer | None = None,
        after_step: Callable[[nn.Module], None] | None = None, progress: bool = False,
        desc: str = "train", stop_after_epoch: Callable[[int], bool] | None = None) -> list[float]:
    """Train `model` in place; returns the mean loss of each epoch.

    extra_losses: terms added to the loss (distillation, sparsity penalties)
    after_step:   called after each optimizer step (e.g. to re-apply masks)
    stop_after_epoch: called with the epoch number (from 1) after each epoch; True ends training there
                  (the optimizer state and learning-rate schedule run on as one training)
    A non-finite loss stops training with a `TrainingError` that says where and what to change.
    Under torchrun each global batch is split across the ranks and gradients are averaged
    (`core.distributed`): the same steps as one process, up to float reduction order.
    """
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    total = cfg.epochs * n_batches if n_batches else None
    if cfg.max_steps:
        total = min(total, cfg.max_steps) if total else cfg.max_steps
    opt = optimizer or make_optimizer(model.parameters(), cfg, desc)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
             if cfg.lr_schedule == "cosine" and total else None)
    distributed.init_from_env(_device(model))
    sync = distributed.GradientSync(_device(model))
    params = [p for group in opt.param_groups for p in group["params"]]
    if sync.active:
        distributed.broadcast_state([model, *_owners(params, model)])
    was_training = model.training
    model.train()
    history: list[float] = []
    step = 0
    bar = tqdm(total=total, desc=desc, disable=not progress or not distributed.is_main(), leave=False)
    try:
        with distributed.data_parallel(model):
            for epoch in range(cfg.epochs):
                losses = []
                for i, batch in enumerate(loader):
                    part = sync.split(batch)
                    if part is None:  # fewer rows than ranks: skipped on every rank
                        continue
                    batch, weight = part
                    opt.zero_grad(set_to_none=True)
                    loss = _loss(model, batch, loss_fn, extra_losses) * weight
                    loss.backward()
                    value = sync.reduce(params, loss.item())
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"{desc}: loss became {value} at epoch {epoch + 1}, step {i + 1}; "
                            f"lower the learning rate (lr={cfg.lr:g}) or set max_grad_norm, and check the data for NaNs")
                    if cfg.sam_rho:
                        _sharpness_aware(model, batch, loss_fn, extra_losses, opt, cfg.sam_rho, weight, sync, params)
                    if cfg.max_grad_norm:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    opt.step()
                    sync.buffers([model])
                    if sched is not None:
                        sched.step()
                    if after_step is not None:
                        after_step(model)
                    losses.append(value)
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}")
                    if cfg.max_steps and step >= cfg.max_steps:
                        break
                history.append(sum(losses) / max(len(losses), 1))
                if cfg.max_steps and step >= cfg.max_steps:
                    break
                if stop_after_epoch is not None and stop_after_epoch(epoch + 1):
                    break
    finally:
        bar.close()
        model.train(was_training)
    return [h for h in history if not math.isnan(h)]


def _loss(model: nn.Module, batch: Any, loss_fn: LossFn, extra_losses: tuple[LossFn, ...]) -> torch.Tensor:
    loss = loss_fn(model, batch)
    for term in extra_losses:
        loss = loss + term(model, batch)
    return loss


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _owners(params: list[torch.nn.Parameter], model: nn.Module) -> list[nn.Module]:
    """Parameters trained beside the model (feature adapters), wrapped so they can be broadcast."""
    inside = {id(p) for p in model.parameters()}
    outside = [p for p in params if id(p) not in inside]
    if not outside:
        return []
    holder = nn.Module()
    holder.params = nn.ParameterList(outside)
    return [holder]


def _sharpness_aware(model: nn.Module, batch: Any, loss_fn: LossFn, extra_losses: tuple[LossFn, ...],
                     opt: torch.optim.Optimizer, rho: float, weight: float = 1.0,
                     sync: "distributed.GradientSync | None" = None, trained: list | None = None) -> None:
    """SAM: replace the gradient at w by the gradient at w + rho g / ||g|| (the worst point of a ball of
    radius rho, to first order), then step from w; flatter minima prune and quantize with less damage
    (seed 000). Costs a second forward and backward per step."""
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.norm(torch.stack([p.grad.detach().norm(2) for p in params]), 2)
    scale = rho / (float(norm) + 1e-12)
    with torch.no_grad():
        shifts = [p.grad.detach() * scale for p in params]
        for p, e in zip(params, shifts):
            p.add_(e)
    opt.zero_grad(set_to_none=True)
    loss = _loss(model, batch, loss_fn, extra_losses) * weight
    loss.backward()
    if sync is not None:
        sync.reduce(trained or params, loss.item())
    with torch.no_grad():
        for p, e in zip(params, shifts):
            p.sub_(e)
