"""Errors of the SIP syntax layer.

Like h11's RemoteProtocolError, a parse error says whose fault it is and carries what to do:
the status code to answer a request with (RFC 3261 section 21), or that the message must be
silently dropped (a malformed response cannot be answered, RFC 3261 section 16.7 / RFC 4475
section 3.1.2.19), and the raw header fields parsed so far, so that the transport can still build
the error response (Via, From, To, Call-ID, CSeq copied per RFC 3261 section 8.2.6.2).
"""

from __future__ import annotations


class SipError(ValueError):
    """Base class of every error the SIP core raises on hostile or malformed input."""


class SipParseError(SipError):
    """A message, header or URI that does not follow the RFC 3261 section 25 grammar.

    ``status`` is the response to send (400, 413, 416, 420, 501, 505, 513, ...) or ``None`` when
    the message must be dropped without an answer (it was a response, or it cannot be framed).
    ``fatal`` marks stream framing errors after which the connection must be closed
    (RFC 3261 section 18.3: a bad Content-Length cannot be recovered from on a stream).
    """

    def __init__(
        self,
        detail: str,
        status: int | None = 400,
        *,
        reason: str | None = None,
        fatal: bool = False,
        raw_headers: list[tuple[str, str]] | None = None,
        is_request: bool | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.reason = reason
        self.fatal = fatal
        self.raw_headers: list[tuple[str, str]] = raw_headers if raw_headers is not None else []
        self.is_request = is_request

    @property
    def drop(self) -> bool:
        """True when nothing may be sent back (responses, unframeable input)."""
        return self.status is None or self.is_request is False

    def __str__(self) -> str:
        code = "drop" if self.status is None else str(self.status)
        return f"{code}: {self.detail}"
