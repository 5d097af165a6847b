"""Mutation fuzzing over real sockets while a call is in progress (issue 11, item 3).

Two nodes (A 127.0.0.2 with alice, B 127.0.0.3 with bob, harness.calls' static pair) carry a
ZRTP call between two baresip phones. Meanwhile 100,000 mutants of the RFC 4475/5118 torture
messages and the RFC 3665 call flows (tests/harness/fuzz.py, seed ``FUZZ_SEED``) go to node B
over UDP (90% to the public listener, 10% to the softphone listener), 10,000 more over TCP
connections to the public listener and 5,000 over TLS connections to its TLS listener, each
connection closed once its mutant is sent; then 90 connections at once send the TLS listener a
ClientHello with bits flipped, one cut short, or random bytes, and must all be closed within
15 s (a flipped length field leaves the handshake waiting: the transport's 10 s TLS handshake
timeout ends it). The fuzzer sends from 127.0.0.50, which B's configuration
exempts from the rate limit (``security.rate_exempt``): otherwise the limiter (tests/interop/
test_scanners.py) would drop nearly everything after the first 200 messages, which is its job
but not what is tested here. Then: B answers OPTIONS, the call is still up with media flowing
both ways, B processed the messages (its ``freecall_sip_messages_received_total``), its log
has no traceback or error, and its RSS grew by less than ``RSS_GROWTH_MB``.

Every input that once crashed or hung the daemon is kept in tests/vectors/regressions/ and
replayed over UDP and TCP by ``test_regression_vectors_over_the_wire``.
"""

from __future__ import annotations

import contextlib
import random
import re
import select
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import Baresip, FreecallDaemon, Harness, wait_until
from harness.calls import USERS_A, USERS_B, phone, static_pair
from harness.fuzz import Mutator, seed_messages

FUZZ_SEED = 11
UDP_MESSAGES = 100_000
TCP_MESSAGES = 10_000
TLS_MESSAGES = 5_000
TLS_GARBAGE = 90  # connections to the TLS port that send a mangled handshake or no TLS at all
GARBAGE_SOURCES = ("127.0.0.60", "127.0.0.61", "127.0.0.62")  # 30 each: under the cap of 32
BACKLOG = 50_000  # bytes waiting in B's UDP sockets before the fuzzer waits
FUZZ_SOURCE = "127.0.0.50"
RSS_GROWTH_MB = 40
REGRESSIONS = Path(__file__).resolve().parents[1] / "vectors" / "regressions"


