"""The media bridge over real UDP sockets on loopback, two engines (A and B) in one process.

softphone A -> engine A -> (ZRTP, then SRTP on the wire) -> engine B -> softphone B, and back.
Every scenario runs on the standard event loop and on uvloop. The helpers (softphones, a wire
tap that can play NAT, a far end without ZRTP) come first, then the scenarios. Nothing sleeps a
fixed time to "let things settle": helpers wait for a condition with a deadline. Timeouts are
shrunk through the engine's own parameters (``zrtp_timeout``, ``rtp_timeout``), never by
patching.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import uvloop

from freecall.config import PortRange
from freecall.relay.credentials import node_credentials
from freecall.relay.server import TurnSettings
from freecall.relay.service import RelayService
from freecall.srtp.bridge import (
    CLEAR,
    CLOSED,
    FAILED,
    NATIVE_AVAILABLE,
    SECURE,
    IceServers,
    MediaCapacityError,
    MediaEngine,
    MediaEvent,
    MediaStream,
    MediaTimeout,
    StreamInsecure,
    StreamSecure,
    ZrtpFailure,
    ZrtpWarning,
)
from freecall.srtp.ice import IceParameters, TurnServer
from freecall.srtp.keys import RetainedSecrets
from freecall.srtp.native_udp import NativeDatagramTransport
from freecall.srtp.zrtp_messages import classify_datagram
from harness.ports import PortAllocator, PortBlock
from zrtp.zrtp_harness import FakePeer

Run = Callable[[Coroutine[Any, Any, Any]], Any]
NATIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("native", default=True)
"""Whether the scenario's engines run the secure fast path in C (the `run` fixture sets it)."""

# ---------------------------------------------------------------------------------------------
# Helpers

T = TypeVar("T")
Addr = tuple[Any, ...]

PCMU = 0
FRAME = 160  # G.711 at 8 kHz, 20 ms


def pcmu_payload(seq: int, marker: int) -> bytes:
    """A recognisable 160-octet payload: a marker octet, then a pattern derived from seq."""
    head = struct.pack("!BH", marker, seq & 0xFFFF)
    body = bytes(((seq * 7 + i) & 0x7F) | 0x80 for i in range(FRAME - len(head)))
    return head + body


def rtp_packet(seq: int, ssrc: int, payload: bytes, pt: int = PCMU) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, (seq * FRAME) & 0xFFFFFFFF, ssrc) + payload


def rtcp_receiver_report(ssrc: int) -> bytes:
    """An empty RR (RFC 3550 6.4.2): V=2, RC=0, PT=201, length 1."""
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


class Recorder(asyncio.DatagramProtocol):
    """A UDP socket that keeps what it receives with the arrival time."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[tuple[float, bytes, Addr]] = []
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.received.append((time.monotonic(), data, addr))
        self.changed.set()

    def sendto(self, data: bytes, addr: Addr) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def payloads(self) -> list[bytes]:
        return [d[12:] for _, d, _ in self.received]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def udp(host: str = "127.0.0.1", port: int = 0) -> Recorder:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(Recorder, local_addr=(host, port))
    return proto


@dataclass
class Phone:
    """A softphone: RTP and RTCP sockets on loopback, sending to one bridge stream."""

    rtp: Recorder
    rtcp: Recorder
    ssrc: int
    marker: int
    target: tuple[str, int] = ("127.0.0.1", 0)
    target_rtcp: tuple[str, int] = ("127.0.0.1", 0)
    seq: int = 0
    sent: list[int] = field(default_factory=list)
    first_sent_at: float | None = None

    @classmethod
    async def open(cls, ssrc: int, marker: int) -> Phone:
        return cls(await udp(), await udp(), ssrc, marker)

    def connect(self, stream: MediaStream) -> None:
        """Both SDPs: the stream sends to us, we send to the stream."""
        stream.set_softphone_target(self.rtp.address, self.rtcp.address)
        self.target = stream.local_softphone_rtp
        self.target_rtcp = stream.local_softphone_rtcp

    def send(self, seq: int | None = None) -> bytes:
        if seq is None:
            seq = self.seq
            self.seq += 1
        payload = pcmu_payload(seq, self.marker)
        if self.first_sent_at is None:
            self.first_sent_at = asyncio.get_running_loop().time()
        self.rtp.sendto(rtp_packet(seq, self.ssrc, payload), self.target)
        self.sent.append(seq)
        return payload

    def send_rtcp(self) -> bytes:
        packet = rtcp_receiver_report(self.ssrc)
        self.rtcp.sendto(packet, self.target_rtcp)
        return packet

    def close(self) -> None:
        self.rtp.close()
        self.rtcp.close()


class Relay:
    """A wire tap between two bridges that can also play a NAT.

    ``inside`` faces B (B sends its network media here), ``outside`` faces A (A sees B's media
    coming from here). Everything is recorded. `rebind` moves the outside to a new port, as a
    NAT does when its mapping expires; the old outside socket stays open and still forwards.
    """

    def __init__(self, inside: Recorder, outside: Recorder) -> None:
        self.inside = inside
        self.outsides = [outside]
        self.a: Addr | None = None  # A's network address
        self.b: Addr | None = None  # where B sends from (learnt)
        self.wire: list[tuple[str, bytes]] = []
        inside.datagram_received = self._from_b  # type: ignore[method-assign]
        self._hook(outside)

    @classmethod
    async def open(cls) -> Relay:
        return cls(await udp(), await udp())

    def _hook(self, outside: Recorder) -> None:
        def from_a(data: bytes, addr: Addr) -> None:
            outside.received.append((time.monotonic(), data, addr))
            self.wire.append(("a->b", data))
            if self.b is not None:
                self.inside.sendto(data, self.b)

        outside.datagram_received = from_a  # type: ignore[method-assign]

    def _from_b(self, data: bytes, addr: Addr) -> None:
        self.b = addr
        self.wire.append(("b->a", data))
        if self.a is not None:
            self.outsides[-1].sendto(data, self.a)

    @property
    def outside(self) -> Recorder:
        return self.outsides[-1]

    async def rebind(self) -> Recorder:
        new = await udp()
        self._hook(new)
        self.outsides.append(new)
        return new

    def close(self) -> None:
        self.inside.close()
        for o in self.outsides:
            o.close()


@dataclass
class Node:
    """One engine and the events it raised."""

    engine: MediaEngine
    block: PortBlock
    events: list[MediaEvent] = field(default_factory=list)

    def of_type(self, kind: type[T]) -> list[T]:
        return [e for e in self.events if isinstance(e, kind)]


async def make_node(allocator: PortAllocator, **kwargs: Any) -> Node:
    block = allocator.block()
    events: list[MediaEvent] = []
    kwargs.setdefault("retained_secrets", RetainedSecrets(None))
    kwargs.setdefault("address", "127.0.0.1")
    kwargs.setdefault("native", NATIVE.get())
    engine = MediaEngine(
        asyncio.get_running_loop(),
        port_range=(block.first, block.last),
        on_event=events.append,
        **kwargs,
    )
    return Node(engine, block, events)


async def wait_for(
    condition: Callable[[], bool], timeout: float = 2.0, interval: float = 0.002
) -> None:
    """Poll ``condition`` until true; fail the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


