"""TURN REST credentials and stateless nonces: what only mesh nodes can obtain.

The scheme is the one coturn implements for ``use-auth-secret`` / ``static-auth-secret``
(draft-uberti-behave-turn-rest-00, section 2.2), so a node can be pointed at coturn as well:

    username = "<unix expiry time>:<node id>"
    password = base64(HMAC-SHA1(shared secret, username))

The relay needs no user database: it recomputes the password from the username. A username whose
expiry time has passed is refused.

Mesh nodes need no copy of the secret: they use **node-key credentials** instead. The username
has the same shape (``"<expiry>:<node id in hex>"``); the password is
``base64(HMAC-SHA1(K, username))`` where ``K`` is derived from a static-static X25519 agreement
between the node's key and the relay's node key (both Ed25519 keys of the host cache, converted
as the gossip layer does, but under their own label, so these keys are independent of the
gossip MAC keys). The node computes ``K`` from the relay's host-cache record; the relay from the
record of the node id in the username. So only a node that holds the private key of a record the
relay knows can obtain an allocation, and quotas stay per node id.

The shared secret is the text of ``relay.secret_file``; it is used as the HMAC key exactly as
written (coturn does the same with ``static-auth-secret``).

Nonces (RFC 5389 section 10.2) are stateless too, like the SIP digest nonces of ``sip/auth.py``:
an issue time and an HMAC over it and the client's address, so a flood of requests leaves no
state behind.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from freecall.peering.records import ed25519_to_x25519_public
from freecall.storage import atomic_write

__all__ = [
    "DEFAULT_TTL",
    "NonceBox",
    "load_or_create_secret",
    "node_credentials",
    "node_key_credentials",
    "node_key_password",
    "node_key_secret",
    "parse_username",
    "turn_password",
]

DEFAULT_TTL = 24 * 3600  # credentials handed to a node live this long (coturn's default REST TTL)
MIN_SECRET_LENGTH = 16


def turn_password(secret: str, username: str) -> str:
    """base64(HMAC-SHA1(secret, username)): coturn's ``static-auth-secret`` password."""
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode("ascii")


def node_credentials(
    secret: str, node_id: str, wall_now: float, ttl: float = DEFAULT_TTL
) -> tuple[str, str]:
    """Username and password for node ``node_id`` valid until ``wall_now + ttl`` (Unix time)."""
    if ":" in node_id or not node_id:
        raise ValueError("a node id must be non-empty and contain no ':'")
    username = f"{int(wall_now + ttl)}:{node_id}"
    return username, turn_password(secret, username)


_NODE_KEY_LABEL = b"freecall TURN node-key credentials v1"


def node_key_secret(own: X25519PrivateKey, own_public: bytes, peer_public: bytes) -> bytes:
    """``K`` of the module docstring, the same on both sides: SHA-256 over a label, the X25519
    shared secret of the two node keys and both Ed25519 public keys (sorted)."""
    shared = own.exchange(X25519PublicKey.from_public_bytes(ed25519_to_x25519_public(peer_public)))
    first, second = sorted((own_public, peer_public))
    return hashlib.sha256(_NODE_KEY_LABEL + shared + first + second).digest()


def node_key_password(secret: bytes, username: str) -> str:
    """base64(HMAC-SHA1(K, username)): the TURN password of node-key credentials."""
    mac = hmac.new(secret, username.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode("ascii")


def node_key_credentials(
    own: X25519PrivateKey, own_public: bytes, relay_public: bytes, node_id: str,
    wall_now: float, ttl: float = DEFAULT_TTL,
) -> tuple[str, str]:
    """A node's username and password for the relay whose node key is ``relay_public``."""
    username = f"{int(wall_now + ttl)}:{node_id}"
    return username, node_key_password(node_key_secret(own, own_public, relay_public), username)


def parse_username(username: str) -> tuple[int, str] | None:
    """``"1700000000:node"`` -> ``(1700000000, "node")``; None when it is not REST-shaped."""
    expiry, sep, node = username.partition(":")
    if not sep or not node or not expiry.isdigit() or len(expiry) > 12:
        return None
    return int(expiry), node


def load_or_create_secret(
    path: str | os.PathLike[str], *, token: Callable[[int], str] = secrets.token_urlsafe
) -> str:
    """The relay's shared secret, generated on first use (mode 0600, atomic write).

    The file holds one line of text; copy it into coturn's ``static-auth-secret`` to let the same
    credentials work there.
    """
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        text = ""
    if text:
        if len(text) < MIN_SECRET_LENGTH:
            raise ValueError(f"{target}: the shared secret is shorter than "
                             f"{MIN_SECRET_LENGTH} characters")
        return text
    text = token(32)
    atomic_write(target, (text + "\n").encode())
    return text


class NonceBox:
    """Stateless nonces: ``<issue time hex>.<HMAC(key, time, client)>`` (RFC 5389 section 10.2).

    ``check`` says whether a nonce is ours and for this client (else it is *bad*), and whether it
    is younger than ``lifetime`` (else it is *stale*); both get 438 with a fresh nonce
    (RFC 5389 section 10.2.2).
    """

    def __init__(self, key: bytes, lifetime: float = 600.0) -> None:
        self._key = key
        self.lifetime = lifetime

    def _mac(self, issued: str, client: tuple[str, int]) -> str:
        text = f"{issued}|{client[0]}".encode()
        return hmac.new(self._key, text, hashlib.sha256).hexdigest()[:24]

    def make(self, now: float, client: tuple[str, int]) -> bytes:
        issued = format(int(now), "x")
        return f"{issued}.{self._mac(issued, client)}".encode()

    def check(self, nonce: bytes, now: float, client: tuple[str, int]) -> bool:
        """True when ``nonce`` is ours, for ``client``, and not stale."""
        if len(nonce) > 64:
            return False
        try:
            issued, _, mac = nonce.decode("ascii").partition(".")
            when = int(issued, 16)
        except (UnicodeDecodeError, ValueError):
            return False
        if not hmac.compare_digest(mac, self._mac(issued, client)):
            return False
        return 0 <= now - when <= self.lifetime
