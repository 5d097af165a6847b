"""GnuPG through python-gnupg: the daemon's keyring, SAS signatures and their verification.

Every method blocks (each gpg call forks a process and takes a few milliseconds), so the
daemon runs them in a worker thread (`freecall.gpgverify.service`), never on the event loop.

Trust decisions are not GnuPG's: a good signature from an imported key with no ownertrust
still reports `valid`, and what counts is the fingerprint of the signing key compared with
the pins and the keys the user imported (`freecall.gpgverify.verdict`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gnupg

log = logging.getLogger("freecall.gpgverify")

# A Unix socket path is at most 107 bytes; gpg-agent puts S.gpg-agent.browser (20 bytes) in the
# home directory when /run/user/UID does not exist (containers, services without a session).
_SOCKET_PATH_ROOM = 80
MAX_KEY_BYTES = 16 * 1024  # an offered key larger than this is refused before gpg sees it
_ADDRESS_IN_UID = re.compile(r"<([^<>\s]+)>\s*$")
_FINGERPRINT = re.compile(r"^[0-9A-F]{40}$|^[0-9A-F]{64}$")


def normalise_address(text: str) -> str:
    """``sip:Alice@A.test;transport=tls`` -> ``Alice@a.test``: what a user ID must name.

    The user part keeps its case (RFC 3261 19.1.4: it is case-sensitive); the host does not.
    A user ID ``Alice <alice@a.test>`` names ``alice@a.test``, as an e-mail style OpenPGP key
    does, so a user's own key can speak for the SIP address equal to their e-mail address.
    """
    text = text.strip()
    match = _ADDRESS_IN_UID.search(text)
    if match:
        text = match.group(1)
    for scheme in ("sips:", "sip:", "SIPS:", "SIP:"):
        if text.startswith(scheme):
            text = text[len(scheme):]
            break
    text = text.split(";", 1)[0].split("?", 1)[0]
    user, at, host = text.rpartition("@")
    if not at:
        return text.lower()
    host = host.split(":", 1)[0] if not host.startswith("[") else host
    return f"{user}@{host.lower()}"


def normalise_fingerprint(text: str) -> str:
    """Upper-case hex without spaces; ValueError unless a v4 (40) or v5 (64) fingerprint."""
    cleaned = "".join(text.split()).upper()
    if not _FINGERPRINT.match(cleaned):
        raise ValueError(f"not an OpenPGP fingerprint: {text!r}")
    return cleaned


@dataclass(frozen=True, slots=True)
class SignatureCheck:
    """What GnuPG says of one detached signature over one piece of data.

    ``status``: ``good`` (valid, key usable), ``bad`` (does not verify over the data),
    ``expired-key`` / ``revoked-key`` (the mathematics holds, the key may not be used),
    ``no-key`` (no public key here; ``fingerprint`` is the issuer's when the signature names
    it), ``malformed`` (not exactly one signature packet, or gpg failed).
    """

    status: str
    fingerprint: str | None = None  # the primary key's, not a signing subkey's
    addresses: frozenset[str] = frozenset()  # what the signer's user IDs name
    detail: str = ""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    fingerprint: str
    addresses: tuple[str, ...]
    uids: tuple[str, ...]
    secret: bool
    expires: int | None
    revoked: bool
    expired: bool


class GpgHome:
    """One GnuPG home directory (created mode 0700), used in batch mode only."""

    def __init__(self, home: Path, binary: str = "gpg") -> None:
        self.home = Path(home)
        self.binary = binary
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        self._shortcut: str | None = None
        path = str(self.home)
        if len(path) > _SOCKET_PATH_ROOM:
            # Long homes (deep state directories) would overflow the agent's socket path:
            # reach the home through a short private symlink instead.
            self._shortcut = tempfile.mkdtemp(prefix="fcgpg-")
            os.symlink(path, os.path.join(self._shortcut, "h"))
            path = os.path.join(self._shortcut, "h")
        self.path = path
        self._gpg = gnupg.GPG(gpgbinary=binary, gnupghome=path,
                              options=["--no-auto-key-retrieve", "--no-greeting"])
        self._gpg.encoding = "utf-8"

    # -- keys --------------------------------------------------------------------------------

    def list_keys(self, secret: bool = False) -> list[KeyInfo]:
        """Every key in this home (public, or with a secret part when ``secret``)."""
        secrets = {k["fingerprint"] for k in self._gpg.list_keys(secret=True)}
        out = []
        for key in self._gpg.list_keys(secret=secret):
            uids = tuple(str(u) for u in key.get("uids", ()))
            expires = int(key["expires"]) if key.get("expires") else None
            validity = key.get("trust", "")
            out.append(KeyInfo(
                fingerprint=key["fingerprint"],
                addresses=tuple(sorted({normalise_address(u) for u in uids})),
                uids=uids, secret=key["fingerprint"] in secrets, expires=expires,
                revoked=validity == "r", expired=validity == "e"))
        return out

    def key(self, fingerprint: str) -> KeyInfo | None:
        return next((k for k in self.list_keys() if k.fingerprint == fingerprint), None)

    def keys_for(self, address: str) -> list[KeyInfo]:
        """Keys one of whose user IDs names ``address`` (normalised)."""
        wanted = normalise_address(address)
        return [k for k in self.list_keys() if wanted in k.addresses]

    def create_key(self, name: str, addresses: Iterable[str]) -> str:
        """A new Ed25519 signing key without passphrase, one user ID per address.

        Its revocation certificate lands in ``openpgp-revocs.d`` (GnuPG does that itself).
        """
        addresses = list(dict.fromkeys(addresses)) or [f"{name}@localhost"]
        first, rest = addresses[0], addresses[1:]
        self._run(["--passphrase", "", "--pinentry-mode", "loopback",
                   "--quick-generate-key", _uid(name, first), "ed25519", "sign", "never"])
        wanted = normalise_address(first)
        created = [k for k in self.list_keys(secret=True) if wanted in k.addresses]
        if not created:
            raise RuntimeError("gpg created no key")
        fingerprint = created[-1].fingerprint
        self.add_addresses(fingerprint, name, rest)
        return fingerprint

    def add_addresses(self, fingerprint: str, name: str, addresses: Iterable[str]) -> list[str]:
        """Add a user ID for each address the key does not name yet (users added later)."""
        key = self.key(fingerprint)
        have = set(key.addresses) if key else set()
        added = []
        for address in addresses:
            if normalise_address(address) in have:
                continue
            self._run(["--passphrase", "", "--pinentry-mode", "loopback",
                       "--quick-add-uid", fingerprint, _uid(name, address)])
            added.append(address)
        return added

    def import_keys(self, data: bytes) -> list[str]:
        """Import public keys (binary or armoured); returns the fingerprints gpg took."""
        if len(data) > MAX_KEY_BYTES * 8:
            raise ValueError("key data too large")
        result: Any = self._gpg.import_keys(data)
        return sorted({fp for fp in (result.fingerprints or []) if fp})

    def export(self, fingerprint: str, *, armor: bool = True, address: str | None = None,
               ) -> bytes:
        """The public key, minimal (no third-party signatures); with ``address``, only the user
        ID naming it, so that an offer in a call stays a few hundred bytes."""
        args = ["--export-options", "export-minimal"]
        if armor:
            args.append("--armor")
        if address is not None:
            args += ["--export-filter", f"keep-uid=mbox = {normalise_address(address).lower()}"]
        return self._run([*args, "--export", fingerprint]).stdout

    def delete_public(self, fingerprint: str) -> None:
        self._run(["--yes", "--delete-keys", fingerprint])

    # -- signatures (RFC 6189 section 7.2) ---------------------------------------------------

    def sign(self, fingerprint: str, data: bytes, passphrase: str | None = None) -> bytes:
        """A detached binary OpenPGP signature (RFC 4880 type 0x00, SHA-256) over ``data``."""
        result: Any = self._gpg.sign(data, keyid=fingerprint, detach=True, binary=True,
                                     passphrase=passphrase,
                                     extra_args=["--digest-algo", "SHA256"])
        signature = bytes(result.data or b"")
        if not signature:
            raise RuntimeError(f"gpg could not sign: {_sign_failure(result, passphrase)}")
        return signature

    def verify(self, signature: bytes, data: bytes) -> SignatureCheck:
        """Check a detached signature over ``data`` with the keys of this home."""
        if not signature or len(signature) > MAX_KEY_BYTES:
            return SignatureCheck("malformed", detail="empty or oversized signature")
        with tempfile.NamedTemporaryFile(prefix="sig-", dir=self.home) as handle:
            handle.write(signature)
            handle.flush()
            result: Any = self._gpg.verify_data(handle.name, data)
        if len(result.sig_info) > 1:
            return SignatureCheck("malformed", detail="more than one signature")
        primary = result.pubkey_fingerprint or result.fingerprint
        if result.status == "no public key":
            return SignatureCheck("no-key", fingerprint=result.fingerprint, detail=result.key_id)
        if result.status == "signature bad":
            return SignatureCheck("bad", detail=f"bad signature (key id {result.key_id})")
        key_status = result.key_status or ""
        if primary and result.status in {"signature valid", "signing key has expired",
                                         "signing key was revoked"}:
            key = self.key(primary)
            addresses = frozenset(key.addresses) if key else frozenset()
            if "revoked" in key_status or (key is not None and key.revoked):
                return SignatureCheck("revoked-key", primary, addresses, "the key is revoked")
            if "expired" in key_status or (key is not None and key.expired):
                return SignatureCheck("expired-key", primary, addresses, "the key has expired")
            if result.valid:
                return SignatureCheck("good", primary, addresses)
        return SignatureCheck("malformed", detail=str(result.status or "gpg failed"))

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self, stop_agent: bool = True) -> None:
        """Stop this home's gpg-agent (it outlives gpg otherwise; not the agent of a user's
        own keyring, which holds their passphrases) and drop the shortcut."""
        gpgconf = shutil.which("gpgconf")
        if gpgconf and stop_agent:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([gpgconf, "--homedir", self.path, "--kill", "gpg-agent"],  # noqa: S603
                               capture_output=True, timeout=10, check=False)
        if self._shortcut is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._shortcut, "h"))
                os.rmdir(self._shortcut)
            self._shortcut = None

    def _run(self, args: list[str]) -> subprocess.CompletedProcess[bytes]:
        command = [self.binary, "--homedir", self.path, "--batch", "--no-tty",
                   "--no-auto-key-retrieve", *args]
        done = subprocess.run(command, capture_output=True, timeout=60, check=False)  # noqa: S603
        if done.returncode != 0:
            raise RuntimeError(
                f"gpg {args[-3:]} failed: {done.stderr.decode(errors='replace').strip()}")
        return done


def _sign_failure(result: Any, passphrase: str | None) -> str:
    """Why gpg made no signature, in words a user can act on (from its messages)."""
    stderr = str(getattr(result, "stderr", "") or "")
    if "BAD_PASSPHRASE" in stderr or "bad passphrase" in stderr.lower():
        return "bad passphrase"
    if passphrase is None and any(sign in stderr for sign in (
            "MISSING_PASSPHRASE", "NEED_PASSPHRASE", "Inappropriate ioctl", "No pinentry")):
        return "the key needs a passphrase (openpgp.passphrase_file, or a gpg-agent holding it)"
    lines = [line for line in stderr.splitlines() if line and not line.startswith("[GNUPG:]")]
    return str(result.status or (lines[-1] if lines else "no output"))


def _uid(name: str, address: str) -> str:
    """``freecall alice-laptop <alice@a.test>``: e-mail form, so mail keys and ours agree."""
    return f"{name} <{normalise_address(address)}>"
