"""Cutting a TCP/TLS byte stream into SIP messages (RFC 3261 section 18.3, RFC 5626 3.5.1).

h11-style: :meth:`StreamFramer.feed` only buffers; :meth:`StreamFramer.next_message` returns a
whole message, a keep-alive, or ``None`` for "need more data".  The header section is capped, so
a slow or hostile peer cannot grow memory; the body is framed only by Content-Length, which on a
stream is mandatory in effect (missing means 0).  A framing error is fatal: after a bad or
duplicated Content-Length nothing that follows can be trusted, so the connection must close
(RFC 4475 sections 3.1.2.3 and 3.3.9).
"""

from __future__ import annotations

import enum
import re

from .errors import SipParseError

_CONTENT_LENGTH_RE = re.compile(
    rb"^(?:content-length|l)[ \t]*:[ \t]*(?:\r?\n[ \t]+)?([^\r\n]*)", re.IGNORECASE | re.MULTILINE
)


class KeepAlive(enum.Enum):
    """RFC 5626 section 3.5.1 keep-alives seen between messages."""

    PING = "ping"  # CRLF CRLF: answer with a pong (CRLF)
    PONG = "pong"  # a lone CRLF: the answer to our ping


class StreamFramer:
    """Frames one connection's byte stream."""

    __slots__ = ("_buf", "_scan_from", "max_body", "max_header")

    def __init__(self, max_header: int = 16384, max_body: int = 65536) -> None:
        self.max_header = max_header
        self.max_body = max_body
        self._buf = bytearray()
        self._scan_from = 0  # where the search for the end of the header section resumes

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_message(self) -> bytes | KeepAlive | None:
        """The next complete message, a keep-alive, or None if more data is needed.

        Raises :class:`SipParseError` with ``fatal=True`` when the stream cannot be framed.
        """
        buf = self._buf
        if not buf:
            return None
        if buf[0] in (0x0D, 0x0A):
            # Between messages: RFC 5626 keep-alives, or stray line ends to ignore (section 7.5).
            self._scan_from = 0
            if buf[:4] == b"\r\n\r\n":
                del buf[:4]
                return KeepAlive.PING
            if buf[:2] == b"\r\n" and (len(buf) == 2 or buf[2] != 0x0D):
                # A lone CRLF (a ping is always sent whole, in one write).
                del buf[:2]
                return KeepAlive.PONG
            if buf == b"\r\n\r":
                return None  # the last octet of a ping is on its way
            stripped = len(buf) - len(buf.lstrip(b"\r\n"))
            del buf[:stripped]
            if not buf:
                return None
        start = max(0, self._scan_from - 3)
        end = buf.find(b"\r\n\r\n", start)
        if end >= 0:
            body_start = end + 4
        else:
            lf = buf.find(b"\n\n", start)
            if lf >= 0:
                end, body_start = lf, lf + 2
            else:
                if len(buf) > self.max_header:
                    raise SipParseError(
                        f"header section longer than {self.max_header} octets", 513, fatal=True
                    )
                self._scan_from = len(buf)
                return None
        if end > self.max_header:
            raise SipParseError(
                f"header section longer than {self.max_header} octets", 513, fatal=True
            )
        length = self._content_length(bytes(buf[:end]))
        total = body_start + length
        if len(buf) < total:
            self._scan_from = end  # header end known; only the body is missing
            return None
        message = bytes(buf[:total])
        del buf[:total]
        self._scan_from = 0
        return message

    def _content_length(self, head: bytes) -> int:
        values = _CONTENT_LENGTH_RE.findall(head)
        if not values:
            return 0
        if len(values) > 1:
            raise SipParseError("more than one Content-Length on a stream", 400, fatal=True)
        text = values[0].strip(b" \t")
        if not text.isdigit():
            raise SipParseError(f"Content-Length {text[:20]!r} is not a number", 400, fatal=True)
        # 1*DIGIT (RFC 3261 section 20.14) has no length bound, but int() refuses more than
        # 4300 digits with a ValueError: bound it first (found by the TLS wire fuzzer).
        digits = text.lstrip(b"0") or b"0"
        if len(digits) > 12:
            raise SipParseError(
                f"Content-Length of {len(digits)} digits exceeds the limit of {self.max_body}",
                413, fatal=True)
        length = int(digits)
        if length > self.max_body:
            raise SipParseError(
                f"body of {length} octets exceeds the limit of {self.max_body}", 413, fatal=True
            )
        return length
