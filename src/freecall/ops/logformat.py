"""Log formats that keep one event on one line (issue 10).

journald turns every line of standard error into an entry, so a message with a newline (a
traceback, a multi-line SIP trace) would become several unrelated entries. Both formats escape
newlines. The ``journal`` format puts the level first as a syslog priority (``<4>``), which
journald stores as the entry's priority (sd-daemon(3)), and leaves out the time stamp the
journal already records.
"""

from __future__ import annotations

import logging
import math
import os
import sys

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


class OneLineFormatter(logging.Formatter):
    """Escapes newlines so that an event is one line; optionally a syslog priority prefix."""

    def __init__(self, fmt: str, *, priority: bool = False) -> None:
        super().__init__(fmt)
        self.priority = priority

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\r", "").replace("\n", " \\n ")
        if self.priority:
            level = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
            return f"<{level}>{text}"
        return text


def stderr_is_journal(environ: dict[str, str] | None = None) -> bool:
    """``$JOURNAL_STREAM`` names the device and inode of standard error when systemd connected
    it to the journal (systemd.exec(5))."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stat.st_dev == int(device) and stat.st_ino == int(inode)


def make_formatter(kind: str) -> OneLineFormatter:
    if kind == "auto":
        kind = "journal" if stderr_is_journal() else "text"
    if kind == "journal":
        return OneLineFormatter(JOURNAL_FORMAT, priority=True)
    return OneLineFormatter(TEXT_FORMAT)


class LogLimiter:
    """At most ``burst`` lines per ``window`` seconds: a flood must not become a log flood."""

    __slots__ = ("burst", "count", "start", "suppressed", "window")

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        self.burst = burst
        self.window = window
        self.start = -math.inf
        self.count = 0
        self.suppressed = 0

    def allow(self, now: float) -> str | None:
        """None to stay quiet, else a suffix telling how many lines were left out."""
        if now - self.start >= self.window:
            self.start = now
            self.count = 0
        if self.count >= self.burst:
            self.suppressed += 1
            return None
        self.count += 1
        suffix = f" ({self.suppressed} similar lines suppressed)" if self.suppressed else ""
        self.suppressed = 0
        return suffix
