"""Gossip datagram codec: header, typed sections, MAC trailer. Pure and hostile-input safe.

Every datagram is at most 1200 bytes (no IP fragmentation on any sane path). Layout (big-endian):

    0   1   magic: 0xF1 authenticated, 0xF0 hello (first contact, no MAC)
    1   32  sender's Ed25519 public key (the node id is derived from it)
    33  4   sender's clock, Unix seconds (replay window)
    37  ..  sections: type u8, length u16, payload
    -16 16  MAC (authenticated datagrams only): keyed BLAKE2b-128 over all preceding bytes

Decoding raises only :class:`WireError`. Unknown section types are skipped (forward compatible).
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from dataclasses import dataclass
from typing import Any, Final

MAX_DATAGRAM = 1200
MAGIC_AUTH = 0xF1
MAGIC_HELLO = 0xF0
HEADER = struct.Struct(">B32sI")
MAC_SIZE = 16
OVERHEAD = HEADER.size + MAC_SIZE
SECTION = struct.Struct(">BH")
DIGEST = struct.Struct(">8sQ")
DIGEST_SIZE = DIGEST.size
_U32 = struct.Struct(">I")
_LOOKUP = struct.Struct(">IBB")
_ANSWER = struct.Struct(">IB")
_PAGE = struct.Struct(">BBB")
_HOME_ONLY = 0x80
MAX_KEY_LEN = 253


class WireError(ValueError):
    """A datagram that cannot be parsed. Never anything else escapes decoding."""


class Sec:
    """Section types: plain ints, not an IntEnum (reading an IntEnum member costs ~140 ns on
    Python 3.11, and the codec and gossip read them for every section of every datagram)."""

    PAD: Final = 0
    PING: Final = 1  # u32 nonce: please ACK (liveness probe; opens an exchange)
    ACK: Final = 2  # u32 nonce
    NEED: Final = 3  # bitmap, one bit per group the sender lacks contacts in
    PAGE: Final = 4  # anti-entropy: sub_bits u8, index u8, flags u8, digests of that page
    HAVE: Final = 5  # digests of recently changed records (rumour)
    WANT: Final = 6  # 8-byte keys of records the sender asks for
    RECORD: Final = 7  # one signed record
    RELAY: Final = 8  # hops u8, record: store it in its home groups for me (a newcomer's own)
    DEAD: Final = 9  # digests of records the sender found dead
    LOOKUP: Final = 10  # qid u32, hops u8 (0x80: home members only), key length u8, key [, origin]
    ANSWER: Final = 11  # qid u32, status u8 (records travel in RECORD sections)
    HELLO: Final = 12  # u32 nonce (first contact: the sender does not know our key yet)
    HOME_HAVE: Final = 13  # like HAVE, for records homed in the receiver's group (fetched first)
    NEED_HOME: Final = 14  # u16 groups: the sender's record is homed there and it knows nobody
    WANT_LOW: Final = 15  # like WANT, for records that are merely interesting (served as bulk)
    SUMMARY: Final = 16  # anti-entropy: sub_bits u8, one u32 hash of the home records per slice


class Answer:
    """Status of a lookup answer (plain ints, as :class:`Sec`)."""

    FOUND: Final = 1
    NOT_FOUND: Final = 2  # authoritative: a settled member of the home group has nothing
    UNSURE: Final = 3  # nothing here, but this node is not authoritative
    FORWARDED: Final = 4  # passed to other members of the home group; they answer the origin


PAGE_COMPLETE = 1
_CONTENT = frozenset(
    (Sec.RECORD, Sec.RELAY, Sec.HAVE, Sec.HOME_HAVE, Sec.PAGE, Sec.WANT, Sec.WANT_LOW,
     Sec.SUMMARY)
)


@dataclass(frozen=True, slots=True)
class Lookup:
    """A lookup request; ``origin`` is set when a node forwards it on someone's behalf."""

    qid: int
    hops: int
    key: str
    origin_pk: bytes | None = None
    origin_addr: tuple[str, int] | None = None
    home_only: bool = False
    """Only a member of the key's home group may answer (not a cache): finds members."""


