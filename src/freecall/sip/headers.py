"""Typed header field values: Via, name-addr (From, To, Contact, Route, ...), CSeq.

Values are immutable (``Final`` attributes and read-only parameter mappings, checked by mypy),
so one parsed value can be shared by every message that carries the same header line (see
:class:`freecall.sip.message.HeaderCache`).  Each keeps the text it was parsed from and
serialises back to it unchanged, so what a proxy does not touch is forwarded exactly as
received; a modified copy (``with_params``, ``with_uri``, ...) is rendered from its parts.
"""

from __future__ import annotations

from typing import ClassVar, Final

from . import grammar
from .errors import SipParseError
from .uri import Params, SipUri, Uri, parse_uri, parse_uri_params, render_params

_param_tail_match = grammar.PARAMS_TAIL_RE.fullmatch
_param_findall = grammar.PARAM_RE.findall
_via_match = grammar.VIA_RE.fullmatch
_name_addr_sip_match = grammar.NAME_ADDR_SIP_RE.fullmatch


def parse_params(text: str, what: str) -> Params:
    """Parse header parameters ``*( SEMI generic-param )`` (RFC 3261 section 25.1).

    An empty parameter (``;;``, RFC 4475 section 3.1.2.1) or a duplicate name is a 400.
    """
    if not text:
        return {}
    if _param_tail_match(text) is None:
        raise SipParseError(f"malformed parameters in {what}: {text.strip()!r}")
    return params_from_valid_tail(text, what)


def params_from_valid_tail(text: str, what: str) -> Params:
    """Parameters from a tail already matched by PARAMS_TAIL: split fast when it holds no
    quoted string or white space (the usual case), by the grammar's pattern otherwise."""
    if '"' in text or " " in text or "\t" in text:
        pass
    elif text.count(";") == 1:  # the usual ";tag=..." or ";branch=..."
        name, _, value = text[1:].partition("=")
        return {name.lower(): value or None}
    params: dict[str, str | None] = {}
    if '"' in text or " " in text or "\t" in text:
        pairs = _param_findall(text)
        for name, value in pairs:
            params[name.lower()] = value or None
        count = len(pairs)
    else:
        parts = text.split(";")
        for i in range(1, len(parts)):
            name, _, value = parts[i].partition("=")
            params[name.lower()] = value or None
        count = len(parts) - 1
    if len(params) != count:
        raise SipParseError(f"a parameter appears twice in {what}: {text.strip()!r}")
    return params


def split_commas(value: str) -> list[str]:
    """Split a multi-valued header at commas outside quoted strings and <...> (section 7.3.1)."""
    if "," not in value:
        return [value]
    if '"' not in value and "<" not in value:
        return value.split(",")
    parts: list[str] = []
    start = 0
    in_quotes = False
    in_angle = False
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if in_quotes:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif ch == "<":
            in_angle = True
        elif ch == ">":
            in_angle = False
        elif ch == "," and not in_angle:
            parts.append(value[start:i])
            start = i + 1
        i += 1
    if in_quotes:
        raise SipParseError(f"unterminated quoted string in {value!r}")
    parts.append(value[start:])
    return parts


