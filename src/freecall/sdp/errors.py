"""The one exception the SDP package raises on malformed input or invalid values."""

from __future__ import annotations


class SdpError(ValueError):
    """A session description, or a value meant for one, that breaks RFC 8866 (or our bounds).

    It subclasses ValueError so that callers which already treat bad input as ValueError keep
    working; ``line`` is the 1-based line number in the parsed text when the error comes from
    :func:`freecall.sdp.parse`, so a log line can point at the culprit.
    """

    def __init__(self, detail: str, *, line: int | None = None) -> None:
        self.detail = detail
        self.line = line
        super().__init__(detail if line is None else f"line {line}: {detail}")