async def stream_packets(phones: list[Phone], count: int, interval: float = 0.005) -> None:
    """Each phone sends ``count`` RTP packets, ``interval`` apart (faster than 20 ms: tests)."""
    for _ in range(count):
        for phone in phones:
            phone.send()
        await asyncio.sleep(interval)


def is_zrtp(data: bytes) -> bool:
    return classify_datagram(data) == "zrtp"


@pytest.fixture(params=["asyncio", "uvloop", "uvloop-python"])
def run(request: pytest.FixtureRequest) -> Run:
    """Each scenario on the standard loop and on uvloop with the C hop (`media.native: auto`,
    the extension must be built), and on uvloop with the Python handlers (`off`)."""
    factory = asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop
    native = request.param != "uvloop-python"
    assert NATIVE_AVAILABLE, "freecall.srtp._hop is not built (pip install -e . needs gcc)"

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        async def bounded() -> Any:
            NATIVE.set(native)
            async with asyncio.timeout(10):
                return await coro

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())

    return runner


@pytest.fixture
def ports() -> Iterator[PortAllocator]:
    allocator = PortAllocator()
    yield allocator
    allocator.release_all()


class Call:
    """Two engines, one stream each, two softphones; optionally a relay (tap/NAT) between."""

    def __init__(self, a: Node, b: Node, sa: MediaStream, sb: MediaStream) -> None:
        self.a, self.b, self.sa, self.sb = a, b, sa, sb
        self.phone_a: Phone
        self.phone_b: Phone
        self.relay: Relay | None = None

    @classmethod
    async def open(
        cls, ports: PortAllocator, *, relay: bool = False, hashes: bool = True, **kw: Any
    ) -> Call:
        a, b = await make_node(ports, **kw), await make_node(ports, **kw)
        call = cls(a, b, await a.engine.allocate(label="A"), await b.engine.allocate(label="B"))
        call.phone_a = await Phone.open(ssrc=0xA1A1A1A1, marker=0xAA)
        call.phone_b = await Phone.open(ssrc=0xB2B2B2B2, marker=0xBB)
        call.phone_a.connect(call.sa)
        call.phone_b.connect(call.sb)
        hash_a = call.sa.zrtp_hash_attribute if hashes else None
        hash_b = call.sb.zrtp_hash_attribute if hashes else None
        if relay:
            r = call.relay = await Relay.open()
            r.a, r.b = call.sa.local_network_rtp, call.sb.local_network_rtp
            call.sa.set_remote(r.outside.address, zrtp_hash=hash_b)
            call.sb.set_remote(r.inside.address, zrtp_hash=hash_a)
        else:
            call.sa.set_remote(call.sb.local_network_rtp, zrtp_hash=hash_b)
            call.sb.set_remote(call.sa.local_network_rtp, zrtp_hash=hash_a)
        return call

    async def secure(self) -> None:
        """Media from both phones until both streams are secure and media gets through."""
        for _ in range(200):
            self.phone_a.send()
            self.phone_b.send()
            await asyncio.sleep(0.005)
            both = self.phone_a.rtp.received and self.phone_b.rtp.received
            if self.sa.secure and self.sb.secure and both:
                for s in (self.sa, self.sb):
                    stats = s.stats()
                    relayed = stats["ice"] is not None and stats["ice"]["relayed"]
                    assert stats["native"] == (NATIVE.get() and not relayed)
                    # native: every socket is read in C (NativeDatagramTransport)
                    transport = s._phone_rtp_ep.transport
                    assert isinstance(transport, NativeDatagramTransport) == NATIVE.get()
                return
        raise AssertionError(f"not secure: {self.sa.stats()} {self.sb.stats()}")

    def close(self) -> None:
        self.a.engine.close()
        self.b.engine.close()
        self.phone_a.close()
        self.phone_b.close()
        if self.relay is not None:
            self.relay.close()


# ---------------------------------------------------------------------------------------------


def test_released_streams_are_freed_without_the_cyclic_collector(run: Run,
                                                                 ports: PortAllocator) -> None:
    """Nothing holds a released stream in a reference cycle (stream <-> socket endpoints, its
    own bound method, the StreamSecure event naming it): it goes, with its ZRTP session and
    SRTP contexts, the moment the call lets go. A soak showed released streams piling up
    between full collections (docs/performance.md, "Soak")."""

    async def scenario() -> None:
        gc.collect()
        gc.disable()
        try:
            for relay in (False, True):
                call = await Call.open(ports, relay=relay)
                await call.secure()
                call.close()
                call.a.events.clear()  # this test's own record of the events (they name the
                call.b.events.clear()  # streams), which the daemon does not keep
                del call
            await asyncio.sleep(0.05)  # the loop calls connection_lost on the closed sockets
            alive = [o for o in gc.get_objects() if isinstance(o, MediaStream)]
            assert not alive, alive
        finally:
            gc.enable()

    run(scenario())


