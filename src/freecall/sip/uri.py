"""SIP, SIPS, tel and opaque URIs (RFC 3261 sections 19.1 and 25.1, RFC 3966, RFC 5118).

URIs are immutable values.  Every component is kept *as written* (escapes included, RFC 4475
section 3.1.1.3: no recursive unescaping), so an unmodified URI serialises to its original text;
``replace()`` returns a modified copy that is rendered from its parts.  Comparison follows
RFC 3261 section 19.1.4 and is done on unescaped, case-folded components.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar, Final
from urllib.parse import unquote

from . import grammar
from .errors import SipParseError

Params = Mapping[str, str | None]
"""URI or header parameters: lower-cased names (parameter names are case-insensitive,
RFC 3261 section 7.3.1) to values as written, ``None`` for a parameter without a value.
Read-only: parsed values are shared between messages, so they are never changed in place."""

_ESCAPE_RE = re.compile(r"%([0-9A-Fa-f]{2})")


def unescape(text: str) -> str:
    """Decode %HEX HEX once (RFC 3261 section 19.1.2); 'value%2541' gives 'value%41'."""
    if "%" not in text:
        return text
    return unquote(text, encoding="utf-8", errors="surrogateescape")


def render_params(params: Params) -> str:
    """';name=value' for each parameter, in insertion order."""
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def parse_uri_params(text: str, what: str = "URI") -> Params:
    """Parse ';a=b;c' (already validated by the caller's pattern) into a Params dict.

    URI parameters hold no quotes or white space, so splitting is exact once validated.
    RFC 3261 section 19.1.1: "any given parameter MUST NOT appear more than once"; a duplicate
    is a 400, since two different values for one name would be read differently by different
    elements.
    """
    params: dict[str, str | None] = {}
    parts = text.split(";")
    for i in range(1, len(parts)):
        name, _, value = parts[i].partition("=")
        params[name.lower()] = value or None
    if len(params) != len(parts) - 1:
        raise SipParseError(f"a {what} parameter appears twice in {text!r}")
    return params


class SipUri:
    """A sip: or sips: URI."""

    __slots__ = ("_raw", "headers", "host", "params", "password", "port", "scheme", "user")

    def __init__(
        self,
        host: str,
        user: str | None = None,
        scheme: str = "sip",
        password: str | None = None,
        port: int | None = None,
        params: Params | None = None,
        headers: str | None = None,
        _raw: str | None = None,
    ) -> None:
        self.scheme: Final = scheme
        self.user: Final = user
        self.password: Final = password
        self.host: Final = host
        self.port: Final = port
        self.params: Final[Params] = params if params is not None else {}
        self.headers: Final = headers
        self._raw: str | None = _raw

    # -- derived values -------------------------------------------------------------------
    @property
    def secure(self) -> bool:
        return self.scheme == "sips"

    @property
    def host_port(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def bare_host(self) -> str:
        """Host without IPv6 brackets, lower-cased: what a resolver or socket wants."""
        host = self.host
        if host.startswith("["):
            host = host[1:-1]
        return host.lower()

    @property
    def transport(self) -> str | None:
        value = self.params.get("transport")
        return value.lower() if value else None

    @property
    def lr(self) -> bool:
        return "lr" in self.params

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def aor(self) -> str:
        """The address of record 'user@host' (unescaped user, lower-cased host), for lookups."""
        if self.user is None:
            return self.host.lower()
        return f"{unescape(self.user)}@{self.host.lower()}"

    def param(self, name: str) -> str | None:
        return self.params.get(name.lower())

    # -- rendering and modification -------------------------------------------------------
    def __str__(self) -> str:
        raw = self._raw
        if raw is not None:
            return raw
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out.append(":")
                out.append(self.password)
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out.append(f":{self.port}")
        if self.params:
            out.append(render_params(self.params))
        if self.headers is not None:
            out.append("?")
            out.append(self.headers)
        raw = "".join(out)
        self._raw = raw
        return raw

    def __repr__(self) -> str:
        return f"SipUri({str(self)!r})"

    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"host", "user", "scheme", "password", "port", "params", "headers"}
    )

    def replace(self, **changes: Any) -> SipUri:
        """A copy with the given attributes changed (``params`` replaces the whole mapping)."""
        for key in changes:
            if key not in self._FIELDS:
                raise TypeError(f"SipUri has no field {key!r}")
        get = changes.get
        return SipUri(
            get("host", self.host),
            get("user", self.user),
            get("scheme", self.scheme),
            get("password", self.password),
            get("port", self.port),
            dict(get("params", self.params)),
            get("headers", self.headers),
        )

    def with_params(self, **params: str | None) -> SipUri:
        merged = dict(self.params)
        for key, value in params.items():
            merged[key.lower()] = value
        return self.replace(params=merged)

    def without_params(self, *names: str) -> SipUri:
        merged = {k: v for k, v in self.params.items() if k not in {n.lower() for n in names}}
        return self.replace(params=merged)

    # -- RFC 3261 section 19.1.4 comparison -----------------------------------------------
    def _key(self) -> tuple[object, ...]:
        # A parameter present in only one URI is ignored, except user, ttl, method, maddr and
        # transport, which must then match "by default" values; we compare those five exactly.
        special = tuple(
            (unescape(value).lower() if (value := self.params.get(name)) else None)
            for name in ("transport", "user", "ttl", "method", "maddr")
        )
        return (
            self.scheme,
            unescape(self.user) if self.user is not None else None,
            unescape(self.password) if self.password is not None else None,
            self.host.lower(),
            self.port,
            special,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SipUri):
            return NotImplemented
        if self._key() != other._key():
            return False
        # Other parameters present in both URIs must match (case-insensitively).
        for name, value in self.params.items():
            if name in other.params:
                theirs = other.params[name]
                mine_u = unescape(value).lower() if value else value
                theirs_u = unescape(theirs).lower() if theirs else theirs
                if mine_u != theirs_u:
                    return False
        return _header_set(self.headers) == _header_set(other.headers)

    def __hash__(self) -> int:
        return hash(self._key())


def _header_set(headers: str | None) -> frozenset[tuple[str, str]]:
    """URI headers as an unordered set of (lower-cased name, unescaped value) (section 19.1.4)."""
    if not headers:
        return frozenset()
    out = set()
    for item in headers.split("&"):
        name, _, value = item.partition("=")
        out.add((unescape(name).lower(), unescape(value)))
    return frozenset(out)


class TelUri:
    """A tel: URI (RFC 3966): a global (+...) or local number with parameters."""

    __slots__ = ("_raw", "number", "params", "scheme")

    def __init__(self, number: str, params: Params | None = None, _raw: str | None = None):
        self.scheme: Final = "tel"
        self.number: Final = number
        self.params: Final[Params] = params if params is not None else {}
        self._raw: str | None = _raw

    @property
    def is_global(self) -> bool:
        return self.number.startswith("+")

    @property
    def digits(self) -> str:
        """The number without visual separators (RFC 3966 section 5.1.1)."""
        return "".join(ch for ch in self.number if ch not in "-.()")

    def __str__(self) -> str:
        if self._raw is None:
            self._raw = f"tel:{self.number}{render_params(self.params)}"
        return self._raw

    def __repr__(self) -> str:
        return f"TelUri({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TelUri):
            return NotImplemented
        return self.digits == other.digits and {
            k: (v.lower() if v else v) for k, v in self.params.items()
        } == {k: (v.lower() if v else v) for k, v in other.params.items()}

    def __hash__(self) -> int:
        return hash(self.digits)


class AbsoluteUri:
    """Any other scheme, kept opaque (RFC 4475 sections 3.3.2-3.3.4: parse, then decide)."""

    __slots__ = ("_scheme_as_written", "opaque", "scheme")

    def __init__(self, scheme: str, opaque: str):
        self.scheme: Final = scheme.lower()
        self.opaque: Final = opaque
        self._scheme_as_written: Final = scheme

    def __str__(self) -> str:
        return f"{self._scheme_as_written}:{self.opaque}"

    def __repr__(self) -> str:
        return f"AbsoluteUri({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AbsoluteUri):
            return NotImplemented
        return self.scheme == other.scheme and self.opaque == other.opaque

    def __hash__(self) -> int:
        return hash((self.scheme, self.opaque))


Uri = SipUri | TelUri | AbsoluteUri

_sip_match = grammar.SIP_URI_RE.fullmatch


def parse_uri(text: str) -> Uri:
    """Parse a URI; sip/sips strictly, tel per RFC 3966, anything else kept opaque."""
    m = _sip_match(text)
    if m is not None:
        scheme, user, password, host, port, params, headers = m.groups()
        port_num: int | None = None
        if port is not None:
            port_num = int(port)
            if port_num > 65535:
                raise SipParseError(f"port {port} out of range in URI {text!r}")
        return SipUri(
            host,
            user,
            scheme.lower(),
            password,
            port_num,
            parse_uri_params(params) if params else {},
            headers,
            text,
        )
    head = text[:5].lower()
    if head.startswith(("sip:", "sips:")):
        raise SipParseError(f"malformed SIP URI {text!r}")
    if head.startswith("tel:"):
        t = grammar.TEL_URI_RE.fullmatch(text)
        if t is None:
            raise SipParseError(f"malformed tel URI {text!r}")
        tparams: dict[str, str | None] = {}
        for part in t.group(3).split(";")[1:]:
            name, sep, value = part.partition("=")
            tparams[name.lower()] = value if sep else None
        return TelUri(t.group(2), tparams, _raw=text)
    a = grammar.ABSOLUTE_URI_RE.fullmatch(text)
    if a is None:
        raise SipParseError(f"malformed URI {text!r}")
    return AbsoluteUri(a.group(1), a.group(2))


def parse_sip_uri(text: str) -> SipUri:
    """Parse a URI that must be sip: or sips: (416 otherwise, RFC 3261 section 8.2.2.1)."""
    uri = parse_uri(text)
    if not isinstance(uri, SipUri):
        raise SipParseError(f"not a SIP URI: {text!r}", 416)
    return uri
