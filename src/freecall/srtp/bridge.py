"""The media bridge: plain RTP on loopback <-> SRTP keyed by ZRTP on the wire, per call.

Each call's media stream (one per SDP m-line) owns two UDP socket pairs taken from the configured
port range, even port for RTP and the next for RTCP (RFC 3550 section 11)::

    softphone <-- plain RTP/RTCP --> [softphone pair, loopback]
                                     MediaStream
    far end <-- ZRTP + SRTP/SRTCP --> [network pair, media address]

The softphone pair goes into the SDP given to the local softphone, the network pair into the SDP
sent to the far end. A `ZrtpSession` (RFC 6189) is created with the stream, so its Hello hash can
go into that SDP as ``a=zrtp-hash`` before any media flows (section 8.1), and runs on the network
RTP port, multiplexed with SRTP (section 5).

States of a stream (`MediaStream.state`)::

    new --start()/first packet--> securing --SecureStateReached--> secure
      |                              |--no ZRTP answer, policy prefer--> clear (StreamInsecure)
      |                              |--policy require, or ZRTP failed--> failed (ZrtpFailure)
      '--policy off--> clear                        any --release()--> closed

Decisions, and why:

* **Nothing in clear unless clear is the mode.** Until the stream is secure, softphone RTP is
  dropped (not held: late audio is worse than none, and Zfone did the same) and counted in
  ``dropped_insecure``. Clear mode forwards RTP unchanged both ways and is only entered under
  ``security.policy: off`` (at once) or ``prefer`` (after the bound), always with
  `StreamInsecure`.
* **When no ZRTP answer means "go clear".** Under ``prefer`` a stream falls back to clear only
  when the far end showed no sign of ZRTP: no ``a=zrtp-hash`` in its SDP and no ZRTP packet the
  session accepted. A far end that advertised ZRTP (or spoke it) and then did not complete is
  either broken or being stripped by an attacker, so that is a `ZrtpFailure` under every policy.
  The bound is ``zrtp_timeout`` from the start of ZRTP (or the ZRTP core giving up earlier).
* **When ZRTP starts.** At `MediaStream.start` (the daemon calls it once both SDPs are known),
  or at the first RTP packet from the softphone, or at the first ZRTP packet from the far end,
  whichever comes first. Who offered does not matter: both ends send Hello and the ZRTP core
  resolves Commit contention itself (section 4.2).
* **SRTP** (RFC 3711) with pylibsrtp: one outbound session (our key, any SSRC) protects RTP and
  RTCP from the softphone, one inbound session (the peer's key) unprotects what comes from the
  far end (RFC 6189 section 4.5.3 keys both directions separately). An initiator may see the
  responder's first SRTP packet before Conf2ACK; it is tried with the already derived keys and,
  if it authenticates, stands for the Conf2ACK (section 4.6, `srtp_media_received`).
* **RTCP.** Separate RTCP ports by default (RFC 3550 section 11; the SDP carries the pair).
  RTCP arriving on an RTP port is recognised anyway (RFC 5761 section 4, payload types 192-223,
  after RFC 7983's first-octet split that ``classify_datagram`` implements) and handled as RTCP.
  We send RTCP on the RTP port only when ``set_remote(..., rtcp_mux=True)`` says the SDP
  exchange with the far end negotiated ``a=rtcp-mux``; the daemon should simply not offer it.
* **Symmetric RTP and latching** (RFC 4961 in spirit): we send to the address packets really
  come from, so a far end behind NAT works. Only evidence moves the target: in secure mode an
  SRTP/SRTCP packet that authenticates (libsrtp's replay check rejects a replayed capture); before
  that, a ZRTP packet the session accepted (a Hello matching ``a=zrtp-hash`` when the SDP had one,
  or a message that advanced the exchange). Garbage, unauthenticated SRTP, STUN and stray ZRTP
  never move it, so a spoofer cannot steal the stream. Clear mode has no authentication: the
  first RTP source is taken, then only a source with the same SSRC (a NAT rebinding); that is
  as good as clear RTP gets.
* **Timers.** One `Timer` per engine, aioquic-style, over a heap of per-stream deadlines: the
  ZRTP session's `get_timer()`, the ZRTP bound, and the inactivity check. RTP inactivity is
  checked every ``rtp_timeout / 8`` (at most 1 s) from packet counters, so the per-packet path
  never reads the clock; `MediaTimeout` therefore comes between ``rtp_timeout`` and one check
  period later. Activity is any accepted packet from the far end (SRTP, SRTCP, ZRTP, clear RTP).
* **Allocation is synchronous** (`MediaEngine.allocate_now`): the proxy rewrites SDP inside a
  synchronous callback, so the sockets are bound (ports final) at once and handed to the event
  loop in a task; datagrams that arrive meanwhile wait in the socket or, once one socket of the
  stream reads, are kept (16 per socket) and handled when all four are ready. Ports come from
  the range oldest-freed first (`PortPairPool`); a port someone else holds is skipped.
* **The per-packet path.** Each socket's protocol object holds its handler in a slot, and the
  stream swaps handlers on state changes (`_update_handlers`), so a secure packet costs one
  libsrtp call, one ``sendto`` and a few counter increments: no classification (SRTP is tried
  first; anything that fails it is classified on the slow path), no clock, no logging, no
  allocation beyond pylibsrtp's result. ZRTP security warnings (forged packets cause them) are
  counted; only the first five per stream are logged and raised as events.
* **The per-packet path in C.** Where the optional extension `freecall.srtp._hop` was built
  and ``media.native`` is ``auto``, a secure stream's two RTP sockets get C hops instead
  (`_native_hops`): the event loop calls C with ``(data, addr)``, which runs libsrtp on
  pylibsrtp's own session and ``sendto`` on the other socket's descriptor. Whatever is not a
  plain authenticated RTP packet goes to the Python handler above, unchanged (ZRTP, STUN,
  RTCP on the RTP port, forgeries, replays), and an authenticated packet from a new source
  calls `_latch_rtp`. The hops count in C; `sync_counters` folds their counts and RFC 3550
  A.3 state into the stream (stats, the engine's totals and the inactivity check call it).
  Relayed paths (our TURN allocation), a lost ICE consent and any other state stay Python.
  With ``native`` the sockets are also read in C (`NativeDatagramTransport`, a C `Reader`
  under ``loop.add_reader``): one ``recvmmsg`` per wake-up in the common case instead of the
  loop's read-until-empty, and a hop installed as the endpoint's ``datagram_received`` runs
  on the Reader's buffer with no Python object made; everything else reaches the endpoint as
  ``(bytes, (host, port))`` as before, so nothing below this line knows which transport
  reads.
* **One softphone socket for all (opt-in).** With ``phone_socket="shared"``
  (``media.phone_socket: shared``) the engine binds one loopback RTP/RTCP pair at start and
  every stream's SDP toward its softphone names it (`_SharedPhone`). A stream claims its
  softphone's RTP and RTCP addresses as ``set_softphone_target`` learns them (the softphone's
  own SDP, offer or answer) and gives them up when released; a secure stream's phone->net C
  hop is also entered in the C reader's routes (``_hop.route_key(source)``), so its packets
  never reach Python. Toward the softphone, packets leave from the shared socket. A source no
  stream claims is dropped and counted (``phone_unrouted``): softphones must do symmetric RTP
  (RFC 4961), and what a softphone sends before its SDP arrived is lost. Without the C reader
  (``native`` off, or no extension) `_PhoneRouter` routes in Python by the same claims. The
  network side is unchanged (a pair per stream: latching, ZRTP and ICE are per stream).
* **Cost.** ``bench/media.py`` measures it against bare forwarders (docs/performance.md). Over
  half the time per packet is the kernel's UDP path; per-call keys and destinations (cold libsrtp
  contexts, one socket per phone) cost about 20 % against one key and one sink, sockets per
  stream a further 5 % (uvloop reads each until it is empty: at 50 packets a second most
  wake-ups end in a failing read), and the bridge's own logic is within noise of a bare
  forwarder on the same sockets and keys. libsrtp is called through `srtp_call`, without
  pylibsrtp's per-call wrapper. Plain sockets with ``loop.add_reader`` and a read in Python
  were measured and are no cheaper; read in C (`NativeDatagramTransport`) they are, by 0.6-2.3
  us per hop. uvloop caches 2048 destination addresses; past about 1000 streams per process
  its ``sendto`` converts addresses again (the C hops send with their own sockaddr).

Counters per stream (`MediaStream.stats`): packets and bytes in and out on each side, SRTP/SRTCP
authentication failures and replays, drops by reason, loss from RTP sequence numbers of the far
end's authenticated packets (RFC 3550 appendix A.3, `freecall.srtp.rtp.ReceptionStats`), ZRTP
timing. Jitter is not estimated (it would need the clock per packet).

Events go to the daemon through ``on_event`` as small dataclasses: `StreamSecure`,
`StreamInsecure`, `ZrtpFailure` (end the call), `MediaTimeout` (send BYE),
`SasSignatureNeeded` (answer with `MediaStream.provide_signature`), `ZrtpWarning`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import ipaddress
import itertools
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, TypeVar, cast

import pylibsrtp

from freecall.peering.nat import NatView
from freecall.srtp import ice as ice_
from freecall.srtp import zrtp as z
from freecall.srtp.keys import RetainedSecrets
from freecall.srtp.media_ports import PortPairPool
from freecall.srtp.rtp import MAX_DROPOUT, RTP_HEADER_LEN, ReceptionStats, is_rtcp_type, rtp_ssrc
from freecall.srtp.srtp_policy import srtp_call, srtp_pointers, srtp_sessions
from freecall.srtp.zrtp_messages import classify_datagram
from freecall.transport import Timer

try:  # the optional C extension (setup.py): without it the Python handlers run
    from freecall.srtp import _hop
    from freecall.srtp.native_udp import NativeDatagramTransport
except ImportError:  # pragma: no cover - built wherever the tests run
    _hop = None  # type: ignore[assignment]
    NativeDatagramTransport = None  # type: ignore[assignment,misc]

log = logging.getLogger("freecall.media")

NATIVE_AVAILABLE: Final = _hop is not None
"""The C hop (`freecall.srtp._hop`) was built: secure streams can use it (``media.native``)."""

Addr = tuple[Any, ...]
"""A socket address as the event loop reports it: ``(host, port)``, or 4 items for IPv6."""
Policy = Literal["require", "prefer", "off"]
Handler = Callable[[bytes, Addr], None]

NEW: Final = "new"
SECURING: Final = "securing"
SECURE: Final = "secure"
CLEAR: Final = "clear"
FAILED: Final = "failed"
CLOSED: Final = "closed"

_SRTP_ERRORS = (pylibsrtp.Error, ValueError, TypeError)
_REPLAY = "replay check failed"
_DSCP_EF: Final = 0xB8  # RFC 4594 "telephony": Expedited Forwarding, DSCP 46
_WARNINGS_REPORTED: Final = 5  # per stream; later ones are only counted
_EARLY_KEPT: Final = 16  # datagrams per socket kept while the stream's sockets are set up
SHARED_BUFFER: Final = 4 << 20
"""Socket buffers asked for the shared softphone sockets (the kernel caps them)."""
_UNROUTED_LOGGED: Final = 10  # unclaimed sources on a shared phone socket logged, then 1 in 1000
POOL_MAX_AGE: Final = 600.0
"""A pre-gathered stream older than this is replaced rather than used: its NAT mappings and the
relays it chose may have changed (keepalives hold them, but a router reboot does not ask)."""
POOL_TICK: Final = 30.0
"""How often the engine looks at its pool: expired entries, relays learnt since, refills..."""
POOL_TICK_UNFILLED: Final = 2.0
"""...and how often while it is not full (at start, servers come with the first gossip)."""


@dataclass(frozen=True, slots=True)
class IceServers:
    """Where a stream's ICE agent gathers: STUN servers and at most one TURN server used."""

    stun: tuple[tuple[str, int], ...] = ()
    turn: tuple[ice_.TurnServer, ...] = ()


