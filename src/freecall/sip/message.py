"""SIP requests and responses: parse, inspect, modify, serialise (RFC 3261 sections 7, 18.3, 25).

Design
------
A message is a start line, an ordered list of :class:`Header` fields and a body.  Each header
field holds one value: multi-valued headers the core needs (Via, Contact, Route, Record-Route)
are split into one field per value at parse time; every other header stays one raw string and is
forwarded exactly as received.  The values of the headers the core needs are typed (``Via``,
``Address``, ``CSeq``, ``int``) and keep their original text, so an unmodified message
re-serialises to an equivalent one, header by header.

Parsing validates what RFC 4475 asks a parser to reject and raises :class:`SipParseError` with
the status to answer; it never raises anything else on any input (see the hypothesis tests).
Content-Length is not stored as a header: it is computed from the body when serialising.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from . import grammar
from .errors import SipParseError
from .headers import Address, CSeq, Via, split_commas
from .uri import SipUri, Uri, parse_uri

HeaderValue = Any  # str, int, Via, Address or CSeq: anything whose str() is the wire form

# -- header names ---------------------------------------------------------------------------
# canonical wire name per lower-case key; compact forms (RFC 3261 section 7.3.3, RFC 3265,
# RFC 3515, RFC 3892, RFC 4028, RFC 3841, RFC 4474) map to the key of their long form.
_CANONICAL = [
    "Accept",
    "Accept-Contact",
    "Accept-Encoding",
    "Accept-Language",
    "Alert-Info",
    "Allow",
    "Allow-Events",
    "Authentication-Info",
    "Authorization",
    "Call-ID",
    "Call-Info",
    "Contact",
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Content-Length",
    "Content-Type",
    "CSeq",
    "Date",
    "Error-Info",
    "Event",
    "Expires",
    "From",
    "Identity",
    "Identity-Info",
    "In-Reply-To",
    "Max-Forwards",
    "Min-Expires",
    "Min-SE",
    "MIME-Version",
    "Organization",
    "P-Asserted-Identity",
    "Path",
    "Priority",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "Proxy-Require",
    "RAck",
    "Reason",
    "Record-Route",
    "Refer-To",
    "Referred-By",
    "Reject-Contact",
    "Reply-To",
    "Request-Disposition",
    "Require",
    "Retry-After",
    "Route",
    "RSeq",
    "Server",
    "Session-Expires",
    "SIP-ETag",
    "SIP-If-Match",
    "Subject",
    "Subscription-State",
    "Supported",
    "Timestamp",
    "To",
    "Unsupported",
    "User-Agent",
    "Via",
    "Warning",
    "WWW-Authenticate",
]
COMPACT_FORMS = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "n": "identity-info",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}
DISPLAY_NAME: dict[str, str] = {name.lower(): name for name in _CANONICAL}

# How each header is parsed: raw text kept as is, or a typed value.
RAW, ADDRESS, CALL_ID, CSEQ, MAX_FORWARDS, CONTENT_LENGTH, LIST, DATE = range(8)
_KIND = {
    "from": ADDRESS,
    "to": ADDRESS,
    "call-id": CALL_ID,
    "cseq": CSEQ,
    "max-forwards": MAX_FORWARDS,
    "content-length": CONTENT_LENGTH,
    "via": LIST,
    "contact": LIST,
    "route": LIST,
    "record-route": LIST,
    "path": LIST,
    "date": DATE,
}

# name as written (exact or lower-cased) -> (key, wire name, kind)
_NAME_LOOKUP: dict[str, tuple[str, str, int]] = {}
for _name in _CANONICAL:
    _entry = (_name.lower(), _name, _KIND.get(_name.lower(), RAW))
    _NAME_LOOKUP[_name] = _NAME_LOOKUP[_name.lower()] = _entry
for _short, _key in COMPACT_FORMS.items():
    _entry = (_key, DISPLAY_NAME[_key], _KIND.get(_key, RAW))
    _NAME_LOOKUP[_short] = _NAME_LOOKUP[_short.upper()] = _entry
del _name, _short, _key, _entry

_token_match = grammar.TOKEN_RE.fullmatch


def header_key(name: str) -> str:
    """The lower-case long-form key for a header name as written ("v", "VIA" -> "via")."""
    found = _NAME_LOOKUP.get(name) or _NAME_LOOKUP.get(name.lower())
    return found[0] if found else name.lower()


def _lookup_name(name: str) -> tuple[str, str, int]:
    found = _NAME_LOOKUP.get(name)
    if found is None:
        lower = name.lower()
        found = _NAME_LOOKUP.get(lower)
        if found is None:
            if _token_match(name) is None:
                raise SipParseError(f"invalid header name {name!r}")
            found = (lower, name, RAW)
    return found


class Header:
    """One header field: lower-case key, the name to write, and one value.

    Treated as immutable: messages parsed with a :class:`HeaderCache` share Header objects, so
    a change to a message replaces a Header in its list and never edits one.
    """

    __slots__ = ("key", "name", "value")

    def __init__(self, key: str, name: str, value: HeaderValue) -> None:
        self.key = key
        self.name = name
        self.value = value

    def __repr__(self) -> str:
        return f"Header({self.name!r}, {str(self.value)!r})"


# Headers that may appear only once (RFC 3261 section 7.3.1 / table 2, RFC 4475 section 3.3.8).
SINGLE_VALUED = frozenset({"call-id", "cseq", "from", "to", "max-forwards", "content-length"})


# Multi-valued headers the core splits into one field per value, with their value parser.
def _parse_contact(text: str) -> Address | str:
    """A Contact value: '*' (REGISTER only, RFC 3261 section 10.2.2) or an address."""
    if text.strip(" \t") == "*":
        return "*"
    return Address.parse(text, "Contact")


_SPLIT_PARSERS: dict[str, Any] = {
    "via": Via.parse,
    "contact": _parse_contact,
    "route": Address.parse,
    "record-route": Address.parse,
    "path": Address.parse,
}
KNOWN_METHODS = frozenset(
    {
        "INVITE",
        "ACK",
        "BYE",
        "CANCEL",
        "OPTIONS",
        "REGISTER",
        "PRACK",
        "SUBSCRIBE",
        "NOTIFY",
        "PUBLISH",
        "INFO",
        "REFER",
        "MESSAGE",
        "UPDATE",
    }
)


def _parse_int(text: str, key: str, limit: int) -> int:
    text = text.strip(" \t")
    if not text.isdigit() or not text.isascii():
        raise SipParseError(f"{DISPLAY_NAME.get(key, key)} is not a number: {text!r}")
    if len(text) > 12 or int(text) > limit:
        raise SipParseError(f"{DISPLAY_NAME.get(key, key)} {text} out of range")
    return int(text)


class Message:
    """Common part of requests and responses.

    The first value of each header is indexed on first use (the proxy reads From, To, CSeq,
    Call-ID and Via many times per message); every method that changes ``headers`` drops the
    index, and code that edits the list itself calls :meth:`touched`.
    """

    __slots__ = ("_first", "body", "headers")

    is_request: ClassVar[bool]

    def __init__(self, headers: list[Header] | None = None, body: bytes = b"") -> None:
        self.headers: list[Header] = headers if headers is not None else []
        self.body = body
        self._first: dict[str, HeaderValue] | None = None

    def touched(self) -> None:
        """``headers`` was changed directly: forget the index."""
        self._first = None

    def _index(self) -> dict[str, HeaderValue]:
        index = self._first
        if index is None:
            index = {}
            for h in self.headers:
                if h.key not in index:
                    index[h.key] = h.value
            self._first = index
        return index

    # -- generic access -------------------------------------------------------------------
    def get(self, name: str) -> HeaderValue | None:
        """The first value of a header, or None."""
        return self._index().get(header_key(name))

    def get_all(self, name: str) -> list[HeaderValue]:
        key = header_key(name)
        return [h.value for h in self.headers if h.key == key]

    def get_list(self, name: str) -> list[str]:
        """Comma-separated values of a raw header, over all its fields (Allow, Require, ...)."""
        out: list[str] = []
        for value in self.get_all(name):
            for item in split_commas(str(value)):
                stripped = item.strip(" \t")
                if stripped:
                    out.append(stripped)
        return out

    def has(self, name: str) -> bool:
        key = header_key(name)
        return any(h.key == key for h in self.headers)

    def __contains__(self, name: str) -> bool:
        return self.has(name)

    # -- modification ---------------------------------------------------------------------
    def _new(self, name: str, value: HeaderValue) -> Header:
        key = header_key(name)
        return Header(key, DISPLAY_NAME.get(key, name), value)

    def prepend(self, name: str, value: HeaderValue) -> None:
        """Insert a value before the first field of that header, or at the top if none."""
        self._first = None
        header = self._new(name, value)
        for i, h in enumerate(self.headers):
            if h.key == header.key:
                self.headers.insert(i, header)
                return
        self.headers.insert(0, header)

    def append(self, name: str, value: HeaderValue) -> None:
        """Add a value after the last field of that header, or at the end if none."""
        self._first = None
        header = self._new(name, value)
        last = -1
        for i, h in enumerate(self.headers):
            if h.key == header.key:
                last = i
        if last < 0:
            self.headers.append(header)
        else:
            self.headers.insert(last + 1, header)

    def set(self, name: str, value: HeaderValue) -> None:
        """Replace every field of that header with one value (in place of the first)."""
        self._first = None
        header = self._new(name, value)
        out: list[Header] = []
        placed = False
        for h in self.headers:
            if h.key == header.key:
                if not placed:
                    out.append(header)
                    placed = True
            else:
                out.append(h)
        if not placed:
            out.append(header)
        self.headers = out

    def remove(self, name: str) -> None:
        self._first = None
        key = header_key(name)
        self.headers = [h for h in self.headers if h.key != key]

    def pop_first(self, name: str) -> HeaderValue | None:
        self._first = None
        key = header_key(name)
        for i, h in enumerate(self.headers):
            if h.key == key:
                del self.headers[i]
                return h.value
        return None

    def replace_first(self, name: str, value: HeaderValue) -> None:
        self._first = None
        key = header_key(name)
        for i, h in enumerate(self.headers):
            if h.key == key:
                # a new Header: parsed ones may be shared with other messages (HeaderCache)
                self.headers[i] = Header(h.key, h.name, value)
                return
        self.prepend(name, value)

    # -- typed access to the fields the core needs ----------------------------------------
    @property
    def vias(self) -> list[Via]:
        return [h.value for h in self.headers if h.key == "via"]

    @property
    def via(self) -> Via:
        """The topmost Via (every parsed message has one)."""
        value: Via | None = self._index().get("via")
        if value is None:
            raise LookupError("message has no Via")
        return value

    @property
    def from_(self) -> Address:
        value: Address = self._required("from")
        return value

    @property
    def to(self) -> Address:
        value: Address = self._required("to")
        return value

    @property
    def call_id(self) -> str:
        value: str = self._required("call-id")
        return value

    @property
    def cseq(self) -> CSeq:
        value: CSeq = self._required("cseq")
        return value

    @property
    def contacts(self) -> list[Address]:
        """Contact values (empty for 'Contact: *', see :attr:`contact_star`)."""
        return [h.value for h in self.headers if h.key == "contact" and h.value != "*"]

    @property
    def contact_star(self) -> bool:
        return any(h.key == "contact" and h.value == "*" for h in self.headers)

    @property
    def max_forwards(self) -> int | None:
        value: int | None = self._index().get("max-forwards")
        return value

    @property
    def routes(self) -> list[Address]:
        return [h.value for h in self.headers if h.key == "route"]

    @property
    def record_routes(self) -> list[Address]:
        return [h.value for h in self.headers if h.key == "record-route"]

    @property
    def content_type(self) -> str | None:
        value = self.get("content-type")
        if value is None:
            return None
        return str(value).split(";", 1)[0].strip(" \t").lower()

    @property
    def expires(self) -> int | None:
        """The Expires header as delta-seconds, None when absent or not a number."""
        value = self.get("expires")
        if value is None:
            return None
        text = str(value).strip(" \t")
        if not (text.isdigit() and text.isascii()):
            return None
        # RFC 3261 section 20.19: a larger value than 2**32-1 means 2**32-1
        return min(int(text), 2**32 - 1) if len(text) <= 12 else 2**32 - 1

    def _required(self, key: str) -> Any:
        value = self._index().get(key)
        if value is None:
            raise LookupError(f"message has no {DISPLAY_NAME.get(key, key)}")
        return value

    # -- serialisation --------------------------------------------------------------------
    def start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """Serialise with CRLF line ends and a Content-Length equal to the body's length."""
        parts = [self.start_line()]
        parts.extend([f"{h.name}: {h.value}" for h in self.headers])
        parts.append(f"Content-Length: {len(self.body)}\r\n\r\n")
        head = "\r\n".join(parts).encode("utf-8", "surrogateescape")
        return head + self.body if self.body else head

    __bytes__ = to_bytes

    def __iter__(self) -> Iterator[Header]:
        return iter(self.headers)