def test_bridge_srtp_both_ways(run: Run, ports: PortAllocator) -> None:
    """Plain RTP in, SRTP on the wire, the original payload out; same SAS; ZRTP < 200 ms."""

    async def scenario() -> None:
        call = await Call.open(ports, relay=True)
        try:
            # No start(): ZRTP begins with the first media packet, as for an offer whose answer
            # the daemon saw only now.
            await call.secure()
            await stream_packets([call.phone_a, call.phone_b], 20)
            await wait_for(lambda: len(call.phone_b.rtp.received) >= 20)
            await wait_for(lambda: len(call.phone_a.rtp.received) >= 20)

            sec_a = call.a.of_type(StreamSecure)
            sec_b = call.b.of_type(StreamSecure)
            assert len(sec_a) == len(sec_b) == 1
            assert sec_a[0].sas == sec_b[0].sas and sec_a[0].sas
            assert sec_a[0].peer_zid == call.b.engine.secrets.zid
            assert sec_a[0].hello_hash_verified and sec_b[0].hello_hash_verified
            assert sec_a[0].continuity == "new"
            for s, phone in ((call.sa, call.phone_a), (call.sb, call.phone_b)):
                assert s.secure_at is not None and s.first_media_at is not None
                assert phone.first_sent_at is not None
                first_media = min(s.first_media_at, phone.first_sent_at)
                assert s.secure_at - first_media < 0.2, "ZRTP took 200 ms or more"

            # Each phone received the other's payloads unchanged, in order, none twice.
            got_b = call.phone_b.rtp.payloads()
            got_a = call.phone_a.rtp.payloads()
            assert all(p[0] == 0xAA for p in got_b) and all(p[0] == 0xBB for p in got_a)
            seqs_b = [int.from_bytes(p[1:3], "big") for p in got_b]
            assert seqs_b == sorted(set(seqs_b))
            assert got_b == [pcmu_payload(s, 0xAA) for s in seqs_b]
            assert got_a[-1] == pcmu_payload(call.phone_b.sent[-1], 0xBB)

            # On the wire: only ZRTP and SRTP, never a plaintext payload.
            assert call.relay is not None
            plain = {pcmu_payload(s, m) for s in range(200) for m in (0xAA, 0xBB)}
            media = [d for _, d in call.relay.wire if not is_zrtp(d)]
            assert media, "no media crossed the wire"
            for data in media:
                assert classify_datagram(data) == "rtp"
                assert len(data) == 12 + 160 + 10  # HS80 tag
                assert data[12:172] not in plain
                assert all(p not in data for p in (got_b[0][:16], got_a[0][:16]))

            # Counters agree with what went through, and no loss was seen.
            stats_b = call.sb.stats()
            assert stats_b["net_rtp_in"] == len(got_b)
            assert stats_b["phone_rtp_out"] == len(got_b)
            assert stats_b["net_rtp_in_bytes"] == 182 * len(got_b)
            assert stats_b["auth_failures"] == 0
            assert stats_b["loss"]["lost"] == 0
            assert stats_b["loss"]["received"] == len(got_b)
            assert call.sa.stats()["phone_rtp_in"] == len(call.phone_a.sent)
            assert stats_b["zrtp_ms"] is not None and stats_b["zrtp_ms"] < 200
        finally:
            call.close()

    run(scenario())


def test_rtcp_becomes_srtcp(run: Run, ports: PortAllocator) -> None:
    async def scenario() -> None:
        call = await Call.open(ports)
        tap = await udp()
        try:
            await call.secure()
            report = call.phone_a.send_rtcp()
            await wait_for(lambda: bool(call.phone_b.rtcp.received))
            assert call.phone_b.rtcp.received[0][1] == report
            assert call.sa.net_rtcp_out == 1 and call.sb.net_rtcp_in == 1
            # What went on the wire was SRTCP: the report plus E|index and a tag (RFC 3711 3.4).
            call.sa.set_remote(call.sb.local_network_rtp, rtcp=tap.address)
            call.phone_a.send_rtcp()
            await wait_for(lambda: bool(tap.received))
            wire = tap.received[0][1]
            assert wire[:8] == report[:8] and len(wire) == len(report) + 4 + 10
            assert wire[8] & 0x80  # E flag: encrypted
            # Muxed RTCP from the softphone's RTP port is recognised too (RFC 5761).
            call.phone_b.rtp.sendto(report, call.phone_b.target)
            await wait_for(lambda: len(call.phone_a.rtcp.received) == 1)
        finally:
            tap.close()
            call.close()

    run(scenario())


