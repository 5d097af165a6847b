"""Node identity and signed node records: what a node says about itself to the mesh.

A record is a small binary blob signed by the node's long-term Ed25519 key. Anyone may relay it,
nobody can alter it, and a newer one (higher ``seq``) replaces an older one. The byte layout is
documented in docs/peering.md and is the only format on the wire and on disk.

Pure code: no clock (``now`` is passed in), no sockets; key generation only where asked.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from freecall.storage import SECRET_MODE, atomic_write

RECORD_VERSION = 1
MAX_RECORD_SIZE = 1024
MAX_ADDRESSES = 8
MAX_ROUTES = 32
MAX_EXTENSIONS = 8
MAX_ROUTE_LEN = 253
MAX_TTL = 24 * 3600
"""A record may not claim to live longer than this (plus clock skew): bounds replay of old data."""
CLOCK_SKEW = 120.0
SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32
NODE_ID_SIZE = 16
OPENPGP_FINGERPRINT_SIZES = (20, 32)
"""RFC 4880 section 12.2 (v4, SHA-1) and RFC 9580 section 5.5.4 (v6, SHA-256) fingerprints."""
KEY_SIZE = 8
"""Internal key of a record: the first 8 bytes of the node id (see docs/peering.md, Identity)."""

SIGN_CONTEXT = b"freecall-record-v1\x00"
"""Domain separation: what is signed is SIGN_CONTEXT followed by the record body."""
_NODE_ID_CONTEXT = b"freecall-node-id-v1\x00"
_ROUTE_CONTEXT = b"freecall-route-v1\x00"
_FIXED = struct.Struct(">BB32sQI")  # version, flags, public key, seq, expires
_PORT = struct.Struct(">H")
_KEY_FILE = "node.key"
_KEY_MAGIC = b"freecall-node-key-v1 "


class RecordError(ValueError):
    """A record (or key file) is malformed, oversized, badly signed or out of date.

    ``reason`` is a short machine word used for counters: malformed, oversized, forged, expired,
    future.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Flag(IntEnum):
    """Capabilities a node announces (bit flags)."""

    RELAY = 1  # relays media for others (TURN-like, see relay/)
    STUN = 2  # answers STUN binding requests
    MEDIA = 4  # takes media directly (has a public media address)


class AddrKind(IntEnum):
    """What an advertised address is for. Unknown kinds are kept (forward compatible)."""

    GOSSIP = 1
    SIP_UDP = 2
    SIP_TCP = 3
    SIP_TLS = 4
    MEDIA = 5
    RELAY = 6
    STUN = 7
    REFLEXIVE = 8  # the node's public address as a STUN server saw it (behind NAT)


class Ext(IntEnum):
    """Extension fields bound to the node key by the record signature.

    An extension is an optional TLV: a record without one parses the same, and a node that
    does not know a type keeps it (it is signed) and ignores it.
    """

    OPENPGP_FINGERPRINT = 1  # v4 (20 bytes) or v6 (32 bytes) fingerprint of the SAS signing key
    OPENPGP_BINDING = 2  # reserved: OpenPGP signature over the node key (later issue)
    TLS_FINGERPRINT = 3  # SHA-256 of the TLS public key (SPKI DER: tls.certificate_fingerprint)
    NAME = 4  # human-readable node name, UTF-8, informative only
    VIA_RELAY = 5  # reachable for SIP only through this relay (see RelayVia)


@dataclass(frozen=True, slots=True)
class Address:
    """One advertised transport address (IP literal only: records never carry names)."""

    kind: int
    host: str
    port: int

    @property
    def addr(self) -> tuple[str, int]:
        """The (host, port) tuple sockets use."""
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class RelayVia:
    """Ext.VIA_RELAY: "send SIP for me to this relay, over TLS, to a peer holding this key".

    A node behind NAT attached to a relay (docs/peering.md, "Reachable through a relay") signs
    this into its own record, so nobody else can divert its calls. The relay's address and TLS
    key are carried in full (a caller need not know the relay's own record):
    relay node id (16 bytes), SHA-256 TLS key fingerprint (32), IP version (1: 4 or 6),
    address (4 or 16), port (2, big-endian).
    """

    node_id: bytes
    tls_fingerprint: bytes
    host: str
    port: int

    def encode(self) -> bytes:
        ip = ipaddress.ip_address(self.host)
        if (len(self.node_id) != NODE_ID_SIZE or len(self.tls_fingerprint) != 32
                or not 0 < self.port < 65536):
            raise RecordError("malformed", "relay via")
        return (self.node_id + self.tls_fingerprint + bytes((ip.version,)) + ip.packed
                + _PORT.pack(self.port))

    @classmethod
    def decode(cls, value: bytes) -> RelayVia | None:
        """None for a value this version cannot read (a later format is ignored, not refused)."""
        if len(value) not in (16 + 32 + 1 + 4 + 2, 16 + 32 + 1 + 16 + 2):
            return None
        version = value[48]
        size = 4 if version == 4 else 16 if version == 6 else 0
        if len(value) != 16 + 32 + 1 + size + 2:
            return None
        host = str(ipaddress.ip_address(value[49 : 49 + size]))
        (port,) = _PORT.unpack_from(value, 49 + size)
        if port == 0:
            return None
        return cls(bytes(value[:16]), bytes(value[16:48]), host, port)