class Request(Message):
    """A SIP request."""

    __slots__ = ("method", "uri", "version")
    is_request = True

    def __init__(
        self,
        method: str,
        uri: Uri,
        headers: list[Header] | None = None,
        body: bytes = b"",
        version: str = grammar.SIP_VERSION,
    ) -> None:
        super().__init__(headers, body)
        self.method = method
        self.uri = uri
        self.version = version

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {self.version}"

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"


class Response(Message):
    """A SIP response."""

    __slots__ = ("reason", "status", "version")
    is_request = False

    def __init__(
        self,
        status: int,
        reason: str | None = None,
        headers: list[Header] | None = None,
        body: bytes = b"",
        version: str = grammar.SIP_VERSION,
    ) -> None:
        super().__init__(headers, body)
        self.status = status
        self.reason = REASON_PHRASES.get(status, "") if reason is None else reason
        self.version = version

    def start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    @property
    def provisional(self) -> bool:
        return self.status < 200

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


# RFC 3261 section 21 (and RFC 3262, 3265, 3903, 4028, 5626, 6665 additions).
REASON_PHRASES = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    199: "Early Dialog Terminated",
    200: "OK",
    202: "Accepted",
    204: "No Notification",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    412: "Conditional Request Failed",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    422: "Session Interval Too Small",
    423: "Interval Too Brief",
    429: "Provide Referrer Identity",
    430: "Flow Failed",
    439: "First Hop Lacks Outbound Support",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    485: "Ambiguous",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    489: "Bad Event",
    491: "Request Pending",
    493: "Undecipherable",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    580: "Precondition Failure",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}

