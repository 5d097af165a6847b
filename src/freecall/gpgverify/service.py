"""The daemon's OpenPGP side: its own key, SAS signatures, and each call's verification.

Every GnuPG call runs in one worker thread (the event loop never waits on gpg; a call's media
is already encrypted while its verification runs, RFC 6189 section 7.2 leaves the timing to
us). Two GnuPG homes:

* the **keyring** (``openpgp.home``, default ``<state_dir>/gnupg``): the node's own key and
  the keys the user imported (`freecall keys import`): those count as expected for the
  addresses their user IDs name;
* the **seen** keyring (``<state_dir>/gnupg-seen``): keys peers offered in calls. They only
  make a signature checkable; what they are worth is decided by the pins.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from freecall.control.api import ApiError
from freecall.gpgverify.gpg import (
    MAX_KEY_BYTES,
    GpgHome,
    KeyInfo,
    SignatureCheck,
    normalise_address,
    normalise_fingerprint,
)
from freecall.gpgverify.pins import Pin, PinStore
from freecall.gpgverify.verdict import Outcome, Verdict, decide

log = logging.getLogger("freecall.gpgverify")

T = TypeVar("T")
PINS_FILE = "openpgp-pins.json"
SEEN_HOME = "gnupg-seen"


@dataclass(frozen=True, slots=True)
class KeyPaths:
    """Where the OpenPGP state of one node lives."""

    home: Path
    seen: Path
    pins: Path
    users_home: bool = False
    """``home`` is a keyring outside the state directory (``openpgp.home``: the user's own):
    its gpg-agent is the user's, and the daemon leaves it running when it stops."""

    @classmethod
    def for_state(cls, state_dir: Path, home: str | Path | None = None) -> KeyPaths:
        keyring = Path(home) if home else state_dir / "gnupg"
        inside = keyring.resolve().is_relative_to(state_dir.resolve())
        return cls(keyring, state_dir / SEEN_HOME, state_dir / PINS_FILE, users_home=not inside)


class KeyStore:
    """Blocking operations on the keyrings and pins (the CLI uses it directly)."""

    def __init__(self, paths: KeyPaths, binary: str = "gpg") -> None:
        self.paths = paths
        self.keyring = GpgHome(paths.home, binary)
        self._seen: GpgHome | None = None
        self._binary = binary
        self.pins = PinStore(paths.pins)

    @property
    def seen(self) -> GpgHome:
        if self._seen is None:
            self._seen = GpgHome(self.paths.seen, self._binary)
        return self._seen

    def own_key(self, wanted: str | None, name: str, addresses: Iterable[str]) -> str:
        """The signing key: ``wanted`` (must have its secret part here), else the node key,
        made on first start with a user ID for every address this node serves."""
        addresses = list(addresses)
        if wanted:
            fingerprint = normalise_fingerprint(wanted)
            if not any(k.fingerprint == fingerprint for k in self.keyring.list_keys(secret=True)):
                raise RuntimeError(f"openpgp.key {fingerprint}: no secret key in "
                                   f"{self.paths.home}")
            return fingerprint
        own = [k for k in self.keyring.list_keys(secret=True) if not k.revoked and not k.expired]
        if own:
            fingerprint = own[0].fingerprint
            added = self.keyring.add_addresses(fingerprint, name, addresses)
            if added:
                log.info("OpenPGP key %s now also names %s", fingerprint, ", ".join(added))
            return fingerprint
        fingerprint = self.keyring.create_key(name, addresses)
        log.info("created the node's OpenPGP key %s for %s", fingerprint,
                 ", ".join(addresses) or name)
        return fingerprint

    def list_keys(self) -> list[dict[str, object]]:
        """Own, imported and seen keys with their pins: what `freecall keys` shows."""
        pins_by_fpr: dict[str, list[Pin]] = {}
        for pin in self.pins.all():
            pins_by_fpr.setdefault(pin.fingerprint, []).append(pin)
        rows: list[dict[str, object]] = []
        listed = set()
        for where, home in (("keyring", self.keyring), ("seen", self.seen)):
            for key in home.list_keys():
                if key.fingerprint in listed:
                    continue
                listed.add(key.fingerprint)
                rows.append(_key_row(key, "own" if key.secret else where,
                                     pins_by_fpr.get(key.fingerprint, [])))
        for pin in self.pins.all():
            if pin.fingerprint not in listed:
                listed.add(pin.fingerprint)
                rows.append({"fingerprint": pin.fingerprint, "addresses": [], "source": "pin",
                             "pinned_for": [pin.address], "pin": pin.how, "revoked": False,
                             "expired": False})
        return rows

    def trust(self, address: str, fingerprint: str) -> Pin:
        """The user says ``fingerprint`` is ``address``'s key: pin it (replacing any pin)."""
        fingerprint = normalise_fingerprint(fingerprint)
        address = normalise_address(address)
        key = self.keyring.key(fingerprint) or self.seen.key(fingerprint)
        if key is not None and address not in key.addresses:
            raise ValueError(f"key {fingerprint} has no user ID for {address} "
                             f"(it names {', '.join(key.addresses) or 'nothing'})")
        return self.pins.pin(address, fingerprint, "trusted")

    def forget(self, address: str) -> bool:
        return self.pins.forget(address)

    def import_file(self, data: bytes) -> list[str]:
        return self.keyring.import_keys(data)

    def verify(self, address: str, signature: bytes | None, sashash: bytes,
               offered: bytes | None, own: str | None,
               continuity_mismatch: bool = False, named: str | None = None,
               named_by: str = "the peer node's record") -> Verdict:
        """One call's verification (module docstring; the rules are in `verdict.decide`)."""
        address = normalise_address(address)
        check: SignatureCheck | None = None
        if signature is not None:
            check = self.keyring.verify(signature, sashash)
            if check.status == "no-key":
                if offered and len(offered) <= MAX_KEY_BYTES:
                    try:
                        self.seen.import_keys(offered)
                    except (ValueError, RuntimeError) as exc:
                        log.info("key offered for %s not imported: %s", address, exc)
                check = self.seen.verify(signature, sashash)
            if check.fingerprint is not None and check.fingerprint == own:
                check = SignatureCheck("bad", own, detail="our own signature came back")
        pin = self.pins.get(address)
        imported = frozenset(k.fingerprint for k in self.keyring.keys_for(address)
                             if not k.secret)
        verdict = decide(address, check, pinned=pin.fingerprint if pin else None,
                         imported=imported, named=named, named_by=named_by,
                         continuity_mismatch=continuity_mismatch)
        if verdict.pin and verdict.peer_key:
            self.pins.pin(address, verdict.peer_key, verdict.pin)
        return verdict

    def close(self) -> None:
        self.keyring.close(stop_agent=not self.paths.users_home)
        if self._seen is not None:
            self._seen.close()


class SasKeys:
    """The asyncio face of `KeyStore` for the daemon: sign, offer, verify."""

    def __init__(self, paths: KeyPaths, *, binary: str = "gpg", key: str | None = None,
                 name: str | None = None, addresses: Iterable[str] = (),
                 passphrase_file: str | None = None) -> None:
        self.paths = paths
        self._binary = binary
        self._wanted = key
        self._name = name or socket.gethostname()
        self._addresses = [normalise_address(a) for a in addresses]
        self._passphrase_file = passphrase_file
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpg")
        self.store: KeyStore | None = None
        self.fingerprint: str | None = None
        self.can_sign = False
        self._passphrase: str | None = None
        self._offers: dict[str, str] = {}

    async def start(self) -> str:
        """Open the keyrings, make sure our key exists and names our addresses, and check
        that it can sign (a passphrase-protected key: with ``passphrase_file``'s passphrase).
        A key that cannot sign is logged once, clearly; calls then go on unsigned (peers
        see them ``unverified``) and our key is neither offered nor named in our record."""
        loop = asyncio.get_running_loop()
        passphrase = None
        problem = None
        try:
            passphrase = self._read_passphrase()
        except (OSError, ValueError) as error:
            problem = str(error)

        def work() -> tuple[KeyStore, str, str | None]:
            store = KeyStore(self.paths, self._binary)
            fingerprint = store.own_key(self._wanted, self._name, self._addresses)
            self._make_offers(store, fingerprint)
            if problem is not None:
                return store, fingerprint, problem
            try:  # one signature now: a wrong passphrase shows at start, not on each call
                store.keyring.sign(fingerprint, b"freecall signing check", passphrase)
            except RuntimeError as error:
                return store, fingerprint, str(error)
            return store, fingerprint, None

        self.store, fingerprint, problem = await loop.run_in_executor(self._executor, work)
        self.fingerprint = fingerprint
        self._passphrase = passphrase
        self.can_sign = problem is None
        if problem is not None:
            self._offers = {}
            where = (f" with the passphrase in {self._passphrase_file}"
                     if self._passphrase_file else " (no openpgp.passphrase_file, no agent)")
            log.error("OpenPGP key %s cannot sign%s: %s. Calls go on UNSIGNED: peers see them "
                      "unverified", fingerprint, where, problem)
        return fingerprint

    async def set_addresses(self, addresses: Iterable[str]) -> None:
        """Users added at run time: the node key gains their user IDs, the offers follow."""
        self._addresses = [normalise_address(a) for a in addresses]
        store = self.store
        if store is None:
            return

        def work() -> None:
            fingerprint = store.own_key(self._wanted, self._name, self._addresses)
            if self.can_sign:
                self._make_offers(store, fingerprint)

        await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def _make_offers(self, store: KeyStore, fingerprint: str) -> None:
        """The key offered in our SDP, per local address: only that address's user ID (the
        worker thread builds the table, then swaps it in whole)."""
        offers = {}
        for address in self._addresses:
            data = store.keyring.export(fingerprint, armor=False, address=address)
            if data:
                offers[address] = base64.b64encode(data).decode()
        offers[""] = base64.b64encode(store.keyring.export(fingerprint, armor=False)).decode()
        self._offers = offers

    # -- the control API's KeysProvider (GET /api/keys, POST /api/keys/trust|forget) --------

    def own_fingerprint(self) -> str | None:
        return self.fingerprint

    async def list_keys(self) -> list[dict[str, Any]]:
        store = self.store
        return [] if store is None else await self._in_worker(store.list_keys)

    async def trust(self, address: str, fingerprint: str) -> dict[str, Any]:
        store = self._store()
        try:
            pin = await self._in_worker(store.trust, address, fingerprint)
        except ValueError as error:
            raise ApiError(400, str(error)) from error
        return {"address": pin.address, "fingerprint": pin.fingerprint, "pin": pin.how}

    async def forget(self, address: str) -> dict[str, Any]:
        store = self._store()
        forgot = await self._in_worker(store.forget, address)
        return {"address": normalise_address(address), "forgot": forgot}

    async def _in_worker(self, work: Callable[..., T], *args: Any) -> T:
        """Run a blocking key-store operation on the gpg worker (the loop never waits on gpg;
        one thread also keeps GnuPG calls on one home from overlapping)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    def _store(self) -> KeyStore:
        if self.store is None:
            raise ApiError(503, "OpenPGP keys are not started")
        return self.store

    def offer(self, local: str) -> str | None:
        """The base64 key to put in our SDP for our party ``local`` (only its user ID)."""
        if not self._offers:
            return None
        address = normalise_address(local)
        if address in self._offers:
            return self._offers[address]
        user = address.rpartition("@")[0]
        same_user = [a for a in self._offers if a and a.rpartition("@")[0] == user]
        return self._offers[same_user[0]] if same_user else self._offers[""]

    async def sign(self, sashash: bytes) -> bytes | None:
        """Our signature over ``sashash`` (RFC 6189 section 7.2, type "PGP "); None when our
        key cannot sign (logged once at start)."""
        store, fingerprint = self.store, self.fingerprint
        if store is None or fingerprint is None:
            raise RuntimeError("OpenPGP keys not started")
        if not self.can_sign:
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, store.keyring.sign, fingerprint, sashash, self._passphrase)

    async def verify(self, address: str, signature: bytes | None, sashash: bytes,
                     offered: bytes | None, continuity_mismatch: bool = False,
                     named: str | None = None, named_by: str = "the peer node's record",
                     ) -> Verdict:
        """``named``: the fingerprint the peer node's host-cache record names (``named_by``
        says which record), the expected key on first contact (`verdict.decide`)."""
        store = self.store
        if store is None:
            return Verdict(Outcome.UNVERIFIED, "OpenPGP is not available")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(
                store.verify, address, signature, sashash, offered, self.fingerprint,
                continuity_mismatch, named=named, named_by=named_by))

    async def close(self) -> None:
        store = self.store
        if store is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, store.close)
        self._executor.shutdown(wait=False)

    def _read_passphrase(self) -> str | None:
        """The first line of ``passphrase_file``, read once at start. Like ssh with a private
        key, a file other users may read (or write) is refused: the passphrase is a secret."""
        if not self._passphrase_file:
            return None
        path = Path(self._passphrase_file)
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ValueError(f"openpgp.passphrase_file {path} is open to other users (mode "
                             f"{mode & 0o777:04o}): chmod 600 it")
        with path.open(encoding="utf-8") as handle:
            return handle.readline().rstrip("\r\n")


def _key_row(key: KeyInfo, source: str, pins: list[Pin]) -> dict[str, object]:
    return {"fingerprint": key.fingerprint, "addresses": list(key.addresses),
            "source": source, "pinned_for": [p.address for p in pins],
            "pin": pins[0].how if pins else None, "revoked": key.revoked,
            "expired": key.expired}