class MediaCapacityError(RuntimeError):
    """No stream can be allocated: the stream cap is reached or no port pair is free."""


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class StreamSecure:
    """ZRTP completed: SRTP flows both ways. Show ``sas`` to the user (section 7).

    ``continuity`` is "match", "new" or "mismatch" (warn: section 4.3.2); ``peer_signature`` is
    the peer's signature block over the SAS hash, for the OpenPGP layer to verify. No key
    material: the keys stay in the stream and go with it (section 4.7.3).
    """

    stream: MediaStream
    sas: str | None
    sas_type: str
    sas_verified: bool
    continuity: str
    peer_zid: bytes
    cipher: str
    auth_tag: str
    key_agreement: str
    hash: str
    hello_hash_verified: bool
    multistream: bool
    peer_client_id: str
    elapsed: float  # seconds from the start of ZRTP to the secure state
    sas_value: int = 0  # the 32 leftmost bits of sashash, rendered as ``sas``
    peer_hello_hash: str = ""
    peer_disclosure: bool = False  # the peer may disclose session keys (D flag): warn
    cache_update_deferred: bool = False  # continuity mismatch: cache waits for confirmation
    peer_signature: z.PeerSignature | None = None


@dataclass(frozen=True, slots=True, eq=False)
class StreamInsecure:
    """The stream carries clear RTP (policy ``off``, or ``prefer`` and no ZRTP peer)."""

    stream: MediaStream
    reason: str


@dataclass(frozen=True, slots=True, eq=False)
class ZrtpFailure:
    """No keys, and clear is not allowed or not safe (or no sockets): the daemon ends the call."""

    stream: MediaStream
    reason: str


@dataclass(frozen=True, slots=True, eq=False)
class MediaTimeout:
    """Nothing accepted from the far end for ``idle`` seconds: the daemon sends BYE."""

    stream: MediaStream
    idle: float


@dataclass(frozen=True, slots=True, eq=False)
class SasSignatureNeeded:
    """Sign ``sashash`` (RFC 6189 section 7.2) and call `MediaStream.provide_signature`."""

    stream: MediaStream
    sashash: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class ZrtpWarning:
    """A ZRTP security warning that did not end the exchange (for the log and the dashboard)."""

    stream: MediaStream
    reason: str


MediaEvent = (
    StreamSecure | StreamInsecure | ZrtpFailure | MediaTimeout | SasSignatureNeeded | ZrtpWarning
)


class _PortRangeLike(Protocol):
    @property
    def first(self) -> int: ...

    @property
    def last(self) -> int: ...


# ---------------------------------------------------------------------------------------------
# Socket plumbing
# ---------------------------------------------------------------------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _ignore(data: bytes, addr: Addr) -> None:
    """The handler of a closed stream."""


class _Endpoint(asyncio.DatagramProtocol):
    """One socket of a stream. ``datagram_received`` is a slot holding the stream's current
    handler (a bound method), so the event loop calls straight into the right path.

    Until all four sockets of the stream are with the loop, datagrams are kept (a few) and
    handed over afterwards: one socket may start reading while the one it forwards to is not
    ready yet.
    """

    __slots__ = ("datagram_received", "early", "stream", "transport")

    def __init__(self, stream: MediaStream) -> None:
        self.stream: MediaStream | None = stream
        """None once the stream is released: the two refer to each other, and a released
        stream must be freed by reference counting, not wait for the cyclic collector."""
        self.transport: asyncio.DatagramTransport | None = None
        self.early: list[tuple[bytes, Addr]] = []
        self.datagram_received = self._keep  # type: ignore[method-assign]

    def _keep(self, data: bytes, addr: Addr) -> None:
        if len(self.early) < _EARLY_KEPT:
            self.early.append((data, addr))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors on send (port unreachable while the far end is not up yet): count only.
        if self.stream is not None:
            self.stream.send_errors += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        stream = self.stream
        if stream is not None and stream._hop_out is not None and stream.state != CLOSED:
            stream._update_handlers()  # the C hops send on raw fds: not past a lost socket


_P = TypeVar("_P", bound=asyncio.DatagramProtocol)


def _factory(protocol: _P) -> Callable[[], _P]:
    """The protocol factory ``create_datagram_endpoint`` wants, for a protocol made already."""
    return lambda: protocol


def _normalise(host: str, port: int, family: socket.AddressFamily) -> Addr:
    """``(host, port)`` in the shape the loop reports sources in, so tuples compare equal."""
    ip = ipaddress.ip_address(host.strip("[]"))
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    if family == socket.AF_INET6:
        if ip.version == 4:
            ip = ipaddress.IPv6Address(f"::ffff:{ip}")
        return (str(ip), port, 0, 0)
    if ip.version != 4:
        raise ValueError(f"IPv6 address {host} for an IPv4 media socket")
    return (str(ip), port)


def _next_port(addr: Addr) -> Addr:
    return (addr[0], addr[1] + 1, *addr[2:])


class _PhoneRouter(asyncio.DatagramProtocol):
    """One shared loopback socket (``media.phone_socket: shared``): each datagram goes to the
    stream whose softphone's SDP names its source address, which needs softphones doing
    symmetric RTP (RFC 4961 section 3: sending from the port they receive on). Read in C, a
    secure stream's hop is looked up by ``_hop.route_key(source)`` in ``c_routes`` without a
    Python object; everything else comes here and is routed by ``routes``. A source no stream
    claims is dropped and counted (`unrouted`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.routes: dict[Addr, _Endpoint] = {}
        self.c_routes: dict[int, _hop.Hop] = {}
        """What the C `Reader` looks up first (only when the socket is read in C)."""
        self.transport: asyncio.DatagramTransport | None = None
        self.unrouted = 0
        self.send_errors = 0

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        ep = self.routes.get(addr)
        if ep is None:
            self.unrouted += 1
            if self.unrouted <= _UNROUTED_LOGGED or self.unrouted % 1000 == 0:
                log.debug("shared softphone %s socket: dropped a datagram from %s, which no "
                          "stream's softphone SDP names (%d so far; shared mode needs "
                          "symmetric RTP, RFC 4961)", self.name, addr[:2], self.unrouted)
            return
        ep.datagram_received(data, addr)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:
        self.send_errors += 1  # ICMP port unreachable: a softphone gone; nothing to do

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def claim(self, addr: Addr | None, ep: _Endpoint) -> None:
        """``addr`` is ``ep``'s softphone from now on (a later claim of the same source wins:
        one softphone address cannot be in two live calls); its C hop, if it has one now."""
        if addr is None:
            return
        self.routes[addr] = ep
        key = _route_key(addr)
        if key is None or _hop is None:
            return
        handler = ep.datagram_received
        if type(handler) is _hop.Hop:
            self.c_routes[key] = handler
        else:
            self.c_routes.pop(key, None)

    def unclaim(self, addr: Addr | None, ep: _Endpoint) -> None:
        if addr is None or self.routes.get(addr) is not ep:
            return
        del self.routes[addr]
        key = _route_key(addr)
        if key is not None:
            self.c_routes.pop(key, None)


def _route_key(addr: Addr) -> int | None:
    if _hop is None or len(addr) != 2:
        return None
    try:
        return _hop.route_key(addr)
    except ValueError:
        return None


class _SharedPhone:
    """The engine's shared loopback RTP/RTCP socket pair and the claims on it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.rtp = _PhoneRouter("RTP")
        self.rtcp = _PhoneRouter("RTCP")
        self.opening: asyncio.Task[None] | None = None
        self.claims: dict[int, tuple[Addr | None, Addr | None]] = {}
        """Stream id to the (RTP, RTCP) softphone addresses it claims."""

    def sync(self, stream: MediaStream) -> None:
        """Claim the stream's softphone addresses (and its C hop) as they are now."""
        live = stream.state != CLOSED
        rtp = stream._phone_rtp if live else None
        rtcp = stream._phone_rtcp if live else None
        old_rtp, old_rtcp = self.claims.get(stream.id, (None, None))
        if old_rtp != rtp:
            self.rtp.unclaim(old_rtp, stream._phone_rtp_ep)
        if old_rtcp != rtcp:
            self.rtcp.unclaim(old_rtcp, stream._phone_rtcp_ep)
        if rtp is None and rtcp is None:
            self.claims.pop(stream.id, None)
            return
        self.claims[stream.id] = (rtp, rtcp)
        self.rtp.claim(rtp, stream._phone_rtp_ep)
        self.rtcp.claim(rtcp, stream._phone_rtcp_ep)

    def close(self) -> None:
        if self.opening is not None:
            self.opening.cancel()
        for router in (self.rtp, self.rtcp):
            if router.transport is not None:
                router.transport.close()
            router.routes.clear()
            router.c_routes.clear()


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