def test_latching_follows_nat_rebinding_not_spoofers(run: Run, ports: PortAllocator) -> None:
    """A latches onto B's new NAT port after authenticated SRTP; spoofed packets move nothing."""

    async def scenario() -> None:
        call = await Call.open(ports, relay=True)
        assert call.relay is not None
        relay = call.relay
        try:
            await call.secure()
            first_outside = relay.outside.address
            assert call.sa.remote_rtp_address == first_outside

            # Spoofers on another port: garbage, a forged "SRTP" packet with B's SSRC, a replay
            # of a real SRTP packet captured on the wire, and a ZRTP-looking packet.
            spoof = await udp()
            captured = next(d for w, d in relay.wire if w == "b->a" and not is_zrtp(d))
            forged = rtp_packet(60000, 0xB2B2B2B2, os.urandom(170))
            target = call.sa.local_network_rtp
            for data in (b"\x00" * 40, forged, captured, b"\x10\x00\x00\x01ZRTP" + bytes(40)):
                spoof.sendto(data, target)
            await wait_for(lambda: call.sa.auth_failures >= 1 and call.sa.replays >= 1)
            await asyncio.sleep(0.02)
            assert call.sa.remote_rtp_address == first_outside
            assert call.sa.latches == 0
            assert not spoof.received, "the bridge answered a spoofer"
            before = len(call.phone_a.rtp.received)

            # The NAT rebinds: B's packets now come from a new outside port.
            new_outside = await relay.rebind()
            await stream_packets([call.phone_b], 5)
            await wait_for(lambda: call.sa.remote_rtp_address == new_outside.address)
            assert call.sa.latches == 1
            assert len(call.phone_a.rtp.received) > before
            # and A's media now goes to the new port, reaching B.
            n = len(new_outside.received)
            got = len(call.phone_b.rtp.received)
            await stream_packets([call.phone_a, call.phone_b], 10)
            await wait_for(lambda: len(new_outside.received) >= n + 10)
            await wait_for(lambda: len(call.phone_b.rtp.received) >= got + 10)

            # Spoofing again after the move changes nothing either.
            spoof.sendto(forged, target)
            await wait_for(lambda: call.sa.auth_failures >= 2)
            assert call.sa.remote_rtp_address == new_outside.address
            spoof.close()
        finally:
            call.close()

    run(scenario())


def test_zrtp_latches_provisionally_when_sdp_address_is_wrong(
    run: Run, ports: PortAllocator
) -> None:
    """B is 'behind NAT': its SDP address is useless to A, but its Hellos show where it is."""

    async def scenario() -> None:
        call = await Call.open(ports, relay=True)
        assert call.relay is not None
        black_hole = await udp()
        try:
            call.sa.set_remote(black_hole.address, zrtp_hash=call.sb.zrtp_hash_attribute)
            await call.secure()
            assert call.sa.remote_rtp_address == call.relay.outside.address
            assert call.sa.stats()["remote_authenticated"]
        finally:
            black_hole.close()
            call.close()

    run(scenario())


def test_inactivity_timeout(run: Run, ports: PortAllocator) -> None:
    async def scenario() -> None:
        call = await Call.open(ports, rtp_timeout=0.25)
        try:
            call.sa.start()
            call.sb.start()
            await call.secure()
            stopped = asyncio.get_running_loop().time()
            # B's phone goes silent; A's keeps talking, so only A sees the far end go quiet.
            for _ in range(80):
                call.phone_a.send()
                await asyncio.sleep(0.005)
                if call.a.of_type(MediaTimeout):
                    break
            timeouts = call.a.of_type(MediaTimeout)
            assert len(timeouts) == 1 and timeouts[0].stream is call.sa
            assert 0.25 <= asyncio.get_running_loop().time() - stopped < 0.6
            assert timeouts[0].idle >= 0.25
            assert not call.b.of_type(MediaTimeout)
            assert call.sa.timed_out
        finally:
            call.close()

    run(scenario())


# ---------------------------------------------------------------------------------------------
# Policy: a far end that never answers ZRTP (a plain SIP endpoint, no a=zrtp-hash)


async def plain_far_end(
    ports: PortAllocator, policy: str
) -> tuple[Node, MediaStream, Phone, Recorder]:
    node = await make_node(ports, policy=policy, zrtp_timeout=0.3)
    stream = await node.engine.allocate(label=policy)
    phone = await Phone.open(ssrc=0x1234, marker=0xAA)
    phone.connect(stream)
    far = await udp()
    stream.set_remote(far.address)  # its SDP has no a=zrtp-hash
    stream.start()
    return node, stream, phone, far


def test_policy_require_ends_the_call(run: Run, ports: PortAllocator) -> None:
    async def scenario() -> None:
        node, stream, phone, far = await plain_far_end(ports, "require")
        try:
            start = asyncio.get_running_loop().time()
            while not node.of_type(ZrtpFailure):
                phone.send()
                far.sendto(
                    rtp_packet(phone.seq, 0x9999, pcmu_payload(phone.seq, 0xFF)),
                    stream.local_network_rtp,
                )
                await asyncio.sleep(0.01)
                assert asyncio.get_running_loop().time() - start < 1.0
            assert stream.state == FAILED
            assert "require" in (stream.failure_reason or "")
            assert not node.of_type(StreamInsecure)
            assert far.received and all(is_zrtp(d) for _, d, _ in far.received)
            assert not phone.rtp.received, "clear RTP from the far end reached the softphone"
            assert stream.dropped_insecure > 0
        finally:
            node.engine.close()
            phone.close()
            far.close()

    run(scenario())


def test_policy_prefer_goes_clear_and_says_so(run: Run, ports: PortAllocator) -> None:
    async def scenario() -> None:
        node, stream, phone, far = await plain_far_end(ports, "prefer")
        try:
            while not node.of_type(StreamInsecure):
                phone.send()
                await asyncio.sleep(0.01)
            assert stream.state == CLEAR and not stream.secure
            assert all(is_zrtp(d) for _, d, _ in far.received), "clear RTP before the bound"
            assert "no ZRTP answer" in node.of_type(StreamInsecure)[0].reason
            # Now clear both ways, payloads unchanged.
            payload = phone.send()
            await wait_for(lambda: any(d[12:] == payload for _, d, _ in far.received))
            far_payload = pcmu_payload(7, 0xFF)
            far.sendto(rtp_packet(7, 0x9999, far_payload), stream.local_network_rtp)
            await wait_for(lambda: phone.rtp.payloads()[-1:] == [far_payload])
            assert not node.of_type(ZrtpFailure)
        finally:
            node.engine.close()
            phone.close()
            far.close()

    run(scenario())