# -- parsing ----------------------------------------------------------------------------------
_header_end_search = grammar.HEADER_END_RE.search
_fold_sub = grammar.FOLD_RE.sub
_request_line_match = grammar.REQUEST_LINE_RE.fullmatch
_status_line_match = grammar.STATUS_LINE_RE.fullmatch
_call_id_match = grammar.CALL_ID_RE.fullmatch
_address_parse = Address.parse
_cseq_parse = CSeq.parse

MAX_MESSAGE_SIZE = 65535
"""Largest message accepted (the largest UDP payload; streams are capped by the framer)."""


def split_head(data: bytes, *, datagram: bool) -> tuple[str, bytes]:
    """Split the header section (decoded, unfolded) from what follows it."""
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        head_bytes = data[:end]
        rest = data[end + 4 :]
    else:
        m = _header_end_search(data)  # bare LF line ends (tolerated)
        if m is not None:
            head_bytes = data[: m.start()]
            rest = data[m.end() :]
        elif datagram and data.endswith(b"\n"):
            # RFC 5118 section 4.10's archive messages and RFC 4475 baddn end after the last
            # header line with no empty line; a datagram has nothing more to come, so take it
            # as complete.
            head_bytes = data
            rest = b""
        else:
            raise SipParseError("header section not terminated by an empty line")
    # UTF-8 with surrogateescape: any octet survives a round trip, valid UTF-8 reads as text.
    head = head_bytes.decode("utf-8", "surrogateescape")
    if head[:1] in ("\r", "\n"):
        # RFC 3261 section 7.5: CRLFs before the start line are ignored.
        head = head.lstrip("\r\n")
    if "\n " in head or "\n\t" in head:
        head = _fold_sub(" ", head)
    return head, rest


