"""Ctrl-C / SIGTERM held back across a section that must not stop halfway.

The CLI turns SIGINT and SIGTERM into `KeyboardInterrupt` in the main thread, wherever it happens to
be. Inside a database write (an Optuna study's commit) that leaves a transaction open and its lock
held, and the clean-up after the interrupt then waits on that lock. Code that must finish runs under
`deferred()`: a signal arriving inside it is raised when the outermost such section ends.
`interruptible()` opens a window inside a deferred section where a signal is raised at once (the
work a library runs under its own bookkeeping: Optuna's objective inside `study.optimize`).

>>> try:
...     with deferred():
...         print(interrupt_now())   # a signal arrives: held back
...         print("the write completes")
... except KeyboardInterrupt:
...     print("raised when the section ends")
False
the write completes
raised when the section ends
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator

__all__ = ["deferred", "interruptible", "interrupt_now", "shield_methods"]

_state = {"depth": 0, "pending": False}


def _main() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold back a signal's `KeyboardInterrupt` until this (outermost) section ends. Other threads
    (a heartbeat) pass through: signals reach the main thread only."""
    if not _main():
        yield
        return
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0 and _state["pending"]:
            _state["pending"] = False
            raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Inside `deferred()`, a stretch where a signal is raised at once, a signal held back until now
    included; the deferral resumes after it."""
    if not _main():
        yield
        return
    saved, _state["depth"] = _state["depth"], 0
    try:
        if _state["pending"]:
            _state["pending"] = False
            raise KeyboardInterrupt
        yield
    finally:
        _state["depth"] = saved


def interrupt_now() -> bool:
    """For a signal handler: True to raise `KeyboardInterrupt` now; False inside a `deferred()`
    section, which raises it when it ends."""
    if _state["depth"]:
        _state["pending"] = True
        return False
    return True


def shield_methods(obj: Any) -> Any:
    """Run every method of `obj` but its dunders under `deferred()` (set on the instance, so calls made
    by code that holds `obj`, a library included, are covered); returns `obj`.

    Private methods too: a library's wrapper calls them (Optuna's cached storage reads trials through
    `RDBStorage._get_trials`), and an interrupt while a query's rows are read leaves its SQLite cursor
    open, holding a read lock that blocks every later commit from another connection."""
    for name in dir(type(obj)):
        if name.startswith("__") or not callable(getattr(type(obj), name, None)):
            continue
        setattr(obj, name, _shielded(getattr(obj, name)))
    return obj


def _shielded(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with deferred():
            return method(*args, **kwargs)
    return call
