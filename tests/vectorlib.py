"""Access to the third-party test vectors copied byte-exact into tests/vectors/.

See tests/vectors/MANIFEST.md for where each file comes from; test_vectors_intact checks them
against SHA256SUMS so nobody normalises their line endings by accident.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).parent / "vectors"


def load_json(relative: str) -> Any:
    return json.loads((VECTORS / relative).read_text(encoding="utf-8"))


def rfc4475_messages() -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = load_json("rfc4475/expected.json")["messages"]
    return messages


def rfc5118_messages() -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = load_json("rfc5118/expected.json")["messages"]
    return messages


def read(relative: str) -> bytes:
    return (VECTORS / relative).read_bytes()


def wire(archive_bytes: bytes) -> bytes:
    """RFC 5118 archive bytes as they would be sent (MANIFEST section 2, SIPRAL's wire()):
    CRLF line ends, the header section closed, Content-Length recomputed for the body."""
    text = archive_bytes.replace(b"\r\n", b"\n")
    head, sep, body = text.partition(b"\n\n")
    if not sep:
        head, body = text.rstrip(b"\n"), b""
    body_crlf = body.replace(b"\n", b"\r\n")
    head_crlf = head.replace(b"\n", b"\r\n")
    head_crlf = re.sub(
        rb"(?im)^(Content-Length|l)[ \t]*:[ \t]*\d+",
        lambda m: m.group(1) + b": " + str(len(body_crlf)).encode(),
        head_crlf,
    )
    return head_crlf + b"\r\n\r\n" + body_crlf


def callflow_messages() -> list[Path]:
    return sorted((VECTORS / "callflows/rfc3665/messages").glob("*/*.sip"))
