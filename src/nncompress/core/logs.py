"""Third-party chatter during a step nncompress explains itself: quiet while inside, restored after.

    with quiet_loggers("torch.fx.experimental.symbolic_shapes"):
        torch.export.export(...)     # a failure becomes one typed line, not a graph dump on stderr

`NNCOMPRESS_DEBUG=1` (set by the CLI's --debug) leaves every logger as it is.

>>> import logging
>>> log = logging.getLogger("some.library")
>>> with quiet_loggers("some.library"):
...     log.getEffectiveLevel() == logging.ERROR
True
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import Iterator

__all__ = ["quiet_loggers"]


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR, warnings_too: bool = True,
                  stderr: bool = False) -> Iterator[None]:
    """Raise the named loggers to `level` (and ignore Python warnings) inside the block; with `stderr`,
    also swallow what is printed to `sys.stderr` (torch.export prints a failed graph there)."""
    if os.environ.get("NNCOMPRESS_DEBUG"):
        yield
        return
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(level)
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            if warnings_too:
                warnings.simplefilter("ignore")
            if stderr:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)
