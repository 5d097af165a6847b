"""The C socket reader (`freecall.srtp._hop.Reader`) and its transport
(`freecall.srtp.native_udp.NativeDatagramTransport`) on real loopback sockets.

The Reader is called directly here, as ``loop.add_reader`` would call it, so that each test
chooses what is queued on the socket before a wake-up; the last tests run it on both loops.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from typing import Any

import pylibsrtp
import pytest
import uvloop

from freecall.srtp import _hop
from freecall.srtp.native_udp import NativeDatagramTransport
from freecall.srtp.srtp_policy import srtp_call, srtp_pointers

Addr = tuple[Any, ...]
Policy = pylibsrtp.Policy


def udp(family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    s.setblocking(False)
    return s


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


class Recorder(asyncio.DatagramProtocol):
    """A protocol that records what it is given."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, Addr]] = []
        self.errors: list[Exception] = []

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.got.append((data, addr))

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)


def settle() -> None:
    time.sleep(0.02)  # loopback delivery is immediate; this only absorbs scheduling noise


def rtp(seq: int, payload: bytes = b"x", ssrc: int = 7) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + payload


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_batches_bound_per_wake_up_and_addresses(
    family: socket.AddressFamily, socks: list[socket.socket]
) -> None:
    rx, tx = udp(family), udp(family)
    socks += [rx, tx]
    proto = Recorder()
    reader = _hop.Reader(rx.fileno(), proto, batch=16, limit=64)
    for i in range(100):
        tx.sendto(i.to_bytes(2, "big"), rx.getsockname())
    settle()
    reader()  # the bound: 64 of 100, four full batches, no more reads
    assert [int.from_bytes(d, "big") for d, _ in proto.got] == list(range(64))
    assert reader.stats == (1, 4, 64, 0)
    reader()  # the rest: 16, 16, then a short batch of 4 ends the wake-up (no failing read)
    assert len(proto.got) == 100
    assert reader.stats == (2, 7, 100, 0)
    # The address is what the socket module (and the loop's transports) report.
    assert {a for _, a in proto.got} == {tx.getsockname()}
    reader()  # woken with nothing to read: one failed read, nothing delivered
    assert reader.stats == (3, 8, 100, 0)
    # Longer than any media datagram: dropped and counted; an empty one is delivered.
    tx.sendto(bytes(_hop.READER_SLOT + 1), rx.getsockname())
    tx.sendto(b"", rx.getsockname())
    settle()
    reader()
    assert reader.stats[2:] == (102, 1)
    assert proto.got[-1] == (b"", tx.getsockname())


def test_a_hop_runs_in_c_and_hands_the_rest_to_python(socks: list[socket.socket]) -> None:
    rx, phone, sink, other = udp(), udp(), udp(), udp()
    socks += [rx, phone, sink, other]
    key = os.urandom(30)
    out = pylibsrtp.Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    fallback = Recorder()
    pointers = srtp_pointers(out, "protect")
    assert pointers is not None
    proto = Recorder()
    hop = _hop.Hop(out, *pointers, rx.fileno(), sink.getsockname(), fallback.datagram_received)
    proto.datagram_received = hop  # type: ignore[method-assign,assignment]  # as the bridge does
    zrtp = b"\x10\x00\x00\x01ZRTP" + bytes(12)
    rtcp = struct.pack("!BBHI", 0x81, 201, 1, 7)  # RTCP muxed on the RTP port: Python's
    for datagram in (rtp(1), zrtp, rtp(2), rtcp, rtp(3)):
        phone.sendto(datagram, rx.getsockname())
    settle()
    reader = _hop.Reader(rx.fileno(), proto)
    reader()
    assert proto.got == []  # the protocol's own method is not called
    assert fallback.got == [(zrtp, phone.getsockname()), (rtcp, phone.getsockname())]
    unprotect = srtp_call(
        pylibsrtp.Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND)), "unprotect")
    assert [unprotect(sink.recv(2048)) for _ in range(3)] == [rtp(1), rtp(2), rtp(3)]
    assert hop.counters[:3] == (3, 3 * 13, 3)

    # The other direction: an authenticated packet from a new source latches, from the
    # latched source it does not; a replay or a forgery is the Python path's.
    inbound = pylibsrtp.Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND))
    pointers = srtp_pointers(inbound, "unprotect")
    assert pointers is not None
    latched: list[Addr] = []
    fallback.got.clear()
    hop_in = _hop.Hop(inbound, *pointers, rx.fileno(), sink.getsockname(),
                      fallback.datagram_received, unprotect=True, source=phone.getsockname(),
                      latch=latched.append)
    proto.datagram_received = hop_in  # type: ignore[method-assign,assignment]
    protect = srtp_call(out, "protect")
    first, second = protect(rtp(4)), protect(rtp(5))
    phone.sendto(first, rx.getsockname())
    other.sendto(second, rx.getsockname())
    other.sendto(second, rx.getsockname())  # a replay
    settle()
    reader()
    assert latched == [other.getsockname()]
    assert fallback.got == [(second, other.getsockname())]
    assert [sink.recv(2048) for _ in range(2)] == [rtp(4), rtp(5)]


