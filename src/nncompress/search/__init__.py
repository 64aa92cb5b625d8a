"""Multi-objective search over a recipe's space: candidates -> recipes -> measured objectives -> Pareto front.

A recipe's `search:` section declares the space (see `space`); every candidate is a concrete recipe run
through the recipe machinery (`recipe.runner.prepare`, `apply_stage`) and measured like a run's stage:
quality on the test split, torch latency timed interleaved with the uncompressed model, bytes on disk.
The study lives in Optuna storage (`storage`), so a search resumes after an interruption and several
worker processes or machines share it (`study`). Goals pick from the front (`front`); the output
folder holds the report, the plot and every front point as a runnable recipe (`report`).
"""
from .front import Goal, Point, parse_goal, pareto_front
from .results import SearchResult
from .run import SearchError, SearchInterrupted, load_search, run_search
from .space import SearchSpec, parse_search
from .storage import StorageError, default_storage

__all__ = ["Goal", "Point", "parse_goal", "pareto_front", "SearchResult", "SearchError", "SearchInterrupted",
           "load_search", "run_search", "SearchSpec", "parse_search", "StorageError", "default_storage"]
