"""The ctrl_tcp framing: netstrings split and joined arbitrarily by TCP."""

from __future__ import annotations

import json

import pytest

from harness.netstring import NetstringDecoder, NetstringError, encode, encode_json


def test_encode() -> None:
    assert encode(b"") == b"0:,"
    assert encode(b"hello") == b"5:hello,"
    assert encode_json({"command": "dial"}) == b'18:{"command":"dial"},'


def test_several_messages_in_one_chunk() -> None:
    dec = NetstringDecoder()
    assert dec.feed(encode(b"a") + encode(b"") + encode(b"bc")) == [b"a", b"", b"bc"]
    assert dec.pending == 0


def test_byte_by_byte() -> None:
    data = encode_json({"event": True, "type": "CALL_ESTABLISHED", "param": "x" * 300}) * 2
    dec = NetstringDecoder()
    out: list[bytes] = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    assert [json.loads(p)["type"] for p in out] == ["CALL_ESTABLISHED"] * 2
    assert dec.pending == 0


def test_payload_may_contain_colons_and_commas() -> None:
    assert NetstringDecoder().feed(encode(b"1:2,3:")) == [b"1:2,3:"]


def test_incomplete_waits_for_more() -> None:
    dec = NetstringDecoder()
    assert dec.feed(b"10:01234") == []
    assert dec.pending == 8
    assert dec.feed(b"56789,") == [b"0123456789"]


@pytest.mark.parametrize("data", [b"x:abc,", b"3:abcX", b"03:abc,", b"-1:,", b"abc", b"99999999"])
def test_malformed(data: bytes) -> None:
    with pytest.raises(NetstringError):
        NetstringDecoder().feed(data)


def test_length_limit() -> None:
    with pytest.raises(NetstringError, match="exceeds"):
        NetstringDecoder(max_length=10).feed(b"11:")
