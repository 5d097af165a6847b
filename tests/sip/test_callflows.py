"""Every message of the RFC 3665 call flows parses, and parse + serialise keeps every value."""

from __future__ import annotations

from pathlib import Path

import pytest

from freecall.sip.headers import split_commas
from freecall.sip.message import Request, header_key, parse_message
from vectorlib import VECTORS, callflow_messages

SPLIT = {"via", "contact", "route", "record-route", "path"}


def raw_header_values(data: bytes) -> list[tuple[str, str]]:
    """(key, value) per header value as written, unfolded; lists split like the parser does."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "surrogateescape")
    head = head.replace("\r\n ", " ").replace("\r\n\t", " ")
    out: list[tuple[str, str]] = []
    for line in head.split("\r\n")[1:]:
        if not line.strip():
            continue
        name, _, value = line.partition(":")
        key = header_key(name.strip())
        value = " ".join(value.split())  # folding turns line breaks into single spaces
        if key == "content-length":
            continue
        if key in SPLIT and value != "*":
            out.extend((key, item.strip()) for item in split_commas(value))
        else:
            out.append((key, value))
    return out


def test_there_are_193_callflow_messages() -> None:
    assert len(callflow_messages()) == 193  # the 16 flows of RFC 3665 sections 2 and 3


@pytest.mark.parametrize("path", callflow_messages(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_callflow_message_round_trip(path: Path) -> None:
    data = path.read_bytes()
    msg = parse_message(data)
    wire = msg.to_bytes()
    again = parse_message(wire)
    written = raw_header_values(data)
    kept = [(h.key, " ".join(str(h.value).split())) for h in again.headers]
    assert kept == written
    assert again.body == msg.body
    head, _, body = data.partition(b"\r\n\r\n")
    if b"Content-Length" in head:
        assert msg.body == body  # every Content-Length here equals the body's length
    if isinstance(msg, Request):
        assert isinstance(again, Request) and str(again.uri) == str(msg.uri)


def test_registration_flow_credentials_survive() -> None:
    f03 = VECTORS / "callflows/rfc3665/messages/2.01_sip-client-new-registration/F03.sip"
    msg = parse_message(f03.read_bytes())
    auth = msg.get("Authorization")
    assert isinstance(auth, str) and auth.startswith("Digest ")
    assert auth in msg.to_bytes().decode()
