"""STUN messages (RFC 5389) for the relay's server side: a strict, bounded codec.

Why not ``aioice.stun``: it is a client codec. Its parser lets ``struct.error`` escape on a
truncated attribute, drops unknown comprehension-required attributes silently (a server must
answer them with 420, RFC 5389 section 7.3.1), does not check the magic cookie, and builds
XOR values byte by byte. The relay answers hostile datagrams from the whole Internet, so its
parser raises only :class:`StunError` (a ``ValueError``), caps the attribute count, and keeps
the attributes as raw ``(type, value)`` pairs that the server decodes on demand. The tests
cross-check this codec against aioice's in both directions.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "FINGERPRINT_XOR",
    "HEADER_SIZE",
    "MAGIC_COOKIE",
    "Attr",
    "Class",
    "Method",
    "StunError",
    "StunMessage",
    "decode_error_code",
    "decode_xor_address",
    "encode_error_code",
    "encode_message",
    "encode_unknown_attributes",
    "encode_xor_address",
    "is_stun",
    "long_term_key",
    "parse_message",
]

# RFC 5389 section 6: 20-byte header, magic cookie, 96-bit transaction id.
HEADER_SIZE = 20
MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
FINGERPRINT_XOR = 0x5354554E  # RFC 5389 section 15.5: CRC-32 XOR "STUN"
MAX_ATTRIBUTES = 64  # far more than any real request carries; bounds work per datagram
_HEADER = struct.Struct("!HHI12s")
_ATTR_HEADER = struct.Struct("!HH")


class StunError(ValueError):
    """A datagram that is not a well-formed STUN message (never anything else escapes)."""


class Method(IntEnum):
    """STUN/TURN methods (RFC 5389 section 18.1, RFC 5766 section 13)."""

    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class Class(IntEnum):
    """The two class bits C1 C0 of the message type (RFC 5389 section 6)."""

    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


class Attr(IntEnum):
    """Attribute types this server knows (RFC 5389 section 18.2, RFC 5766 section 14,
    RFC 6156 section 4.1.1). Below 0x8000 is comprehension-required."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    XOR_MAPPED_ADDRESS = 0x0020
    RESERVATION_TOKEN = 0x0022
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028


def _type_of(method: int, cls: int) -> int:
    """RFC 5389 section 6, figure 3: method bits M0-M11 interleaved with class bits C0, C1."""
    return ((method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2)
            | ((cls & 1) << 4) | ((cls & 2) << 7))


def _split_type(msg_type: int) -> tuple[int, int]:
    method = (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2)
    cls = ((msg_type >> 4) & 1) | ((msg_type >> 7) & 2)
    return method, cls


@dataclass(slots=True)
class StunMessage:
    """A parsed message; attribute values stay raw bytes until the server asks for one."""

    method: int
    cls: int
    transaction_id: bytes
    attributes: list[tuple[int, bytes]]
    raw: bytes
    integrity_at: int | None = None
    """Offset of the MESSAGE-INTEGRITY attribute in ``raw`` (RFC 5389 section 15.4)."""
    has_fingerprint: bool = False

    def get(self, attr: int) -> bytes | None:
        """The first value of ``attr`` (RFC 5389 section 15: later duplicates are ignored)."""
        for kind, value in self.attributes:
            if kind == attr:
                return value
        return None

    def unknown_required(self, known: frozenset[int]) -> list[int]:
        """Comprehension-required attributes (type < 0x8000) outside ``known``
        (RFC 5389 section 7.3.1: a request carrying one gets 420)."""
        out: list[int] = []
        for kind, _ in self.attributes:
            if kind < 0x8000 and kind not in known and kind not in out:
                out.append(kind)
        return out

    def check_integrity(self, key: bytes) -> bool:
        """RFC 5389 section 15.4: HMAC-SHA1 over the message up to MESSAGE-INTEGRITY, with the
        header length covering the attribute itself."""
        if self.integrity_at is None:
            return False
        got = self.get(Attr.MESSAGE_INTEGRITY)
        if got is None or len(got) != 20:
            return False
        covered = bytearray(self.raw[: self.integrity_at])
        struct.pack_into("!H", covered, 2, self.integrity_at - HEADER_SIZE + 24)
        return hmac.compare_digest(got, hmac.new(key, covered, hashlib.sha1).digest())


def is_stun(data: bytes) -> bool:
    """Cheap demultiplexing test (RFC 5389 section 6, RFC 7983): top two bits zero, cookie."""
    return len(data) >= HEADER_SIZE and data[0] < 0x40 and data[4:8] == _COOKIE_BYTES


