"""The study in Optuna storage, and what one worker does with it.

A search is two studies in one storage, named from the recipe (so the same recipe file resumes them):

- `NAME-KEY` (rung 1): the sampler's study. Each trial samples a point of the space and measures its
  recipe with the proxy caps (`search.proxy`, e.g. `epochs: 0`); when the caps change nothing the
  measurement is already the full recipe's (`exact`).
- `NAME-KEY-full` (rung 2): a queue. The baselines, and the points of the rung-1 Pareto front that
  were proxies (at most `search.promote`), are enqueued there and measured with the full recipe.
  Workers pop the queue through Optuna, so each item is measured once.

`--trials N` is the number of rung-1 trials of the whole study: workers stop when the study holds N
(completed, running, or failed with an error), so a resumed or a shared search continues to N.
A trial interrupted by Ctrl-C / SIGTERM is marked failed-interrupted and does not count: it is tried
again. Each trial's user attributes hold its point, the recipe it measured and the objectives.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

import numpy as np

from ..core.errors import NNCompressError
from ..core.interrupts import deferred, interruptible
from .evaluate import Evaluator, Objectives
from .front import Point, promising, spread
from .space import SearchSpec

DIRECTIONS = ["maximize", "minimize", "minimize"]  # quality, latency (x baseline), bytes
FULL = "-full"


def study_name(spec: SearchSpec) -> str:
    return f"{spec.name}-{spec.key()}"


def open_studies(spec: SearchSpec, storage: Any, trials: int, seed_offset: int = 0) -> tuple[Any, Any]:
    """(rung-1 study with its sampler, rung-2 queue), created or loaded."""
    import optuna

    name = study_name(spec)
    seed = int(np.random.SeedSequence([spec.as_written().seed, seed_offset]).generate_state(1)[0])
    if spec.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(population_size=max(4, min(50, trials // 3)), seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(n_startup_trials=max(2, min(10, trials // 3)), seed=seed,
                                             constant_liar=True)
    proxy = optuna.create_study(storage=storage, study_name=name, directions=DIRECTIONS, sampler=sampler,
                                load_if_exists=True)
    full = optuna.create_study(storage=storage, study_name=name + FULL, directions=DIRECTIONS,
                               sampler=optuna.samplers.RandomSampler(seed=seed), load_if_exists=True)
    return proxy, full


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def counted(study: Any) -> int:
    """Rung-1 trials that count toward --trials: completed, running, or failed with an error."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING) or \
                (t.state == TrialState.FAIL and "error" in t.user_attrs):
            n += 1
    return n