def node_id_of(public_key: bytes) -> bytes:
    """Node id: a domain-separated hash of the Ed25519 public key (128 bits)."""
    return hashlib.sha256(_NODE_ID_CONTEXT + public_key).digest()[:NODE_ID_SIZE]


def id_group(node_id: bytes, bits: int) -> int:
    """Group of a node (its top ``bits`` bits); ``bits`` is a network-wide constant."""
    if bits == 0:
        return 0
    return int.from_bytes(node_id[:4], "big") >> (32 - bits)


def route_hash(route: str) -> int:
    """32-bit hash of a normalized route, from which its home group is taken."""
    digest = hashlib.sha256(_ROUTE_CONTEXT + route.encode()).digest()
    return int.from_bytes(digest[:4], "big")


def route_group(route: str, bits: int) -> int:
    """Home group of a route: the group whose members store the records serving it."""
    if bits == 0:
        return 0
    return route_hash(normalize_route(route)) >> (32 - bits)


def fine_bucket(key: bytes) -> int:
    """Anti-entropy bucket (0..63) of a record key, independent of the group bits."""
    return key[7] & 63


_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")


def normalize_domain(domain: str) -> str:
    """Lower-case, strip the root dot, A-label (IDNA) form; raise RecordError if unusable."""
    d = domain.strip().rstrip(".").lower()
    if not d.isascii():
        try:
            d = d.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise RecordError("malformed", f"domain {domain!r}") from exc
    if not d or len(d) > MAX_ROUTE_LEN or not set(d) <= _DOMAIN_CHARS or ".." in d:
        raise RecordError("malformed", f"domain {domain!r}")
    return d


def normalize_route(route: str) -> str:
    """Canonical form of a route: ``domain`` or ``user@domain`` (user part case kept)."""
    if route.startswith("_group."):
        raise RecordError("malformed", "reserved route")  # gossip's group lookups
    if "@" in route:
        user, _, domain = route.rpartition("@")
        if not user or "@" in user or len(user) > 64 or not user.isprintable() or any(
            c.isspace() for c in user
        ):
            raise RecordError("malformed", f"user {route!r}")
        out = f"{user}@{normalize_domain(domain)}"
    else:
        out = normalize_domain(route)
    if len(out.encode()) > MAX_ROUTE_LEN:
        raise RecordError("malformed", "route too long")
    return out


def _encode_address(a: Address) -> bytes:
    ip = ipaddress.ip_address(a.host)
    if not 0 < a.port < 65536 or not 0 < a.kind < 256:
        raise RecordError("malformed", f"address {a}")
    return bytes((a.kind, ip.version)) + ip.packed + _PORT.pack(a.port)