def test_policy_off_is_clear_from_the_start(run: Run, ports: PortAllocator) -> None:
    async def scenario() -> None:
        node, stream, phone, far = await plain_far_end(ports, "off")
        try:
            assert stream.zrtp_hash_attribute is None
            assert stream.state == CLEAR
            assert "off" in node.of_type(StreamInsecure)[0].reason
            payload = phone.send()
            await wait_for(lambda: bool(far.received))
            assert far.received[0][1][12:] == payload
            far.sendto(rtp_packet(1, 0x9999, pcmu_payload(1, 0xFF)), stream.local_network_rtp)
            await wait_for(lambda: bool(phone.rtp.received))
            assert not any(is_zrtp(d) for _, d, _ in far.received)
            # A stranger on another port cannot take over a clear stream.
            stranger = await udp()
            stranger.sendto(rtp_packet(2, 0x6666, pcmu_payload(2, 0x66)), stream.local_network_rtp)
            await wait_for(lambda: stream.dropped_other >= 1)
            assert stream.remote_rtp_address == far.address
            stranger.close()
        finally:
            node.engine.close()
            phone.close()
            far.close()

    run(scenario())


def test_prefer_with_advertised_zrtp_fails_instead_of_going_clear(
    run: Run, ports: PortAllocator
) -> None:
    """The far end's SDP promised ZRTP (a=zrtp-hash) and none came: that smells of an attack
    stripping ZRTP, so no silent downgrade even under prefer."""

    async def scenario() -> None:
        node = await make_node(ports, policy="prefer", zrtp_timeout=0.2)
        other = await make_node(ports)
        stream = await node.engine.allocate()
        promised = await other.engine.allocate()
        far = await udp()
        try:
            stream.set_remote(far.address, zrtp_hash=promised.zrtp_hash_attribute)
            stream.start()
            await wait_for(lambda: bool(node.of_type(ZrtpFailure)))
            assert not node.of_type(StreamInsecure)
        finally:
            node.engine.close()
            other.engine.close()
            far.close()

    run(scenario())


def test_wrong_zrtp_hash_fails(run: Run, ports: PortAllocator) -> None:
    async def scenario() -> None:
        call = await Call.open(ports, hashes=False, zrtp_timeout=1.0)
        try:
            call.sa.set_remote(call.sb.local_network_rtp, zrtp_hash="1.10 " + "ab" * 32)
            call.sa.start()
            call.sb.start()
            await wait_for(lambda: bool(call.a.of_type(ZrtpFailure)), timeout=3.0)
            assert not call.sa.secure
        finally:
            call.close()

    run(scenario())


# ---------------------------------------------------------------------------------------------
# Resources


def test_release_frees_ports_and_caps_streams(run: Run, ports: PortAllocator) -> None:
    async def scenario() -> None:
        block = ports.block(8)  # 4 pairs: 2 streams of 2 pairs each
        engine = MediaEngine(
            asyncio.get_running_loop(),
            address="127.0.0.1",
            port_range=(block.first, block.first + 7),
            retained_secrets=RetainedSecrets(None),
        )
        s1 = await engine.allocate()
        s2 = await engine.allocate()
        with pytest.raises(MediaCapacityError):
            await engine.allocate()
        assert engine.stats()["port_pairs_free"] == 0
        used = {s1.local_softphone_rtp[1], s1.local_network_rtp[1]}
        assert all(p % 2 == 0 for p in used)
        s1.release()
        assert s1.state == CLOSED
        assert engine.stats()["port_pairs_free"] == 2
        await asyncio.sleep(0.01)  # the loop closes the sockets on its next turn
        for port in sorted(used):
            for p in (port, port + 1):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.bind(("127.0.0.1", p))  # free again
        s3 = await engine.allocate()
        assert CLOSED not in (s3.state, s2.state)
        # A port held by someone else is skipped, not fatal.
        s3.release()
        await asyncio.sleep(0.01)
        squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        squatter.bind(("127.0.0.1", block.first))
        try:
            s4 = await engine.allocate()
            assert block.first not in (s4.local_softphone_rtp[1], s4.local_network_rtp[1])
        except MediaCapacityError:
            pass  # the squatted pair was one of only two free ones
        finally:
            squatter.close()
        engine.close()
        assert engine.stats()["streams"] == 0

    run(scenario())


def test_loss_from_sequence_gaps(run: Run, ports: PortAllocator) -> None:
    async def scenario() -> None:
        call = await Call.open(ports)
        try:
            await call.secure()
            base = call.sb.reception.total_received
            start = call.phone_a.seq + 10
            skipped = {start + 3, start + 4, start + 17, start + 30}
            for seq in range(start, start + 40):
                if seq not in skipped:
                    call.phone_a.send(seq)
                await asyncio.sleep(0.001)
            await wait_for(lambda: call.sb.reception.total_received >= base + 36)
            loss = call.sb.stats()["loss"]
            # the 10 sequence numbers jumped over before `start` count as lost too
            assert loss["lost"] == len(skipped) + 10
            assert loss["expected"] == loss["received"] + loss["lost"]
            assert call.sb.stats()["net_rtp_in"] == loss["received"]
        finally:
            call.close()

    run(scenario())