_NONE: list[Any] = []
"""Every absent list section of a :class:`Message` (read only)."""


class Message:
    """A parsed datagram body: every section, grouped by type.

    Absent sections read as empty (one shared, never appended-to empty list, so parsing a
    small datagram allocates little); the parser gives a field its own list when a section
    appears (and tells by identity with that list, without the instance's ``__dict__``,
    which would cost every later attribute read a dictionary lookup)."""

    pings: list[int] = _NONE
    acks: list[int] = _NONE
    need: bytes | None = None
    need_home: list[int] = _NONE
    page: tuple[int, int, int, list[tuple[bytes, int]]] | None = None
    page_raw: bytes = b""
    """The page's digests as sent (an in-sync page is recognised by these bytes alone)."""
    summary: tuple[int, bytes] | None = None
    """(sub_bits, the slices' u32 hashes as sent): compared with ours as bytes."""
    have: list[tuple[bytes, int]] = _NONE
    home_have: list[tuple[bytes, int]] = _NONE
    want: list[bytes] = _NONE
    want_low: list[bytes] = _NONE
    records: list[bytes] = _NONE
    relays: list[bytes] = _NONE
    dead: list[tuple[bytes, int]] = _NONE
    lookups: list[Lookup] = _NONE
    answers: list[tuple[int, int]] = _NONE
    hello: int | None = None


def _digests(payload: bytes) -> list[tuple[bytes, int]]:
    if len(payload) % DIGEST_SIZE:
        raise WireError("digest list length")
    return list(DIGEST.iter_unpack(payload))


def _addr_decode(p: bytes, off: int) -> tuple[tuple[str, int], int]:
    fam = p[off]
    size = 4 if fam == 4 else 16 if fam == 6 else 0
    if not size or off + 1 + size + 2 > len(p):
        raise WireError("origin address")
    host = str(ipaddress.ip_address(p[off + 1 : off + 1 + size]))
    port = int.from_bytes(p[off + 1 + size : off + 3 + size], "big")
    return (host, port), off + 3 + size


def addr_encode(addr: tuple[str, int]) -> bytes:
    """Family byte, packed IP, port (for lookup origins)."""
    ip = ipaddress.ip_address(addr[0])
    return bytes((ip.version,)) + ip.packed + addr[1].to_bytes(2, "big")


def _lookup(p: bytes) -> Lookup:
    if len(p) < _LOOKUP.size:
        raise WireError("lookup")
    qid, hbyte, klen = _LOOKUP.unpack_from(p, 0)
    hops, home_only = hbyte & 0x7F, bool(hbyte & _HOME_ONLY)
    end = _LOOKUP.size + klen
    if klen == 0 or end > len(p):
        raise WireError("lookup key")
    try:
        key = p[_LOOKUP.size : end].decode()
    except UnicodeDecodeError as exc:
        raise WireError("lookup key") from exc
    if end == len(p):
        return Lookup(qid, hops, key, home_only=home_only)
    if end + 32 > len(p):
        raise WireError("lookup origin")
    pk = bytes(p[end : end + 32])
    addr, off = _addr_decode(p, end + 32)
    if off != len(p):
        raise WireError("lookup trailing bytes")
    return Lookup(qid, hops, key, pk, addr, home_only)


def split(data: bytes) -> tuple[int, bytes, int]:
    """Check size and magic; return (magic, sender public key, timestamp)."""
    n = len(data)
    if n > MAX_DATAGRAM or n < HEADER.size:
        raise WireError("datagram size")
    magic, pk, ts = HEADER.unpack_from(data, 0)
    if magic == MAGIC_AUTH:
        if n < OVERHEAD:
            raise WireError("datagram size")
    elif magic != MAGIC_HELLO:
        raise WireError("magic")
    return magic, pk, ts