class Worker:
    """Runs rung-1 trials until the study holds `trials`, then the rung-2 queue.

    on_trial: called after each trial (progress bars)
    """

    def __init__(self, spec: SearchSpec, evaluator: Evaluator, proxy: Any, full: Any, trials: int,
                 log: Callable[[str], None] = lambda msg: None, heartbeat: bool = True):
        self.spec, self.evaluator, self.proxy, self.full, self.trials, self.log = \
            spec, evaluator, proxy, full, trials, log
        self.heartbeat = heartbeat  # the storage marks a dead worker's trials failed (RDB: yes; journal: no)
        self.me = worker_id()

    # ----------------------------------------------------------------------------------------- rung 1

    def run_proxy(self, on_trial: Callable[[], None] = lambda: None) -> None:
        while counted(self.proxy) < self.trials:
            _optimize_one(self.proxy, self._proxy_trial)
            on_trial()

    def _proxy_trial(self, trial: Any) -> tuple[float, float, float]:
        trial.set_user_attr("worker", self.me)
        point = self.spec.suggest(trial)
        trial.set_user_attr("point", point)
        same = _same_point(self.proxy, point, trial.number)
        if same is not None:  # a point already measured: its figures, not a second measurement
            trial.set_user_attr("duplicate_of", same.number)
            for key in ("recipe", "exact", "objectives"):
                trial.set_user_attr(key, same.user_attrs[key])
            return tuple(same.values)
        return self._measure(trial, lambda: self._proxy_recipe(trial, point))

    def _proxy_recipe(self, trial: Any, point: dict[str, Any]):
        full = self.spec.recipe(point)
        proxy = self.spec.proxy(full)
        trial.set_user_attr("exact", proxy.to_dict() == full.to_dict())
        return proxy

    def wait_for_others(self, study: Any, poll_s: float = 0.5) -> None:
        """Wait until no trial of `study` is running in another worker, so that what follows (the
        promotion, the report) sees every trial. A dead worker's trial stops counting as running
        once its heartbeat is older than the storage's grace period (storages without a heartbeat,
        such as a journal file, are not waited for)."""
        import optuna
        from optuna.trial import TrialState

        if not self.heartbeat:
            return
        told = False
        while True:
            optuna.storages.fail_stale_trials(study)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running:
                return
            if not told:
                self.log(f"waiting for {len(running)} trial(s) running in other workers")
                told = True
            time.sleep(poll_s)

    def release(self) -> None:
        """After an interrupt: mark this worker's trials still running as failed (interrupted), so a
        rerun counts them out at once instead of waiting for their heartbeat to go stale."""
        from optuna.trial import TrialState

        for study in (self.proxy, self.full):
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.user_attrs.get("worker") == self.me:
                    study.tell(t.number, state=TrialState.FAIL)

    # ----------------------------------------------------------------------------------------- rung 2

    def enqueue_baselines(self) -> None:
        for b in self.spec.baselines:
            self._enqueue(f"baseline:{b.name}", {"role": "baseline", "name": b.name, "values": b.values,
                                                 "drop": list(b.drop)})

    def promote(self) -> list[int]:
        """Enqueue the proxy points of the rung-1 front for the full recipe; returns their trial numbers."""
        chosen = spread([p for p in promising(proxy_points(self.proxy)) if not p.info["exact"]], self.spec.promote)
        for p in chosen:
            self._enqueue(f"trial:{p.info['trial']}", {"role": "promoted", "parent": p.info["trial"],
                                                       "point": p.info["point"]})
        return [p.info["trial"] for p in chosen]

    def run_full(self, on_trial: Callable[[], None] = lambda: None) -> None:
        from optuna.trial import TrialState

        while self.full.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            try:
                _optimize_one(self.full, self._full_trial)
            except Exception as e:  # noqa: BLE001 - only the race below is absorbed
                # SQLite cannot lock a row: two workers may pop the same queued item at once; the one
                # that finishes second finds it done. The item is measured, so go on with the queue.
                if not any(w in str(e) for w in ("Cannot tell a COMPLETE trial", "already finished")):
                    raise
            on_trial()

    def _full_trial(self, trial: Any) -> tuple[float, float, float]:
        import optuna

        attrs = trial.user_attrs
        if "key" not in attrs:  # the queued item was taken by another worker in the meantime
            raise optuna.TrialPruned()
        trial.set_user_attr("worker", self.me)
        if attrs["role"] == "baseline":
            return self._measure(trial, lambda: self.spec.recipe(attrs["values"], tuple(attrs["drop"])))
        return self._measure(trial, lambda: self.spec.recipe(attrs["point"]))

    def _enqueue(self, key: str, attrs: dict[str, Any]) -> None:
        from optuna.trial import TrialState

        for t in self.full.get_trials(deepcopy=False):
            if t.user_attrs.get("key") == key and (t.state != TrialState.FAIL or "error" in t.user_attrs):
                return  # queued, running, measured, or failed for a reason a retry would not change
        self.full.enqueue_trial({}, user_attrs={"key": key, **attrs})

    # -------------------------------------------------------------------------------------------- both

    def _measure(self, trial: Any, build: Callable[[], Any]) -> tuple[float, float, float]:
        try:
            recipe = build()
            trial.set_user_attr("recipe", recipe.to_dict())
            obj = self.evaluator.evaluate(recipe, f"trial_{trial.number}")
        except NNCompressError as e:
            trial.set_user_attr("error", str(e))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        trial.set_user_attr("objectives", obj.to_dict())
        return obj.values()


def _optimize_one(study: Any, objective: Callable[[Any], Any]) -> None:
    """One trial of `study`. Ctrl-C / SIGTERM takes effect only inside `objective`, where Optuna
    records the trial as failed before passing the interrupt on; arriving between Optuna's own steps
    (a trial created, its heartbeat not yet started) it would leave a trial running for ever."""
    def guarded(trial: Any) -> Any:
        with interruptible():
            return objective(trial)

    with deferred():
        study.optimize(guarded, n_trials=1, catch=(NNCompressError,))


def _same_point(study: Any, point: dict[str, Any], number: int) -> Any:
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != number and t.user_attrs.get("point") == point and "objectives" in t.user_attrs:
            return t
    return None


def as_point(t: Any, label: str) -> Point:
    obj = Objectives.from_dict(t.user_attrs["objectives"])
    return Point(label, obj.quality, obj.latency, obj.latency_ms, obj.bytes,
                 info={"trial": t.number, "point": t.user_attrs.get("point"), "exact": t.user_attrs.get("exact"),
                       "recipe": t.user_attrs.get("recipe"), "seconds": obj.seconds, "metrics": obj.metrics})


def proxy_points(study: Any) -> list[Point]:
    """Every distinct completed rung-1 measurement."""
    from optuna.trial import TrialState

    return [as_point(t, f"#{t.number}") for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "objectives" in t.user_attrs and "duplicate_of" not in t.user_attrs]