class MediaEngine:
    """All media streams of one daemon: ports, the ZRTP timer, policy and events."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        address: str,
        port_range: tuple[int, int] | _PortRangeLike,
        retained_secrets: RetainedSecrets,
        loopback_host: str = "127.0.0.1",
        bind_host: str | None = None,
        zrtp_config: z.ZrtpConfig | None = None,
        policy: Policy = "prefer",
        rtp_timeout: float | None = 30.0,
        zrtp_timeout: float = 5.0,
        on_event: Callable[[MediaEvent], None] | None = None,
        max_streams: int | None = None,
        urandom: Callable[[int], bytes] = os.urandom,
        ice: bool = False,
        ice_servers: Callable[[], IceServers] | None = None,
        ice_pool: int = 2,
        nat_view: NatView | None = None,
        native: bool = True,
        native_reader: bool = True,
        phone_socket: Literal["per-stream", "shared"] = "per-stream",
    ) -> None:
        """``address`` goes into SDP toward the far end; sockets bind to ``bind_host``
        (default: ``address``; give ``0.0.0.0`` behind NAT where the public address is not
        local). Both socket pairs of a stream come from ``port_range``.

        ``ice``: every stream runs an ICE agent (RFC 8445) on its network RTP socket, used
        when the far end's SDP offers ICE too; ``ice_servers`` says where to gather (asked
        for each new stream), and ``ice_pool`` streams are kept gathered in advance, because
        the SDP naming a stream's candidates is written the moment the stream is made.
        ``nat_view``: the node's one "behind NAT?" verdict (shared with node-level STUN), which
        each gathering informs; the engine's own when not given.

        ``native``: secure streams run their per-packet path in C (`freecall.srtp._hop`)
        when it was built (`NATIVE_AVAILABLE`); False keeps them on the Python handlers
        (``media.native: off``). Takes effect at each stream's next change of state. With
        ``native`` (and ``native_reader``, there for the benchmark to compare) each new
        stream's sockets are also read in C (`NativeDatagramTransport`), not by the loop's
        own datagram transports.

        ``phone_socket``: ``shared`` binds one loopback RTP/RTCP port pair for every stream's
        softphone side (`_SharedPhone`), each datagram routed by its source address to the
        stream whose softphone SDP names it (symmetric RTP needed, RFC 4961); ``per-stream``
        gives each stream a pair of its own."""
        if policy not in ("require", "prefer", "off"):
            raise ValueError(f"bad security policy {policy!r}")
        if zrtp_timeout <= 0:
            raise ValueError("zrtp_timeout must be positive")
        if phone_socket not in ("per-stream", "shared"):
            raise ValueError(f"bad phone_socket {phone_socket!r}")
        first, last = (
            port_range if isinstance(port_range, tuple) else (port_range.first, port_range.last)
        )
        self.loop = loop
        self.address = str(ipaddress.ip_address(address.strip("[]")))
        self.bind_host = bind_host if bind_host is not None else self.address
        self.loopback_host = loopback_host
        self.policy: Policy = policy
        self.zrtp_config = zrtp_config if zrtp_config is not None else z.ZrtpConfig()
        self.secrets = retained_secrets
        self.rtp_timeout = rtp_timeout
        self.zrtp_timeout = zrtp_timeout
        self.on_event = on_event
        self.urandom = urandom
        self._ports = PortPairPool(first, last)
        self.native = native
        self.native_reader = native_reader
        self._shared: _SharedPhone | None = None
        self.allocations_failed = 0
        if phone_socket == "shared":
            self._shared = self._open_shared(loopback_host)
            cap = self._ports.capacity - 1  # one pair per stream, the shared one aside
        else:
            cap = self._ports.capacity // 2  # two pairs per stream
        self.max_streams = min(max_streams, cap) if max_streams is not None else cap
        self._streams: dict[int, MediaStream] = {}
        self._ids = itertools.count(1)
        self._heap: list[tuple[float, int, MediaStream]] = []
        self._heap_seq = itertools.count()
        self._timer = Timer(loop, self._on_timer)
        self._closed = False
        self.allocations_failed = 0
        self.retired: dict[str, int] = dict.fromkeys((*_COUNTERS, "lost"), 0)
        """Counters of released streams, so that totals (metrics) never go backwards."""
        self.ice = ice
        self.ice_servers = ice_servers
        self.ice_pool = max(0, ice_pool)
        self._pool: list[MediaStream] = []
        """Streams made and gathered before any call asked (oldest first)."""
        self._pool_handle: asyncio.TimerHandle | None = None
        self.nat = nat_view if nat_view is not None else NatView()
        """The node's "behind NAT?" verdict; each gathering reports what it showed to it."""

    @property
    def behind_nat(self) -> bool | None:
        """The node's verdict (:class:`~freecall.peering.nat.NatView`): node-level STUN when
        it has an answer, else what the last gathering showed (a server-reflexive address
        other than our own: True; the same: False), None while neither knows."""
        return self.nat.behind_nat

    @property
    def shared_phone_port(self) -> int | None:
        """The shared softphone RTP port (RTCP: the next), None with a pair per stream."""
        return self._shared.port if self._shared is not None else None

    # -- streams -------------------------------------------------------------------------------

    @property
    def streams(self) -> list[MediaStream]:
        """The streams of calls (pre-gathered ones waiting in the pool are not listed)."""
        return [s for s in self._streams.values() if not s._pooled]

    def stream(self, stream_id: int) -> MediaStream | None:
        return self._streams.get(stream_id)

    async def allocate(self, *, label: str = "", first: object = None) -> MediaStream:
        """`allocate_now`, then wait until the event loop has taken over the sockets."""
        stream = self.allocate_now(label=label, first=first)
        opening = stream._opening
        if opening is not None:
            await asyncio.shield(opening)
        if stream.state == CLOSED:
            raise MediaCapacityError(stream.failure_reason or "media stream closed while opening")
        return stream

    def allocate_now(self, *, label: str = "", first: object = None) -> MediaStream:
        """A new stream, its four sockets bound and its ZRTP session created, synchronously.

        The ports are final at return, so the SDP naming them can be written at once (the
        proxy's rewriting is synchronous); the event loop takes the sockets over within a turn
        or two, and a datagram arriving before that waits in the socket. ``first`` (a stream
        of this engine) makes this a further stream of the same call (video after audio),
        keyed in Multistream mode once ``first`` is secure (RFC 6189 section 4.4.3). Raises
        `MediaCapacityError` at the stream cap or when no port pair can be bound.
        """
        if self._closed:
            raise RuntimeError("media engine closed")
        if first is not None and (
            not isinstance(first, MediaStream) or first._engine is not self or first.state == CLOSED
        ):
            raise ValueError("first must be a live stream of this engine")
        stream = self._take_pooled()
        if stream is not None:
            stream._adopt(label, first)
        else:
            if len(self._streams) >= self.max_streams:
                self.allocations_failed += 1
                raise MediaCapacityError(f"{self.max_streams} media streams in use")
            stream = self._new_stream(label, first)
        self._refill_pool()
        return stream

    def _new_stream(self, label: str, first: MediaStream | None) -> MediaStream:
        shared = self._shared
        phone: tuple[int, socket.socket | None, socket.socket | None]
        if shared is None:
            own = self._bind_pair(self.loopback_host, dscp=False)
            try:
                net = self._bind_pair(self.bind_host, dscp=True)
            except MediaCapacityError:
                self._close_pair(own)
                raise
            phone = own
        else:
            net = self._bind_pair(self.bind_host, dscp=True)
            phone = (shared.port, None, None)
        stream = MediaStream(self, next(self._ids), label, first, phone[0], net[0])
        self._streams[stream.id] = stream
        if first is not None:
            first._followers.append(stream)
        if self.ice:
            servers = self._current_ice_servers()
            stream._ice = ice_.IceAgent(
                controlling=True, host_addresses=[(self.address, net[0])],
                stun_servers=servers.stun, turn_servers=servers.turn, urandom=self.urandom)
            stream._ice.gather(self.loop.time())  # sent once the sockets are with the loop
        stream._opening = self.loop.create_task(stream._open(phone[1], phone[2], net[1:]))
        return stream

    def _open_shared(self, host: str) -> _SharedPhone:
        """Bind the shared softphone port pair now (its port goes into every SDP toward a
        softphone) and give it to the loop: read in C with routes where the C reader is used,
        else by the loop's own transport and the Python router."""
        port, rtp_sock, rtcp_sock = self._bind_pair(host, dscp=False)
        shared = _SharedPhone(port)
        pairs = ((shared.rtp, rtp_sock), (shared.rtcp, rtcp_sock))
        for sock in (rtp_sock, rtcp_sock):
            # Every call's packets queue here: a default buffer (about 200 datagrams) overflows
            # when the loop stalls a few ms at hundreds of calls (bench/media.py lost 2.7 % at
            # 350). The kernel caps it at net.core.rmem_max / wmem_max.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SHARED_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SHARED_BUFFER)
        if self.native and self.native_reader and NativeDatagramTransport is not None:
            try:
                for router, sock in pairs:
                    # bigger batches than a stream's own socket: many sources queue here
                    NativeDatagramTransport(self.loop, sock, router, batch=32, limit=256,
                                            routes=router.c_routes)
                return shared
            except NotImplementedError:  # no add_reader (not on Linux loops)
                pass

        async def open_by_loop() -> None:
            for router, sock in pairs:
                if router.transport is None:
                    await self.loop.create_datagram_endpoint(_factory(router), sock=sock)

        shared.opening = self.loop.create_task(open_by_loop())
        return shared

    # -- the pool of pre-gathered streams (ICE) ---------------------------------------------------

    def _current_ice_servers(self) -> IceServers:
        if self.ice_servers is None:
            return IceServers()
        try:
            return self.ice_servers()
        except Exception:
            log.exception("ICE servers could not be listed; gathering host candidates only")
            return IceServers()

    def start_pool(self) -> None:
        """Fill the pool and look after it every `POOL_TICK` (the daemon calls this once the
        sources of ICE servers, such as the host cache, are up)."""
        if not self.ice or self.ice_pool == 0 or self._closed:
            return
        self._pool_tick()

    def _expire_pool(self) -> None:
        now = self.loop.time()
        for stream in [s for s in self._pool if now - s.created_at > POOL_MAX_AGE]:
            stream.release()

    def _retire_other_turn(self) -> None:
        """A pooled stream that did not gather from the TURN server the node chooses now (its
        signalling attached to another relay since, or no relay was known then) is replaced:
        a call's media then crosses the relay its signalling does, not a second one
        (docs/relay.md, "One relay per node")."""
        if not self._pool:
            return
        wanted = self._current_ice_servers().turn[:1]  # an agent allocates at the first only
        for stream in list(self._pool):
            agent = stream._ice
            if agent is not None and any(not agent.is_turn_server(t.addr) for t in wanted):
                stream.release()

    def _pool_tick(self) -> None:
        self._expire_pool()
        self._retire_other_turn()
        self._refill_pool()
        if not self._closed:
            full = len(self._pool) >= self.ice_pool
            self._pool_handle = self.loop.call_later(
                POOL_TICK if full else POOL_TICK_UNFILLED, self._pool_tick)

    def _refill_pool(self) -> None:
        """Best effort: a pool entry only when servers exist to gather from (host candidates
        need no waiting) and never the last free stream."""
        if not self.ice or self._closed or len(self._pool) >= self.ice_pool:
            return
        servers = self._current_ice_servers()
        if not servers.stun and not servers.turn:
            return
        while len(self._pool) < self.ice_pool and len(self._streams) + 1 < self.max_streams:
            try:
                stream = self._new_stream("", None)
            except MediaCapacityError:
                self.allocations_failed -= 1  # not a call refused
                return
            stream._pooled = True
            stream._update_handlers()
            self._pool.append(stream)

    def _recycle(self, stream: MediaStream) -> None:
        if stream._pooled and stream.state != CLOSED:
            stream.release()
            self._refill_pool()

    def _take_pooled(self) -> MediaStream | None:
        """The oldest gathered stream in the pool (or the oldest at all): its candidates are
        in the SDP at once."""
        self._expire_pool()
        if not self._pool:
            return None
        ready = [s for s in self._pool if s._ice is not None and s._ice.gathering_complete]
        stream = ready[0] if ready else self._pool[0]
        self._pool.remove(stream)
        return stream

    def _gathered(self, stream: MediaStream, event: ice_.GatheringComplete) -> None:
        """Learn from each gathering whether we sit behind NAT; log what did not answer."""
        own = {c.host for c in event.candidates if c.kind == "host"}
        reflexive = {host for host, _ in event.mapped}
        if reflexive:
            nat = bool(reflexive - own)
            if nat != self.nat.media:
                log.info("media: %s (server-reflexive %s)",
                         "behind NAT" if nat else "on a public address",
                         ", ".join(sorted(reflexive)))
            self.nat.from_media(nat, [m for m in event.mapped if m[0] not in own])
            if self.behind_nat is False and stream._pooled \
                    and any(c.kind == "relay" for c in event.candidates) \
                    and not self._current_ice_servers().turn:
                # A public node (by the one verdict: STUN's answer wins over this gathering)
                # needs no relayed candidate from the mesh's relays: give the allocation back
                # now and gather again without (iceservers.ice_servers).
                self.loop.call_soon(self._recycle, stream)
        for failure in event.failures:
            log.debug("stream %d: ICE gathering: %s", stream.id, failure)

    def _bind_pair(self, host: str, *, dscp: bool) -> tuple[int, socket.socket, socket.socket]:
        family = _family(host)
        for _ in range(len(self._ports)):
            port = self._ports.take()
            if port is None:
                break
            socks: list[socket.socket] = []
            try:
                for p in (port, port + 1):
                    sock = socket.socket(family, socket.SOCK_DGRAM)
                    socks.append(sock)
                    sock.setblocking(False)
                    if dscp:
                        _set_dscp(sock, family)
                    sock.bind((host, p))
            except OSError:
                for sock in socks:
                    sock.close()
                self._ports.give_back(port)  # held by someone else: try it again much later
                continue
            return port, socks[0], socks[1]
        self.allocations_failed += 1
        raise MediaCapacityError(
            f"no free media port pair in {self._ports.first}-{self._ports.last}"
        )

    def _close_pair(self, pair: tuple[int, socket.socket, socket.socket]) -> None:
        pair[1].close()
        pair[2].close()
        self._ports.give_back(pair[0])

    def _forget(self, stream: MediaStream) -> None:
        if stream._pooled:
            with contextlib.suppress(ValueError):
                self._pool.remove(stream)
        if self._streams.pop(stream.id, None) is not None:
            retired = self.retired
            for name in _COUNTERS:
                retired[name] += getattr(stream, name)
            retired["lost"] += max(0, stream.reception.lost)
            if self._shared is None:
                self._ports.give_back(stream._phone_port)
            self._ports.give_back(stream._net_port)

    def close(self) -> None:
        """Release every stream and stop the timer."""
        self._closed = True
        if self._pool_handle is not None:
            self._pool_handle.cancel()
        for stream in list(self._streams.values()):
            stream.release()
        if self._shared is not None:
            self._shared.close()
        self._timer.cancel()
        self._heap.clear()

    # -- events and timers ---------------------------------------------------------------------

    def _emit(self, event: MediaEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("media event handler failed on %s", type(event).__name__)

    def _schedule(self, stream: MediaStream) -> None:
        """Put the stream's next deadline on the heap if it is earlier than what is there."""
        deadline = stream._next_deadline()
        if deadline is None or stream.state == CLOSED:
            return
        scheduled = stream._scheduled
        if scheduled is not None and scheduled <= deadline:
            return
        stream._scheduled = deadline
        heapq.heappush(self._heap, (deadline, next(self._heap_seq), stream))
        if self._heap[0][2] is stream:
            self._timer.arm(deadline)

    def _on_timer(self, now: float) -> None:
        heap = self._heap
        # uvloop's clock has millisecond steps: treat what is due within half of one as due,
        # rather than waking again for the remainder.
        horizon = now + 0.0005
        while heap and heap[0][0] <= horizon:
            deadline, _, stream = heapq.heappop(heap)
            if stream._scheduled != deadline or stream.state == CLOSED:
                continue  # superseded by an earlier deadline that already ran
            stream._scheduled = None
            stream._on_timer(max(now, deadline))
            self._schedule(stream)
        self._timer.arm(heap[0][0] if heap else None)

    # -- control API ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Totals over live streams and port usage, for the control API."""
        by_state: dict[str, int] = {}
        totals: dict[str, int] = {}
        for stream in self._streams.values():
            if stream._pooled:
                continue
            by_state[stream.state] = by_state.get(stream.state, 0) + 1
            stream.sync_counters()
            for name in _COUNTERS:
                totals[name] = totals.get(name, 0) + getattr(stream, name)
            totals["lost"] = totals.get("lost", 0) + max(0, stream.reception.lost)
        return {
            "streams": len(self._streams) - len(self._pool),
            "pooled": len(self._pool),
            "behind_nat": self.behind_nat,
            "nat_source": self.nat.source,
            "max_streams": self.max_streams,
            "by_state": by_state,
            "port_pairs_free": len(self._ports),
            "port_pairs_total": self._ports.capacity,
            "allocations_failed": self.allocations_failed,
            "policy": self.policy,
            "native": self.native and NATIVE_AVAILABLE,
            "phone_socket": "per-stream" if self._shared is None else "shared",
            "phone_unrouted": (
                0 if self._shared is None
                else self._shared.rtp.unrouted + self._shared.rtcp.unrouted
            ),
            "totals": totals,
        }


def _set_dscp(sock: socket.socket, family: socket.AddressFamily) -> None:
    with contextlib.suppress(OSError, AttributeError):
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, _DSCP_EF)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, _DSCP_EF)


