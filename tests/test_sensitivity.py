"""Sensitivity analysis: dead layers are flat, live ones degrade, residual pairs are one unit,
ratios_for keeps the threshold and hits the target, CSV and PNG are what they claim."""
import copy
import csv
import doctest
import importlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import nncompress
from nncompress.analysis import SensitivityResult, channel_units, sensitivity
from nncompress.core import ConfigError, TrainConfig, fit
from nncompress.eval import accuracy
from nncompress.prune import PruneConfig
from nncompress.zoo.data import DataBundle

RATIOS = (0.0, 0.3, 0.6, 0.9)


class Tiny(nn.Module):
    """fc0 -> fc1 (+ fc2 residual) -> head, plus a dead path whose weights cannot matter."""

    def __init__(self):
        super().__init__()
        self.input_shape = (8,)
        self.fc0 = nn.Linear(8, 12)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.dead = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(torch.relu(self.fc0(x))))  # (N, 16)
        r = h + self.fc2(h)  # (N, 16): fc1's and fc2's output channels are coupled by the add
        return self.head(r) + 0.0 * self.dead(r)  # (N, 4); 0 * finite is exactly 0


def _bundle(task: str = "classification") -> DataBundle:
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(8, 4, generator=gen)
    x = torch.randn(1536, 8, generator=gen)
    y = (x @ proj).argmax(1)  # linearly separable 4-class labels
    train, test = TensorDataset(x[:1024], y[:1024]), TensorDataset(x[1024:], y[1024:])
    loaders = (DataLoader(train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)),
               DataLoader(test, batch_size=128), DataLoader(train, batch_size=128))
    return DataBundle(*loaders, task=task, num_classes=4, name="tiny")


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model, data = Tiny(), _bundle()
    fit(model, data.train, lambda m, b: F.cross_entropy(m(b[0]), b[1]), TrainConfig(epochs=15, lr=1e-2))
    assert accuracy(model, data.test) > 0.9  # a model worth pruning
    return model.eval(), data


@pytest.fixture(scope="module")
def element_result(trained):
    model, data = trained
    return sensitivity(model, data, ratios=RATIOS, unit="element", max_batches=3)


def test_dead_layer_is_flat_and_live_layer_degrades(trained, element_result):
    model, _ = trained
    r = element_result
    assert r.units == ["fc0", "fc1", "fc2", "head", "dead"]
    assert r.drop("dead") == (0.0,) * len(RATIOS)  # exactly: its output is multiplied by 0
    fc0 = r.drop("fc0")
    assert fc0[0] == 0.0 and fc0[-1] > 0.2
    assert all(b >= a - 0.03 for a, b in zip(fc0, fc0[1:]))  # grows with the ratio (up to test noise)
    assert r.most_sensitive()[-1] == "dead"
    assert r.params["fc1"] == 16 * 12 and r.metric == "accuracy"