def test_further_streams_key_by_multistream(run: Run, ports: PortAllocator) -> None:
    """Video started with audio waits for it (one DH at a time, RFC 6189 4.4.1); a stream
    added once audio is secure (a re-INVITE) keys at once; both Multistream, same SAS."""

    async def scenario() -> None:
        call = await Call.open(ports)
        phones: list[Phone] = []

        async def pair(label: str) -> tuple[MediaStream, MediaStream, Phone, Phone]:
            xa = await call.a.engine.allocate(label=label, first=call.sa)
            xb = await call.b.engine.allocate(label=label, first=call.sb)
            xa.set_remote(xb.local_network_rtp, zrtp_hash=xb.zrtp_hash_attribute)
            xb.set_remote(xa.local_network_rtp, zrtp_hash=xa.zrtp_hash_attribute)
            pa, pb = await Phone.open(1, 0x01), await Phone.open(2, 0x02)
            phones.extend((pa, pb))
            pa.connect(xa)
            pb.connect(xb)
            xa.start()
            xb.start()
            return xa, xb, pa, pb

        async def flows(pa: Phone, pb: Phone) -> None:
            for _ in range(100):
                pa.send()
                pb.send()
                await asyncio.sleep(0.005)
                if pa.rtp.received and pb.rtp.received:
                    return
            raise AssertionError("no media on the further stream")

        try:
            call.sa.start()
            call.sb.start()
            va, vb, pa, pb = await pair("video")
            await call.secure()
            await flows(pa, pb)
            late_a, late_b, pa2, pb2 = await pair("late")
            await flows(pa2, pb2)
            assert call.sa.result is not None
            for s in (va, vb, late_a, late_b):
                assert s.state == SECURE
                assert s.result is not None and s.result.multistream
                assert s.result.sas == call.sa.result.sas
        finally:
            for phone in phones:
                phone.close()
            call.close()

    run(scenario())


def test_forged_hellos_neither_latch_nor_flood(run: Run, ports: PortAllocator) -> None:
    """Hellos that do not match the peer's a=zrtp-hash are dropped, counted, reported 5 times."""

    async def scenario() -> None:
        node, other = await make_node(ports), await make_node(ports)
        stream, promised = await node.engine.allocate(), await other.engine.allocate()
        silent, spoof = await udp(), await udp()
        try:
            stream.set_remote(silent.address, zrtp_hash=promised.zrtp_hash_attribute)
            stream.start()
            fake = FakePeer(seed=7)
            for _ in range(20):
                spoof.sendto(fake.packet(fake.hello()), stream.local_network_rtp)
            await wait_for(lambda: stream.zrtp_warnings >= 20)
            assert len(node.of_type(ZrtpWarning)) == 5
            assert stream.remote_rtp_address == (*silent.address,) and stream.latches == 0
            assert not spoof.received
            assert silent.received and all(is_zrtp(d) for _, d, _ in silent.received)
        finally:
            for r in (silent, spoof):
                r.close()
            node.engine.close()
            other.engine.close()

    run(scenario())


def test_allocate_now_binds_at_once_and_loses_nothing(run: Run, ports: PortAllocator) -> None:
    """The proxy rewrites SDP synchronously: ports are bound before the loop takes the sockets
    over, and a datagram arriving in between waits in the socket."""

    async def scenario() -> None:
        node = await make_node(ports, policy="off")
        phone, far = await Phone.open(ssrc=5, marker=0x55), await udp()
        try:
            stream = node.engine.allocate_now(label="sync")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, pytest.raises(OSError):
                probe.bind(stream.local_network_rtp)  # already ours
            phone.connect(stream)
            stream.set_remote(far.address)
            payload = phone.send()  # before any await: the loop has not seen the socket yet
            await wait_for(lambda: bool(far.received))
            assert far.received[0][1][12:] == payload
            with pytest.raises(ValueError):
                node.engine.allocate_now(first=object())
        finally:
            node.engine.close()
            phone.close()
            far.close()

    run(scenario())


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback in this kernel")
def test_ipv6_on_the_wire(run: Run, ports: PortAllocator) -> None:
    """Softphones on 127.0.0.1, the engines talking SRTP over ::1 (4-tuple addresses)."""

    async def scenario() -> None:
        call = await Call.open(ports, address="::1")
        try:
            await call.secure()
            assert call.sa.local_network_rtp[0] == "::1"
            assert call.sa.remote_rtp_address == ("::1", call.sb.local_network_rtp[1], 0, 0)
            assert call.sa.latches == 0 and call.sb.auth_failures == 0
        finally:
            call.close()

    run(scenario())


def test_a_lost_socket_does_not_fail_a_later_sdp(run: Run, ports: PortAllocator) -> None:
    """Seen in the hour soak: a stream whose network RTCP socket had gone (its transport lost)
    raised AssertionError from set_remote, inside the proxy's handling of the SIP message.
    Now that socket just sends nothing; the stream takes the SDP."""

    async def scenario() -> None:
        node = await make_node(ports)
        try:
            stream = await node.engine.allocate(label="audio")
            rtcp_ep = stream._net_rtcp_ep
            transport = rtcp_ep.transport
            assert transport is not None
            transport.close()
            await asyncio.sleep(0.01)  # connection_lost runs on the next turn
            assert rtcp_ep.transport is None
            stream.set_remote(("127.0.0.1", 40000), ("127.0.0.1", 40001))
            assert stream.remote_rtp_address == ("127.0.0.1", 40000)
            stream._net_rtcp_send(b"\x80\xc8" + bytes(26), stream.remote_rtcp_address)
        finally:
            node.engine.close()
            node.block.release()

    run(scenario())


# -- ICE in the bridge (freecall.srtp.ice): two engines on loopback agree on a path by checks
# before ZRTP; a pool of streams gathered in advance from a real STUN/TURN relay
# (freecall.relay.service) in this process; media through the TURN allocation when the only
# path is the relayed one.

SECRET = "bridge-ice-secret"


def _only(params: IceParameters | None, kind: str) -> IceParameters:
    assert params is not None
    return IceParameters(params.ufrag, params.pwd,
                         tuple(c for c in params.candidates if c.kind == kind))


async def _relay(ports: PortAllocator) -> RelayService:
    block = ports.block()
    service = RelayService(
        TurnSettings(realm="bridge.test", secret=SECRET,
                     allow_peers=(ipaddress.ip_network("127.0.0.0/8"),),
                     wall_offset=time.time() - asyncio.get_running_loop().time()),
        ("127.0.0.1", 0), "127.0.0.1", PortRange(block.first, block.last))
    await service.start()
    return service


