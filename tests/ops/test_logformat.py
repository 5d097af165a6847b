"""One event per log line, and journald's priority prefix when stderr is the journal."""

from __future__ import annotations

import logging
import os
import sys

from freecall.ops.logformat import OneLineFormatter, make_formatter, stderr_is_journal


def _record(level: int, message: str, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("freecall.test", level, __file__, 1, message, None, info)


def test_newlines_and_tracebacks_stay_on_one_line() -> None:
    text = OneLineFormatter("%(levelname)s %(message)s").format(
        _record(logging.ERROR, "first\nsecond", exc=True))
    assert "\n" not in text
    assert text.startswith("ERROR first \\n second")
    assert "Traceback" in text and "ValueError: boom \\n second line" in text


def test_journal_format_carries_the_syslog_priority() -> None:
    journal = make_formatter("journal")
    assert journal.format(_record(logging.WARNING, "careful")) == "<4>freecall.test: careful"
    assert journal.format(_record(logging.DEBUG, "x")).startswith("<7>")
    assert journal.format(_record(logging.INFO, "x")).startswith("<6>")
    assert journal.format(_record(logging.ERROR, "x")).startswith("<3>")
    text = make_formatter("text").format(_record(logging.INFO, "hello"))
    assert " INFO    freecall.test: hello" in text


def test_journal_stream_must_name_this_stderr() -> None:
    stat = os.fstat(sys.stderr.fileno())
    assert stderr_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"})
    assert not stderr_is_journal({})
