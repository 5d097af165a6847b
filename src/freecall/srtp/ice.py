"""ICE (RFC 8445) for one media socket, with its STUN and TURN client: pure, on injected time.

Why our own agent rather than aioice's ``Connection``: aioice binds its own sockets on ephemeral
ports, gathers asynchronously and hands data through an asyncio queue. The bridge needs ICE on
*its* socket (from ``media.ports``, the port the firewall opens), multiplexed with ZRTP and SRTP
on that socket (RFC 7983 first-octet demultiplexing, RFC 5764 section 5.1.2), with the per-packet
path free of queues. The STUN codec is the relay's (``freecall.relay.stun``, cross-checked
against aioice's); the tests run this agent against aioice's ``Connection`` as the far end.

Scope, for the media path between two freecall daemons (and any full ICE agent):

* one component (RTP and RTCP multiplexed, RFC 5761: ICE streams always use ``a=rtcp-mux``);
* candidates (RFC 8445 section 5.1.1): *host* (the socket's addresses), *server-reflexive*
  (a STUN Binding to each ``media.stun`` server, and the mapped address of a TURN Allocate),
  *relayed* (a TURN allocation, RFC 5766, on the same socket: STUN and ChannelData to the TURN
  server share it with media); peer-reflexive ones are learnt from checks (7.2.5.3.1, 7.3.1.3);
* pairs are formed with the candidates' *bases* (6.1.2.4): everything but relayed candidates
  has the socket as its base, so a local side is either ``SOCKET`` or ``RELAY``;
* connectivity checks paced every Ta (6.1.4.2), triggered checks (7.3.1.4), role conflicts
  (7.3.1.1, 7.2.5.1), regular nomination by the controlling agent (8.1.1), the nominated flag on
  the controlled side (7.3.1.5);
* consent freshness after selection (RFC 7675): a check every 4-6 s, consent lost after 30 s
  without an answer;
* short-term credentials (RFC 8445 section 7.2.2): every check is signed with the peer's
  password and carries FINGERPRINT; unsigned, badly signed or unsolicited STUN never selects or
  moves anything. Responses must come from the address the request went to (7.2.5.2.1).

Inputs: :meth:`IceAgent.receive` (STUN or TURN ChannelData arriving on the socket; returns the
inner payload of media that came through the relay), :meth:`IceAgent.handle_timer`. Outputs,
pulled: :meth:`IceAgent.datagrams_to_send`, :meth:`IceAgent.next_event`,
:meth:`IceAgent.get_timer`. Media goes out through :meth:`IceAgent.wrap` when the selected pair
is relayed (ChannelData once the channel is bound, a Send indication before).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from ..relay.stun import (
    Attr,
    Class,
    Method,
    StunError,
    StunMessage,
    decode_error_code,
    decode_xor_address,
    encode_error_code,
    encode_message,
    encode_xor_address,
    long_term_key,
    parse_message,
)

__all__ = [
    "Candidate",
    "ConsentLost",
    "GatheringComplete",
    "IceAgent",
    "IceError",
    "IceEvent",
    "IceFailed",
    "IceParameters",
    "PairSelected",
    "PairValid",
    "TurnServer",
    "candidate_priority",
    "pair_priority",
]

Addr = tuple[str, int]
CandidateType = Literal["host", "srflx", "prflx", "relay"]
Base = Literal["socket", "relay"]
SOCKET: Final = "socket"
RELAY: Final = "relay"

# RFC 8445 section 16.1 (ICE STUN attributes) and RFC 5389 section 15.6 (487).
ATTR_PRIORITY = 0x0024
ATTR_USE_CANDIDATE = 0x0025
ATTR_ICE_CONTROLLED = 0x8029
ATTR_ICE_CONTROLLING = 0x802A
ROLE_CONFLICT = 487

# RFC 8445 section 5.1.2.2: recommended type preferences.
TYPE_PREFERENCE: Final[dict[str, int]] = {"host": 126, "prflx": 110, "srflx": 100, "relay": 0}

TA = 0.05
"""Pacing of new checks (RFC 8445 section 14.2: 50 ms default)."""
CHECK_RETRANSMITS: Final = (0.25, 0.5, 1.0, 2.0, 2.0, 2.0)
"""Waits after each transmission of a check (RFC 8445 section 14.3 lets the RTO be chosen;
RFC 5389's 500 ms doubling to 7 sends takes 39.5 s, too slow for a call): a pair fails after
about 7.75 s without an answer."""
NOMINATION_GRACE = 0.2
"""After the first valid pair, the controlling agent waits this long for a better one before it
nominates (RFC 8445 section 8.1.1 leaves the stopping rule to the agent)..."""
NOMINATION_PATIENCE = 2.0
"""...and up to this long while a better pair's check is still running: a relayed pair often
answers first, and a direct one that works is worth a second of setup."""
ICE_TIMEOUT = 15.0
"""No pair selected this long after the remote candidates came: ICE failed."""
KEEPALIVE_INTERVAL = 15.0
"""While no far end is known (a pre-gathered socket waiting for a call), a Binding indication to
each STUN and TURN server this often keeps the NAT bindings that the gathered candidates name
(RFC 8445 section 11: 15 s default; RFC 5389 section 3 calls indications keepalives)."""
CONSENT_INTERVAL = 5.0  # RFC 7675 section 5.1: every 5 s, randomised 0.8-1.2
CONSENT_TIMEOUT = 30.0  # RFC 7675 section 5.1: consent expires 30 s after the last answer
STUN_RETRANSMITS: Final = (0.1, 0.2, 0.4, 0.8, 1.6)
"""Gathering waits (RFC 5389 section 7.2.1 with a 100 ms RTO, for a server on the path's
RTT); a server silent for 3.1 s is given up and gathering completes without it."""
TURN_LIFETIME_MARGIN = 60.0  # refresh an allocation this long before it lapses (RFC 5766 7)
PERMISSION_REFRESH = 240.0  # permissions live 300 s (RFC 5766 section 8)
CHANNEL_REFRESH = 540.0  # channels live 600 s (RFC 5766 section 11)
CHANNEL_FIRST = 0x4000
MAX_REMOTE_CANDIDATES = 32
MAX_PAIRS = 64
MAX_EARLY_CHECKS = 16  # checks kept while the far end's SDP has not reached us (RFC 8445 7.3)
UFRAG_BYTES = 6  # 8 base64 characters: RFC 8839 section 5.4 asks for at least 24 bits
PWD_BYTES = 18  # 24 characters: at least 128 bits (RFC 8839 section 5.4)
_CHANNEL = struct.Struct("!HH")
_SOFTWARE = b"freecall"


class IceError(ValueError):
    """Malformed ICE attributes in SDP."""


def candidate_priority(kind: str, component: int = 1, local_preference: int = 65535) -> int:
    """RFC 8445 section 5.1.2.1: (2^24)*type + (2^8)*local + (256 - component)."""
    return (TYPE_PREFERENCE[kind] << 24) | (local_preference << 8) | (256 - component)


def pair_priority(controlling: int, controlled: int) -> int:
    """RFC 8445 section 6.1.2.3: 2^32*MIN(G,D) + 2*MAX(G,D) + (G>D?1:0)."""
    g, d = controlling, controlled
    return (min(g, d) << 32) + 2 * max(g, d) + (1 if g > d else 0)


def _foundation(kind: str, base_host: str, server: Addr | None = None) -> str:
    """RFC 8445 section 5.1.1.3: same type, base IP and server give the same foundation
    (1-32 ice-chars; FNV-1a of the three, in decimal)."""
    h = 0x811C9DC5
    for byte in f"{kind}|{base_host}|{server}".encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return str(h)


_ICE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def _ice_chars(text: str, low: int, high: int, what: str) -> str:
    """RFC 8839 section 5.4: ice-char = ALPHA / DIGIT / "+" / "/"."""
    if not low <= len(text) <= high or not set(text) <= _ICE_CHARS:
        raise IceError(f"bad {what}")
    return text


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ``a=candidate`` (RFC 8839 section 5.1), UDP only."""

    foundation: str
    component: int
    priority: int
    host: str
    port: int
    kind: CandidateType
    related: Addr | None = None

    @property
    def addr(self) -> Addr:
        return (self.host, self.port)

    def to_sdp(self) -> str:
        """The attribute value: ``foundation component UDP priority address port typ type
        [raddr A rport P]``."""
        text = (
            f"{self.foundation} {self.component} UDP {self.priority} {self.host} {self.port}"
            f" typ {self.kind}"
        )
        if self.related is not None:
            text += f" raddr {self.related[0]} rport {self.related[1]}"
        return text

    @classmethod
    def from_sdp(cls, value: str) -> Candidate:
        """Parse an ``a=candidate`` value; `IceError` when it is not a UDP candidate we can use
        (TCP candidates and FQDNs are refused: RFC 8839 section 5.1 allows them, we never pair
        them)."""
        parts = value.split()
        if len(parts) < 8 or parts[6] != "typ":
            raise IceError("candidate: too few fields")
        foundation, component, transport, priority, host, port, _, kind = parts[:8]
        _ice_chars(foundation, 1, 32, "foundation")
        if transport.upper() != "UDP":
            raise IceError(f"candidate transport {transport} is not UDP")
        if kind not in TYPE_PREFERENCE:
            raise IceError(f"unknown candidate type {kind}")
        try:
            comp = int(component)
            prio = int(priority)
            p = int(port)
            ip = str(ipaddress.ip_address(host))
        except ValueError as exc:
            raise IceError(f"candidate: {exc}") from None
        if not (1 <= comp <= 256 and 1 <= prio < 2**31 and 0 < p < 65536):
            raise IceError("candidate: component, priority or port out of range")
        related: Addr | None = None
        rest = parts[8:]
        if len(rest) >= 4 and rest[0] == "raddr" and rest[2] == "rport":
            try:
                related = (str(ipaddress.ip_address(rest[1])), int(rest[3]))
            except ValueError:
                related = None
        return cls(foundation, comp, prio, ip, p, kind, related)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class IceParameters:
    """What one side says in SDP: ``a=ice-ufrag``, ``a=ice-pwd`` and its candidates."""

    ufrag: str
    pwd: str
    candidates: tuple[Candidate, ...] = ()

    def sdp_attributes(self) -> list[tuple[str, str]]:
        """Media-level attributes (RFC 8839 sections 5.1, 5.4); ``ice2`` says we do RFC 8445."""
        out = [("ice-ufrag", self.ufrag), ("ice-pwd", self.pwd), ("ice-options", "ice2")]
        out += [("candidate", c.to_sdp()) for c in self.candidates]
        return out

    @classmethod
    def from_attributes(cls, attributes: Iterable[tuple[str, str | None]]) -> IceParameters | None:
        """The far end's ICE parameters from its m-line's (and session's) attributes; None
        when it offered no ICE. Unusable candidates are skipped; bad credentials raise."""
        ufrag = pwd = None
        candidates: list[Candidate] = []
        for name, value in attributes:
            if name == "ice-ufrag" and value is not None and ufrag is None:
                ufrag = _ice_chars(value, 4, 256, "ice-ufrag")
            elif name == "ice-pwd" and value is not None and pwd is None:
                pwd = _ice_chars(value, 22, 256, "ice-pwd")
            elif name == "candidate" and value is not None:
                try:
                    cand = Candidate.from_sdp(value)
                except IceError:
                    continue
                if cand.component == 1 and len(candidates) < MAX_REMOTE_CANDIDATES:
                    candidates.append(cand)
        if ufrag is None and pwd is None:
            return None
        if ufrag is None or pwd is None:
            raise IceError("ice-ufrag without ice-pwd or the other way round")
        return cls(ufrag, pwd, tuple(candidates))


@dataclass(frozen=True, slots=True)
class TurnServer:
    """A TURN server (UDP) and the long-term credentials to use with it."""

    addr: Addr
    username: str
    password: str


# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatheringComplete:
    candidates: tuple[Candidate, ...]
    failures: tuple[str, ...] = ()
    """One line per server that did not answer or refused (for the log)."""
    mapped: tuple[Addr, ...] = ()
    """Every address servers saw us at (a server-reflexive one equal to a host candidate is
    not listed among the candidates, RFC 8445 section 5.1.3, but says "no NAT here")."""


@dataclass(frozen=True, slots=True)
class PairValid:
    """The first pair whose check succeeded (RFC 8445 section 7.2.5.3.2): media and ZRTP may
    flow on it before nomination (section 12.1); `PairSelected` names the final pair."""

    local: Candidate
    remote: Candidate
    relayed: bool


@dataclass(frozen=True, slots=True)
class PairSelected:
    """Media goes to ``remote``: from the socket directly, or through the TURN allocation."""

    local: Candidate
    remote: Candidate
    relayed: bool


@dataclass(frozen=True, slots=True)
class IceFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class ConsentLost:
    """RFC 7675 section 5.1: no answer on the selected pair for 30 s; stop sending media."""


IceEvent = GatheringComplete | PairValid | PairSelected | IceFailed | ConsentLost


# -- internal state ---------------------------------------------------------------------------

WAITING, IN_PROGRESS, SUCCEEDED, FAILED = "waiting", "in-progress", "succeeded", "failed"


@dataclass(slots=True)
class _Pair:
    base: Base
    local: Candidate
    remote: Candidate
    priority: int
    state: str = WAITING
    nominated: bool = False
    use_candidate_sent: bool = False
    nominate_on_success: bool = False  # controlled: USE-CANDIDATE arrived before our success


@dataclass(slots=True)
class _Transaction:
    """A request we sent and retransmit until answered or given up."""

    kind: str  # "check" | "consent" | "stun" | "allocate" | "refresh" | "permission" | "channel"
    data: bytes
    dest: Addr
    via_relay: bool
    deadline: float
    attempt: int = 0
    pair: _Pair | None = None
    server: Addr | None = None
    peer: Addr | None = None
    use_candidate: bool = False
    key: bytes | None = None  # to check the response's MESSAGE-INTEGRITY
    ips: tuple[str, ...] = ()  # CreatePermission: the peer IPs it asks for


@dataclass(slots=True)
class _Turn:
    """The client side of one TURN allocation (RFC 5766 sections 6-11)."""

    server: TurnServer
    state: str = "new"  # new | allocated | failed | released
    realm: bytes = b""
    nonce: bytes = b""
    key: bytes = b""
    relayed: Addr | None = None
    refresh_at: float | None = None
    permissions: dict[str, float] = field(default_factory=dict)  # peer IP -> next refresh
    permission_pending: set[str] = field(default_factory=set)
    channels: dict[Addr, int] = field(default_factory=dict)  # peer -> channel (bound)
    channel_pending: dict[Addr, int] = field(default_factory=dict)
    channel_refresh: dict[Addr, float] = field(default_factory=dict)
    peers_by_channel: dict[int, Addr] = field(default_factory=dict)
    next_channel: int = CHANNEL_FIRST


class IceAgent:
    """A full ICE agent (RFC 8445) for one component on one UDP socket."""

    def __init__(
        self,
        *,
        controlling: bool,
        host_addresses: Sequence[Addr],
        stun_servers: Sequence[Addr] = (),
        turn_servers: Sequence[TurnServer] = (),
        urandom: Callable[[int], bytes] = os.urandom,
        local_preference: int = 65535,
    ) -> None:
        if not host_addresses:
            raise ValueError("an ICE agent needs at least one host address")
        self.controlling = controlling
        self.urandom = urandom
        self.tie_breaker = int.from_bytes(urandom(8), "big")
        self.ufrag = base64.b64encode(urandom(UFRAG_BYTES)).decode()
        self.pwd = base64.b64encode(urandom(PWD_BYTES)).decode()
        self.stun_servers = list(stun_servers)
        self._turns = [_Turn(server) for server in turn_servers[:1]]
        """One allocation at most: a relayed candidate per stream is all ICE needs."""
        self._local_pref = local_preference
        self._host_base = host_addresses[0]
        self.local_candidates: list[Candidate] = [
            self._candidate("host", addr, local_preference - i)
            for i, addr in enumerate(host_addresses)
        ]
        self.remote: IceParameters | None = None
        self.remote_candidates: list[Candidate] = []
        self._pairs: dict[tuple[Base, Addr], _Pair] = {}
        self._triggered: deque[_Pair] = deque()
        self._transactions: dict[bytes, _Transaction] = {}
        self._out: list[tuple[bytes, Addr]] = []
        self._events: deque[IceEvent] = deque()
        self._gather_pending: set[bytes] = set()
        self._gather_failures: list[str] = []
        self._mapped: list[Addr] = []
        self.gathering_complete = False
        self._gather_started = False
        self._next_check_at: float | None = None
        self._nominate_at: float | None = None
        self._first_valid_at: float | None = None
        self._deadline: float | None = None
        self.selected: _Pair | None = None
        self.failed = False
        self.closed = False
        self._consent_at: float | None = None
        self._consent_answered = 0.0
        self._keepalive_at: float | None = None
        self._pending_requests: list[tuple[StunMessage, Base, Addr]] = []
        """Checks that came before the far end's credentials; answered, and retriggered then."""
        self.stats = {"checks_sent": 0, "checks_received": 0, "bad_stun": 0, "role_conflicts": 0}

    # -- candidates ------------------------------------------------------------------------------

    def _candidate(
        self, kind: CandidateType, addr: Addr, local_pref: int | None = None,
        related: Addr | None = None, server: Addr | None = None,
    ) -> Candidate:
        pref = self._local_pref if local_pref is None else local_pref
        base_host = self._host_base[0] if kind != "relay" else addr[0]
        return Candidate(
            _foundation(kind, base_host, server), 1, candidate_priority(kind, 1, pref),
            addr[0], addr[1], kind, related,
        )

    @property
    def local_parameters(self) -> IceParameters:
        return IceParameters(self.ufrag, self.pwd, tuple(self.local_candidates))

    def _add_local(self, cand: Candidate) -> None:
        if all(c.addr != cand.addr for c in self.local_candidates):
            self.local_candidates.append(cand)

    # -- gathering (RFC 8445 section 5.1.1) ------------------------------------------------------

    def gather(self, now: float) -> None:
        """Ask each STUN server for our mapped address and each TURN server for an allocation.
        `GatheringComplete` follows when all have answered or been given up."""
        if self._gather_started:
            return
        self._gather_started = True
        if self.stun_servers or self._turns:
            self._keepalive_at = now + KEEPALIVE_INTERVAL
        for server in self.stun_servers:
            tid = self.urandom(12)
            data = encode_message(Method.BINDING, Class.REQUEST, tid, [])
            self._send_request(_Transaction("stun", data, server, False, now, server=server),
                               tid, now)
            self._gather_pending.add(tid)
        for turn in self._turns:
            tid = self._allocate(turn, now)
            self._gather_pending.add(tid)
        if not self._gather_pending:
            self._finish_gathering()

    def _finish_gathering(self) -> None:
        if self.gathering_complete:
            return
        self.gathering_complete = True
        self._events.append(GatheringComplete(
            tuple(self.local_candidates), tuple(self._gather_failures), tuple(self._mapped)))

    def _gathered(self, tid: bytes) -> None:
        if tid in self._gather_pending:
            self._gather_pending.discard(tid)
            if not self._gather_pending:
                self._finish_gathering()

    # -- remote side -----------------------------------------------------------------------------

    def set_role(self, controlling: bool) -> None:
        """The role from the offer/answer exchange (RFC 8839 section 4.4.1.1: the offerer
        controls), decided after the agent was made (a pre-gathered socket takes either)."""
        if controlling != self.controlling:
            self.controlling = controlling
            self._reprioritise()

    def set_remote(self, params: IceParameters, now: float) -> None:
        """The far end's ufrag, password and candidates (its SDP). Pairs are formed at once
        (RFC 8445 section 6.1.2); checks start on the next timer. A new ufrag means the far end
        restarted ICE (RFC 8445 section 9): everything is checked afresh."""
        if self.closed:
            return
        if self.remote is not None and params.ufrag != self.remote.ufrag:
            self._restart()
        self.remote = params
        self._keepalive_at = None  # checks, consent and media keep the bindings from now on
        for cand in params.candidates:
            self._add_remote(cand, now)
        if self._deadline is None and self.selected is None:
            self._deadline = now + ICE_TIMEOUT
        pending, self._pending_requests = self._pending_requests, []
        for msg, base, source in pending:
            self._trigger(base, source, msg, now)
        if self._next_check_at is None:
            self._next_check_at = now

    def _restart(self) -> None:
        self._pairs.clear()
        self._triggered.clear()
        self.remote_candidates.clear()
        self.selected = None
        self.failed = False
        self._consent_at = None
        self._nominate_at = None
        self._first_valid_at = None
        self._deadline = None
        for tid in [t for t, tr in self._transactions.items() if tr.kind in ("check", "consent")]:
            del self._transactions[tid]

    def _add_remote(self, cand: Candidate, now: float) -> None:
        if cand.component != 1 or len(self.remote_candidates) >= MAX_REMOTE_CANDIDATES:
            return
        if any(c.addr == cand.addr for c in self.remote_candidates):
            return
        if ipaddress.ip_address(cand.host).version != ipaddress.ip_address(
                self._host_base[0]).version:
            return  # RFC 8445 section 6.1.2.2: same address family only
        self.remote_candidates.append(cand)
        self._pair_with(cand, now)

    def _pair_with(self, remote: Candidate, now: float) -> None:
        bases: list[tuple[Base, Candidate]] = [(SOCKET, self._host_candidate())]
        relay = self._relay_candidate()
        if relay is not None:
            bases.append((RELAY, relay))
        for base, local in bases:
            self._make_pair(base, local, remote, now)

    def _make_pair(self, base: Base, local: Candidate, remote: Candidate,
                   now: float) -> _Pair | None:
        key = (base, remote.addr)
        pair = self._pairs.get(key)
        if pair is not None:
            return pair
        if len(self._pairs) >= MAX_PAIRS:
            return None
        g, d = (local.priority, remote.priority) if self.controlling else (
            remote.priority, local.priority)
        pair = _Pair(base, local, remote, pair_priority(g, d))
        self._pairs[key] = pair
        if base == RELAY:
            self._want_permission(remote.host, now)
        return pair

    def _host_candidate(self) -> Candidate:
        return self.local_candidates[0]

    def _relay_candidate(self) -> Candidate | None:
        for cand in self.local_candidates:
            if cand.kind == "relay":
                return cand
        return None

    def _reprioritise(self) -> None:
        """After a role change the pair priorities flip (RFC 8445 section 7.2.5.1)."""
        for pair in self._pairs.values():
            g, d = (pair.local.priority, pair.remote.priority) if self.controlling else (
                pair.remote.priority, pair.local.priority)
            pair.priority = pair_priority(g, d)

    # -- I/O -------------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> IceEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        if self.closed:
            return None
        times = [t.deadline for t in self._transactions.values()]
        for value in (self._next_check_at, self._nominate_at, self._deadline, self._consent_at,
                      self._keepalive_at):
            if value is not None:
                times.append(value)
        for turn in self._turns:
            if turn.refresh_at is not None:
                times.append(turn.refresh_at)
            times.extend(turn.permissions.values())
            times.extend(turn.channel_refresh.values())
        return min(times) if times else None

    def is_turn_server(self, addr: Addr) -> bool:
        return any(turn.server.addr == addr for turn in self._turns)

    def receive(self, data: bytes, addr: Addr, now: float) -> tuple[bytes, Addr] | None:
        """A STUN message or TURN ChannelData that arrived on the socket from ``addr``.

        Returns ``(payload, peer)`` for media (ZRTP, SRTP) that came through our TURN
        allocation; None when the datagram was ICE's own or was dropped."""
        if self.closed or not data:
            return None
        if 0x40 <= data[0] <= 0x4F:  # RFC 7983: ChannelData (RFC 5766 section 11.4)
            return self._channel_data(data, addr, now)
        try:
            msg = parse_message(data)
        except StunError:
            self.stats["bad_stun"] += 1
            return None
        if msg.cls == Class.REQUEST:
            if msg.method == Method.BINDING:
                self._on_check(msg, SOCKET, addr, now)
            return None
        if msg.cls == Class.INDICATION:
            if msg.method == Method.DATA and self.is_turn_server(addr):
                return self._data_indication(msg, now)
            return None
        self._on_response(msg, addr, False, now)
        return None

    def _from_relay(self, payload: bytes, peer: Addr, now: float) -> tuple[bytes, Addr] | None:
        """What a peer sent to our relayed address: an ICE check (or its answer) or media."""
        if payload and payload[0] < 4:
            try:
                msg = parse_message(payload)
            except StunError:
                self.stats["bad_stun"] += 1
                return None
            if msg.cls == Class.REQUEST and msg.method == Method.BINDING:
                self._on_check(msg, RELAY, peer, now)
            elif msg.cls in (Class.SUCCESS, Class.ERROR):
                self._on_response(msg, peer, True, now)
            return None
        return payload, peer

    def _channel_data(self, data: bytes, addr: Addr, now: float) -> tuple[bytes, Addr] | None:
        if len(data) < 4 or not self.is_turn_server(addr):
            return None
        number, length = _CHANNEL.unpack_from(data, 0)
        if 4 + length > len(data):
            return None
        for turn in self._turns:
            peer = turn.peers_by_channel.get(number)
            if peer is not None:
                return self._from_relay(data[4 : 4 + length], peer, now)
        return None

    def _data_indication(self, msg: StunMessage, now: float) -> tuple[bytes, Addr] | None:
        raw_peer = msg.get(Attr.XOR_PEER_ADDRESS)
        payload = msg.get(Attr.DATA)
        if raw_peer is None or payload is None:
            return None
        try:
            peer = decode_xor_address(raw_peer, msg.transaction_id)
        except StunError:
            return None
        return self._from_relay(payload, peer, now)

    def wrap(self, payload: bytes, peer: Addr) -> tuple[bytes, Addr] | None:
        """Media for ``peer`` through our TURN allocation: ChannelData when a channel is bound,
        else a Send indication (RFC 5766 sections 10, 11). None when there is no allocation."""
        for turn in self._turns:
            if turn.state != "allocated":
                continue
            number = turn.channels.get(peer)
            if number is not None:
                return _CHANNEL.pack(number, len(payload)) + payload, turn.server.addr
            tid = self.urandom(12)
            data = encode_message(Method.SEND, Class.INDICATION, tid, [
                (Attr.XOR_PEER_ADDRESS, encode_xor_address(peer, tid)), (Attr.DATA, payload),
            ], fingerprint=False)
            return data, turn.server.addr
        return None

    def _emit_to(self, data: bytes, dest: Addr, via_relay: bool) -> None:
        if not via_relay:
            self._out.append((data, dest))
            return
        wrapped = self.wrap(data, dest)
        if wrapped is not None:
            self._out.append(wrapped)

    def close(self, now: float) -> None:
        """Stop; release the TURN allocation (Refresh with lifetime 0, RFC 5766 section 7)."""
        if self.closed:
            return
        self._release_turns()
        self.closed = True
        self._transactions.clear()

    def _release_turns(self) -> None:
        """Refresh with lifetime 0 (RFC 5766 section 7), unanswered: the allocation's quota
        goes back to the relay at once, or at its lifetime's end if this is lost. Also while
        the authenticated Allocate is unanswered (its nonce known): the relay may have
        allocated already, and a Refresh for an allocation it does not have is only refused
        (437), whereas without one the allocation would outlive us by its lifetime."""
        for turn in self._turns:
            if turn.state == "allocated" or (turn.state == "new" and turn.nonce):
                tid = self.urandom(12)
                self._out.append((self._turn_request(turn, Method.REFRESH, tid, [
                    (Attr.LIFETIME, b"\0\0\0\0")]), turn.server.addr))
                turn.state = "released"
                turn.refresh_at = None
                turn.permissions.clear()
                turn.channel_refresh.clear()
        for tid in [t for t, tr in self._transactions.items() if tr.via_relay or tr.kind in (
                "refresh", "permission", "channel")]:
            del self._transactions[tid]

    def _keepalive(self, now: float) -> None:
        """RFC 8445 section 11 / RFC 5389 section 3: a Binding indication to each server."""
        self._keepalive_at = now + KEEPALIVE_INTERVAL
        servers = [*self.stun_servers, *(t.server.addr for t in self._turns
                                         if t.state == "allocated")]
        for server in dict.fromkeys(servers):
            self._out.append((encode_message(Method.BINDING, Class.INDICATION, self.urandom(12),
                                              [], fingerprint=True), server))

    # -- transactions ----------------------------------------------------------------------------

    @staticmethod
    def _waits(kind: str) -> tuple[float, ...]:
        """Retransmission waits: a server's (gathering, TURN) or a peer's (checks, consent)."""
        return CHECK_RETRANSMITS if kind in ("check", "consent") else STUN_RETRANSMITS

    def _send_request(self, tr: _Transaction, tid: bytes, now: float) -> None:
        tr.deadline = now + self._waits(tr.kind)[0]
        self._transactions[tid] = tr
        self._emit_to(tr.data, tr.dest, tr.via_relay)

    def handle_timer(self, now: float) -> None:
        if self.closed:
            return
        for tid, tr in list(self._transactions.items()):
            if tr.deadline > now:
                continue
            waits = self._waits(tr.kind)
            tr.attempt += 1
            if tr.attempt >= len(waits):
                del self._transactions[tid]
                self._timed_out(tid, tr, now)
                continue
            tr.deadline = now + waits[tr.attempt]
            self._emit_to(tr.data, tr.dest, tr.via_relay)
        self._turn_timers(now)
        if self._next_check_at is not None and now >= self._next_check_at:
            self._next_check_at = None
            self._send_next_check(now)
        if self._nominate_at is not None and now >= self._nominate_at:
            self._nominate_at = None
            self._nominate(now)
        if self._consent_at is not None and now >= self._consent_at:
            self._consent_check(now)
        if self._keepalive_at is not None and now >= self._keepalive_at:
            self._keepalive(now)
        if self._deadline is not None and now >= self._deadline and self.selected is None:
            self._fail(f"no candidate pair worked within {ICE_TIMEOUT:g} s")

    def _timed_out(self, tid: bytes, tr: _Transaction, now: float) -> None:
        if tr.kind == "stun":
            self._gather_failures.append(f"STUN server {tr.server} did not answer")
            self._gathered(tid)
        elif tr.kind == "allocate":
            for turn in self._turns:
                if turn.server.addr == tr.server and turn.state != "allocated":
                    turn.state = "failed"
            self._gather_failures.append(f"TURN server {tr.server} did not answer")
            self._gathered(tid)
        elif tr.kind == "permission":
            self._permission_refused(tr.ips, now)
        elif tr.kind == "check" and tr.pair is not None:
            tr.pair.state = FAILED
            self._check_failed(now)
        elif tr.kind == "consent":
            pass  # the consent deadline decides

    # -- connectivity checks (RFC 8445 section 7.2) ----------------------------------------------

    def _send_next_check(self, now: float) -> None:
        """One check per Ta: a triggered one first, else the best waiting pair
        (RFC 8445 section 6.1.4.2)."""
        if self.remote is None or self.failed or (
                self.selected is not None and not self._triggered):
            return
        pair: _Pair | None = None
        while self._triggered:
            candidate = self._triggered.popleft()
            if candidate.state in (WAITING, FAILED) or candidate.nominate_on_success:
                pair = candidate
                break
        if pair is None:
            waiting = [p for p in self._pairs.values() if p.state == WAITING
                       and self._can_send(p)]
            if waiting:
                pair = max(waiting, key=lambda p: p.priority)
        if pair is not None:
            self._check(pair, now, use_candidate=False)
        if self._triggered or any(p.state == WAITING for p in self._pairs.values()):
            self._next_check_at = now + TA

    def _can_send(self, pair: _Pair) -> bool:
        if pair.base == SOCKET:
            return True
        turn = self._turns[0] if self._turns else None
        return (turn is not None and turn.state == "allocated"
                and pair.remote.host in turn.permissions)

    def _check(self, pair: _Pair, now: float, *, use_candidate: bool,
               kind: str = "check") -> None:
        assert self.remote is not None
        tid = self.urandom(12)
        prflx_priority = candidate_priority("prflx", 1, self._local_pref)
        attrs: list[tuple[int, bytes]] = [
            (Attr.USERNAME, f"{self.remote.ufrag}:{self.ufrag}".encode()),
            (ATTR_PRIORITY, prflx_priority.to_bytes(4, "big")),
            (ATTR_ICE_CONTROLLING if self.controlling else ATTR_ICE_CONTROLLED,
             self.tie_breaker.to_bytes(8, "big")),
        ]
        if use_candidate:
            attrs.append((ATTR_USE_CANDIDATE, b""))
        key = self.remote.pwd.encode()
        data = encode_message(Method.BINDING, Class.REQUEST, tid, attrs, key=key)
        if kind == "check":
            pair.state = IN_PROGRESS
            if use_candidate:
                pair.use_candidate_sent = True
        self.stats["checks_sent"] += 1
        self._send_request(_Transaction(
            kind, data, pair.remote.addr, pair.base == RELAY, now, pair=pair,
            use_candidate=use_candidate, key=key), tid, now)

    def _on_check(self, msg: StunMessage, base: Base, source: Addr, now: float) -> None:
        """A Binding request from the far end (RFC 8445 section 7.3)."""
        self.stats["checks_received"] += 1
        username = msg.get(Attr.USERNAME)
        if username is None or not msg.check_integrity(self.pwd.encode()):
            # RFC 5389 section 10.1.2: 400 without USERNAME/MESSAGE-INTEGRITY, 401 when they do
            # not verify. Answered unsigned; nothing is learnt from it.
            self.stats["bad_stun"] += 1
            code = 400 if username is None else 401
            self._answer_error(msg, base, source, code, "Unauthorized", sign=False)
            return
        local_ufrag = username.decode("utf-8", "replace").split(":", 1)[0]
        if local_ufrag != self.ufrag:
            self.stats["bad_stun"] += 1
            self._answer_error(msg, base, source, 401, "Unauthorized", sign=False)
            return
        # RFC 8445 section 7.3.1.1: role conflicts, decided by the tie-breakers.
        theirs_controlling = msg.get(ATTR_ICE_CONTROLLING)
        theirs_controlled = msg.get(ATTR_ICE_CONTROLLED)
        if self.controlling and theirs_controlling is not None:
            self.stats["role_conflicts"] += 1
            if self.tie_breaker >= int.from_bytes(theirs_controlling, "big"):
                self._answer_error(msg, base, source, ROLE_CONFLICT, "Role Conflict", sign=True)
                return
            self.controlling = False
            self._reprioritise()
        elif not self.controlling and theirs_controlled is not None:
            self.stats["role_conflicts"] += 1
            if self.tie_breaker >= int.from_bytes(theirs_controlled, "big"):
                self.controlling = True
                self._reprioritise()
            else:
                self._answer_error(msg, base, source, ROLE_CONFLICT, "Role Conflict", sign=True)
                return
        tid = msg.transaction_id
        response = encode_message(Method.BINDING, Class.SUCCESS, tid, [
            (Attr.XOR_MAPPED_ADDRESS, encode_xor_address(source, tid)),
        ], key=self.pwd.encode())
        self._emit_to(response, source, base == RELAY)
        if self.remote is None:
            if len(self._pending_requests) < MAX_EARLY_CHECKS:
                self._pending_requests.append((msg, base, source))
            return
        self._trigger(base, source, msg, now)

    def _trigger(self, base: Base, source: Addr, msg: StunMessage, now: float) -> None:
        """RFC 8445 sections 7.3.1.3-7.3.1.5: learn a peer-reflexive candidate, queue a
        triggered check, and note the nomination."""
        remote = next((c for c in self.remote_candidates if c.addr == source), None)
        if remote is None:
            raw = msg.get(ATTR_PRIORITY)
            priority = int.from_bytes(raw, "big") if raw and len(raw) == 4 else (
                candidate_priority("prflx"))
            remote = Candidate(_foundation("prflx", source[0]), 1, max(1, priority) & 0x7FFFFFFF,
                               source[0], source[1], "prflx")
            if len(self.remote_candidates) >= MAX_REMOTE_CANDIDATES:
                return
            self.remote_candidates.append(remote)
        local = self._host_candidate() if base == SOCKET else self._relay_candidate()
        if local is None:
            return
        pair = self._make_pair(base, local, remote, now)
        if pair is None:
            return
        use_candidate = msg.get(ATTR_USE_CANDIDATE) is not None and not self.controlling
        if use_candidate:
            if pair.state == SUCCEEDED:
                pair.nominated = True
                self._select(pair, now)
                return
            pair.nominate_on_success = True
        if pair.state in (WAITING, FAILED) and pair not in self._triggered:
            if pair.state == FAILED:
                pair.state = WAITING
            self._triggered.append(pair)
            if self._next_check_at is None:
                self._next_check_at = now

    def _answer_error(self, msg: StunMessage, base: Base, source: Addr, code: int,
                      reason: str, *, sign: bool) -> None:
        data = encode_message(
            Method.BINDING, Class.ERROR, msg.transaction_id,
            [(Attr.ERROR_CODE, encode_error_code(code, reason))],
            key=self.pwd.encode() if sign else None,
        )
        self._emit_to(data, source, base == RELAY)

    def _on_response(self, msg: StunMessage, source: Addr, via_relay: bool,
                     now: float) -> None:
        tr = self._transactions.get(msg.transaction_id)
        if tr is None:
            return  # unsolicited or late: RFC 5389 section 7.3.3 says drop
        if tr.via_relay != via_relay or source != tr.dest:
            # RFC 8445 section 7.2.5.2.1: a response from elsewhere fails the check; for
            # gathering it is simply not ours.
            if tr.kind == "check" and tr.pair is not None and tr.via_relay == via_relay:
                del self._transactions[msg.transaction_id]
                tr.pair.state = FAILED
                self._check_failed(now)
            return
        if tr.key is not None and not msg.check_integrity(tr.key) and (
                msg.cls == Class.SUCCESS or tr.kind in ("check", "consent")):
            # Forged: keep waiting for the real answer. A TURN server's 401 and 438 carry no
            # MESSAGE-INTEGRITY (RFC 5389 section 10.2.2); an ICE peer signs every answer
            # (RFC 8445 section 7.3.1.1 signs even the 487).
            self.stats["bad_stun"] += 1
            return
        del self._transactions[msg.transaction_id]
        if tr.kind in ("check", "consent"):
            self._check_answered(tr, msg, now)
        elif tr.kind == "stun":
            self._stun_answered(tr, msg)
        else:
            self._turn_answered(tr, msg, now)

    def _check_answered(self, tr: _Transaction, msg: StunMessage, now: float) -> None:
        pair = tr.pair
        assert pair is not None
        if tr.kind == "consent":
            if msg.cls == Class.SUCCESS:
                self._consent_answered = now
            return
        if msg.cls == Class.ERROR:
            code = self._error_code(msg)
            if code == ROLE_CONFLICT:
                # RFC 8445 section 7.2.5.1: take the other role and check the pair again.
                self.stats["role_conflicts"] += 1
                self.controlling = not self.controlling
                self._reprioritise()
                pair.state = WAITING
                self._triggered.append(pair)
                if self._next_check_at is None:
                    self._next_check_at = now
                return
            pair.state = FAILED
            self._check_failed(now)
            return
        raw = msg.get(Attr.XOR_MAPPED_ADDRESS)
        if raw is not None and pair.base == SOCKET:
            try:
                mapped = decode_xor_address(raw, msg.transaction_id)
            except StunError:
                mapped = None
            if mapped is not None and all(c.addr != mapped for c in self.local_candidates):
                # RFC 8445 section 7.2.5.3.1: a peer-reflexive local candidate.
                self.local_candidates.append(self._candidate("prflx", mapped,
                                                             related=self._host_base))
        pair.state = SUCCEEDED
        if tr.use_candidate or pair.nominate_on_success:
            pair.nominated = True
            self._select(pair, now)
            return
        if self._first_valid_at is None:
            self._first_valid_at = now
            self._events.append(PairValid(pair.local, pair.remote, pair.base == RELAY))
        if self.controlling and self.selected is None and self._nominate_at is None:
            self._nominate_at = now + NOMINATION_GRACE
            if not any(p.state in (WAITING, IN_PROGRESS) and p.priority > pair.priority
                       for p in self._pairs.values()):
                self._nominate_at = now  # nothing better can come: nominate at once

    @staticmethod
    def _error_code(msg: StunMessage) -> int | None:
        raw = msg.get(Attr.ERROR_CODE)
        if raw is None:
            return None
        try:
            return decode_error_code(raw)[0]
        except StunError:
            return None

    def _check_failed(self, now: float) -> None:
        if self.selected is not None or self.remote is None:
            return
        if self._pairs and all(p.state == FAILED for p in self._pairs.values()) and (
                self.gathering_complete):
            self._fail("every candidate pair failed")

    def _nominate(self, now: float) -> None:
        """RFC 8445 section 8.1.1: the controlling agent repeats the check of the best valid
        pair with USE-CANDIDATE; its success selects the pair on both sides."""
        if self.selected is not None or not self.controlling:
            return
        valid = [p for p in self._pairs.values() if p.state == SUCCEEDED]
        if not valid:
            return
        best = max(valid, key=lambda p: p.priority)
        if self._first_valid_at is not None and now - self._first_valid_at < NOMINATION_PATIENCE \
                and any(p.state in (WAITING, IN_PROGRESS) and p.priority > best.priority
                        and self._can_send(p) for p in self._pairs.values()):
            self._nominate_at = now + TA  # a better pair is still being checked: wait for it
            return
        if not best.use_candidate_sent:
            self._check(best, now, use_candidate=True)

    def _select(self, pair: _Pair, now: float) -> None:
        if self.selected is not None:
            return
        self.selected = pair
        self._deadline = None
        self._nominate_at = None
        self._consent_answered = now
        self._consent_at = now + self._consent_interval()
        # Checks still running on other pairs are not needed any more (RFC 8445 section 8.1.2).
        for tid in [t for t, tr in self._transactions.items() if tr.kind == "check"]:
            del self._transactions[tid]
        self._triggered.clear()
        if pair.base == RELAY:
            self._bind_channel(pair.remote.addr, now)
        else:
            self._release_turns()  # RFC 8445 section 8.3: free candidates ICE did not select
        self._events.append(PairSelected(pair.local, pair.remote, pair.base == RELAY))

    def _fail(self, reason: str) -> None:
        if self.failed or self.selected is not None:
            return
        self.failed = True
        self._deadline = None
        self._events.append(IceFailed(reason))

    # -- consent freshness (RFC 7675) ------------------------------------------------------------

    def _consent_interval(self) -> float:
        spread = int.from_bytes(self.urandom(2), "big") / 65535.0  # 0.8-1.2 (section 5.1)
        return CONSENT_INTERVAL * (0.8 + 0.4 * spread)

    def _consent_check(self, now: float) -> None:
        pair = self.selected
        if pair is None:
            self._consent_at = None
            return
        if now - self._consent_answered >= CONSENT_TIMEOUT:
            self._consent_at = None
            self._events.append(ConsentLost())
            return
        self._check(pair, now, use_candidate=False, kind="consent")
        self._consent_at = now + self._consent_interval()

    # -- STUN (gathering server-reflexive candidates, RFC 8445 section 5.1.1.2) -------------------

    def _stun_answered(self, tr: _Transaction, msg: StunMessage) -> None:
        tid = msg.transaction_id
        raw = msg.get(Attr.XOR_MAPPED_ADDRESS)
        if msg.cls == Class.SUCCESS and raw is not None:
            try:
                mapped = decode_xor_address(raw, tid)
            except StunError:
                mapped = None
            if mapped is not None:
                self._mapped.append(mapped)
                self._add_local(self._candidate("srflx", mapped, related=self._host_base,
                                                server=tr.server))
        else:
            self._gather_failures.append(f"STUN server {tr.server} refused the binding")
        self._gathered(tid)

    # -- TURN client (RFC 5766) ------------------------------------------------------------------

    def _turn_request(self, turn: _Turn, method: int, tid: bytes,
                      attrs: Sequence[tuple[int, bytes]]) -> bytes:
        if turn.nonce:
            attrs = [*attrs, (Attr.USERNAME, turn.server.username.encode()),
                     (Attr.REALM, turn.realm), (Attr.NONCE, turn.nonce)]
            return encode_message(method, Class.REQUEST, tid, attrs, key=turn.key)
        return encode_message(method, Class.REQUEST, tid, attrs)

    def _turn_send(self, turn: _Turn, kind: str, method: int,
                   attrs: Sequence[tuple[int, bytes]],
                   now: float, *, peer: Addr | None = None, tid: bytes | None = None,
                   ips: tuple[str, ...] = ()) -> bytes:
        tid = tid or self.urandom(12)
        data = self._turn_request(turn, method, tid, attrs)
        self._send_request(_Transaction(kind, data, turn.server.addr, False, now,
                                        server=turn.server.addr, peer=peer,
                                        key=turn.key if turn.nonce else None, ips=ips),
                           tid, now)
        return tid

    def _allocate(self, turn: _Turn, now: float, tid: bytes | None = None) -> bytes:
        """RFC 5766 section 6.1: Allocate for UDP (REQUESTED-TRANSPORT 17)."""
        return self._turn_send(turn, "allocate", Method.ALLOCATE,
                               [(Attr.REQUESTED_TRANSPORT, b"\x11\0\0\0")], now, tid=tid)

    def _turn_answered(self, tr: _Transaction, msg: StunMessage, now: float) -> None:
        turn = next((t for t in self._turns if t.server.addr == tr.server), None)
        if turn is None:
            return
        tid = msg.transaction_id
        if msg.cls == Class.ERROR:
            code = self._error_code(msg)
            realm, nonce = msg.get(Attr.REALM), msg.get(Attr.NONCE)
            if nonce and (code == 438 or (code == 401 and tr.key is None)):
                # RFC 5389 section 10.2.3 / 5766 6.4: learn realm and nonce, sign, retry once.
                if realm:
                    turn.realm = realm
                turn.nonce = nonce
                turn.key = long_term_key(turn.server.username, turn.realm.decode(
                    "utf-8", "replace"), turn.server.password)
                retry = self._resend_turn(tr, turn, now)
                if tr.kind == "allocate" and tid in self._gather_pending:
                    self._gather_pending.discard(tid)
                    self._gather_pending.add(retry)
                return
            if tr.kind == "allocate":
                turn.state = "failed"
                self._gather_failures.append(f"TURN server {turn.server.addr} refused: {code}")
                self._gathered(tid)
            elif tr.kind == "permission":
                self._permission_refused(tr.ips, now)
            elif tr.kind == "channel" and tr.peer is not None:
                turn.channel_pending.pop(tr.peer, None)
            elif tr.kind == "refresh" and turn.state == "allocated":
                turn.refresh_at = now + 30.0  # try again while the allocation lives
            return
        if tr.kind == "allocate":
            self._allocated(turn, msg, now)
            self._gathered(tid)
        elif tr.kind == "refresh":
            turn.refresh_at = now + max(30.0, self._lifetime(msg) - TURN_LIFETIME_MARGIN)
        elif tr.kind == "permission":
            for ip in tr.ips:
                turn.permissions[ip] = now + PERMISSION_REFRESH
            if self._next_check_at is None and any(
                    p.state == WAITING for p in self._pairs.values()):
                self._next_check_at = now
        elif tr.kind == "channel" and tr.peer is not None:
            number = turn.channel_pending.pop(tr.peer, None)
            if number is not None:
                turn.channels[tr.peer] = number
                turn.peers_by_channel[number] = tr.peer
                turn.channel_refresh[tr.peer] = now + CHANNEL_REFRESH

    def _resend_turn(self, tr: _Transaction, turn: _Turn, now: float) -> bytes:
        """The same request again, signed, under a new transaction id."""
        old = parse_message(tr.data)
        attrs = [(k, v) for k, v in old.attributes
                 if k not in (Attr.USERNAME, Attr.REALM, Attr.NONCE, Attr.MESSAGE_INTEGRITY)]
        tid = self.urandom(12)
        # XOR-PEER-ADDRESS depends on the transaction id only for IPv6; re-encode anyway.
        fixed: list[tuple[int, bytes]] = []
        for kind, value in attrs:
            if kind == Attr.XOR_PEER_ADDRESS:
                peer = decode_xor_address(value, old.transaction_id)
                fixed.append((kind, encode_xor_address(peer, tid)))
            else:
                fixed.append((kind, value))
        method = {"allocate": Method.ALLOCATE, "refresh": Method.REFRESH,
                  "permission": Method.CREATE_PERMISSION,
                  "channel": Method.CHANNEL_BIND}[tr.kind]
        return self._turn_send(turn, tr.kind, method, fixed, now, peer=tr.peer, tid=tid,
                               ips=tr.ips)

    @staticmethod
    def _lifetime(msg: StunMessage) -> float:
        raw = msg.get(Attr.LIFETIME)
        return float(int.from_bytes(raw, "big")) if raw and len(raw) == 4 else 600.0

    def _allocated(self, turn: _Turn, msg: StunMessage, now: float) -> None:
        tid = msg.transaction_id
        raw_relayed = msg.get(Attr.XOR_RELAYED_ADDRESS)
        if raw_relayed is None:
            turn.state = "failed"
            return
        try:
            relayed = decode_xor_address(raw_relayed, tid)
        except StunError:
            turn.state = "failed"
            return
        turn.state = "allocated"
        turn.relayed = relayed
        lifetime = self._lifetime(msg)
        turn.refresh_at = now + max(30.0, lifetime - TURN_LIFETIME_MARGIN)
        raw_mapped = msg.get(Attr.XOR_MAPPED_ADDRESS)
        if raw_mapped is not None:
            try:
                mapped = decode_xor_address(raw_mapped, tid)
                self._mapped.append(mapped)
                self._add_local(self._candidate("srflx", mapped, related=self._host_base,
                                                server=turn.server.addr))
            except StunError:
                pass
        relay = self._candidate("relay", relayed, related=None, server=turn.server.addr)
        self._add_local(relay)
        for remote in list(self.remote_candidates):
            self._make_pair(RELAY, relay, remote, now)

    def _want_permission(self, ip: str, now: float) -> None:
        """RFC 5766 section 9: one CreatePermission per batch of new peer IPs."""
        for turn in self._turns:
            if turn.state != "allocated":
                continue
            if ip in turn.permissions or ip in turn.permission_pending:
                continue
            turn.permission_pending.add(ip)
            self._send_permissions(turn, now)

    def _send_permissions(self, turn: _Turn, now: float) -> None:
        ips = tuple(sorted(turn.permission_pending))
        turn.permission_pending.clear()
        if not ips:
            return
        tid = self.urandom(12)
        attrs = [(Attr.XOR_PEER_ADDRESS, encode_xor_address((ip, 0), tid)) for ip in ips]
        self._turn_send(turn, "permission", Method.CREATE_PERMISSION, attrs, now, tid=tid,
                        ips=ips)

    def _permission_refused(self, ips: tuple[str, ...], now: float) -> None:
        """The relay would not let these peers in (RFC 5766 section 9.2: e.g. 403 for a
        private address): the relayed pairs to them fail."""
        for pair in self._pairs.values():
            if pair.base == RELAY and pair.remote.host in ips and pair.state != SUCCEEDED:
                pair.state = FAILED
        self._check_failed(now)

    def _bind_channel(self, peer: Addr, now: float) -> None:
        """RFC 5766 section 11.1: a channel for the selected peer, so media costs 4 bytes of
        framing instead of a 36-byte Send indication."""
        for turn in self._turns:
            if turn.state != "allocated" or peer in turn.channels or peer in (
                    turn.channel_pending):
                continue
            number = turn.next_channel
            turn.next_channel += 1
            self._send_channel_bind(turn, peer, number, now)

    def _send_channel_bind(self, turn: _Turn, peer: Addr, number: int, now: float) -> None:
        """ChannelBind (RFC 5766 section 11.2), to bind a channel or refresh its binding."""
        turn.channel_pending[peer] = number
        tid = self.urandom(12)
        self._turn_send(turn, "channel", Method.CHANNEL_BIND, [
            (Attr.CHANNEL_NUMBER, number.to_bytes(2, "big") + b"\0\0"),
            (Attr.XOR_PEER_ADDRESS, encode_xor_address(peer, tid)),
        ], now, peer=peer, tid=tid)

    def _turn_timers(self, now: float) -> None:
        for turn in self._turns:
            if turn.state != "allocated":
                continue
            if turn.refresh_at is not None and now >= turn.refresh_at:
                turn.refresh_at = None
                self._turn_send(turn, "refresh", Method.REFRESH, [
                    (Attr.LIFETIME, (600).to_bytes(4, "big"))], now)
            due = [ip for ip, at in turn.permissions.items() if now >= at]
            if due:
                for ip in due:
                    turn.permissions[ip] = now + PERMISSION_REFRESH
                    turn.permission_pending.add(ip)
                self._send_permissions(turn, now)
            for peer, at in list(turn.channel_refresh.items()):
                if now >= at:
                    turn.channel_refresh[peer] = now + CHANNEL_REFRESH
                    self._send_channel_bind(turn, peer, turn.channels[peer], now)

    @property
    def relayed_address(self) -> Addr | None:
        for turn in self._turns:
            if turn.state == "allocated":
                return turn.relayed
        return None