class HeaderCache:
    """Parsed header lines by their exact text, shared by the messages of one daemon.

    A retransmission, a response and the in-dialog requests of a call repeat most header lines
    of earlier messages (Via, From, To, Call-ID, Contact, ...).  Parsed values are immutable, so
    a line seen before costs one dictionary lookup instead of a regular-expression parse.  The
    cache is bounded: when full it is emptied, so hostile input can only cause misses, never
    growth.  It is an object the caller owns (the core keeps no global state).
    """

    __slots__ = ("entries", "max_entries", "max_line", "misses", "start_lines")

    def __init__(self, max_entries: int = 4096, max_line: int = 512) -> None:
        self.entries: dict[str, tuple[str, str, int, tuple[Header, ...]]] = {}
        self.start_lines: dict[str, tuple[str, Uri]] = {}
        self.max_entries = max_entries
        self.max_line = max_line
        self.misses = 0

    def store(self, line: str, entry: tuple[str, str, int, tuple[Header, ...]]) -> None:
        self.misses += 1
        if len(line) > self.max_line:
            return
        entries = self.entries
        if len(entries) >= self.max_entries:
            entries.clear()
        entries[line] = entry

    def store_start(self, line: str, method: str, uri: Uri) -> None:
        if len(line) > self.max_line:
            return
        if len(self.start_lines) >= self.max_entries:
            self.start_lines.clear()
        self.start_lines[line] = (method, uri)