def _servers(relay: RelayService, node: str) -> IceServers:
    assert relay.bound is not None
    user, password = node_credentials(SECRET, node, time.time(), 600)
    return IceServers(stun=(relay.bound,), turn=(TurnServer(relay.bound, user, password),))


async def _talk(sa: MediaStream, sb: MediaStream) -> tuple[Phone, Phone]:
    phone_a = await Phone.open(ssrc=0xA1A1A1A1, marker=0xAA)
    phone_b = await Phone.open(ssrc=0xB2B2B2B2, marker=0xBB)
    phone_a.connect(sa)
    phone_b.connect(sb)
    for _ in range(400):
        phone_a.send()
        phone_b.send()
        await asyncio.sleep(0.005)
        if sa.secure and sb.secure and phone_a.rtp.received and phone_b.rtp.received:
            return phone_a, phone_b
    raise AssertionError(f"no secure media: {sa.stats()} {sb.stats()}")


def _offer_answer(sa: MediaStream, sb: MediaStream, *, a_sees: IceParameters | None = None,
                  b_sees: IceParameters | None = None) -> None:
    """A offers (controlling), B answers; each learns the other's SDP address and ICE."""
    sb.set_remote_ice(b_sees or sa.ice_parameters, controlling=False)
    sb.set_remote(sa.local_network_rtp, zrtp_hash=sa.zrtp_hash_attribute)
    sa.set_remote_ice(a_sees or sb.ice_parameters, controlling=True)
    sa.set_remote(sb.local_network_rtp, zrtp_hash=sb.zrtp_hash_attribute)
    sa.start()
    sb.start()


def test_ice_finds_the_path_before_zrtp_starts(run: Run, ports: PortAllocator) -> None:
    async def scenario() -> None:
        a, b = await make_node(ports, ice=True), await make_node(ports, ice=True)
        sa, sb = await a.engine.allocate(label="A"), await b.engine.allocate(label="B")
        try:
            assert sa.stats()["ice"]["candidates"] == ["host"]  # no servers: no waiting
            _offer_answer(sa, sb)
            assert sa.stats()["zrtp_out"] == 0  # held until a checked path exists
            phone_a, phone_b = await _talk(sa, sb)
            for stream, other in ((sa, sb), (sb, sa)):
                ice = stream.stats()["ice"]
                assert ice["state"].startswith("direct"), ice
                assert ice["remote"] == list(other.local_network_rtp), ice
                assert ice["checks_sent"] >= 1 and ice["checks_received"] >= 1, ice
            assert sa.result is not None and sb.result is not None
            assert sa.result.sas == sb.result.sas
            phone_a.close()
            phone_b.close()
        finally:
            a.engine.close()
            b.engine.close()

    run(scenario())


def test_a_far_end_without_ice_gets_the_sdp_address(run: Run, ports: PortAllocator) -> None:
    async def scenario() -> None:
        a, b = await make_node(ports, ice=True), await make_node(ports)
        sa, sb = await a.engine.allocate(label="A"), await b.engine.allocate(label="B")
        try:
            sa.set_remote_ice(None, controlling=True)  # the answer had no ICE
            sa.set_remote(sb.local_network_rtp, zrtp_hash=sb.zrtp_hash_attribute)
            sb.set_remote(sa.local_network_rtp, zrtp_hash=sa.zrtp_hash_attribute)
            sa.start()
            sb.start()
            phone_a, phone_b = await _talk(sa, sb)
            assert sa.stats()["ice"] is None
            phone_a.close()
            phone_b.close()
        finally:
            a.engine.close()
            b.engine.close()

    run(scenario())


def test_pooled_streams_follow_the_relay_the_node_chooses(run: Run,
                                                         ports: PortAllocator) -> None:
    """A pooled stream allocated at one relay is replaced once the node chooses another (its
    signalling attached there): the allocation at the first relay is given back."""

    async def scenario() -> None:
        first, second = await _relay(ports), await _relay(ports)
        choice = [first]
        choice_servers: list[IceServers | None] = [None]
        node = await make_node(ports, ice=True, ice_pool=1,
                               ice_servers=lambda: choice_servers[0] or _servers(choice[0], "a"))
        try:
            node.engine.start_pool()
            await wait_for(lambda: first.core is not None and first.core.allocations == 1,
                           timeout=5)
            choice[0] = second
            handle = node.engine._pool_handle
            assert handle is not None
            handle.cancel()
            node.engine._pool_tick()  # the engine's own look at its pool, without the wait
            await wait_for(lambda: second.core is not None and second.core.allocations == 1
                           and first.core is not None and first.core.allocations == 0,
                           timeout=5)
            assert len(node.engine._pool) == 1
            # a second TURN server listed after the chosen one: the agent uses the first only,
            # so the stream is kept (not replaced at every look)
            kept = node.engine._pool[0]
            both = _servers(second, "a")
            choice_servers[0] = IceServers(stun=both.stun,
                                           turn=(*both.turn, *_servers(first, "a").turn))
            node.engine._pool_tick()
            await asyncio.sleep(0.3)
            assert node.engine._pool == [kept]
            assert second.core is not None and first.core is not None
            assert second.core.allocations == 1 and first.core.allocations == 0
        finally:
            node.engine.close()
            first.close()
            second.close()

    run(scenario())


