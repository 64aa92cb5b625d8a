"""`run_search`: the search from a recipe to its output folder.

1. validate the recipe and its `search:` section, the output folder and the storage (before any work)
2. prepare the recipe's model (pretrained or cached) and measure it: the reference of every ratio
3. probe: the recipe as written must run on the model (a model with nothing a stage can compress is
   reported here, naming the stage, not after N failed trials)
4. rung 1: trials until the study holds `trials`; then rung 2: the baselines and the promoted points
   (worker processes, `workers > 1`, share the study through its storage)
5. read the study back, apply the goal, write the folder (report, plot, front recipes) whole
"""
from __future__ import annotations

import multiprocessing
import signal
import time
from pathlib import Path
from typing import Any, Callable

from ..core.errors import ConfigError, NNCompressError
from ..core.interrupts import interrupt_now
from ..core.logs import quiet_loggers
from ..eval.report import run_info
from ..recipe.runner import check_out_dir, default_cache_dir
from ..recipe.schema import read_recipe_yaml
from .evaluate import Evaluator
from .front import Goal, choose, pareto_front, quality_text
from .report import check_out, write_output
from .results import SearchResult, collect
from .space import SearchSpec, parse_search
from .storage import QUIET, default_storage, display_url, open_storage
from .study import Worker, counted, open_studies, proxy_points


class SearchError(NNCompressError):
    """A search that cannot start: the recipe as written fails on its model, or a worker failed."""


class SearchInterrupted(KeyboardInterrupt):
    """A search stopped by Ctrl-C or SIGTERM: the study keeps every completed trial; rerun to resume."""


def load_search(path: str | Path) -> SearchSpec:
    """Read and validate a recipe file with a `search:` section."""
    raw = read_recipe_yaml(path)
    if isinstance(raw, dict):
        raw = {"name": Path(path).stem, **raw}
        if "search" not in raw:
            raise ConfigError("search", f"{path}: the recipe has no search section; add one, e.g. "
                              "`search: {space: {stages[0].ratio: [0.3, 0.5]}}` (README: nncompress search)")
    return parse_search(raw)


