"""Session descriptions as an ordered list of lines with typed views (RFC 8866).

Why lines and not a tree of fields: a proxy must forward what it does not understand exactly as
it came (unknown attributes, ``k=``, ``r=``, ``z=``, odd spacing), and must change only what it
means to change.  So a :class:`SessionDescription` keeps every line's text as received; the
typed properties parse on read, and the modification helpers replace whole lines with freshly
rendered ones.  ``parse(data).to_bytes() == data`` for every valid description that uses CRLF.

Line endings: input may use CRLF or bare LF (RFC 8866 section 5 asks parsers to accept LF);
output always uses CRLF.  Trailing empty lines are tolerated and dropped.  Text is UTF-8; bytes
that are not UTF-8 (RFC 8866 allows other charsets via ``a=charset``) are carried through
unchanged with the ``surrogateescape`` error handler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Self

from freecall.sdp.errors import SdpError
from freecall.sdp.fields import (
    DIRECTION_NAMES,
    STATIC_PAYLOAD_TYPES,
    Attribute,
    Bandwidth,
    Connection,
    Crypto,
    Direction,
    Fmtp,
    MediaLine,
    Origin,
    Rtcp,
    RtpMap,
    Timing,
    ZrtpHash,
    check_text,
)

MAX_SDP_SIZE = 65536
"""Default bound on an SDP body in bytes (a UDP SIP message cannot carry more anyway)."""
MAX_SDP_LINES = 1024
"""Default bound on the number of lines; real offers with ICE candidates stay far below."""

# RFC 8866 section 5: the type letters, in the order the grammar puts them.
_SESSION_ORDER = "vosiuepcbtrzka"
_MEDIA_ORDER = "micbka"
_KNOWN_TYPES = frozenset(_SESSION_ORDER + "m")

_ATTRIBUTE_PARSERS: dict[str, Callable[[str], object]] = {
    "rtpmap": RtpMap.parse,
    "fmtp": Fmtp.parse,
    "rtcp": Rtcp.parse,
    "zrtp-hash": ZrtpHash.parse,
    "crypto": Crypto.parse,
}


def _check_version(value: str) -> None:
    # RFC 8866 section 5.1: "v=0"; there is no other version.
    if value != "0":
        raise SdpError(f"unsupported protocol version v={value[:20]!r} (only v=0 exists)")


def _check_attribute(value: str) -> None:
    """Validate the attributes whose meaning freecall relies on; others only need a token name."""
    attribute = Attribute.parse(value)
    if attribute.name in DIRECTION_NAMES:
        if attribute.value is not None:
            raise SdpError(f"a={attribute.name} is a property attribute and takes no value")
        return
    parser = _ATTRIBUTE_PARSERS.get(attribute.name)
    if parser is not None:
        if attribute.value is None:
            raise SdpError(f"a={attribute.name} needs a value")
        parser(attribute.value)


_VALIDATORS: dict[str, Callable[[str], object]] = {
    "v": _check_version,
    "o": Origin.parse,
    "c": Connection.parse,
    "b": Bandwidth.parse,
    "t": Timing.parse,
    "m": MediaLine.parse,
    "a": _check_attribute,
}


@dataclass(frozen=True, slots=True)
class Line:
    """One ``<type>=<value>`` line, value kept verbatim (without the line ending)."""

    type: str
    value: str

    def __post_init__(self) -> None:
        if self.type not in _KNOWN_TYPES:
            raise SdpError(f"unknown type letter {self.type[:5]!r}")
        check_text(self.value, f"{self.type}= line")

    def render(self) -> str:
        return f"{self.type}={self.value}"


def _validate(line: Line, order: str) -> None:
    if line.type not in order:
        where = "media" if order is _MEDIA_ORDER else "session"
        raise SdpError(f"'{line.type}=' is not allowed in a {where} description")
    validator = _VALIDATORS.get(line.type)
    if validator is not None:
        validator(line.value)


class _Section:
    """Lines of one level (session or media) and the accessors both levels share."""

    __slots__ = ("_lines",)
    _ORDER: ClassVar[str]

    def __init__(self, lines: Iterable[Line]) -> None:
        self._lines = list(lines)
        for line in self._lines:
            _validate(line, self._ORDER)
        self._check_structure()

    def _check_structure(self) -> None:
        raise NotImplementedError

    @classmethod
    def _trusted(cls, lines: list[Line]) -> Self:
        """Build from lines the parser already validated (skips the second validation)."""
        section = cls.__new__(cls)
        section._lines = lines
        section._check_structure()
        return section

    # -- raw access -----------------------------------------------------------------------

    @property
    def lines(self) -> tuple[Line, ...]:
        """Every line of this level, in order (read-only; use the methods to change them)."""
        return tuple(self._lines)

    def _values(self, type_: str) -> Iterator[str]:
        return (line.value for line in self._lines if line.type == type_)

    def _position_for(self, type_: str) -> int:
        """Where a new line of this type goes so that the grammar's order is kept."""
        rank = self._ORDER.index(type_)
        position = 0
        for index, line in enumerate(self._lines):
            if self._ORDER.index(line.type) <= rank:
                position = index + 1
        return position

    def _replace_all(self, type_: str, new: Sequence[Line], keep: Callable[[Line], bool]) -> None:
        """Drop the lines of ``type_`` that ``keep`` rejects and put ``new`` where the first was."""
        first: int | None = None
        kept: list[Line] = []
        for line in self._lines:
            if line.type == type_ and not keep(line):
                if first is None:
                    first = len(kept)
                continue
            kept.append(line)
        self._lines = kept
        position = self._position_for(type_) if first is None else first
        self._lines[position:position] = new

    # -- attributes (RFC 8866 section 5.13) -----------------------------------------------

    @property
    def attributes(self) -> list[Attribute]:
        """All ``a=`` lines of this level, in order."""
        return [Attribute.parse(value) for value in self._values("a")]

    def attribute(self, name: str) -> Attribute | None:
        """The first attribute called ``name`` (names are case-sensitive), or None."""
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        return None

    def attribute_values(self, name: str) -> list[str | None]:
        """The values of every attribute called ``name`` (None for property attributes)."""
        return [a.value for a in self.attributes if a.name == name]

    def has_attribute(self, name: str) -> bool:
        return self.attribute(name) is not None

    def add_attribute(self, name: str, value: str | None = None) -> None:
        """Append ``a=name[:value]`` after the existing lines of this level."""
        line = Line("a", Attribute(name, value).render())
        _validate(line, self._ORDER)
        self._lines.insert(self._position_for("a"), line)

    def set_attribute(self, name: str, value: str | None = None) -> None:
        """Make ``a=name[:value]`` the only attribute of that name, in place of the first one."""
        line = Line("a", Attribute(name, value).render())
        _validate(line, self._ORDER)
        self._replace_all("a", [line], keep=lambda old: Attribute.parse(old.value).name != name)

    def remove_attribute(self, name: str) -> int:
        """Remove every attribute called ``name``; return how many were removed."""
        before = len(self._lines)
        self._replace_all("a", [], keep=lambda old: Attribute.parse(old.value).name != name)
        return before - len(self._lines)

    # -- typed views shared by both levels ------------------------------------------------

    @property
    def direction(self) -> Direction | None:
        """The direction attribute written at this level, or None (see ``effective_direction``).

        RFC 8866 section 6.7: at most one should appear; if a sender wrote several, the last
        one is taken, as most stacks do.
        """
        found: Direction | None = None
        for attribute in self.attributes:
            if attribute.name in DIRECTION_NAMES:
                found = Direction(attribute.name)
        return found

    def set_direction(self, direction: Direction | None) -> None:
        """Write exactly one direction attribute at this level (or none, for None)."""
        new = [] if direction is None else [Line("a", str(direction))]
        self._replace_all("a", new, keep=lambda old: old.value not in DIRECTION_NAMES)

    @property
    def connections(self) -> list[Connection]:
        """Every ``c=`` line of this level (several only for layered multicast, RFC 8866 5.7)."""
        return [Connection.parse(value) for value in self._values("c")]

    @property
    def bandwidths(self) -> list[Bandwidth]:
        """Every ``b=`` line of this level."""
        return [Bandwidth.parse(value) for value in self._values("b")]

    def set_bandwidths(self, bandwidths: Iterable[Bandwidth]) -> None:
        """Replace every ``b=`` line of this level."""
        new = [Line("b", b.render()) for b in bandwidths]
        self._replace_all("b", new, keep=lambda _old: False)

    @property
    def zrtp_hashes(self) -> list[ZrtpHash]:
        """Every ``a=zrtp-hash`` of this level (RFC 6189 section 8.1)."""
        return [ZrtpHash.parse(v) for v in self.attribute_values("zrtp-hash") if v is not None]

    def set_zrtp_hash(self, zrtp_hash: ZrtpHash | None) -> None:
        """Make ``zrtp_hash`` the only ``a=zrtp-hash`` of this level (None removes them)."""
        if zrtp_hash is None:
            self.remove_attribute("zrtp-hash")
        else:
            self.set_attribute("zrtp-hash", zrtp_hash.render())

    @property
    def crypto(self) -> list[Crypto]:
        """Every ``a=crypto`` (SDES, RFC 4568) of this level."""
        return [Crypto.parse(v) for v in self.attribute_values("crypto") if v is not None]


