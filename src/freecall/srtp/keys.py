"""The node's ZID and the retained-secret cache (RFC 6189 sections 4.3, 4.6.1, 4.9).

One JSON file (hex strings) in the state directory, rewritten atomically with mode 0600 on
every change: the node's own ZID (96 random bits, generated once) and, per peer ZID, rs1, rs2,
their expiry and the SAS Verified flag. A corrupt or unreadable file is set aside and the cache
starts empty (with a fresh ZID): key continuity is lost, the daemon keeps running, and
`load_error` says why. Nothing here logs or reprs key material.

Expiry is wall-clock time (the cache outlives the process), from an injected ``clock``; the
ZRTP core itself only hands over the negotiated interval in seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from freecall.storage import atomic_write

log = logging.getLogger(__name__)

ZID_LEN = 12
RS_LEN = 32
FOREVER = 0xFFFFFFFF  # cache expiration interval meaning "indefinitely" (section 4.9)
FILE_VERSION = 1


@dataclass(frozen=True)
class CachedSecrets:
    """What the cache holds for one peer ZID, as a ZRTP session sees it."""

    rs1: bytes | None = field(default=None, repr=False)
    rs2: bytes | None = field(default=None, repr=False)
    verified: bool = False


class SecretCache(Protocol):
    """The view of the retained-secret cache that a `ZrtpSession` uses."""

    def lookup(self, peer_zid: bytes) -> CachedSecrets:
        """Unexpired rs1/rs2 and the SAS Verified flag for ``peer_zid`` (empty if unknown)."""
        ...

    def update(
        self, peer_zid: bytes, new_rs1: bytes, expiry_interval: int, keep_old_as_rs2: bool
    ) -> None:
        """Section 4.6.1: rs2 := rs1 (DH mode), rs1 := new_rs1, expiring after the interval."""
        ...

    def set_verified(self, peer_zid: bytes, verified: bool) -> None:
        """Set the SAS Verified flag (section 7.1) and persist it."""
        ...


@dataclass
class _Entry:
    rs1: bytes | None = field(default=None, repr=False)
    rs1_expires: float | None = None  # wall clock; None = never
    rs2: bytes | None = field(default=None, repr=False)
    rs2_expires: float | None = None
    verified: bool = False
    updated: float = 0.0


class RetainedSecrets:
    """The persistent cache of retained secrets and the node's ZID (implements `SecretCache`).

    ``path=None`` keeps everything in memory (tests, cacheless operation).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        urandom: Callable[[int], bytes] = os.urandom,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = Path(path) if path is not None else None
        self._urandom = urandom
        self._clock = clock
        self._peers: dict[bytes, _Entry] = {}
        self.load_error: str | None = None
        self.save_error: str | None = None
        zid = self._load()
        if zid is None:
            zid = urandom(ZID_LEN)
            self._zid = zid
            self._save()
        self._zid = zid

    @property
    def zid(self) -> bytes:
        """This node's ZID (section 4.9): 96 random bits, generated once and kept."""
        return self._zid

    def __repr__(self) -> str:
        return f"RetainedSecrets(path={self._path!s}, peers={len(self._peers)})"

    # -- SecretCache ---------------------------------------------------------------------------

    def lookup(self, peer_zid: bytes) -> CachedSecrets:
        entry = self._peers.get(bytes(peer_zid))
        if entry is None:
            return CachedSecrets()
        now = self._clock()
        rs1 = entry.rs1 if _alive(entry.rs1_expires, now) else None
        rs2 = entry.rs2 if _alive(entry.rs2_expires, now) else None
        return CachedSecrets(rs1=rs1, rs2=rs2, verified=entry.verified and rs1 is not None)

    def update(
        self, peer_zid: bytes, new_rs1: bytes, expiry_interval: int, keep_old_as_rs2: bool
    ) -> None:
        if len(new_rs1) != RS_LEN:
            raise ValueError("retained secret must be 32 octets")
        now = self._clock()
        key = bytes(peer_zid)
        entry = self._peers.get(key)
        if expiry_interval == 0:
            # Section 4.9: do not store the new secret; an existing entry expires now.
            if entry is not None:
                entry.rs1_expires = now
                entry.rs2_expires = now
                entry.verified = False
                entry.updated = now
                self._save()
            return
        if entry is None:
            entry = _Entry()
            self._peers[key] = entry
        if keep_old_as_rs2:
            entry.rs2, entry.rs2_expires = entry.rs1, entry.rs1_expires
        entry.rs1 = bytes(new_rs1)
        entry.rs1_expires = None if expiry_interval >= FOREVER else now + expiry_interval
        entry.updated = now
        self._save()

    def set_verified(self, peer_zid: bytes, verified: bool) -> None:
        entry = self._peers.setdefault(bytes(peer_zid), _Entry())
        entry.verified = verified
        entry.updated = self._clock()
        self._save()

    # -- management ----------------------------------------------------------------------------

    def peers(self) -> list[bytes]:
        """Peer ZIDs with an entry (expired or not)."""
        return sorted(self._peers)

    def forget(self, peer_zid: bytes) -> None:
        """Erase everything retained for one peer."""
        if self._peers.pop(bytes(peer_zid), None) is not None:
            self._save()

    def purge_expired(self) -> int:
        """Drop entries whose secrets have all expired; returns how many went."""
        now = self._clock()
        dead = [
            zid
            for zid, e in self._peers.items()
            if not (e.rs1 is not None and _alive(e.rs1_expires, now))
            and not (e.rs2 is not None and _alive(e.rs2_expires, now))
        ]
        for zid in dead:
            del self._peers[zid]
        if dead:
            self._save()
        return len(dead)

    # -- persistence ---------------------------------------------------------------------------

    def _load(self) -> bytes | None:
        if self._path is None:
            return None
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._set_aside(f"cannot read {self._path}: {exc.strerror}")
            return None
        try:
            doc = json.loads(raw)
            zid = _parse_doc(doc, self._peers)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._peers.clear()
            self._set_aside(f"corrupt ZRTP cache {self._path}: {type(exc).__name__}")
            return None
        return zid

    def _set_aside(self, reason: str) -> None:
        """Keep the unreadable file for a human, start afresh, report (never crash)."""
        self.load_error = reason
        log.warning("%s; starting with an empty ZRTP cache and a new ZID", reason)
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.replace(self._path, self._path.with_name(self._path.name + ".corrupt"))

    def _save(self) -> None:
        if self._path is None:
            return
        doc: dict[str, Any] = {
            "version": FILE_VERSION,
            "zid": self._zid.hex(),
            "peers": {
                zid.hex(): {
                    "rs1": e.rs1.hex() if e.rs1 is not None else None,
                    "rs1_expires": e.rs1_expires,
                    "rs2": e.rs2.hex() if e.rs2 is not None else None,
                    "rs2_expires": e.rs2_expires,
                    "verified": e.verified,
                    "updated": e.updated,
                }
                for zid, e in sorted(self._peers.items())
            },
        }
        try:
            atomic_write(self._path, (json.dumps(doc, indent=1) + "\n").encode("ascii"))
        except OSError as exc:
            # Keep serving from memory: continuity is lost after a restart, calls go on.
            self.save_error = f"cannot write {self._path}: {exc.strerror}"
            log.warning("%s; ZRTP cache kept in memory only", self.save_error)
        else:
            self.save_error = None