def test_analysis_leaves_the_model_unchanged(trained, element_result):
    model, data = trained
    before = copy.deepcopy(model.state_dict())
    sensitivity(model, data, ratios=(0.0, 0.9), unit="channel", max_batches=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert accuracy(model, data.test) > 0.9


def test_residual_pair_is_one_unit_and_pruning_it_prunes_both(trained):
    model, data = trained
    r = sensitivity(model, data, ratios=RATIOS, unit="channel", max_batches=3)
    assert r.units == ["fc0", "fc1"]  # fc2 is not a unit of its own; head/dead feed the model output
    assert r.members["fc1"] == ("fc1", "fc2")
    # owned parameters, counted: fc0 rows (8 + bias); fc1 rows (12 + bias) and fc2 rows (16 + bias)
    assert r.params == {"fc0": 12 * 9, "fc1": 16 * 13 + 16 * 17}
    unit = {u.name: u for u in channel_units(model, data)}["fc1"]
    pruned = unit.pruned(model, 0.6)  # int(0.6 * 16) = 9 channels go from every member
    assert (pruned.fc1.out_features, pruned.fc2.out_features, pruned.fc2.in_features,
            pruned.head.in_features, pruned.dead.in_features) == (7, 7, 7, 7, 7)
    assert model.fc1.out_features == 16
    batches = [b for _, b in zip(range(3), data.test)]
    assert r.quality["fc1"][RATIOS.index(0.6)] == accuracy(pruned, batches)  # the curve is that model's
    assert r.drop("fc1")[-1] > 0.05  # the coupled pair does not look falsely robust


def test_embedding_quality_is_cosine_to_the_unpruned_outputs(trained):
    model, _ = trained
    x = _bundle().test.dataset.tensors[0]
    data = DataBundle(train=None, test=DataLoader(x, batch_size=128), calib=DataLoader(x[:4]), task="embedding")
    r = sensitivity(model, data, ratios=(0.0, 0.9), unit="element", targets=nncompress.Targets(include=("fc0", "dead")))
    assert r.metric == "cosine" and r.baseline == pytest.approx(1.0, abs=1e-12)
    assert r.drop("dead") == (0.0, 0.0) and r.drop("fc0")[1] > 0.01


def test_ratios_for_keeps_the_threshold_and_hits_the_target():
    q = {"robust": (1.0, 1.0, 0.99, 0.98), "mid": (1.0, 0.99, 0.9, 0.5), "fragile": (1.0, 0.7, 0.4, 0.2)}
    r = SensitivityResult("channel", "accuracy", RATIOS, 1.0, q, {"robust": 300, "mid": 100, "fragile": 50},
                          {u: (u,) for u in q})
    caps = {u: r.max_ratio(u, 0.05) for u in q}
    assert caps == {"robust": 0.9, "mid": 0.3, "fragile": 0.0}
    for target in (0.1, 0.3, 0.5):
        ratios = r.ratios_for(target, threshold=0.05)
        assert all(ratios[u] <= caps[u] + 1e-12 for u in q)
        assert r.overall_sparsity(ratios) == pytest.approx(target, abs=1e-5)
        assert ratios["fragile"] == 0.0
    with pytest.warns(UserWarning, match="allows only"):
        assert r.ratios_for(0.9, threshold=0.05) == caps  # unreachable: the threshold wins
    with pytest.raises(ConfigError):
        r.ratios_for(1.5, threshold=0.05)


def test_ratios_for_feeds_prune_config_overrides(trained):
    model, data = trained
    r = sensitivity(model, data, ratios=RATIOS, unit="channel", max_batches=3)
    caps = {u: r.max_ratio(u, 0.02) for u in r.units}
    target = 0.5 * r.overall_sparsity(caps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ratios = r.ratios_for(target, threshold=0.02)
    assert r.overall_sparsity(ratios) == pytest.approx(target, abs=1e-5)
    pruned = nncompress.apply(copy.deepcopy(model), PruneConfig(ratio=0.0, overrides=ratios))
    assert pruned.fc0.out_features == 12 - int(ratios["fc0"] * 12)
    assert pruned.fc2.out_features == pruned.fc1.out_features == 16 - int(ratios["fc1"] * 16)
    realised = (r.params["fc0"] * (12 - pruned.fc0.out_features) / 12
                + r.params["fc1"] * (16 - pruned.fc1.out_features) / 16) / sum(r.params.values())
    assert abs(realised - target) <= 1 / 12  # channel counts are floored: within one channel


def test_csv_has_every_unit_and_ratio(element_result, tmp_path):
    r = element_result
    path = r.to_csv(tmp_path / "sens.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["unit", "ratio", "quality", "drop"]
    assert len(rows) == len(r.units) * len(RATIOS)
    for row, (u, ratio, q, d) in zip(rows, r.rows()):
        assert row["unit"] == u and float(row["ratio"]) == pytest.approx(ratio)
        assert float(row["quality"]) == pytest.approx(q, abs=1e-9)
        assert float(row["drop"]) == pytest.approx(r.baseline - q, abs=1e-9)
    assert [p.name for p in tmp_path.iterdir()] == ["sens.csv"]  # no temporary file left behind


def test_png_is_a_png(element_result, tmp_path):
    path = element_result.plot_png(tmp_path / "sens.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100
    assert [p.name for p in tmp_path.iterdir()] == ["sens.png"]


def test_typed_errors(trained):
    model, data = trained
    with pytest.raises(ConfigError, match="ratios"):
        sensitivity(model, data, ratios=(0.5, 0.1))
    with pytest.raises(ConfigError, match="importance"):
        sensitivity(model, data, ratios=(0.0,), importance="taylor")
    with pytest.raises(ConfigError, match="unit"):
        sensitivity(model, data, unit="row")


def test_docstring_examples_run():
    module = importlib.import_module("nncompress.analysis.sensitivity")
    assert doctest.testmod(module).failed == 0