class MediaDescription(_Section):
    """One ``m=`` line and the lines that follow it up to the next ``m=``."""

    __slots__ = ()
    _ORDER = _MEDIA_ORDER

    def _check_structure(self) -> None:
        if not self._lines or self._lines[0].type != "m":
            raise SdpError("a media description must start with an m= line")
        if any(line.type == "m" for line in self._lines[1:]):
            raise SdpError("a media description holds exactly one m= line")

    @classmethod
    def create(
        cls,
        media_line: MediaLine,
        *,
        connection: Connection | None = None,
        attributes: Iterable[Attribute] = (),
    ) -> MediaDescription:
        """Build a media description from typed values (for offers the daemon writes itself)."""
        lines = [Line("m", media_line.render())]
        if connection is not None:
            lines.append(Line("c", connection.render()))
        lines.extend(Line("a", a.render()) for a in attributes)
        return cls(lines)

    def copy(self) -> MediaDescription:
        clone = MediaDescription.__new__(MediaDescription)
        clone._lines = list(self._lines)
        return clone

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MediaDescription) and self._lines == other._lines

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"MediaDescription({self._lines[0].render()!r}, {len(self._lines) - 1} more lines)"

    # -- the m= line ----------------------------------------------------------------------

    @property
    def media_line(self) -> MediaLine:
        return MediaLine.parse(self._lines[0].value)

    @media_line.setter
    def media_line(self, media_line: MediaLine) -> None:
        self._lines[0] = Line("m", media_line.render())

    @property
    def media_type(self) -> str:
        """``audio``, ``video``, ``application``, ..."""
        return self.media_line.media

    @property
    def port(self) -> int:
        return self.media_line.port

    @property
    def proto(self) -> str:
        return self.media_line.proto

    @property
    def formats(self) -> tuple[str, ...]:
        return self.media_line.formats

    def set_port(self, port: int) -> None:
        """Change the transport port, keeping media type, port count, proto and formats."""
        self.media_line = replace(self.media_line, port=port)

    @property
    def is_rejected(self) -> bool:
        """Port 0: the stream was rejected or removed (RFC 3264 sections 6 and 8.2)."""
        return self.media_line.port == 0

    def reject(self) -> None:
        """Reject or disable the stream by setting its port to 0 (RFC 3264 section 6)."""
        self.set_port(0)

    # -- codecs ---------------------------------------------------------------------------

    def rtpmap(self, fmt: str | int) -> RtpMap | None:
        """The ``a=rtpmap`` for payload type ``fmt``, if present."""
        wanted = str(fmt)
        for value in self.attribute_values("rtpmap"):
            if value is not None:
                rtpmap = RtpMap.parse(value)
                if str(rtpmap.payload_type) == wanted:
                    return rtpmap
        return None

    @property
    def rtpmaps(self) -> dict[str, RtpMap]:
        """Payload type (as in the m= line) to rtpmap, for every ``a=rtpmap``."""
        out: dict[str, RtpMap] = {}
        for value in self.attribute_values("rtpmap"):
            if value is not None:
                rtpmap = RtpMap.parse(value)
                out.setdefault(str(rtpmap.payload_type), rtpmap)
        return out

    def codec(self, fmt: str | int) -> RtpMap | None:
        """The codec of an RTP payload type: its rtpmap, else the RFC 3551 static assignment."""
        rtpmap = self.rtpmap(fmt)
        if rtpmap is not None:
            return rtpmap
        text = str(fmt)
        if self.media_line.is_rtp and text.isascii() and text.isdigit() and len(text) <= 3:
            return STATIC_PAYLOAD_TYPES.get(int(text))
        return None

    def fmtp(self, fmt: str | int) -> str | None:
        """The format-specific parameters of ``a=fmtp:<fmt>``, if present."""
        wanted = str(fmt)
        for value in self.attribute_values("fmtp"):
            if value is not None:
                fmtp = Fmtp.parse(value)
                if fmtp.format == wanted:
                    return fmtp.parameters
        return None

    # -- transport ------------------------------------------------------------------------

    @property
    def connection(self) -> Connection | None:
        """The first media-level ``c=``, or None when the session-level one applies."""
        connections = self.connections
        return connections[0] if connections else None

    def set_connection(self, connection: Connection | None) -> None:
        """Make ``connection`` the only media-level ``c=`` (None: inherit the session's)."""
        new = [] if connection is None else [Line("c", connection.render())]
        self._replace_all("c", new, keep=lambda _old: False)

    @property
    def rtcp(self) -> Rtcp | None:
        """The ``a=rtcp`` attribute (RFC 3605), or None when RTCP uses port + 1."""
        value = self.attribute("rtcp")
        return None if value is None or value.value is None else Rtcp.parse(value.value)

    def set_rtcp(self, rtcp: Rtcp | None) -> None:
        if rtcp is None:
            self.remove_attribute("rtcp")
        else:
            self.set_attribute("rtcp", rtcp.render())

    def rewrite_endpoint(
        self,
        address: str,
        port: int,
        rtcp_port: int | None = None,
        *,
        media_connection: bool = True,
    ) -> None:
        """Point this stream at ``address``:``port`` (what the daemon does to every SDP it relays).

        - the ``m=`` port becomes ``port`` (port count, proto and formats are kept);
        - with ``media_connection`` the stream gets exactly one media-level ``c=`` for
          ``address``; without it, media-level ``c=`` lines are removed and the caller must
          make the session-level ``c=`` carry ``address``;
        - an existing ``a=rtcp`` (RFC 3605 section 2.1) gets ``rtcp_port`` (default
          ``port + 1``) and, if it named an address, ``address``; when there is none and
          ``rtcp_port`` is not ``port + 1``, one is added, since the far end would otherwise
          send RTCP to ``port + 1``.
        """
        connection = Connection.for_address(address)
        self.set_port(port)
        self.set_connection(connection if media_connection else None)
        rtcp_target = port + 1 if rtcp_port is None else rtcp_port
        old = self.rtcp
        if old is not None:
            new_connection = None if old.connection is None else connection
            self.set_rtcp(Rtcp(rtcp_target, new_connection))
        elif rtcp_target != port + 1:
            self.set_rtcp(Rtcp(rtcp_target))


