"""Partial runs: where an unfinished run keeps what it completed, and how `--resume` reads it back.

A run lives in the hidden folder `.OUT.partial` beside OUT until it finishes (`partial_dir`): the
resolved recipe, each completed stage's folder, `progress.json` (the one file that says which stages
are complete, with their report rows) and `owner` (the process running it). See `runner`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml

from ..core.errors import NNCompressError
from ..eval.report import Report
from ..export.atomic import atomic_dir, atomic_write_text, current_owner, owner_alive, scratch_dir
from .measure import Measurer
from .schema import Recipe, load_recipe, recipe_difference

PROGRESS = "progress.json"
OWNER = "owner"
_PROGRESS_FORMAT = "nncompress.partial-run/1"


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (or SIGTERM under the CLI). `partial` holds what it completed, or is
    None when nothing was; `run_recipe(recipe, out, resume=True)` continues it."""

    def __init__(self, message: str, out: Path, partial: Path | None):
        super().__init__(message)
        self.out, self.partial = out, partial


def partial_dir(out: str | Path) -> Path:
    """Where the run that will finish as `out` keeps what it completed until then.

    >>> partial_dir("runs/digits").as_posix()
    'runs/.digits.partial'
    """
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def interrupted_note(path: str | Path) -> str | None:
    """A one-line note when `path` is a run that was interrupted (or its partial folder), else None."""
    path = Path(path)
    if path.name.startswith(".") and path.name.endswith(".partial"):
        path = path.parent / path.name[1:-len(".partial")]
    if not (partial_dir(path) / PROGRESS).is_file():
        return None
    return (f"{path}: the run was interrupted and is not finished; continue it with "
            f"`nncompress run --resume {path}`")


def interrupted_recipe(out: str | Path) -> Recipe:
    """The recipe of the interrupted run that was to finish as `out` (what `--resume` continues)."""
    return load_recipe(_resumable(Path(out)) / "recipe.yaml")


def _resumable(final: Path) -> Path:
    if final.exists():
        raise NNCompressError(f"{final}: the run is already complete; nothing to resume "
                              f"(`nncompress report {final}` prints it)")
    path = partial_dir(final)
    if not (path / PROGRESS).is_file():
        raise NNCompressError(f"{final}: no interrupted run to resume (no {path.name} beside it); "
                              f"start one with `nncompress run RECIPE --out {final}`")
    return path