def parse_message(data: bytes) -> StunMessage:
    """Parse one datagram; raise :class:`StunError` for anything that is not valid STUN.

    Checks of RFC 5389 section 7.3: two leading zero bits, the magic cookie, a length that
    is a multiple of 4 and matches the datagram, attributes that fit; a FINGERPRINT must be
    last and correct (section 15.5); attributes after MESSAGE-INTEGRITY other than
    FINGERPRINT are ignored (section 15.4).
    """
    size = len(data)
    if size < HEADER_SIZE:
        raise StunError("shorter than a STUN header")
    msg_type, length, cookie, tid = _HEADER.unpack_from(data, 0)
    if msg_type & 0xC000:
        raise StunError("first two bits are not zero")
    if cookie != MAGIC_COOKIE:
        raise StunError("no magic cookie (RFC 3489 messages are not served)")
    if length & 3:
        raise StunError("length is not a multiple of 4")
    if HEADER_SIZE + length != size:
        raise StunError("length does not match the datagram")
    method, cls = _split_type(msg_type)
    attributes: list[tuple[int, bytes]] = []
    integrity_at: int | None = None
    has_fingerprint = False
    pos = HEADER_SIZE
    while pos < size:
        if has_fingerprint:
            raise StunError("attribute after FINGERPRINT")
        if pos + 4 > size:
            raise StunError("truncated attribute header")
        kind, alen = _ATTR_HEADER.unpack_from(data, pos)
        start = pos + 4
        end = start + alen
        if end > size:
            raise StunError("attribute runs past the end")
        value = data[start:end]
        pos = end + (-alen & 3)
        if pos > size:
            raise StunError("attribute padding runs past the end")
        if kind == Attr.FINGERPRINT:
            if alen != 4:
                raise StunError("bad FINGERPRINT length")
            covered = bytearray(data[: start - 4])
            struct.pack_into("!H", covered, 2, start - 4 - HEADER_SIZE + 8)
            expected = (binascii.crc32(covered) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            if struct.unpack("!I", value)[0] != expected:
                raise StunError("FINGERPRINT does not match")
            has_fingerprint = True
            continue
        if integrity_at is not None:
            continue  # RFC 5389 section 15.4: ignored after MESSAGE-INTEGRITY
        if len(attributes) >= MAX_ATTRIBUTES:
            raise StunError("too many attributes")
        if kind == Attr.MESSAGE_INTEGRITY:
            integrity_at = start - 4
        attributes.append((kind, value))
    return StunMessage(method, cls, tid, attributes, data, integrity_at, has_fingerprint)


def encode_message(
    method: int,
    cls: int,
    transaction_id: bytes,
    attributes: Iterable[tuple[int, bytes]],
    *,
    key: bytes | None = None,
    fingerprint: bool = True,
) -> bytes:
    """Serialise a message; with ``key``, add MESSAGE-INTEGRITY (RFC 5389 section 15.4), then
    FINGERPRINT (section 15.5) unless told not to."""
    body = bytearray()
    for kind, value in attributes:
        body += _ATTR_HEADER.pack(kind, len(value))
        body += value
        body += bytes(-len(value) & 3)
    head = bytearray(_HEADER.pack(_type_of(method, cls), 0, MAGIC_COOKIE, transaction_id))
    if key is not None:
        struct.pack_into("!H", head, 2, len(body) + 24)
        mac = hmac.new(key, bytes(head + body), hashlib.sha1).digest()
        body += _ATTR_HEADER.pack(Attr.MESSAGE_INTEGRITY, 20) + mac
    if fingerprint:
        struct.pack_into("!H", head, 2, len(body) + 8)
        crc = (binascii.crc32(bytes(head + body)) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        body += _ATTR_HEADER.pack(Attr.FINGERPRINT, 4) + struct.pack("!I", crc)
    struct.pack_into("!H", head, 2, len(body))
    return bytes(head + body)


def encode_xor_address(address: tuple[str, int], transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS value (RFC 5389 section 15.2): port XOR the cookie's top half,
    address XOR the cookie (IPv4) or the cookie and transaction id (IPv6)."""
    ip = ipaddress.ip_address(address[0])
    port = address[1] ^ (MAGIC_COOKIE >> 16)
    pad = _COOKIE_BYTES + transaction_id
    packed = ip.packed
    xored = bytes(b ^ p for b, p in zip(packed, pad, strict=False))
    family = 1 if ip.version == 4 else 2
    return struct.pack("!BBH", 0, family, port) + xored


def decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    """Inverse of :func:`encode_xor_address`; :class:`StunError` on a malformed value."""
    if len(value) < 4:
        raise StunError("address attribute too short")
    _, family, xport = struct.unpack_from("!BBH", value, 0)
    want = {1: 4, 2: 16}.get(family)
    if want is None or len(value) != 4 + want:
        raise StunError("bad address family or length")
    pad = _COOKIE_BYTES + transaction_id
    raw = bytes(b ^ p for b, p in zip(value[4:], pad, strict=False))
    host = str(ipaddress.IPv4Address(raw) if want == 4 else ipaddress.IPv6Address(raw))
    return host, xport ^ (MAGIC_COOKIE >> 16)


def encode_error_code(code: int, reason: str) -> bytes:
    """ERROR-CODE value (RFC 5389 section 15.6): class and number, then a UTF-8 reason."""
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode()


def decode_error_code(value: bytes) -> tuple[int, str]:
    if len(value) < 4:
        raise StunError("ERROR-CODE too short")
    _, klass, number = struct.unpack_from("!HBB", value, 0)
    return (klass & 7) * 100 + number, value[4:].decode("utf-8", "replace")


def encode_unknown_attributes(kinds: Sequence[int]) -> bytes:
    """UNKNOWN-ATTRIBUTES value (RFC 5389 section 15.9): 16-bit types."""
    return b"".join(struct.pack("!H", k) for k in kinds)


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 5389 section 15.4: key = MD5(username ":" realm ":" SASLprep(password)).

    The passwords here are base64 (ASCII), which SASLprep leaves unchanged.
    """
    text = f"{username}:{realm}:{password}".encode()
    return hashlib.md5(text, usedforsecurity=False).digest()
