"""Mistakes made from Python get the same one-line typed errors as mistakes in a recipe."""
import pytest
import torch
import torch.nn as nn

import nncompress
from helpers import TinyData
from nncompress.core import ConfigError, Context, DataError, NNCompressError, TargetError, Targets
from nncompress.distill import FinetuneConfig
from nncompress.lowrank import LowRankConfig
from nncompress.prune import PruneConfig, SparsityConfig
from nncompress.quant import QuantizeConfig, QuantSpec


def _net():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and isinstance(error, NNCompressError)
    return text


def test_a_config_class_instead_of_an_instance():
    with pytest.raises(ConfigError) as info:
        nncompress.apply(_net(), PruneConfig)
    assert _one_line(info.value) == ("config: PruneConfig is a config class; pass an instance, e.g. "
                                     "apply(model, PruneConfig())")
    with pytest.raises(ConfigError, match="expected a config instance such as PruneConfig"):
        nncompress.apply(_net(), {"kind": "prune"})


@pytest.mark.parametrize("make,message", [
    (lambda: PruneConfig(ratio="half"), "ratio: expected a number, got 'half'"),
    (lambda: PruneConfig(overrides=["stem"]), "overrides: expected a mapping, got ['stem']"),
    (lambda: SparsityConfig(granularity=3), "granularity: expected a sparsity granularity"),
    (lambda: FinetuneConfig(epochs=1.5), "epochs: expected an integer, got 1.5"),
    (lambda: Targets(include="enc*"), "include: expected a list, got 'enc*'"),
    (lambda: QuantizeConfig(weight={"format": {"kind": "int", "bits": 1}}),
     "weight.format.bits: IntFormat takes 2..16 bits, got 1"),
])
def test_a_field_of_the_wrong_type_names_the_field(make, message):
    with pytest.raises(ConfigError) as info:
        make()
    assert _one_line(info.value).startswith(message)


def test_a_mapping_where_a_spec_goes_is_read_like_yaml():
    cfg = QuantizeConfig(weight={"format": {"kind": "int", "bits": 4}, "granularity": "per_channel"})
    assert cfg.weight == QuantSpec.from_dict({"format": {"kind": "int", "bits": 4}, "granularity": "per_channel"})


def test_targets_of_the_wrong_type_and_selections_that_match_nothing():
    with pytest.raises(ConfigError, match="targets: expected Targets"):
        nncompress.apply(_net(), LowRankConfig(rank=2), targets="0")
    out = nncompress.apply(_net(), LowRankConfig(rank=2), targets={"include": ["0"]})  # a mapping is read
    assert type(out[0]).__name__ == "LowRankLinear"
    with pytest.raises(TargetError) as info:
        nncompress.apply(_net(), LowRankConfig(rank=2), targets=Targets(include=("enc.*",)))
    assert _one_line(info.value).startswith("lowrank: targets.include: 'enc.*' matches no module")
    with pytest.raises(TargetError, match="^lowrank: targets.types: no class named 'Linaer'"):
        nncompress.apply(_net(), LowRankConfig(rank=2), targets=Targets(types=("Linaer",)))
    with pytest.raises(TargetError, match="^lowrank: no Linear/Conv layer among the targets \\(types=\\['ReLU'\\]\\)"):
        nncompress.apply(_net(), LowRankConfig(rank=2), targets=Targets(types=("ReLU",)))


@pytest.mark.parametrize("device,message", [
    ("cuda:7", "context.device: cuda:7 does not exist on this machine"),
    ("gpu", "context.device: 'gpu' is not a device"),
])
def test_a_device_that_does_not_exist(device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(ConfigError) as info:
        nncompress.apply(_net(), PruneConfig(ratio=0.5), context=Context(device=device))
    assert _one_line(info.value).startswith(message)


def test_labels_beyond_the_number_of_classes():
    x, y = torch.randn(16, 8), torch.arange(16) % 5          # labels 0..4, the model has 3 outputs
    with pytest.raises(DataError) as info:
        nncompress.apply(_net(), FinetuneConfig(epochs=1), context=Context(data=TinyData(x, y)))
    assert _one_line(info.value) == ("finetune: a label is 4 but the model outputs 3 classes (0..2); give the model "
                                     "num_classes=5 or check the data's labels")