def encode_body(
    public_key: bytes,
    seq: int,
    expires: int,
    addresses: tuple[Address, ...],
    routes: tuple[str, ...],
    flags: int = 0,
    extensions: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """The signed part of a record (everything but the trailing signature)."""
    if len(addresses) > MAX_ADDRESSES or len(routes) > MAX_ROUTES:
        raise RecordError("oversized", "too many addresses or routes")
    if len(extensions) > MAX_EXTENSIONS:
        raise RecordError("oversized", "too many extensions")
    if not 0 <= seq < 2**64 or not 0 <= expires < 2**32 or not 0 <= flags < 256:
        raise RecordError("malformed", "seq, expires or flags out of range")
    parts = [_FIXED.pack(RECORD_VERSION, flags, public_key, seq, expires), bytes((len(addresses),))]
    parts.extend(_encode_address(a) for a in addresses)
    parts.append(bytes((len(routes),)))
    for r in routes:
        raw = r.encode()
        parts.append(bytes((len(raw),)) + raw)
    parts.append(bytes((len(extensions),)))
    for etype, value in extensions:
        if not 0 < etype < 256 or len(value) > 255:
            raise RecordError("malformed", "extension")
        if etype == Ext.OPENPGP_FINGERPRINT and len(value) not in OPENPGP_FINGERPRINT_SIZES:
            raise RecordError("malformed", "OpenPGP fingerprint size")
        parts.append(bytes((etype, len(value))) + value)
    return b"".join(parts)


@dataclass(frozen=True)
class NodeRecord:
    """A decoded record. Build with :func:`decode_record` or :meth:`NodeIdentity.make_record`.

    ``raw`` is the exact signed encoding; equality and identity of records are by ``raw``.
    Decoding does not check the signature: :class:`RecordCodec` does, once per distinct ``raw``.
    """

    public_key: bytes
    seq: int
    expires: int
    flags: int
    addresses: tuple[Address, ...]
    routes: tuple[str, ...]
    extensions: tuple[tuple[int, bytes], ...]
    signature: bytes
    raw: bytes = field(repr=False)

    node_id: bytes = field(init=False, repr=False, compare=False)
    """128-bit node id derived from the public key."""
    key: bytes = field(init=False, repr=False, compare=False)
    """8-byte internal key (prefix of the node id)."""
    route_hashes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """32-bit hash of every route."""
    gossip_addr: tuple[str, int] | None = field(init=False, repr=False, compare=False)
    """Where this node takes gossip datagrams (its first GOSSIP address)."""
    _homes: tuple[int, frozenset[int]] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Derived once, at decoding (a record is decoded once per distinct encoding), as
        # plain attributes: gossip reads key and gossip_addr on every datagram, and a
        # cached_property is a descriptor lookup on every read, never specialised by 3.11
        node_id = node_id_of(self.public_key)
        gossip_addr = None
        for a in self.addresses:
            if a.kind == AddrKind.GOSSIP:
                gossip_addr = (a.host, a.port)
                break
        setattr_ = object.__setattr__
        setattr_(self, "node_id", node_id)
        setattr_(self, "key", node_id[:KEY_SIZE])
        setattr_(self, "route_hashes", tuple(route_hash(r) for r in self.routes))
        setattr_(self, "gossip_addr", gossip_addr)
        setattr_(self, "_homes", None)

    def homes(self, bits: int) -> frozenset[int]:
        """Groups that store this record: the node's own group and each route's home group."""
        memo = self._homes
        if memo is not None and memo[0] == bits:
            return memo[1]
        if bits == 0:
            out = frozenset((0,))
        else:
            shift = 32 - bits
            groups = (h >> shift for h in self.route_hashes)
            out = frozenset((id_group(self.node_id, bits), *groups))
        object.__setattr__(self, "_homes", (bits, out))  # frozen dataclass: a memo
        return out

    def addresses_of(self, kind: int) -> tuple[Address, ...]:
        """Advertised addresses of one kind, in the node's order of preference."""
        return tuple(a for a in self.addresses if a.kind == kind)

    @property
    def domains(self) -> tuple[str, ...]:
        """Domain routes this node serves."""
        return tuple(r for r in self.routes if "@" not in r)

    @property
    def users(self) -> tuple[str, ...]:
        """User-address routes this node serves."""
        return tuple(r for r in self.routes if "@" in r)

    @property
    def relay(self) -> bool:
        """True if the node offers media relay."""
        return bool(self.flags & Flag.RELAY)

    def extension(self, etype: int) -> bytes | None:
        """Value of the first extension of this type, if any."""
        for t, v in self.extensions:
            if t == etype:
                return v
        return None

    @property
    def openpgp_fingerprint(self) -> bytes | None:
        """Fingerprint of the OpenPGP key that signs this node's SAS hashes, bound to the node
        key by the record signature. A value of another size (a later format) is ignored,
        not refused: decoding stays the same on old and new nodes."""
        value = self.extension(Ext.OPENPGP_FINGERPRINT)
        return value if value is not None and len(value) in OPENPGP_FINGERPRINT_SIZES else None

    @property
    def tls_fingerprint(self) -> bytes | None:
        """SHA-256 fingerprint of the node's TLS certificate."""
        return self.extension(Ext.TLS_FINGERPRINT)

    @property
    def via_relay(self) -> RelayVia | None:
        """The relay this node takes SIP through (behind NAT), if its record names one."""
        value = self.extension(Ext.VIA_RELAY)
        return RelayVia.decode(value) if value is not None else None

    def newer_than(self, other: NodeRecord) -> bool:
        """Replacement order: higher seq wins; at equal seq the larger signature (deterministic).

        The tie-break only matters if a node signs two different records with one seq; every
        node then keeps the same one, so the mesh still converges.
        """
        if self.seq != other.seq:
            return self.seq > other.seq
        return self.signature > other.signature

    def check_time(self, now: float) -> None:
        """Raise RecordError if expired or if the expiry is implausibly far away."""
        if self.expires <= now:
            raise RecordError("expired")
        if self.expires > now + MAX_TTL + CLOCK_SKEW:
            raise RecordError("future", "expiry too far ahead")

    def verify_signature(self) -> None:
        """Check the Ed25519 signature (~100 µs); raise RecordError('forged') if bad."""
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(
                self.signature, SIGN_CONTEXT + self.raw[:-SIGNATURE_SIZE]
            )
        except (InvalidSignature, ValueError) as exc:
            raise RecordError("forged", "bad signature") from exc

    def summary(self) -> dict[str, object]:
        """JSON-friendly view (the `/api/peers` fields that come from the record)."""
        return {
            "node_id": self.node_id.hex(),
            "addresses": [
                {"kind": kind_name(a.kind), "host": a.host, "port": a.port}
                for a in self.addresses
            ],
            "routes": list(self.routes),
            "relay": self.relay,
            "openpgp": fp.hex().upper() if (fp := self.openpgp_fingerprint) else None,
            "through_relay": (f"{via.node_id.hex()}@{via.host}:{via.port}"
                              if (via := self.via_relay) is not None else None),
            "seq": self.seq,
            "expires": self.expires,
        }


def kind_name(kind: int) -> str:
    try:
        return AddrKind(kind).name.lower().replace("_", "-")
    except ValueError:
        return str(kind)


def decode_record(raw: bytes) -> NodeRecord:
    """Parse a record (hostile input: only RecordError escapes). Does not verify the signature."""
    n = len(raw)
    if n > MAX_RECORD_SIZE:
        raise RecordError("oversized", f"{n} bytes")
    if n < _FIXED.size + 3 + SIGNATURE_SIZE:
        raise RecordError("malformed", "too short")
    try:
        version, flags, pk, seq, expires = _FIXED.unpack_from(raw, 0)
        if version != RECORD_VERSION:
            raise RecordError("unsupported", f"version {version}")
        end = n - SIGNATURE_SIZE
        off = _FIXED.size
        count = raw[off]
        off += 1
        if count > MAX_ADDRESSES:
            raise RecordError("oversized", "addresses")
        addrs = []
        for _ in range(count):
            kind, fam = raw[off], raw[off + 1]
            size = 4 if fam == 4 else 16 if fam == 6 else 0
            if not size or kind == 0 or off + 4 + size > end:
                raise RecordError("malformed", "address")
            host = str(ipaddress.ip_address(raw[off + 2 : off + 2 + size]))
            (port,) = _PORT.unpack_from(raw, off + 2 + size)
            if port == 0:
                raise RecordError("malformed", "port 0")
            addrs.append(Address(kind, host, port))
            off += 4 + size
        count = raw[off]
        off += 1
        if count > MAX_ROUTES:
            raise RecordError("oversized", "routes")
        routes: list[str] = []
        for _ in range(count):
            size = raw[off]
            if size == 0 or off + 1 + size > end:
                raise RecordError("malformed", "route")
            route = raw[off + 1 : off + 1 + size].decode()
            if normalize_route(route) != route or route in routes:
                raise RecordError("malformed", "route not canonical")
            routes.append(route)
            off += 1 + size
        count = raw[off]
        off += 1
        if count > MAX_EXTENSIONS:
            raise RecordError("oversized", "extensions")
        exts = []
        for _ in range(count):
            etype, size = raw[off], raw[off + 1]
            if etype == 0 or off + 2 + size > end:
                raise RecordError("malformed", "extension")
            exts.append((etype, bytes(raw[off + 2 : off + 2 + size])))
            off += 2 + size
        if off != end:
            raise RecordError("malformed", "trailing bytes")
    except (IndexError, struct.error, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, RecordError):
            raise
        raise RecordError("malformed", str(exc)) from exc
    return NodeRecord(
        public_key=bytes(pk),
        seq=seq,
        expires=expires,
        flags=flags,
        addresses=tuple(addrs),
        routes=tuple(routes),
        extensions=tuple(exts),
        signature=bytes(raw[end:]),
        raw=bytes(raw),
    )


class RecordCodec:
    """Decode and verify records, once per distinct byte string (bounded cache).

    A node sees the same record many times (digests, anti-entropy, lookups); verifying it once
    keeps Ed25519 (~100 µs) off the hot path. Failures are cached too, so replaying one forged
    blob costs one verification. ``capacity=None`` (simulator speed runs only) never forgets,
    and one codec may then be shared by every simulated node: the shortcut the docs state.
    """

    def __init__(self, capacity: int | None = 8192, *, verify: bool = True) -> None:
        self.capacity = capacity
        self.verify = verify
        self._cache: OrderedDict[bytes, NodeRecord | RecordError] = OrderedDict()
        self.verifications = 0

    def remember(self, record: NodeRecord) -> None:
        """Mark a record this process signed itself as verified."""
        self._cache[record.raw] = record

    def load(self, raw: bytes) -> NodeRecord:
        """Decoded, signature-checked record; RecordError (cached) if not acceptable."""
        hit = self._cache.get(raw)
        if hit is None:
            try:
                rec = decode_record(raw)
                if self.verify:
                    self.verifications += 1
                    rec.verify_signature()
                hit = rec
            except RecordError as exc:
                hit = exc
            self._cache[raw] = hit
            if self.capacity is not None and len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        if isinstance(hit, RecordError):
            raise hit
        return hit


class NodeIdentity:
    """The node's long-term key pair: Ed25519 for records, the same secret as X25519 for MACs.

    The X25519 secret is the Ed25519 secret scalar (SHA-512 of the seed, clamped) and the
    X25519 public key is the birational map of the Ed25519 public key, exactly as libsodium's
    ``crypto_sign_ed25519_*_to_curve25519``. So a datagram header that carries only the
    Ed25519 public key is enough for a static-static Diffie-Hellman MAC key: no handshake,
    no extra key to publish or bind.
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes_raw()
        self.node_id: bytes = node_id_of(self.public_key)
        self.key: bytes = self.node_id[:KEY_SIZE]
        self._x25519: X25519PrivateKey | None = None

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh random identity (operating-system randomness)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeIdentity:
        """Identity from a 32-byte seed (key files; reproducible simulations)."""
        if len(seed) != 32:
            raise RecordError("malformed", "seed must be 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike[str]) -> NodeIdentity:
        """Load ``node.key`` from the state directory, or create it (mode 0600) on first start."""
        path = Path(state_dir) / _KEY_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            ident = cls.generate()
            atomic_write(path, _KEY_MAGIC + ident.seed().hex().encode() + b"\n", SECRET_MODE)
            return ident
        if not data.startswith(_KEY_MAGIC):
            raise RecordError("malformed", f"{path}: not a freecall node key")
        try:
            seed = bytes.fromhex(data[len(_KEY_MAGIC) :].strip().decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecordError("malformed", f"{path}: bad key") from exc
        return cls.from_seed(seed)

    def seed(self) -> bytes:
        """The 32-byte secret seed (only for writing the key file)."""
        return self._key.private_bytes_raw()

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature."""
        return self._key.sign(data)

    def x25519(self) -> X25519PrivateKey:
        """X25519 private key with the same secret scalar as the Ed25519 key."""
        if self._x25519 is None:
            scalar = hashlib.sha512(self.seed()).digest()[:32]
            self._x25519 = X25519PrivateKey.from_private_bytes(scalar)
        return self._x25519

    def make_record(
        self,
        *,
        seq: int,
        expires: int,
        addresses: tuple[Address, ...] = (),
        routes: tuple[str, ...] = (),
        flags: int = 0,
        extensions: tuple[tuple[int, bytes], ...] = (),
    ) -> NodeRecord:
        """Build and sign a record (routes are normalized; refuses oversized records)."""
        norm: list[str] = []
        for r in routes:
            n = normalize_route(r)
            if n not in norm:
                norm.append(n)
        body = encode_body(self.public_key, seq, expires, addresses, tuple(norm), flags, extensions)
        raw = body + self.sign(SIGN_CONTEXT + body)
        if len(raw) > MAX_RECORD_SIZE:
            raise RecordError("oversized", f"{len(raw)} bytes")
        return decode_record(raw)


_P25519 = 2**255 - 19


def ed25519_to_x25519_public(public_key: bytes) -> bytes:
    """Montgomery u-coordinate of an Ed25519 public key: u = (1 + y) / (1 - y) mod p."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise RecordError("malformed", "public key size")
    y = int.from_bytes(public_key, "little") & ((1 << 255) - 1)
    if y >= _P25519 or y == 1:
        raise RecordError("forged", "invalid public key")
    u = (1 + y) * pow(1 - y, -1, _P25519) % _P25519
    return u.to_bytes(32, "little")
