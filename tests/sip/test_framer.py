"""The TCP/TLS stream framer, h11-style: whole buffer, one byte at a time, trailing data."""

from __future__ import annotations

import re

import pytest

from freecall.sip.errors import SipParseError
from freecall.sip.framer import KeepAlive, StreamFramer
from freecall.sip.message import parse_message
from vectorlib import callflow_messages, read, rfc4475_messages

# Messages that frame cleanly on a stream: every valid/semantic RFC 4475 message whose
# Content-Length is right (not clerr/ncl/mcl01, which the stream must refuse, nor the messages
# without the closing empty line or with a UDP-only body).
STREAM_OK = [
    m["file"]
    for m in rfc4475_messages()
    if m["name"] not in {"clerr", "ncl", "mcl01", "baddn", "inv2543", "dblreq", "unreason", "test"}
]


def frames(framer: StreamFramer) -> list[bytes | KeepAlive]:
    out: list[bytes | KeepAlive] = []
    while (item := framer.next_message()) is not None:
        out.append(item)
    return out


def expected_frame(data: bytes) -> bytes:
    """The message as the Content-Length in its header delimits it (no parse needed)."""
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", head)
    length = int(found.group(1)) if found else 0
    return head + b"\r\n\r\n" + body[:length]


@pytest.mark.parametrize("path", STREAM_OK)
def test_whole_bytewise_and_trailing(path: str) -> None:
    data = read(path)
    frame = expected_frame(data)
    whole = StreamFramer()
    whole.feed(frame)
    assert frames(whole) == [frame]
    assert whole.buffered == 0

    bytewise = StreamFramer()
    got: list[bytes | KeepAlive] = []
    for i in range(len(frame)):
        bytewise.feed(frame[i : i + 1])
        got.extend(frames(bytewise))
    assert got == [frame]

    trailing = StreamFramer()
    trailing.feed(frame + b"OPTIONS sip:x")
    assert frames(trailing) == [frame]
    assert trailing.buffered == len(b"OPTIONS sip:x")  # left untouched for the next message


def test_back_to_back_callflow_messages() -> None:
    messages = [p.read_bytes() for p in callflow_messages()]
    # On a stream a body needs a Content-Length: leave out the three messages without one.
    messages = [m for m in messages if b"Content-Length" in m]
    # A few end after their last header line with no empty line (datagram style): close them.
    messages = [m if b"\r\n\r\n" in m else m + b"\r\n" for m in messages]
    assert len(messages) == 190
    framer = StreamFramer()
    framer.feed(b"".join(messages))
    out = frames(framer)
    assert len(out) == len(messages)
    for got, original in zip(out, messages, strict=True):
        assert isinstance(got, bytes)
        assert (
            parse_message(got, datagram=False).to_bytes()
            == parse_message(original, datagram=False).to_bytes()
        )


def test_keepalives() -> None:
    framer = StreamFramer()
    message = read("rfc4475/lwsdisp.dat")
    framer.feed(b"\r\n\r\n" + message + b"\r\n")
    assert frames(framer) == [KeepAlive.PING, message, KeepAlive.PONG]
    framer.feed(b"\r\n\r")
    assert frames(framer) == []
    framer.feed(b"\n")
    assert frames(framer) == [KeepAlive.PING]


@pytest.mark.parametrize("name", ["ncl", "mcl01"])
def test_bad_content_length_is_fatal(name: str) -> None:
    framer = StreamFramer()
    framer.feed(read(f"rfc4475/{name}.dat"))
    with pytest.raises(SipParseError) as info:
        framer.next_message()
    assert info.value.fatal and info.value.status == 400


def test_clerr_waits_for_the_body() -> None:
    """RFC 4475 section 3.1.2.2: over TCP wait for more data (the transport times out)."""
    framer = StreamFramer()
    framer.feed(read("rfc4475/clerr.dat"))
    assert framer.next_message() is None


def test_header_and_body_caps() -> None:
    framer = StreamFramer(max_header=1024)
    framer.feed(b"INVITE sip:a@b SIP/2.0\r\nX: " + b"a" * 2000)
    with pytest.raises(SipParseError) as info:
        framer.next_message()
    assert info.value.fatal and info.value.status == 513
    big = StreamFramer(max_body=100)
    big.feed(b"MESSAGE sip:a@b SIP/2.0\r\nl: 101\r\n\r\n")
    with pytest.raises(SipParseError) as info:
        big.next_message()
    assert info.value.status == 413


def test_scan_does_not_restart_from_zero() -> None:
    """Feeding a header section in many pieces stays linear (no rescans from the start)."""
    framer = StreamFramer(max_header=70000)
    framer.feed(b"OPTIONS sip:a@b SIP/2.0\r\n")
    for _ in range(2000):
        framer.feed(b"X-Long: " + b"v" * 20 + b"\r\n")
        assert framer.next_message() is None
    framer.feed(b"\r\n")
    out = framer.next_message()
    assert isinstance(out, bytes) and out.endswith(b"\r\n\r\n")
