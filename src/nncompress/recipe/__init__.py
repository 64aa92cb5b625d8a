"""Recipes: YAML -> validated stages -> run -> run directory with report, plots, model, manifest."""
from importlib import resources
from pathlib import Path

from .runner import RunInterrupted, RunResult, partial_dir, run_recipe
from .schema import (DataSpec, MeasureConfig, ModelSpec, Recipe, Stage, check_sources, load_recipe,
                     parse_recipe)


def demo_recipe_path() -> Path:
    """The packaged recipe `nncompress demo` runs."""
    return Path(str(resources.files(__package__) / "demo.yaml"))


__all__ = ["RunInterrupted", "RunResult", "partial_dir", "run_recipe", "DataSpec", "MeasureConfig", "ModelSpec",
           "Recipe", "Stage", "check_sources", "load_recipe", "parse_recipe", "demo_recipe_path"]
