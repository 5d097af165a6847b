"""Media bridge throughput: N concurrent SRTP calls through freecall's bridge, against bare
forwarders doing the same libsrtp work, in the same run.

    .venv/bin/python bench/media.py                  # 350 calls, 10 s per phase (about 80 s)
    .venv/bin/python bench/media.py --calls 200 --seconds 5 --repeat 2
    .venv/bin/python bench/media.py --only bridge --only fwd-ssrc     # some phases, no ratios

Each call is G.711 (160-octet payload, one packet every 20 ms) in both directions::

    load process (2nd CPU)              worker process (1st CPU)
    phone A_i --RTP--> engine A: stream A_i --SRTP--> engine B: stream B_i --RTP--> phone B_i
    phone A_i <--RTP-- (protect/unprotect)   <--SRTP--  (unprotect/protect)  <--RTP-- phone B_i

Both engines run in the one worker process on one event loop (uvloop), so every packet is
bridged twice on that core: by A (RTP -> SRTP) and by B (SRTP -> RTP). One packet bridged by
one engine is a "hop", what a daemon does per packet; a call through one daemon is 100 hops a
second (50 each way). N calls here are 2N call-ends on the worker's core: N = 350 means 70,000
hops a second, the brief's 700 calls per core. ZRTP runs for real: every call starts at its
first media packet, calls join evenly over the ramp, each phone on its own 20 ms phase.

Phases, each with its own warm-up and measured window, the same load generator:

* ``direct``: phone A_i <-> phone B_i, no worker: the harness's own latency floor;
* ``bridge``: the chain above, with the secure per-packet path in C (``freecall.srtp._hop``,
  ``media.native: auto``) when the extension is built: the sockets read by C readers
  (``NativeDatagramTransport``, batches of ``recvmmsg``), the C hop run on their buffers;
* ``bridge-py``: the same with the Python handlers (``media.native: off``);
* ``fwd-call``: the bridge's topology (4 sockets per call, per-call keys) with nothing but
  ``protect``/``unprotect`` and ``sendto`` in each handler: what per-call sockets cost;
* ``fwd-one``: the ceiling of the brief: one uvloop datagram socket in, one out, ``protect`` per
  packet, chained to a second doing ``unprotect`` (the same two pylibsrtp calls per packet as
  the bridge chain), one SSRC and one key for all traffic.

``bridge-uv`` runs only when named: the C hop called by uvloop's own datagram transports
(the bridge before its sockets were read in C), to tell what the C readers are worth.
``bridge-shared`` too: the bridge with ``media.phone_socket: shared`` (one loopback RTP/RTCP
port pair per engine for every softphone, routed in C by source address).
Four more forwarders run only when named with ``--only``. Two measure a shared loopback
socket where everything runs in C: ``fwd-c`` (the bridge's four sockets per call read by C
readers, C hops and no other logic: the bridge's steady state) and ``fwd-cmux`` (the same with
one loopback socket per side shared by every call, routed in C by the phone's source
address). Two tell sockets from keys apart:

* ``fwd-mux``: ``fwd-call`` with one shared loopback socket per side (A, B), routed by the
  phone's source address: what sharing the softphone side's sockets would be worth;
* ``fwd-ssrc``: ``fwd-one``'s two sockets, but every phone keeps its own SSRC and key (routed
  by SSRC to its session) and the output goes to the other phone of its call: the ceiling for a
  bridge that shares sockets but, as it must, keys each call separately.

Printed per phase: packets per second offered, loss, one-way latency percentiles (payload
timestamps, phone to phone) and what the worker adds (minus ``direct``, per percentile), worker
CPU and CPU per hop, hops per CPU-second ("per core"), the worker's event-loop lag, and how busy
the rest of the machine was (other tenants skew latency). Then the bridge's rate as a fraction
of each forwarder's, calls per core, and ZRTP time from first media packet to secure.
``--repeat R`` runs the worker phases R times, interleaved, and keeps each phase's run with the
least CPU per hop (the least disturbed by other load).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import math
import multiprocessing as mp
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import pylibsrtp
import uvloop

from freecall.srtp.bridge import NATIVE_AVAILABLE, MediaEngine
from freecall.srtp.keys import RetainedSecrets

FRAME = 160
HEADER = struct.Struct("!BBHII")
STAMP = struct.Struct("!IBxxxIq")  # call, direction, per-phone seq, send time (ns)
FILL = bytes(range(FRAME - STAMP.size))
BIG_BUFFER = 4 << 20
POINTS = (50.0, 90.0, 99.0, 99.9)
PHASES = ("bridge", "bridge-py", "fwd-call", "fwd-one")
SATURATED = 90.0  # worker CPU %, past which a phase's figures describe a saturated core
HZ = os.sysconf("SC_CLK_TCK")

Schedule = tuple[float, float, float, float, float]  # start, ramp, t0, t1, drain (monotonic)


# ---------------------------------------------------------------------------------------------
# helpers


RT_PRIORITY = 0  # set from --rt in main(), inherited by the forked processes


def pin(cpu: int | None) -> str:
    """Pin this process to ``cpu`` and, with --rt, run it SCHED_FIFO (shielded from neighbours)."""
    where = "unpinned"
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
            where = f"cpu{cpu}"
        except (OSError, AttributeError):
            pass
    if RT_PRIORITY:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
            where += " SCHED_FIFO"
        except (OSError, AttributeError):
            where += " (no SCHED_FIFO: not permitted)"
    return where


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy since boot (all CPUs, /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / HZ


def big_buffers(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    with socket.socket(fileno=os.dup(sock.fileno())) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BIG_BUFFER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BIG_BUFFER)


def percentiles(values: array.array[int], points: tuple[float, ...], scale: float) -> list[float]:
    if not values:
        return [math.nan for _ in points]
    ordered = sorted(values)
    n = len(ordered)
    return [ordered[min(n - 1, int(p / 100 * n))] / scale for p in points]


async def at(when: float) -> None:
    """Sleep until monotonic time ``when``."""
    await asyncio.sleep(max(0.0, when - time.monotonic()))


class Window:
    """CPU of this process and a probe, sampled at t0 and t1; event-loop lag meanwhile."""

    def __init__(self, probe: Callable[[], int], readers: list[Any] | None = None) -> None:
        self.probe = probe
        self.readers = readers or []  # C readers (NativeDatagramTransport.reader) to count
        self.cpu = 0.0
        self.count = 0
        self.reads = [0, 0, 0]  # the readers' wake-ups, recvmmsg calls, datagrams
        self.lags: array.array[int] = array.array("q")

    def _reads(self) -> list[int]:
        return [sum(r.stats[k] for r in self.readers) for k in range(3)]

    async def run(self, t0: float, t1: float) -> None:
        await at(t0)
        cpu0, n0, reads0 = cpu_seconds(), self.probe(), self._reads()
        while time.monotonic() < t1:
            before = time.perf_counter_ns()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter_ns() - before - 1_000_000)
        self.cpu = cpu_seconds() - cpu0
        self.count = self.probe() - n0
        self.reads = [b - a for a, b in zip(reads0, self._reads(), strict=True)]

    def result(self) -> dict[str, Any]:
        lag = percentiles(self.lags, (50.0, 99.0, 100.0), 1e6)
        return {"cpu": self.cpu, "hops": self.count, "lag_ms": lag, "reads": self.reads}


# ---------------------------------------------------------------------------------------------
# The load generator (phones), in its own process


class PhoneProto(asyncio.DatagramProtocol):
    def __init__(self, load: Load) -> None:
        self.load = load
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        big_buffers(transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.perf_counter_ns()
        load = self.load
        try:
            stamp = STAMP.unpack_from(data, 12)[3]
        except struct.error:
            return
        if load.t0_ns <= stamp < load.t1_ns:
            load.received_in_window += 1
            load.latencies.append(now - stamp)


@dataclass
class PhoneState:
    proto: PhoneProto
    call: int
    direction: int  # 0: A's phone, 1: B's phone
    ssrc: int
    start_ms: int = 0
    target: tuple[str, int] = ("127.0.0.1", 0)
    seq: int = 0

    @property
    def port(self) -> int:
        assert self.proto.transport is not None
        return int(self.proto.transport.get_extra_info("sockname")[1])


class Load:
    """2N phones sending on a 1 ms tick, each every 20 ms from its own start and phase."""

    def __init__(self, calls: int) -> None:
        self.calls = calls
        self.phones: list[PhoneState] = []
        self.t0_ns = self.t1_ns = 0
        self.sent_in_window = 0
        self.received_in_window = 0
        self.latencies: array.array[int] = array.array("q")
        self.single_ssrc = False
        self.cpu = 0.0

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for call in range(self.calls):
            for direction in (0, 1):
                _, proto = await loop.create_datagram_endpoint(
                    lambda: PhoneProto(self), local_addr=("127.0.0.1", 0)
                )
                self.phones.append(
                    PhoneState(proto, call, direction, 0x10000 + 2 * call + direction)
                )

    async def run(self, sched: Schedule) -> None:
        start, ramp, t0, t1, drain = sched
        offset_ns = time.perf_counter_ns() - int(time.monotonic() * 1e9)
        self.t0_ns, self.t1_ns = int(t0 * 1e9) + offset_ns, int(t1 * 1e9) + offset_ns
        buckets: list[list[PhoneState]] = [[] for _ in range(20)]
        for i, p in enumerate(self.phones):
            joined = int(ramp * 1000 * p.call / max(1, self.calls))
            p.start_ms = joined - joined % 20 + (i * 7) % 20  # phases spread evenly
            buckets[p.start_ms % 20].append(p)

        async def cpu_window() -> None:
            await at(t0)
            before = cpu_seconds()
            await at(t1)
            self.cpu = cpu_seconds() - before

        window = asyncio.ensure_future(cpu_window())
        await at(start)
        start_ns = int(start * 1e9) + offset_ns
        done_ms, end_ms = -1, int((t1 - start) * 1000)
        packet = bytearray(12 + FRAME)
        packet[12 + STAMP.size :] = FILL
        single, global_seq = self.single_ssrc, 0
        while done_ms < end_ms:
            now_ms = min((time.perf_counter_ns() - start_ns) // 1_000_000, end_ms)
            for ms in range(done_ms + 1, now_ms + 1):
                for p in buckets[ms % 20]:
                    if p.start_ms > ms:
                        continue
                    if single:  # one SRTP stream for everything (fwd-one)
                        seq, ssrc, global_seq = global_seq, 0x5EED, (global_seq + 1) & 0xFFFF
                    else:
                        seq, ssrc = p.seq & 0xFFFF, p.ssrc
                    stamp = time.perf_counter_ns()
                    HEADER.pack_into(packet, 0, 0x80, 0, seq, (p.seq * FRAME) & 0xFFFFFFFF, ssrc)
                    STAMP.pack_into(packet, 12, p.call, p.direction, p.seq, stamp)
                    p.seq += 1
                    assert p.proto.transport is not None
                    p.proto.transport.sendto(bytes(packet), p.target)
                    if self.t0_ns <= stamp < self.t1_ns:
                        self.sent_in_window += 1
            done_ms = max(done_ms, now_ms)
            await asyncio.sleep(0.001)
        await window
        await asyncio.sleep(drain)


def load_main(conn: Connection, calls: int, cpu: int | None) -> None:
    where = pin(cpu)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    load = Load(calls)
    loop.run_until_complete(load.open())
    conn.send(("ports", [p.port for p in load.phones], where))
    while True:
        msg = conn.recv()
        if msg[0] == "quit":
            break
        _, mode, targets, sched = msg
        load.sent_in_window = load.received_in_window = 0
        load.latencies = array.array("q")
        load.single_ssrc = mode == "fwd-one"
        for i, p in enumerate(load.phones):
            p.seq = 0
            port = load.phones[i ^ 1].port if mode == "direct" else targets[i]
            p.target = ("127.0.0.1", port)
        loop.run_until_complete(load.run(sched))
        conn.send(
            (
                "result",
                {
                    "sent": load.sent_in_window,
                    "received": load.received_in_window,
                    "latencies": load.latencies.tobytes(),
                    "cpu": load.cpu,
                },
            )
        )
    loop.close()


# ---------------------------------------------------------------------------------------------
# Workers: the two bridge engines, or a bare forwarder


def bridge_main(
    conn: Connection, calls: int, cpu: int | None, first_port: int, native: bool,
    read_in_c: bool = True, shared: bool = False,
) -> None:
    where = pin(cpu)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    span = calls * 8 + 16  # two port pairs per stream
    engines = [
        MediaEngine(
            loop,
            address="127.0.0.1",
            port_range=(first_port + k * span, first_port + (k + 1) * span - 1),
            retained_secrets=RetainedSecrets(None),
            zrtp_timeout=30.0,
            rtp_timeout=None,
            native=native,
            native_reader=read_in_c,
            phone_socket="shared" if shared else "per-stream",
        )
        for k in (0, 1)
    ]

    async def setup() -> list[Any]:
        pairs = []
        for _ in range(calls):
            a, b = await engines[0].allocate(), await engines[1].allocate()
            a.set_remote(b.local_network_rtp, zrtp_hash=b.zrtp_hash_attribute)
            b.set_remote(a.local_network_rtp, zrtp_hash=a.zrtp_hash_attribute)
            pairs.append((a, b))  # no start(): ZRTP begins with the first media packet
        return pairs

    pairs = loop.run_until_complete(setup())
    targets = [
        port for a, b in pairs for port in (a.local_softphone_rtp[1], b.local_softphone_rtp[1])
    ]
    conn.send(("targets", targets, where))
    _, phone_ports, sched = conn.recv()
    for i, (a, b) in enumerate(pairs):
        a.set_softphone_target(("127.0.0.1", phone_ports[2 * i]))
        b.set_softphone_target(("127.0.0.1", phone_ports[2 * i + 1]))
    streams = [s for e in engines for s in e.streams]

    def hops() -> int:
        for s in streams:
            s.sync_counters()  # what the C hops counted
        return sum(s.net_rtp_out + s.phone_rtp_out for s in streams)

    readers = [  # NativeDatagramTransport's: only where the sockets are read in C
        reader
        for s in streams
        for ep in (s._phone_rtp_ep, s._net_rtp_ep, s._phone_rtcp_ep, s._net_rtcp_ep)
        if (reader := getattr(ep.transport, "reader", None)) is not None
        and not (shared and ep in (s._phone_rtp_ep, s._phone_rtcp_ep))
    ] + [  # the shared softphone sockets' (bridge-shared), counted once
        reader
        for e in engines if e._shared is not None
        for router in (e._shared.rtp, e._shared.rtcp)
        if (reader := getattr(router.transport, "reader", None)) is not None
    ]
    window = Window(hops, readers)
    secure_at_t0 = 0

    async def measure() -> None:
        nonlocal secure_at_t0
        task = asyncio.ensure_future(window.run(sched[2], sched[3]))
        await at(sched[2])
        secure_at_t0 = sum(s.secure for s in streams)
        await task
        await asyncio.sleep(sched[4])

    loop.run_until_complete(measure())
    zrtp_ms = [
        (s.secure_at - min(t for t in (s.first_media_at, s.started_at) if t is not None)) * 1000
        for s in streams
        if s.secure_at is not None
    ]
    totals = [e.stats()["totals"] for e in engines]
    result = window.result()
    result.update(
        native=sum(bool(s.stats()["native"]) for s in streams),
        readers=len(readers),
        secure_at_t0=secure_at_t0,
        streams=len(streams),
        zrtp_ms=zrtp_ms,
        errors={k: sum(t[k] for t in totals) for k in ("auth_failures", "replays", "send_errors")}
        | {"phone_unrouted": sum(e.stats()["phone_unrouted"] for e in engines)},
    )
    conn.send(("result", result))
    for engine in engines:
        engine.close()
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()


class Bare(asyncio.DatagramProtocol):
    """In, one pylibsrtp call, out: nothing else."""

    def __init__(self, process: Callable[[bytes], bytes]) -> None:
        self.process = process
        self.out: Callable[[bytes, tuple[str, int]], None] | None = None
        self.target = ("127.0.0.1", 0)
        self.transport: asyncio.DatagramTransport | None = None
        self.count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            out = self.process(data)
        except pylibsrtp.Error:
            return
        self.out(out, self.target)  # type: ignore[misc]
        self.count += 1

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])


def _sessions(key: bytes) -> tuple[pylibsrtp.Session, pylibsrtp.Session]:
    tx = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    rx = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND)
    return pylibsrtp.Session(tx), pylibsrtp.Session(rx)


async def _bare(process: Callable[[bytes], bytes], big: bool = False) -> Bare:
    loop = asyncio.get_running_loop()
    proto = Bare(process)
    transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=("127.0.0.1", 0))
    if big:
        big_buffers(transport)
    return proto


class CEnd(asyncio.DatagramProtocol):
    """A socket read in C (fwd-c, fwd-cmux): ``datagram_received`` is set to a C hop."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        pass  # not routed: dropped

    @property
    def fd(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("socket").fileno())

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        return ("127.0.0.1", int(self.transport.get_extra_info("sockname")[1]))