# ---------------------------------------------------------------------------------------------
# One stream
# ---------------------------------------------------------------------------------------------

_COUNTERS: Final = (
    "phone_rtp_in",
    "phone_rtp_in_bytes",
    "phone_rtp_out",
    "phone_rtp_out_bytes",
    "phone_rtcp_in",
    "phone_rtcp_out",
    "net_rtp_in",
    "net_rtp_in_bytes",
    "net_rtp_out",
    "net_rtp_out_bytes",
    "net_rtcp_in",
    "net_rtcp_out",
    "zrtp_in",
    "zrtp_out",
    "zrtp_warnings",
    "stun_in",
    "auth_failures",
    "replays",
    "dropped_insecure",
    "dropped_other",
    "send_errors",
    "latches",
)


class MediaStream:
    """One m-line of one call: two socket pairs, a ZRTP session, SRTP contexts, counters.

    Made by `MediaEngine.allocate`. The daemon puts `local_softphone_rtp` into the SDP for the
    softphone and `local_network_rtp` plus `zrtp_hash_attribute` into the SDP for the far end,
    then feeds back what the other sides' SDP said (`set_softphone_target`, `set_remote`) and
    calls `start` once both are known.
    """

    __slots__ = (
        *_COUNTERS,
        "_attached",
        "_clear_ssrc",
        "_engine",
        "_followers",
        "_hop_in",
        "_hop_out",
        "_ice",
        "_ice_active",
        "_ice_relayed",
        "_ice_target",
        "_idle_check_at",
        "_idle_seen",
        "_last_active",
        "_leader",
        "_loop",
        "_ms_context",
        "_net_inner",
        "_net_port",
        "_net_rtcp_ep",
        "_net_rtcp_send",
        "_net_rtp_ep",
        "_net_rtp_raw",
        "_net_rtp_send",
        "_opening",
        "_peer_seen",
        "_peer_signature",
        "_peer_zrtp_hash",
        "_phone_port",
        "_phone_rtcp",
        "_phone_rtcp_ep",
        "_phone_rtcp_send",
        "_phone_rtp",
        "_phone_rtp_ep",
        "_phone_rtp_send",
        "_pooled",
        "_protect",
        "_protect_rtcp",
        "_remote_rtcp",
        "_remote_rtcp_mux",
        "_remote_rtp",
        "_rtcp_latched",
        "_rtp_authenticated",
        "_rtp_timeout",
        "_rx",
        "_scheduled",
        "_sdp_remote_rtp",
        "_srtp_in",
        "_srtp_out",
        "_start_wanted",
        "_unprotect",
        "_unprotect_rtcp",
        "_zrtp",
        "_zrtp_deadline",
        "_zrtp_held",
        "created_at",
        "failure_reason",
        "first_media_at",
        "ice_state",
        "id",
        "insecure_reason",
        "label",
        "peer_client_id",
        "result",
        "secure_at",
        "started_at",
        "state",
        "timed_out",
    )

    # counters (see _COUNTERS), plain ints for the control API
    phone_rtp_in: int
    phone_rtp_in_bytes: int
    phone_rtp_out: int
    phone_rtp_out_bytes: int
    phone_rtcp_in: int
    phone_rtcp_out: int
    net_rtp_in: int
    net_rtp_in_bytes: int
    net_rtp_out: int
    net_rtp_out_bytes: int
    net_rtcp_in: int
    net_rtcp_out: int
    zrtp_in: int
    zrtp_out: int
    zrtp_warnings: int
    stun_in: int
    auth_failures: int
    replays: int
    dropped_insecure: int
    dropped_other: int
    send_errors: int
    latches: int

    def __init__(
        self,
        engine: MediaEngine,
        stream_id: int,
        label: str,
        leader: MediaStream | None,
        phone_port: int,
        net_port: int,
    ) -> None:
        self._engine = engine
        self._loop = engine.loop
        self.id = stream_id
        self.label = label
        self.state: str = NEW
        self._leader = leader
        self._followers: list[MediaStream] = []
        self._attached = leader is None
        self._start_wanted = False
        self._phone_port = phone_port
        self._net_port = net_port
        for name in _COUNTERS:
            setattr(self, name, 0)
        self._rx = ReceptionStats()
        self._zrtp: z.ZrtpSession | None = self._make_zrtp(multistream=leader is not None)
        self._srtp_out: pylibsrtp.Session | None = None
        self._srtp_in: pylibsrtp.Session | None = None
        self._protect: Callable[[bytes], bytes] = _no_srtp
        self._protect_rtcp: Callable[[bytes], bytes] = _no_srtp
        self._unprotect: Callable[[bytes], bytes] = _no_srtp
        self._unprotect_rtcp: Callable[[bytes], bytes] = _no_srtp
        self._phone_rtp: Addr | None = None
        self._phone_rtcp: Addr | None = None
        self._remote_rtp: Addr | None = None
        self._remote_rtcp: Addr | None = None
        self._remote_rtcp_mux = False
        self._sdp_remote_rtp: Addr | None = None
        self._rtp_authenticated = False  # the RTP target was learnt from an authenticated packet
        self._rtcp_latched = False
        self._clear_ssrc: int | None = None
        self._peer_zrtp_hash: str | None = None
        self._peer_seen = False
        self._peer_signature: z.PeerSignature | None = None
        self._ms_context: z.MultistreamContext | None = None
        self.peer_client_id = ""
        self.result: StreamSecure | None = None
        self.insecure_reason: str | None = None
        self.failure_reason: str | None = None
        self.timed_out = False
        self.created_at = self._loop.time()
        self.started_at: float | None = None
        self.first_media_at: float | None = None
        self.secure_at: float | None = None
        self._zrtp_deadline: float | None = None
        self._rtp_timeout = engine.rtp_timeout
        self._idle_check_at: float | None = None
        self._idle_seen = 0
        self._last_active = 0.0
        self._scheduled: float | None = None
        self._phone_rtp_ep = _Endpoint(self)
        self._phone_rtcp_ep = _Endpoint(self)
        self._net_rtp_ep = _Endpoint(self)
        self._net_rtcp_ep = _Endpoint(self)
        self._phone_rtp_send: Callable[[bytes, Addr | None], None] = _no_send
        self._phone_rtcp_send: Callable[[bytes, Addr | None], None] = _no_send
        self._net_rtp_send: Callable[[bytes, Addr | None], None] = _no_send
        self._net_rtcp_send: Callable[[bytes, Addr | None], None] = _no_send
        self._net_rtp_raw: Callable[[bytes, Addr | None], None] = _no_send
        """The network RTP socket's own ``sendto`` (ICE's datagrams are wrapped already)."""
        self._net_inner: Handler = self._net_rtp_any
        """Where media that came through our TURN allocation goes once unwrapped."""
        self._ice: ice_.IceAgent | None = None
        self._ice_active = False  # the far end's SDP has ICE too: ICE decides the path
        self._ice_target: Addr | None = None
        self._ice_relayed = False
        self.ice_state = "off"
        self._zrtp_held = False  # ZRTP waits for ICE to find a path (RFC 8445 section 12.1)
        self._pooled = False
        self._opening: asyncio.Task[None] | None = None
        self._hop_out: _hop.Hop | None = None
        """Phone->net in C while the secure fast path runs natively (`_native_hops`)..."""
        self._hop_in: _hop.Hop | None = None
        """...and net->phone."""

    def _make_zrtp(self, *, multistream: bool) -> z.ZrtpSession | None:
        engine = self._engine
        if engine.policy == "off":
            return None
        return z.ZrtpSession(
            engine.zrtp_config,
            engine.secrets.zid,
            engine.secrets,
            ssrc=int.from_bytes(engine.urandom(4), "big"),
            urandom=engine.urandom,
            offer_multistream=multistream,
        )

    def _adopt(self, label: str, first: MediaStream | None) -> None:
        """A pooled stream joins a call: named, and made a further stream of ``first`` (a new
        ZRTP session offering Multistream: nothing of the old one was sent yet)."""
        self._pooled = False
        self.label = label
        self.created_at = self._loop.time()
        if first is not None:
            self._leader = first
            self._attached = False
            first._followers.append(self)
            if self._zrtp is not None:
                self._zrtp.close()
                self._zrtp = self._make_zrtp(multistream=True)
        self._update_handlers()

    def __repr__(self) -> str:
        return f"MediaStream(id={self.id}, label={self.label!r}, state={self.state})"

    async def _open(
        self,
        phone_rtp: socket.socket | None,
        phone_rtcp: socket.socket | None,
        net: tuple[socket.socket, socket.socket],
    ) -> None:
        """Give the stream's sockets to the loop; with the shared softphone socket (None for
        both phone sockets), its phone endpoints send on that one's transport."""
        loop = self._loop
        pairs: list[tuple[_Endpoint, socket.socket]] = [
            (self._net_rtp_ep, net[0]), (self._net_rtcp_ep, net[1])]
        if phone_rtp is not None and phone_rtcp is not None:
            pairs[:0] = [(self._phone_rtp_ep, phone_rtp), (self._phone_rtcp_ep, phone_rtcp)]
        engine = self._engine
        native = engine.native and engine.native_reader and NativeDatagramTransport is not None
        shared = engine._shared
        try:
            if shared is not None:
                if shared.opening is not None:
                    await asyncio.shield(shared.opening)
                self._phone_rtp_ep.transport = shared.rtp.transport
                self._phone_rtcp_ep.transport = shared.rtcp.transport
            for ep, sock in pairs:
                if native:
                    try:  # read in C (`NativeDatagramTransport`): where the loop can
                        NativeDatagramTransport(loop, sock, ep)
                        continue
                    except NotImplementedError:  # no add_reader (not on Linux loops)
                        native = False
                await loop.create_datagram_endpoint(_factory(ep), sock=sock)
        except BaseException as exc:
            for ep, sock in pairs:
                if ep.transport is None:
                    sock.close()
            self._opening = None
            if not isinstance(exc, Exception):
                self.release()
                raise  # cancelled: the loop is going away
            log.error("stream %d: media sockets not set up: %s", self.id, exc)
            self._fail(f"media sockets could not be set up: {exc}")
            self.release()
            return
        self._opening = None
        if self.state == CLOSED:  # released while the sockets were being set up
            self._close_transports()
            return
        self._phone_rtp_send = self._sender(self._phone_rtp_ep)
        self._phone_rtcp_send = self._sender(self._phone_rtcp_ep)
        self._net_rtp_raw = self._sender(self._net_rtp_ep)
        self._set_net_senders()
        if self._ice is not None:
            self._ice_pump(loop.time())  # gathering's first requests waited for the socket
        # If ZRTP started before this point, its first Hello went nowhere; the retransmission
        # timer resends it (RFC 6189 section 6).
        self._update_handlers()
        for ep in (self._phone_rtp_ep, self._phone_rtcp_ep, self._net_rtp_ep, self._net_rtcp_ep):
            early, ep.early = ep.early, []
            for data, addr in early:
                if self.state == CLOSED:
                    return
                ep.datagram_received(data, addr)

    @staticmethod
    def _sender(ep: _Endpoint) -> Callable[[bytes, Addr | None], None]:
        """The socket's ``sendto``; a socket already gone (its transport lost, e.g. the port
        taken from under us) sends nothing rather than failing the SIP message being handled
        (seen in the hour soak as an AssertionError from ``set_remote``)."""
        if ep.transport is None:
            return _no_send
        return ep.transport.sendto

    # -- what goes into SDP --------------------------------------------------------------------

    @property
    def local_softphone_rtp(self) -> tuple[str, int]:
        """Our loopback RTP address: the ``c=``/``m=`` of the SDP given to the softphone."""
        return (self._engine.loopback_host, self._phone_port)

    @property
    def local_softphone_rtcp(self) -> tuple[str, int]:
        return (self._engine.loopback_host, self._phone_port + 1)

    @property
    def local_network_rtp(self) -> tuple[str, int]:
        """Our media address and RTP port: the ``c=``/``m=`` of the SDP sent to the far end."""
        return (self._engine.address, self._net_port)

    @property
    def local_network_rtcp(self) -> tuple[str, int]:
        return (self._engine.address, self._net_port + 1)

    @property
    def zrtp_hash_attribute(self) -> str | None:
        """The ``a=zrtp-hash`` value for the far end's SDP (None when policy is off)."""
        return self._zrtp.zrtp_hash_attribute if self._zrtp is not None else None

    # -- what the daemon learns from SDP -------------------------------------------------------

    def set_softphone_target(
        self, rtp: tuple[str, int], rtcp: tuple[str, int] | None = None
    ) -> None:
        """Where the softphone receives (its SDP); RTCP defaults to RTP port + 1."""
        family = _family(self._engine.loopback_host)
        self._phone_rtp = _normalise(rtp[0], rtp[1], family)
        self._phone_rtcp = (
            _normalise(rtcp[0], rtcp[1], family) if rtcp else _next_port(self._phone_rtp)
        )
        self._update_handlers()

    def set_remote(
        self,
        rtp: tuple[str, int],
        rtcp: tuple[str, int] | None = None,
        *,
        rtcp_mux: bool = False,
        zrtp_hash: str | None = None,
    ) -> None:
        """The far end's media address from its SDP, and its ``a=zrtp-hash`` value if any.

        A target latched from authenticated packets is kept when the SDP repeats the address it
        had (a re-INVITE through NAT); a new SDP address replaces it. ``zrtp_hash`` binds the
        peer's Hello to signalling (RFC 6189 section 8.1); a mismatch fails the stream.
        """
        family = _family(self._engine.bind_host)
        addr = _normalise(rtp[0], rtp[1], family)
        if self._ice_active:
            # ICE chooses where media goes; the SDP address is only its default candidate.
            self._sdp_remote_rtp = addr
            rtcp_mux = True  # RFC 8839 streams of ours are always muxed (one component)
        elif addr != self._sdp_remote_rtp:
            first_sdp = self._sdp_remote_rtp is None
            self._sdp_remote_rtp = addr
            if not (first_sdp and self._remote_rtp is not None):
                # The SDP address, unless ZRTP already showed where the far end really is
                # (it answered before its SDP reached us); a new address in a later SDP
                # means the far end moved: start latching afresh.
                self._remote_rtp = addr
                self._rtp_authenticated = False
                self._rtcp_latched = False
        self._remote_rtcp_mux = rtcp_mux
        if rtcp_mux:
            self._remote_rtcp = self._remote_rtp
        elif not self._rtcp_latched:
            assert self._remote_rtp is not None
            self._remote_rtcp = (
                _normalise(rtcp[0], rtcp[1], family) if rtcp else _next_port(self._remote_rtp)
            )
        self._set_net_senders()
        if zrtp_hash is not None and self._zrtp is not None:
            self._peer_zrtp_hash = zrtp_hash
            if self.state in (NEW, SECURING):
                now = self._loop.time()
                self._zrtp.set_expected_peer_hello_hash(zrtp_hash, now)
                self._pump(now)
        self._update_handlers()

    def set_rtp_timeout(self, seconds: float | None) -> None:
        """Change the inactivity bound (None: never), e.g. while the call is on hold."""
        self._rtp_timeout = seconds
        if seconds is None:
            self._idle_check_at = None
        elif self.started_at is not None and not self.timed_out:
            now = self._loop.time()
            self._last_active = now
            self._idle_check_at = now + _idle_period(seconds)
            self._engine._schedule(self)

    # -- ICE (RFC 8445, RFC 8839) ---------------------------------------------------------------

    @property
    def ice_parameters(self) -> ice_.IceParameters | None:
        """Our ufrag, password and candidates for the far end's SDP (None: no ICE here)."""
        return self._ice.local_parameters if self._ice is not None else None

    def set_remote_ice(self, params: ice_.IceParameters | None, *, controlling: bool) -> None:
        """The far end's ICE attributes from its SDP, or None when it does not do ICE (the
        stream then works as without: SDP address and latching). ``controlling``: we made
        the offer (RFC 8839 section 4.4.1.1). Call before `set_remote` for the same SDP."""
        agent = self._ice
        if agent is None or self.state == CLOSED:
            return
        now = self._loop.time()
        if params is None:
            if not self._ice_active:
                self._drop_ice(now)
            return
        agent.set_role(controlling)
        if not self._ice_active:
            self._ice_active = True
            self.ice_state = "checking"
            self._remote_rtp = self._remote_rtcp = None
            self._rtp_authenticated = False
            self._update_handlers()
        agent.set_remote(params, now)
        self._ice_pump(now)

    def _drop_ice(self, now: float) -> None:
        """The far end does not do ICE: free what gathering took (a TURN allocation)."""
        agent, self._ice = self._ice, None
        self.ice_state = "off"
        if agent is not None:
            agent.close(now)
            for data, dest in agent.datagrams_to_send():
                self._net_rtp_raw(data, dest)

    def _ice_pump(self, now: float) -> None:
        """After any input to the agent: send its datagrams, act on its events."""
        agent = self._ice
        if agent is None or self._opening is not None:
            return  # datagrams wait in the agent until the socket is with the loop
        for data, dest in agent.datagrams_to_send():
            self._net_rtp_raw(data, dest)
        while (event := agent.next_event()) is not None:
            if isinstance(event, ice_.GatheringComplete):
                self._engine._gathered(self, event)
            elif isinstance(event, (ice_.PairValid, ice_.PairSelected)):
                self._ice_path(event, now)
            elif isinstance(event, ice_.IceFailed):
                self.ice_state = "failed"
                if self._ice_active and self.state in (NEW, SECURING, CLEAR):
                    self._fail(f"no media path to the far end: ICE failed ({event.reason})")
            elif isinstance(event, ice_.ConsentLost) and self.state != CLOSED:
                # RFC 7675 section 5.1: stop sending; the call is over for the user too.
                self.ice_state = "consent-lost"
                self._net_rtp_send = self._net_rtcp_send = _no_send
                self._update_handlers()  # the C hop stops sending too
                self.timed_out = True
                log.info("stream %d: the far end stopped answering consent checks", self.id)
                self._engine._emit(MediaTimeout(self, ice_.CONSENT_TIMEOUT))
            if self.state == CLOSED:
                return
        self._engine._schedule(self)

    def _ice_path(self, event: ice_.PairValid | ice_.PairSelected, now: float) -> None:
        """Media (and ZRTP) go where ICE found the far end: a valid pair at first, the
        nominated one once selected (RFC 8445 section 12.1)."""
        if not self._ice_active or self.state == CLOSED:
            return
        selected = isinstance(event, ice_.PairSelected)
        target = _normalise(event.remote.host, event.remote.port,
                            _family(self._engine.bind_host))
        moved = target != self._ice_target or event.relayed != self._ice_relayed
        self._ice_target = target
        self._ice_relayed = event.relayed
        self._remote_rtp = self._remote_rtcp = target
        self._rtp_authenticated = True  # the check was signed with the password from SDP
        self._rtcp_latched = True
        if selected or self.ice_state == "checking":
            self.ice_state = "relayed" if event.relayed else "direct"
            if not selected:
                self.ice_state += " (checking)"
        if moved or selected:
            log.info("stream %d: media %s %s (%s candidate)%s", self.id,
                     "through the relay to" if event.relayed else "directly to", target[:2],
                     event.remote.kind, "" if selected else ", before nomination")
        self._set_net_senders()
        if self._zrtp_held and self.state == SECURING:
            self._zrtp_held = False
            zs = self._zrtp
            assert zs is not None
            self._zrtp_deadline = now + self._engine.zrtp_timeout
            zs.start(now)
            self._pump(now)
        self._update_handlers()

    def _ice_in(self, data: bytes, addr: Addr) -> None:
        """STUN, or TURN ChannelData from our relay: the agent's; media inside goes on."""
        agent = self._ice
        if agent is None:
            self.stun_in += 1
            return  # RFC 7983 demultiplexing only
        now = self._loop.time()
        inner = agent.receive(data, (addr[0], addr[1]), now)
        self._ice_pump(now)
        if inner is None or self.state == CLOSED or self._pooled:
            self.stun_in += 1  # ICE's own, or nothing to pass on
            return
        payload, peer = inner
        try:
            source = _normalise(peer[0], peer[1], _family(self._engine.bind_host))
        except ValueError:
            self.dropped_other += 1
            return
        self._net_inner(payload, source)

    def _net_rtp_relayed(self, data: bytes, addr: Addr) -> None:
        """The network socket while the path goes through our TURN allocation."""
        if data and (data[0] < 4 or 0x40 <= data[0] <= 0x4F):
            self._ice_in(data, addr)
        else:
            self._net_rtp_any(data, addr)

    def _net_rtp_pooled(self, data: bytes, addr: Addr) -> None:
        """A pre-gathered stream with no call: only its servers' answers matter."""
        if data and (data[0] < 4 or 0x40 <= data[0] <= 0x4F):
            self._ice_in(data, addr)
        else:
            self.dropped_other += 1

    def _send_relayed(self, data: bytes, addr: Addr | None) -> None:
        agent = self._ice
        if agent is None or addr is None:
            return
        wrapped = agent.wrap(data, (addr[0], addr[1]))
        if wrapped is not None:
            self._net_rtp_raw(*wrapped)

    def _set_net_senders(self) -> None:
        if self._net_rtp_ep.transport is None:
            return
        send = self._send_relayed if self._ice_relayed else self._net_rtp_raw
        self._net_rtp_send = send
        self._net_rtcp_send = send if self._remote_rtcp_mux else self._sender(self._net_rtcp_ep)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Begin: ZRTP Hello (or clear forwarding under policy off). Idempotent."""
        if self.state == NEW:
            self._begin(self._loop.time(), start_zrtp=True)

    def _begin(self, now: float, *, start_zrtp: bool) -> None:
        self.started_at = now
        if self._rtp_timeout is not None:
            self._last_active = now
            self._idle_check_at = now + _idle_period(self._rtp_timeout)
        if self._zrtp is None:
            self._go_clear("security.policy is off")
            self._engine._schedule(self)
            return
        self.state = SECURING
        self._start_wanted = True
        if not self._attached:
            leader = self._leader
            assert leader is not None
            if leader.state == CLEAR:
                self._go_clear(f"first stream of the call is clear: {leader.insecure_reason}")
            elif leader.state == FAILED:
                self._fail(f"first stream of the call failed: {leader.failure_reason}")
            elif leader.state == SECURE:
                self._leader_secure(leader._ms_context, now)
            self._engine._schedule(self)
            return  # waits for the first stream (section 4.4.1: one DH exchange at a time)
        if self._ice_active and self._ice_target is None:
            self._zrtp_held = True  # _ice_path starts it (and its bound) on the first path
            self._engine._schedule(self)
            return
        self._zrtp_deadline = now + self._engine.zrtp_timeout
        if start_zrtp:
            self._zrtp.start(now)
            self._pump(now)
        else:
            self._engine._schedule(self)

    def release(self) -> None:
        """End of the call: close sockets, erase keys (RFC 6189 4.7.3), return the ports."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._update_handlers()
        if self._ice is not None:
            self._drop_ice(self._loop.time())  # TURN's Refresh(0) leaves before the socket goes
        self._close_transports()
        if self._zrtp is not None:
            self._zrtp.close()
        self._srtp_out = self._srtp_in = None
        self._ms_context = None
        self._protect = self._protect_rtcp = self._unprotect = self._unprotect_rtcp = _no_srtp
        self._phone_rtp_send = self._phone_rtcp_send = _no_send
        self._net_rtp_send = self._net_rtcp_send = _no_send
        self._zrtp_deadline = self._idle_check_at = None
        # No reference cycles left through this stream (see _close_transports): its own
        # bound method as the inner handler, and the StreamSecure event naming it (its
        # figures were read at the call's end, docs/api.md).
        self._net_inner = _ignore
        self.result = None
        if self._leader is not None:
            with contextlib.suppress(ValueError):
                self._leader._followers.remove(self)
        self._engine._forget(self)

    def _close_transports(self) -> None:
        shared = self._engine._shared
        if shared is not None:  # the shared socket stays; this stream's claims on it go
            shared.sync(self)
            self._phone_rtp_ep.transport = self._phone_rtcp_ep.transport = None
        for ep in (self._phone_rtp_ep, self._phone_rtcp_ep, self._net_rtp_ep, self._net_rtcp_ep):
            if ep.transport is not None:
                ep.transport.close()
            # Break the stream <-> endpoint cycles (the endpoint outlives us until the loop
            # calls connection_lost): a released stream, its ZRTP session and its SRTP
            # contexts are then freed at once, not at the next full collection. A soak
            # showed them piling up between collections (docs/performance.md, "Soak").
            ep.datagram_received = _ignore  # type: ignore[method-assign]
            ep.stream = None
            ep.early.clear()

    # -- ZRTP passthrough ----------------------------------------------------------------------

    def provide_signature(self, sig_type: bytes, data: bytes | None) -> None:
        """Answer `SasSignatureNeeded`: a signature of sashash, or None to send Confirm unsigned."""
        if self._zrtp is not None and self.state in (NEW, SECURING):
            now = self._loop.time()
            self._zrtp.provide_signature(sig_type, data, now)
            self._pump(now)

    def mark_sas_verified(self, verified: bool = True) -> None:
        """The user compared the SAS (section 7.1)."""
        if self._zrtp is None or self.state != SECURE:
            raise RuntimeError("the SAS can only be confirmed on a secure stream")
        self._zrtp.mark_sas_verified(verified)

    def peer_signature_verified(self) -> None:
        """The peer's SAS signature verified (lifts a delayed cache update, 4.6.1.1)."""
        if self._zrtp is not None and self.state == SECURE:
            self._zrtp.peer_signature_verified()

    # -- observation ---------------------------------------------------------------------------

    @property
    def secure(self) -> bool:
        return self.state == SECURE

    @property
    def remote_rtp_address(self) -> Addr | None:
        """Where RTP toward the far end goes now (the SDP address or a latched source)."""
        return self._remote_rtp

    @property
    def remote_rtcp_address(self) -> Addr | None:
        return self._remote_rtcp

    @property
    def reception(self) -> ReceptionStats:
        self.sync_counters()
        return self._rx

    def sync_counters(self) -> None:
        """Bring the counter attributes and `reception` up to date: while the C hops run,
        they count in C. `stats`, `reception`, the engine's totals and the inactivity check
        call this; anything else reading the counter attributes should too."""
        hop_out, hop_in = self._hop_out, self._hop_in
        if hop_out is None or hop_in is None:
            return
        packets, octets, sent, sent_octets, dropped, errors = hop_out.take()
        self.phone_rtp_in += packets
        self.phone_rtp_in_bytes += octets
        self.net_rtp_out += sent
        self.net_rtp_out_bytes += sent_octets
        self.dropped_other += dropped
        self.send_errors += errors
        packets, octets, sent, sent_octets, dropped, errors = hop_in.take()
        self.net_rtp_in += packets
        self.net_rtp_in_bytes += octets
        self.phone_rtp_out += sent
        self.phone_rtp_out_bytes += sent_octets
        self.dropped_other += dropped
        self.send_errors += errors
        self._rx.set_state(hop_in.rx_state)

    def stats(self) -> dict[str, Any]:
        """Counters and state for the control API (no key material)."""
        self.sync_counters()
        out: dict[str, Any] = {name: getattr(self, name) for name in _COUNTERS}
        result = self.result
        out.update(
            id=self.id,
            label=self.label,
            state=self.state,
            secure=self.state == SECURE,
            insecure_reason=self.insecure_reason,
            failure_reason=self.failure_reason,
            local_softphone=list(self.local_softphone_rtp),
            local_network=list(self.local_network_rtp),
            remote_rtp=list(self._remote_rtp[:2]) if self._remote_rtp else None,
            remote_authenticated=self._rtp_authenticated
            or (self.state == SECURE and self.net_rtp_in > 0),
            loss=self._rx.as_dict(),
            zrtp_ms=(
                round((self.secure_at - self.started_at) * 1000, 1)
                if self.secure_at is not None and self.started_at is not None
                else None
            ),
            sas=result.sas if result else None,
            sas_type=result.sas_type if result else None,
            continuity=result.continuity if result else None,
            peer_zid=result.peer_zid.hex() if result else None,
            cipher=f"{result.cipher}/{result.auth_tag}" if result else None,
            peer_client=self.peer_client_id or None,
            ice=self._ice_stats(),
            native=self._hop_out is not None,
        )
        return out

    def _ice_stats(self) -> dict[str, Any] | None:
        agent = self._ice
        if agent is None:
            return None
        return {
            "state": self.ice_state,
            "candidates": sorted({c.kind for c in agent.local_candidates}),
            "remote": list(self._ice_target[:2]) if self._ice_target else None,
            "relayed": self._ice_relayed,
            **agent.stats,
        }

    # -- handlers: which function each socket calls ----------------------------------------------

    def _update_handlers(self) -> None:
        """Point each socket at the path for the current state (fast paths need both targets);
        with the shared softphone socket, claim the softphone's addresses (and C hop) there."""
        self._set_handlers()
        shared = self._engine._shared
        if shared is not None:
            shared.sync(self)

    def _set_handlers(self) -> None:
        st = self.state
        if self._opening is not None and st != CLOSED:
            return  # the endpoints keep datagrams until _open hands them over
        phone_rtp: Handler
        net_rtp: Handler
        secure = False
        if self._pooled and st != CLOSED:
            self._phone_rtp_ep.datagram_received = _ignore  # type: ignore[method-assign]
            self._net_rtp_ep.datagram_received = self._net_rtp_pooled  # type: ignore[method-assign]
            self._phone_rtcp_ep.datagram_received = _ignore  # type: ignore[method-assign]
            self._net_rtcp_ep.datagram_received = _ignore  # type: ignore[method-assign]
            return
        if st == CLOSED:
            phone_rtp = net_rtp = _ignore
        elif st == SECURE and self._phone_rtp is not None and self._remote_rtp is not None:
            phone_rtp, net_rtp = self._phone_rtp_secure, self._net_rtp_secure
            secure = True
        elif st == CLEAR and self._phone_rtp is not None and self._remote_rtp is not None:
            phone_rtp = self._phone_rtp_clear
            net_rtp = self._net_rtp_clear if self._clear_ssrc is not None else self._net_rtp_any
        else:
            phone_rtp, net_rtp = self._phone_rtp_any, self._net_rtp_any
        self._net_inner = net_rtp if net_rtp is not _ignore else self._net_rtp_any
        if self._ice_relayed and st != CLOSED:
            net_rtp = self._net_rtp_relayed
        hops = self._native_hops() if secure else None
        if hops is not None:
            phone_rtp, net_rtp = hops
        elif self._hop_out is not None:
            self.sync_counters()
            self._hop_out = self._hop_in = None
        eps = (self._phone_rtp_ep, self._net_rtp_ep, self._phone_rtcp_ep, self._net_rtcp_ep)
        handlers: tuple[Handler, ...] = (
            phone_rtp,
            net_rtp,
            _ignore if st == CLOSED else self._phone_rtcp_in,
            _ignore if st == CLOSED else self._net_rtcp_in,
        )
        for ep, handler in zip(eps, handlers, strict=True):
            ep.datagram_received = handler  # type: ignore[method-assign,assignment]

    def _native_hops(self) -> tuple[_hop.Hop, _hop.Hop] | None:
        """The secure fast path in C, where it applies: the extension is built, the engine
        allows it, and both sides send straight on their own sockets (not through our TURN
        relay, not after ICE consent was lost). Made once per keying, retargeted after."""
        if (
            _hop is None
            or not self._engine.native
            or self._net_rtp_send is not self._net_rtp_raw
            or self._phone_rtp_send is _no_send
        ):
            return None
        net_t, phone_t = self._net_rtp_ep.transport, self._phone_rtp_ep.transport
        if net_t is None or phone_t is None:
            return None
        phone, remote = self._phone_rtp, self._remote_rtp
        assert phone is not None and remote is not None
        hop_out, hop_in = self._hop_out, self._hop_in
        if hop_out is not None and hop_in is not None:
            hop_out.set_dest(remote)
            hop_in.set_dest(phone)
            hop_in.set_source(remote)
            return hop_out, hop_in
        tx, rx = self._srtp_out, self._srtp_in
        if tx is None or rx is None:
            return None
        protect, unprotect = srtp_pointers(tx, "protect"), srtp_pointers(rx, "unprotect")
        if protect is None or unprotect is None:
            return None
        try:
            net_fd = net_t.get_extra_info("socket").fileno()
            phone_fd = phone_t.get_extra_info("socket").fileno()
            hop_out = _hop.Hop(tx, *protect, net_fd, remote, self._phone_rtp_secure)
            hop_in = _hop.Hop(rx, *unprotect, phone_fd, phone, self._net_rtp_secure,
                              unprotect=True, source=remote, latch=self._hop_latch)
        except (AttributeError, OSError, ValueError) as exc:
            log.debug("stream %d: secure path stays in Python: %s", self.id, exc)
            return None
        hop_in.rx_state = self._rx.state()
        self._hop_out, self._hop_in = hop_out, hop_in
        log.debug("stream %d: secure path in C", self.id)
        return hop_out, hop_in

    def _hop_latch(self, addr: Addr) -> None:
        """The C hop authenticated a packet from a source other than the remote: latch."""
        self._latch_rtp(addr, authenticated=True)

    # Fast paths. Keep them short: every line here runs 50 times a second per call and side.

    def _phone_rtp_secure(self, data: bytes, addr: Addr) -> None:
        try:
            if 191 < data[1] < 224:  # RFC 5761 muxed RTCP from the softphone
                self._phone_rtcp_in(data, addr)
                return
            out = self._protect(data)
        except IndexError:
            self.dropped_other += 1
            return
        except _SRTP_ERRORS:
            self.dropped_other += 1
            return
        self.phone_rtp_in += 1
        self.phone_rtp_in_bytes += len(data)
        self._net_rtp_send(out, self._remote_rtp)
        self.net_rtp_out += 1
        self.net_rtp_out_bytes += len(out)

    def _net_rtp_secure(self, data: bytes, addr: Addr) -> None:
        try:
            plain = self._unprotect(data)
        except _SRTP_ERRORS as exc:
            self._net_rtp_rejected(data, addr, exc)
            return
        self.net_rtp_in += 1
        self.net_rtp_in_bytes += len(data)
        rx, seq = self._rx, data[2] << 8 | data[3]
        if 0 <= rx.max_seq < seq < rx.max_seq + MAX_DROPOUT:
            rx.max_seq = seq  # in order, no wrap: RFC 3550 A.3's common case, without a call
            rx.received += 1
        else:
            rx.update(seq)
        if addr != self._remote_rtp:
            self._latch_rtp(addr, authenticated=True)
        self._phone_rtp_send(plain, self._phone_rtp)
        self.phone_rtp_out += 1
        self.phone_rtp_out_bytes += len(plain)

    def _phone_rtp_clear(self, data: bytes, addr: Addr) -> None:
        if len(data) < RTP_HEADER_LEN or 191 < data[1] < 224:
            self._phone_rtp_any(data, addr)
            return
        self.phone_rtp_in += 1
        self.phone_rtp_in_bytes += len(data)
        self._net_rtp_send(data, self._remote_rtp)
        self.net_rtp_out += 1
        self.net_rtp_out_bytes += len(data)

    def _net_rtp_clear(self, data: bytes, addr: Addr) -> None:
        if (
            addr != self._remote_rtp
            or len(data) < RTP_HEADER_LEN
            or data[0] & 0xC0 != 0x80
            or 191 < data[1] < 224
        ):
            self._net_rtp_any(data, addr)
            return
        self.net_rtp_in += 1
        self.net_rtp_in_bytes += len(data)
        self._rx.update(data[2] << 8 | data[3])
        self._phone_rtp_send(data, self._phone_rtp)
        self.phone_rtp_out += 1
        self.phone_rtp_out_bytes += len(data)

    # Slow paths: every state, every kind of datagram.

    def _phone_rtp_any(self, data: bytes, addr: Addr) -> None:
        st = self.state
        if st in (CLOSED, FAILED) or len(data) < RTP_HEADER_LEN:
            self.dropped_other += 1
            return
        if is_rtcp_type(data[1]):
            self._phone_rtcp_in(data, addr)
            return
        if self._phone_rtp is None:
            self.set_softphone_target((addr[0], addr[1]))  # no SDP yet: answer where it sends from
        if self.first_media_at is None:
            self.first_media_at = self._loop.time()
        self.phone_rtp_in += 1
        self.phone_rtp_in_bytes += len(data)
        if st == NEW:
            self._begin(self._loop.time(), start_zrtp=True)
            st = self.state
        if self._remote_rtp is None or st not in (SECURE, CLEAR):
            self.dropped_insecure += 1  # never in clear before the stream is secure
            return
        if st == SECURE:
            try:
                out = self._protect(data)
            except _SRTP_ERRORS:
                self.dropped_other += 1
                return
        else:
            out = data
        self._net_rtp_send(out, self._remote_rtp)
        self.net_rtp_out += 1
        self.net_rtp_out_bytes += len(out)

    def _net_rtp_any(self, data: bytes, addr: Addr) -> None:
        st = self.state
        if st == CLOSED:
            return
        kind = classify_datagram(data)
        if kind == "zrtp":
            self._zrtp_in(data, addr)
            return
        if kind == "rtcp":
            self._net_rtcp_in(data, addr)
            return
        if kind == "stun" or (kind == "unknown" and 0x40 <= data[0] <= 0x4F):
            self._ice_in(data, addr)  # STUN, or ChannelData (RFC 7983 section 7)
            return
        if kind != "rtp" or len(data) < RTP_HEADER_LEN:
            self.dropped_other += 1
            return
        if st == NEW and self._zrtp is None:
            self._begin(self._loop.time(), start_zrtp=False)  # policy off: clear from the start
            st = self.state
        if st == SECURE:
            try:
                plain = self._unprotect(data)
            except _SRTP_ERRORS as exc:
                self._count_srtp_failure(exc)
                return
            self._accept_net_rtp(data, plain, addr, authenticated=True)
        elif st == CLEAR:
            if not self._clear_source_ok(data, addr):
                self.dropped_other += 1
                return
            self._accept_net_rtp(data, data, addr, authenticated=False)
            if self._clear_ssrc is not None and self._phone_rtp is not None:
                self._update_handlers()  # the source is known now: the fast path can take over
        elif st == SECURING and self._zrtp is not None and self._zrtp.keys is not None:
            self._early_srtp(data, addr)
        else:
            self.dropped_insecure += 1

    def _net_rtp_rejected(self, data: bytes, addr: Addr, exc: Exception) -> None:
        """The secure fast path's fallback: not SRTP that authenticates. Find out what it is."""
        kind = classify_datagram(data)
        if kind == "zrtp":
            self._zrtp_in(data, addr)
        elif kind == "rtcp":
            self._net_rtcp_in(data, addr)
        elif kind == "stun" or (kind == "unknown" and 0x40 <= data[0] <= 0x4F):
            self._ice_in(data, addr)
        elif kind == "rtp":
            self._count_srtp_failure(exc)
        else:
            self.dropped_other += 1

    def _count_srtp_failure(self, exc: Exception) -> None:
        if _REPLAY in str(exc):
            self.replays += 1
        elif isinstance(exc, pylibsrtp.Error):
            self.auth_failures += 1
        else:
            self.dropped_other += 1

    def _accept_net_rtp(
        self, data: bytes, plain: bytes, addr: Addr, *, authenticated: bool
    ) -> None:
        self.net_rtp_in += 1
        self.net_rtp_in_bytes += len(data)
        self._rx.update(data[2] << 8 | data[3])
        if addr != self._remote_rtp:
            self._latch_rtp(addr, authenticated=authenticated)
        if self._phone_rtp is None:
            self.dropped_other += 1
            return
        self._phone_rtp_send(plain, self._phone_rtp)
        self.phone_rtp_out += 1
        self.phone_rtp_out_bytes += len(plain)

    def _early_srtp(self, data: bytes, addr: Addr) -> None:
        """Initiator before Conf2ACK: the responder's SRTP, if it authenticates, confirms keys."""
        zs = self._zrtp
        assert zs is not None
        keys = zs.keys
        assert keys is not None
        if self._srtp_in is None:
            self._install_srtp(keys)
        try:
            plain = self._unprotect(data)
        except _SRTP_ERRORS as exc:
            self._count_srtp_failure(exc)
            return
        now = self._loop.time()
        zs.srtp_media_received(now)
        self._pump(now)
        if self.state == SECURE:
            self._rtp_authenticated = True
            self._accept_net_rtp(data, plain, addr, authenticated=True)
        else:
            self.dropped_insecure += 1

    def _latch_rtp(self, addr: Addr, *, authenticated: bool) -> None:
        """Send to where the far end really is (symmetric RTP); see the module docstring."""
        if self._ice_active:
            return  # ICE chose the path and checks it (consent); packets do not move it
        old = self._remote_rtp
        self._remote_rtp = addr
        self._rtp_authenticated = authenticated
        self.latches += 1
        if self._hop_out is not None and self._hop_in is not None:
            self._hop_out.set_dest(addr)
            self._hop_in.set_source(addr)
        if self._remote_rtcp_mux:
            self._remote_rtcp = addr
        elif not self._rtcp_latched:
            self._remote_rtcp = _next_port(addr)  # best guess until SRTCP shows the real one
        log.debug(
            "stream %d: media to %s (was %s)%s",
            self.id,
            addr,
            old,
            "" if authenticated else ", provisional",
        )

    def _clear_source_ok(self, data: bytes, addr: Addr) -> bool:
        """Clear mode, no authentication: the first source, then only the same SSRC moves."""
        ssrc = rtp_ssrc(data)
        if self._clear_ssrc is None:
            self._clear_ssrc = ssrc
            return True
        if addr == self._remote_rtp:
            self._clear_ssrc = ssrc  # the established source changed SSRC (a new RTP session)
            return True
        return ssrc == self._clear_ssrc

    # RTCP: low rate (RFC 3550 6.2: about 5 s apart), always the general path.

    def _phone_rtcp_in(self, data: bytes, addr: Addr) -> None:
        st = self.state
        if st in (CLOSED, FAILED) or len(data) < 8:
            self.dropped_other += 1
            return
        self.phone_rtcp_in += 1
        if self._remote_rtcp is None or st not in (SECURE, CLEAR):
            self.dropped_insecure += 1
            return
        if st == SECURE:
            try:
                out = self._protect_rtcp(data)
            except _SRTP_ERRORS:
                self.dropped_other += 1
                return
        else:
            out = data
        self._net_rtcp_send(out, self._remote_rtcp)
        self.net_rtcp_out += 1

    def _net_rtcp_in(self, data: bytes, addr: Addr) -> None:
        st = self.state
        if st == CLOSED:
            return
        if st == SECURE:
            try:
                plain = self._unprotect_rtcp(data)
            except _SRTP_ERRORS as exc:
                self._count_srtp_failure(exc)
                return
            authenticated = True
        elif st == CLEAR:
            if len(data) < 8 or data[0] >> 6 != 2 or not self._clear_rtcp_source_ok(data, addr):
                self.dropped_other += 1
                return
            plain, authenticated = data, False
        else:
            self.dropped_insecure += 1
            return
        self.net_rtcp_in += 1
        if addr != self._remote_rtcp and (authenticated or not self._remote_rtcp_mux):
            self._remote_rtcp = addr
            self._rtcp_latched = True
        if self._phone_rtcp is not None:
            self._phone_rtcp_send(plain, self._phone_rtcp)
            self.phone_rtcp_out += 1

    def _clear_rtcp_source_ok(self, data: bytes, addr: Addr) -> bool:
        remote = self._remote_rtp
        if remote is not None and addr[0] == remote[0]:
            return True
        return self._clear_ssrc is not None and int.from_bytes(data[4:8], "big") == self._clear_ssrc

    # -- ZRTP ----------------------------------------------------------------------------------

    def _zrtp_in(self, data: bytes, addr: Addr) -> None:
        zs = self._zrtp
        st = self.state
        if zs is None or st in (CLEAR, CLOSED):
            self.dropped_other += 1
            return
        if not self._attached:
            self.dropped_insecure += 1  # a further stream waits for the first; Hello is resent
            return
        if self._ice_active and self._ice_target is None:
            self.dropped_insecure += 1  # no checked path back yet; the far end resends
            return
        now = self._loop.time()
        self.zrtp_in += 1
        if st == NEW:
            self._begin(now, start_zrtp=False)  # receive() sends our Hello first
        before = zs.state
        zs.receive(data, now)
        after = zs.state
        self._pump(now, source=addr, progressed=after is not before and after is not z.State.FAILED)

    def _pump(self, now: float, *, source: Addr | None = None, progressed: bool = False) -> None:
        """After any input to the ZRTP session: latch, send its datagrams, handle its events."""
        zs = self._zrtp
        if zs is None:
            return
        events: list[z.ZrtpEvent] = []
        while (event := zs.next_event()) is not None:
            events.append(event)
        if (
            source is not None
            and source != self._remote_rtp
            and not self._rtp_authenticated
            and self.state == SECURING
            and (progressed or any(isinstance(e, z.HelloReceived) for e in events))
        ):
            self._latch_rtp(source, authenticated=False)
        target = self._remote_rtp
        for datagram in zs.datagrams_to_send():
            if target is None:
                continue  # nowhere to send yet; ZRTP retransmits
            self._net_rtp_send(datagram, target)
            self.zrtp_out += 1
        for event in events:
            self._on_zrtp_event(event, now)
            if self.state == CLOSED:
                return
        self._engine._schedule(self)

    def _on_zrtp_event(self, event: z.ZrtpEvent, now: float) -> None:
        if isinstance(event, z.HelloReceived):
            self._peer_seen = True
            self.peer_client_id = event.client_id
        elif isinstance(event, z.SecureStateReached):
            self._on_secure(event, now)
        elif isinstance(event, z.Failed):
            self._on_zrtp_failed(event.reason)
        elif isinstance(event, z.SasSignatureNeeded):
            self._engine._emit(SasSignatureNeeded(self, event.sashash))
        elif isinstance(event, z.PeerSignature):
            self._peer_signature = event
        elif isinstance(event, z.SecurityWarning):
            # Forged packets cause these: count all, report only the first few (no log floods).
            self.zrtp_warnings += 1
            if self.zrtp_warnings <= _WARNINGS_REPORTED:
                log.warning("stream %d: ZRTP: %s", self.id, event.reason)
                self._engine._emit(ZrtpWarning(self, event.reason))
        # ProtocolError: a Failed follows, which says it all.

    def _install_srtp(self, keys: z.SessionKeys) -> None:
        out, inbound = srtp_sessions(keys)
        self._srtp_out, self._srtp_in = out, inbound
        self._protect, self._protect_rtcp = srtp_call(out, "protect"), out.protect_rtcp
        self._unprotect = srtp_call(inbound, "unprotect")
        self._unprotect_rtcp = inbound.unprotect_rtcp

    def _on_secure(self, event: z.SecureStateReached, now: float) -> None:
        if self.state != SECURING:
            return
        if self._srtp_out is None:
            self._install_srtp(event.keys)
        self.state = SECURE
        self.secure_at = now
        self._zrtp_deadline = None
        started = self.started_at if self.started_at is not None else now
        self.result = StreamSecure(
            stream=self,
            sas=event.sas,
            sas_type=event.sas_type,
            sas_verified=event.sas_verified,
            continuity=event.continuity,
            peer_zid=event.peer_zid,
            cipher=event.cipher,
            auth_tag=event.auth_tag,
            key_agreement=event.key_agreement,
            hash=event.hash,
            hello_hash_verified=event.hello_hash_verified,
            multistream=event.multistream,
            peer_client_id=self.peer_client_id,
            elapsed=now - started,
            sas_value=event.sas_value,
            peer_hello_hash=event.peer_hello_hash,
            peer_disclosure=event.peer_disclosure,
            cache_update_deferred=event.cache_update_deferred,
            peer_signature=self._peer_signature,
        )
        self._ms_context = event.multistream_context
        self._update_handlers()
        log.info(
            "stream %d%s: secure (SAS %s, %s, continuity %s) in %.0f ms",
            self.id,
            f" [{self.label}]" if self.label else "",
            event.sas,
            event.key_agreement,
            event.continuity,
            (now - started) * 1000,
        )
        self._engine._emit(self.result)
        for follower in list(self._followers):
            follower._leader_secure(event.multistream_context, now)

    def _leader_secure(self, context: z.MultistreamContext | None, now: float) -> None:
        zs = self._zrtp
        if zs is None or self._attached or self.state not in (NEW, SECURING):
            return
        if context is None:
            self._fail("first stream gave no Multistream context")
            return
        zs.attach_multistream(context)
        self._attached = True
        if self._start_wanted:
            self._zrtp_deadline = now + self._engine.zrtp_timeout
            zs.start(now)
            self._pump(now)

    def _on_zrtp_failed(self, reason: str) -> None:
        if self.state not in (NEW, SECURING):
            return
        if self._no_sign_of_zrtp() and reason.startswith("timeout"):
            self._no_zrtp_answer(f"no ZRTP answer ({reason})")
        else:
            self._fail(f"ZRTP failed: {reason}")

    def _no_sign_of_zrtp(self) -> bool:
        return not self._peer_seen and self._peer_zrtp_hash is None

    def _no_zrtp_answer(self, reason: str) -> None:
        """The far end does not do ZRTP: the policy decides (require ends, prefer goes clear)."""
        if self._engine.policy == "require":
            self._fail(f"{reason}; security.policy is require")
        else:
            self._go_clear(reason)

    def _fail(self, reason: str) -> None:
        if self.state in (FAILED, CLOSED):
            return
        self.state = FAILED
        self.failure_reason = reason
        self._zrtp_deadline = None
        self._update_handlers()
        log.warning("stream %d: %s", self.id, reason)
        self._engine._emit(ZrtpFailure(self, reason))
        for follower in list(self._followers):
            follower._fail(f"first stream of the call failed: {reason}")

    def _go_clear(self, reason: str) -> None:
        if self.state in (CLEAR, CLOSED):
            return
        if self._zrtp is not None:
            self._zrtp.close()
        self.state = CLEAR
        self.insecure_reason = reason
        self._zrtp_deadline = None
        if not self._rtp_authenticated and self._sdp_remote_rtp is not None and (
                not self._ice_active):
            self._remote_rtp = self._sdp_remote_rtp  # provisional latches meant nothing
        self._update_handlers()
        log.warning("stream %d: media in clear: %s", self.id, reason)
        self._engine._emit(StreamInsecure(self, reason))
        for follower in list(self._followers):
            follower._go_clear(f"first stream of the call is clear: {reason}")

    # -- timers --------------------------------------------------------------------------------

    def _next_deadline(self) -> float | None:
        best = self._zrtp_deadline
        zs = self._zrtp
        if zs is not None and self.state != CLEAR:
            t = zs.get_timer()
            if t is not None and (best is None or t < best):
                best = t
        t = self._idle_check_at
        if t is not None and (best is None or t < best):
            best = t
        if self._ice is not None:
            t = self._ice.get_timer()
            if t is not None and (best is None or t < best):
                best = t
        return best

    def _on_timer(self, now: float) -> None:
        agent = self._ice
        if agent is not None:
            t = agent.get_timer()
            if t is not None and t <= now:
                agent.handle_timer(now)
                self._ice_pump(now)
                if self.state == CLOSED:
                    return
        zs = self._zrtp
        if zs is not None and self.state in (SECURING, SECURE, FAILED):
            t = zs.get_timer()
            if t is not None and t <= now:
                zs.handle_timer(now)
                self._pump(now)
        if self._zrtp_deadline is not None and now >= self._zrtp_deadline:
            self._zrtp_deadline = None
            self._zrtp_bound_reached()
        if self._idle_check_at is not None and now >= self._idle_check_at:
            self._check_idle(now)

    def _zrtp_bound_reached(self) -> None:
        if self.state != SECURING:
            return
        bound = self._engine.zrtp_timeout
        if self._no_sign_of_zrtp():
            self._no_zrtp_answer(f"no ZRTP answer within {bound:g} s")
        else:
            self._fail(f"ZRTP did not complete within {bound:g} s (the far end speaks ZRTP)")

    def _check_idle(self, now: float) -> None:
        timeout = self._rtp_timeout
        if timeout is None or self.state in (CLOSED, FAILED):
            self._idle_check_at = None
            return
        self.sync_counters()  # activity the C hop counted
        seen = self.net_rtp_in + self.net_rtcp_in + self.zrtp_in
        if seen != self._idle_seen:
            self._idle_seen = seen
            self._last_active = now
        elif now - self._last_active >= timeout:
            self._idle_check_at = None
            self.timed_out = True
            log.info(
                "stream %d: no media from the far end for %.1f s", self.id, now - self._last_active
            )
            self._engine._emit(MediaTimeout(self, now - self._last_active))
            return
        self._idle_check_at = now + _idle_period(timeout)


def _idle_period(timeout: float) -> float:
    return min(max(timeout / 8, 0.01), 1.0)


def _no_srtp(data: bytes) -> bytes:
    raise pylibsrtp.Error("no SRTP keys yet")


def _no_send(data: bytes, addr: Addr | None) -> None:
    """Sending before the sockets exist or after release: nothing to do."""


__all__ = [
    "CLEAR",
    "CLOSED",
    "FAILED",
    "NEW",
    "SECURE",
    "SECURING",
    "MediaCapacityError",
    "MediaEngine",
    "MediaEvent",
    "MediaStream",
    "MediaTimeout",
    "SasSignatureNeeded",
    "StreamInsecure",
    "StreamSecure",
    "ZrtpFailure",
    "ZrtpWarning",
]
