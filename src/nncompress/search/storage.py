"""Where a search keeps its study: any storage Optuna opens, so a search resumes and workers share it.

- a database URL SQLAlchemy knows (`sqlite:///runs/s.study.db`, `postgresql://user@host/db`, ...),
  opened as Optuna's RDB storage with a heartbeat: a trial whose worker died (SIGKILL, a lost machine)
  is marked failed once its heartbeat is older than the grace period, and its point is tried again
- a file path ending in `.db`, `.sqlite` or `.sqlite3` (SQLite) or `.log` / `.journal` (Optuna's
  journal file, for file systems where SQLite locking is unreliable, e.g. NFS)

A storage that cannot be opened is one line naming it (`StorageError`), never a driver traceback.
Every call into the storage finishes before a Ctrl-C / SIGTERM is raised (`core.interrupts`): an
interrupt inside a commit would leave its transaction open, and the lock it holds would stall the
clean-up that marks the running trial interrupted.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..core.errors import NNCompressError
from ..core.interrupts import shield_methods
from ..core.logs import quiet_loggers

HEARTBEAT_S = 20        # a running trial writes its heartbeat this often...
GRACE_S = 120           # ...and counts as dead (failed, to be retried) when silent this long
SQLITE_TIMEOUT_S = 60   # SQLite: how long a worker waits for another's write lock
_SQLITE = (".db", ".sqlite", ".sqlite3")
_JOURNAL = (".log", ".journal")
_CREATE_RACE = ("UNIQUE constraint", "already exists", "database is locked")
QUIET = ("optuna", "sqlalchemy", "alembic")


class StorageError(NNCompressError):
    """A study storage that cannot be opened (bad URL, missing driver, unreachable or unwritable)."""


def default_storage(out: str | Path) -> str:
    """The SQLite file beside the output folder `out`, kept after the search so a rerun resumes.

    >>> default_storage("runs/s").endswith("runs/s.study.db")
    True
    """
    out = Path(out).resolve()
    return f"sqlite:///{out.parent / (out.name + '.study.db')}"


def open_storage(url: str) -> Any:
    """An Optuna storage for `url`; a `StorageError` naming it when it cannot be opened."""
    import optuna

    shown = display_url(url)
    try:
        with quiet_loggers(*QUIET):
            if url.endswith(_JOURNAL) and "://" not in url:
                from optuna.storages.journal import JournalFileBackend, JournalStorage
                Path(url).parent.mkdir(parents=True, exist_ok=True)
                return shield_methods(JournalStorage(JournalFileBackend(url)))
            if "://" not in url:
                if not url.endswith(_SQLITE):
                    raise StorageError(f"--storage {shown}: not a database URL (sqlite:///study.db, postgresql://...) "
                                       f"nor a file ending in {', '.join(_SQLITE + _JOURNAL)}")
                url = f"sqlite:///{Path(url).resolve()}"
            kwargs: dict[str, Any] = {}
            if url.startswith("sqlite"):
                kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
                file = url[len("sqlite:///"):]
                if url.startswith("sqlite:///") and file and not file.startswith(":memory:"):
                    Path(file).parent.mkdir(parents=True, exist_ok=True)  # as a journal file's folder is made
            for attempt in range(5):
                try:
                    return shield_methods(optuna.storages.RDBStorage(
                        url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S))
                except Exception as e:  # noqa: BLE001 - sorted below
                    # workers starting together on a new database race to create its tables: the
                    # loser finds them made (or locked) and opens them on a second try
                    if attempt == 4 or not any(w in str(e) for w in _CREATE_RACE):
                        raise
                    time.sleep(0.2 * (attempt + 1))
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - a driver's error of any kind becomes one line naming the URL
        raise StorageError(f"--storage {shown}: cannot open it ({_first_line(e)}); give a database URL Optuna "
                           f"accepts (e.g. sqlite:///runs/study.db) or a .db / .log file path") from None


def display_url(url: str) -> str:
    """`url` with any password hidden.

    >>> display_url("postgresql://me:secret@host/db")
    'postgresql://me:***@host/db'
    """
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True) if "://" in url else url
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: show it as given
        return url


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) < 200 else line[:197] + "..."

