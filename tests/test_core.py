"""The registry, Config validation, Targets, apply/history and the training loop."""
import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from nncompress.core import (Config, ConfigError, RegistryError, TargetError, Targets,
                             TrainConfig, TrainingError, apply, check, fit, history, lookup, names,
                             register, replay)
from nncompress.core.config import _coerce


@dataclasses.dataclass(frozen=True)
class _ScaleConfig(Config):
    factor: float = 2.0
    ratio: float = 0.5
    mode: str = "a"

    def __post_init__(self):
        check(0 <= self.ratio < 1, "ratio", f"must be in [0, 1), got {self.ratio}")


@register("_test_scale", config=_ScaleConfig)
def _scale(model, config, ctx):
    """Multiply selected Linear weights by factor (a test transform with an exact oracle)."""
    for name, m in ctx.targets.select(model):
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.mul_(config.factor)
            ctx.record.setdefault("scaled", []).append(name)
    return model


def test_register_sets_kind_and_lookup_finds_it():
    assert _ScaleConfig.kind == "_test_scale"
    assert lookup("_test_scale").fn is _scale
    assert "_test_scale" in names() and "finetune" in names()


def test_duplicate_names_raise():
    with pytest.raises(RegistryError, match="registered twice"):
        register("_test_scale", config=dataclasses.make_dataclass("Other", [], bases=(Config,), frozen=True))(lambda m, c, x: m)
    with pytest.raises(RegistryError, match="already the config"):
        register("_test_other", config=_ScaleConfig)(lambda m, c, x: m)


def test_unknown_name_lists_known_ones():
    with pytest.raises(RegistryError, match="unknown transform 'nope'; known: .*finetune"):
        lookup("nope")


def test_config_round_trip_and_errors_carry_paths():
    cfg = _ScaleConfig(factor=3.0, ratio=0.25)
    assert _ScaleConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["kind"] == "_test_scale"
    cases = {
        "stages[2].ratio: must be in [0, 1), got 1.5": {"ratio": 1.5},
        "stages[2].factor: expected a number, got 'x'": {"factor": "x"},
        "stages[2].colour: unknown field; _ScaleConfig takes factor, mode, ratio": {"colour": 1},
        "stages[2].mode: expected a string, got 3": {"mode": 3},
    }
    for message, raw in cases.items():
        with pytest.raises(ConfigError) as e:
            _ScaleConfig.from_dict(raw, "stages[2]")
        assert str(e.value) == message


def test_yaml_shaped_values_are_coerced():
    assert _coerce("1e-3", float, "lr") == pytest.approx(1e-3)
    assert _coerce([1, 2], tuple[int, ...], "b") == (1, 2)
    with pytest.raises(ConfigError, match=r"b\[1\]: expected an integer"):
        _coerce([1, "2"], tuple[int, ...], "b")
    with pytest.raises(ConfigError, match="expected true or false"):
        _coerce(1, bool, "flag")
    with pytest.raises(ConfigError, match="expected an integer"):
        _coerce(True, int, "n")


def _net():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 2))


def test_targets_select_by_glob_and_type():
    net = _net()
    assert [n for n, _ in Targets(types=("Linear",)).select(net)] == ["0", "2.0", "3"]
    assert [n for n, _ in Targets(include=("2.*",), types=(nn.Linear,)).select(net)] == ["2.0"]
    assert [n for n, _ in Targets(exclude=("3",), types=("Linear",)).select(net)] == ["0", "2.0"]
    with pytest.raises(TargetError, match="no class named 'Linaer'"):
        Targets(types=("Linaer",)).select(net)
    with pytest.raises(TargetError, match="'enc.*' matches no module"):
        Targets(include=("enc.*",)).select(net)


def test_apply_records_history_and_replay_reproduces_it():
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(3, 4)
    before = net(x)
    out = apply(net, _ScaleConfig(factor=2.0), targets=Targets(include=("3",)))
    # Scaling the last Linear's weight by 2 doubles the output minus the bias contribution.
    bias = net[3].bias
    torch.testing.assert_close(out(x) - bias, 2 * (before - bias))
    (entry,) = history(out)
    assert entry["config"]["kind"] == "_test_scale" and entry["record"] == {"scaled": ["3"]}
    fresh = _net()
    replayed = replay(fresh, history(out))
    assert history(replayed) == history(out)


def test_fit_reduces_loss_on_a_separable_problem():
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    model = nn.Linear(4, 2)
    losses = fit(model, loader, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                 TrainConfig(epochs=20, lr=0.05))
    assert len(losses) == 20
    assert losses[-1] < 0.5 * losses[0]
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95


def test_fit_max_steps_is_a_hard_budget():
    steps = []
    loader = [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))] * 10
    fit(nn.Linear(2, 2), loader, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        TrainConfig(epochs=5, max_steps=7), after_step=lambda m: steps.append(1))
    assert len(steps) == 7


def test_fit_stops_on_nan_with_a_clear_error():
    loader = [(torch.full((4, 2), math.nan), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1, step 1; lower the learning rate"):
        fit(nn.Linear(2, 2), loader, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), TrainConfig())


def test_train_config_validates():
    with pytest.raises(ConfigError, match="lr: must be > 0"):
        TrainConfig(lr=0)
    with pytest.raises(ConfigError, match="optimizer: must be one of"):
        TrainConfig.from_dict({"optimizer": "lamb"})


def test_zero_keeper_restores_pruned_zeros_only():
    import doctest

    import nncompress.core.zeros as zeros

    assert doctest.testmod(zeros).failed == 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.1] = 0.0   # pruned
    pruned = (model[0].weight == 0).clone()
    keep = zeros.zero_keeper(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(32, 16)).pow(2).mean().backward()
        opt.step()
        keep(model)
    assert torch.equal(model[0].weight == 0, pruned)                 # same zeros, no more, no fewer
    assert int((model[2].weight == 0).sum()) == 0                    # the dense layer was left alone


def test_a_signal_inside_a_deferred_section_is_raised_when_it_ends():
    import doctest
    import os
    import signal

    import nncompress.core.interrupts as interrupts
    from nncompress.cli import _signals_interrupt

    assert doctest.testmod(interrupts).failed == 0

    class Store:  # stands for a database client: each call must finish once started
        def __init__(self):
            self.done = []

        def write(self, item):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-call
            self.done.append(item)

        def _read(self):  # a library's wrapper calls private methods too (Optuna's cached storage)
            os.kill(os.getpid(), signal.SIGTERM)
            self.done.append("read")

    store = interrupts.shield_methods(Store())
    with _signals_interrupt() as received:
        with pytest.raises(KeyboardInterrupt):
            store.write("a")
        assert store.done == ["a"] and received == [signal.SIGTERM]  # completed, then raised
    with _signals_interrupt():
        with pytest.raises(KeyboardInterrupt):
            store._read()
    assert store.done == ["a", "read"]
    store.done.remove("read")
    with _signals_interrupt():
        with pytest.raises(KeyboardInterrupt), interrupts.deferred():
            with interrupts.interruptible():  # the window where an interrupt lands at once
                os.kill(os.getpid(), signal.SIGTERM)
            store.done.append("never")  # not reached
        assert store.done == ["a"]
