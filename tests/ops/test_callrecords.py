"""calls.jsonl: one line per call, survives a cut last line, rotates, and rides out a full
disk without losing records or stopping (issue 10)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from freecall.ops.callrecords import CallRecordLog, read_records, record_of


def test_each_record_is_one_json_line_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl"
    log = CallRecordLog(path)
    for n in range(3):
        assert log.append({"id": f"c{n}", "text": "line\nbreak é"})
    # written before close: a kill -9 now loses nothing
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["c0", "c1", "c2"]
    assert json.loads(lines[0])["text"] == "line\nbreak é"
    assert path.stat().st_mode & 0o777 == 0o600
    assert log.written == 3
    log.close()


def test_header_bytes_that_are_not_utf8_are_written_as_replacement_characters(
        tmp_path: Path) -> None:
    """A From header with a byte that is not UTF-8 reaches the record as a lone surrogate
    (surrogateescape); the wire fuzzer found that it made the write raise."""
    path = tmp_path / "calls.jsonl"
    log = CallRecordLog(path)
    raw = b"sip:al\xceice@a.test".decode("utf-8", "surrogateescape")
    assert log.append({"id": "c0", "from": raw, "to": "sip:bob@b.test é"})
    [record] = list(read_records(path))
    assert record["from"] == "sip:al\ufffdice@a.test"
    assert record["to"] == "sip:bob@b.test é"
    path.read_bytes().decode("utf-8")  # the file stays UTF-8
    log.close()


def test_a_line_cut_by_a_crash_is_closed_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl"
    path.write_bytes(b'{"id":"a"}\n{"id":"b", "trunc')
    log = CallRecordLog(path)
    log.append({"id": "c"})
    log.close()
    assert [r["id"] for r in read_records(path)] == ["a", "c"]
    assert path.read_bytes().endswith(b'"trunc\n{"id":"c"}\n')


def test_rotation_keeps_the_configured_number_of_files(tmp_path: Path) -> None:
    path = tmp_path / "calls.jsonl"
    log = CallRecordLog(path, max_bytes=200, keep=2)
    for n in range(40):
        log.append({"id": n, "pad": "x" * 40})
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["calls.jsonl", "calls.jsonl.1", "calls.jsonl.2"]
    assert all(p.stat().st_size <= 200 for p in tmp_path.iterdir())
    ids = [r["id"] for r in read_records(path)]
    assert ids == sorted(ids) and ids[-1] == 39  # oldest kept first, newest last
    assert len(ids) < 40  # the oldest went with the third rotation


def test_a_full_disk_holds_records_back_and_writes_them_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "freecall.records")
    # /dev/full: every write fails with ENOSPC, as on a full file system
    full = CallRecordLog(Path("/dev/full"))
    assert not full.append({"id": 1}) and not full.append({"id": 2})
    assert full.failures == 2 and len(full.pending) == 2
    assert len([r for r in caplog.records if "cannot write call records" in r.message]) == 1
    # the same records reach the file once the disk has room
    full.path = tmp_path / "calls.jsonl"
    assert full.append({"id": 3})
    assert [r["id"] for r in read_records(full.path)] == [1, 2, 3]
    assert not full.pending
    assert any("written again" in r.message for r in caplog.records)
    full.close()


def test_a_short_write_leaves_no_half_line(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "calls.jsonl"
    log = CallRecordLog(path)
    log.append({"id": "first"})
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:5]))
    assert not log.append({"id": "second"})
    monkeypatch.setattr(os, "write", real_write)
    assert log.append({"id": "third"})
    log.close()
    assert [r["id"] for r in read_records(path)] == ["first", "second", "third"]


def test_a_record_keeps_no_sas() -> None:
    view = {"id": "x", "ended": "2026-11-21T10:00:00Z", "security": {
        "sas": "ybnd", "verification": "verified", "media": "srtp"}, "media": {"codec": "PCMU"}}
    record = record_of(view, "node-a")
    assert "ybnd" not in json.dumps(record)
    assert record["security"]["verification"] == "verified" and record["codec"] == "PCMU"
    assert record["time"] == "2026-11-21T10:00:00Z" and record["node"] == "node-a"
