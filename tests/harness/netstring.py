"""Netstrings (``<len>:<payload>,``), the framing of baresip's ctrl_tcp JSON messages."""

from __future__ import annotations

import json
from typing import Any

MAX_NETSTRING = 1 << 20  # ctrl_tcp messages are small; a bigger length means a framing bug


class NetstringError(ValueError):
    """The byte stream is not a valid sequence of netstrings (the connection is unusable)."""


def encode(payload: bytes) -> bytes:
    return str(len(payload)).encode("ascii") + b":" + payload + b","


def encode_json(obj: Any) -> bytes:
    return encode(json.dumps(obj, separators=(",", ":")).encode("utf-8"))


class NetstringDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get back every complete payload."""

    def __init__(self, max_length: int = MAX_NETSTRING) -> None:
        self._buf = bytearray()
        self._max = max_length

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            colon = self._buf.find(b":")
            if colon < 0:
                if self._buf and (not self._buf.isdigit() or len(self._buf) > len(str(self._max))):
                    raise NetstringError(f"bad length prefix {bytes(self._buf[:20])!r}")
                return out
            head = bytes(self._buf[:colon])
            if not head.isdigit() or (len(head) > 1 and head.startswith(b"0")):
                raise NetstringError(f"bad length prefix {head[:20]!r}")
            length = int(head)
            if length > self._max:
                raise NetstringError(f"netstring of {length} bytes exceeds {self._max}")
            end = colon + 1 + length
            if len(self._buf) < end + 1:
                return out
            if self._buf[end] != ord(","):
                raise NetstringError(f"missing ',' after {length}-byte payload")
            out.append(bytes(self._buf[colon + 1 : end]))
            del self._buf[: end + 1]

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete netstring."""
        return len(self._buf)
