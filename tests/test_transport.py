"""The SIP transport edge over real loopback sockets: UDP, TCP and TLS on 127.0.0.1 and ::1.

Every test runs on the standard event loop and on uvloop.  Ports are ephemeral (port 0), so
tests never collide.  The "daemon" is a :class:`Sink` that queues what the transport hands it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import stat
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from freecall.sip.errors import SipParseError
from freecall.sip.flow import Flow
from freecall.sip.message import Request, make_response, parse_message
from freecall.tls import certificate_fingerprint, client_context, make_self_signed, server_context
from freecall.transport import (
    BoundListener,
    ListenSpec,
    SipTransport,
    Timer,
    TransportOptions,
    framing_error_response,
    install_event_loop_policy,
    needs_congestion_control,
)


def _ipv6_loopback() -> bool:
    """A real bind on ::1: some containers have IPv6 switched off in the kernel."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _ipv6_loopback()
HOSTS = [
    "127.0.0.1",
    pytest.param(
        "::1", marks=pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback in this kernel")
    ),
]

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Run one scenario on a fresh loop of the parametrized kind, bounded in time."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(10):  # in this task: all_tasks() sees only the scenario
                return await coro

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())

    return runner


class Certs:
    def __init__(self, root: Path) -> None:
        self.a_cert, self.a_key = root / "a" / "cert.pem", root / "a" / "key.pem"
        self.b_cert, self.b_key = root / "b" / "cert.pem", root / "b" / "key.pem"
        self.a = make_self_signed(self.a_cert, self.a_key, "node-a.example.org")
        self.b = make_self_signed(self.b_cert, self.b_key, "node-b.example.org")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tls"))


