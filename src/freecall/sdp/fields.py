"""Typed values of SDP lines (RFC 8866 sections 5 and 9) and of the attributes freecall uses.

Every value object validates itself on construction, so whatever a caller builds renders to a
line that :func:`freecall.sdp.parse` accepts again; the parser builds the same objects, so there
is a single definition of "well formed" per field. Each class has ``parse(text)`` for the part
after ``x=`` (or after ``a=name:``) and ``render()`` for the reverse.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum

from freecall.sdp.errors import SdpError

# RFC 8866 section 9: token-char = %x21 / %x23-27 / %x2A-2B / %x2D-2E / %x30-39 / %x41-5A /
# %x5E-7E.  Written out (not \w) so that no Unicode letter or digit slips through.
_TOKEN = r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"  # noqa: S105  (a grammar rule, not a password)
TOKEN_RE = re.compile(_TOKEN)
# non-ws-string = 1*(VCHAR/%x80-FF)
NON_WS_RE = re.compile(r"[^\x00-\x20\x7f]+")
# proto = token *("/" token)
PROTO_RE = re.compile(rf"{_TOKEN}(?:/{_TOKEN})*")
# An rtpmap encoding name: a token without "/" (which separates the clock rate).
_ENCODING_RE = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
_DIGITS_RE = re.compile(r"[0-9]+")
_HEX64_RE = re.compile(r"[0-9A-Fa-f]{64}")
# Unicast IPv4 literal as written in SDP; anything else made of digits and dots is an error.
_DOTTED_RE = re.compile(r"[0-9.]+")
# FQDN = 4*(alpha-numeric / "-" / "."); deployed names also use "_" and may be shorter.
_FQDN_RE = re.compile(r"[A-Za-z0-9\-_.]+")
_SEP_RE = re.compile(r"[ \t]+")

# Bounds for numeric fields: large enough for every real use, small enough that int() is cheap
# and that a hostile 10,000-digit number is rejected rather than converted.
MAX_NUMBER_DIGITS = 20
MAX_VERSION_DIGITS = 64


def split_fields(value: str) -> list[str]:
    """Split a structured field on runs of SP/HTAB (RFC 8866 asks for one SP; we tolerate more)."""
    stripped = value.strip(" \t")
    return _SEP_RE.split(stripped) if stripped else []


def check_text(value: str, what: str) -> str:
    """Reject what can never appear inside a line: CR, LF, NUL (RFC 8866 byte-string)."""
    if "\r" in value or "\n" in value or "\x00" in value:
        raise SdpError(f"{what} contains CR, LF or NUL")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise SdpError(f"{what} is not encodable text") from None
    return value


def check_token(value: str, what: str) -> str:
    """Accept only an RFC 8866 token."""
    if not TOKEN_RE.fullmatch(value):
        raise SdpError(f"{what} {value!r} is not a token")
    return value


def parse_number(
    text: str, what: str, *, maximum: int | None = None, digits: int = MAX_NUMBER_DIGITS
) -> int:
    """Parse an ASCII decimal number with a digit bound (never Unicode digits, never '+7')."""
    if not _DIGITS_RE.fullmatch(text) or len(text) > digits:
        raise SdpError(f"{what} {text[:40]!r} is not a number of at most {digits} digits")
    number = int(text)
    if maximum is not None and number > maximum:
        raise SdpError(f"{what} {number} is larger than {maximum}")
    return number


def _check_int(value: int, what: str, low: int, high: int) -> int:
    # bool is an int subclass; True as a port is a programming error worth catching.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SdpError(f"{what} {value!r} is outside {low}..{high}")
    return value


def check_unicast_address(nettype: str, addrtype: str, address: str, what: str) -> str:
    """Check an address for ``IN IP4`` / ``IN IP6`` (literal or FQDN); others are opaque.

    RFC 8866 section 9: unicast-address = IP4-address / IP6-address / FQDN / extn-addr.
    """
    if not NON_WS_RE.fullmatch(address):
        raise SdpError(f"{what} {address[:60]!r} is empty or contains white space")
    if nettype != "IN" or addrtype not in ("IP4", "IP6"):
        return address
    if addrtype == "IP6" and ":" in address:
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise SdpError(f"{what} {address[:60]!r} is not an IPv6 address") from None
        return address
    if _DOTTED_RE.fullmatch(address):
        if addrtype == "IP6":
            raise SdpError(f"{what} {address!r} is an IPv4 address but addrtype is IP6")
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise SdpError(f"{what} {address[:60]!r} is not an IPv4 address") from None
        return address
    if not _FQDN_RE.fullmatch(address):
        raise SdpError(f"{what} {address[:60]!r} is neither an {addrtype} address nor a name")
    return address


def addrtype_of(address: str) -> str:
    """``IP6`` for an address with a colon, else ``IP4`` (used when we build c= and o= lines)."""
    return "IP6" if ":" in address else "IP4"


@dataclass(frozen=True, slots=True)
class Origin:
    """``o=<username> <sess-id> <sess-version> <nettype> <addrtype> <unicast-address>``.

    RFC 8866 section 5.2.  ``session_id`` stays a string: it only identifies the session and
    some stacks put non-digits in it; ``session_version`` is an int because RFC 3264 section 8
    requires incrementing it on every modified offer.
    """

    username: str
    session_id: str
    session_version: int
    address: str
    addrtype: str = "IP4"
    nettype: str = "IN"

    def __post_init__(self) -> None:
        if not NON_WS_RE.fullmatch(self.username):
            raise SdpError(f"o= username {self.username[:60]!r} is empty or has white space")
        if not NON_WS_RE.fullmatch(self.session_id):
            raise SdpError(f"o= sess-id {self.session_id[:60]!r} is empty or has white space")
        _check_int(self.session_version, "o= sess-version", 0, 10**MAX_VERSION_DIGITS - 1)
        check_token(self.nettype, "o= nettype")
        check_token(self.addrtype, "o= addrtype")
        check_unicast_address(self.nettype, self.addrtype, self.address, "o= address")

    @classmethod
    def parse(cls, value: str) -> Origin:
        parts = split_fields(value)
        if len(parts) != 6:
            raise SdpError(f"o= needs 6 fields, found {len(parts)}")
        username, session_id, version, nettype, addrtype, address = parts
        return cls(
            username=username,
            session_id=session_id,
            session_version=parse_number(version, "o= sess-version", digits=MAX_VERSION_DIGITS),
            nettype=nettype,
            addrtype=addrtype,
            address=address,
        )

    def render(self) -> str:
        return (
            f"{self.username} {self.session_id} {self.session_version} "
            f"{self.nettype} {self.addrtype} {self.address}"
        )


@dataclass(frozen=True, slots=True)
class Connection:
    """``c=<nettype> <addrtype> <connection-address>`` (RFC 8866 section 5.7).

    For IPv4 multicast the address may carry ``/<ttl>[/<number of addresses>]``, for IPv6
    multicast ``/<number of addresses>``; both are split out into ``ttl`` and ``count``.
    """

    address: str
    addrtype: str = "IP4"
    nettype: str = "IN"
    ttl: int | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        check_token(self.nettype, "c= nettype")
        check_token(self.addrtype, "c= addrtype")
        check_unicast_address(self.nettype, self.addrtype, self.address, "c= address")
        ip_family = self.nettype == "IN" and self.addrtype in ("IP4", "IP6")
        if self.ttl is not None:
            if not (ip_family and self.addrtype == "IP4"):
                raise SdpError("c= TTL is only defined for IN IP4")
            _check_int(self.ttl, "c= TTL", 0, 255)
        if self.count is not None:
            if not ip_family:
                raise SdpError("c= address count is only defined for IN IP4/IP6")
            if self.addrtype == "IP4" and self.ttl is None:
                raise SdpError("c= IPv4 address count needs a TTL before it")
            _check_int(self.count, "c= address count", 1, 65535)

    @classmethod
    def for_address(cls, address: str) -> Connection:
        """A unicast ``IN IP4``/``IN IP6`` connection for a literal address or host name."""
        return cls(address=address, addrtype=addrtype_of(address))

    @classmethod
    def parse(cls, value: str) -> Connection:
        parts = split_fields(value)
        if len(parts) != 3:
            raise SdpError(f"c= needs 3 fields, found {len(parts)}")
        nettype, addrtype, conn = parts
        if nettype != "IN" or addrtype not in ("IP4", "IP6"):
            return cls(address=conn, addrtype=addrtype, nettype=nettype)
        pieces = conn.split("/")
        limit = 3 if addrtype == "IP4" else 2
        if len(pieces) > limit:
            raise SdpError(f"c= address {conn[:60]!r} has too many '/' parts")
        ttl: int | None = None
        count: int | None = None
        if addrtype == "IP4":
            if len(pieces) >= 2:
                ttl = parse_number(pieces[1], "c= TTL", maximum=255)
            if len(pieces) == 3:
                count = parse_number(pieces[2], "c= address count", maximum=65535)
        elif len(pieces) == 2:
            count = parse_number(pieces[1], "c= address count", maximum=65535)
        return cls(address=pieces[0], addrtype=addrtype, nettype=nettype, ttl=ttl, count=count)

    def render(self) -> str:
        suffix = ""
        if self.ttl is not None:
            suffix += f"/{self.ttl}"
        if self.count is not None:
            suffix += f"/{self.count}"
        return f"{self.nettype} {self.addrtype} {self.address}{suffix}"

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The address as an ipaddress object, or None for a host name or foreign addrtype."""
        if self.nettype != "IN":
            return None
        try:
            if self.addrtype == "IP4":
                return ipaddress.IPv4Address(self.address)
            if self.addrtype == "IP6":
                return ipaddress.IPv6Address(self.address)
        except ValueError:
            return None
        return None

    @property
    def is_null(self) -> bool:
        """``0.0.0.0`` (or ``::``): the RFC 2543 way to put a stream on hold (RFC 3264 s8.4)."""
        ip = self.ip
        return ip is not None and ip.is_unspecified