@dataclasses.dataclass
class PartialRun:
    """The folder of an unfinished run and what it has completed: the report rows (baseline first,
    then one per stage in recipe order) and the measurer's state the later stages need."""

    path: Path
    report: Report = dataclasses.field(default_factory=Report)
    warnings: list[str] = dataclasses.field(default_factory=list)
    baseline_onnx: str | None = None  # file name in the baseline's folder: later ONNX timings compare with it

    @property
    def stages_done(self) -> int:
        return max(len(self.report.stages) - 1, 0)

    def checkpoint(self, label: str) -> Path:
        return self.path / "stages" / _folder(label) / "checkpoint"

    @classmethod
    def start(cls, final: Path, recipe: Recipe) -> "PartialRun":
        path = partial_dir(final)
        if final.exists():
            raise NNCompressError(f"{final}: output folder already exists; choose another --out or remove it")
        if path.exists():
            _check_not_running(final, path)
            raise NNCompressError(f"{final}: an interrupted run of it is kept in {path}; continue it with "
                                  f"`nncompress run --resume {final}` or remove that folder")
        run = cls(path)
        with atomic_dir(path) as tmp:  # whole or absent: never a partial folder without its recipe
            (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            run._write_progress(tmp)
            atomic_write_text(tmp / OWNER, "%d %s\n" % current_owner())
        return run

    @classmethod
    def reopen(cls, final: Path, recipe: Recipe, log) -> "PartialRun":
        path = _resumable(final)
        _check_not_running(final, path)
        where = recipe_difference(interrupted_recipe(final), recipe)
        if where is not None:
            raise NNCompressError(f"{final}: the recipe differs from the interrupted run's at {where}; resume "
                                  f"with the recipe it started with ({path / 'recipe.yaml'}) or start a new run")
        run = cls._read(path, recipe)
        run._drop_uncommitted(log)
        atomic_write_text(path / OWNER, "%d %s\n" % current_owner())
        return run

    @classmethod
    def peek(cls, final: Path, recipe: Recipe) -> "PartialRun":
        """The interrupted run's state, read only (a torchrun rank other than 0 resuming beside rank 0)."""
        return cls._read(_resumable(final), recipe)

    @classmethod
    def _read(cls, path: Path, recipe: Recipe) -> "PartialRun":
        state = _read_progress(path)
        report = Report.from_json(json.dumps(state["report"]))
        expected = ["baseline"] + [s.label for s in recipe.stages]
        labels = [s.stage for s in report.stages]
        if labels != expected[:len(labels)]:
            raise NNCompressError(f"{path / PROGRESS}: completed stages {labels} do not match the recipe's "
                                  f"{expected}; remove {path} and run again")
        return cls(path, report, list(state.get("warnings", [])), state.get("baseline_onnx"))

    def _write_progress(self, folder: Path | None = None) -> None:
        """Replace `progress.json` in one rename: the moment a stage counts as complete."""
        state = {"format": _PROGRESS_FORMAT, "report": json.loads(self.report.to_json()),
                 "warnings": self.warnings, "baseline_onnx": self.baseline_onnx}
        atomic_write_text((folder or self.path) / PROGRESS, json.dumps(state, indent=2))

    def _drop_uncommitted(self, log) -> None:
        """Remove what an interruption left that `progress.json` does not count: a stage folder
        renamed into place just before the kill, the finished-run files, scratch temporaries."""
        keep = {"recipe.yaml", PROGRESS, OWNER, "stages"}
        done = {_folder(s.stage) for s in self.report.stages}
        leftovers = [p for p in self.path.iterdir() if p.name not in keep]
        if (self.path / "stages").is_dir():
            leftovers += [p for p in (self.path / "stages").iterdir() if p.name not in done]
        for p in leftovers:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            log(f"removed {p} (left unfinished by the interrupted run)")

    def restore(self, measurer: Measurer) -> None:
        """Give `measurer` what measuring the completed stages taught it."""
        measurer.warnings[:] = self.warnings
        if self.baseline_onnx:
            measurer.baseline_onnx = self.path / "stages" / _folder("baseline") / self.baseline_onnx

    def measure(self, measurer: Measurer, model: nn.Module, label: str, kind: str, seconds: float) -> None:
        """Measure one stage into a scratch folder, rename its folder into place, then count it done."""
        final = self.path / "stages" / _folder(label)
        with scratch_dir(final) as scratch:
            measurer.out = scratch  # the measurer writes OUT/stages/<folder>/
            try:
                row = measurer.measure(model, label, kind, seconds)
            finally:
                measurer.out = self.path
            os.replace(scratch / "stages" / final.name, final)
        if label == "baseline" and measurer.baseline_onnx is not None:
            self.baseline_onnx = measurer.baseline_onnx.name
            measurer.baseline_onnx = final / self.baseline_onnx
        self.report.add(row)
        self.warnings = list(measurer.warnings)
        self._write_progress()

    def interrupted(self, final: Path, total: int) -> RunInterrupted:
        """What to raise when the run is interrupted: the partial folder is kept when it holds anything."""
        self.release()
        # progress.json, not memory: the interrupt may have landed between the two
        done = [s["stage"] for s in _read_progress(self.path)["report"]["stages"]]
        if not done:
            self.discard()
            return RunInterrupted("before the baseline was measured; nothing kept", final, None)
        return RunInterrupted(f"after {done[-1]} ({len(done) - 1} of {total} stages done), kept in {self.path}; "
                              f"resume with: nncompress run --resume {final}", final, self.path)

    def release(self) -> None:
        (self.path / OWNER).unlink(missing_ok=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def publish(self, final: Path) -> None:
        """Rename the finished run to `final` (one rename: the run directory appears whole), then
        drop the bookkeeping only an unfinished run needs."""
        os.replace(self.path, final)
        for name in (PROGRESS, OWNER):
            (final / name).unlink(missing_ok=True)


def _read_progress(path: Path) -> dict[str, Any]:
    file = path / PROGRESS
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise NNCompressError(f"{file}: unreadable ({e}); remove {path} and run again") from None
    if not isinstance(state, dict) or state.get("format") != _PROGRESS_FORMAT or "report" not in state:
        raise NNCompressError(f"{file}: not a progress file of this nncompress; remove {path} and run again")
    return state


def _folder(label: str) -> str:
    """The folder under stages/ of a report row (as `Measurer.measure` names it)."""
    return "00_baseline" if label == "baseline" else label


def _check_not_running(final: Path, path: Path) -> None:
    try:
        pid, host = (path / OWNER).read_text().split()
        owner = (int(pid), host)
    except (OSError, ValueError):
        return  # no owner: the run that wrote it has ended
    if owner != current_owner() and owner_alive(*owner):
        raise NNCompressError(f"{final}: process {owner[0]} is running it now ({path}); wait for it to "
                              f"finish or stop it, or choose another --out")
