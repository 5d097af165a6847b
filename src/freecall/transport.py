"""The SIP transport edge: UDP, TCP and TLS sockets for the daemon's sans-I/O cores.

One :class:`SipTransport` per daemon owns every SIP socket, aioquic-style: asyncio protocol
objects turn socket events into calls of the core (``on_message(data, flow, now)``), and the core's
output goes out through :meth:`SipTransport.send`.  Nothing here parses SIP: a stream is cut into
messages by the :class:`~freecall.sip.framer.StreamFramer`, a datagram is a message.  The protocol
rules the edge owns (RFC 3261 section 18):

* UDP is sent from the listener socket a flow names, so responses leave from the port the
  request reached (section 18.2.2, RFC 3581 symmetric response routing).
* A stream response goes back over the connection the request came on (section 18.2.2); when
  that connection is gone, an open connection to the same address is reused (RFC 5923's
  reuse by alias, keyed by the remote address), else a new one is opened (section 18.2.2 last
  paragraph, 18.1.1).  A failure reaches the core as ``on_transport_error(flow)`` so the
  transaction fails at once instead of at Timer B (section 17.1.4).
* RFC 5626 section 3.5.1 keep-alives: a CRLFCRLF ping is answered with a CRLF pong; over UDP
  CRLF datagrams and STUN datagrams on the SIP port are dropped quietly (RFC 5626 section 4.4).
* A stream framing error is fatal (RFC 4475 sections 3.1.2.3 and 3.3.9): the daemon may answer
  (``on_framing_error``, see :func:`framing_error_response`) and then the connection closes.
* Everything is bounded: connections in total and per peer address, write buffers (reading
  pauses while a peer does not read what we send), header size (the framer), idle time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import itertools
import logging
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, cast

from .ops.logformat import LogLimiter
from .sip.errors import SipParseError
from .sip.flow import Addr, Flow
from .sip.framer import KeepAlive, StreamFramer
from .sip.message import Request, Response, make_error_response, make_response, parse_message
from .tls import certificate_fingerprint

__all__ = [
    "CONGESTION_SAFE_SIZE",
    "BoundListener",
    "ListenSpec",
    "LogLimiter",
    "SipTransport",
    "Timer",
    "TransportCounters",
    "TransportOptions",
    "framing_error_response",
    "install_event_loop_policy",
    "needs_congestion_control",
]

log = logging.getLogger("freecall.transport")
trace = logging.getLogger("freecall.sip.trace")
"""Whole messages in and out, at DEBUG only: message bodies never reach the INFO log."""

PING: Final = b"\r\n\r\n"  # RFC 5626 section 3.5.1
PONG: Final = b"\r\n"
CONGESTION_SAFE_SIZE: Final = 1300
"""RFC 3261 section 18.1.1: a request larger than this (path MTU unknown) must use TCP."""
_UDP_MAX_PAYLOAD: Final = {socket.AF_INET: 65507, socket.AF_INET6: 65527}
STREAM_TRANSPORTS: Final = frozenset({"tcp", "tls"})

MessageCallback = Callable[[bytes, Flow, float], None]
FlowCallback = Callable[[Flow], None]
PeerKeyCheck = Callable[[Addr, "str | None"], bool]
"""``check(remote, key)`` for an outgoing TLS connection once open: the peer's key fingerprint
(None if it sent no certificate); False closes the connection and fails what waited on it."""
FramingErrorCallback = Callable[[Flow, SipParseError, bytes], None]


# -- configuration, results, counters -----------------------------------------------------------


class ListenerLike(Protocol):
    """What a listener spec needs (``freecall.config.Listener`` fits)."""

    @property
    def transport(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """A socket to open: ``ListenSpec("tls", "::1", 0)`` (port 0: the kernel picks one)."""

    transport: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class BoundListener:
    """A listener as bound: the real port when 0 was asked for (for Via, Contact, the API)."""

    transport: str
    host: str
    port: int

    @property
    def addr(self) -> Addr:
        return (self.host, self.port)

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TransportOptions:
    """Limits and timeouts; the defaults suit a home node with a few dozen peers."""

    idle_timeout: float = 300.0  # a connection with no traffic either way is closed after this
    pinned_idle_timeout: float = 3600.0  # default for keep_alive(): connections of registrations
    connect_timeout: float = 5.0  # outgoing TCP connect plus TLS handshake
    tls_handshake_timeout: float = 10.0  # incoming TLS handshakes
    tls_shutdown_timeout: float = 2.0  # waiting for the peer's close_notify
    max_connections: int = 1024  # incoming + outgoing, including handshakes in progress
    max_connections_per_ip: int = 32  # incoming, per IPv4 address or IPv6 /64
    max_write_buffer: int = 1 << 20  # a peer that lets this much pile up is dropped
    write_high_water: int = 64 * 1024  # above this, stop reading from the peer (backpressure)
    max_header: int = 16384  # stream header section cap (the framer answers 513 beyond)
    max_message_size: int = 65535  # largest datagram or stream body accepted
    close_timeout: float = 2.0  # close(): time given to connections to flush before an abort
    backlog: int = 128


def _per_transport() -> dict[str, int]:
    return {"udp": 0, "tcp": 0, "tls": 0}


@dataclass(slots=True)
class TransportCounters:
    """Plain counters for the control API and /metrics (``dataclasses.asdict`` exports them)."""

    messages_in: dict[str, int] = field(default_factory=_per_transport)
    messages_out: dict[str, int] = field(default_factory=_per_transport)
    bytes_in: dict[str, int] = field(default_factory=_per_transport)
    bytes_out: dict[str, int] = field(default_factory=_per_transport)
    connections_open: dict[str, int] = field(default_factory=_per_transport)
    connections_accepted: int = 0
    connections_outgoing: int = 0
    connections_refused: int = 0  # caps, or arriving while closing
    connections_idle_closed: int = 0
    connect_failures: int = 0  # outgoing connects or TLS handshakes that failed
    send_errors: int = 0  # sends reported through on_transport_error
    parse_errors: int = 0  # counted by the daemon through note_parse_error()
    framing_errors: int = 0  # fatal stream framing errors (connection closed)
    keepalives_in: int = 0  # CRLFCRLF pings on streams, CRLF datagrams
    pongs_out: int = 0
    pings_out: int = 0  # CRLFCRLF pings we sent on flows we keep (RFC 5626 section 4.4.1)
    pongs_in: int = 0
    stun_datagrams: int = 0
    dropped_datagrams: int = 0  # empty, oversized or arriving after close

    def snapshot(self) -> dict[str, object]:
        return dataclasses.asdict(self)


# -- helpers for the daemon ---------------------------------------------------------------------


def needs_congestion_control(data: bytes, flow: Flow, path_mtu: int | None = None) -> bool:
    """True when a *request* to ``flow`` must go over TCP instead of UDP (RFC 3261 18.1.1).

    Within 200 octets of the path MTU, or over 1300 octets when it is unknown.  The daemon
    decides (it must rewrite the Via transport and may fall back to UDP if TCP fails); responses
    always go back the way the request came (section 18.2.2).
    """
    if flow.transport != "udp":
        return False
    if path_mtu is not None:
        return len(data) > path_mtu - 200
    return len(data) > CONGESTION_SAFE_SIZE


def framing_error_response(
    error: SipParseError, head: bytes, server: str | None = None
) -> bytes | None:
    """The response to a request whose stream framing failed, or None when none may be sent.

    The framer only found the header section (``head``, given to ``on_framing_error``).  It is
    parsed again as a datagram without its body to recover Via, From, To, Call-ID and CSeq
    (RFC 3261 section 8.2.6.2), whatever else is wrong with it; the status is the framer's
    (400 bad Content-Length, 413 body too large, 513 header too large).  Responses and ACKs are
    never answered (RFC 3261 section 17.1.1.3, RFC 4475 3.1.2.19).
    """
    if error.status is None or not head:
        return None
    if head.startswith((b"SIP/", b"ACK ")):
        return None
    try:
        msg = parse_message(head, datagram=True)
    except SipParseError as exc:
        if exc.is_request is False:
            return None
        answer = SipParseError(
            error.detail,
            error.status,
            reason=error.reason,
            fatal=True,
            raw_headers=exc.raw_headers,
            is_request=True,
        )
        return make_error_response(answer, server)
    if isinstance(msg, Response) or (isinstance(msg, Request) and msg.method == "ACK"):
        return None
    response = make_response(msg, error.status, error.reason)
    if server:
        response.append("Server", server)
    return response.to_bytes()


class Timer:
    """The single timer of one core, aioquic-style: re-armed from ``get_timer()`` after each input.

    ``callback(now)`` runs at the deadline with ``now = loop.time()``, the clock the cores see::

        timer = Timer(loop, lambda now: (layer.handle_timer(now), flush()))
        ...  # after every input to the core:
        timer.arm(layer.get_timer())
    """

    __slots__ = ("_callback", "_deadline", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[float], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._deadline: float | None = None

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def arm(self, deadline: float | None) -> None:
        """Fire at ``deadline`` (loop time) or never (None); one pending call_at at most."""
        if deadline == self._deadline and (deadline is None or self._handle is not None):
            return
        self.cancel()
        if deadline is not None:
            self._deadline = deadline
            self._handle = self._loop.call_at(deadline, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._deadline = None

    def _fire(self) -> None:
        self._handle = None
        self._deadline = None
        self._callback(self._loop.time())


def install_event_loop_policy() -> str:
    """Use uvloop when it is installed (faster sockets and timers), else the standard loop.

    Returns the name of the loop chosen, for the start-up log.
    """
    try:
        import uvloop  # noqa: PLC0415 -- optional dependency (extra "fast")
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


# -- addresses ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in ``host``, or None (cached: every datagram in and out asks)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _norm_host(host: str) -> str:
    """One spelling per address (``::1`` = ``0::1``), so lookups by address work."""
    ip = _ip(host)
    return str(ip) if ip is not None else host.lower()


def _norm_addr(addr: Addr) -> Addr:
    return (_norm_host(addr[0]), int(addr[1]))


def _family(host: str) -> socket.AddressFamily | None:
    ip = _ip(host)
    if ip is None:
        return None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _ip_bucket(host: str) -> str:
    """Key of the per-address cap: the IPv4 address, or the IPv6 /64 (one host's usual share)."""
    ip = _ip(host)
    if ip is None or ip.version == 4 or ip.is_loopback:
        return _norm_host(host)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def _fmt(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- UDP ----------------------------------------------------------------------------------------


class _UdpEndpoint(asyncio.DatagramProtocol):
    """One UDP listener: receives datagrams and sends from the same socket (RFC 3581)."""

    def __init__(self, edge: SipTransport, listener: BoundListener) -> None:
        self.edge = edge
        self.listener = listener
        self.transport: asyncio.DatagramTransport | None = None
        self.sending: Flow | None = None  # set during sendto(), to blame synchronous errors
        self.send_error: OSError | None = None
        self.lost: asyncio.Future[None] = edge.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.edge._udp_received(self, data, (str(addr[0]), int(addr[1])))

    def sendto(self, data: bytes, addr: Addr, flow: Flow) -> OSError | None:
        """Send; the error the loop reports synchronously (EMSGSIZE, ENETUNREACH...), if any."""
        assert self.transport is not None
        self.sending, self.send_error = flow, None
        try:
            self.transport.sendto(data, addr)
        finally:
            self.sending = None
        return self.send_error

    def error_received(self, exc: Exception) -> None:
        if self.sending is not None and isinstance(exc, OSError):
            self.send_error = exc
        else:
            # ICMP errors surface later and name no destination: nothing to attribute them to.
            log.debug("%s: socket error %s", self.listener, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


# -- streams ------------------------------------------------------------------------------------


class _Framer(StreamFramer):
    __slots__ = ()

    def pending_head(self) -> bytes:
        """The header section buffered when framing failed, for the error response.

        Cut at the end of the header section, or at the last full line when the section is too
        long (513), so that the daemon can copy Via, From, To, Call-ID and CSeq.
        """
        buf = bytes(self._buf[: self.max_header + 4]).lstrip(b"\r\n")
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return buf[: end + 4]
        end = buf.find(b"\n\n")
        if end >= 0:
            return buf[: end + 2]
        cut = buf.rfind(b"\n")
        return buf[: cut + 1] if cut > 0 else b""


ConnState = Literal["connecting", "accepting", "open", "closing", "closed"]


class _Connection(asyncio.Protocol):
    """One TCP or TLS connection, incoming or outgoing, with its framer and its flow."""

    def __init__(
        self,
        edge: SipTransport,
        kind: str,
        listener: BoundListener | None,
        *,
        outgoing: bool,
        remote: Addr | None = None,
    ) -> None:
        self.edge = edge
        self.id = next(edge._ids)
        self.kind = kind  # "tcp" or "tls"
        self.listener = listener
        self.outgoing = outgoing
        self.state: ConnState = "connecting"
        self.transport: asyncio.Transport | None = None
        self.framer = _Framer(edge.options.max_header, edge.options.max_message_size)
        self.remote: Addr | None = _norm_addr(remote) if remote is not None else None
        self.flow: Flow | None = None
        self.aliases: set[tuple[str, str, int]] = set()
        self.ip_bucket: str | None = None  # counted against max_connections_per_ip
        self.pending: list[tuple[bytes, Flow]] = []  # queued while connecting
        self.pending_bytes = 0
        self.last_activity = edge.loop.time()
        self.idle_timeout: float | None = None  # None: options.idle_timeout
        self.peer_cert: bytes | None = None
        self.was_open = False
        self.read_paused = False
        self.unclaimed_sock: socket.socket | None = None  # accepted, not yet given to a transport
        self.received_any = False
        self.sent_flows: dict[Flow, None] = {}  # sent over it before the peer said anything
        if remote is not None:
            self._make_flow()

    def _make_flow(self) -> None:
        assert self.remote is not None
        local = self.listener.addr if self.listener is not None else None
        self.flow = Flow(self.kind, self.remote, local, self.id)

    def __str__(self) -> str:
        where = _fmt(self.remote) if self.remote is not None else "?"
        return f"{self.kind}:{where} (conn {self.id})"

    # -- asyncio callbacks --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Connected, and for TLS after the handshake: the caps were checked at accept().
        self.edge._opened(self, cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        if self.state != "open":
            return  # closing after a framing error: nothing after it can be trusted
        edge = self.edge
        self.last_activity = edge.loop.time()
        edge.counters.bytes_in[self.kind] += len(data)
        if not self.received_any:
            self.received_any = True
            self.sent_flows.clear()
        framer = self.framer
        framer.feed(data)
        try:
            while self.state == "open":
                item = framer.next_message()
                if item is None:
                    break
                if item is KeepAlive.PING:
                    edge.counters.keepalives_in += 1
                    self._write(PONG)
                    edge.counters.pongs_out += 1
                elif item is KeepAlive.PONG:
                    # the answer to a ping of ours; the activity time is updated already
                    edge.counters.pongs_in += 1
                    if edge.on_pong is not None:
                        edge.on_pong(self.id)
                else:
                    assert isinstance(item, bytes)
                    edge._stream_message(self, item)
        except SipParseError as exc:
            edge._framing_error(self, exc)

    def eof_received(self) -> bool | None:
        return None  # SIP does not half-close: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.edge._lost(self, exc)

    def pause_writing(self) -> None:
        # Backpressure: while the peer does not read our output, stop reading its input.
        if self.transport is not None and not self.read_paused:
            self.read_paused = True
            with contextlib.suppress(Exception):
                self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.read_paused:
            self.read_paused = False
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    # -- used by the edge ---------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """Can take data now, or once the outgoing connect finishes."""
        if self.state == "connecting":
            return self.outgoing
        return (
            self.state == "open" and self.transport is not None and not self.transport.is_closing()
        )

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.last_activity = self.edge.loop.time()

    def close(self) -> None:
        """Graceful: what was written is flushed first (the answer to a framing error)."""
        if self.state in ("closing", "closed"):
            return
        self.state = "closing"
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.state == "closed":
            return
        self.state = "closing"
        if self.transport is not None:
            self.transport.abort()


# -- the edge -----------------------------------------------------------------------------------


class SipTransport:
    """Every SIP socket of one daemon (see the module docstring).

    Callbacks run on the event loop and must not block: ``on_message(data, flow, now)`` for each
    message (``now`` is ``loop.time()``), ``on_transport_error(flow)`` when a send to ``flow``
    failed (always called later, from the loop, never from inside :meth:`send`),
    ``on_framing_error(flow, error, head)`` before a stream is closed for a framing error (the
    daemon may :meth:`send` a response, e.g. :func:`framing_error_response`), ``on_flow_closed(
    flow)`` when an established connection closes (RFC 5626: its registrations are gone), and
    ``on_stun(data, flow, now)`` for STUN datagrams on a UDP listener (dropped without it).
    """

    def __init__(
        self,
        listeners: Iterable[ListenerLike],
        on_message: MessageCallback,
        *,
        on_transport_error: FlowCallback | None = None,
        on_framing_error: FramingErrorCallback | None = None,
        on_flow_closed: FlowCallback | None = None,
        on_stun: MessageCallback | None = None,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        options: TransportOptions | None = None,
        peer_key_check: PeerKeyCheck | None = None,
    ) -> None:
        self._specs = [ListenSpec(str(s.transport).lower(), s.host, int(s.port)) for s in listeners]
        for spec in self._specs:
            if spec.transport not in ("udp", "tcp", "tls"):
                raise ValueError(f"bad transport {spec.transport!r} (expected udp, tcp or tls)")
            if spec.transport == "tls" and server_ssl is None:
                raise ValueError(f"listener {spec}: TLS needs a server SSLContext")
        self.on_message = on_message
        self.on_transport_error = on_transport_error
        self.on_framing_error = on_framing_error
        self.on_flow_closed = on_flow_closed
        self.on_stun = on_stun
        self.peer_key_check = peer_key_check
        self.on_flow_opened: FlowCallback | None = None
        """Called when an outgoing connection opened by :meth:`connect` is up (TLS done and
        the peer's key accepted)."""
        self.on_pong: Callable[[int], None] | None = None
        """Called with the connection id when a CRLF pong arrives (RFC 5626 section 4.4.1)."""
        self.server_ssl = server_ssl
        self.client_ssl = client_ssl
        self.options = options or TransportOptions()
        self.counters = TransportCounters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._listeners: list[BoundListener] = []
        self._udp: dict[Addr, _UdpEndpoint] = {}
        self._listen_socks: list[socket.socket] = []
        self._conns: dict[int, _Connection] = {}
        self._by_remote: dict[tuple[str, str, int], dict[int, _Connection]] = {}
        self._per_ip: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None
        self._started = False
        self._closing = False
        self._refusals = LogLimiter()
        self._errors = LogLimiter()

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("SipTransport.start() has not been called")
        return self._loop

    @property
    def listeners(self) -> tuple[BoundListener, ...]:
        """The bound listeners, with the ports the kernel chose for port 0."""
        return tuple(self._listeners)

    def listener(self, transport: str, family: socket.AddressFamily | None = None) -> BoundListener:
        """The first bound listener of ``transport`` (and ``family``); KeyError if none."""
        for lst in self._listeners:
            if lst.transport == transport and (family is None or lst.family == family):
                return lst
        raise KeyError(transport)

    async def start(self) -> tuple[BoundListener, ...]:
        """Open every listener; on any failure close those opened and raise OSError naming it."""
        if self._started:
            raise RuntimeError("SipTransport.start() called twice")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._all_closed = asyncio.Event()
        try:
            for spec in self._specs:
                try:
                    await self._open_listener(spec)
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"cannot listen on {spec}: {exc.strerror or exc}"
                    ) from exc
        except BaseException:
            await self.close()
            raise
        self._schedule_sweep()
        for lst in self._listeners:
            log.info("listening on %s", lst)
        return self.listeners

    async def _open_listener(self, spec: ListenSpec) -> None:
        loop = self.loop
        family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
        kind = socket.SOCK_DGRAM if spec.transport == "udp" else socket.SOCK_STREAM
        sock = socket.socket(family, kind)
        try:
            if family == socket.AF_INET6:
                # One family per socket, as asyncio does for TCP: "udp:[::]" and "udp:0.0.0.0"
                # on the same port can coexist, and flows never carry IPv4-mapped addresses.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart in TIME_WAIT
            sock.setblocking(False)
            sock.bind((spec.host, spec.port))
            if kind == socket.SOCK_STREAM:
                sock.listen(self.options.backlog)
        except BaseException:
            sock.close()
            raise
        host, port = sock.getsockname()[:2]
        bound = BoundListener(spec.transport, _norm_host(str(host)), int(port))
        if spec.transport == "udp":
            endpoint = _UdpEndpoint(self, bound)
            try:
                await loop.create_datagram_endpoint(lambda: endpoint, sock=sock)
            except BaseException:
                sock.close()
                raise
            self._udp[bound.addr] = endpoint
        else:
            self._listen_socks.append(sock)
            self._spawn(self._accept_loop(sock, bound))
        self._listeners.append(bound)

    async def _accept_loop(self, sock: socket.socket, listener: BoundListener) -> None:
        """Accept by hand: the caps apply before a transport, let alone a TLS handshake, exists
        (asyncio's create_server would spend the handshake first and has no per-address cap)."""
        loop = self.loop
        while True:
            try:
                client, addr = await loop.sock_accept(sock)
            except OSError as exc:
                # EMFILE/ENFILE (out of descriptors) and the like: back off instead of spinning.
                log.warning("accept on %s failed: %s", listener, exc)
                await asyncio.sleep(0.1)
                continue
            self._admit(client, (str(addr[0]), int(addr[1])), listener)

    async def close(self) -> None:
        """Stop accepting, close every connection (flushing, bounded by close_timeout), stop."""
        if self._closing:
            return
        self._closing = True
        if self._loop is None:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for endpoint in self._udp.values():
            if endpoint.transport is not None:
                endpoint.transport.close()
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._conns.values()):
            if conn.transport is None:
                self._lost(conn, None)  # connecting or accepting: nothing to flush
            else:
                conn.close()
        assert self._all_closed is not None
        if self._conns:
            try:
                await asyncio.wait_for(self._all_closed.wait(), self.options.close_timeout)
            except TimeoutError:
                for conn in list(self._conns.values()):
                    log.info("%s did not close in time: aborted", conn)
                    conn.abort()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_closed.wait(), 1.0)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        lost = [ep.lost for ep in self._udp.values() if ep.transport is not None]
        if lost:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*lost), 1.0)
        for sock in self._listen_socks:
            sock.close()
        self._listen_socks.clear()
        self._udp.clear()
        await asyncio.sleep(0)  # let the transports' connection_lost callbacks close sockets
        log.debug("SIP transport closed")

    # -- sending ------------------------------------------------------------------------------
    def send(self, data: bytes, flow: Flow) -> None:
        """Send one message (or a keep-alive) to ``flow``; never blocks, never raises.

        UDP leaves from the listener named by ``flow.local`` (else the best listener of the
        remote's family).  Streams use ``flow.conn`` while it lives, else an open connection to
        ``flow.remote`` over the same transport, else a new connection (data queued meanwhile).
        Failures are reported through ``on_transport_error(flow)`` with this very flow, so that
        the transaction layer's ``transport_failed(flow)`` finds its transactions.
        """
        try:
            if self._loop is None or self._closing:
                self._fail(flow, "transport not running")
            elif flow.transport == "udp":
                self._send_udp(data, flow)
            elif flow.transport in STREAM_TRANSPORTS:
                self._send_stream(data, flow)
            else:
                self._fail(flow, f"transport {flow.transport!r} not supported")
        except Exception as exc:  # the core must never see an exception from the edge
            log.exception("sending to %s failed", flow)
            self._fail(flow, f"internal error: {exc}")

    def _send_udp(self, data: bytes, flow: Flow) -> None:
        endpoint = self._pick_udp(flow)
        if endpoint is None or endpoint.transport is None or endpoint.transport.is_closing():
            self._fail(flow, "no UDP listener for this address family")
            return
        host = flow.remote[0]
        family = _family(host)
        if family is None:
            # sendto() would resolve a name synchronously and block the loop (RFC 3263 belongs
            # to the routing layer).
            self._fail(flow, "UDP needs an IP address")
            return
        if len(data) > _UDP_MAX_PAYLOAD[family]:
            self._fail(flow, f"{len(data)} octets do not fit in a datagram")
            return
        error = endpoint.sendto(data, (host.strip("[]"), flow.remote[1]), flow)
        if error is not None:
            self._fail(flow, str(error))
            return
        self._count_out(data, flow, "udp")

    def _send_stream(self, data: bytes, flow: Flow) -> None:
        conn = self._conns.get(flow.conn) if flow.conn is not None else None
        if conn is None or conn.kind != flow.transport or not conn.usable:
            conn = self._reusable(flow.transport, flow.remote)
        if conn is None:
            conn = self._connect(flow)
            if conn is None:
                return
        if conn.state == "connecting":
            if conn.pending_bytes + len(data) > self.options.max_write_buffer:
                self._fail(flow, "too much queued while connecting")
                return
            conn.pending.append((data, flow))
            conn.pending_bytes += len(data)
            return
        self._write_conn(conn, data, flow)

    def _write_conn(self, conn: _Connection, data: bytes, flow: Flow) -> None:
        assert conn.transport is not None
        if conn.transport.get_write_buffer_size() + len(data) > self.options.max_write_buffer:
            # The peer has not read the last megabyte: a stuck or hostile reader.
            self._fail(flow, "peer is not reading (write buffer full); connection dropped")
            conn.abort()
            return
        conn._write(data)
        if not conn.received_any and len(conn.sent_flows) < 64:
            conn.sent_flows[flow] = None
        self._count_out(data, conn.flow or flow, conn.kind)

    def _count_out(self, data: bytes, flow: Flow, kind: str) -> None:
        counters = self.counters
        counters.bytes_out[kind] += len(data)
        if data.strip(b"\r\n"):
            counters.messages_out[kind] += 1
            if trace.isEnabledFor(logging.DEBUG):
                trace.debug(
                    "send %d octets to %s conn=%s\n%s",
                    len(data),
                    flow,
                    flow.conn,
                    data.decode("utf-8", "replace"),
                )

    def _fail(self, flow: Flow, reason: str) -> None:
        """Count, log one line and report the failure to the core from the loop (17.1.4)."""
        self.counters.send_errors += 1
        suffix = self._errors.allow(self._loop.time()) if self._loop is not None else ""
        if suffix is not None:
            log.info("cannot send to %s: %s%s", flow, reason, suffix)
        if self.on_transport_error is not None and self._loop is not None and not self._closing:
            self._loop.call_soon(self._report_error, flow)

    def _report_error(self, flow: Flow) -> None:
        if self._closing or self.on_transport_error is None:
            return
        try:
            self.on_transport_error(flow)
        except Exception:
            log.exception("on_transport_error(%s) failed", flow)

    def _pick_udp(self, flow: Flow) -> _UdpEndpoint | None:
        if flow.local is not None:
            endpoint = self._udp.get(_norm_addr(flow.local))
            if endpoint is not None and endpoint.listener.family == _family(flow.remote[0]):
                return endpoint
        chosen = self._pick_listener("udp", flow.remote[0])
        return self._udp.get(chosen.addr) if chosen is not None else None

    def _pick_listener(
        self, transport: str, remote_host: str, wanted: Addr | None = None
    ) -> BoundListener | None:
        """The listener a flow to ``remote_host`` belongs to.

        ``wanted`` (the flow's ``local``) wins when it exists.  Otherwise: the remote's family;
        for a loopback peer a loopback listener first; never a loopback listener for another
        peer (its socket cannot reach it).
        """
        if wanted is not None:
            key = _norm_addr(wanted)
            for lst in self._listeners:
                if lst.transport == transport and lst.addr == key:
                    return lst
        family = _family(remote_host)
        ip = _ip(remote_host)
        to_loopback = ip is not None and ip.is_loopback
        best: BoundListener | None = None
        best_score = -1
        for lst in self._listeners:
            if lst.transport != transport or (family is not None and lst.family != family):
                continue
            lip = ipaddress.ip_address(lst.host)
            if to_loopback:
                score = 2 if lip.is_loopback else 1 if lip.is_unspecified else 0
            elif lip.is_loopback:
                continue
            else:
                score = 1
            if score > best_score:
                best, best_score = lst, score
        return best

    def _reusable(self, kind: str, remote: Addr) -> _Connection | None:
        """An open (or opening) connection to ``remote`` over ``kind``: the newest one wins."""
        conns = self._by_remote.get((kind, *_norm_addr(remote)))
        if not conns:
            return None
        for conn in reversed(conns.values()):
            if conn.usable:
                return conn
        return None

    def _connect(self, flow: Flow) -> _Connection | None:
        """Start an outgoing connection for ``flow`` (RFC 3261 section 18.1.1 / 18.2.2)."""
        kind = flow.transport
        if kind == "tls" and self.client_ssl is None:
            self._fail(flow, "no TLS client context")
            return None
        if len(self._conns) >= self.options.max_connections:
            self._fail(flow, f"connection limit {self.options.max_connections} reached")
            return None
        host, port = flow.remote
        listener = self._pick_listener(kind, host, flow.local)
        conn = _Connection(self, kind, listener, outgoing=True, remote=(host, port))
        self._register(conn)
        self.counters.connections_outgoing += 1
        self._spawn(self._run_connect(conn, host.strip("[]"), port))
        return conn

    async def _run_connect(self, conn: _Connection, host: str, port: int) -> None:
        loop = self.loop
        tls = conn.kind == "tls"
        # Leave from the listener's own address (the one Via and Record-Route name), not
        # whichever the kernel would pick: a multi-homed node, and each "host" of a loopback
        # test mesh, must be seen by its peers where it says it is.
        bind = conn.listener.host if conn.listener is not None else None
        local_addr = None if bind in (None, "0.0.0.0", "::") else (bind, 0)  # noqa: S104
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                await loop.create_connection(
                    lambda: conn,
                    host,
                    port,
                    local_addr=local_addr,
                    ssl=self.client_ssl if tls else None,
                    ssl_handshake_timeout=self.options.connect_timeout if tls else None,
                    ssl_shutdown_timeout=self.options.tls_shutdown_timeout if tls else None,
                )
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
            self._connect_failed(conn, _reason(exc))
        except asyncio.CancelledError:
            self._connect_failed(conn, "transport closing")
            raise

    def _connect_failed(self, conn: _Connection, reason: str) -> None:
        if conn.state == "closed":
            return  # already cleaned up by close()
        if conn.was_open:
            conn.abort()  # opened just as the timeout hit; connection_lost cleans up
            return
        self.counters.connect_failures += 1
        conn.state = "closed"
        self._unregister(conn)
        suffix = self._errors.allow(self.loop.time())
        if suffix is not None:
            log.info("cannot connect to %s: %s%s", conn, reason, suffix)
        pending, conn.pending, conn.pending_bytes = conn.pending, [], 0
        failed: dict[Flow, None] = {}
        for _, flow in pending:
            failed.setdefault(flow)
        for flow in failed:
            self.counters.send_errors += 1
            if self.on_transport_error is not None and not self._closing:
                self.loop.call_soon(self._report_error, flow)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections --------------------------------------------------------------------------
    def _register(self, conn: _Connection) -> None:
        self._conns[conn.id] = conn
        if conn.remote is not None:
            self._add_alias(conn, conn.remote)

    def _add_alias(self, conn: _Connection, remote: Addr) -> None:
        key = (conn.kind, *_norm_addr(remote))
        conn.aliases.add(key)
        self._by_remote.setdefault(key, {})[conn.id] = conn

    def _unregister(self, conn: _Connection) -> None:
        if self._conns.pop(conn.id, None) is None:
            return
        for key in conn.aliases:
            conns = self._by_remote.get(key)
            if conns is not None:
                conns.pop(conn.id, None)
                if not conns:
                    del self._by_remote[key]
        if conn.ip_bucket is not None:
            left = self._per_ip.get(conn.ip_bucket, 1) - 1
            if left > 0:
                self._per_ip[conn.ip_bucket] = left
            else:
                self._per_ip.pop(conn.ip_bucket, None)
            conn.ip_bucket = None
        if not self._conns and self._all_closed is not None:
            self._all_closed.set()

    def _admit(self, client: socket.socket, addr: Addr, listener: BoundListener) -> None:
        """An accepted socket: refuse it (one log line) or start its transport."""
        remote = _norm_addr(addr)
        bucket = _ip_bucket(remote[0])
        reason = None
        if self._closing:
            reason = "shutting down"
        elif len(self._conns) >= self.options.max_connections:
            reason = f"connection limit {self.options.max_connections} reached"
        elif self._per_ip.get(bucket, 0) >= self.options.max_connections_per_ip:
            reason = f"limit of {self.options.max_connections_per_ip} connections per address"
        if reason is not None:
            self.counters.connections_refused += 1
            suffix = self._refusals.allow(self.loop.time())
            if suffix is not None:
                log.warning(
                    "refused %s connection from %s on %s: %s%s",
                    listener.transport,
                    _fmt(remote),
                    listener,
                    reason,
                    suffix,
                )
            with contextlib.suppress(OSError):
                # RST rather than FIN: no TIME_WAIT kept for a refused peer.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        conn = _Connection(self, listener.transport, listener, outgoing=False, remote=remote)
        conn.state = "accepting"
        conn.unclaimed_sock = client
        conn.ip_bucket = bucket
        self._per_ip[bucket] = self._per_ip.get(bucket, 0) + 1
        self._register(conn)
        self.counters.connections_accepted += 1
        self._spawn(self._start_incoming(conn, client))

    async def _start_incoming(self, conn: _Connection, client: socket.socket) -> None:
        tls = conn.kind == "tls"
        conn.unclaimed_sock = None
        try:
            # The transport owns the socket from here, and closes it on failure.
            await self.loop.connect_accepted_socket(
                lambda: conn,
                client,
                ssl=self.server_ssl if tls else None,
                ssl_handshake_timeout=self.options.tls_handshake_timeout if tls else None,
                ssl_shutdown_timeout=self.options.tls_shutdown_timeout if tls else None,
            )
        except asyncio.CancelledError:
            self._lost(conn, None)
            raise
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
            self.counters.connect_failures += 1
            suffix = self._refusals.allow(self.loop.time())
            if suffix is not None:
                what = "TLS handshake with" if tls else "accepting"
                log.info("%s %s failed: %s%s", what, conn, _reason(exc), suffix)
            self._lost(conn, exc)

    def _opened(self, conn: _Connection, transport: asyncio.Transport) -> None:
        """Connected (and TLS done): flush what was queued, start framing."""
        conn.transport = transport
        if self._closing or conn.state in ("closing", "closed"):
            conn.state = "closing"  # closed while connecting
            transport.abort()
            return
        conn.state = "open"
        conn.was_open = True
        conn.last_activity = self.loop.time()
        transport.set_write_buffer_limits(high=self.options.write_high_water)
        direction = "outgoing" if conn.outgoing else "incoming"
        if conn.kind == "tls":
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                conn.peer_cert = ssl_object.getpeercert(binary_form=True)
            # the peer node's identity: the SHA-256 of its certificate's public key
            key = certificate_fingerprint(conn.peer_cert) if conn.peer_cert else "not presented"
            log.info("TLS %s %s open, peer key sha256:%s", direction, conn, key)
            check = self.peer_key_check
            if (conn.outgoing and check is not None and conn.remote is not None
                    and not check(conn.remote, key if conn.peer_cert else None)):
                # Whoever answers at an address the host cache names must hold the key the
                # node's signed record names: anything else is not that node.
                log.warning("TLS %s: peer key sha256:%s is not the key its node record names; "
                            "closing", conn, key)
                conn.state, conn.was_open = "closing", False
                transport.abort()
                self._lost(conn, ConnectionError("peer key mismatch"))
                return
        else:
            log.debug("%s %s open", direction, conn)
        self.counters.connections_open[conn.kind] += 1
        pending, conn.pending, conn.pending_bytes = conn.pending, [], 0
        for data, flow in pending:
            if conn.usable:
                self._write_conn(conn, data, flow)
            else:
                self._fail(flow, "connection lost")
        if conn.outgoing and conn.flow is not None and self.on_flow_opened is not None:
            try:
                self.on_flow_opened(conn.flow)
            except Exception:
                log.exception("on_flow_opened(%s) failed", conn.flow)

    def _lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn.state == "closed" and conn.id not in self._conns:
            return
        was_open = conn.was_open and conn.state != "closed"
        by_peer = conn.state == "open"  # not closed by us (idle, close_flow, framing, close())
        conn.state = "closed"
        self._unregister(conn)
        if conn.unclaimed_sock is not None:  # its task never ran (close() right after accept)
            conn.unclaimed_sock.close()
            conn.unclaimed_sock = None
        if was_open:
            self.counters.connections_open[conn.kind] -= 1
            log.debug("%s closed%s", conn, f": {_reason(exc)}" if exc else "")
        pending, conn.pending, conn.pending_bytes = conn.pending, [], 0
        for _, flow in pending:
            self._fail(flow, "connection lost")
        if was_open and by_peer and not conn.received_any:
            # The peer dropped the connection without a word after we wrote: a TLS peer that
            # refused our certificate (TLS 1.3 says so only after our first write), a server
            # at its connection cap.  Fail those sends now rather than at Timer B or F.
            for flow in conn.sent_flows:
                self._fail(flow, f"closed by the peer before any answer ({_reason(exc)})")
        conn.sent_flows.clear()
        closed = self.on_flow_closed
        if was_open and conn.flow is not None and closed is not None and not self._closing:
            try:
                closed(conn.flow)
            except Exception:
                log.exception("on_flow_closed(%s) failed", conn.flow)

    def _stream_message(self, conn: _Connection, data: bytes) -> None:
        assert conn.flow is not None
        counters = self.counters
        counters.messages_in[conn.kind] += 1
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug(
                "recv %d octets from %s conn=%s\n%s",
                len(data),
                conn.flow,
                conn.id,
                data.decode("utf-8", "replace"),
            )
        self._deliver(data, conn.flow)

    def _deliver(self, data: bytes, flow: Flow) -> None:
        try:
            self.on_message(data, flow, self.loop.time())
        except Exception:
            log.exception("on_message from %s failed", flow)

    def _framing_error(self, conn: _Connection, exc: SipParseError) -> None:
        """RFC 4475 3.1.2.3, 3.3.9: answer if the daemon can, then close: nothing after it is
        trustworthy."""
        assert conn.flow is not None
        self.counters.framing_errors += 1
        suffix = self._errors.allow(self.loop.time())
        if suffix is not None:
            log.info("framing error from %s: %s; closing%s", conn, exc, suffix)
        if self.on_framing_error is not None:
            try:
                self.on_framing_error(conn.flow, exc, conn.framer.pending_head())
            except Exception:
                log.exception("on_framing_error(%s) failed", conn.flow)
        conn.close()

    # -- UDP input ----------------------------------------------------------------------------
    def _udp_received(self, endpoint: _UdpEndpoint, data: bytes, addr: Addr) -> None:
        counters = self.counters
        counters.bytes_in["udp"] += len(data)
        if self._closing or not data or len(data) > self.options.max_message_size:
            counters.dropped_datagrams += 1
            return
        first = data[0]
        if first in (0x0D, 0x0A) and not data.strip(b"\r\n"):
            # RFC 3261 section 7.5 / RFC 5626 section 4.4.1 style keep-alive: nothing to do.
            counters.keepalives_in += 1
            return
        flow = Flow("udp", _norm_addr(addr), endpoint.listener.addr)
        if first <= 3 and len(data) >= 20:
            # RFC 7983 demultiplexing: 0-3 is STUN (RFC 5626 section 4.4.2 keep-alives on the
            # SIP port); never SIP, whose start line begins with a letter.
            counters.stun_datagrams += 1
            if self.on_stun is not None:
                try:
                    self.on_stun(data, flow, self.loop.time())
                except Exception:
                    log.exception("on_stun from %s failed", flow)
            return
        counters.messages_in["udp"] += 1
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug(
                "recv %d octets from %s\n%s", len(data), flow, data.decode("utf-8", "replace")
            )
        self._deliver(data, flow)

    # -- the daemon's controls ----------------------------------------------------------------
    def close_flow(self, flow: Flow) -> bool:
        """Close the connection of a stream flow gracefully (queued output is flushed first).

        For a parse error the daemon judges fatal, or a peer it no longer wants.  False when
        there is no such connection (and always for UDP).
        """
        conn = self._conns.get(flow.conn) if flow.conn is not None else None
        if conn is None:
            return False
        conn.close()
        return True

    def keep_alive(self, conn: int, timeout: float | None = None) -> bool:
        """Pin a connection that carries registrations: its idle timeout becomes ``timeout``.

        ``None``: ``options.pinned_idle_timeout`` (3600 s); ``math.inf``: never closed for
        idleness; ``options.idle_timeout`` unpins.  False when the connection is gone.
        """
        connection = self._conns.get(conn)
        if connection is None:
            return False
        connection.idle_timeout = self.options.pinned_idle_timeout if timeout is None else timeout
        return True

    def connect(self, transport: str, remote: Addr) -> Flow | None:
        """Open a new outgoing connection now (a flow kept to a relay, RFC 5626 section 4.2):
        its flow (with the connection id), or None when it cannot even start. Whether it
        opens is told by ``on_flow_opened`` or ``on_flow_closed``/a silent end (see
        :meth:`is_open`)."""
        if self._loop is None or self._closing or transport not in STREAM_TRANSPORTS:
            return None
        conn = self._connect(Flow(transport, _norm_addr(remote)))
        return conn.flow if conn is not None else None

    def ping(self, conn: int) -> bool:
        """Write an RFC 5626 section 4.4.1 CRLFCRLF ping on an open connection."""
        connection = self._conns.get(conn)
        if connection is None or connection.state != "open" or connection.transport is None:
            return False
        connection._write(PING)
        self.counters.pings_out += 1
        return True

    def is_open(self, conn: int) -> bool:
        """Whether connection ``conn`` is open (or still opening)."""
        connection = self._conns.get(conn)
        return connection is not None and connection.usable

    def close_conn(self, conn: int) -> bool:
        """Close connection ``conn`` (gracefully); False when it is gone already."""
        connection = self._conns.get(conn)
        if connection is None:
            return False
        if connection.transport is None:
            connection.state = "closing"  # still connecting: _opened aborts it
            return True
        connection.close()
        return True

    def alias(self, conn: int, remote: Addr) -> bool:
        """Also reuse connection ``conn`` for sends to ``remote`` (RFC 5923 section 5).

        E.g. the Via sent-by of a peer whose connection came from an ephemeral port, once the
        daemon trusts it (RFC 5923 asks for TLS with a verified peer for that).
        """
        connection = self._conns.get(conn)
        if connection is None or connection.state in ("closing", "closed"):
            return False
        self._add_alias(connection, remote)
        return True

    def note_parse_error(self, flow: Flow, error: SipParseError) -> None:
        """The daemon's parser refused a message from ``flow``: count it and log one line."""
        self.counters.parse_errors += 1
        suffix = self._errors.allow(self.loop.time()) if self._loop is not None else ""
        if suffix is not None:
            log.info("unparsable message from %s: %s%s", flow, error, suffix)

    def supports(self, transport: str) -> bool:
        """Whether :meth:`send` can reach a peer over ``transport`` (for RFC 3261 18.1.1)."""
        if transport == "udp":
            return bool(self._udp)
        if transport == "tcp":
            return True
        return transport == "tls" and self.client_ssl is not None

    def peer_certificate(self, conn: int) -> bytes | None:
        """The DER certificate the TLS peer of ``conn`` presented (None: none, or not TLS)."""
        connection = self._conns.get(conn)
        return connection.peer_cert if connection is not None else None

    def peer_fingerprint(self, conn: int) -> str | None:
        """SHA-256 of the TLS peer's public key (:func:`freecall.tls.certificate_fingerprint`)."""
        der = self.peer_certificate(conn)
        return certificate_fingerprint(der) if der else None

    def connection_count(self) -> int:
        return len(self._conns)

    # -- idle connections ---------------------------------------------------------------------
    def _sweep_interval(self) -> float:
        return min(30.0, max(0.05, self.options.idle_timeout / 4))

    def _schedule_sweep(self) -> None:
        if not self._closing:
            self._sweeper = self.loop.call_later(self._sweep_interval(), self._sweep)

    def _sweep(self) -> None:
        """Close connections without traffic for their idle timeout (RFC 5626 keeps pinned
        ones open; their clients send keep-alives well within it)."""
        now = self.loop.time()
        default = self.options.idle_timeout
        for conn in list(self._conns.values()):
            if conn.state != "open":
                continue
            limit = default if conn.idle_timeout is None else conn.idle_timeout
            if now - conn.last_activity >= limit:
                self.counters.connections_idle_closed += 1
                log.info("closing %s: idle for %.0f s", conn, now - conn.last_activity)
                conn.close()
        self._schedule_sweep()


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text