def run_search(spec: SearchSpec, trials: int, out: str | Path, *, storage: str | None = None, goal: Goal = Goal(),
               workers: int = 1, cache_dir: str | Path | None = None, progress: bool = True,
               log: Callable[[str], None] = print, trust_code: bool = False) -> SearchResult:
    """Search `spec`'s space for `trials` rung-1 trials (study-wide), then write `out`.

    storage: an Optuna storage URL or file (default: `OUT.study.db` beside `out`, kept to resume)
    """
    start = time.perf_counter()
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError("--trials", f"must be a positive integer, got {trials!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError("--workers", f"must be a positive integer, got {workers!r}")
    out = Path(out)
    check_out(out)
    check_out_dir(out)
    url = storage or default_storage(out)
    recipe = spec.as_written()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    import optuna  # noqa: F401  (its first import sets its logger's level: import it before quieting it)
    with quiet_loggers(*QUIET):
        store = open_storage(url)
        proxy, full = open_studies(spec, store, trials)
        log(f"study {proxy.study_name} in {display_url(url)}: {counted(proxy)} of {trials} trials done")
        evaluator = Evaluator(recipe, cache, progress=progress, log=log, trust_code=trust_code, runtime=spec.runtime)
        reference = evaluator.reference()
        _probe(spec, evaluator, proxy)
        worker = Worker(spec, evaluator, proxy, full, trials, log, heartbeat=_heartbeat(store))
        worker.enqueue_baselines()
        children = _spawn(spec, url, trials, cache, trust_code, workers - 1)
        try:
            _work(worker, progress, goal, reference)
            _join(children)
        except KeyboardInterrupt as e:
            _stop(children)
            worker.release()
            raise SearchInterrupted(f"after {counted(proxy)} of {trials} trials; the study is kept in "
                                    f"{display_url(url)}: rerun the same command to resume") from e
        result = collect(spec, proxy, full, reference, goal, display_url(url),
                         run_info(threads=recipe.measure.threads, device=recipe.measure.device))
    write_output(result, out, time.perf_counter() - start)
    return result


def _heartbeat(store: Any) -> bool:
    import optuna
    return isinstance(store, optuna.storages.RDBStorage)  # opened with a heartbeat (storage.open_storage)


def _probe(spec: SearchSpec, evaluator: Evaluator, study: Any) -> None:
    if study.user_attrs.get("probed"):
        return
    recipe = spec.proxy(spec.as_written())
    try:
        evaluator.build(recipe)
    except NNCompressError as e:
        raise SearchError(f"{spec.name}: the recipe as written fails on model {recipe.model.name!r}, so there is "
                          f"nothing to search around it: {e}") from None
    study.set_user_attr("probed", True)


def _work(worker: Worker, progress: bool, goal: Goal, reference: Any) -> None:
    from tqdm import tqdm

    from .results import reference_point

    ref = reference_point(reference)
    with tqdm(total=worker.trials, initial=min(counted(worker.proxy), worker.trials), desc="search rung 1",
              disable=not progress, unit="trial") as bar:
        def tick() -> None:
            bar.n = min(counted(worker.proxy), worker.trials)
            bar.set_postfix_str(_best(worker, goal, ref), refresh=True)
        worker.run_proxy(tick)
    worker.wait_for_others(worker.proxy)
    promoted = worker.promote()
    worker.log(f"rung 2: full recipe for proxy-front trials {promoted or 'none'} and the baselines")
    with tqdm(desc="search rung 2", disable=not progress, unit="recipe") as bar:
        worker.run_full(lambda: bar.update(1))
    worker.wait_for_others(worker.full)


def _best(worker: Worker, goal: Goal, ref: Any) -> str:
    """The best point so far (rung-1 figures), for the progress bar."""
    front = pareto_front(proxy_points(worker.proxy))
    if not front:
        return "no point measured yet"
    verdict = choose(goal, front, ref)
    label = verdict.picks[0][1] if verdict.picks else None
    best = next((p for p in front if p.label == label), None) or max(front, key=lambda p: p.quality)
    q = quality_text(ref.info["quality_name"], best.quality)
    return f"front {len(front)} · best {best.label}: {q}, {best.latency:.2f}x latency, {best.bytes / 1e3:.1f} kB"


# ------------------------------------------------------------------------------------- worker processes

def _spawn(spec: SearchSpec, url: str, trials: int, cache: Path, trust_code: bool, n: int) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch threads or locks inherited
    procs = [ctx.Process(target=worker_main, args=(spec, url, trials, str(cache), trust_code, i + 1), daemon=False)
             for i in range(n)]
    for p in procs:
        p.start()
    return procs


def _interrupt(signum: int, frame: Any) -> None:
    if interrupt_now():  # else raised when the storage write under way ends
        raise KeyboardInterrupt


def worker_main(spec: SearchSpec, url: str, trials: int, cache: str, trust_code: bool, index: int) -> None:
    """A worker process: its own evaluator, the same study; SIGTERM stops it as Ctrl-C does."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _interrupt)
    import optuna  # noqa: F401  (see run_search)
    worker = None
    try:
        with quiet_loggers(*QUIET):
            store = open_storage(url)
            proxy, full = open_studies(spec, store, trials, seed_offset=index)
            evaluator = Evaluator(spec.as_written(), Path(cache), trust_code=trust_code, runtime=spec.runtime)
            worker = Worker(spec, evaluator, proxy, full, trials, heartbeat=_heartbeat(store))
            worker.run_proxy()
            worker.wait_for_others(proxy)
            worker.promote()
            worker.run_full()
    except KeyboardInterrupt:
        if worker is not None:
            worker.release()
        raise SystemExit(130) from None


def _join(children: list[Any]) -> None:
    for p in children:
        p.join()
    failed = [p.exitcode for p in children if p.exitcode != 0]
    if failed:
        raise SearchError(f"{len(failed)} worker process(es) failed (exit codes {failed}); the study keeps what "
                          "they completed: rerun to resume, with --debug for the cause")


def _stop(children: list[Any]) -> None:
    for p in children:
        if p.is_alive():
            p.terminate()  # SIGTERM: the worker marks its running trial interrupted and exits
    for p in children:
        p.join(timeout=30)