class SessionDescription(_Section):
    """A parsed session description: session-level lines plus a list of media descriptions.

    ``media`` is an ordinary list; RFC 3264 matches answer streams to offer streams by index,
    so callers must not reorder or delete entries of a description that is part of an
    offer/answer exchange (reject a stream with :meth:`MediaDescription.reject` instead).
    """

    __slots__ = ("media",)
    _ORDER = _SESSION_ORDER

    def __init__(self, lines: Iterable[Line], media: Iterable[MediaDescription] = ()) -> None:
        self.media: list[MediaDescription] = list(media)
        super().__init__(lines)

    def _check_structure(self) -> None:
        counts = {t: 0 for t in "vosct"}
        for line in self._lines:
            if line.type in counts:
                counts[line.type] += 1
        if not self._lines or self._lines[0].type != "v":
            raise SdpError("a session description must start with v=0")
        for type_ in "vos":
            if counts[type_] != 1:
                raise SdpError(f"expected exactly one {type_}= line, found {counts[type_]}")
        if counts["t"] < 1:
            raise SdpError("expected at least one t= line")
        if counts["c"] > 1:
            raise SdpError("expected at most one session-level c= line")

    @classmethod
    def create(
        cls,
        origin: Origin,
        *,
        session_name: str = "-",
        connection: Connection | None = None,
        timing: Timing | None = None,
    ) -> SessionDescription:
        """Build a minimal description (``v o s [c] t``) to which media can be appended."""
        lines = [Line("v", "0"), Line("o", origin.render()), Line("s", session_name)]
        if connection is not None:
            lines.append(Line("c", connection.render()))
        lines.append(Line("t", (timing or Timing(0, 0)).render()))
        return cls(lines)

    def copy(self) -> SessionDescription:
        """An independent copy (lines are immutable, so copying the lists is enough)."""
        clone = SessionDescription.__new__(SessionDescription)
        clone._lines = list(self._lines)
        clone.media = [m.copy() for m in self.media]
        return clone

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SessionDescription)
            and self._lines == other._lines
            and self.media == other.media
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"SessionDescription({self.origin.render()!r}, {len(self.media)} media)"

    # -- serialisation --------------------------------------------------------------------

    def all_lines(self) -> Iterator[Line]:
        """Session lines then each media description's lines, in wire order."""
        yield from self._lines
        for media in self.media:
            yield from media._lines

    def to_str(self) -> str:
        """The description as text, every line ended by CRLF."""
        return "".join(f"{line.type}={line.value}\r\n" for line in self.all_lines())

    def to_bytes(self) -> bytes:
        """The description as UTF-8 bytes (undecodable input bytes come back unchanged)."""
        return self.to_str().encode("utf-8", "surrogateescape")

    __bytes__ = to_bytes
    __str__ = to_str

    # -- session-level fields -------------------------------------------------------------

    @property
    def version(self) -> int:
        """``v=``: always 0."""
        return 0

    @property
    def origin(self) -> Origin:
        return Origin.parse(next(self._values("o")))

    @origin.setter
    def origin(self, origin: Origin) -> None:
        self._replace_all("o", [Line("o", origin.render())], keep=lambda _old: False)

    def bump_version(self) -> int:
        """Increment the ``o=`` session version and return it (RFC 3264 section 8)."""
        origin = self.origin
        self.origin = replace(origin, session_version=origin.session_version + 1)
        return origin.session_version + 1

    @property
    def session_name(self) -> str:
        return next(self._values("s"))

    @property
    def timings(self) -> list[Timing]:
        return [Timing.parse(value) for value in self._values("t")]

    @property
    def connection(self) -> Connection | None:
        """The session-level ``c=``, the default for media without their own."""
        connections = self.connections
        return connections[0] if connections else None

    def set_connection(self, connection: Connection | None) -> None:
        new = [] if connection is None else [Line("c", connection.render())]
        self._replace_all("c", new, keep=lambda _old: False)

    # -- per-stream views that combine both levels ----------------------------------------

    def effective_connection(self, index: int) -> Connection | None:
        """Media ``index``'s own first ``c=``, else the session's (RFC 8866 section 5.7)."""
        return self.media[index].connection or self.connection

    def effective_direction(self, index: int) -> Direction:
        """Media-level direction, else session-level, else sendrecv (RFC 8866 section 6.7)."""
        return self.media[index].direction or self.direction or Direction.SENDRECV

    # -- what the proxy does --------------------------------------------------------------

    def rewrite_media_endpoint(
        self, index: int, address: str, port: int, rtcp_port: int | None = None
    ) -> None:
        """Point media line ``index`` at ``address``:``port`` with its own ``c=`` line.

        See :meth:`MediaDescription.rewrite_endpoint`; the other streams are untouched.
        """
        self.media[index].rewrite_endpoint(address, port, rtcp_port, media_connection=True)

    def rewrite_endpoints(
        self,
        address: str,
        ports: Sequence[int | tuple[int, int] | None],
        *,
        origin: bool = True,
    ) -> None:
        """Move every stream to ``address`` at once, one ``ports`` entry per media line.

        An entry is the RTP port, an ``(rtp, rtcp)`` pair, or None to leave that stream alone
        (typically a rejected one, port 0).  The session-level ``c=`` becomes ``address`` and
        media-level ``c=`` lines of moved streams are dropped, so no trace of the softphone's
        address stays in the relayed offer; live streams left alone keep their old connection
        (it is copied to media level when it came from the session level; a rejected stream's
        address means nothing, so it is not copied).  With ``origin`` the
        ``o=`` address becomes ``address`` too (RFC 8866 section 5.2: it names the host that
        wrote the description).  The ``o=`` version is not touched: see :meth:`bump_version`.
        """
        if len(ports) != len(self.media):
            raise SdpError(f"{len(ports)} port entries for {len(self.media)} media lines")
        new_connection = Connection.for_address(address)
        old_connection = self.connection
        for media, entry in zip(self.media, ports, strict=True):
            live = not media.is_rejected
            if entry is None and live and old_connection is not None and not media.connections:
                media.set_connection(old_connection)
        self.set_connection(new_connection)
        for media, entry in zip(self.media, ports, strict=True):
            if entry is None:
                continue
            rtp, rtcp = entry if isinstance(entry, tuple) else (entry, None)
            media.rewrite_endpoint(address, rtp, rtcp, media_connection=False)
        if origin:
            old = self.origin
            self.origin = replace(old, address=address, addrtype=new_connection.addrtype)