class Via:
    """One via-parm (RFC 3261 sections 20.42 and 25.1; RFC 3581 rport)."""

    __slots__ = ("_raw", "host", "params", "port", "protocol", "transport")

    def __init__(
        self,
        transport: str,
        host: str,
        port: int | None = None,
        params: Params | None = None,
        protocol: str = "SIP/2.0",
        _raw: str | None = None,
    ) -> None:
        self.protocol: Final = protocol
        self.transport: Final = transport
        self.host: Final = host
        self.port: Final = port
        self.params: Final[Params] = params if params is not None else {}
        self._raw: str | None = _raw

    @classmethod
    def parse(cls, text: str) -> Via:
        m = _via_match(text)
        if m is None:
            raise SipParseError(f"malformed Via {text.strip()!r}")
        name, version, transport, host, port, tail = m.groups()
        port_num = None
        if port is not None:
            port_num = int(port)
            if port_num > 65535:
                raise SipParseError(f"Via port {port} out of range")
        return cls(
            transport.upper(),
            host,
            port_num,
            params_from_valid_tail(tail, "Via") if tail else {},
            "SIP/2.0" if name == "SIP" and version == "2.0" else f"{name}/{version}",
            text.strip(" \t"),
        )

    # RFC 3261 section 8.1.1.7: a branch starting with the magic cookie is an RFC 3261 one.
    MAGIC_COOKIE: ClassVar[str] = "z9hG4bK"

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        """The rport value, or None when absent or empty (RFC 3581 section 4)."""
        value = self.params.get("rport")
        if value is None or not value.isascii() or not value.isdigit() or len(value) > 5:
            return None  # a port has at most 5 digits; int() of thousands raises
        port = int(value)
        return port if port <= 65535 else None

    @property
    def wants_rport(self) -> bool:
        return "rport" in self.params

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def sent_by(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def rfc3261_branch(self) -> bool:
        """True when the branch carries the magic cookie *and* something after it.

        RFC 4475 section 3.2.1: a branch of exactly 'z9hG4bK' identifies nothing.
        """
        branch = self.params.get("branch")
        return (
            branch is not None
            and branch.startswith(self.MAGIC_COOKIE)
            and len(branch) > len(self.MAGIC_COOKIE)
        )

    def __str__(self) -> str:
        raw = self._raw
        if raw is None:
            hostport = self.host if self.port is None else f"{self.host}:{self.port}"
            raw = f"{self.protocol}/{self.transport} {hostport}{render_params(self.params)}"
            self._raw = raw
        return raw

    def __repr__(self) -> str:
        return f"Via({str(self)!r})"

    def with_params(self, **params: str | None) -> Via:
        """A copy with parameters added or replaced (e.g. received=, rport=)."""
        merged = dict(self.params)
        for key, value in params.items():
            merged[key.lower()] = value
        return Via(self.transport, self.host, self.port, merged, self.protocol)


class Address:
    """A name-addr or addr-spec with header parameters (From, To, Contact, Route, ...)."""

    __slots__ = ("_raw", "_uri", "_uri_parts", "display", "params")

    def __init__(
        self,
        uri: Uri | None,
        display: str | None = None,
        params: Params | None = None,
        _raw: str | None = None,
        _uri_parts: tuple[str, str | None, str, str | None, int | None, str, str | None, str]
        | None = None,
    ) -> None:
        # The URI of a parsed SIP name-addr is built on first use: its syntax was checked by the
        # same pattern that matched the header, and From/To are mostly read for their tags.
        self._uri = uri
        self._uri_parts: Final = _uri_parts
        self.display: Final = display
        self.params: Final[Params] = params if params is not None else {}
        self._raw: str | None = _raw

    @property
    def uri(self) -> Uri:
        uri = self._uri
        if uri is None:
            parts = self._uri_parts
            assert parts is not None
            host, user, scheme, password, port, uparams, uheaders, text = parts
            uri = self._uri = SipUri(
                host,
                user,
                scheme.lower(),
                password,
                port,
                parse_uri_params(uparams) if uparams else {},
                uheaders,
                text,
            )
        return uri

    @classmethod
    def parse(cls, text: str, what: str = "address") -> Address:
        """Parse ``( name-addr / addr-spec ) *( SEMI generic-param )`` (RFC 3261 section 20.10)."""
        m = _name_addr_sip_match(text)
        if m is not None:
            # The common case, a name-addr with a SIP URI, in one pass.
            display, uri_text, scheme, user, password, host, port, uparams, uheaders, tail = (
                m.groups()
            )
            port_num = None
            if port is not None:
                port_num = int(port)
                if port_num > 65535:
                    raise SipParseError(f"port {port} out of range in {what}")
            if uparams.count(";") > 1:
                parse_uri_params(uparams, what)  # a duplicate URI parameter is a 400 now
            return cls(
                None,
                display or None,
                params_from_valid_tail(tail, what) if tail else {},
                text.strip(" \t"),
                (host, user, scheme, password, port_num, uparams, uheaders, uri_text),
            )
        m = grammar.NAME_ADDR_RE.match(text)
        if m is not None:
            display = m.group(1) or None
            uri_text = m.group(2)
        else:
            m = grammar.ADDR_SPEC_RE.match(text)
            if m is None:
                raise SipParseError(f"malformed {what} {text.strip()!r}")
            display = None
            uri_text = m.group(1)
        tail = text[m.end() :]
        if tail and not tail.isspace():
            if tail.lstrip(" \t")[:1] != ";":
                raise SipParseError(f"malformed {what} {text.strip()!r}")
            params = parse_params(tail, what)
        else:
            params = {}
        return cls(parse_uri(uri_text), display, params, text.strip(" \t"))

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @property
    def sip_uri(self) -> SipUri | None:
        uri = self.uri
        return uri if isinstance(uri, SipUri) else None

    @property
    def display_name(self) -> str | None:
        """The display name without quotes and quoted-pair escapes."""
        d = self.display
        if d is None:
            return None
        if d.startswith('"'):
            inner = d[1:-1]
            out = []
            i = 0
            while i < len(inner):
                if inner[i] == "\\" and i + 1 < len(inner):
                    i += 1
                out.append(inner[i])
                i += 1
            return "".join(out)
        return d

    @property
    def q(self) -> float:
        """Contact q-value (RFC 3261 section 20.10), 1.0 when absent or unreadable."""
        value = self.params.get("q")
        if value is None:
            return 1.0
        try:
            q = float(value)
        except ValueError:
            return 1.0
        return q if 0.0 <= q <= 1.0 else 1.0

    @property
    def expires(self) -> int | None:
        value = self.params.get("expires")
        if value is None or not value.isascii() or not value.isdigit():
            return None
        if len(value.lstrip("0")) > 10:  # delta-seconds: capped (RFC 3261 section 10.2.1.1)
            return 2**32 - 1
        return min(int(value), 2**32 - 1)

    def __str__(self) -> str:
        raw = self._raw
        if raw is None:
            display = f"{self.display} " if self.display else ""
            raw = f"{display}<{self.uri}>{render_params(self.params)}"
            self._raw = raw
        return raw

    def __repr__(self) -> str:
        return f"Address({str(self)!r})"

    def with_params(self, **params: str | None) -> Address:
        merged = dict(self.params)
        for key, value in params.items():
            merged[key.lower()] = value
        return Address(self.uri, self.display, merged)

    def without_params(self, *names: str) -> Address:
        drop = {n.lower() for n in names}
        return Address(
            self.uri, self.display, {k: v for k, v in self.params.items() if k not in drop}
        )

    def with_uri(self, uri: Uri) -> Address:
        return Address(uri, self.display, dict(self.params))

    def with_display(self, display: str | None) -> Address:
        """A copy with a new display name, quoted and escaped as needed."""
        if display is not None:
            display = '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return Address(self.uri, display, dict(self.params))


class CSeq:
    """CSeq = 1*DIGIT LWS Method (RFC 3261 section 20.16)."""

    __slots__ = ("method", "number")

    # RFC 3261 section 8.1.1.5 asks senders for < 2**31; RFC 4475 section 3.1.2.4 rejects > 2**32-1.
    MAX: ClassVar[int] = 2**32 - 1

    def __init__(self, number: int, method: str) -> None:
        self.number: Final = number
        self.method: Final = method

    @classmethod
    def parse(cls, text: str) -> CSeq:
        m = grammar.CSEQ_RE.fullmatch(text)
        if m is None:
            raise SipParseError(f"malformed CSeq {text.strip()!r}")
        digits = m.group(1)
        if len(digits) > 10 or int(digits) > cls.MAX:
            raise SipParseError(f"CSeq number {digits} larger than 2**32-1")
        return cls(int(digits), m.group(2))

    def __str__(self) -> str:
        return f"{self.number} {self.method}"

    def __repr__(self) -> str:
        return f"CSeq({self.number}, {self.method!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CSeq):
            return NotImplemented
        return self.number == other.number and self.method == other.method

    def __hash__(self) -> int:
        return hash((self.number, self.method))
