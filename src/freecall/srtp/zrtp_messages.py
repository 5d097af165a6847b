"""ZRTP packet framing and message formats (RFC 6189 section 5), pure bytes in and out.

Every message of section 5.2-5.16 encodes and decodes here; nothing here knows about keys or
state. Decoding is strict (exact lengths, counts, preamble) because ZRTP messages are hashed
and MAC-ed byte for byte: anything malformed raises `ZrtpError`, never another exception, so the
media bridge can feed it arbitrary datagrams.

Type blocks (hash, cipher, auth tag, key agreement, SAS, signature) are kept as their 4-octet
ASCII wire values, e.g. ``b"B32 "``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

from freecall.srtp.crc32c import crc32c_bytes


class ZrtpError(Exception):
    """Malformed or unusable ZRTP input (the only exception the decoders raise)."""


MAGIC_COOKIE = 0x5A525450  # 'ZRTP', section 5
PREAMBLE = 0x505A  # 'PZ', section 5.2
PACKET_HEADER_LEN = 12
CRC_LEN = 4
MESSAGE_HEADER_LEN = 12  # preamble, length, 8-octet type block
PROTOCOL_VERSION = b"1.10"
MAC_LEN = 8  # all ZRTP MACs are truncated to 64 bits
HASH_IMAGE_LEN = 32
ZID_LEN = 12
MAX_SIG_WORDS = 511  # 9-bit field, section 5.7 / 7.2.1
MAX_ALGOS = 7  # section 5.2: "0 to 7 values"


class ErrorCode(IntEnum):
    """Error codes of RFC 6189 section 5.9, Table 8."""

    MALFORMED_PACKET = 0x10
    CRITICAL_SOFTWARE_ERROR = 0x20
    UNSUPPORTED_VERSION = 0x30
    HELLO_COMPONENTS_MISMATCH = 0x40
    HASH_NOT_SUPPORTED = 0x51
    CIPHER_NOT_SUPPORTED = 0x52
    KEY_EXCHANGE_NOT_SUPPORTED = 0x53
    AUTH_TAG_NOT_SUPPORTED = 0x54
    SAS_NOT_SUPPORTED = 0x55
    NO_SHARED_SECRET = 0x56
    BAD_DH_PUBLIC_VALUE = 0x61
    HVI_MISMATCH = 0x62
    UNTRUSTED_MITM = 0x63
    BAD_CONFIRM_MAC = 0x70
    NONCE_REUSE = 0x80
    EQUAL_ZIDS = 0x90
    SSRC_COLLISION = 0x91
    SERVICE_UNAVAILABLE = 0xA0
    PROTOCOL_TIMEOUT = 0xB0
    GOCLEAR_NOT_ALLOWED = 0x100


def _words(length_octets: int) -> int:
    if length_octets % 4:
        raise ZrtpError("length not a multiple of 4")
    return length_octets // 4


def _header(msg_type: bytes, total_len: int) -> bytes:
    """Preamble, length in words and type block (section 5.2)."""
    return struct.pack("!HH", PREAMBLE, _words(total_len)) + msg_type


def _fixed(value: bytes, size: int, name: str) -> bytes:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} octets, got {len(value)}")
    return value


def _block(value: bytes) -> bytes:
    return _fixed(value, 4, "type block")


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Hello (section 5.2): version, client id, H3, ZID, flags, algorithm lists, MAC keyed by H2."""

    TYPE: ClassVar[bytes] = b"Hello   "
    version: bytes
    client_id: bytes
    h3: bytes
    zid: bytes
    signature_capable: bool = False
    mitm: bool = False
    passive: bool = False
    hash_types: tuple[bytes, ...] = ()
    cipher_types: tuple[bytes, ...] = ()
    auth_tag_types: tuple[bytes, ...] = ()
    key_agreement_types: tuple[bytes, ...] = ()
    sas_types: tuple[bytes, ...] = ()
    mac: bytes = bytes(MAC_LEN)

    def encode(self) -> bytes:
        lists = (
            self.hash_types,
            self.cipher_types,
            self.auth_tag_types,
            self.key_agreement_types,
            self.sas_types,
        )
        for algos in lists:
            if len(algos) > MAX_ALGOS:
                raise ValueError("at most 7 algorithms per list")
        flags = (self.signature_capable << 6) | (self.mitm << 5) | (self.passive << 4)
        hc, cc, ac, kc, sc = (len(a) for a in lists)
        counts = struct.pack("!BBBB", flags, hc, (cc << 4) | ac, (kc << 4) | sc)
        body = (
            _fixed(self.version, 4, "version")
            + _fixed(self.client_id, 16, "client id")
            + _fixed(self.h3, HASH_IMAGE_LEN, "H3")
            + _fixed(self.zid, ZID_LEN, "ZID")
            + counts
            + b"".join(_block(b) for algos in lists for b in algos)
            + _fixed(self.mac, MAC_LEN, "MAC")
        )
        return _header(self.TYPE, MESSAGE_HEADER_LEN + len(body)) + body

    @classmethod
    def decode_body(cls, body: bytes) -> Hello:
        if len(body) < 4 + 16 + 32 + 12 + 4 + MAC_LEN:
            raise ZrtpError("Hello too short")
        flags, byte1, byte2, byte3 = body[64], body[65], body[66], body[67]
        counts = (byte1 & 0x0F, byte2 >> 4, byte2 & 0x0F, byte3 >> 4, byte3 & 0x0F)
        if any(c > MAX_ALGOS for c in counts):
            raise ZrtpError("Hello algorithm count above 7")
        expected = 68 + 4 * sum(counts) + MAC_LEN
        if len(body) != expected:
            raise ZrtpError("Hello length does not match its algorithm counts")
        pos = 68
        lists: list[tuple[bytes, ...]] = []
        for count in counts:
            lists.append(tuple(body[pos + 4 * i : pos + 4 * i + 4] for i in range(count)))
            pos += 4 * count
        return cls(
            version=body[0:4],
            client_id=body[4:20],
            h3=body[20:52],
            zid=body[52:64],
            signature_capable=bool(flags & 0x40),
            mitm=bool(flags & 0x20),
            passive=bool(flags & 0x10),
            hash_types=lists[0],
            cipher_types=lists[1],
            auth_tag_types=lists[2],
            key_agreement_types=lists[3],
            sas_types=lists[4],
            mac=body[pos : pos + MAC_LEN],
        )