@dataclass(frozen=True, slots=True)
class Timing:
    """``t=<start-time> <stop-time>`` (RFC 8866 section 5.9); ``0 0`` means unbounded."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        _check_int(self.start, "t= start", 0, 10**MAX_NUMBER_DIGITS - 1)
        _check_int(self.stop, "t= stop", 0, 10**MAX_NUMBER_DIGITS - 1)

    @classmethod
    def parse(cls, value: str) -> Timing:
        parts = split_fields(value)
        if len(parts) != 2:
            raise SdpError(f"t= needs 2 fields, found {len(parts)}")
        return cls(parse_number(parts[0], "t= start"), parse_number(parts[1], "t= stop"))

    def render(self) -> str:
        return f"{self.start} {self.stop}"


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """``b=<bwtype>:<bandwidth>`` (RFC 8866 section 5.8), e.g. ``AS:64`` or ``TIAS:64000``."""

    bwtype: str
    bandwidth: int

    def __post_init__(self) -> None:
        check_token(self.bwtype, "b= bwtype")
        _check_int(self.bandwidth, "b= bandwidth", 0, 10**MAX_NUMBER_DIGITS - 1)

    @classmethod
    def parse(cls, value: str) -> Bandwidth:
        bwtype, sep, amount = value.partition(":")
        if not sep:
            raise SdpError("b= needs '<bwtype>:<bandwidth>'")
        return cls(bwtype, parse_number(amount.strip(" \t"), "b= bandwidth"))

    def render(self) -> str:
        return f"{self.bwtype}:{self.bandwidth}"


@dataclass(frozen=True, slots=True)
class MediaLine:
    """``m=<media> <port>[/<number of ports>] <proto> <fmt> ...`` (RFC 8866 section 5.14).

    Port 0 marks a stream rejected or disabled (RFC 3264 sections 6 and 8.2).  RFC 8866 asks
    for at least one format; we tolerate none, as some stacks send that for rejected streams.
    """

    media: str
    port: int
    proto: str
    formats: tuple[str, ...]
    port_count: int | None = None

    def __post_init__(self) -> None:
        check_token(self.media, "m= media")
        _check_int(self.port, "m= port", 0, 65535)
        if self.port_count is not None:
            _check_int(self.port_count, "m= number of ports", 1, 65535)
        if not PROTO_RE.fullmatch(self.proto):
            raise SdpError(f"m= proto {self.proto[:60]!r} is not token *('/' token)")
        # Accept any iterable from callers, store a tuple (hashable, immutable).
        object.__setattr__(self, "formats", tuple(self.formats))
        for fmt in self.formats:
            check_token(fmt, "m= format")

    @classmethod
    def parse(cls, value: str) -> MediaLine:
        parts = split_fields(value)
        if len(parts) < 3:
            raise SdpError(f"m= needs at least 3 fields, found {len(parts)}")
        media, port_text, proto, *formats = parts
        port_part, slash, count_part = port_text.partition("/")
        port = parse_number(port_part, "m= port", maximum=65535)
        count = parse_number(count_part, "m= number of ports", maximum=65535) if slash else None
        return cls(media=media, port=port, proto=proto, formats=tuple(formats), port_count=count)

    def render(self) -> str:
        port = f"{self.port}" if self.port_count is None else f"{self.port}/{self.port_count}"
        return " ".join((self.media, port, self.proto, *self.formats))

    @property
    def is_rtp(self) -> bool:
        """True for RTP profiles (RTP/AVP, RTP/SAVP, UDP/TLS/RTP/SAVPF, ...): formats are PTs."""
        return "RTP" in self.proto.split("/")


@dataclass(frozen=True, slots=True)
class Attribute:
    """``a=<name>`` (property attribute, value None) or ``a=<name>:<value>`` (RFC 8866 s5.13)."""

    name: str
    value: str | None = None

    def __post_init__(self) -> None:
        check_token(self.name, "attribute name")
        if self.value is not None:
            check_text(self.value, f"a={self.name} value")

    @classmethod
    def parse(cls, value: str) -> Attribute:
        name, sep, rest = value.partition(":")
        return cls(name, rest if sep else None)

    def render(self) -> str:
        return self.name if self.value is None else f"{self.name}:{self.value}"


class Direction(StrEnum):
    """The four direction attributes (RFC 8866 sections 6.7.1-6.7.4; RFC 3264 section 5.1)."""

    SENDRECV = "sendrecv"
    SENDONLY = "sendonly"
    RECVONLY = "recvonly"
    INACTIVE = "inactive"

    @property
    def sends(self) -> bool:
        return self in (Direction.SENDRECV, Direction.SENDONLY)

    @property
    def receives(self) -> bool:
        return self in (Direction.SENDRECV, Direction.RECVONLY)

    def reversed(self) -> Direction:
        """The same stream seen from the other end (sendonly <-> recvonly)."""
        return _REVERSED[self]

    @classmethod
    def from_flags(cls, sends: bool, receives: bool) -> Direction:
        if sends and receives:
            return cls.SENDRECV
        if sends:
            return cls.SENDONLY
        if receives:
            return cls.RECVONLY
        return cls.INACTIVE


_REVERSED = {
    Direction.SENDRECV: Direction.SENDRECV,
    Direction.SENDONLY: Direction.RECVONLY,
    Direction.RECVONLY: Direction.SENDONLY,
    Direction.INACTIVE: Direction.INACTIVE,
}
DIRECTION_NAMES = frozenset(d.value for d in Direction)


@dataclass(frozen=True, slots=True)
class RtpMap:
    """``a=rtpmap:<payload type> <encoding name>/<clock rate>[/<encoding parameters>]``.

    RFC 8866 section 6.6.  ``parameters`` is the channel count for audio.
    """

    payload_type: int
    encoding: str
    clock_rate: int
    parameters: str | None = None

    def __post_init__(self) -> None:
        _check_int(self.payload_type, "rtpmap payload type", 0, 127)
        if not _ENCODING_RE.fullmatch(self.encoding):
            raise SdpError(f"rtpmap encoding name {self.encoding[:40]!r} is not a token")
        _check_int(self.clock_rate, "rtpmap clock rate", 0, 10**10)
        if self.parameters is not None and not NON_WS_RE.fullmatch(self.parameters):
            raise SdpError("rtpmap encoding parameters are empty or contain white space")

    @classmethod
    def parse(cls, value: str) -> RtpMap:
        parts = split_fields(value)
        if len(parts) != 2:
            raise SdpError("rtpmap needs '<payload type> <encoding>/<clock rate>'")
        pieces = parts[1].split("/", 2)
        if len(pieces) < 2:
            raise SdpError("rtpmap needs '<encoding>/<clock rate>'")
        return cls(
            payload_type=parse_number(parts[0], "rtpmap payload type", maximum=127, digits=3),
            encoding=pieces[0],
            clock_rate=parse_number(pieces[1], "rtpmap clock rate", digits=10),
            parameters=pieces[2] if len(pieces) == 3 else None,
        )

    def render(self) -> str:
        tail = "" if self.parameters is None else f"/{self.parameters}"
        return f"{self.payload_type} {self.encoding}/{self.clock_rate}{tail}"

    @property
    def channels(self) -> int:
        """Audio channel count: the encoding parameter when numeric, else 1 (RFC 8866 s6.6)."""
        if self.parameters is not None and _DIGITS_RE.fullmatch(self.parameters):
            return int(self.parameters[:6])
        return 1

    def same_codec(self, other: RtpMap) -> bool:
        """Same encoding (case-insensitive, RFC 4855 s3), clock rate and channel count."""
        return (
            self.encoding.lower() == other.encoding.lower()
            and self.clock_rate == other.clock_rate
            and self.channels == other.channels
        )


# RFC 3551 section 6, tables 4 and 5: static payload types, used when no rtpmap is given.
STATIC_PAYLOAD_TYPES: dict[int, RtpMap] = {
    pt: RtpMap(pt, name, rate, params)
    for pt, name, rate, params in (
        (0, "PCMU", 8000, None),
        (3, "GSM", 8000, None),
        (4, "G723", 8000, None),
        (5, "DVI4", 8000, None),
        (6, "DVI4", 16000, None),
        (7, "LPC", 8000, None),
        (8, "PCMA", 8000, None),
        (9, "G722", 8000, None),
        (10, "L16", 44100, "2"),
        (11, "L16", 44100, None),
        (12, "QCELP", 8000, None),
        (13, "CN", 8000, None),
        (14, "MPA", 90000, None),
        (15, "G728", 8000, None),
        (16, "DVI4", 11025, None),
        (17, "DVI4", 22050, None),
        (18, "G729", 8000, None),
        (25, "CelB", 90000, None),
        (26, "JPEG", 90000, None),
        (28, "nv", 90000, None),
        (31, "H261", 90000, None),
        (32, "MPV", 90000, None),
        (33, "MP2T", 90000, None),
        (34, "H263", 90000, None),
    )
}


@dataclass(frozen=True, slots=True)
class Fmtp:
    """``a=fmtp:<format> <format specific parameters>`` (RFC 8866 section 6.15)."""

    format: str
    parameters: str = ""

    def __post_init__(self) -> None:
        check_token(self.format, "fmtp format")
        check_text(self.parameters, "fmtp parameters")

    @classmethod
    def parse(cls, value: str) -> Fmtp:
        parts = _SEP_RE.split(value.strip(" \t"), maxsplit=1)
        return cls(parts[0], parts[1] if len(parts) == 2 else "")

    def render(self) -> str:
        return f"{self.format} {self.parameters}" if self.parameters else self.format


@dataclass(frozen=True, slots=True)
class Rtcp:
    """``a=rtcp:<port> [<nettype> <addrtype> <connection-address>]`` (RFC 3605 section 2.1)."""

    port: int
    connection: Connection | None = None

    def __post_init__(self) -> None:
        _check_int(self.port, "rtcp port", 0, 65535)

    @classmethod
    def parse(cls, value: str) -> Rtcp:
        parts = split_fields(value)
        if len(parts) not in (1, 4):
            raise SdpError("rtcp needs '<port>' or '<port> <nettype> <addrtype> <address>'")
        port = parse_number(parts[0], "rtcp port", maximum=65535)
        connection = Connection.parse(" ".join(parts[1:])) if len(parts) == 4 else None
        return cls(port, connection)

    def render(self) -> str:
        if self.connection is None:
            return str(self.port)
        return f"{self.port} {self.connection.render()}"


@dataclass(frozen=True, slots=True)
class ZrtpHash:
    """``a=zrtp-hash:<zrtp-version> <zrtp-hash-value>`` (RFC 6189 section 8.1).

    The hash value is the SHA-256 of the endpoint's ZRTP Hello message, 64 hex digits; putting
    it in the signalling binds the (integrity-protected) signalling to the media path.
    """

    version: str
    value: str

    def __post_init__(self) -> None:
        check_token(self.version, "zrtp-hash version")
        if not _HEX64_RE.fullmatch(self.value):
            raise SdpError("zrtp-hash value must be 64 hex digits")

    @classmethod
    def parse(cls, value: str) -> ZrtpHash:
        parts = split_fields(value)
        if len(parts) != 2:
            raise SdpError("zrtp-hash needs '<version> <64 hex digits>'")
        return cls(parts[0], parts[1])

    def render(self) -> str:
        return f"{self.version} {self.value}"

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.value)


@dataclass(frozen=True, slots=True)
class Crypto:
    """``a=crypto:<tag> <crypto-suite> <key-params> [<session-params>]`` (RFC 4568 s9.1).

    Recognised so that the daemon can see (and strip) SDES keys a softphone offers: with ZRTP
    between nodes, SDES keys from the loopback leg must not travel to the far end.
    """

    tag: int
    suite: str
    key_params: str
    session_params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_int(self.tag, "crypto tag", 0, 999_999_999)
        check_token(self.suite, "crypto suite")
        if not NON_WS_RE.fullmatch(self.key_params):
            raise SdpError("crypto key-params are empty or contain white space")
        object.__setattr__(self, "session_params", tuple(self.session_params))
        for param in self.session_params:
            if not NON_WS_RE.fullmatch(param):
                raise SdpError("crypto session-param is empty or contains white space")

    @classmethod
    def parse(cls, value: str) -> Crypto:
        parts = split_fields(value)
        if len(parts) < 3:
            raise SdpError("crypto needs '<tag> <crypto-suite> <key-params>'")
        return cls(
            tag=parse_number(parts[0], "crypto tag", digits=9),
            suite=parts[1],
            key_params=parts[2],
            session_params=tuple(parts[3:]),
        )

    def render(self) -> str:
        return " ".join((str(self.tag), self.suite, self.key_params, *self.session_params))
