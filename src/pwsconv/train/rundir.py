"""Run-directory ownership: one writer per directory, output-path checks, and clean-up after a killed writer.

    with lock_run_dir("runs/x"):          # RunDirLocked at once if another process (or thread) is writing there
        ...                               # train, write checkpoints, metrics, result.json

The lock is ``fcntl.flock`` on ``<dir>/.lock``: the kernel releases it when its holder exits, however it exits
(SIGKILL included), so a crashed run never leaves a stuck lock. It is re-entrant within one thread (a sweep holds the
lock of a run while :func:`pwsconv.train.train` takes it again), and released — the file removed, and the directory
too if the lock created it and nothing else was written — when the outermost holder leaves. On platforms without
``fcntl`` (Windows) directories are not locked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
from typing import Iterator

__all__ = ["RunDirLocked", "lock_run_dir", "remove_stale_temps", "check_output_dir", "check_output_file",
           "LOCK_NAME"]

#: The lock file inside a run directory (hidden; not counted as a file of the run).
LOCK_NAME = ".lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX (Windows): no lock, as before (documented)
    fcntl = None  # type: ignore[assignment]


class RunDirLocked(ValueError):
    """Another process (or thread) is writing in the run directory (one-line message naming it)."""


def _first_blocker(path: str) -> str | None:
    """The nearest existing ancestor of ``path`` (or ``path`` itself) that is not a directory, if any."""
    p = os.path.abspath(path)
    while True:
        if os.path.lexists(p):
            return None if os.path.isdir(p) else p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def _what_blocks(blocker: str) -> str:
    """What a path that is not a directory is: a file, a symbolic-link loop, a dangling link, something else."""
    if os.path.islink(blocker):
        try:
            os.stat(blocker)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "is a symbolic link loop"
            return f"is a symbolic link to a missing target ({os.readlink(blocker)})"
        return "is a symbolic link to a file, not to a directory"
    if os.path.isfile(blocker):
        return "is a file, not a directory"
    return "is not a directory"


def check_output_dir(path: str | os.PathLike, what: str = "output directory") -> str:
    """Raise a one-line ``ValueError`` unless ``path`` is a directory or can be created as one (no part of it is a
    file). Returns the absolute path. Creates nothing."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what} must not be empty")
    blocker = _first_blocker(path)
    if blocker is not None:
        if os.path.abspath(blocker) == os.path.abspath(path):
            kind = _what_blocks(blocker)
            raise ValueError(f"{what} {path} exists and is not a directory" if kind.endswith("a directory") else
                             f"{what} {path} {kind}")
        raise ValueError(f"cannot create {what} {path}: {blocker} {_what_blocks(blocker)}")
    return os.path.abspath(path)


def check_output_file(path: str | os.PathLike, what: str = "output file") -> str:
    """Raise a one-line ``ValueError`` unless ``path`` can be written as a file: not a directory, and its parent a
    directory or creatable. Returns the absolute path. Creates nothing."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what} must not be empty")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory; give a file path")
    if path.endswith(os.sep):
        raise ValueError(f"{what} {path} ends with {os.sep!r}; give a file path")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise ValueError(f"{what} {path} exists and is not a regular file" if not os.path.islink(path) else
                         f"{what} {path} {_what_blocks(path)}")
    parent = os.path.dirname(os.path.abspath(path))
    blocker = _first_blocker(parent)
    if blocker is not None:
        raise ValueError(f"cannot write {what} {path}: {blocker} {_what_blocks(blocker)}")
    return os.path.abspath(path)


# the temporary files of checkpoint._atomic_write: "." + basename + "." + random + ".tmp"
_TEMP = re.compile(r"^\.(checkpoint\.pt|result\.json|config\.yaml|metrics\.csv|metrics\.jsonl|results\.(md|csv|jsonl)"
                   r"|summary\.csv|speed\.csv|[A-Za-z0-9_-]+\.png)\.[A-Za-z0-9_]+\.tmp$")


def remove_stale_temps(run_dir: str | os.PathLike) -> list[str]:
    """Delete the temporary files a killed writer left in ``run_dir`` (``.checkpoint.pt.*.tmp``,
    ``.result.json.*.tmp``, ...). Call it only while holding the directory's lock. Returns the removed paths."""
    run_dir = os.fspath(run_dir)
    removed = []
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return removed
    for e in entries:
        if _TEMP.match(e.name) and e.is_file(follow_symlinks=False):
            try:
                os.unlink(e.path)
                removed.append(e.path)
            except OSError:
                pass
    return removed


# ---------------------------------------------------------------------------------------------------------- lock
class _Held:
    def __init__(self, fd: int, lock_path: str, created: list[str]) -> None:
        self.fd, self.lock_path, self.created, self.depth = fd, lock_path, created, 1


_HELD: dict[tuple[str, int], _Held] = {}
_HELD_LOCK = threading.Lock()


def _busy(run_dir: str) -> RunDirLocked:
    return RunDirLocked(f"run directory {run_dir} is in use: another pwsconv process is writing there (one writer "
                        f"per run directory); wait for it to finish or choose another out_dir")


def _makedirs(path: str) -> list[str]:
    """``os.makedirs`` that returns the directories it created (outermost first)."""
    missing = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
            created.append(d)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
    return created


def _acquire(run_dir: str) -> _Held:
    created = _makedirs(run_dir)
    lock_path = os.path.join(run_dir, LOCK_NAME)
    if fcntl is None:  # pragma: no cover - no flock on this platform: the directory is used unlocked
        return _Held(-1, lock_path, created)
    try:
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise _busy(run_dir) from None
                raise
            # the holder before us may have removed the file between our open and our flock: then we locked an
            # orphan inode and must lock the file now at the path instead
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass
    except BaseException:
        _remove_created(created)
        raise
    return _Held(fd, lock_path, created)


def _remove_created(created: list[str]) -> None:
    for d in reversed(created):
        try:
            os.rmdir(d)   # only if empty: a run that wrote something keeps its directory
        except OSError:
            break


def _release(h: _Held) -> None:
    if h.fd < 0:  # pragma: no cover - unlocked (no fcntl)
        _remove_created(h.created)
        return
    try:
        os.unlink(h.lock_path)   # while still holding it: a waiter re-checks the path after its flock
    except OSError:
        pass
    os.close(h.fd)
    _remove_created(h.created)


@contextlib.contextmanager
def lock_run_dir(run_dir: str | os.PathLike) -> Iterator[str]:
    """Hold the exclusive writer lock of ``run_dir`` (created if missing) for the ``with`` block.

    Raises :class:`RunDirLocked` at once (no waiting) if another process or thread holds it. On leaving, the lock
    file is removed, and directories this call created are removed again if they stayed empty (a run that could not
    start leaves no trace). Yields the absolute directory path.
    """
    run_dir = check_output_dir(run_dir, "run directory")
    key = (os.path.realpath(run_dir), threading.get_ident())
    with _HELD_LOCK:
        h = _HELD.get(key)
        if h is not None:
            h.depth += 1
    if h is None:
        h = _acquire(run_dir)
        with _HELD_LOCK:
            _HELD[key] = h
    try:
        yield run_dir
    finally:
        with _HELD_LOCK:
            h.depth -= 1
            last = h.depth == 0
            if last:
                del _HELD[key]
        if last:
            _release(h)


def is_run_file(name: str) -> bool:
    """Whether a directory entry counts as content of a run directory (the lock file does not)."""
    return name != LOCK_NAME
