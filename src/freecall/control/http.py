"""A small, strict HTTP/1.1 request reader and response writer for the control API.

Pure: bytes in, requests out; no sockets, no clocks (the server in ``api.py`` owns the I/O
and the timeouts). It accepts only what the API needs (origin-form targets, bodies framed by
``Content-Length``) and bounds everything a peer could grow: the head, the number of header
fields, the body. Every malformed input ends in :class:`HttpError` carrying the status to
answer, never in another exception, so garbage on the socket costs one 4xx and a close.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field

MAX_HEAD = 16 * 1024
"""Request line plus header fields: a head larger than this is refused with 431."""
MAX_HEADERS = 64
MAX_BODY = 64 * 1024
"""JSON bodies of the API are tiny; anything larger is refused with 413."""

_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 section 5.6.2
_VERSION = re.compile(rb"^HTTP/(\d)\.(\d)$")
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # RFC 9110 5.5: no CTLs but HTAB
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f-\xff]")
_HEAD_END = re.compile(rb"\r?\n\r?\n")

REASONS = {
    200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
    415: "Unsupported Media Type", 422: "Unprocessable Content",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """The peer sent something we will not serve: ``status`` is the answer to give."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    target: str
    path: str  # percent-decoded, without the query
    query: dict[str, str]
    version: tuple[int, int]
    headers: tuple[tuple[str, str], ...]  # names lower-case, in order
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first field named ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def keep_alive(self) -> bool:
        connection = (self.header("connection") or "").lower()
        tokens = {t.strip() for t in connection.split(",")}
        if self.version >= (1, 1):
            return "close" not in tokens
        return "keep-alive" in tokens


@dataclass(slots=True)
class RequestParser:
    """Buffers bytes; :meth:`next_request` returns a request once one is complete.

    Raises :class:`HttpError` as soon as the input cannot become a request we serve (for
    example an oversized head is refused before its end arrives, so a peer cannot make the
    buffer grow past ``max_head`` + one read).
    """

    max_head: int = MAX_HEAD
    max_body: int = MAX_BODY
    max_headers: int = MAX_HEADERS
    _buffer: bytearray = field(default_factory=bytearray)
    _pending: HttpRequest | None = None  # head parsed, waiting for the body
    _body_length: int = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if self._pending is None and len(self._buffer) > self.max_head:
            end = _HEAD_END.search(self._buffer, 0, self.max_head + 4)
            if end is None:
                raise HttpError(431, "request head too large")

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_request(self) -> HttpRequest | None:
        if self._pending is None:
            # Leading empty lines before a request line are ignored (RFC 9112 section 2.2).
            while self._buffer[:2] == b"\r\n" or self._buffer[:1] == b"\n":
                del self._buffer[: 2 if self._buffer[:1] == b"\r" else 1]
            end = _HEAD_END.search(self._buffer)
            if end is None:
                if len(self._buffer) > self.max_head:
                    raise HttpError(431, "request head too large")
                return None
            if end.start() > self.max_head:
                raise HttpError(431, "request head too large")
            head = bytes(self._buffer[: end.start()])
            del self._buffer[: end.end()]
            self._pending, self._body_length = self._parse_head(head)
        if len(self._buffer) < self._body_length:
            return None
        request = self._pending
        body = bytes(self._buffer[: self._body_length])
        del self._buffer[: self._body_length]
        self._pending, self._body_length = None, 0
        if body:
            return HttpRequest(request.method, request.target, request.path, request.query,
                               request.version, request.headers, body)
        return request

    def _parse_head(self, head: bytes) -> tuple[HttpRequest, int]:
        lines = re.split(rb"\r?\n", head)
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise HttpError(400, "malformed request line")
        method, target, version = parts
        if not _TOKEN.match(method):
            raise HttpError(400, "malformed method")
        match = _VERSION.match(version)
        if match is None:
            raise HttpError(400, "malformed HTTP version")
        major, minor = int(match.group(1)), int(match.group(2))
        if major != 1:
            raise HttpError(505, "only HTTP/1.x is served")
        if len(target) > 4096:
            raise HttpError(414, "request target too long")
        if not target.startswith(b"/") or _TARGET_BAD.search(target):
            raise HttpError(400, "request target must be an absolute path")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                raise HttpError(400, "obsolete line folding")
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.match(name):
                raise HttpError(400, "malformed header field")
            value = value.strip(b" \t")
            if _FIELD_VALUE_BAD.search(value):
                raise HttpError(400, "control character in a header field")
            headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
            if len(headers) > self.max_headers:
                raise HttpError(431, "too many header fields")
        names = [n for n, _ in headers]
        if (major, minor) >= (1, 1) and names.count("host") != 1:
            raise HttpError(400, "HTTP/1.1 needs exactly one Host")
        if "transfer-encoding" in names:
            raise HttpError(501, "Transfer-Encoding is not accepted; send Content-Length")
        lengths = {v for n, v in headers if n == "content-length"}
        length = 0
        if lengths:
            if len(lengths) != 1:
                raise HttpError(400, "conflicting Content-Length")
            text = lengths.pop()
            if not text.isdigit() or len(text) > 12:
                raise HttpError(400, "malformed Content-Length")
            length = int(text)
            if length > self.max_body:
                raise HttpError(413, "request body too large")
        raw = target.decode("ascii")
        path_part, _, query_part = raw.partition("?")
        try:
            path = urllib.parse.unquote(path_part, errors="strict")
            if "\x00" in path:
                raise HttpError(400, "NUL in path")
            query = dict(urllib.parse.parse_qsl(query_part, keep_blank_values=True,
                                                errors="strict", max_num_fields=32))
        except ValueError as error:  # UnicodeDecodeError too: bad percent-encoding
            raise HttpError(400, f"malformed path or query: {error}") from None
        request = HttpRequest(method.decode("ascii"), raw, path, query, (major, minor),
                              tuple(headers))
        return request, length


def render_response(
    status: int,
    body: bytes = b"",
    *,
    content_type: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    keep_alive: bool = True,
) -> bytes:
    """A complete response with ``Content-Length`` (every API answer has a known length)."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