@dataclass(frozen=True)
class _Empty:
    """Messages that are only a type block (HelloACK, Conf2ACK, ErrorACK, ClearACK, RelayACK)."""

    TYPE: ClassVar[bytes] = b""

    def encode(self) -> bytes:
        return _header(self.TYPE, MESSAGE_HEADER_LEN)


@dataclass(frozen=True)
class HelloAck(_Empty):
    """HelloACK (section 5.3)."""

    TYPE: ClassVar[bytes] = b"HelloACK"


@dataclass(frozen=True)
class Conf2Ack(_Empty):
    """Conf2ACK (section 5.8)."""

    TYPE: ClassVar[bytes] = b"Conf2ACK"


@dataclass(frozen=True)
class ErrorAck(_Empty):
    """ErrorACK (section 5.10)."""

    TYPE: ClassVar[bytes] = b"ErrorACK"


@dataclass(frozen=True)
class ClearAck(_Empty):
    """ClearACK (section 5.12)."""

    TYPE: ClassVar[bytes] = b"ClearACK"


@dataclass(frozen=True)
class RelayAck(_Empty):
    """RelayACK (section 5.14)."""

    TYPE: ClassVar[bytes] = b"RelayACK"


KA_MULTISTREAM = b"Mult"
KA_PRESHARED = b"Prsh"