def parse_message(
    data: bytes, *, datagram: bool = True, cache: HeaderCache | None = None
) -> Request | Response:
    """Parse one message.

    ``datagram`` selects the RFC 3261 section 18.3 framing rules: over UDP a missing
    Content-Length means the body runs to the end of the datagram and octets after the
    Content-Length are ignored; on a stream the framer has already cut the message, and a
    missing Content-Length means no body.  ``cache`` (optional) reuses the parse of header
    lines seen before.
    """
    if len(data) > MAX_MESSAGE_SIZE:
        raise SipParseError(f"message of {len(data)} octets is too large", 513)
    end = data.find(b"\r\n\r\n")
    if end > 0 and data[0] not in (0x0D, 0x0A):
        # the usual case inline: CRLF line ends, no leading empty lines
        head = data[:end].decode("utf-8", "surrogateescape")
        rest = data[end + 4 :]
        if "\n " in head or "\n\t" in head:
            head = _fold_sub(" ", head)
    else:
        head, rest = split_head(data, datagram=datagram)
    lines = head.split("\r\n") if "\r" in head else head.split("\n")
    start = lines[0]
    is_request = not start.startswith("SIP/")
    try:
        if len(lines) > 1 and head.count("\n") != len(lines) - 1:
            # CRLF line ends with a bare LF among them: no reading of that line is safe (it
            # would change meaning when forwarded), so the message is malformed.
            raise SipParseError("a bare LF inside a header line")
        msg: Request | Response
        known = cache.start_lines.get(start) if cache is not None else None
        if known is not None:
            msg = Request(known[0], known[1])
        else:
            msg = _parse_start_line(start)
            if cache is not None and isinstance(msg, Request):
                cache.store_start(start, msg.method, msg.uri)
        content_length = _parse_headers(msg, lines, cache)
        if isinstance(msg, Request) and msg.cseq.method != msg.method:
            _check_required(msg)
    except SipParseError as exc:
        exc.raw_headers = _raw_pairs(lines)
        exc.is_request = is_request
        if not is_request:
            exc.status = None  # a malformed response is dropped (RFC 4475 section 3.1.2.19)
        raise
    if content_length is None:
        msg.body = rest if datagram else b""
    elif content_length:
        if len(rest) < content_length:
            raise SipParseError(
                f"Content-Length {content_length} larger than the {len(rest)} octets received",
                400 if is_request else None,
                raw_headers=_raw_pairs(lines),
                is_request=is_request,
            )
        msg.body = rest[:content_length]
    return msg


def _raw_pairs(lines: list[str]) -> list[tuple[str, str]]:
    """(key, value) of every readable header line: what an error response copies."""
    pairs: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            pairs.append((header_key(name.strip(" \t")), value.strip(" \t")))
    return pairs


