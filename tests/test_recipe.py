"""Recipe validation: every error path reports its YAML path before anything runs."""
import textwrap

import pytest
import torch

from nncompress.core import ConfigError, NNCompressError
from nncompress.recipe import demo_recipe_path, load_recipe, parse_recipe

GOOD = {
    "name": "t",
    "model": {"name": "mlp", "kwargs": {"in_features": 64}},
    "data": "digits",
    "stages": [{"kind": "finetune", "epochs": 1, "kd_alpha": 0.5, "targets": {"types": ["Linear"]}}],
}


def with_stage(**fields):
    return {**GOOD, "stages": [{"kind": "finetune", **fields}]}


@pytest.mark.parametrize("raw, message", [
    (with_stage(kd_alpha=1.5), "stages[0].kd_alpha: must be in [0, 1], got 1.5"),
    (with_stage(epochs="two"), "stages[0].epochs: expected an integer, got 'two'"),
    (with_stage(epoch=1), "stages[0].epoch: unknown field; FinetuneConfig takes"),
    (with_stage(optimizer="lamb"), "stages[0].optimizer: must be one of 'adam', "),
    (with_stage(targets={"types": "Linear"}), "stages[0].targets.types: expected a list"),
    ({**GOOD, "stages": [{"kind": "prune_everything"}]}, "stages[0].kind: unknown stage kind 'prune_everything'; known:"),
    ({**GOOD, "stages": [{"epochs": 1}]}, "stages[0].kind: missing; one of:"),
    ({**GOOD, "stages": ["finetune"]}, "stages[0]: a stage is a mapping"),
    ({**GOOD, "stages": {"kind": "finetune"}}, "stages: expected a list of stages"),
    ({**GOOD, "measure": {"threads": 0}}, "measure.threads: must be > 0, got 0"),
    ({**GOOD, "measure": {"batch_sizes": [1, -4]}}, "measure.batch_sizes: must be a non-empty list"),
    ({**GOOD, "model": {"name": "mlp", "pretrain": {"lr": -1}}}, "model.pretrain.lr: must be > 0, got -1.0"),
    ({**GOOD, "model": {"nam": "mlp"}}, "model.nam: unknown field"),
    ({**GOOD, "evaluate": {}}, "evaluate: unknown recipe section"),
    ({**GOOD, "seed": "x"}, "seed: expected an integer"),
    ({**GOOD, "seed": -1}, "seed: must be in [0, 2**32), got -1"),
    ({**GOOD, "measure": {"device": "tpu"}}, "measure.device: must be one of 'cpu', 'cuda'"),
    ([1, 2], "a recipe is a mapping"),
])
def test_invalid_recipes_name_the_yaml_path(raw, message):
    with pytest.raises(ConfigError) as e:
        parse_recipe(raw)
    assert message in str(e.value)


def test_valid_recipe_resolves_defaults_and_round_trips():
    recipe = parse_recipe(GOOD)
    assert recipe.model.name == "mlp" and recipe.data.name == "digits"
    assert recipe.stages[0].config.kind == "finetune" and recipe.stages[0].targets.types == ("Linear",)
    assert recipe.measure.batch_sizes == (1, 256)
    again = parse_recipe(recipe.to_dict())
    assert again == recipe


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        name: bad
        stages:
          - kind: finetune
            epochs: [1
        """))
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: malformed YAML"):
        load_recipe(path)


def test_missing_recipe_file():
    with pytest.raises(NNCompressError, match="nope.yaml: recipe file not found"):
        load_recipe("nope.yaml")


def test_packaged_demo_recipe_is_valid():
    recipe = load_recipe(demo_recipe_path())
    assert recipe.model.name == "mnist1d_cnn" and recipe.model.pretrain is not None
    assert [s.config.kind for s in recipe.stages]


def progressive(**fields):
    entry = {"kind": "progressive", "vary": "ratio", "values": [0.5, 0.75, 0.9],
             "stage": {"kind": "sparsify", "ratio": 0.9}, "recover": [{"kind": "finetune", "epochs": 1}], **fields}
    return {**GOOD, "stages": [{"kind": "finetune", "epochs": 1}, entry]}


def test_progressive_expands_into_steps_with_recovery():
    recipe = parse_recipe(progressive())
    kinds = [s.config.kind for s in recipe.stages]
    assert kinds == ["finetune"] + ["sparsify", "finetune"] * 3
    assert [s.config.ratio for s in recipe.stages if s.config.kind == "sparsify"] == [0.5, 0.75, 0.9]
    assert [s.index for s in recipe.stages] == list(range(7))
    assert parse_recipe(recipe.to_dict()) == recipe  # the resolved recipe is plain stages


def test_progressive_varies_a_nested_field():
    stage = {"kind": "quantize", "weight": {"format": {"kind": "int", "bits": 8}}}
    recipe = parse_recipe(progressive(vary="weight.format.bits", values=[8, 4], stage=stage, recover=[]))
    assert [s.config.weight.format.bits for s in recipe.stages[1:]] == [8, 4]


@pytest.mark.parametrize("fields, message", [
    ({"values": [0.5]}, "stages[1].values: must list at least two step values"),
    ({"vary": ""}, "stages[1].vary: must name the field"),
    ({"stage": "sparsify"}, "stages[1].stage: must be one stage mapping"),
    ({"steps": 3}, "stages[1].steps: unknown field; a progressive entry has"),
    ({"values": [0.5, 1.5]}, "stages[1].values[1].ratio: must be in"),
    ({"vary": "ratio.inner"}, "stages[1].stage.ratio: vary names a nested field"),
    ({"recover": [{"kind": "finetune", "epochs": -1}]}, "stages[1].recover[0].epochs: must be >= 0"),
])
def test_progressive_errors_name_the_yaml_path(fields, message):
    with pytest.raises(ConfigError) as e:
        parse_recipe(progressive(**fields))
    assert message in str(e.value)


def test_cuda_without_a_gpu_fails_validation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^measure.device: cuda is not available on this machine .*; use device: cpu$"):
        parse_recipe({**GOOD, "measure": {"device": "cuda"}})


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nseed: 1\nname: b\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 3, column 1: key 'name' given twice in one mapping "
                                          r"\(first on line 1\); YAML would keep only the last, so remove one"):
        load_recipe(path)
    path.write_text("name: a\nstages: [{kind: finetune, epochs: 1, epochs: 2}]\n")  # same line, flow style
    with pytest.raises(ConfigError, match="key 'epochs' given twice"):
        load_recipe(path)