@dataclass(frozen=True)
class Commit:
    """Commit (section 5.4): DH mode carries hvi, Multistream a nonce, Preshared nonce + keyID."""

    TYPE: ClassVar[bytes] = b"Commit  "
    h2: bytes
    zid: bytes
    hash_type: bytes
    cipher_type: bytes
    auth_tag_type: bytes
    key_agreement_type: bytes
    sas_type: bytes
    hvi: bytes | None = None
    nonce: bytes | None = None
    key_id: bytes | None = None
    mac: bytes = bytes(MAC_LEN)

    @property
    def is_dh(self) -> bool:
        """True for a Diffie-Hellman mode Commit (section 4.4.1)."""
        return self.key_agreement_type not in (KA_MULTISTREAM, KA_PRESHARED)

    def encode(self) -> bytes:
        if self.key_agreement_type == KA_MULTISTREAM:
            tail = _fixed(self.nonce or b"", 16, "nonce")
        elif self.key_agreement_type == KA_PRESHARED:
            tail = _fixed(self.nonce or b"", 16, "nonce") + _fixed(self.key_id or b"", 8, "keyID")
        else:
            tail = _fixed(self.hvi or b"", 32, "hvi")
        body = (
            _fixed(self.h2, HASH_IMAGE_LEN, "H2")
            + _fixed(self.zid, ZID_LEN, "ZID")
            + _block(self.hash_type)
            + _block(self.cipher_type)
            + _block(self.auth_tag_type)
            + _block(self.key_agreement_type)
            + _block(self.sas_type)
            + tail
            + _fixed(self.mac, MAC_LEN, "MAC")
        )
        return _header(self.TYPE, MESSAGE_HEADER_LEN + len(body)) + body

    @classmethod
    def decode_body(cls, body: bytes) -> Commit:
        if len(body) < 64:
            raise ZrtpError("Commit too short")
        ka = body[56:60]
        common = {
            "h2": body[0:32],
            "zid": body[32:44],
            "hash_type": body[44:48],
            "cipher_type": body[48:52],
            "auth_tag_type": body[52:56],
            "key_agreement_type": ka,
            "sas_type": body[60:64],
        }
        rest = body[64:]
        if ka == KA_MULTISTREAM:
            if len(rest) != 16 + MAC_LEN:
                raise ZrtpError("Multistream Commit must be 25 words")
            return cls(**common, nonce=rest[:16], mac=rest[16:])
        if ka == KA_PRESHARED:
            if len(rest) != 24 + MAC_LEN:
                raise ZrtpError("Preshared Commit must be 27 words")
            return cls(**common, nonce=rest[:16], key_id=rest[16:24], mac=rest[24:])
        if len(rest) != 32 + MAC_LEN:
            raise ZrtpError("DH Commit must be 29 words")
        return cls(**common, hvi=rest[:32], mac=rest[32:])


@dataclass(frozen=True)
class DHPart:
    """DHPart1 / DHPart2 (sections 5.5, 5.6): H1, secret IDs, public value, MAC keyed by H0."""

    part: int  # 1 (responder) or 2 (initiator)
    h1: bytes
    rs1_id: bytes
    rs2_id: bytes
    aux_id: bytes
    pbx_id: bytes
    pv: bytes
    mac: bytes = bytes(MAC_LEN)

    TYPES: ClassVar[dict[int, bytes]] = {1: b"DHPart1 ", 2: b"DHPart2 "}

    def encode(self) -> bytes:
        if self.part not in self.TYPES:
            raise ValueError("DHPart part must be 1 or 2")
        if not self.pv or len(self.pv) % 4:
            raise ValueError("pv must be a non-empty whole number of words")
        body = (
            _fixed(self.h1, HASH_IMAGE_LEN, "H1")
            + _fixed(self.rs1_id, 8, "rs1ID")
            + _fixed(self.rs2_id, 8, "rs2ID")
            + _fixed(self.aux_id, 8, "auxsecretID")
            + _fixed(self.pbx_id, 8, "pbxsecretID")
            + self.pv
            + _fixed(self.mac, MAC_LEN, "MAC")
        )
        return _header(self.TYPES[self.part], MESSAGE_HEADER_LEN + len(body)) + body

    @classmethod
    def decode_body(cls, part: int, body: bytes) -> DHPart:
        if len(body) < 64 + 4 + MAC_LEN:
            raise ZrtpError("DHPart too short")
        return cls(
            part=part,
            h1=body[0:32],
            rs1_id=body[32:40],
            rs2_id=body[40:48],
            aux_id=body[48:56],
            pbx_id=body[56:64],
            pv=body[64:-MAC_LEN],
            mac=body[-MAC_LEN:],
        )