def _parse_start_line(start: str) -> Request | Response:
    if start.startswith("SIP/"):
        m = _status_line_match(start)
        if m is None:
            raise SipParseError(f"malformed status line {start[:60]!r}", None)
        version, code, reason = m.groups()
        if version != grammar.SIP_VERSION:
            raise SipParseError(f"unsupported version {version}", None)
        if len(code) != 3 or not "100" <= code <= "699":
            raise SipParseError(f"status code {code[:12]} out of range", None)
        return Response(int(code), reason)
    m = _request_line_match(start)
    if m is None:
        if start.rstrip(" ") != start or "  " in start:
            raise SipParseError("extra white space in the request line")
        raise SipParseError(f"malformed request line {start[:60]!r}")
    method, uri_text, version = m.groups()
    if version != grammar.SIP_VERSION:
        raise SipParseError(f"SIP version {version} not supported", 505)
    uri = parse_uri(uri_text)
    if isinstance(uri, SipUri) and uri.headers is not None:
        # RFC 4475 section 3.1.2.11: headers have no place in a Request-URI.
        raise SipParseError("escaped headers in the Request-URI")
    return Request(method, uri)


def _parse_headers(
    msg: Request | Response, lines: list[str], cache: HeaderCache | None
) -> int | None:
    """Parse header lines into ``msg.headers``; return the Content-Length if one was given.

    The loop is the parser's hot path.  With a cache, a line seen before costs one lookup;
    otherwise raw headers cost a partition, a name lookup and an append, and typed ones are
    parsed by :func:`_typed_values`.
    """
    headers = msg.headers
    append = headers.append
    extend = headers.extend
    lookup = _NAME_LOOKUP.get
    cached = cache.entries.get if cache is not None else None
    content_length: int | None = None
    seen: set[str] = set()
    has_via = False
    for i in range(1, len(lines)):
        line = lines[i]
        entry = cached(line) if cached is not None else None
        if entry is None:
            name, sep, value = line.partition(":")
            if not sep:
                if not line.strip(" \t"):
                    continue
                raise SipParseError(f"header line without a colon: {line[:40]!r}")
            found = lookup(name)
            if found is None:
                found = _lookup_name(name.rstrip(" \t"))
            key, wire_name, kind = found
            value = value.strip(" \t")
            if kind == RAW:
                entry = (key, wire_name, RAW, (Header(key, wire_name, value),))
                if cache is not None:
                    cache.store(line, entry)
                append(entry[3][0])
                continue
            values: tuple[HeaderValue, ...]
            if kind == CONTENT_LENGTH:
                length = (
                    int(value)
                    if value.isdigit() and len(value) < 6 and value.isascii()
                    else _parse_int(value, key, MAX_MESSAGE_SIZE)
                )
                if length > MAX_MESSAGE_SIZE:
                    raise SipParseError(f"Content-Length {length} out of range")
                values = (length,)
            elif kind == MAX_FORWARDS:
                hops = (
                    int(value)
                    if value.isdigit() and len(value) < 4 and value.isascii()
                    else _parse_int(value, key, 255)
                )
                if hops > 255:
                    raise SipParseError(f"Max-Forwards {hops} out of range")
                values = (hops,)
            else:
                values = _typed_values(kind, wire_name, value)
            if len(values) == 1:
                entry = (key, wire_name, kind, (Header(key, wire_name, values[0]),))
            else:
                entry = (key, wire_name, kind, tuple([Header(key, wire_name, v) for v in values]))
            if cache is not None:
                cache.store(line, entry)
        key, wire_name, kind, built = entry
        if kind == RAW:
            append(built[0])
            continue
        if kind < LIST:  # single-valued (RFC 4475 section 3.3.8)
            if key in seen:
                raise SipParseError(f"more than one {wire_name} header")
            seen.add(key)
            if kind == CONTENT_LENGTH:
                content_length = built[0].value
                continue
        elif key == "via":
            has_via = True
        extend(built)
    if not has_via or not seen >= _REQUIRED:
        _check_required(msg)  # raises, naming what is missing
    return content_length


def _typed_values(kind: int, wire_name: str, value: str) -> tuple[HeaderValue, ...]:
    """The typed value(s) of one header line (uncached path)."""
    if kind == ADDRESS:
        return (_address_parse(value, wire_name),)
    if kind == CALL_ID:
        if _call_id_match(value) is None:
            raise SipParseError(f"malformed Call-ID {value[:60]!r}")
        return (value,)
    if kind == CSEQ:
        return (_cseq_parse(value),)
    if kind == DATE:
        _check_date(value)
        return (value,)
    parser = _SPLIT_PARSERS[wire_name.lower()]
    if "," not in value:
        return (parser(value),)
    items = split_commas(value)
    for item in items:
        if not item.strip(" \t"):
            raise SipParseError(f"empty value in {wire_name}")
    return tuple(parser(item) for item in items)


