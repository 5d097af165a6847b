"""The retained-secret cache and the node ZID (RFC 6189 sections 4.6.1, 4.9)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from freecall.srtp.keys import FOREVER, RetainedSecrets

PEER = bytes(range(12))
RS_A = b"\xaa" * 32
RS_B = b"\xbb" * 32


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_zid_generated_once_and_persisted(tmp_path: Path) -> None:
    path = tmp_path / "state" / "zrtp-cache"
    first = RetainedSecrets(path)
    assert len(first.zid) == 12
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert RetainedSecrets(path).zid == first.zid
    assert first.load_error is None


def test_update_lookup_and_rs2_shift(tmp_path: Path) -> None:
    path = tmp_path / "zrtp-cache"
    cache = RetainedSecrets(path)
    assert cache.lookup(PEER).rs1 is None
    cache.update(PEER, RS_A, FOREVER, keep_old_as_rs2=True)
    cache.update(PEER, RS_B, FOREVER, keep_old_as_rs2=True)
    got = RetainedSecrets(path).lookup(PEER)
    assert (got.rs1, got.rs2, got.verified) == (RS_B, RS_A, False)
    cache.set_verified(PEER, True)
    assert RetainedSecrets(path).lookup(PEER).verified
    cache.update(PEER, RS_A, FOREVER, keep_old_as_rs2=False)  # Preshared: rs2 kept
    assert RetainedSecrets(path).lookup(PEER).rs2 == RS_A
    cache.forget(PEER)
    assert RetainedSecrets(path).lookup(PEER).rs1 is None


def test_expiry_uses_the_injected_clock(tmp_path: Path) -> None:
    clock = Clock()
    cache = RetainedSecrets(tmp_path / "c", clock=clock)
    cache.update(PEER, RS_A, 60, keep_old_as_rs2=True)
    cache.set_verified(PEER, True)
    assert cache.lookup(PEER).rs1 == RS_A
    clock.now += 61
    expired = cache.lookup(PEER)
    assert expired.rs1 is None and not expired.verified
    assert cache.purge_expired() == 1
    assert cache.peers() == []


def test_zero_interval_stores_nothing_and_expires_old(tmp_path: Path) -> None:
    clock = Clock()
    cache = RetainedSecrets(tmp_path / "c", clock=clock)
    cache.update(PEER, RS_A, 0, keep_old_as_rs2=True)
    assert cache.lookup(PEER).rs1 is None
    cache.update(PEER, RS_A, FOREVER, keep_old_as_rs2=True)
    cache.update(PEER, RS_B, 0, keep_old_as_rs2=True)
    clock.now += 0.001
    assert cache.lookup(PEER).rs1 is None


def test_corrupt_file_starts_empty_and_reports(tmp_path: Path) -> None:
    path = tmp_path / "zrtp-cache"
    good = RetainedSecrets(path)
    good.update(PEER, RS_A, FOREVER, keep_old_as_rs2=True)
    for garbage in (b"{not json", b'{"version": 1, "zid": "zz"}', b"[]", b"\xff\xfe"):
        path.write_bytes(garbage)
        cache = RetainedSecrets(path)
        assert cache.load_error is not None
        assert cache.lookup(PEER).rs1 is None
        assert len(cache.zid) == 12
        assert (tmp_path / "zrtp-cache.corrupt").read_bytes() == garbage
        # The fresh file is valid again.
        assert RetainedSecrets(path).load_error is None


def test_bad_entry_types_are_corruption(tmp_path: Path) -> None:
    path = tmp_path / "zrtp-cache"
    zid = RetainedSecrets(path).zid
    doc = {"version": 1, "zid": zid.hex(), "peers": {PEER.hex(): {"rs1": "00", "verified": 1}}}
    path.write_text(json.dumps(doc))
    assert RetainedSecrets(path).load_error is not None


def test_unreadable_file_does_not_crash(tmp_path: Path) -> None:
    path = tmp_path / "zrtp-cache"
    path.mkdir()  # reading a directory fails with an OSError; it is set aside
    cache = RetainedSecrets(path)
    assert cache.load_error is not None
    assert (tmp_path / "zrtp-cache.corrupt").is_dir()
    assert RetainedSecrets(path).zid == cache.zid


def test_unwritable_location_keeps_working_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = RetainedSecrets(blocker / "zrtp-cache")  # parent is not a directory
    assert cache.load_error is not None and cache.save_error is not None
    cache.update(PEER, RS_A, FOREVER, keep_old_as_rs2=True)  # no exception
    assert cache.lookup(PEER).rs1 == RS_A


def test_no_key_material_in_repr_or_logs(tmp_path: Path, caplog: object) -> None:
    cache = RetainedSecrets(tmp_path / "c")
    cache.update(PEER, RS_A, FOREVER, keep_old_as_rs2=True)
    entry = cache.lookup(PEER)
    for text in (repr(cache), repr(entry), str(entry)):
        assert "aa" * 8 not in text
    (tmp_path / "c").write_text("garbage")
    RetainedSecrets(tmp_path / "c")
    messages = " ".join(r.getMessage() for r in caplog.records)  # type: ignore[attr-defined]
    assert "aa" * 8 not in messages
    assert "starting with an empty ZRTP cache" in messages


def test_in_memory_cache() -> None:
    cache = RetainedSecrets(None, urandom=lambda n: b"\x01" * n)
    assert cache.zid == b"\x01" * 12
    cache.update(PEER, RS_A, FOREVER, keep_old_as_rs2=True)
    assert cache.lookup(PEER).rs1 == RS_A