def parse(
    data: bytes | bytearray | memoryview | str,
    *,
    max_size: int = MAX_SDP_SIZE,
    max_lines: int = MAX_SDP_LINES,
) -> SessionDescription:
    """Parse an SDP body; raise :class:`SdpError` (and nothing else) if it is malformed.

    Accepted: CRLF or LF line ends, trailing empty lines, runs of spaces between fields, an
    empty ``s=``, media descriptions without ``c=`` (then :meth:`effective_connection` is
    None).  Rejected: anything over ``max_size`` bytes or ``max_lines`` lines, a first line
    other than ``v=0``, empty lines inside, bare CR or NUL, a type letter RFC 8866 does not
    define (section 5: a parser must ignore or reject such a description; a proxy that cannot
    understand it must not rewrite it), session-only letters inside a media description, a
    missing or repeated ``o=``/``s=``, no ``t=``, and malformed ``o= c= b= t= m=`` lines or
    ``rtpmap fmtp rtcp zrtp-hash crypto`` and direction attributes.  The work is linear in the
    input size; no regular expression can backtrack badly.
    """
    if isinstance(data, str):
        if len(data) > max_size:
            raise SdpError(f"session description larger than {max_size} characters")
        text = data
    else:
        raw = bytes(data)
        if len(raw) > max_size:
            raise SdpError(f"session description larger than {max_size} bytes")
        text = raw.decode("utf-8", "surrogateescape")
    if text.count("\n") > max_lines + 8:
        raise SdpError(f"session description has more than {max_lines} lines")
    raw_lines = text.split("\n")
    while raw_lines and raw_lines[-1] in ("", "\r"):
        raw_lines.pop()
    if not raw_lines:
        raise SdpError("empty session description")
    if len(raw_lines) > max_lines:
        raise SdpError(f"session description has more than {max_lines} lines")

    session: list[Line] = []
    media: list[list[Line]] = []
    for number, raw_line in enumerate(raw_lines, start=1):
        text_line = raw_line[:-1] if raw_line.endswith("\r") else raw_line
        try:
            if not text_line:
                raise SdpError("empty line inside the description")
            if len(text_line) < 2 or text_line[1] != "=":
                raise SdpError(f"expected '<type>=<value>', got {text_line[:40]!r}")
            line = Line(text_line[0], text_line[2:])
            if number == 1 and line.type != "v":
                raise SdpError("a session description must start with v=0")
            if line.type == "m":
                media.append([line])
            if media:
                _validate(line, _MEDIA_ORDER)
                if line.type != "m":
                    media[-1].append(line)
            else:
                _validate(line, _SESSION_ORDER)
                session.append(line)
        except SdpError as error:
            raise SdpError(error.detail, line=number) from None
    description = SessionDescription.__new__(SessionDescription)
    description._lines = session
    description.media = [MediaDescription._trusted(lines) for lines in media]
    description._check_structure()
    return description