class Sink:
    """Stands in for the daemon: queues messages, transport errors, closed flows."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[tuple[bytes, Flow, float]] = asyncio.Queue()
        self.errors: asyncio.Queue[Flow] = asyncio.Queue()
        self.closed: list[Flow] = []

    def on_message(self, data: bytes, flow: Flow, now: float) -> None:
        self.messages.put_nowait((data, flow, now))

    def on_transport_error(self, flow: Flow) -> None:
        self.errors.put_nowait(flow)

    def on_flow_closed(self, flow: Flow) -> None:
        self.closed.append(flow)

    async def next(self, timeout: float = 3.0) -> tuple[bytes, Flow, float]:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def error(self, timeout: float = 3.0) -> Flow:
        return await asyncio.wait_for(self.errors.get(), timeout)


async def node(
    *specs: tuple[str, str],
    options: TransportOptions | None = None,
    server_ssl: Any = None,
    client_ssl: Any = None,
    **callbacks: Any,
) -> tuple[SipTransport, Sink]:
    sink = Sink()
    edge = SipTransport(
        [ListenSpec(kind, host, 0) for kind, host in specs],
        sink.on_message,
        on_transport_error=sink.on_transport_error,
        on_flow_closed=sink.on_flow_closed,
        server_ssl=server_ssl,
        client_ssl=client_ssl,
        options=options,
        **callbacks,
    )
    await edge.start()
    return edge, sink


def request(
    branch: str = "z9hG4bK1", body: bytes = b"", content_length: str | None = None
) -> bytes:
    length = str(len(body)) if content_length is None else content_length
    return (
        f"OPTIONS sip:bob@b.example.net SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP a.example.org;branch={branch}\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:alice@a.example.org>;tag=1928\r\n"
        f"To: <sip:bob@b.example.net>\r\n"
        f"Call-ID: {branch}@a.example.org\r\n"
        f"CSeq: 1 OPTIONS\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode() + body


def response_to(data: bytes) -> bytes:
    req = parse_message(data, datagram=False)
    assert isinstance(req, Request)
    return make_response(req, 200).to_bytes()


def closed_port(host: str) -> int:
    """A port nothing listens on (bound, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


async def raw_client(
    listener: BoundListener, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(listener.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, listener.addr)
    return await asyncio.open_connection(sock=sock)


async def at_eof(reader: asyncio.StreamReader, timeout: float = 3.0) -> bool:
    """True when the peer closed (FIN or RST), reading and discarding what comes before."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except ConnectionResetError:
        pass
    return True


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("kind", ["udp", "tcp", "tls"])
def test_round_trip(run: Run, certs: Certs, kind: str, host: str) -> None:
    """A request from A reaches B; B's answer to the flow it got comes back to A."""

    async def scenario() -> None:
        tls: dict[str, Any] = {}
        if kind == "tls":
            tls = {
                "server_ssl": server_context(certs.b_cert, certs.b_key),
                "client_ssl": client_context(certs.a_cert, certs.a_key),
            }
        a, a_sink = await node((kind, host), **tls)
        b, b_sink = await node((kind, host), **tls)
        try:
            a_listener, b_listener = a.listener(kind), b.listener(kind)
            assert b_listener.port != 0 and b_listener.host == host
            req = request(body=b"v=0\r\n")
            a.send(req, Flow(kind, b_listener.addr))
            data, flow, now = await b_sink.next()
            assert data == req
            assert flow.transport == kind and flow.local == b_listener.addr
            assert now <= asyncio.get_running_loop().time()
            if kind == "udp":
                # Sent from A's listener socket, so B's answer reaches A's listener (RFC 3581).
                assert flow.remote == a_listener.addr and flow.conn is None
            else:
                assert flow.conn is not None and flow.remote[0] == host
            b.send(response_to(req), flow)
            answer, back, _ = await a_sink.next()
            assert answer.startswith(b"SIP/2.0 200 OK\r\n")
            assert back.transport == kind
            assert back.remote == b_listener.addr and back.local == a_listener.addr
            if kind != "udp":
                # Same connection both ways: B opened none.
                assert back.conn is not None
                assert (b.counters.connections_accepted, b.counters.connections_outgoing) == (1, 0)
                assert (a.counters.connections_outgoing, a.connection_count()) == (1, 1)
                assert b.counters.connections_open[kind] == 1
                # A second request to the address reuses the connection.
                a.send(request("z9hG4bK2"), Flow(kind, b_listener.addr))
                _, again, _ = await b_sink.next()
                assert again.conn == flow.conn
            if kind == "tls":
                assert a.peer_fingerprint(back.conn or 0) == certificate_fingerprint(certs.b)
            assert a.counters.messages_out[kind] >= 1 and b.counters.messages_in[kind] >= 1
            assert a_sink.errors.empty() and b_sink.errors.empty()
        finally:
            await a.close()
            await b.close()

    run(scenario())


def test_tls_self_signed_both_sides_and_fingerprints(
    run: Run, certs: Certs, tmp_path: Path
) -> None:
    """Both nodes present generated self-signed certificates; each sees the other's key."""
    cert_path, key_path = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    fresh = make_self_signed(cert_path, key_path, "192.0.2.10")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert make_self_signed(cert_path, key_path, "192.0.2.10") == fresh  # loaded, not remade
    cert_path.unlink()  # a lost certificate is re-issued for the same key: same identity
    assert certificate_fingerprint(make_self_signed(cert_path, key_path, "x")) == (
        certificate_fingerprint(fresh)
    )
    assert certificate_fingerprint(cert_path.read_bytes()) == certificate_fingerprint(fresh)
    assert len(certificate_fingerprint(fresh)) == 64

    async def scenario() -> None:
        # B asks for client certificates and checks them against A's (pinned) certificate.
        b, b_sink = await node(
            ("tls", "127.0.0.1"),
            server_ssl=server_context(certs.b_cert, certs.b_key, ca_file=certs.a_cert),
        )
        a, a_sink = await node(
            ("tls", "127.0.0.1"),
            server_ssl=server_context(certs.a_cert, certs.a_key),
            client_ssl=client_context(certs.a_cert, certs.a_key),
        )
        try:
            req = request()
            a.send(req, Flow("tls", b.listener("tls").addr))
            _, flow, _ = await b_sink.next()
            assert flow.conn is not None
            assert b.peer_fingerprint(flow.conn) == certificate_fingerprint(certs.a)
            b.send(response_to(req), flow)
            _, back, _ = await a_sink.next()
            assert back.conn is not None
            assert a.peer_fingerprint(back.conn) == certificate_fingerprint(certs.b)
            assert certificate_fingerprint(certs.a) != certificate_fingerprint(certs.b)
            assert b.peer_fingerprint(9999) is None
        finally:
            await a.close()
            await b.close()

    run(scenario())


def test_tls_peer_key_check_refuses_the_wrong_node(
    run: Run, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """An outgoing TLS connection whose peer key is not the one expected for that address is
    closed before anything is written, and the send fails (the proxy then tries the next
    target); the expected key passes."""
    expected: dict[tuple[str, int], str] = {}
    seen: list[tuple[tuple[str, int], str | None]] = []

    def check(remote: tuple[str, int], key: str | None) -> bool:
        seen.append((remote, key))
        return expected.get(remote) == key

    async def scenario() -> None:
        b, b_sink = await node(("tls", "127.0.0.1"),
                               server_ssl=server_context(certs.b_cert, certs.b_key))
        a, a_sink = await node(client_ssl=client_context(certs.a_cert, certs.a_key),
                               peer_key_check=check)
        try:
            b_addr = b.listener("tls").addr
            expected[b_addr] = certificate_fingerprint(certs.a)  # not B's key
            flow = Flow("tls", b_addr)
            a.send(request(), flow)
            assert await a_sink.error() == flow
            assert a.connection_count() == 0 and a.counters.connections_open["tls"] == 0
            await asyncio.sleep(0.05)
            assert b_sink.messages.empty()  # nothing was written to the impostor
            expected[b_addr] = certificate_fingerprint(certs.b)
            a.send(request("z9hG4bK2"), flow)
            data, _, _ = await b_sink.next()
            assert b"z9hG4bK2" in data and a.counters.connections_open["tls"] == 1
        finally:
            await a.close()
            await b.close()

    with caplog.at_level(logging.INFO, logger="freecall.transport"):
        run(scenario())
    assert [key for _, key in seen] == [certificate_fingerprint(certs.b)] * 2
    assert any("is not the key its node record names" in r.getMessage() for r in caplog.records)


def test_tls_handshake_failure_is_logged_and_reported(
    run: Run, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """B refuses A's certificate: B logs one line, A's send fails fast (RFC 3261 17.1.4).

    With TLS 1.3 the client learns of the refusal only after its first write, when the
    connection drops without an answer; that counts as a failed send too.
    """

    async def scenario() -> None:
        b, b_sink = await node(
            ("tls", "127.0.0.1"),
            server_ssl=server_context(
                certs.b_cert, certs.b_key, ca_file=certs.b_cert, verify_peer=True
            ),
        )
        a, a_sink = await node(client_ssl=client_context(certs.a_cert, certs.a_key))
        try:
            flow = Flow("tls", b.listener("tls").addr)
            a.send(request(), flow)
            assert await a_sink.error() == flow
            for _ in range(100):
                if b.connection_count() == 0:
                    break
                await asyncio.sleep(0.01)
            assert b.connection_count() == 0 and b.counters.connect_failures == 1
            assert b_sink.messages.empty() and a.connection_count() == 0
        finally:
            await a.close()
            await b.close()

    with caplog.at_level(logging.INFO, logger="freecall.transport"):
        run(scenario())
    failed = [r.getMessage() for r in caplog.records if "TLS handshake with" in r.getMessage()]
    assert len(failed) == 1 and "127.0.0.1" in failed[0], failed


# -- stream framing -----------------------------------------------------------------------------


def test_tcp_bytewise_and_two_in_one_segment(run: Run) -> None:
    async def scenario() -> None:
        b, sink = await node(("tcp", "127.0.0.1"))
        try:
            reader, writer = await raw_client(b.listener("tcp"))
            one = request("z9hG4bKbytes", body=b"0123456789")
            for i in range(len(one)):
                writer.write(one[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0)
            data, flow, _ = await sink.next()
            assert data == one
            assert sink.messages.empty()

            first, second = request("z9hG4bKone"), request("z9hG4bKtwo", body=b"hi")
            writer.write(first + second)  # one write, one segment on loopback
            await writer.drain()
            assert (await sink.next())[0] == first
            data2, flow2, _ = await sink.next()
            assert data2 == second and flow2 == flow
            assert b.counters.messages_in["tcp"] == 3
            await close_writer(writer)
            del reader
        finally:
            await b.close()

    run(scenario())


def test_ping_pong_and_udp_keepalives(run: Run) -> None:
    """RFC 5626 3.5.1: CRLFCRLF gets CRLF; over UDP CRLF and STUN datagrams are dropped."""

    async def scenario() -> None:
        b, sink = await node(("tcp", "127.0.0.1"), ("udp", "127.0.0.1"))
        try:
            reader, writer = await raw_client(b.listener("tcp"))
            writer.write(b"\r\n\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(2), 2) == b"\r\n"
            assert b.counters.pongs_out == 1
            await close_writer(writer)

            loop = asyncio.get_running_loop()
            udp, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=b.listener("udp").addr
            )
            stun = bytes.fromhex("0001000021124442") + os.urandom(12)  # Binding request
            udp.sendto(b"\r\n\r\n")
            udp.sendto(b"\r\n")
            udp.sendto(stun)
            udp.sendto(request("z9hG4bKafter"))
            data, flow, _ = await sink.next()
            assert data == request("z9hG4bKafter") and flow.transport == "udp"
            assert b.counters.keepalives_in == 3 and b.counters.stun_datagrams == 1
            assert sink.messages.empty()
            udp.close()
        finally:
            await b.close()

    run(scenario())


def test_response_goes_back_over_the_request_connection(run: Run) -> None:
    async def scenario() -> None:
        b, sink = await node(("tcp", "127.0.0.1"))
        try:
            reader, writer = await raw_client(b.listener("tcp"))
            req = request()
            writer.write(req)
            await writer.drain()
            _, flow, _ = await sink.next()
            assert flow.remote == writer.get_extra_info("sockname")[:2]
            b.send(response_to(req), flow)
            b.send(response_to(req), Flow("tcp", flow.remote))  # by address: same connection
            expected = response_to(req)
            assert await asyncio.wait_for(reader.readexactly(len(expected)), 2) == expected
            assert await asyncio.wait_for(reader.readexactly(len(expected)), 2) == expected
            # RFC 5923-style alias: the peer's Via sent-by maps to this connection too.
            assert flow.conn is not None and b.alias(flow.conn, ("127.0.0.1", 5999))
            b.send(b"\r\n\r\n", Flow("tcp", ("127.0.0.1", 5999)))
            assert await asyncio.wait_for(reader.readexactly(4), 2) == b"\r\n\r\n"
            assert b.connection_count() == 1 and b.counters.connections_outgoing == 0
            # The daemon may close a flow (e.g. after a parse error it judges fatal).
            assert not b.close_flow(Flow("udp", flow.remote))
            assert b.close_flow(flow)
            assert await at_eof(reader)
            await asyncio.sleep(0.05)
            assert sink.closed == [flow] and b.connection_count() == 0
            await close_writer(writer)
        finally:
            await b.close()

    run(scenario())


def test_send_to_unreachable_or_closed_peer_reports_transport_error(run: Run) -> None:
    """RFC 3261 17.1.4: the core hears of the failure at once, with the flow it sent to."""

    async def scenario() -> None:
        a, sink = await node(("tcp", "127.0.0.1"))
        try:
            nobody = Flow("tcp", ("127.0.0.1", closed_port("127.0.0.1")))
            a.send(request(), nobody)
            a.send(request("z9hG4bK2"), nobody)  # queued on the same connect attempt
            assert await sink.error() == nobody
            assert sink.errors.empty()
            assert a.counters.connect_failures == 1 and a.connection_count() == 0

            # The peer's connection closed: the response cannot go back over it, and opening
            # one to its (ephemeral) source port is refused.
            reader, writer = await raw_client(a.listener("tcp"))
            writer.write(request("z9hG4bK3"))
            await writer.drain()
            req, flow, _ = await sink.next()
            await close_writer(writer)
            await asyncio.sleep(0.05)
            assert sink.closed == [flow]
            a.send(response_to(req), flow)
            assert await sink.error() == flow
            del reader

            # UDP: a datagram that cannot exist, and no listener of the family.
            udp_node, udp_sink = await node(("udp", "127.0.0.1"))
            too_big = Flow("udp", ("127.0.0.1", 9))
            udp_node.send(b"x" * 70000, too_big)
            assert await udp_sink.error() == too_big
            v6 = Flow("udp", ("::1", 9))
            udp_node.send(b"OPTIONS", v6)
            assert await udp_sink.error() == v6
            await udp_node.close()
        finally:
            await a.close()

    run(scenario())


def test_fatal_framing_error_is_answered_then_closed(run: Run) -> None:
    """RFC 4475 3.1.2.3: a negative Content-Length cannot be framed; answer 400 and close."""
    seen: list[tuple[Flow, int | None, bool]] = []

    async def scenario() -> None:
        edge: list[SipTransport] = []

        def on_framing_error(flow: Flow, error: SipParseError, head: bytes) -> None:
            # The daemon's side: the connection still exists while it answers.
            seen.append((flow, error.status, edge[0].connection_count() == 1))
            answer = framing_error_response(error, head, server="freecall")
            assert answer is not None
            edge[0].send(answer, flow)

        b, sink = await node(("tcp", "127.0.0.1"), on_framing_error=on_framing_error)
        edge.append(b)
        try:
            reader, writer = await raw_client(b.listener("tcp"))
            writer.write(request("z9hG4bKneg", content_length="-999") + b"garbage that follows")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert head.startswith(b"SIP/2.0 400 ")
            assert b"branch=z9hG4bKneg" in head and b"Server: freecall" in head
            assert await at_eof(reader)
            assert sink.messages.empty()
            assert b.counters.framing_errors == 1
            await asyncio.sleep(0.05)
            assert b.connection_count() == 0
            await close_writer(writer)
        finally:
            await b.close()

    run(scenario())
    assert len(seen) == 1 and seen[0][1] == 400 and seen[0][2]


def test_framing_error_response_helper() -> None:
    bad = request("z9hG4bKh", content_length="-1")
    head = bad
    error = SipParseError("negative", 400, fatal=True)
    answer = framing_error_response(error, head)
    assert answer is not None and answer.startswith(b"SIP/2.0 400 ")
    assert b"Call-ID: z9hG4bKh@a.example.org" in answer
    big = SipParseError("too big", 413, fatal=True)
    answer = framing_error_response(big, request("z9hG4bKb", content_length="9999999"))
    assert answer is not None and answer.startswith(b"SIP/2.0 413 ")
    # A well-formed head (the framer refused it for its size only).
    ok = framing_error_response(SipParseError("long", 513, fatal=True), request("z9hG4bKo"))
    assert ok is not None and ok.startswith(b"SIP/2.0 513 ")
    assert framing_error_response(error, b"SIP/2.0 200 OK\r\nContent-Length: -1\r\n\r\n") is None
    assert framing_error_response(error, b"ACK sip:x SIP/2.0\r\n\r\n") is None
    assert framing_error_response(error, b"") is None
    assert framing_error_response(SipParseError("x", None, fatal=True), head) is None


def test_header_cap_closes_the_connection(run: Run) -> None:
    async def scenario() -> None:
        b, sink = await node(("tcp", "127.0.0.1"), options=TransportOptions(max_header=2048))
        try:
            reader, writer = await raw_client(b.listener("tcp"))
            writer.write(b"OPTIONS sip:x SIP/2.0\r\n" + b"X-Junk: " + b"a" * 4096)
            await writer.drain()
            assert await at_eof(reader)
            assert b.counters.framing_errors == 1 and sink.messages.empty()
            await close_writer(writer)
        finally:
            await b.close()

    run(scenario())


# -- caps, idle, backpressure -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "why"),
    [
        (TransportOptions(max_connections_per_ip=1), "connections per address"),
        (TransportOptions(max_connections=1), "connection limit 1 reached"),
    ],
)
def test_connection_caps(
    run: Run, caplog: pytest.LogCaptureFixture, options: TransportOptions, why: str
) -> None:
    async def scenario() -> None:
        b, _ = await node(("tcp", "127.0.0.1"), options=options)
        try:
            reader1, writer1 = await raw_client(b.listener("tcp"))
            writer1.write(b"\r\n\r\n")
            assert await asyncio.wait_for(reader1.readexactly(2), 2) == b"\r\n"
            reader2, writer2 = await raw_client(b.listener("tcp"))
            assert await at_eof(reader2)
            assert b.counters.connections_refused == 1 and b.connection_count() == 1
            # The first connection is unaffected.
            writer1.write(b"\r\n\r\n")
            assert await asyncio.wait_for(reader1.readexactly(2), 2) == b"\r\n"
            await close_writer(writer2)
            await close_writer(writer1)
        finally:
            await b.close()

    with caplog.at_level(logging.INFO, logger="freecall.transport"):
        run(scenario())
    refused = [r for r in caplog.records if r.getMessage().startswith("refused tcp connection")]
    assert len(refused) == 1
    assert "from 127.0.0.1:" in refused[0].getMessage() and why in refused[0].getMessage()


def test_idle_connections_are_closed_pinned_ones_kept(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        b, sink = await node(("tcp", "127.0.0.1"), options=TransportOptions(idle_timeout=0.2))
        try:
            idle_reader, idle_writer = await raw_client(b.listener("tcp"))
            reg_reader, reg_writer = await raw_client(b.listener("tcp"))
            reg_writer.write(request("z9hG4bKreg"))
            _, flow, _ = await sink.next()
            assert flow.conn is not None and b.keep_alive(flow.conn)  # carries a registration
            assert await at_eof(idle_reader)
            assert b.counters.connections_idle_closed == 1
            await asyncio.sleep(0.3)
            reg_writer.write(b"\r\n\r\n")  # still open
            assert await asyncio.wait_for(reg_reader.readexactly(2), 2) == b"\r\n"
            assert b.connection_count() == 1
            assert not b.keep_alive(12345)
            await close_writer(idle_writer)
            await close_writer(reg_writer)
        finally:
            await b.close()

    with caplog.at_level(logging.INFO, logger="freecall.transport"):
        run(scenario())
    assert any("idle for" in r.getMessage() for r in caplog.records)


def test_peer_that_does_not_read_is_dropped(run: Run) -> None:
    """Bounded write buffer: a peer that never reads cannot make the daemon buffer forever."""

    async def scenario() -> None:
        opts = TransportOptions(max_write_buffer=256 * 1024, write_high_water=16 * 1024)
        b, sink = await node(("tcp", "127.0.0.1"), options=opts)
        try:
            reader, writer = await raw_client(b.listener("tcp"), rcvbuf=4096)
            writer.write(request())
            _, flow, _ = await sink.next()
            chunk = b"x" * 16384
            for _ in range(2000):  # up to 32 MB; the cap hits long before
                b.send(chunk, flow)
                if not sink.errors.empty():
                    break
            assert await sink.error() == flow
            assert await at_eof(reader)
            await close_writer(writer)
        finally:
            await b.close()

    run(scenario())


# -- UDP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
def test_udp_large_datagram_and_listener_choice(run: Run, host: str) -> None:
    """Datagrams up to the UDP maximum arrive whole; replies leave from the named listener."""

    async def scenario() -> None:
        a, _ = await node(("udp", host), ("udp", host))
        b, b_sink = await node(("udp", host))
        try:
            second = a.listeners[1]
            big = request(body=b"a" * 60000)
            a.send(big, Flow("udp", b.listener("udp").addr, second.addr))
            data, flow, _ = await b_sink.next()
            assert data == big and flow.remote == second.addr
            assert needs_congestion_control(big, flow) and not needs_congestion_control(
                big, Flow("tcp", flow.remote)
            )
            assert not needs_congestion_control(b"x" * 1300, flow)
            assert needs_congestion_control(b"x" * 1301, flow, path_mtu=1500)
            assert a.supports("udp") and a.supports("tcp") and not a.supports("tls")
        finally:
            await a.close()
            await b.close()

    run(scenario())


# -- logging, timer, loop, close ----------------------------------------------------------------


def test_traces_only_at_debug_on_their_logger(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(edge_sink: list[tuple[SipTransport, Sink]]) -> None:
        a, _ = await node(("udp", "127.0.0.1"))
        b, sink = await node(("udp", "127.0.0.1"))
        try:
            a.send(request("z9hG4bKsecret", body=b"secret-body"), Flow("udp", b.listeners[0].addr))
            await sink.next()
        finally:
            await a.close()
            await b.close()
        edge_sink.append((a, sink))

    caplog.set_level(logging.INFO)
    run(scenario([]))
    assert not any("secret-body" in r.getMessage() for r in caplog.records)
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="freecall.sip.trace")
    run(scenario([]))
    traces = [r for r in caplog.records if "secret-body" in r.getMessage()]
    assert {r.name for r in traces} == {"freecall.sip.trace"}
    assert len(traces) == 2  # send and receive


def deadline_of(timer: Timer) -> float | None:
    return timer.deadline  # a call: mypy keeps no narrowing of the property across awaits


def test_timer_re_arms_one_call_at(run: Run) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        done = asyncio.Event()

        def on_timer(now: float) -> None:
            fired.append(now)
            done.set()

        timer = Timer(loop, on_timer)
        start = loop.time()
        timer.arm(start + 5)
        timer.arm(start + 0.05)  # the core's next deadline moved earlier
        timer.arm(start + 0.05)  # same deadline: nothing rescheduled
        assert timer.deadline == start + 0.05
        await asyncio.wait_for(done.wait(), 2)
        assert len(fired) == 1 and fired[0] >= start + 0.05 - 0.002  # uvloop: 1 ms clock
        assert deadline_of(timer) is None  # fired, so disarmed
        timer.arm(loop.time() + 0.01)
        timer.arm(None)  # no transaction left
        await asyncio.sleep(0.05)
        assert len(fired) == 1

    run(scenario())


def test_install_event_loop_policy() -> None:
    try:
        assert install_event_loop_policy() == "uvloop"
        assert isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
    finally:
        asyncio.set_event_loop_policy(None)


def test_close_is_clean(run: Run, certs: Certs) -> None:
    """close() with listeners, connections both ways and TLS: no task, socket or warning left."""

    async def scenario() -> float:
        tls: dict[str, Any] = {
            "server_ssl": server_context(certs.a_cert, certs.a_key),
            "client_ssl": client_context(certs.a_cert, certs.a_key),
        }
        specs = [(k, "127.0.0.1") for k in ("udp", "tcp", "tls")]
        a, _ = await node(*specs, **tls)
        b, b_sink = await node(*specs, **tls)
        reader, writer = await raw_client(b.listener("tcp"))  # an incoming connection B keeps
        for kind in ("udp", "tcp", "tls"):
            a.send(request(f"z9hG4bK{kind}"), Flow(kind, b.listener(kind).addr))
            await b_sink.next()
        a.send(request(), Flow("tcp", ("127.0.0.1", closed_port("127.0.0.1"))))  # connecting
        loop = asyncio.get_running_loop()
        start = loop.time()
        await a.close()
        await b.close()
        elapsed = loop.time() - start
        assert await at_eof(reader)
        await close_writer(writer)
        await a.close()  # idempotent
        a.send(b"late", Flow("udp", ("127.0.0.1", 9)))  # after close: no exception
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert a.connection_count() == 0 and b.connection_count() == 0
        assert b.counters.connections_open == {"udp": 0, "tcp": 0, "tls": 0}
        return elapsed

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        elapsed = run(scenario())
        gc.collect()
    assert elapsed < 2.5
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], caught


def test_start_failure_names_the_listener(run: Run) -> None:
    async def scenario() -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            edge = SipTransport(
                [ListenSpec("udp", "127.0.0.1", 0), ListenSpec("tcp", "127.0.0.1", port)],
                lambda data, flow, now: None,
            )
            with pytest.raises(OSError, match=f"cannot listen on .*tcp.*{port}"):
                await edge.start()
            assert asyncio.all_tasks() == {asyncio.current_task()}

    run(scenario())
    with pytest.raises(ValueError, match="TLS needs a server SSLContext"):
        SipTransport([ListenSpec("tls", "127.0.0.1", 0)], lambda data, flow, now: None)
