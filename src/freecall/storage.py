"""Crash-safe state files: every write is atomic (temporary file, fsync, rename, fsync dir).

Nothing is lost on a crash or restart: a reader sees either the old or the new content, never
a torn write. Secrets are created with mode 0600 from the start (never chmod-ed after the fact).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = SECRET_MODE) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    The temporary file lives in the same directory (rename is atomic only within one file
    system) and is removed if anything fails before the rename.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable (POSIX: the entry lives in the directory)."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def append_line(path: str | os.PathLike[str], line: bytes, mode: int = SECRET_MODE) -> None:
    """Append one record line durably (O_APPEND, then fsync): a crash loses no finished record.

    A torn last line can only be one being written at the crash; readers skip a final line
    without its newline.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not line.endswith(b"\n"):
        line += b"\n"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, mode)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
