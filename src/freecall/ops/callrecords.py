"""Call records: one JSON line per finished call in ``<state_dir>/calls.jsonl`` (issue 10).

Each record is written with one ``write(2)`` on an ``O_APPEND`` descriptor the moment the call
ends, so a crash of the daemon (even ``kill -9``) loses none: the kernel holds the bytes. An
``fsync`` follows off the event loop, coalesced, so a power cut loses at most the last moment.
A crash in the middle of a write could leave a partial last line: on open it is closed with a
newline, so the file stays one parseable JSON object per line apart from that fragment, which
readers skip (:func:`read_records`).

Rotation by size (``calls.jsonl`` -> ``calls.jsonl.1`` -> ... up to ``keep`` files) uses
``rename``, atomic on one file system. A write that fails (disk full, read-only file system) is
kept in a bounded queue, retried with the next record, counted and logged once per failure
streak: calls go on regardless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("freecall.records")

RECORDS_FILE = "calls.jsonl"
PENDING_LIMIT = 10_000
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class CallRecordLog:
    """Appends call records; see the module docstring for the durability rules."""

    def __init__(self, path: Path, *, max_bytes: int = 10 << 20, keep: int = 5,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.loop = loop
        self.written = 0
        self.failures = 0
        self.pending: deque[bytes] = deque(maxlen=PENDING_LIMIT)
        self._fd: int | None = None
        self._size = 0
        self._failing = False
        self._sync_pending = False

    def _open(self) -> int:
        if self._fd is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            size = os.fstat(fd).st_size
            if size:
                with open(self.path, "rb") as existing:
                    existing.seek(size - 1)
                    if existing.read(1) != b"\n":  # a crash cut the last line: close it
                        os.write(fd, b"\n")
                        size += 1
            self._fd, self._size = fd, size
        return self._fd

    def append(self, record: dict[str, Any]) -> bool:
        """Write one record now (and any earlier ones a failure held back)."""
        text = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str) + "\n"
        try:
            line = text.encode()
        except UnicodeEncodeError:
            # Header bytes that are not UTF-8 arrive as lone surrogates (surrogateescape): the
            # file stays UTF-8, one U+FFFD for each such byte.
            line = _LONE_SURROGATE.sub("\ufffd", text).encode()
        self.pending.append(line)
        try:
            while self.pending:
                if self._size and self._size + len(self.pending[0]) > self.max_bytes:
                    self._rotate()
                fd = self._open()
                data = self.pending[0]
                written = os.write(fd, data)
                if written != len(data):  # a short write (disk full): do not leave half
                    os.ftruncate(fd, self._size)
                    raise OSError(28, "short write (disk full?)")
                self._size += written
                self.pending.popleft()
                self.written += 1
        except OSError as error:
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.error("cannot write call records to %s: %s (%d held back; calls go on)",
                          self.path, error, len(self.pending))
            self._close()
            return False
        if self._failing:
            self._failing = False
            log.info("call records written again to %s", self.path)
        self._schedule_sync()
        return True

    def _rotate(self) -> None:
        self._close()
        for index in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        if self.keep > 0:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._size = 0

    def _schedule_sync(self) -> None:
        if self.loop is None:
            self.sync()
            return
        if self._sync_pending:
            return
        self._sync_pending = True
        self.loop.run_in_executor(None, self._sync_later)

    def _sync_later(self) -> None:
        self._sync_pending = False
        self.sync()

    def sync(self) -> None:
        fd = self._fd
        if fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(fd)

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self.sync()
        self._close()


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record of ``path`` (and of its rotated files, oldest first)."""
    rotated = sorted(path.parent.glob(path.name + ".*"),
                     key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    for file in [*rotated, path]:
        with contextlib.suppress(FileNotFoundError), open(file, encoding="utf-8") as lines:
            for line in lines:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        yield record


def record_of(view: dict[str, Any], node: str) -> dict[str, Any]:
    """What a call record keeps of the control API's call view (no SAS: it is not needed
    afterwards and identifies the session's keys)."""
    security = view.get("security") or {}
    media = view.get("media") or {}
    return {
        "time": view.get("ended") or view.get("started"),
        "node": node,
        "id": view.get("id"),
        "direction": view.get("direction"),
        "from": view.get("from"),
        "to": view.get("to"),
        "started": view.get("started"),
        "answered": view.get("answered"),
        "ended": view.get("ended"),
        "duration_s": view.get("duration_s"),
        "outcome": view.get("outcome"),
        "route": view.get("route"),
        "remote_node": view.get("remote_node"),
        "codec": media.get("codec"),
        "packets_in": media.get("packets_in"),
        "packets_out": media.get("packets_out"),
        "lost": media.get("lost"),
        "security": {
            "media": security.get("media"),
            "keying": security.get("keying"),
            "verification": security.get("verification"),
            "peer_key": security.get("peer_key"),
            "cipher": security.get("cipher"),
        },
    }
