"""Recipe validation: every error path reports its YAML path before anything runs."""
import textwrap

import pytest

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
    (with_stage(optimizer="lamb"), "stages[0].optimizer: must be one of 'adam', 'adamw', 'sgd'"),
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
