"""Pins: which OpenPGP key speaks for which address, as this node learned or was told.

One JSON file in the state directory, ``openpgp-pins.json``, replaced atomically. The daemon
and the CLI (`freecall keys trust | forget`) both change it, so every change is a locked
read-modify-write, and readers reload when the file changed: a `keys trust` takes effect on
the next call without a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from freecall.gpgverify.gpg import normalise_address, normalise_fingerprint
from freecall.storage import atomic_write

log = logging.getLogger("freecall.gpgverify")

HOW = ("first-use", "trusted", "keyring", "record")
"""TOFU, `keys trust`, a key the user imported, a key a peer node's host-cache record named."""


@dataclass(frozen=True, slots=True)
class Pin:
    address: str
    fingerprint: str
    how: str
    since: float


class PinStore:
    """address -> Pin, persisted; tolerant of a damaged file (kept aside, never lost)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._pins: dict[str, Pin] = {}
        self._stamp: tuple[int, int] | None = None
        self._reload()

    def get(self, address: str) -> Pin | None:
        self._reload()
        return self._pins.get(normalise_address(address))

    def all(self) -> list[Pin]:
        self._reload()
        return sorted(self._pins.values(), key=lambda p: p.address)

    def pin(self, address: str, fingerprint: str, how: str) -> Pin:
        """Set (or replace) the key for ``address``."""
        if how not in HOW:
            raise ValueError(f"unknown pin kind {how!r}")
        pin = Pin(normalise_address(address), normalise_fingerprint(fingerprint), how,
                  round(time.time(), 3))
        with self._locked():
            self._pins[pin.address] = pin
            self._save()
        return pin

    def forget(self, address: str) -> bool:
        with self._locked():
            removed = self._pins.pop(normalise_address(address), None) is not None
            if removed:
                self._save()
        return removed

    # -- file --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._stamp = None
            self._reload()
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._pins, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            raw: Any = json.loads(self.path.read_bytes())
            pins = {}
            for entry in raw.get("pins", []):
                pin = Pin(normalise_address(str(entry["address"])),
                          normalise_fingerprint(str(entry["fingerprint"])),
                          str(entry["how"]), float(entry.get("since", 0)))
                if pin.how in HOW:
                    pins[pin.address] = pin
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error("%s is damaged (%s): moved to %s; starting with no pins",
                      self.path, exc, aside.name)
            self._pins, self._stamp = {}, None
            return
        self._pins, self._stamp = pins, stamp

    def _save(self) -> None:
        body = {"version": 1, "pins": [asdict(p) for p in sorted(self._pins.values(),
                                                                 key=lambda p: p.address)]}
        atomic_write(self.path, json.dumps(body, indent=1).encode() + b"\n")
        st = self.path.stat()
        self._stamp = (st.st_mtime_ns, st.st_size)