def c_forwarder(
    loop: asyncio.AbstractEventLoop, calls: int, shared: bool
) -> tuple[list[int], Callable[[list[int]], list[Any]], list[Any]]:
    """fwd-c: the bridge's four sockets per call read in C, C hops and nothing else; fwd-cmux:
    the same with one shared loopback socket per side, routed by the phone's source address
    in C (``Reader(routes=...)``). Returns the phones' targets and what makes the hops."""
    from freecall.srtp import _hop
    from freecall.srtp.native_udp import NativeDatagramTransport
    from freecall.srtp.srtp_policy import srtp_pointers

    readers = []

    def end(routes: dict[int, Any] | None = None) -> CEnd:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        ep = CEnd()
        transport = NativeDatagramTransport(loop, sock, ep, batch=32 if shared else 16,
                                            limit=256 if shared else 64, routes=routes)
        readers.append(transport.reader)
        if routes is not None:
            big_buffers(ep.transport)  # type: ignore[arg-type]
        return ep

    routes: list[dict[int, Any]] = [{}, {}]
    muxes = [end(routes[0]), end(routes[1])] if shared else []
    ends = []
    for _ in range(calls):
        a_phone, b_phone = (muxes[0], muxes[1]) if shared else (end(), end())
        ends.append((a_phone, end(), b_phone, end(), _sessions(os.urandom(30)),
                     _sessions(os.urandom(30))))

    def hop(sess: pylibsrtp.Session, name: str, via: CEnd, to: tuple[str, int]) -> Any:
        pointers = srtp_pointers(sess, name)
        assert pointers is not None
        return _hop.Hop(sess, *pointers, via.fd, to, lambda d, a: None,
                        unprotect=name == "unprotect")

    def go(phone_ports: list[int]) -> list[Any]:
        hops = []
        for i, (a_phone, a_net, b_phone, b_net, (a_tx, b_rx), (b_tx, a_rx)) in enumerate(ends):
            phone_a = ("127.0.0.1", phone_ports[2 * i])
            phone_b = ("127.0.0.1", phone_ports[2 * i + 1])
            a_out = hop(a_tx, "protect", a_net, b_net.address)
            b_out = hop(b_tx, "protect", b_net, a_net.address)
            a_in = hop(a_rx, "unprotect", a_phone, phone_a)
            b_in = hop(b_rx, "unprotect", b_phone, phone_b)
            if shared:
                routes[0][_hop.route_key(phone_a)] = a_out
                routes[1][_hop.route_key(phone_b)] = b_out
            else:
                a_phone.datagram_received = a_out  # type: ignore[method-assign]
                b_phone.datagram_received = b_out  # type: ignore[method-assign]
            a_net.datagram_received, b_net.datagram_received = a_in, b_in  # type: ignore[method-assign]
            hops += [a_out, b_out, a_in, b_in]
        return hops

    targets = (
        [muxes[0].address[1], muxes[1].address[1]] * calls
        if shared
        else [port for e in ends for port in (e[0].address[1], e[2].address[1])]
    )
    return targets, go, readers


