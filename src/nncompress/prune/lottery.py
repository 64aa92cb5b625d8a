"""Lottery tickets (Frankle & Carbin) by iterative magnitude pruning with rewinding: the `lottery` stage.

    ticket = nncompress.apply(model, LotteryConfig(ratio=0.8, rounds=3, epochs=2), context=ctx)

Each round trains `epochs` with the current mask enforced, prunes the lowest-magnitude fraction of the
surviving weights (globally by default) so that after `rounds` rounds `ratio` is reached, and
rewinds the survivors to their initial values (or to their values after `rewind_steps` optimizer
steps, "late rewinding"). The ticket is then trained `final_epochs`. `reinit: true` is the control
of the hypothesis: the same masks on a fresh random initialisation.
The model stays plain modules with zeros; loading replays nothing.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from ..core import ConfigError, Context, Site, TrainConfig, check, fit, layer_transform
from ..core.objectives import objective, require_data
from .masks import global_masks, magnitude_scores, unstructured_mask
from ..core.surgery import plain_sites
from .sparsity import SPARSE_LAYERS, Masks, SparsityConfig, sparse_layers


@dataclasses.dataclass(frozen=True)
class LotteryConfig(TrainConfig):
    """Iterative magnitude pruning with rewinding; the training loop's options (optimizer, lr, ...)
    apply to every round.

    ratio:        final fraction of zeros in the targeted Linear / Conv weights
    rounds:       prune-train rounds; each removes 1 - (1 - ratio)^(1/rounds) of the survivors
    epochs:       training per round
    rewind_steps: 0 rewinds to the initial weights; k > 0 to the weights after k optimizer steps
    final_epochs: training of the ticket after the last rewind (default: epochs)
    reinit:       control: re-initialise the survivors at random (seeded by `seed`) instead of rewinding
    scope:        global (one magnitude threshold over all layers) | layer
    """

    renamed: ClassVar[dict[str, str]] = {**TrainConfig.renamed,
                                         "sparsity": "ratio (the fraction removed, as in prune and sparsify)"}

    ratio: float = 0.8
    rounds: int = 3
    rewind_steps: int = 0
    final_epochs: int | None = None
    reinit: bool = False
    scope: Literal["global", "layer"] = "global"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check(0.0 <= self.ratio < 1.0, "ratio", f"must be in [0, 1), got {self.ratio}")
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(self.epochs >= 1, "epochs", f"the masks come from trained weights; must be >= 1, got {self.epochs}")
        check(self.rewind_steps >= 0, "rewind_steps", f"must be >= 0, got {self.rewind_steps}")
        check(self.final_epochs is None or self.final_epochs >= 0, "final_epochs",
              f"must be >= 0, got {self.final_epochs}")


@layer_transform("lottery", config=LotteryConfig, layers=SPARSE_LAYERS, on_wrapped="through", what="Linear/Conv")
def _lottery(model: nn.Module, config: LotteryConfig, ctx: Context, sites: list[Site]) -> nn.Module:
    """Find a winning ticket by iterative magnitude pruning with rewinding, then train it."""
    require_data(ctx, "lottery")
    skipped: dict[str, str] = {}
    with plain_sites(sites) as plain:
        model = plain.model.to(ctx.device)
        layers = sparse_layers(plain.layers, SparsityConfig(), skipped)
        if not layers:
            raise ConfigError("targets", "no Linear or Conv layer to prune; widen targets")
        masks, levels = _find_ticket(model, layers, config, ctx)
    zeros = sum(int((~m).sum()) for m in masks.values())
    ctx.record.update(ratio=round(zeros / sum(m.numel() for m in masks.values()), 6), round_ratio=levels,
                      layers={n: round(float((~m).float().mean()), 6) for n, m in masks.items()})
    if skipped:
        ctx.record["skipped"] = skipped
    return sites[0].model.eval()


def _find_ticket(model: nn.Module, layers: dict[str, nn.Module], config: LotteryConfig, ctx: Context
                 ) -> tuple[Masks, list[float]]:
    loss_fn = objective(ctx, "lottery", model)
    masks: Masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
    rewind = _snapshot(model) if config.rewind_steps == 0 else None
    steps, levels = 0, []

    def after_step(m: nn.Module) -> None:
        nonlocal steps, rewind
        enforce(layers, masks)
        steps += 1
        if rewind is None and steps == config.rewind_steps:
            rewind = _snapshot(model)

    curves = ctx.record.setdefault("epoch_losses", [])  # one list per round, then the ticket's
    for r in range(1, config.rounds + 1):
        curves.append([round(x, 6) for x in fit(model, ctx.data.train, loss_fn, TrainConfig.of(config),
                                                after_step=after_step, progress=ctx.progress,
                                                desc=f"lottery round {r}")])
        if rewind is None:
            raise ConfigError("rewind_steps", f"{config.rewind_steps} is more than the {steps} steps of the "
                              f"first round; lower rewind_steps or raise epochs")
        level = 1 - (1 - config.ratio) ** (r / config.rounds)
        masks = prune_survivors(layers, masks, level, config.scope)
        levels.append(round(level, 6))
        model.load_state_dict(rewind)
        enforce(layers, masks)
    if config.reinit:
        reinitialize(layers, config.seed)
        enforce(layers, masks)
    final = config.epochs if config.final_epochs is None else config.final_epochs
    if final:
        curves.append([round(x, 6) for x in fit(model, ctx.data.train, loss_fn, TrainConfig.of(config, epochs=final),
                                                after_step=lambda m: enforce(layers, masks),
                                                progress=ctx.progress, desc="lottery ticket")])
    return masks, levels


def prune_survivors(layers: dict[str, nn.Module], masks: Masks, level: float, scope: str = "global") -> Masks:
    """Masks at `level` by weight magnitude, the already pruned weights staying pruned.

    >>> fc = nn.Linear(4, 1, bias=False).requires_grad_(False)
    >>> _ = fc.weight.copy_(torch.tensor([[0.1, -3.0, 0.5, 2.0]]))
    >>> prune_survivors({"fc": fc}, {"fc": torch.tensor([[True, True, True, False]])}, 0.5)["fc"].tolist()
    [[False, True, True, False]]
    """
    scores = {n: magnitude_scores(m.weight).masked_fill(~masks[n], -math.inf) for n, m in layers.items()}
    if scope == "global":
        return global_masks(scores, level)
    return {n: unstructured_mask(s, level) for n, s in scores.items()}


def enforce(layers: dict[str, nn.Module], masks: Masks) -> None:
    """Zero the pruned weights in place."""
    with torch.no_grad():
        for n, m in layers.items():
            m.weight.mul_(masks[n])


_REINIT_STREAM = 0x7A11E7  # a seed stream of its own: never the one the model's own init was drawn from


def reinitialize(layers: dict[str, nn.Module], seed: int) -> None:
    """Fresh random weights from each layer's own `reset_parameters`, seeded (from a stream kept apart
    from the usual seeds) without touching the global generator's state. The control must differ from
    the ticket: if a layer comes out equal to the weights it had (a model initialised with the very
    same seed), it is drawn again from the next seed."""
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    for attempt in range(8):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_REINIT_STREAM + 1009 * seed + attempt)
            for m in layers.values():
                m.reset_parameters()
        if not any(torch.equal(m.weight, before[n]) for n, m in layers.items()):
            return
    raise RuntimeError("lottery: could not draw a re-initialisation different from the ticket")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