def test_pooled_streams_carry_media_through_the_relay(run: Run, ports: PortAllocator) -> None:
    """Streams gathered in advance (server-reflexive and relayed candidates at once); when the
    far end can reach us only at our relayed address, media and ZRTP go through the TURN
    allocation (ChannelData) and the call is secure."""

    async def scenario() -> None:
        relay = await _relay(ports)
        nodes: list[Node] = []
        try:
            for name in ("a", "b"):
                node = await make_node(ports, ice=True, ice_pool=1,
                                       ice_servers=lambda n=name: _servers(relay, n))
                node.engine.start_pool()
                nodes.append(node)
            a, b = nodes
            await wait_for(lambda: all(
                s._ice is not None and s._ice.gathering_complete
                for n in nodes for s in n.engine._pool) and all(
                len(n.engine._pool) == 1 for n in nodes), timeout=5)
            pooled = a.engine._pool[0]
            sa, sb = a.engine.allocate_now(label="A"), b.engine.allocate_now(label="B")
            assert sa is pooled and a.engine._pool[0] is not pooled  # taken, and refilled
            params = sa.ice_parameters
            assert params is not None
            # On loopback the server-reflexive address is the host one (no NAT), so it is not
            # listed twice, and the engine knows it is not behind NAT.
            assert {c.kind for c in params.candidates} == {"host", "relay"}
            assert a.engine.behind_nat is False
            assert (a.engine.nat.source, a.engine.stats()["nat_source"]) == ("media", "media")
            assert a.engine.stats()["streams"] == 1  # the pool is not a call
            assert a.engine.stats()["pooled"] == 1
            # Each may reach the other only at its relayed address (as between two symmetric
            # NATs): at least one side's media goes through its own allocation.
            _offer_answer(sa, sb, b_sees=_only(sa.ice_parameters, "relay"),
                          a_sees=_only(sb.ice_parameters, "relay"))
            phone_a, phone_b = await _talk(sa, sb)
            ice_a, ice_b = sa.stats()["ice"], sb.stats()["ice"]
            assert ice_a["relayed"] or ice_b["relayed"], (ice_a, ice_b)
            assert relay.core is not None and relay.core.stats.relayed_packets > 10
            before = relay.core.allocations
            (sa if ice_a["relayed"] else sb).release()  # its Refresh(0) frees the allocation
            await wait_for(lambda: relay.core is not None
                           and relay.core.allocations < before, timeout=3)
            phone_a.close()
            phone_b.close()
        finally:
            for node in nodes:
                node.engine.close()
            relay.close()

    run(scenario())


def test_shared_softphone_socket_routes_by_source(run: Run, ports: PortAllocator) -> None:
    """``phone_socket: shared``: two calls' softphones on one loopback port pair of engine A,
    each routed by its source address to its own stream (in C where the C reader runs, by
    the Python router otherwise); a stranger's packets are dropped and counted; a released
    stream's softphone is no longer routed while the other call goes on."""

    async def scenario() -> None:
        a = await make_node(ports, phone_socket="shared")
        b = await make_node(ports)
        shared = a.engine.shared_phone_port
        assert shared is not None and shared % 2 == 0
        sa = [await a.engine.allocate(label=f"A{i}") for i in range(2)]
        sb = [await b.engine.allocate(label=f"B{i}") for i in range(2)]
        pa = [await Phone.open(ssrc=0xA0 + i, marker=0xA0 + i) for i in range(2)]
        pb = [await Phone.open(ssrc=0xB0 + i, marker=0xB0 + i) for i in range(2)]
        stranger = await udp()
        try:
            for i in range(2):
                pa[i].connect(sa[i])
                pb[i].connect(sb[i])
                assert sa[i].local_softphone_rtp == ("127.0.0.1", shared)
                assert sa[i].local_softphone_rtcp == ("127.0.0.1", shared + 1)
                sa[i].set_remote(sb[i].local_network_rtp, zrtp_hash=sb[i].zrtp_hash_attribute)
                sb[i].set_remote(sa[i].local_network_rtp, zrtp_hash=sa[i].zrtp_hash_attribute)
                sa[i].start()
                sb[i].start()
            await wait_for(lambda: all(s.state == SECURE for s in (*sa, *sb)))
            await stream_packets([*pa, *pb], 10)
            for i in range(2):
                await wait_for(lambda i=i: len(pb[i].rtp.received) >= 10  # type: ignore[misc]
                               and len(pa[i].rtp.received) >= 10)
                assert {p[0] for p in pb[i].rtp.payloads()} == {0xA0 + i}
                assert {p[0] for p in pa[i].rtp.payloads()} == {0xB0 + i}
                # toward the softphone from the shared socket
                assert {r[2] for r in pa[i].rtp.received} == {("127.0.0.1", shared)}
                assert sa[i].stats()["native"] == NATIVE.get()
            router = a.engine._shared.rtp  # type: ignore[union-attr]
            # in C: each softphone's source looked up to its stream's phone->net hop
            assert len(router.c_routes) == (2 if NATIVE.get() else 0)
            assert len(router.routes) == 2
            report = pa[1].send_rtcp()  # RTCP by its own shared socket and route
            await wait_for(lambda: bool(pb[1].rtcp.received))
            assert pb[1].rtcp.received[0][1] == report
            assert a.engine.stats()["phone_unrouted"] == 0

            # A source no softphone SDP names: dropped and counted, on RTP and RTCP.
            stranger.sendto(rtp_packet(1, 0x5, pcmu_payload(1, 0x55)), ("127.0.0.1", shared))
            stranger.sendto(rtcp_receiver_report(0x5), ("127.0.0.1", shared + 1))
            await wait_for(lambda: a.engine.stats()["phone_unrouted"] == 2)
            assert a.engine.stats()["phone_socket"] == "shared"

            # Releasing a stream removes its routes; the other call is unaffected.
            sa[0].release()
            before = len(pb[1].rtp.received)
            await stream_packets([pa[0], pa[1]], 5)
            await wait_for(lambda: len(pb[1].rtp.received) >= before + 5)
            await wait_for(lambda: a.engine.stats()["phone_unrouted"] == 7)
            assert {p[0] for p in pb[1].rtp.payloads()} == {0xA1}
            assert a.engine.stats()["streams"] == 1
            assert len(router.routes) == 1 and pa[0].rtp.address[:2] not in router.routes
            assert len(router.c_routes) == (1 if NATIVE.get() else 0)
        finally:
            for phone in (*pa, *pb):
                phone.close()
            stranger.close()
            a.engine.close()
            b.engine.close()

    run(scenario())