_REQUIRED = frozenset({"from", "to", "call-id", "cseq"})

# SIP-date = rfc1123-date (RFC 3261 section 20.17): "Sat, 13 Nov 2010 23:29:00 GMT", GMT only.
_DATE_RE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct"
    r"|Nov|Dec) [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
)


def _check_date(value: str) -> None:
    """RFC 4475 section 3.1.2.12: a Date in another zone than GMT is malformed."""
    if _DATE_RE.fullmatch(value) is None:
        raise SipParseError(f"malformed Date {value[:60]!r} (RFC 1123 date in GMT expected)")


def _check_required(msg: Request | Response) -> None:
    """RFC 3261 section 8.1.1: To, From, CSeq, Call-ID and Via are mandatory.

    Max-Forwards is also mandatory for requests, but an RFC 2543 peer omits it (RFC 4475
    section 3.4.1), so a missing one means the default (70) rather than an error.
    """
    keys = {h.key for h in msg.headers}
    missing = [DISPLAY_NAME[k] for k in ("via", "from", "to", "call-id", "cseq") if k not in keys]
    if missing:
        raise SipParseError("missing required header(s): " + ", ".join(missing))
    if isinstance(msg, Request):
        cseq_method = msg.cseq.method
        if cseq_method != msg.method:
            # RFC 4475 section 3.1.2.18: 501 is preferred when the method itself is unknown.
            status = 400 if msg.method in KNOWN_METHODS else 501
            raise SipParseError(
                f"CSeq method {cseq_method} does not match request method {msg.method}", status
            )


# -- building responses -------------------------------------------------------------------------
_RESPONSE_COPIED = ("via", "from", "to", "call-id", "cseq")


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, HeaderValue]] = (),
    body: bytes = b"",
) -> Response:
    """A response to ``request`` per RFC 3261 section 8.2.6.2.

    Via (all values, in order), From, To, Call-ID and CSeq are copied; a To tag is added when
    given and the request's To has none (never on a 100, section 8.2.6.2).  Record-Route is
    copied for dialog-creating 18x/2xx responses by the caller when it is a UAS (section 12.1.1).
    """
    response = Response(status, reason or REASON_PHRASES.get(status, ""))
    out = response.headers
    for h in request.headers:
        if h.key in _RESPONSE_COPIED:
            value = h.value
            if h.key == "to" and to_tag is not None and status != 100 and value.tag is None:
                value = value.with_params(tag=to_tag)
            out.append(Header(h.key, DISPLAY_NAME[h.key], value))
    for name, value in headers:
        response.append(name, value)
    response.body = body
    return response


def make_error_response(error: SipParseError, server: str | None = None) -> bytes | None:
    """Bytes of the response to a request that failed to parse, or None when it must be dropped.

    Built from the raw header values (the typed parse failed), copying Via, From, To, Call-ID and
    CSeq as written (RFC 3261 section 8.2.6.2); without a Via there is nowhere to send it.
    """
    if error.drop or error.status is None:
        return None
    pairs = error.raw_headers
    if not any(k == "via" for k, _ in pairs):
        return None
    status = error.status
    reason = error.reason or REASON_PHRASES.get(status, "Error")
    lines = [f"SIP/2.0 {status} {reason}"]
    for wanted in _RESPONSE_COPIED:
        for key, value in pairs:
            if key == wanted:
                lines.append(f"{DISPLAY_NAME[key]}: {_printable(value)}")
    if server:
        lines.append(f"Server: {server}")
    # A short machine-readable hint of what was wrong (RFC 3261 section 20.43 Warning, 399).
    warning = _printable(error.detail).replace('"', "'").replace("\\", "/")[:120]
    lines.append(f'Warning: 399 - "{warning}"')
    lines.append("Content-Length: 0\r\n\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


def _printable(text: str) -> str:
    """Drop control characters, which would break the response's framing."""
    return "".join(ch for ch in text if ch >= " " and ch != "\x7f")