def _pair(harness: Harness) -> tuple[FreecallDaemon, FreecallDaemon]:
    """harness.calls.static_pair, with quieter logs and the fuzzer exempt on B."""
    pair = static_pair(
        harness, wait_control=True,
        config={"log": {"level": "info", "sip_trace": False}, "openpgp": {"sign": False}},
        b_config={"users": {"carol": {"password": "carol-pw"}},  # exists, never online
                  "security": {"rate_exempt": [f"{FUZZ_SOURCE}/32"]}})
    return pair.a, pair.b


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _framing_errors(node: FreecallDaemon) -> float:
    request = urllib.request.Request(node.control_url + "/metrics",
                                     headers={"Authorization": f"Bearer {node.token()}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    match = re.search(r'^freecall_sip_transport_errors_total\{kind="framing_errors"\} (\S+)$',
                      text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def options_answered(host: str, port: int, timeout: float = 2.0) -> bool:
    """One OPTIONS ping (from a fresh port): did a final answer come back in time?"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.51", 0))
        sock.settimeout(timeout)
        local = sock.getsockname()
        call_id = f"ping-{time.monotonic_ns()}"
        sock.sendto((
            f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {local[0]}:{local[1]};branch=z9hG4bK{call_id};rport\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:ping@elsewhere.test>;tag=p1\r\n"
            f"To: <sip:{host}:{port}>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n").encode(), (host, port))
        try:
            while True:
                data = sock.recv(65535)
                if call_id.encode() in data and data.startswith(b"SIP/2.0 200"):
                    return True
        except TimeoutError:
            return False


def udp_queue(port: int) -> tuple[int, int]:
    """(bytes waiting, datagrams dropped) of the UDP sockets bound to ``port``, from
    /proc/net/udp: how far behind the daemon is, and what the kernel threw away."""
    waiting = drops = 0
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            waiting += int(fields[4].split(":")[1], 16)
            drops += int(fields[-1])
    return waiting, drops


def _delivered(data: bytes) -> bool:
    """Whether the transport hands this datagram to the daemon's SIP intake (not empty, not a
    CRLF keep-alive, not STUN; transport.py ``_udp_received``)."""
    if not data or (data[0] in (0x0D, 0x0A) and not data.strip(b"\r\n")):
        return False
    return not (data[0] <= 3 and len(data) >= 20)


def fuzz_udp(mutator: Mutator, targets: list[tuple[str, int]], count: int,
             backlog: int = BACKLOG) -> int:
    """``count`` mutants, every tenth to ``targets[1]``, as fast as the daemon takes them:
    never more than ``backlog`` bytes waiting in its sockets, so the kernel drops nothing.
    Returns how many of them are SIP messages to the daemon (see ``_delivered``)."""
    delivered = 0
    ports = {port for _, port in targets}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((FUZZ_SOURCE, 0))
        sock.setblocking(False)
        for mutant in mutator.take(count):
            target = targets[1] if mutant.index % 10 == 9 else targets[0]
            delivered += _delivered(mutant.data)
            with contextlib.suppress(OSError):  # ECONNREFUSED from an ICMP
                sock.sendto(mutant.data, target)
            if mutant.index % 8 != 7:
                continue
            with contextlib.suppress(OSError):  # the answers: read and forget
                while sock.recv(65535):
                    pass
            while sum(udp_queue(port)[0] for port in ports) > backlog:
                time.sleep(0.0005)
    return delivered


def _send_reading(sock: socket.socket, data: bytes, timeout: float = 5.0) -> bool:
    """Send ``data`` while reading (and forgetting) the answers, as a peer must: the daemon
    stops reading a connection whose answers are not read (its write buffer is bounded).
    False when the connection was closed or made no progress for ``timeout`` seconds."""
    view = memoryview(data)
    while view:
        readable, writable, _ = select.select([sock], [sock], [], timeout)
        if not readable and not writable:
            return False
        try:
            if readable and not sock.recv(65535):
                return False  # closed by the daemon (a framing error closes the connection)
            if writable:
                view = view[sock.send(view):]
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            return False
    return True


def fuzz_tcp(mutator: Mutator, target: tuple[str, int], count: int) -> int:
    """``count`` mutants over TCP, each on its own connection (on a shared one, the first
    framing error closes it and the rest would never be read), half-closed after it so that
    a Content-Length promising more ends at once; returns the mutants the daemon answered."""
    answered = 0
    for mutant in mutator.take(count):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((FUZZ_SOURCE, 0))
            sock.settimeout(5.0)
            sock.connect(target)
            sock.setblocking(False)
            if not _send_reading(sock, mutant.data):
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            sock.setblocking(True)
            sock.settimeout(5.0)
            got = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65535):
                    got += chunk
            answered += got.startswith(b"SIP/2.0 ")
    return answered


def _tls_client() -> ssl.SSLContext:
    """A client that accepts the node's self-signed certificate, as a peer node does."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def fuzz_tls(mutator: Mutator, target: tuple[str, int], count: int) -> int:
    """``count`` mutants over TLS, each on its own connection (see ``fuzz_tcp``), closed once
    sent (TLS has no half-close; the daemon reads what came before the end of the stream).
    Every 20 mutants an OPTIONS over TLS must be answered: the daemon keeps up (and the
    fuzzer stays under its 32 connections per address). Returns the mutants sent whole."""
    context = _tls_client()
    sent = 0
    for mutant in mutator.take(count):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as raw:
            raw.bind((FUZZ_SOURCE, 0))
            raw.settimeout(5.0)
            raw.connect(target)
            with context.wrap_socket(raw) as sock, contextlib.suppress(OSError):
                sock.sendall(mutant.data)
                sent += 1
        if mutant.index % 20 == 19:
            assert tls_options_answered(context, target), f"no answer after mutant {mutant.index}"
    return sent


def tls_options_answered(context: ssl.SSLContext, target: tuple[str, int]) -> bool:
    with socket.create_connection(target, timeout=5.0, source_address=("127.0.0.51", 0)) as raw, \
            context.wrap_socket(raw) as sock:
        local = sock.getsockname()
        call_id = f"tls-ping-{time.monotonic_ns()}"
        sock.sendall((
            f"OPTIONS sip:{target[0]}:{target[1]};transport=tls SIP/2.0\r\n"
            f"Via: SIP/2.0/TLS {local[0]}:{local[1]};branch=z9hG4bK{call_id}\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:ping@elsewhere.test>;tag=p1\r\n"
            f"To: <sip:{target[0]}:{target[1]}>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n").encode())
        got = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in got and (chunk := sock.recv(65535)):
                got += chunk
        return got.startswith(b"SIP/2.0 200")


def garbage_handshakes(target: tuple[str, int], count: int, seed: int = FUZZ_SEED,
                       wait: float = 15.0) -> int:
    """``count`` connections at once (spread over GARBAGE_SOURCES, under the per-address
    connection cap) that send a real ClientHello with bits flipped, one cut short, or random
    bytes instead of TLS; returns how many the daemon closed within ``wait`` seconds. A flipped
    length field leaves the daemon waiting for bytes that never come: its TLS handshake
    timeout (10 s) must end those."""
    rng = random.Random(seed)
    hello = _client_hello(target)
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            kind = i % 3
            if kind == 0:
                data = bytearray(hello)
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                payload = bytes(data)
            elif kind == 1:
                payload = hello[:rng.randrange(1, len(hello))]
            else:
                payload = rng.randbytes(rng.randint(1, 2000))
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((GARBAGE_SOURCES[i % len(GARBAGE_SOURCES)], 0))
            sock.settimeout(5.0)
            sock.connect(target)
            with contextlib.suppress(OSError):
                sock.sendall(payload)
                if kind == 1:
                    sock.shutdown(socket.SHUT_WR)  # a cut-short hello, then the end
            sock.setblocking(False)
        closed = 0
        pending = set(socks)
        deadline = time.monotonic() + wait
        while pending and time.monotonic() < deadline:
            readable, _, _ = select.select(list(pending), [], [], 0.5)
            for sock in readable:
                try:
                    if sock.recv(65535):
                        continue  # an alert, say; the close comes next
                except BlockingIOError:
                    continue
                except OSError:
                    pass  # reset: closed too
                pending.discard(sock)
                closed += 1
        return closed
    finally:
        for sock in socks:
            sock.close()


def _client_hello(target: tuple[str, int]) -> bytes:
    """The first flight of a real TLS client (Python's ssl), captured through memory BIOs."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = _tls_client().wrap_bio(incoming, outgoing, server_hostname=target[0])
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.slow
def test_100k_mutants_over_udp_and_tcp_leave_the_daemon_and_the_call_intact(
    harness: Harness, baresip: Callable[..., Baresip]
) -> None:
    a, b = _pair(harness)
    alice = phone(baresip, a, "alice", USERS_A["alice"], "a.test", 440)
    bob = phone(baresip, b, "bob", USERS_B["bob"], "b.test", 880)
    alice.dial("sip:bob@b.test")
    alice.wait_event("CALL_ESTABLISHED", 15)
    bob.wait_event("CALL_ESTABLISHED", 5)
    [call] = wait_until(lambda: [c for c in b.api("GET", "/api/calls")
                                 if c["state"] == "active" and c["media"]
                                 and c["media"]["packets_in"] > 0] or None, 10,
                        message="B to see the call's media")
    assert b.process is not None
    pid = b.process.pid
    rss_before = _rss_kb(pid)
    received_before = b.metric("freecall_sip_messages_received_total")
    drops_before = udp_queue(b.public_port)[1] + udp_queue(b.sip_port)[1]

    mutator = Mutator(seed_messages("b.test", b.public_host, b.public_port), FUZZ_SEED)
    started = time.monotonic()
    delivered = fuzz_udp(mutator, [(b.public_host, b.public_port), ("127.0.0.1", b.sip_port)],
                         UDP_MESSAGES)
    udp_seconds = time.monotonic() - started
    drops = udp_queue(b.public_port)[1] + udp_queue(b.sip_port)[1] - drops_before
    tcp_answered = fuzz_tcp(mutator, (b.public_host, b.public_port), TCP_MESSAGES)
    tls_started = time.monotonic()
    tls_before = b.metric("freecall_sip_messages_received_total")
    tls_framing = _framing_errors(b)
    tls_sent = fuzz_tls(mutator, (b.public_host, b.tls_port), TLS_MESSAGES)
    tls_received = b.metric("freecall_sip_messages_received_total") - tls_before
    tls_framing = _framing_errors(b) - tls_framing
    tls_closed = garbage_handshakes((b.public_host, b.tls_port), TLS_GARBAGE)
    tls_seconds = time.monotonic() - tls_started
    seconds = time.monotonic() - started
    print(f"\n[fuzz] {UDP_MESSAGES} UDP ({delivered} SIP, {drops} dropped by the kernel) in "
          f"{udp_seconds:.1f} s, {TCP_MESSAGES} TCP ({tcp_answered} answered), "
          f"{tls_sent} TLS ({tls_received:.0f} messages and {tls_framing:.0f} framing errors "
          f"at B) and {TLS_GARBAGE} mangled handshakes "
          f"({tls_closed} closed by B) in {tls_seconds:.1f} s, {seconds:.1f} s in all")
    assert tls_closed == TLS_GARBAGE, tls_closed
    # the mutants reached the framer and the parser (some frame as several messages)
    assert tls_sent == TLS_MESSAGES and tls_received + tls_framing >= 0.7 * TLS_MESSAGES

    # alive, and not hanging: a ping is answered at once
    assert b.process.alive(), b.process.describe_exit()
    wait_until(lambda: options_answered(b.public_host, b.public_port), 10,
               message="B to answer OPTIONS after the fuzz")
    received = b.metric("freecall_sip_messages_received_total") - received_before
    print(f"[fuzz] B processed {received:.0f} messages")
    assert received >= 0.98 * delivered, (received, delivered)  # B read them (nearly) all
    # the call survived: still active on B, media still flowing both ways
    first = next(c for c in b.api("GET", "/api/calls") if c["id"] == call["id"])
    time.sleep(2.0)
    later = next(c for c in b.api("GET", "/api/calls") if c["id"] == call["id"])
    assert later["state"] == "active", later
    assert later["media"]["packets_in"] > first["media"]["packets_in"] + 50, (first, later)
    assert later["media"]["packets_out"] > first["media"]["packets_out"] + 50, (first, later)
    assert not bob.find_events("CALL_CLOSED") and not alice.find_events("CALL_CLOSED")
    # no unhandled exception, bounded memory
    log = b.log_text()
    for bad in ("Traceback", "Exception in callback", "Task exception", " ERROR "):
        assert bad not in log, log[log.find(bad) - 2000:log.find(bad) + 2000]
    growth_mb = (_rss_kb(pid) - rss_before) / 1024
    print(f"[fuzz] B's RSS grew by {growth_mb:.1f} MB")
    assert growth_mb < RSS_GROWTH_MB, growth_mb
    # and the call still ends cleanly
    alice.hangup()
    alice.wait_event("CALL_CLOSED", 5)
    bob.wait_event("CALL_CLOSED", 5)


def test_regression_vectors_over_the_wire(harness: Harness) -> None:
    """Each input that once crashed or hung a daemon, over UDP and TCP: B still answers."""
    vectors = sorted(REGRESSIONS.glob("*.sip"))
    assert vectors
    node = harness.daemon("b", users=USERS_B, domains=["b.test"], public_host="127.0.0.3",
                          config={"log": {"sip_trace": False}, "openpgp": {"sign": False}})
    target = (node.public_host, node.public_port)
    for path in vectors:
        data = path.read_bytes()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(data, target)
        with socket.create_connection(target, timeout=2) as tcp, \
                contextlib.suppress(OSError):
            tcp.sendall(data)
        assert options_answered(*target, timeout=1.0), path.name
    assert node.process is not None and node.process.alive()
    assert "Traceback" not in node.log_text()
