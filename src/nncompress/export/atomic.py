"""Write files so that a reader never sees half of one: temp file in the same folder, then rename.

Every temporary is named `.NAME.PID-HOST.RANDOM.tmp`: the process that owns it is part of its
name, so a later process can tell the temporary of a killed run (owner gone: `remove_stale_temps`
deletes it) from one a live process is still writing (kept). The name is set when the temporary is
created, so there is no moment when a temporary exists without its owner.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)-(?P<host>[A-Za-z0-9-]*)\.[a-z0-9_]+\.tmp$")


def _host() -> str:
    """This machine's name as it appears in temp names (letters, digits and '-' only)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]


def _prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-{_host()}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it onto `path`, on error remove it.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "x.txt") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> (d / "x.txt").read_text(), [p.name for p in d.iterdir()]
    ('hello', ['x.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success rename it to `path` (which must not exist)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def temp_owner(path: str | os.PathLike) -> tuple[int, str] | None:
    """`(pid, host)` of the process that created the temporary `path`, or None if `path` is not one.

    >>> temp_owner("runs/.digits.4242-box.k2x_9a1q.tmp"), temp_owner("runs/digits")
    ((4242, 'box'), None)
    """
    match = _TEMP.match(Path(path).name)
    return (int(match["pid"]), match["host"]) if match else None


def owner_alive(pid: int, host: str) -> bool:
    """Whether process `pid` on `host` may still be running. A process on another machine (a shared
    folder) cannot be checked from here, so it counts as alive: its files are never removed."""
    if host != _host():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: checks the process exists, delivers nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries in `folder` (not below) whose owner process is gone; returns them.

    A temporary of a live process, and anything not named like a temporary, is left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        owner = temp_owner(entry)
        if owner is None or owner_alive(*owner):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`, named like every temporary here; always removed after.

    For work whose results the caller moves out of it itself (each move an atomic rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def current_owner() -> tuple[int, str]:
    """`(pid, host)` of this process, as `temp_owner` reads them back from a temporary's name."""
    return os.getpid(), _host()
