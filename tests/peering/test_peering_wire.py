"""Gossip datagram codec and the engine's hostile-input handling."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freecall.peering import wire
from freecall.peering.gossip import Gossip, GossipConfig
from freecall.peering.records import Address, AddrKind, NodeIdentity
from freecall.peering.wire import Builder, Lookup, Sec, WireError

NOW = 1_700_000_000.0
PK = bytes(range(32))
KEY = b"k" * 32


def parse_auth(data: bytes) -> wire.Message:
    magic, pk, ts = wire.split(data)
    assert magic == wire.MAGIC_AUTH and pk == PK and ts == int(NOW)
    assert wire.mac(KEY, data[:-16]) == data[-16:]
    return wire.parse(data, wire.HEADER.size, len(data) - wire.MAC_SIZE)


def test_all_sections_round_trip() -> None:
    b = Builder()
    b.add(Sec.PING, wire.encode_u32(7))
    b.add(Sec.ACK, wire.encode_u32(8))
    b.add(Sec.NEED, b"\x80" + bytes(7))
    b.add(Sec.PAGE, wire.encode_page(3, 5, True, [(b"A" * 8, 1), (b"B" * 8, 2)]))
    b.add(Sec.HAVE, wire.digests([(b"C" * 8, 3)]))
    b.add(Sec.HOME_HAVE, wire.digests([(b"D" * 8, 4)]))
    b.add(Sec.WANT, b"E" * 8 + b"F" * 8)
    b.add(Sec.RECORD, b"record-bytes")
    b.add(Sec.RELAY, b"\x01relay-bytes")
    b.add(Sec.DEAD, wire.digests([(b"G" * 8, 5)]))
    b.add(Sec.LOOKUP, wire.encode_lookup(Lookup(9, 2, "alice@example.org")))
    b.add(Sec.LOOKUP, wire.encode_lookup(Lookup(10, 0, "x.org", PK, ("2001:db8::5", 5064))))
    b.add(Sec.ANSWER, wire.encode_answer(9, wire.Answer.FOUND))
    b.add(Sec.SUMMARY, wire.encode_summary(2, bytes(range(16))))
    b.add(99, b"unknown sections are skipped")
    m = parse_auth(b.finish(PK, int(NOW), KEY))
    assert m.pings == [7] and m.acks == [8] and m.need == b"\x80" + bytes(7)
    assert m.page == (3, 5, wire.PAGE_COMPLETE, [(b"A" * 8, 1), (b"B" * 8, 2)])
    assert m.have == [(b"C" * 8, 3)] and m.home_have == [(b"D" * 8, 4)]
    assert m.want == [b"E" * 8, b"F" * 8]
    assert m.records == [b"record-bytes"] and m.relays == [b"\x01relay-bytes"]
    assert m.dead == [(b"G" * 8, 5)]
    assert m.lookups == [Lookup(9, 2, "alice@example.org"),
                         Lookup(10, 0, "x.org", PK, ("2001:db8::5", 5064))]
    assert m.answers == [(9, wire.Answer.FOUND)]
    assert m.summary == (2, bytes(range(16)))


@pytest.mark.parametrize("payload", [b"", b"\x07" + bytes(512), b"\x02" + bytes(15),
                                     b"\x02" + bytes(17)])
def test_summary_of_the_wrong_size_is_malformed(payload: bytes) -> None:
    b = Builder()
    b.add(Sec.SUMMARY, payload)
    with pytest.raises(WireError):
        parse_auth(b.finish(PK, int(NOW), KEY))
    with pytest.raises(WireError):
        wire.encode_summary(2, bytes(15))


def test_builder_never_exceeds_the_datagram_limit() -> None:
    b = Builder()
    n = 0
    while b.add(Sec.RECORD, b"x" * 200):
        n += 1
    data = b.finish(PK, int(NOW), KEY)
    assert n == 5 and len(data) <= wire.MAX_DATAGRAM
    assert not b.add(Sec.RECORD, b"x" * 2000)


def test_hello_is_padded_and_unauthenticated() -> None:
    b = Builder()
    b.add(Sec.HELLO, wire.encode_u32(1))
    data = b.finish_hello(PK, int(NOW), 800)
    assert len(data) == 800 and data[0] == wire.MAGIC_HELLO
    m = wire.parse(data, wire.HEADER.size, len(data))
    assert m.hello == 1


@pytest.mark.parametrize("data", [b"", b"\xf1", b"\x00" * 60, b"\xf1" + bytes(40), bytes(1201)])
def test_split_rejects_garbage(data: bytes) -> None:
    with pytest.raises(WireError):
        wire.split(data)
        wire.parse(data, wire.HEADER.size, len(data) - wire.MAC_SIZE)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=1300))
def test_parse_random_bytes_only_raises_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        wire.split(data)
        wire.parse(data, wire.HEADER.size, len(data))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.binary(max_size=80)), max_size=12))
def test_parse_arbitrary_sections_only_raises_wire_error(
    sections: list[tuple[int, bytes]],
) -> None:
    body = b"".join(wire.SECTION.pack(t, len(p)) + p for t, p in sections)
    data = wire.HEADER.pack(wire.MAGIC_AUTH, PK, int(NOW)) + body
    with contextlib.suppress(WireError):
        wire.parse(data, wire.HEADER.size, len(data))


def _node(seed: int) -> Gossip:
    ident = NodeIdentity.from_seed(bytes([seed]) * 32)
    return Gossip(
        ident, now=NOW, rng=random.Random(seed),
        addresses=(Address(AddrKind.GOSSIP, f"192.0.2.{seed}", 5064),),
        routes=(f"n{seed}.example",), config=GossipConfig(),
    )


_TARGET = _node(1)
_PEER = _node(2)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200))
def test_engine_survives_random_datagrams(data: bytes) -> None:
    _TARGET.receive(data, ("192.0.2.9", 5064), NOW)
    _TARGET.datagrams_to_send()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.binary(max_size=120)), max_size=10))
def test_engine_survives_authenticated_garbage_sections(
    sections: list[tuple[int, bytes]],
) -> None:
    """A peer with a valid key and MAC sends nonsense: dropped or ignored, never a crash."""
    b = Builder()
    for t, p in sections:
        b.add(t, p)
    key = _PEER.keys.derive(_TARGET.identity.public_key)[0]
    _TARGET.receive(b.finish(_PEER.identity.public_key, int(NOW), key), _PEER.local.gossip_addr
                    or ("192.0.2.2", 5064), NOW)
    for d, _ in _TARGET.datagrams_to_send():
        assert len(d) <= wire.MAX_DATAGRAM
    _TARGET._bans.clear()