class Mux(asyncio.DatagramProtocol):
    """One socket for every call's loopback side, routed by the phone's source address."""

    def __init__(self) -> None:
        self.routes: dict[Any, tuple[Callable[[bytes], bytes], Any, tuple[str, int]]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        big_buffers(transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        route = self.routes.get(addr)
        if route is None:
            return
        process, out, target = route
        try:
            data = process(data)
        except pylibsrtp.Error:
            return
        out(data, target)
        self.count += 1


class BySsrc(asyncio.DatagramProtocol):
    """One socket for every call, routed by the packet's SSRC to that call's key and target."""

    def __init__(self) -> None:
        self.routes: dict[int, tuple[Callable[[bytes], bytes], tuple[str, int]]] = {}
        self.out: Callable[[bytes, tuple[str, int]], None] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        big_buffers(transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        route = self.routes.get(int.from_bytes(data[8:12], "big"))
        if route is None:
            return
        process, target = route
        try:
            data = process(data)
        except pylibsrtp.Error:
            return
        self.out(data, target)  # type: ignore[misc]
        self.count += 1


def forwarder_main(conn: Connection, calls: int, cpu: int | None, mode: str) -> None:
    where = pin(cpu)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    handlers: list[Bare] = []
    muxes: list[Mux] = []
    per_call = mode in ("fwd-call", "fwd-mux")
    by_ssrc: list[BySsrc] = []

    async def one() -> list[int]:
        # fwd-one: protect (socket P) -> unprotect (socket U) -> phone 0 of the load process
        tx, rx = _sessions(os.urandom(30))
        p, u = await _bare(tx.protect, big=True), await _bare(rx.unprotect, big=True)
        out_p, out_u = await _bare(tx.protect, big=True), await _bare(tx.protect, big=True)
        assert out_p.transport is not None and out_u.transport is not None
        p.out, p.target = out_p.transport.sendto, ("127.0.0.1", u.port)
        u.out = out_u.transport.sendto
        handlers.extend((p, u))
        return [p.port] * (2 * calls)

    async def per_call_setup() -> list[int]:
        # fwd-call: the bridge's four sockets per call, each handler bare
        targets = []
        for _ in range(calls):
            a_tx, b_rx = _sessions(os.urandom(30))
            b_tx, a_rx = _sessions(os.urandom(30))
            a_phone, a_net = await _bare(a_tx.protect), await _bare(a_rx.unprotect)
            b_phone, b_net = await _bare(b_tx.protect), await _bare(b_rx.unprotect)
            for h, via, to in (
                (a_phone, a_net, b_net),
                (b_phone, b_net, a_net),
                (a_net, a_phone, None),
                (b_net, b_phone, None),
            ):
                assert via.transport is not None
                h.out = via.transport.sendto
                if to is not None:
                    h.target = ("127.0.0.1", to.port)
            handlers.extend((a_phone, a_net, b_phone, b_net))
            targets += [a_phone.port, b_phone.port]
        return targets

    async def mux_setup() -> list[int]:
        # fwd-mux: fwd-call with one shared loopback socket per side (A, B) for all calls
        for _ in range(2):
            _, mux = await loop.create_datagram_endpoint(Mux, local_addr=("127.0.0.1", 0))
            muxes.append(mux)
        await per_call_setup()
        ports = [int(m.transport.get_extra_info("sockname")[1]) for m in muxes]  # type: ignore[union-attr]
        return ports * calls

    async def ssrc_setup() -> list[int]:
        # fwd-ssrc: fwd-one's sockets, but each phone's own SSRC and key, routed by SSRC
        for _ in range(2):
            _, proto = await loop.create_datagram_endpoint(BySsrc, local_addr=("127.0.0.1", 0))
            by_ssrc.append(proto)
        p, u = by_ssrc
        out_p, out_u = await _bare(lambda d: d, big=True), await _bare(lambda d: d, big=True)
        assert out_p.transport is not None and out_u.transport is not None
        p.out, u.out = out_p.transport.sendto, out_u.transport.sendto
        assert u.transport is not None
        u_addr = ("127.0.0.1", int(u.transport.get_extra_info("sockname")[1]))
        for i in range(2 * calls):
            tx, rx = _sessions(os.urandom(30))
            ssrc = 0x10000 + i  # PhoneState.ssrc of phone i
            p.routes[ssrc] = (tx.protect, u_addr)
            u.routes[ssrc] = (rx.unprotect, ("127.0.0.1", 0))  # the phone: set at "go"
        assert p.transport is not None
        return [int(p.transport.get_extra_info("sockname")[1])] * (2 * calls)

    c_hops: list[Any] = []
    readers: list[Any] = []
    if mode in ("fwd-c", "fwd-cmux"):
        targets, make_hops, readers = c_forwarder(loop, calls, mode == "fwd-cmux")
    else:
        setup = {
            "fwd-one": one,
            "fwd-call": per_call_setup,
            "fwd-mux": mux_setup,
            "fwd-ssrc": ssrc_setup,
        }[mode]
        targets = loop.run_until_complete(setup())
    conn.send(("targets", targets, where))
    _, phone_ports, sched = conn.recv()
    if mode in ("fwd-c", "fwd-cmux"):
        c_hops = make_hops(phone_ports)
    elif per_call:
        for i in range(calls):
            a_phone, a_net, b_phone, b_net = handlers[4 * i : 4 * i + 4]
            phone_a, phone_b = (
                ("127.0.0.1", phone_ports[2 * i]),
                ("127.0.0.1", phone_ports[2 * i + 1]),
            )
            a_net.target, b_net.target = phone_a, phone_b
            if muxes:
                a_mux, b_mux = muxes[0].transport, muxes[1].transport
                assert a_mux is not None and b_mux is not None
                assert a_net.transport is not None and b_net.transport is not None
                muxes[0].routes[phone_a] = (
                    a_phone.process,
                    a_net.transport.sendto,
                    ("127.0.0.1", b_net.port),
                )
                muxes[1].routes[phone_b] = (
                    b_phone.process,
                    b_net.transport.sendto,
                    ("127.0.0.1", a_net.port),
                )
                a_net.out, b_net.out = a_mux.sendto, b_mux.sendto
    elif by_ssrc:
        u = by_ssrc[1]
        for i in range(2 * calls):  # to the other phone of the call, as the bridge does
            u.routes[0x10000 + i] = (u.routes[0x10000 + i][0], ("127.0.0.1", phone_ports[i ^ 1]))
    else:
        handlers[1].target = ("127.0.0.1", phone_ports[0])  # one sink
    window = Window(
        lambda: (
            sum(h.count for h in handlers)
            + sum(m.count for m in muxes)
            + sum(b.count for b in by_ssrc)
            + sum(h.counters[2] for h in c_hops)
        ),
        readers,
    )

    async def measure() -> None:
        await window.run(sched[2], sched[3])
        await asyncio.sleep(sched[4])

    loop.run_until_complete(measure())
    conn.send(("result", window.result()))
    loop.close()


# ---------------------------------------------------------------------------------------------
# Orchestration and report


@dataclass
class Phase:
    name: str
    pps: float
    loss: float
    lat: list[float]
    seconds: float
    load_cpu: float = 0.0
    other_cpu: float = math.nan
    worker: dict[str, Any] = field(default_factory=dict)

    @property
    def hops(self) -> int:
        return int(self.worker.get("hops", 0))

    @property
    def worker_cpu(self) -> float:
        return float(self.worker.get("cpu", math.nan))

    @property
    def us_per_hop(self) -> float:
        return 1e6 * self.worker_cpu / self.hops if self.hops else math.nan

    @property
    def hops_per_cpu_second(self) -> float:
        return self.hops / self.worker_cpu if self.hops and self.worker_cpu > 0 else math.nan


def run_phase(
    name: str, load: Connection, args: argparse.Namespace, cpus: list[int | None]
) -> Phase:
    ctx = mp.get_context("fork")
    worker_conn: Connection | None = None
    targets: list[int] | None = None
    proc = None
    if name != "direct":
        worker_conn, child = ctx.Pipe()
        if name in ("bridge", "bridge-py", "bridge-uv", "bridge-shared"):
            target: Any = bridge_main
            wargs: tuple[Any, ...] = (
                child, args.calls, cpus[0], args.first_port, name != "bridge-py",
                name in ("bridge", "bridge-shared"), name == "bridge-shared")
        else:
            target, wargs = forwarder_main, (child, args.calls, cpus[0], name)
        proc = ctx.Process(target=target, args=wargs)
        proc.start()
        _, targets, _ = worker_conn.recv()  # set up: sockets bound
    start = time.monotonic() + 0.5
    t0 = start + args.ramp + args.warmup
    sched: Schedule = (start, args.ramp, t0, t0 + args.seconds, 0.5)
    load.send(("run", name, targets, sched))
    if worker_conn is not None:
        worker_conn.send(("go", args.phone_ports, sched))
    time.sleep(max(0.0, t0 - time.monotonic()))
    busy0 = machine_busy_seconds()
    time.sleep(max(0.0, sched[3] - time.monotonic()))
    busy = machine_busy_seconds() - busy0
    _, res = load.recv()
    lat: array.array[int] = array.array("q")
    lat.frombytes(res["latencies"])
    sent, received = res["sent"], res["received"]
    phase = Phase(
        name,
        pps=sent / args.seconds,
        loss=1 - received / sent if sent else math.nan,
        lat=percentiles(lat, POINTS, 1e6),
        seconds=args.seconds,
        load_cpu=res["cpu"],
    )
    if worker_conn is not None and proc is not None:
        _, phase.worker = worker_conn.recv()
        proc.join()
    own = phase.load_cpu + (phase.worker_cpu if worker_conn is not None else 0.0)
    phase.other_cpu = max(0.0, busy - own)
    return phase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--calls", type=int, default=350, help="concurrent calls (default 350)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per phase")
    parser.add_argument("--ramp", type=float, default=None, help="call arrival span (s)")
    parser.add_argument("--warmup", type=float, default=1.5, help="after the ramp (s)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each worker phase")
    parser.add_argument("--first-port", type=int, default=30000, help="bridge media ports")
    parser.add_argument(
        "--only",
        choices=(*PHASES, "bridge-uv", "bridge-shared", "fwd-mux", "fwd-ssrc", "fwd-c",
                 "fwd-cmux"),
        action="append",
        help="worker phases to run (repeatable; default: bridge, bridge-py, fwd-call, fwd-one;"
        " ratios are printed when those four ran; bridge-uv, bridge-shared, fwd-mux, fwd-ssrc,"
        " fwd-c and fwd-cmux run only when named)",
    )
    parser.add_argument(
        "--rt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run worker and load SCHED_FIFO (default; other tenants then skew latency less)",
    )
    args = parser.parse_args(argv)
    global RT_PRIORITY
    RT_PRIORITY = 10 if args.rt else 0
    if args.ramp is None:
        args.ramp = max(1.0, args.calls / 100)
    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cpus: list[int | None] = [mine[0], mine[1]] if len(mine) >= 2 else [None, None]

    ctx = mp.get_context("fork")
    load_conn, load_child = ctx.Pipe()
    load_proc = ctx.Process(target=load_main, args=(load_child, args.calls, cpus[1]))
    load_proc.start()
    _, args.phone_ports, load_where = load_conn.recv()
    print(
        f"media bench: {args.calls} calls x 2 directions x 50 pps (G.711, 20 ms), "
        f"{args.seconds:g} s measured per phase after {args.ramp:g} s ramp + {args.warmup:g} s "
        "warm-up; "
        f"bridge hop in {'C' if NATIVE_AVAILABLE else 'Python (freecall.srtp._hop not built)'}; "
        f"{os.cpu_count()} CPUs, load on {load_where}, worker alike; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    direct = run_phase("direct", load_conn, args, cpus)
    runs: dict[str, list[Phase]] = {name: [] for name in args.only or PHASES}
    for _ in range(args.repeat):
        for name, done in runs.items():
            phase = run_phase(name, load_conn, args, cpus)
            done.append(phase)
            wakeups, reads, datagrams = phase.worker.get("reads") or (0, 0, 0)
            batches = (
                f", C readers: {datagrams / wakeups:.2f} datagrams and {reads / wakeups:.2f}"
                " recvmmsg per wake-up" if wakeups else ""
            )
            print(
                f"  {name:9} {phase.us_per_hop:6.2f} us/hop, loss {100 * phase.loss:.3f}%, "
                f"other load {phase.other_cpu / args.seconds:.2f} CPUs{batches}",
                flush=True,
            )
    load_conn.send(("quit",))
    load_proc.join()
    best = {name: min(r, key=lambda p: p.us_per_hop) for name, r in runs.items()}
    if not all(name in best for name in PHASES):
        report_table(args, [direct, *best.values()])
        if "fwd-one" in best:
            one = best["fwd-one"].hops_per_cpu_second
            for name, p in best.items():
                if name != "fwd-one" and "native" in p.worker:
                    added = p.lat[2] - direct.lat[2]
                    print(f"{name} / fwd-one: {p.hops_per_cpu_second / one:.2f}x, added p99 "
                          f"{added:.2f} ms, errors {p.worker.get('errors')}")
        return 0
    report(args, direct, best)
    return 0


def report_table(args: argparse.Namespace, phases: list[Phase]) -> None:
    print()
    print(
        f"{'phase':9} {'pkt/s':>7} {'loss %':>7} {'p50 ms':>7} {'p90':>7} {'p99':>7} {'p99.9':>7}"
        f" {'hops/s':>7} {'cpu %':>6} {'us/hop':>7} {'hops/cpu-s':>10} {'lag p99':>8}"
        f" {'others':>7}"
    )
    saturated = False
    for p in phases:
        hops_s = p.hops / args.seconds if p.hops else math.nan
        cpu_pct = 100 * p.worker_cpu / args.seconds
        lag = p.worker.get("lag_ms", [math.nan] * 3)[1]
        mark = "*" if cpu_pct >= SATURATED else " "
        saturated = saturated or mark == "*"
        print(
            f"{p.name:8}{mark} {p.pps:7.0f} {100 * p.loss:7.3f} "
            + " ".join(f"{v:7.3f}" for v in p.lat)
            + f" {hops_s:7.0f} {cpu_pct:6.1f} {p.us_per_hop:7.2f} {p.hops_per_cpu_second:10.0f}"
            f" {lag:8.2f} {p.other_cpu / args.seconds:6.2f}c"
        )
    print(
        "(latency is one-way phone to phone; 'others' = CPUs' worth of load on the machine that"
        " is neither worker nor load generator)"
    )
    if saturated:
        print(
            f"(* worker at {SATURATED:g} % or more of its core: saturated. Its us/hop is then the "
            "share of the core the offered load took, lowered by reading bigger batches, not what "
            "a hop costs with room to spare, and its latency is queueing)"
        )


def report(args: argparse.Namespace, direct: Phase, best: dict[str, Phase]) -> None:
    report_table(args, [direct, *best.values()])
    bridge, fwd_call, fwd_one = best["bridge"], best["fwd-call"], best["fwd-one"]
    bridge_py = best["bridge-py"]
    print()
    for p in (bridge, bridge_py, fwd_call, fwd_one):
        added = [v - d for v, d in zip(p.lat, direct.lat, strict=True)]
        text = ", ".join(f"p{q:g} {v:.3f}" for q, v in zip(POINTS, added, strict=True))
        print(f"latency added by {p.name:8} (2 hops, minus direct): {text} ms")
    rate = bridge.hops_per_cpu_second
    print(
        f"bridge: {rate:,.0f} hops per CPU-second = {rate / 100:,.0f} calls per core "
        f"(100 packets/s each through one daemon)"
    )
    ratio_one = rate / fwd_one.hops_per_cpu_second
    ratio_call = rate / fwd_call.hops_per_cpu_second
    print(
        f"bridge / fwd-one (the ceiling): {ratio_one:.2f}x; bridge / fwd-call (same sockets "
        f"and keys per call, no logic): {ratio_call:.2f}x"
    )
    rate_py = bridge_py.hops_per_cpu_second
    print(
        f"bridge hop in C on {bridge.worker.get('native')}/{bridge.worker.get('streams')} "
        f"streams; bridge-py (Python handlers) / fwd-one: "
        f"{rate_py / fwd_one.hops_per_cpu_second:.2f}x; bridge / bridge-py: "
        f"{rate / rate_py:.2f}x"
    )
    if "bridge-uv" in best:
        uv = best["bridge-uv"].hops_per_cpu_second
        print(
            f"bridge-uv (C hop, uvloop's transports) / fwd-one: "
            f"{uv / fwd_one.hops_per_cpu_second:.2f}x; bridge / bridge-uv: {rate / uv:.2f}x"
        )
    for name, what in (
        ("fwd-c", "the bridge's sockets read in C, C hops, no logic"),
        ("fwd-cmux", "fwd-c with one shared loopback socket per side, routed in C"),
        ("fwd-mux", "one shared loopback socket per side"),
        ("fwd-ssrc", "fwd-one's two sockets with per-call keys, routed by SSRC"),
    ):
        if name in best:
            extra = best[name].hops_per_cpu_second
            print(
                f"{name} / fwd-one: {extra / fwd_one.hops_per_cpu_second:.2f}x; {name} / "
                f"fwd-call: {extra / fwd_call.hops_per_cpu_second:.2f}x ({what})"
            )
    zrtp = sorted(bridge.worker.get("zrtp_ms", []))
    if zrtp:
        n = len(zrtp)
        print(
            f"ZRTP, first media packet to secure, {n} streams: p50 {zrtp[n // 2]:.0f} ms, "
            f"p99 {zrtp[min(n - 1, int(0.99 * n))]:.0f} ms, max {zrtp[-1]:.0f} ms; "
            f"{sum(v >= 200 for v in zrtp)} at or over 200 ms; secure when the window opened: "
            f"{bridge.worker.get('secure_at_t0')}/{bridge.worker.get('streams')}"
        )
    print(f"bridge errors: {bridge.worker.get('errors')}")
    added_p99 = bridge.lat[2] - direct.lat[2]
    print()
    print(
        f"targets, bridge at {bridge.hops / args.seconds:,.0f} hops/s = "
        f"{bridge.hops / args.seconds / 100:,.0f} calls through one daemon on one core:"
    )
    for label, ok in (
        ("loss under 0.1%", bridge.loss < 0.001),
        ("added p99 latency under 2 ms", added_p99 < 2.0),
        ("at least 0.75x the bare forwarder (fwd-one)", ratio_one >= 0.75),
        ("700 calls per core (70,000 hops per CPU-second)", rate >= 70_000),
        ("ZRTP within 200 ms of the first media packet", bool(zrtp) and zrtp[-1] < 200),
    ):
        print(f"  [{'ok' if ok else 'MISS'}] {label}")


if __name__ == "__main__":
    sys.exit(main())