@dataclass(frozen=True)
class Confirm:
    """Confirm1 / Confirm2 (section 5.7) as on the wire: MAC, CFB IV and the encrypted part."""

    part: int  # 1 (responder) or 2 (initiator)
    confirm_mac: bytes
    iv: bytes
    encrypted: bytes = field(repr=False)

    TYPES: ClassVar[dict[int, bytes]] = {1: b"Confirm1", 2: b"Confirm2"}

    def encode(self) -> bytes:
        if self.part not in self.TYPES:
            raise ValueError("Confirm part must be 1 or 2")
        body = (
            _fixed(self.confirm_mac, MAC_LEN, "confirm_mac")
            + _fixed(self.iv, 16, "CFB IV")
            + self.encrypted
        )
        return _header(self.TYPES[self.part], MESSAGE_HEADER_LEN + len(body)) + body

    @classmethod
    def decode_body(cls, part: int, body: bytes) -> Confirm:
        # 19 words without a signature: the encrypted part holds at least H0, flags, expiry.
        if len(body) < MAC_LEN + 16 + 40:
            raise ZrtpError("Confirm too short")
        return cls(part=part, confirm_mac=body[:8], iv=body[8:24], encrypted=body[24:])


@dataclass(frozen=True)
class ConfirmPlain:
    """The encrypted region of a Confirm message (section 5.7), after CFB decryption."""

    h0: bytes = field(repr=False)
    pbx_enrollment: bool = False  # E
    sas_verified: bool = False  # V
    allow_clear: bool = False  # A
    disclosure: bool = False  # D
    cache_expiration: int = 0xFFFFFFFF
    signature_type: bytes | None = None
    signature: bytes = b""

    def encode(self) -> bytes:
        sig = b""
        sig_words = 0
        if self.signature_type is not None:
            padded = self.signature + bytes(-len(self.signature) % 4)
            sig = _block(self.signature_type) + padded
            sig_words = len(sig) // 4
            if sig_words > MAX_SIG_WORDS:
                raise ValueError("signature block longer than 511 words")
        flags = (
            (self.pbx_enrollment << 3)
            | (self.sas_verified << 2)
            | (self.allow_clear << 1)
            | int(self.disclosure)
        )
        word = (sig_words << 8) | flags
        return (
            _fixed(self.h0, HASH_IMAGE_LEN, "H0")
            + struct.pack("!II", word, self.cache_expiration)
            + sig
        )

    @classmethod
    def decode(cls, data: bytes) -> ConfirmPlain:
        if len(data) < 40:
            raise ZrtpError("Confirm plaintext too short")
        word, expiry = struct.unpack("!II", data[32:40])
        sig_words = (word >> 8) & 0x1FF
        flags = word & 0xFF
        sig_type: bytes | None = None
        sig = b""
        if len(data) != 40 + 4 * sig_words:
            raise ZrtpError("Confirm signature length does not match the message length")
        if sig_words:
            sig_type = data[40:44]
            sig = data[44:]
        return cls(
            h0=data[:32],
            pbx_enrollment=bool(flags & 0x08),
            sas_verified=bool(flags & 0x04),
            allow_clear=bool(flags & 0x02),
            disclosure=bool(flags & 0x01),
            cache_expiration=expiry,
            signature_type=sig_type,
            signature=sig,
        )


@dataclass(frozen=True)
class Error:
    """Error (section 5.9) with an integer error code (Table 8)."""

    TYPE: ClassVar[bytes] = b"Error   "
    code: int

    def encode(self) -> bytes:
        return _header(self.TYPE, 16) + struct.pack("!I", self.code)

    @classmethod
    def decode_body(cls, body: bytes) -> Error:
        if len(body) != 4:
            raise ZrtpError("Error must be 4 words")
        return cls(code=struct.unpack("!I", body)[0])