def _alive(expires: float | None, now: float) -> bool:
    return expires is None or expires > now


def _hex(value: Any, size: int | None) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("expected a hex string")
    data = bytes.fromhex(value)
    if size is not None and len(data) != size:
        raise ValueError("wrong length")
    return data


def _time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("expected a number")
    return float(value)


def _parse_doc(doc: Any, peers: dict[bytes, _Entry]) -> bytes:
    if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION:
        raise ValueError("unknown cache format")
    zid = _hex(doc["zid"], ZID_LEN)
    if zid is None:
        raise ValueError("missing ZID")
    table = doc.get("peers", {})
    if not isinstance(table, dict):
        raise TypeError("peers must be an object")
    for peer_hex, item in table.items():
        peer = _hex(peer_hex, ZID_LEN)
        if peer is None or not isinstance(item, dict):
            raise TypeError("bad peer entry")
        verified = item.get("verified", False)
        if not isinstance(verified, bool):
            raise TypeError("verified must be a boolean")
        peers[peer] = _Entry(
            rs1=_hex(item.get("rs1"), RS_LEN),
            rs1_expires=_time(item.get("rs1_expires")),
            rs2=_hex(item.get("rs2"), RS_LEN),
            rs2_expires=_time(item.get("rs2_expires")),
            verified=verified,
            updated=_time(item.get("updated")) or 0.0,
        )
    return zid