# section types as module constants for the parser's dispatch (a global read is the
# cheapest on 3.11, a class attribute costs ~15 ns more per comparison)
_RECORD, _HAVE, _HOME_HAVE, _PING, _ACK = Sec.RECORD, Sec.HAVE, Sec.HOME_HAVE, Sec.PING, Sec.ACK
_WANT, _WANT_LOW, _PAGE_T, _SUMMARY, _NEED = (
    Sec.WANT, Sec.WANT_LOW, Sec.PAGE, Sec.SUMMARY, Sec.NEED
)
_DEAD, _NEED_HOME, _RELAY, _LOOKUP_T, _ANSWER_T, _HELLO = (
    Sec.DEAD, Sec.NEED_HOME, Sec.RELAY, Sec.LOOKUP, Sec.ANSWER, Sec.HELLO
)
_WANTS = frozenset((_WANT, _WANT_LOW))
_SECTION_UNPACK = SECTION.unpack_from
_U32_UNPACK = _U32.unpack


def parse(data: bytes, start: int, end: int) -> Message:
    """Parse the sections in ``data[start:end]``."""
    m = Message()
    off = start
    unpack = _SECTION_UNPACK
    try:
        while off < end:
            if off + 3 > end:
                raise WireError("section header")
            stype, size = unpack(data, off)
            off += 3
            nxt = off + size
            if nxt > end:
                raise WireError("section length")
            p = data[off:nxt]
            off = nxt
            if stype == _RECORD:
                if m.records is _NONE:
                    m.records = [p]
                else:
                    m.records.append(p)
            elif stype == _PING:
                if size != 4:
                    raise WireError("ping")
                if m.pings is _NONE:
                    m.pings = []
                m.pings.append(_U32_UNPACK(p)[0])
            elif stype == _ACK:
                if size != 4:
                    raise WireError("ack")
                if m.acks is _NONE:
                    m.acks = []
                m.acks.append(_U32_UNPACK(p)[0])
            elif stype == _HAVE:
                if m.have is _NONE:
                    m.have = []
                m.have.extend(_digests(p))
            elif stype == _HOME_HAVE:
                if m.home_have is _NONE:
                    m.home_have = []
                m.home_have.extend(_digests(p))
            elif stype == _SUMMARY:
                if size < 1 or m.summary is not None:
                    raise WireError("summary")
                sub_bits = p[0]
                if sub_bits > 6 or size != 1 + (4 << sub_bits):
                    raise WireError("summary size")
                m.summary = (sub_bits, p[1:])
            elif stype in _WANTS:
                if size % 8:
                    raise WireError("want")
                keys = [p[i : i + 8] for i in range(0, size, 8)]
                if stype == _WANT:
                    m.want = keys if m.want is _NONE else m.want + keys
                else:
                    m.want_low = keys if m.want_low is _NONE else m.want_low + keys
            elif stype == _PAGE_T:
                if size < 3 or m.page is not None:
                    raise WireError("page")
                sub_bits, index, flags = _PAGE.unpack_from(p, 0)
                if sub_bits > 6 or index >= (1 << sub_bits):
                    raise WireError("page index")
                m.page_raw = p[3:]
                m.page = (sub_bits, index, flags, _digests(m.page_raw))
            elif stype == _NEED:
                if not 0 < size <= 8192 or m.need is not None:
                    raise WireError("need")
                m.need = p
            elif stype == _DEAD:
                if m.dead is _NONE:
                    m.dead = []
                m.dead.extend(_digests(p))
            elif stype == _NEED_HOME:
                if size % 2 or size > 32:
                    raise WireError("need_home")
                m.need_home = [
                    int.from_bytes(p[i : i + 2], "big") for i in range(0, size, 2)
                ]
            elif stype == _RELAY:
                if m.relays is _NONE:
                    m.relays = []
                m.relays.append(p)
            elif stype == _LOOKUP_T:
                if m.lookups is _NONE:
                    m.lookups = []
                m.lookups.append(_lookup(p))
            elif stype == _ANSWER_T:
                if size != _ANSWER.size:
                    raise WireError("answer")
                if m.answers is _NONE:
                    m.answers = []
                m.answers.append(_ANSWER.unpack(p))
            elif stype == _HELLO:
                if size != 4:
                    raise WireError("hello")
                m.hello = _U32_UNPACK(p)[0]
            # PAD and unknown types: skipped
    except (struct.error, IndexError, ValueError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError(str(exc)) from exc
    return m


_blake2b = hashlib.blake2b
_HEADER_PACK = HEADER.pack
_SECTION_PACK = SECTION.pack


def mac(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2b-128: a MAC by design (RFC 7693 keyed mode), ~1 µs per datagram
    (:meth:`Builder.finish` and gossip's receive compute it inline, the same way)."""
    return _blake2b(data, key=key, digest_size=MAC_SIZE).digest()


class Builder:
    """Accumulates sections for one datagram and never lets it exceed ``limit`` bytes."""

    __slots__ = ("content", "limit", "parts", "size")

    def __init__(self, limit: int = MAX_DATAGRAM) -> None:
        self.parts: list[bytes] = []
        self.size = OVERHEAD
        self.limit = limit
        self.content = False
        """True once a section carrying records or digests was added (budget class)."""

    def room(self) -> int:
        """Payload bytes still available for one more section."""
        return self.limit - self.size - SECTION.size

    def add(self, stype: int, payload: bytes) -> bool:
        """Append a section if it fits; False (and nothing added) otherwise."""
        n = len(payload)
        size = self.size + n + 3
        if size > self.limit or n > 0xFFFF:
            return False
        parts = self.parts
        parts.append(_SECTION_PACK(stype, n))
        parts.append(payload)
        self.size = size
        if stype in _CONTENT:
            self.content = True
        return True

    def __bool__(self) -> bool:
        return bool(self.parts)

    def finish(self, public_key: bytes, ts: int, key: bytes) -> bytes:
        """Authenticated datagram."""
        msg = b"".join([_HEADER_PACK(MAGIC_AUTH, public_key, ts & 0xFFFFFFFF), *self.parts])
        return msg + _blake2b(msg, key=key, digest_size=MAC_SIZE).digest()

    def finish_hello(self, public_key: bytes, ts: int, pad_to: int = 0) -> bytes:
        """Unauthenticated first-contact datagram, padded so the answer is never larger."""
        head = HEADER.pack(MAGIC_HELLO, public_key, ts & 0xFFFFFFFF)
        body = b"".join(self.parts)
        short = pad_to - len(head) - len(body) - SECTION.size
        if short > 0:
            body += SECTION.pack(Sec.PAD, short) + bytes(short)
        return head + body


def digests(items: list[tuple[bytes, int]]) -> bytes:
    """Encode (key, seq) pairs."""
    pack = DIGEST.pack
    return b"".join([pack(k, s) for k, s in items])


def encode_lookup(q: Lookup) -> bytes:
    """LOOKUP payload."""
    key = q.key.encode()
    if not 0 < len(key) <= MAX_KEY_LEN:
        raise WireError("lookup key")
    if not 0 <= q.hops < 0x80:
        raise WireError("lookup hops")
    out = _LOOKUP.pack(q.qid, q.hops | (_HOME_ONLY if q.home_only else 0), len(key)) + key
    if q.origin_pk is not None and q.origin_addr is not None:
        out += q.origin_pk + addr_encode(q.origin_addr)
    return out


def encode_u32(v: int) -> bytes:
    """Nonce payload."""
    return _U32.pack(v & 0xFFFFFFFF)


def encode_answer(qid: int, status: int) -> bytes:
    """ANSWER payload."""
    return _ANSWER.pack(qid, status)


def encode_page(sub_bits: int, index: int, complete: bool, items: list[tuple[bytes, int]]) -> bytes:
    """PAGE payload."""
    return _PAGE.pack(sub_bits, index, PAGE_COMPLETE if complete else 0) + digests(items)


def encode_page_raw(sub_bits: int, index: int, complete: bool, encoded: bytes) -> bytes:
    """PAGE payload from digests already encoded (:func:`digests`)."""
    return _PAGE.pack(sub_bits, index, PAGE_COMPLETE if complete else 0) + encoded


def encode_summary(sub_bits: int, hashes: bytes) -> bytes:
    """SUMMARY payload: ``hashes`` is one u32 per slice (``4 << sub_bits`` bytes)."""
    if sub_bits > 6 or len(hashes) != 4 << sub_bits:
        raise WireError("summary size")
    return bytes((sub_bits,)) + hashes