@dataclass(frozen=True)
class GoClear:
    """GoClear (section 5.11): clear_mac = MAC(mackey, "GoClear ")."""

    TYPE: ClassVar[bytes] = b"GoClear "
    clear_mac: bytes

    def encode(self) -> bytes:
        return _header(self.TYPE, 20) + _fixed(self.clear_mac, MAC_LEN, "clear_mac")

    @classmethod
    def decode_body(cls, body: bytes) -> GoClear:
        if len(body) != MAC_LEN:
            raise ZrtpError("GoClear must be 5 words")
        return cls(clear_mac=body)


@dataclass(frozen=True)
class SasRelay:
    """SASrelay (section 5.13) as on the wire: MAC, CFB IV, encrypted part."""

    TYPE: ClassVar[bytes] = b"SASrelay"
    mac: bytes
    iv: bytes
    encrypted: bytes = field(repr=False)

    def encode(self) -> bytes:
        body = _fixed(self.mac, MAC_LEN, "MAC") + _fixed(self.iv, 16, "CFB IV") + self.encrypted
        return _header(self.TYPE, MESSAGE_HEADER_LEN + len(body)) + body

    @classmethod
    def decode_body(cls, body: bytes) -> SasRelay:
        if len(body) < MAC_LEN + 16 + 40:
            raise ZrtpError("SASrelay too short")
        return cls(mac=body[:8], iv=body[8:24], encrypted=body[24:])


@dataclass(frozen=True)
class SasRelayPlain:
    """The encrypted region of SASrelay (section 5.13)."""

    sas_verified: bool = False
    allow_clear: bool = False
    disclosure: bool = False
    rendering_scheme: bytes = b"B32 "
    sashash: bytes = bytes(32)
    signature_type: bytes | None = None
    signature: bytes = b""

    def encode(self) -> bytes:
        sig = b""
        sig_words = 0
        if self.signature_type is not None:
            sig = _block(self.signature_type) + self.signature + bytes(-len(self.signature) % 4)
            sig_words = len(sig) // 4
            if sig_words > MAX_SIG_WORDS:
                raise ValueError("signature block longer than 511 words")
        flags = (self.sas_verified << 2) | (self.allow_clear << 1) | int(self.disclosure)
        return (
            struct.pack("!I", (sig_words << 8) | flags)
            + _block(self.rendering_scheme)
            + _fixed(self.sashash, 32, "sashash")
            + sig
        )

    @classmethod
    def decode(cls, data: bytes) -> SasRelayPlain:
        if len(data) < 40:
            raise ZrtpError("SASrelay plaintext too short")
        (word,) = struct.unpack("!I", data[:4])
        sig_words = (word >> 8) & 0x1FF
        if len(data) != 40 + 4 * sig_words:
            raise ZrtpError("SASrelay signature length does not match the message length")
        return cls(
            sas_verified=bool(word & 0x04),
            allow_clear=bool(word & 0x02),
            disclosure=bool(word & 0x01),
            rendering_scheme=data[4:8],
            sashash=data[8:40],
            signature_type=data[40:44] if sig_words else None,
            signature=data[44:] if sig_words else b"",
        )


@dataclass(frozen=True)
class Ping:
    """Ping (section 5.15)."""

    TYPE: ClassVar[bytes] = b"Ping    "
    version: bytes
    endpoint_hash: bytes

    def encode(self) -> bytes:
        return (
            _header(self.TYPE, 24)
            + _fixed(self.version, 4, "version")
            + _fixed(self.endpoint_hash, 8, "EndpointHash")
        )

    @classmethod
    def decode_body(cls, body: bytes) -> Ping:
        if len(body) != 12:
            raise ZrtpError("Ping must be 6 words")
        return cls(version=body[:4], endpoint_hash=body[4:12])