def test_routes_of_a_shared_socket(socks: list[socket.socket]) -> None:
    """A socket shared by several sources: a routed source's datagrams go to its own hop in
    C, the rest to the protocol."""
    rx, routed, unrouted, out, sink = udp(), udp(), udp(), udp(), udp()
    socks += [rx, routed, unrouted, out, sink]
    session = pylibsrtp.Session(Policy(key=os.urandom(30), ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    pointers = srtp_pointers(session, "protect")
    assert pointers is not None
    hop = _hop.Hop(session, *pointers, out.fileno(), sink.getsockname(), lambda d, a: None)
    proto = Recorder()
    reader = _hop.Reader(rx.fileno(), proto, routes={_hop.route_key(routed.getsockname()): hop})
    routed.sendto(rtp(1), rx.getsockname())
    unrouted.sendto(rtp(2), rx.getsockname())
    settle()
    reader()
    assert proto.got == [(rtp(2), unrouted.getsockname())]
    assert hop.counters[:3] == (1, 13, 1) and len(sink.recv(2048)) == 13 + 10
    with pytest.raises(ValueError, match="IPv4"):
        _hop.route_key(("::1", 5, 0, 0))


def test_a_reader_called_from_another_readers_callback(socks: list[socket.socket]) -> None:
    """The buffers are shared; a wake-up inside another's callback (another loop on another
    thread, here called directly) takes its own, and neither batch is overwritten."""
    rx1, rx2, tx = udp(), udp(), udp()
    socks += [rx1, rx2, tx]
    inner = Recorder()
    reader2 = _hop.Reader(rx2.fileno(), inner)

    class Outer(Recorder):
        def datagram_received(self, data: bytes, addr: Addr) -> None:
            super().datagram_received(data, addr)
            reader2()

    outer = Outer()
    for i in range(5):
        tx.sendto(b"outer%d" % i, rx1.getsockname())
        tx.sendto(b"inner%d" % i, rx2.getsockname())
    settle()
    _hop.Reader(rx1.fileno(), outer)()
    assert [d for d, _ in outer.got] == [b"outer%d" % i for i in range(5)]
    assert [d for d, _ in inner.got] == [b"inner%d" % i for i in range(5)]


def test_close_while_readable_and_errors(socks: list[socket.socket]) -> None:
    rx, tx = udp(), udp()
    socks += [rx, tx]
    reader: _hop.Reader

    class Closer(Recorder):
        def datagram_received(self, data: bytes, addr: Addr) -> None:
            super().datagram_received(data, addr)
            if len(self.got) == 1:
                raise RuntimeError("first")  # raised after the batch, the rest delivered
            if len(self.got) == 2:
                raise KeyError("second")  # reported as unraisable
            if len(self.got) == 3:
                reader.close()  # the transport closing under the wake-up

    proto = Closer()
    reader = _hop.Reader(rx.fileno(), proto)
    for i in range(10):
        tx.sendto(bytes([i]), rx.getsockname())
    settle()
    unraisable: list[Any] = []
    hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with pytest.raises(RuntimeError, match="first"):
            reader()
    finally:
        sys.unraisablehook = hook
    assert [d for d, _ in proto.got] == [b"\x00", b"\x01", b"\x02"]
    assert len(unraisable) == 1 and isinstance(unraisable[0].exc_value, KeyError)
    assert reader.closed and reader.protocol is None
    reader()  # a wake-up already queued in the loop after close: nothing read
    assert reader.stats[1] == 1 and len(proto.got) == 3

    # A receive error other than EAGAIN goes to error_received: ICMP port unreachable for a
    # connected socket (the far end's port closed).
    gone = udp()
    port = gone.getsockname()
    gone.close()
    rx2 = udp()
    socks.append(rx2)
    rx2.connect(port)
    rx2.send(b"hello?")
    settle()
    proto2 = Recorder()
    _hop.Reader(rx2.fileno(), proto2)()
    assert [type(e) for e in proto2.errors] == [ConnectionRefusedError]
    assert proto2.got == []


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop],
                         ids=["asyncio", "uvloop"])
def test_the_transport_on_both_loops(loop_factory: Any, socks: list[socket.socket]) -> None:
    """An echo over `NativeDatagramTransport`, then close: connection_lost once, the socket
    closed, nothing read after."""

    class Echo(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.transport: asyncio.DatagramTransport | None = None
            self.lost: list[Exception | None] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.DatagramTransport)
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Addr) -> None:
            super().datagram_received(data, addr)
            assert self.transport is not None
            self.transport.sendto(data.upper(), addr)

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost.append(exc)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock, peer = udp(), udp()
        socks.append(peer)
        proto = Echo()
        transport = NativeDatagramTransport(loop, sock, proto)
        assert proto.transport is transport
        assert transport.get_extra_info("sockname") == sock.getsockname()
        assert transport.get_extra_info("socket") is sock
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        class Peer(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Addr) -> None:
                answers.put_nowait(data)

        peer_t, _ = await loop.create_datagram_endpoint(Peer, sock=peer)
        for word in (b"one", b"two"):
            peer_t.sendto(word, sock.getsockname())
            assert await asyncio.wait_for(answers.get(), 2) == word.upper()
        transport.close()
        assert transport.is_closing()
        transport.sendto(b"after close", peer.getsockname())  # ignored
        await asyncio.sleep(0.01)
        assert proto.lost == [None]
        assert sock.fileno() == -1
        assert proto.got == [(b"one", peer.getsockname()), (b"two", peer.getsockname())]
        peer_t.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