@dataclass(frozen=True)
class PingAck:
    """PingACK (section 5.16)."""

    TYPE: ClassVar[bytes] = b"PingACK "
    version: bytes
    sender_endpoint_hash: bytes
    received_endpoint_hash: bytes
    received_ssrc: int

    def encode(self) -> bytes:
        return (
            _header(self.TYPE, 36)
            + _fixed(self.version, 4, "version")
            + _fixed(self.sender_endpoint_hash, 8, "EndpointHash")
            + _fixed(self.received_endpoint_hash, 8, "EndpointHash")
            + struct.pack("!I", self.received_ssrc)
        )

    @classmethod
    def decode_body(cls, body: bytes) -> PingAck:
        if len(body) != 24:
            raise ZrtpError("PingACK must be 9 words")
        return cls(
            version=body[:4],
            sender_endpoint_hash=body[4:12],
            received_endpoint_hash=body[12:20],
            received_ssrc=struct.unpack("!I", body[20:24])[0],
        )


Message = (
    Hello
    | HelloAck
    | Commit
    | DHPart
    | Confirm
    | Conf2Ack
    | Error
    | ErrorAck
    | GoClear
    | ClearAck
    | SasRelay
    | RelayAck
    | Ping
    | PingAck
)

_EMPTY: dict[bytes, Callable[[], Message]] = {
    HelloAck.TYPE: HelloAck,
    Conf2Ack.TYPE: Conf2Ack,
    ErrorAck.TYPE: ErrorAck,
    ClearAck.TYPE: ClearAck,
    RelayAck.TYPE: RelayAck,
}


def message_type(message: bytes) -> bytes:
    """The 8-octet type block of an encoded message (after the length checks of decode)."""
    if len(message) < MESSAGE_HEADER_LEN:
        raise ZrtpError("message shorter than its header")
    return message[4:12]


def decode_message(message: bytes) -> Message:
    """Decode one ZRTP message (preamble through MAC, no packet header or CRC)."""
    if len(message) < MESSAGE_HEADER_LEN or len(message) % 4:
        raise ZrtpError("message length must be a whole number of words, at least 3")
    preamble, words = struct.unpack("!HH", message[:4])
    if preamble != PREAMBLE:
        raise ZrtpError("bad message preamble")
    if words * 4 != len(message):
        raise ZrtpError("message length field does not match")
    kind = message[4:12]
    body = message[12:]
    if kind in _EMPTY:
        if body:
            raise ZrtpError(f"{kind!r} must be 3 words")
        return _EMPTY[kind]()
    decoded: Message
    if kind == Hello.TYPE:
        decoded = Hello.decode_body(body)
    elif kind == Commit.TYPE:
        decoded = Commit.decode_body(body)
    elif kind == b"DHPart1 ":
        decoded = DHPart.decode_body(1, body)
    elif kind == b"DHPart2 ":
        decoded = DHPart.decode_body(2, body)
    elif kind == b"Confirm1":
        decoded = Confirm.decode_body(1, body)
    elif kind == b"Confirm2":
        decoded = Confirm.decode_body(2, body)
    elif kind == Error.TYPE:
        decoded = Error.decode_body(body)
    elif kind == GoClear.TYPE:
        decoded = GoClear.decode_body(body)
    elif kind == SasRelay.TYPE:
        decoded = SasRelay.decode_body(body)
    elif kind == Ping.TYPE:
        decoded = Ping.decode_body(body)
    elif kind == PingAck.TYPE:
        decoded = PingAck.decode_body(body)
    else:
        raise ZrtpError(f"unknown message type {kind!r}")
    return decoded


# ---------------------------------------------------------------------------------------------
# Packet framing (section 5, Figure 2)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZrtpPacket:
    """A CRC-checked ZRTP packet: header fields and the message bytes it carries."""

    sequence: int
    ssrc: int
    message: bytes = field(repr=False)


def encode_packet(message: bytes, sequence: int, ssrc: int) -> bytes:
    """Frame ``message``: 0x10, unused, sequence, magic cookie, SSRC, message, CRC-32C."""
    head = struct.pack("!BBHII", 0x10, 0, sequence & 0xFFFF, MAGIC_COOKIE, ssrc & 0xFFFFFFFF)
    data = head + message
    return data + crc32c_bytes(data)


def decode_packet(data: bytes) -> ZrtpPacket:
    """Check framing and CRC (section 5) and return the message; bad CRC raises `ZrtpError`."""
    if len(data) < PACKET_HEADER_LEN + MESSAGE_HEADER_LEN + CRC_LEN or len(data) % 4:
        raise ZrtpError("not a ZRTP packet: bad length")
    if data[0] >> 4 != 1:
        raise ZrtpError("not a ZRTP packet: first nibble is not 0001")
    if data[0] & 0x0F:
        # bzrtp uses these otherwise unused bits for its fragmentation extension.
        raise ZrtpError("fragmented ZRTP packets are not supported")
    _, _, sequence, magic, ssrc = struct.unpack("!BBHII", data[:PACKET_HEADER_LEN])
    if magic != MAGIC_COOKIE:
        raise ZrtpError("not a ZRTP packet: bad magic cookie")
    if crc32c_bytes(data[:-CRC_LEN]) != data[-CRC_LEN:]:
        raise ZrtpError("bad CRC")
    return ZrtpPacket(sequence=sequence, ssrc=ssrc, message=data[PACKET_HEADER_LEN:-CRC_LEN])


def is_zrtp_packet(data: bytes) -> bool:
    """True when ``data`` looks like ZRTP (section 5: first nibble 0001 and the magic cookie).

    Cheap enough for every datagram on the media port; does not check the CRC.
    """
    return (
        len(data) >= PACKET_HEADER_LEN + MESSAGE_HEADER_LEN + CRC_LEN
        and data[0] >> 4 == 1
        and data[4:8] == b"ZRTP"
    )


def classify_datagram(data: bytes) -> str:
    """Demultiplex a media-port datagram: "zrtp", "stun", "dtls", "rtp", "rtcp" or "unknown".

    ZRTP's first two bits are 00 like STUN's; the magic cookies tell them apart (section 5).
    RTP and RTCP share version 2 and are split by payload type as in RFC 5761 section 4.
    """
    if not data:
        return "unknown"
    first = data[0]
    if is_zrtp_packet(data):
        return "zrtp"
    if first < 4 and len(data) >= 20 and data[4:8] == b"\x21\x12\xa4\x42":
        return "stun"
    if 20 <= first <= 63:
        return "dtls"
    if first >> 6 == 2 and len(data) >= 8:
        return "rtcp" if 192 <= data[1] <= 223 else "rtp"
    return "unknown"


def openpgp_packet_length(data: bytes) -> int | None:
    """Length of the first OpenPGP packet in ``data`` (RFC 4880 section 4.2), or None.

    A signature in a Confirm is padded with zeros to a word boundary (section 5.7); this tells
    the verifier where the real signature packet ends.
    """
    if not data or not data[0] & 0x80:
        return None
    tag = data[0]
    if tag & 0x40:  # new format
        if len(data) < 2:
            return None
        first = data[1]
        if first < 192:
            return 2 + first
        if first < 224:
            if len(data) < 3:
                return None
            return 3 + ((first - 192) << 8) + data[2] + 192
        if first == 255:
            if len(data) < 6:
                return None
            return 6 + int.from_bytes(data[2:6], "big")
        return None  # partial body lengths: cannot tell
    length_type = tag & 0x03
    if length_type == 3:
        return None
    size = 1 << length_type
    if len(data) < 1 + size:
        return None
    return 1 + size + int.from_bytes(data[1 : 1 + size], "big")


def trim_openpgp_signature(data: bytes) -> bytes:
    """Drop the word padding after an OpenPGP signature packet, if its length is parseable."""
    length = openpgp_packet_length(data)
    if length is None or length > len(data) or any(data[length:]):
        return data
    return data[:length]
