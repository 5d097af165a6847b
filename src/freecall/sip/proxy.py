"""A stateful, record-routing SIP proxy core (RFC 3261 section 16), pure and sans-I/O.

The proxy sits on a :class:`~freecall.sip.transaction.TransactionLayer`: the daemon feeds the
layer's events to :meth:`Proxy.handle_event` and pulls the layer's messages.  The proxy adds what
section 16 asks of a stateful proxy: request validation (16.3), route pre-processing (16.4),
target determination through the registrar's location service or a :class:`TargetResolver`
(16.5), parallel forking with Record-Route, Max-Forwards and loop detection (16.6), response
aggregation and the choice of the best final response (16.7), Timer C (16.8), transport errors
(16.9) and CANCEL (16.10).  It also answers requests addressed to the proxy itself (OPTIONS)
and tracks calls for the logs and for a clean shutdown.

Policy (never an open relay): a request from the softphone side must be authenticated with
digest (unless its source is configured as trusted); a request that neither comes from an
authenticated local user nor targets a local user is refused with 403; in-dialog requests are
proxied only when they carry our Record-Route with a valid token (an HMAC over the dialog's
Call-ID and a tag), so a crafted Route cannot turn the proxy into a relay.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import logging
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..ops.logformat import LogLimiter
from .auth import AuthStatus, DigestServer, parse_credentials
from .errors import SipParseError
from .flow import Flow
from .headers import Address, CSeq, Via
from .message import Header, Request, Response, make_response
from .ratelimit import AuthLockout
from .transaction import (
    AckReceived,
    ClientTransaction,
    Event,
    RequestReceived,
    ResponseReceived,
    ServerTransaction,
    StrayResponse,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimedOut,
    TransportFailed,
)
from .uri import SipUri, TelUri, Uri, parse_uri, unescape

log = logging.getLogger("freecall.proxy")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
ALLOW = (
    "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, MESSAGE, INFO, UPDATE, PRACK, REFER, NOTIFY, "
    "SUBSCRIBE"
)
SUPPORTED: frozenset[str] = frozenset({"path", "outbound", "gruu", "replaces", "timer", "100rel"})
"""Option tags we let through a Require as a proxy or answer as a UAS (RFC 3261 section 8.2.2.3).
As a proxy only Proxy-Require matters; these are what softphones put in Require of a REGISTER."""


class Side(enum.Enum):
    """Which listener a flow belongs to."""

    SOFTPHONE = "softphone"  # the loopback listener local softphones register with
    PUBLIC = "public"  # the node-to-node listener (other freecall nodes, other SIP servers)


# -- the interfaces the proxy needs from the rest of the daemon ---------------------------------


class Binding(Protocol):
    """A registered contact (the registrar's location service provides these)."""

    @property
    def contact(self) -> Address: ...
    @property
    def q(self) -> float: ...
    @property
    def next_hop(self) -> Flow | None: ...
    @property
    def target_uri(self) -> Uri: ...


class Location(Protocol):
    def lookup(self, aor: str, now: float) -> Sequence[Binding]: ...
    def exists(self, user: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Target:
    """Where one branch goes: the Request-URI to use and the flows to try, in order (the later
    ones are RFC 3263 failover alternatives)."""

    uri: Uri
    flows: tuple[Flow, ...]
    route: str = "local"  # how it was found: local, static, hostcache, dns, enum


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a resolver found for a Request-URI: targets, or the status to answer."""

    targets: tuple[Target, ...] = ()
    status: int = 0
    reason: str | None = None


class TargetResolver(Protocol):
    """Routing for Request-URIs this node does not serve (static routes, host cache, DNS).

    Returns a resolution at once, or None when the answer will come later through
    :meth:`Proxy.resolved` (a DNS lookup in progress).
    """

    def resolve(self, uri: Uri, request: Request, ticket: int) -> Resolution | None: ...


class MediaHook(Protocol):
    """Sees every message with a body that crosses the node's edge (the media bridge's SDP)."""

    def crossing(
        self, message: Request | Response, key: tuple[str, str], ingress: Side, egress: Side
    ) -> int | None:
        """``message`` came in on an ``ingress`` listener and leaves through an ``egress`` one:
        rewrite its body in place.  For a request, a status (488, 503) refuses it instead;
        for a response or an ACK the hook must make the best of it (the return is ignored).
        ``key`` is the dialog: (Call-ID, the caller's From tag)."""


class NoRoutes:
    """The resolver of a node without routing: every other domain is unknown (404)."""

    def resolve(self, uri: Uri, request: Request, ticket: int) -> Resolution | None:
        return Resolution(status=404, reason="Not Found")


@dataclass(frozen=True, slots=True)
class Listener:
    """A local SIP listener: what Via and Record-Route name, and which side it serves."""

    transport: str
    host: str
    port: int
    side: Side = Side.SOFTPHONE

    @property
    def sent_by(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProxySettings:
    domains: frozenset[str]
    listeners: tuple[Listener, ...]
    secret: bytes  # keys the Record-Route tokens
    realm: str
    timer_c: float = 180.0
    require_auth: bool = True
    trusted: tuple[Network, ...] = ()
    allow_register_from: tuple[Network, ...] = LOOPBACK
    server_name: str = "freecall"
    wall_offset: float = 0.0  # wall clock = now + offset, for digest nonces across restarts
    local_hosts: frozenset[str] = frozenset()  # extra names/addresses that mean "this node"
    canonical_domain: str = ""  # the domain of every local AOR (default: the first domain)
    calls_per_source: int = 0
    """Most calls in progress (INVITE received, no ACK for its 2xx yet) one source IP on the
    public side may have; its next INVITE gets 503 with Retry-After. 0: no cap."""
    cap_exempt: tuple[Network, ...] = ()  # sources never capped (security.rate_exempt)
    ack_wait: float = 32.0
    """How long an answered call waits for the caller's ACK before the proxy ends it (64*T1,
    RFC 3261 section 13.3.1.4); also the Retry-After of our own 503s."""


# -- events for the daemon ----------------------------------------------------------------------


@dataclass(slots=True)
class Call:
    """One INVITE dialog the proxy carried (what the call log and the control API show)."""

    id: str
    call_id: str
    caller: str
    callee: str
    from_tag: str
    started: float
    direction: str  # "internal", "out" (to another node), "in" (from another node)
    route: str = "local"
    to_tag: str | None = None
    answered: float | None = None
    ended: float | None = None
    outcome: str = "trying"
    # what is needed to end the call with BYE from the middle (shutdown, hang-up via API)
    caller_contact: Uri | None = None
    caller_flow: Flow | None = None
    callee_contact: Uri | None = None
    callee_flow: Flow | None = None
    cseq_from_caller: int = 0
    cseq_from_callee: int = 0
    caller_from: Address | None = None
    callee_to: Address | None = None
    # route sets (RFC 3261 12.1) toward each party, beyond this node, for those BYEs
    caller_route: tuple[Address, ...] = ()
    callee_route: tuple[Address, ...] = ()
    confirmed: float | None = None  # the caller's ACK for the 2xx passed (RFC 3261 13.2.2.4)
    source: str | None = None  # the source IP whose calls in progress count this one

    @property
    def duration(self) -> float:
        if self.answered is None:
            return 0.0
        return (self.ended if self.ended is not None else self.answered) - self.answered


@dataclass(slots=True)
class CallStarted:
    call: Call


@dataclass(slots=True)
class CallAnswered:
    call: Call


@dataclass(slots=True)
class CallEnded:
    call: Call


@dataclass(slots=True)
class Registered:
    """A REGISTER for one of our domains that passed authentication (the registrar decides)."""

    transaction: ServerTransaction
    request: Request
    user: str | None  # None: a trusted source, no digest (the user exists)


@dataclass(slots=True)
class Refused:
    """A request refused by policy or validation (for the logs and rate limiting)."""

    request: Request
    flow: Flow
    status: int
    why: str


ProxyEvent = CallStarted | CallAnswered | CallEnded | Registered | Refused


# -- internal state -----------------------------------------------------------------------------


class BranchState(enum.Enum):
    PENDING = "pending"  # waiting for a flow to be tried
    TRYING = "trying"
    PROCEEDING = "proceeding"  # a provisional arrived: CANCEL is now allowed (section 9.1)
    DONE = "done"


@dataclass(slots=True, eq=False)
class Branch:
    context: Context
    target: Target
    request: Request  # as forwarded
    flow_index: int = 0
    txn: ClientTransaction | None = None
    state: BranchState = BranchState.PENDING
    response: Response | None = None
    cancel_wanted: bool = False
    timer_c: float | None = None
    record_route: bool = False  # add our Record-Route when sent (its address depends on the flow)
    egress: Side = Side.SOFTPHONE  # the side of the listener the branch was sent from
    overloaded: bool = False  # our own 503 (no media ports): passed upstream as it is


@dataclass(slots=True, eq=False)
class Context:
    """A response context (section 16.7): one server transaction and its branches."""

    id: int
    server: ServerTransaction
    request: Request  # as received (after route pre-processing)
    side: Side
    user: str | None  # authenticated local user, if any
    branches: list[Branch] = field(default_factory=list)
    final_sent: bool = False
    cancelled: bool = False
    loop_hash: str = ""
    call: Call | None = None
    pending_resolutions: int = 0


class Proxy:
    """The proxy core of one node (see the module docstring)."""

    def __init__(
        self,
        layer: TransactionLayer,
        settings: ProxySettings,
        location: Location,
        *,
        resolver: TargetResolver | None = None,
        digest: DigestServer | None = None,
        password_of: Callable[[str], str | None] = lambda user: None,
        side_of: Callable[[Flow], Side] = lambda flow: Side.SOFTPHONE,
        rng: random.Random | None = None,
        media: MediaHook | None = None,
        lockout: AuthLockout | None = None,
    ) -> None:
        self.layer = layer
        self.lockout = lockout
        """Failed digest answers per source (password guessing); None: never lock out."""
        self.settings = settings
        self.location = location
        self.resolver: TargetResolver = resolver or NoRoutes()
        self.digest = digest or DigestServer(settings.realm, settings.secret)
        self.password_of = password_of
        self.side_of = side_of
        self.media = media
        self.rng = rng or random.Random()
        self._contexts: dict[int, Context] = {}
        self._ids = itertools.count(1)
        self._timers: list[tuple[float, int, Branch]] = []
        self._seq = itertools.count()
        self._events: list[ProxyEvent] = []
        self.calls: dict[tuple[str, str], Call] = {}  # (Call-ID, caller's From tag)
        self.ended_calls: list[Call] = []
        self._in_progress: dict[str, int] = {}
        """Calls in progress per public source IP (settings.calls_per_source); a source
        leaves the dict when its count drops to zero, so memory follows the calls."""
        self._capped: set[str] = set()  # sources at the cap now (logged once on reaching it)
        self._ack_timers: list[tuple[float, int, tuple[str, str]]] = []
        """(deadline, seq, dialog key) of answered calls waiting for their ACK: keys, not
        calls, so that a call that ended is not kept alive for 64*T1 (bounded memory)."""
        self.overload_refused: dict[str, int] = {"calls_per_source": 0, "media_ports": 0}
        """INVITEs answered 503 by this node itself, by reason (a metric)."""
        self.unacknowledged_total = 0
        """Answered calls ended because no ACK came (a metric)."""
        self._no_ack_log = LogLimiter()  # a flood that never ACKs is not a log flood
        self._cap_log = LogLimiter()
        self._local_names = {d.lower() for d in settings.domains} | {
            name.lower() for name in settings.local_hosts
        }
        self._local_addrs: set[tuple[str, int]] = set()
        self._listener_ports = {lst.port for lst in settings.listeners}
        self._sent_bys = frozenset(lst.sent_by.lower() for lst in settings.listeners)
        self._listener_cache: dict[tuple[str, str, tuple[str, int] | None], Listener] = {}
        # A generic product token, never a version (scanners such as svmap fingerprint it);
        # "" leaves the header out (sip.user_agent).
        self._server_header: tuple[tuple[str, str], ...] = (
            (("Server", settings.server_name),) if settings.server_name else ())
        for listener in settings.listeners:
            host = listener.host.lower().strip("[]")
            self._local_names.add(host)
            self._local_addrs.add((host, listener.port))

    # -- plumbing -------------------------------------------------------------------------
    def next_event(self) -> ProxyEvent | None:
        return self._events.pop(0) if self._events else None

    @property
    def timer_entries(self) -> int:
        """Entries in the Timer C heap, stale ones included (a soak gauge)."""
        return len(self._timers)

    @property
    def contexts(self) -> int:
        """Requests being proxied now (a soak gauge)."""
        return len(self._contexts)

    @property
    def calls_in_progress(self) -> int:
        """Calls counted against ``calls_per_source`` now, all sources together (a gauge)."""
        return sum(self._in_progress.values())

    @property
    def capped_sources(self) -> int:
        """Sources whose new INVITEs get 503 now (a gauge)."""
        return len(self._capped)

    def get_timer(self) -> float | None:
        heap = self._timers
        deadline: float | None = None
        while heap:
            first, _, branch = heap[0]
            if branch.timer_c == first and branch.state is not BranchState.DONE:
                deadline = first
                break
            heapq.heappop(heap)
        acks = self._ack_timers
        while acks:
            first, _, key = acks[0]
            if self._awaiting_ack(key) is not None:
                return first if deadline is None else min(deadline, first)
            heapq.heappop(acks)
        return deadline

    def _awaiting_ack(self, key: tuple[str, str]) -> Call | None:
        call = self.calls.get(key)
        if call is None or call.confirmed is not None or call.ended is not None:
            return None
        return call

    def handle_timer(self, now: float) -> None:
        """Timer C (section 16.8): a branch without a final response for too long; and
        answered calls whose ACK never came (:meth:`_no_ack`)."""
        acks = self._ack_timers
        while acks and acks[0][0] <= now:
            _, _, key = heapq.heappop(acks)
            call = self._awaiting_ack(key)
            if call is not None:
                self._no_ack(call, now)
        heap = self._timers
        while heap and heap[0][0] <= now:
            deadline, _, branch = heapq.heappop(heap)
            if branch.timer_c != deadline or branch.state is BranchState.DONE:
                continue
            branch.timer_c = None
            if branch.state is BranchState.PROCEEDING:
                self._cancel_branch(branch, now)
            else:
                self._branch_final(branch, self._synthetic(branch, 408), now)

    def handle_event(self, event: Event, now: float) -> None:
        """One event of the transaction layer."""
        if isinstance(event, RequestReceived):
            self._on_request(event.transaction, event.request, now)
        elif isinstance(event, ResponseReceived):
            branch = event.transaction.user_data
            if isinstance(branch, Branch):
                self._on_response(branch, event.response, now)
        elif isinstance(event, AckReceived):
            self._on_ack(event.request, event.flow, now)
        elif isinstance(event, TransactionTimedOut | TransportFailed):
            txn = event.transaction
            branch = txn.user_data
            if isinstance(txn, ClientTransaction) and isinstance(branch, Branch):
                # RFC 3263 section 4.3: a transport error, or no response at all, moves on to
                # the next address of the target
                silent = isinstance(event, TransactionTimedOut) and (
                    branch.state is BranchState.TRYING
                )
                if (isinstance(event, TransportFailed) or silent) and self._try_next_flow(
                    branch, now
                ):
                    return
                status = 503 if isinstance(event, TransportFailed) else 408
                self._branch_final(branch, self._synthetic(branch, status), now)
        elif isinstance(event, TransactionTerminated):
            txn = event.transaction
            if isinstance(txn, ServerTransaction):
                context = txn.user_data
                if isinstance(context, Context):
                    self._contexts.pop(context.id, None)
                    # break the context <-> branch <-> transaction cycles: freed at once
                    for branch in context.branches:
                        if branch.txn is not None:
                            branch.txn.user_data = None
                    context.branches.clear()
                    txn.user_data = None
        elif isinstance(event, StrayResponse):
            log.debug("stray %s response dropped (RFC 6026 section 7.5)", event.response.status)

    # -- requests -------------------------------------------------------------------------
    def _respond(
        self,
        txn: ServerTransaction,
        request: Request,
        status: int,
        now: float,
        reason: str | None = None,
        headers: Iterable[tuple[str, object]] = (),
    ) -> None:
        response = make_response(
            request,
            status,
            reason,
            to_tag=self._to_tag(request) if status > 100 else None,
            headers=[*headers, *self._server_header],
        )
        txn.respond(response, now)

    def _refuse(
        self,
        txn: ServerTransaction,
        request: Request,
        status: int,
        why: str,
        now: float,
        headers: Iterable[tuple[str, object]] = (),
    ) -> None:
        self._events.append(Refused(request, txn.request_flow, status, why))
        self._respond(txn, request, status, now, headers=headers)

    def _to_tag(self, request: Request) -> str:
        """A To tag stable across retransmissions of the same request (section 8.2.6.2)."""
        seed = f"{request.call_id}\x00{request.from_.tag}\x00{request.via.branch}"
        return hashlib.blake2s(
            seed.encode("utf-8", "surrogateescape") + self.settings.secret, digest_size=6
        ).hexdigest()

    def _on_request(self, txn: ServerTransaction, request: Request, now: float) -> None:
        flow = txn.request_flow
        side = self.side_of(flow)
        method = request.method
        uri = request.uri
        # 16.3 step 2: a scheme we cannot route (RFC 4475 sections 3.3.2 and 3.3.3)
        if not isinstance(uri, SipUri | TelUri):
            self._refuse(txn, request, 416, f"unsupported URI scheme {uri.scheme}", now)
            return
        if method == "CANCEL":
            self._on_cancel(txn, request, now)
            return
        # 16.3 step 3: Max-Forwards (RFC 4475 section 3.3.11)
        max_forwards = request.max_forwards
        to_us = self._addressed_to_us(request)
        if max_forwards == 0 and not (to_us and method in ("OPTIONS", "REGISTER")):
            self._refuse(txn, request, 483, "Max-Forwards reached zero", now)
            return
        # 16.3 step 5: Proxy-Require (RFC 4475 section 3.3.5)
        unsupported = [t for t in request.get_list("Proxy-Require") if t.lower() not in SUPPORTED]
        if unsupported:
            self._refuse(
                txn,
                request,
                420,
                "unsupported Proxy-Require",
                now,
                [("Unsupported", ", ".join(unsupported))],
            )
            return
        # 16.4: route information: loose routing removes our own Route
        in_dialog = request.to.tag is not None
        own_routes = self._pop_own_routes(request)
        if in_dialog:
            if own_routes and not any(self._route_token_ok(r, request) for r in own_routes):
                self._refuse(txn, request, 403, "Record-Route token does not match the dialog", now)
                return
            self._in_dialog(txn, request, side, bool(own_routes), now)
            return
        # 16.3 step 4: loop detection
        loop_hash = self._loop_hash(request)
        if self._looped(request, loop_hash):
            self._refuse(txn, request, 482, "loop detected", now)
            return
        if method == "REGISTER" and (to_us or side is Side.PUBLIC):
            # from another node, never proxied to a user (nor telling whether one exists)
            self._on_register(txn, request, flow, side, now)
            return
        if side is Side.PUBLIC and not self._trusted(flow) and self._from_us(request):
            # Our own users' requests come from the softphone side; one from another node
            # claiming our domain is spoofed (a scanner such as svwar puts the probed user in
            # From). Answered before any user lookup with what an unknown user gets (404), so
            # every user, registered, offline or unknown, looks the same (no enumeration).
            self._refuse(txn, request, 404, "spoofed: From names this node's domain", now)
            return
        user = None
        local_target = self._local_user(uri)
        if local_target is not None and _GLOBAL_NUMBER.fullmatch(local_target) and (
            self.password_of(local_target) is None
        ):
            # a telephone number at our domain, not an account: ENUM finds its node (RFC 6116)
            local_target = None
        if to_us and local_target is None and method == "OPTIONS":
            self._as_uas(txn, request, now)  # a keep-alive or capability probe: reveals nothing
            return
        if side is Side.SOFTPHONE and not self._trusted(flow):
            # 16.3 step 6 (Proxy-Authorization): every softphone request is authenticated,
            # before anything reveals whether a user exists (no enumeration).
            if method == "ACK":
                return
            user = self._authenticate(txn, request, now, proxy=True)
            if user is None:
                return
        if to_us and local_target is None:
            self._as_uas(txn, request, now)
            return
        if (
            local_target is None
            and user is None
            and not (side is Side.SOFTPHONE and self._trusted(flow))
        ):
            # neither from an authenticated local user nor to a local user: not an open relay
            self._refuse(txn, request, 403, "relaying denied", now)
            return
        if local_target is None and side is Side.SOFTPHONE and isinstance(uri, SipUri) and (
            "transport" in uri.params
        ):
            # A softphone's transport= names its own hop to us (baresip adds it to whatever is
            # dialled); between nodes RFC 3263 picks the transport from the callee's DNS.
            request.uri = uri.without_params("transport")
        source = self._capped_source(flow, side) if method == "INVITE" else None
        if source is not None and self._over_cap(source, now):
            self.overload_refused["calls_per_source"] += 1
            self._respond(txn, request, 503, now, headers=self._retry_after())
            return
        context = Context(next(self._ids), txn, request, side, user, loop_hash=loop_hash)
        txn.user_data = context
        self._contexts[context.id] = context
        if method == "INVITE":
            context.call = self._start_call(context, now)
            if source is not None:
                context.call.source = source
                self._in_progress[source] = self._in_progress.get(source, 0) + 1
        if local_target is not None:
            self._fork_local(context, local_target, now)
        else:
            resolution = self.resolver.resolve(request.uri, request, context.id)
            if resolution is None:
                context.pending_resolutions += 1
            else:
                self._apply_resolution(context, resolution, now)

    def resolved(self, ticket: int, resolution: Resolution, now: float) -> None:
        """An asynchronous resolution finished (see :class:`TargetResolver`)."""
        context = self._contexts.get(ticket)
        if context is None or context.final_sent:
            return
        context.pending_resolutions -= 1
        self._apply_resolution(context, resolution, now)

    def _apply_resolution(self, context: Context, resolution: Resolution, now: float) -> None:
        if not resolution.targets:
            self._final_from_proxy(context, resolution.status or 404, now, resolution.reason)
            return
        if context.call is not None:
            context.call.route = resolution.targets[0].route
        for target in resolution.targets:
            self._add_branch(context, target, now)

    def _fork_local(self, context: Context, user: str, now: float) -> None:
        """16.5: a local user's registered contacts, all in parallel (highest q first)."""
        aor = f"{user}@{self._canonical_domain()}"
        bindings = self.location.lookup(aor, now)
        if not bindings:
            # Known-but-offline and unknown users answer alike (404), so a caller cannot tell
            # which users exist (sipvicious svwar sees one answer).
            self._final_from_proxy(context, 404, now)
            return
        for binding in sorted(bindings, key=lambda b: -b.q):
            hop = binding.next_hop
            if hop is not None:  # mailto: and tel: contacts are listed, never called
                self._add_branch(context, Target(binding.target_uri, (hop,)), now)
        if not context.branches:
            self._final_from_proxy(context, 404, now)

    def _canonical_domain(self) -> str:
        if self.settings.canonical_domain:
            return self.settings.canonical_domain
        return min(self.settings.domains) if self.settings.domains else "localhost"

    def _add_branch(self, context: Context, target: Target, now: float) -> None:
        original = context.request
        request = Request(original.method, target.uri, list(original.headers), original.body)
        mf = original.max_forwards
        request.set("Max-Forwards", 70 if mf is None else mf - 1)  # 16.6 steps 1-3
        # 16.6 step 4: dialog-creating requests are record-routed (the address depends on the
        # listener the branch leaves from, chosen in _send_branch)
        record_route = original.method in ("INVITE", "SUBSCRIBE", "REFER", "NOTIFY") or (
            original.method == "UPDATE" and original.to.tag is None
        )
        if context.user is not None:
            # RFC 3261 section 22.3: credentials for our own realm were for us; never forward
            # them to the next hop (they would leak a digest of a local user's password)
            request.headers = [
                h for h in request.headers
                if h.key != "proxy-authorization" or not self._our_realm(h.value)
            ]
            request.touched()
        branch = Branch(context, target, request, record_route=record_route)
        context.branches.append(branch)
        self._send_branch(branch, now)

    def _send_branch(self, branch: Branch, now: float) -> None:
        """16.6 steps 4-10: Record-Route, the Via (with loop-detection branch), a client
        transaction.  A request leaving a softphone's call for another node carries only
        public addresses: our Via alone (topology hiding; responses get the upstream Vias
        back in _forward_response), our public Record-Route, and the softphone's Contact
        replaced by an address of ours that maps back to it."""
        flow = self._with_local(branch.target.flows[branch.flow_index])
        listener = self._listener_for(flow)
        branch.egress = listener.side
        request = branch.request
        context = branch.context
        headers = request.headers
        hide = listener.side is Side.PUBLIC and context.side is Side.SOFTPHONE
        if hide:
            headers = [self._public_header(h, listener) for h in headers if h.key != "via"]
        if branch.record_route:
            rr = self._record_route(context.request, listener)
            headers = [Header("record-route", "Record-Route", rr), *headers]
        via = self._new_via(flow, self._branch_id(context.loop_hash))
        forwarded = Request(
            request.method, request.uri, [Header("via", "Via", via), *headers], request.body
        )
        if self.media is not None and forwarded.body:
            refused = self.media.crossing(
                forwarded, self._media_key(forwarded), context.side, listener.side
            )
            if refused is not None:
                response = self._synthetic(branch, refused)
                if refused == 503:
                    # Our own media ports are gone (RFC 3261 section 21.5.4): say when to
                    # come back, and keep it a 503 upstream (see _maybe_finish)
                    branch.overloaded = True
                    self.overload_refused["media_ports"] += 1
                    response.append("Retry-After", self._retry_after()[0][1])
                self._branch_final(branch, response, now)
                return
        branch.state = BranchState.TRYING
        txn = self.layer.request(forwarded, flow, now)
        txn.user_data = branch
        branch.txn = txn
        if request.method == "INVITE":
            self._arm_timer_c(branch, now)

    def _branch_id(self, loop_hash: str) -> str:
        """Magic cookie, the loop-detection hash, and randomness for uniqueness (16.6 step 8)."""
        return f"{Via.MAGIC_COOKIE}{loop_hash}.{self.rng.getrandbits(48):012x}"

    def _try_next_flow(self, branch: Branch, now: float) -> bool:
        """RFC 3263 section 4.3: on a transport failure try the next address, if any."""
        if branch.flow_index + 1 >= len(branch.target.flows) or branch.context.final_sent:
            return False
        branch.flow_index += 1
        self._send_branch(branch, now)
        return True

    def _arm_timer_c(self, branch: Branch, now: float) -> None:
        deadline = now + self.settings.timer_c
        branch.timer_c = deadline
        heap = self._timers
        heapq.heappush(heap, (deadline, next(self._seq), branch))
        if len(heap) > 4096 and len(heap) > 4 * len(self._contexts) + 4096:
            # Timer C is long (minutes): drop entries of finished branches now, or they would
            # keep their whole call context alive that long (bounded memory under load).
            self._timers = [
                e for e in heap if e[2].timer_c == e[0] and e[2].state is not BranchState.DONE
            ]
            heapq.heapify(self._timers)

    # -- responses ------------------------------------------------------------------------
    def _on_response(self, branch: Branch, response: Response, now: float) -> None:
        context = branch.context
        response.pop_first("via")  # 16.7 step 3: our own Via
        if not response.vias:
            # A UAS that built this response from our CANCEL (one Via) instead of from the
            # INVITE: still the answer of this branch; upstream gets a copy with the right Vias.
            response = self._rebuild(context, response, response.status, response.reason)
        status = response.status
        if status < 200:
            if branch.state is BranchState.TRYING:
                branch.state = BranchState.PROCEEDING
                if branch.cancel_wanted:
                    self._cancel_branch(branch, now)
            if context.request.method == "INVITE" and status > 100:
                self._arm_timer_c(branch, now)  # 16.7 step 2: provisional restarts Timer C
            if status > 100 and not context.final_sent:
                self._forward_response(context, response, now, branch.egress)
            return
        if status == 503 and self._try_next_flow(branch, now):
            return  # RFC 3263 section 4.3: a 503 also moves on to the next address
        if 200 <= status < 300 and branch.state is BranchState.DONE:
            # RFC 6026: a retransmitted or forked 2xx after the first still goes upstream
            self._forward_response(context, response, now, branch.egress)
            return
        self._branch_final(branch, response, now)

    def _branch_final(self, branch: Branch, response: Response, now: float) -> None:
        if branch.state is BranchState.DONE:
            return
        context = branch.context
        branch.state = BranchState.DONE
        branch.timer_c = None
        branch.response = response
        status = response.status
        if 200 <= status < 300:
            # 16.7 step 5: 2xx forwarded at once; then the other branches are cancelled.
            # The call learns the callee's Contact and route set first: forwarding may put
            # public stand-ins in their place.
            self._call_answered(context, response, now)
            self._forward_response(context, response, now, branch.egress)
            context.final_sent = True
            self._cancel_all(context, now)
        elif status >= 600 and not context.final_sent:
            self._cancel_all(context, now)  # 16.7 step 5: a 6xx ends the search
        self._maybe_finish(context, now)

    def _maybe_finish(self, context: Context, now: float) -> None:
        """16.7 step 6: when every branch is done, send the best final response upstream."""
        if context.final_sent or context.pending_resolutions:
            return
        if any(b.state is not BranchState.DONE for b in context.branches):
            return
        responses = [b.response for b in context.branches if b.response is not None]
        best = choose_best(responses)
        if best is None:
            self._final_from_proxy(context, 408, now)
            return
        if best.status == 503 and not any(
            b.overloaded and b.response is best for b in context.branches
        ):
            # 16.7 step 6: a 503 from downstream means "try another proxy", not "this one";
            # our own (no media ports) is about this node and goes up as it is, Retry-After
            best = self._rebuild(context, best, 500, "Server Internal Error")
        if best.status in (401, 407):
            self._aggregate_challenges(best, responses)
        context.final_sent = True
        egress = next((b.egress for b in context.branches if b.response is best), None)
        self._forward_response(context, best, now, egress)
        self._call_failed(context, best.status, now)

    def _rebuild(self, context: Context, response: Response, status: int, reason: str) -> Response:
        """A response to the request of ``context`` standing for a downstream ``response``."""
        rebuilt = make_response(context.request, status, reason, to_tag=response.to.tag)
        for name in ("Contact", "Record-Route", "WWW-Authenticate", "Proxy-Authenticate"):
            for value in response.get_all(name):
                rebuilt.append(name, value)
        for name, value in self._server_header:
            rebuilt.append(name, value)
        if response.body:
            rebuilt.body = response.body
            content_type = response.get("Content-Type")
            if content_type is not None:
                rebuilt.append("Content-Type", content_type)
        return rebuilt

    def _aggregate_challenges(self, best: Response, responses: list[Response]) -> None:
        """16.7 step 7: every challenge of every 401/407 goes into the one forwarded."""
        for other in responses:
            if other is best or other.status not in (401, 407):
                continue
            for name in ("WWW-Authenticate", "Proxy-Authenticate"):
                for value in other.get_all(name):
                    best.append(name, value)

    def _forward_response(
        self, context: Context, response: Response, now: float, egress: Side | None = None
    ) -> None:
        """Send a downstream response upstream (16.7 step 9).

        Its Vias become the upstream request's (what the upstream hops expect, also after
        topology hiding), our Record-Route names the listener of the upstream side (section
        16.7 step 4 allows rewriting our own entry), and a softphone's Contact going to
        another node is replaced by a public address of ours.
        """
        if self.media is not None and response.body and egress is not None:
            self.media.crossing(response, self._media_key(response), egress, context.side)
        upstream = context.request.vias
        rewritten: list[Header] = [Header("via", "Via", via) for via in upstream]
        to_public = context.side is Side.PUBLIC and egress is Side.SOFTPHONE
        ingress = self._listener_for(context.server.request_flow)
        for header in response.headers:
            key = header.key
            if key == "via":
                continue
            if key == "record-route" and self._is_our_route(header.value):
                value = self._record_route_like(header.value, ingress)
                rewritten.append(Header(key, header.name, value))
            elif key == "contact" and to_public:
                rewritten.append(self._public_contact_header(header, ingress))
            else:
                rewritten.append(header)
        response.headers = rewritten
        response.touched()
        context.server.respond(response, now)

    def _final_from_proxy(
        self, context: Context, status: int, now: float, reason: str | None = None
    ) -> None:
        if context.final_sent:
            return
        context.final_sent = True
        self._respond(context.server, context.request, status, now, reason)
        self._call_failed(context, status, now)

    def _synthetic(self, branch: Branch, status: int) -> Response:
        """A response the proxy makes up for a branch (16.8 Timer C, 16.9 transport errors)."""
        response = make_response(branch.context.request, status)
        for name, value in self._server_header:
            response.append(name, value)
        return response

    # -- CANCEL (16.10 and 9.1) -----------------------------------------------------------
    def _on_cancel(self, txn: ServerTransaction, cancel: Request, now: float) -> None:
        invite_txn = self.layer.find_invite(cancel)
        context = invite_txn.user_data if invite_txn is not None else None
        if not isinstance(context, Context):
            self._respond(txn, cancel, 481, now)
            return
        self._respond(txn, cancel, 200, now)
        context.cancelled = True
        self._cancel_all(context, now)
        if not context.final_sent and not context.branches:
            self._final_from_proxy(context, 487, now)

    def _cancel_all(self, context: Context, now: float) -> None:
        for branch in context.branches:
            if branch.state is BranchState.PROCEEDING:
                self._cancel_branch(branch, now)
            elif branch.state is BranchState.TRYING:
                branch.cancel_wanted = True  # 9.1: wait for a provisional before cancelling

    def _cancel_branch(self, branch: Branch, now: float) -> None:
        if branch.txn is None or branch.state is BranchState.DONE:
            return
        invite = branch.txn.request
        cancel = Request("CANCEL", invite.uri)
        cancel.headers.append(Header("via", "Via", invite.via))
        for h in invite.headers:
            if h.key == "route":
                cancel.headers.append(h)
        cancel.append("Max-Forwards", 70)
        cancel.append("From", invite.from_)
        cancel.append("To", invite.to)
        cancel.append("Call-ID", invite.call_id)
        cancel.append("CSeq", CSeq(invite.cseq.number, "CANCEL"))
        self.layer.request(cancel, branch.txn.flow, now)
        branch.cancel_wanted = False

    # -- ACK for 2xx and in-dialog requests -----------------------------------------------
    def _on_ack(self, ack: Request, flow: Flow, now: float) -> None:
        """An ACK for a 2xx is forwarded statelessly along the dialog's route (16.11)."""
        stamp = ack.via.branch or ""
        state = self._dialog_route_state(self._pop_own_routes(ack), ack)
        if state == "ours":
            next_flow = self._next_hop_flow(ack, now)
        else:
            next_flow = None
            local = self._local_user(ack.uri) if state == "none" else None
            if local is None and state == "none":
                next_flow = self._known_party(ack)
            if local is not None:  # a UA that ignores Record-Route (see _in_dialog)
                for binding in self.location.lookup(f"{local}@{self._canonical_domain()}", now):
                    if binding.next_hop is not None:
                        next_flow = binding.next_hop
                        ack.uri = binding.target_uri
                        break
        if next_flow is None:
            return  # not a dialog we carry: drop silently (ACKs are never answered)
        mf = ack.max_forwards
        ack.set("Max-Forwards", 70 if mf is None else max(mf - 1, 0))
        next_flow = self._with_local(next_flow)
        if self.media is not None and ack.body:  # the answer to an offer made in a 2xx
            egress = self._listener_for(next_flow).side
            self.media.crossing(ack, self._media_key(ack), self.side_of(flow), egress)
        digest = hashlib.blake2s(stamp.encode(), digest_size=8).hexdigest()
        via = self._new_via(next_flow, f"{Via.MAGIC_COOKIE}{digest}")
        ack.prepend("Via", via)
        self.layer.send_stateless(ack, next_flow)
        self._track_in_dialog(ack, now)

    def _in_dialog(
        self, txn: ServerTransaction, request: Request, side: Side, ours: bool, now: float
    ) -> None:
        if not ours and self._minted_contact(request.uri):
            ours = True  # sent to a Contact we gave out (its HMAC is checked on decoding)
        if not ours:
            local = self._local_user(request.uri)
            if local is not None:
                # A UA that ignores Record-Route (SIPp's built-in uac) sends its in-dialog
                # requests to the callee's address of record: route them like initial requests
                # to a local user (allowed: they target a local user).
                context = Context(next(self._ids), txn, request, side, None)
                txn.user_data = context
                self._contexts[context.id] = context
                self._track_in_dialog(request, now)
                self._fork_local(context, local, now)
                return
            hop = self._known_party(request)
            if hop is not None:
                # A call we carry whose UAS did not echo our Record-Route: the other party
                # sends to the remote target through us; it names a party of that call.
                context = Context(next(self._ids), txn, request, side, None)
                txn.user_data = context
                self._contexts[context.id] = context
                self._track_in_dialog(request, now)
                self._add_branch(context, Target(request.uri, (hop,), "dialog"), now)
                return
            if side is Side.SOFTPHONE and self._trusted(txn.request_flow):
                # a trusted source may route anywhere: handle it like an initial request
                context = Context(next(self._ids), txn, request, side, None)
                txn.user_data = context
                self._contexts[context.id] = context
                resolution = self.resolver.resolve(request.uri, request, context.id)
                if resolution is None:
                    context.pending_resolutions += 1
                else:
                    self._apply_resolution(context, resolution, now)
                return
            # An in-dialog request for a dialog we did not record-route (or addressed to us
            # as a UA): we hold no dialogs of our own, so there is nothing to match it to.
            status = 403 if side is Side.PUBLIC or not self._addressed_to_us(request) else 481
            self._refuse(txn, request, status, "in-dialog request outside our dialogs", now)
            return
        next_flow = self._next_hop_flow(request, now)
        if next_flow is None:
            self._refuse(txn, request, 404, "no next hop for in-dialog request", now)
            return
        context = Context(next(self._ids), txn, request, side, None)
        txn.user_data = context
        self._contexts[context.id] = context
        self._track_in_dialog(request, now)
        self._add_branch(context, Target(request.uri, (next_flow,), "dialog"), now)

    def _bindings_with_contact(self, contact: SipUri, now: float) -> list[Flow]:
        """The next hops of registrations whose contact is ``contact`` (its real device)."""
        user = contact.user or ""
        hops = []
        for binding in self.location.lookup(f"{unescape(user)}@{self._canonical_domain()}", now):
            if binding.next_hop is not None and binding.contact.uri == contact:
                hops.append(binding.next_hop)
        return hops

    def _known_party(self, request: Request) -> Flow | None:
        """The flow of the party of a call we carry that the Request-URI names, if any."""
        call = self.calls.get((request.call_id, request.from_.tag or "")) or self.calls.get(
            (request.call_id, request.to.tag or "")
        )
        if call is None:
            return None
        if call.callee_contact is not None and request.uri == call.callee_contact:
            return call.callee_flow
        if call.caller_contact is not None and request.uri == call.caller_contact:
            return call.caller_flow
        return None

    def _next_hop_flow(self, request: Request, now: float) -> Flow | None:
        """16.6 step 7 for in-dialog requests: the top Route if any, else the Request-URI.

        A URI naming a local user resolves through the location service; an IP literal is
        used as written (RFC 3263 section 4.2).
        """
        target = request.uri
        if isinstance(target, SipUri) and self._minted_contact(target):
            original = self._decode_contact(target)
            if original is None:
                return None
            request.uri = original  # the softphone's own contact (see _public_contact)
            if isinstance(original, SipUri):
                hops = self._bindings_with_contact(original, now)
                if hops:
                    return hops[0]
        routes = request.routes
        uri = routes[0].uri if routes else request.uri
        if not isinstance(uri, SipUri):
            return None
        user = self._local_user(uri)
        if user is not None:
            for binding in self.location.lookup(f"{user}@{self._canonical_domain()}", now):
                if binding.next_hop is not None:
                    return binding.next_hop
            return None
        return flow_for_uri(uri)

    # -- requests to the proxy itself -----------------------------------------------------
    def _as_uas(self, txn: ServerTransaction, request: Request, now: float) -> None:
        method = request.method
        if method == "OPTIONS":
            # RFC 3261 section 11.2; RFC 4475 section 3.3.15: we only take application/sdp
            accept = request.get_list("Accept")
            if accept and not any(
                a.split(";")[0].strip().lower() in ("application/sdp", "*/*") for a in accept
            ):
                self._respond(
                    txn,
                    request,
                    406,
                    now,
                    headers=[
                        ("Accept", "application/sdp"),
                        ("Warning", '399 - "only application/sdp is accepted"'),
                    ],
                )
                return
            self._respond(
                txn,
                request,
                200,
                now,
                headers=[
                    ("Allow", ALLOW),
                    ("Accept", "application/sdp"),
                    ("Supported", ", ".join(sorted(SUPPORTED))),
                ],
            )
        elif method == "ACK":
            return
        elif method in (
            "INVITE",
            "MESSAGE",
            "SUBSCRIBE",
            "PUBLISH",
            "REFER",
            "INFO",
            "UPDATE",
            "PRACK",
            "NOTIFY",
            "BYE",
        ):
            self._respond(
                txn,
                request,
                405 if method != "BYE" else 481,
                now,
                headers=[("Allow", "OPTIONS, REGISTER")],
            )
        else:
            self._respond(txn, request, 501, now, headers=[("Allow", ALLOW)])

    # -- REGISTER -------------------------------------------------------------------------
    def _on_register(
        self, txn: ServerTransaction, request: Request, flow: Flow, side: Side, now: float
    ) -> None:
        # RFC 4475 section 3.3.4: the To of a REGISTER must be a SIP or SIPS AOR
        if not isinstance(request.to.uri, SipUri):
            self._refuse(txn, request, 400, "To of a REGISTER is not a SIP URI", now)
            return
        if side is not Side.SOFTPHONE or not _in_networks(
            flow.remote[0], self.settings.allow_register_from
        ):
            self._refuse(txn, request, 403, "registration from this source is not allowed", now)
            return
        if self._trusted(flow):
            to_uri = request.to.sip_uri
            name = to_uri.aor.split("@", 1)[0] if to_uri is not None else ""
            if self.password_of(name) is None:  # an account of this node
                self._refuse(txn, request, 404, "no such user", now)
                return
            self._events.append(Registered(txn, request, None))
            return
        user = self._authenticate(txn, request, now, proxy=False)
        if user is None:
            return
        self._events.append(Registered(txn, request, user))

    def _authenticate(
        self, txn: ServerTransaction, request: Request, now: float, *, proxy: bool
    ) -> str | None:
        """Digest (RFC 3261 section 22): the user, or None after answering 401/407/400."""
        header = "Proxy-Authorization" if proxy else "Authorization"
        wall = now + self.settings.wall_offset
        source = txn.request_flow.remote[0]
        lockout = self.lockout
        if lockout is not None and lockout.locked(source, now):
            # Locked out: the credentials are not even checked, so the answer (a plain
            # challenge) is the same for a right and a wrong password.
            self._challenge(txn, request, now, proxy=proxy, stale=False, failed=False)
            return None
        for value in request.get_all(header):
            try:
                credentials = parse_credentials(str(value))
            except ValueError:
                continue
            if not credentials.is_digest or (credentials.realm or "") != self.settings.realm:
                continue
            # The digest-uri must be the Request-URI for a registrar (RFC 2617 section
            # 3.2.2.5, a SHOULD); a proxy cannot insist, since upstream proxies may have
            # rewritten the Request-URI and SIPp puts the proxy's address there. Replays stay
            # impossible: every nonce-count is used once.
            result = self.digest.verify(
                credentials,
                request.method,
                wall,
                self.password_of,
                request_uri=None if proxy else str(request.uri),
                body=request.body,
            )
            if result.status is AuthStatus.OK and result.user is not None:
                return result.user
            if result.status is AuthStatus.MALFORMED:
                self._refuse(txn, request, 400, f"malformed credentials: {result.reason}", now)
                return None
            stale = result.status in (AuthStatus.STALE, AuthStatus.REPLAYED)
            if (result.status is AuthStatus.INVALID and lockout is not None
                    and lockout.failed(source, now)):
                log.warning("authentication: %s locked out for %.0f s after %d failed attempts "
                            "within %.0f s", source, lockout.lockout, lockout.failures,
                            lockout.window)
            self._challenge(txn, request, now, proxy=proxy, stale=stale, failed=not stale)
            return None
        self._challenge(txn, request, now, proxy=proxy, stale=False, failed=False)
        return None

    def _challenge(
        self,
        txn: ServerTransaction,
        request: Request,
        now: float,
        *,
        proxy: bool,
        stale: bool,
        failed: bool,
    ) -> None:
        status = 407 if proxy else 401
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        values = self.digest.challenge(now + self.settings.wall_offset, stale=stale)
        if failed:
            self._events.append(Refused(request, txn.request_flow, status, "wrong credentials"))
        self._respond(txn, request, status, now, headers=[(name, v) for v in values])

    # -- identity and routing helpers -----------------------------------------------------
    def _addressed_to_us(self, request: Request) -> bool:
        uri = request.uri
        if not isinstance(uri, SipUri):
            return False
        if uri.user is None:
            return self._is_local_host(uri)
        return False

    def _is_local_host(self, uri: SipUri) -> bool:
        """Does the URI's host part name this node?

        A domain name we serve names us whatever the port.  An IP address names us only with
        the port of one of our listeners (the default port when none is written): softphones
        on this machine have contacts like ``sip:bob@127.0.0.1:5083``, which are not us.
        """
        host = uri.bare_host
        if not _is_ip(host):
            return host in self._local_names
        port = uri.port or (5061 if uri.secure or uri.transport == "tls" else 5060)
        return port in self._listener_ports and (
            host in self._local_names or (host, port) in self._local_addrs
        )

    def _from_us(self, request: Request) -> bool:
        """Does the From name this node (one of our domains or listener addresses)?"""
        uri = request.from_.uri
        return isinstance(uri, SipUri) and self._is_local_host(uri)

    def _local_user(self, uri: Uri) -> str | None:
        """The local user a Request-URI names, if it is one of ours (user@our-domain)."""
        if not isinstance(uri, SipUri) or uri.user is None:
            return None
        if not self._is_local_host(uri):
            return None
        return uri.aor.split("@", 1)[0]

    def _trusted(self, flow: Flow) -> bool:
        return bool(self.settings.trusted) and _in_networks(flow.remote[0], self.settings.trusted)

    def _listener_for(self, flow: Flow) -> Listener:
        key = (flow.transport, flow.remote[0], flow.local)
        found = self._listener_cache.get(key)
        if found is None:
            if len(self._listener_cache) > 4096:
                self._listener_cache.clear()
            found = self._listener_cache[key] = self._choose_listener(flow)
        return found

    def _choose_listener(self, flow: Flow) -> Listener:
        """The listener to send from: same transport and address family; loopback peers are
        reached from a loopback listener, others from a public one (what Via and
        Record-Route then name must be reachable by the peer)."""
        wanted = flow.transport
        remote = flow.remote[0]
        v6 = ":" in remote
        loopback_peer = _in_networks(remote, LOOPBACK)
        candidates = [
            lst
            for lst in self.settings.listeners
            if lst.transport == wanted and (":" in lst.host) == v6
        ]
        for listener in candidates:
            if flow.local is not None and (listener.host, listener.port) == flow.local:
                return listener
        if loopback_peer:
            # A peer on the softphone listener's own address is a softphone; one on another
            # loopback address is another node on this machine (tests, containers): it gets
            # the public side, with its edge rewriting and media bridging.
            for listener in candidates:
                if listener.side is Side.SOFTPHONE and listener.host == remote:
                    return listener
            for listener in candidates:
                if listener.side is Side.PUBLIC and _in_networks(listener.host, LOOPBACK):
                    return listener
        for listener in candidates:
            if _in_networks(listener.host, LOOPBACK) == loopback_peer:
                return listener
        if candidates:
            return candidates[0]
        return next(
            (lst for lst in self.settings.listeners if lst.transport == wanted),
            self.settings.listeners[0],
        )

    def _with_local(self, flow: Flow) -> Flow:
        if flow.local is not None:
            return flow
        listener = self._listener_for(flow)
        return Flow(flow.transport, flow.remote, (listener.host, listener.port), flow.conn)

    def _sent_by(self, flow: Flow) -> tuple[str, int]:
        listener = self._listener_for(flow)
        host = f"[{listener.host}]" if ":" in listener.host else listener.host
        return host, listener.port

    def _new_via(self, flow: Flow, branch: str) -> Via:
        """Our Via for a request sent on ``flow`` (with rport, RFC 3581), text built at once."""
        host, port = self._sent_by(flow)
        transport = flow.via_transport
        return Via(
            transport, host, port, {"branch": branch, "rport": None}, "SIP/2.0",
            f"SIP/2.0/{transport} {host}:{port};branch={branch};rport",
        )

    def _record_route(self, request: Request, listener: Listener) -> Address:
        """Our Record-Route (16.6 step 4) with lr and a token binding it to this dialog, naming
        ``listener`` (the one the request leaves from: same side, same transport)."""
        return self._rr_address(listener, self._token(request.call_id, request.from_.tag or ""))

    def _rr_address(self, listener: Listener, token: str) -> Address:
        host = f"[{listener.host}]" if ":" in listener.host else listener.host
        params: dict[str, str | None] = {"lr": None}
        if listener.transport != "udp":
            params["transport"] = listener.transport
        params["fc"] = token
        text = f"sip:{host}:{listener.port}" + "".join(
            f";{k}" if v is None else f";{k}={v}" for k, v in params.items()
        )
        uri = SipUri(host, None, "sip", None, listener.port, params, None, text)
        return Address(uri, None, {}, f"<{text}>")

    def _token(self, call_id: str, tag: str) -> str:
        mac = hmac.new(
            self.settings.secret,
            f"{call_id}\x00{tag}".encode("utf-8", "surrogateescape"),
            hashlib.sha256,
        ).digest()
        return base64.b32encode(mac[:10]).decode().lower()

    def _our_realm(self, value: object) -> bool:
        try:
            return parse_credentials(str(value)).realm == self.settings.realm
        except ValueError:
            return False

    def _minted_contact(self, uri: Uri) -> bool:
        """A public Contact of ours standing for a softphone's (see _public_contact)."""
        return isinstance(uri, SipUri) and "fcc" in uri.params and self._is_local_host(uri)

    def _is_our_route(self, value: object) -> bool:
        uri = value.sip_uri if isinstance(value, Address) else None
        return uri is not None and "fc" in uri.params and self._is_local_host(uri)

    def _record_route_like(self, value: Address, listener: Listener) -> Address:
        """Our Record-Route entry, same token, naming ``listener``."""
        uri = value.sip_uri
        token = uri.params.get("fc") if uri is not None else None
        return self._rr_address(listener, token or "")

    def _public_header(self, header: Header, listener: Listener) -> Header:
        """A header of a softphone's request as it may leave the node for another one."""
        if header.key == "contact":
            return self._public_contact_header(header, listener)
        if header.key == "from":
            value = header.value
            uri = value.sip_uri if isinstance(value, Address) else None
            if uri is not None and self._is_local_host(uri) and not self._is_domain(uri):
                # sip:alice@127.0.0.1 -> sip:alice@<our domain>: the user's public address
                # (the tag stays: the dialog is the same)
                public = uri.replace(host=self._canonical_domain(), port=None)
                return Header(header.key, header.name, value.with_uri(public))
        return header

    def _is_domain(self, uri: SipUri) -> bool:
        return uri.bare_host in {d.lower() for d in self.settings.domains} and not _is_ip(
            uri.bare_host
        )

    def _public_contact_header(self, header: Header, listener: Listener) -> Header:
        value = header.value
        if not isinstance(value, Address) or value.sip_uri is None:
            return header
        return Header(header.key, header.name, self._public_contact(value, listener))

    def _public_contact(self, contact: Address, listener: Listener) -> Address:
        """A Contact at our public listener standing for a softphone's (loopback) one.

        The original URI travels in the ``fcc`` parameter with an HMAC, so an in-dialog
        request to it comes back to us and is forwarded to that very softphone, and nobody
        can make us forward elsewhere by forging one.
        """
        original = str(contact.uri)
        code = base64.urlsafe_b64encode(original.encode()).decode().rstrip("=")
        mac = self._mac(original)
        host = f"[{listener.host}]" if ":" in listener.host else listener.host
        params: dict[str, str | None] = {}
        if listener.transport != "udp":
            params["transport"] = listener.transport
        params["fcc"] = f"{code}.{mac}"
        uri = contact.sip_uri
        user = uri.user if uri is not None else None
        public = SipUri(host, user, "sip", None, listener.port, params)
        return Address(public, contact.display, dict(contact.params))

    def _decode_contact(self, uri: SipUri) -> Uri | None:
        """The softphone contact a URI of ours from _public_contact stands for, if genuine."""
        value = uri.params.get("fcc")
        if not value or "." not in value or not self._is_local_host(uri):
            return None
        code, _, mac = value.rpartition(".")
        try:
            original = base64.urlsafe_b64decode(code + "=" * (-len(code) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        if not hmac.compare_digest(mac, self._mac(original)):
            return None
        try:
            return parse_uri(original)
        except SipParseError:
            return None

    def _mac(self, text: str) -> str:
        digest = hmac.new(self.settings.secret, b"contact\x00" + text.encode(), hashlib.sha256)
        return base64.b32encode(digest.digest()[:10]).decode().lower()

    def _dialog_route_state(self, own_routes: list[Address], request: Request) -> str:
        """"ours" (our Record-Route with a valid token, or no route but a Contact we minted:
        a UAS that did not echo Record-Route, SIPp's, leaves no route set, and the request
        comes to that Contact, whose HMAC _next_hop_flow checks, as _in_dialog does), "forged"
        (a token that does not match the dialog) or "none" (no Record-Route of ours; a
        pre-loaded route has no token)."""
        tokens = [r for r in own_routes if r.sip_uri is not None and "fc" in r.sip_uri.params]
        if not tokens:
            return "ours" if self._minted_contact(request.uri) else "none"
        if any(self._route_token_ok(route, request) for route in tokens):
            return "ours"
        return "forged"

    def _route_token_ok(self, route: Address, request: Request) -> bool:
        uri = route.sip_uri
        token = uri.params.get("fc") if uri is not None else None
        if not token:
            return False
        for tag in (request.from_.tag, request.to.tag):
            if tag is not None and hmac.compare_digest(token, self._token(request.call_id, tag)):
                return True
        return False

    def _pop_own_routes(self, request: Request) -> list[Address]:
        """16.4: Route values naming this proxy at the top are removed and returned.

        There can be two: a softphone's pre-loaded outbound-proxy route (RFC 3261 section
        8.1.2, no token) in front of our Record-Route (with its token).
        """
        popped: list[Address] = []
        while True:
            routes = request.routes
            if not routes:
                return popped
            top = routes[0].sip_uri
            if top is None or not self._is_local_host(top):
                return popped
            if top.port is not None and not any(
                lst.port == top.port for lst in self.settings.listeners
            ):
                return popped
            request.pop_first("route")
            popped.append(routes[0])

    def _loop_hash(self, request: Request) -> str:
        """16.6 step 8: what the branch must encode for loop detection (section 16.3 step 4)."""
        parts = [
            str(request.uri),
            request.to.tag or "",
            request.from_.tag or "",
            request.call_id,
            str(request.cseq.number),
            ",".join(map(str, request.get_all("Proxy-Require"))),
            ",".join(map(str, request.get_all("Proxy-Authorization"))),
            str(request.routes[0]) if request.routes else "",
        ]
        return hashlib.blake2s(
            "\x00".join(parts).encode("utf-8", "surrogateescape"), digest_size=6
        ).hexdigest()

    def _looped(self, request: Request, loop_hash: str) -> bool:
        mine = self._sent_bys
        for via in request.vias:
            if via.sent_by.lower() in mine:
                branch = via.branch or ""
                if branch.startswith(f"{Via.MAGIC_COOKIE}{loop_hash}."):
                    return True  # the same request came back unchanged: a loop, not a spiral
        return False

    # -- calls ----------------------------------------------------------------------------
    def _start_call(self, context: Context, now: float) -> Call:
        request = context.request
        from_tag = request.from_.tag or ""
        key = (request.call_id, from_tag)
        direction = "internal"
        if context.side is Side.PUBLIC:
            direction = "in"
        elif self._local_user(request.uri) is None:
            direction = "out"
        call = Call(
            id=self._call_id(request.call_id, from_tag),
            call_id=request.call_id,
            caller=_aor(request.from_.uri),
            callee=_aor(request.uri),
            from_tag=from_tag,
            started=now,
            direction=direction,
            caller_contact=request.contacts[0].uri if request.contacts else None,
            caller_flow=context.server.request_flow,
            cseq_from_caller=request.cseq.number,
            caller_from=request.from_,
            caller_route=tuple(request.record_routes),  # upstream of us, nearest first
        )
        self.calls[key] = call
        self._events.append(CallStarted(call))
        return call

    def _media_key(self, message: Request | Response) -> tuple[str, str]:
        """The dialog a message belongs to, as (Call-ID, the caller's From tag), whichever
        party sent it (the callee's requests carry the caller's tag in To)."""
        call_id = message.call_id
        for tag in (message.from_.tag, message.to.tag):
            call = self.calls.get((call_id, tag or ""))
            if call is not None:
                return (call.call_id, call.from_tag)
        return (call_id, message.from_.tag or "")

    def _call_id(self, call_id: str, tag: str) -> str:
        return hashlib.blake2s(
            f"{call_id}\x00{tag}".encode("utf-8", "surrogateescape"), digest_size=6
        ).hexdigest()

    def _call_answered(self, context: Context, response: Response, now: float) -> None:
        call = context.call
        if call is None or call.answered is not None:
            return
        call.answered = now
        call.outcome = "answered"
        call.to_tag = response.to.tag
        call.callee_to = response.to
        call.callee_contact = response.contacts[0].uri if response.contacts else None
        routes = response.record_routes
        ours = next((i for i, r in enumerate(routes) if self._is_our_route(r)), len(routes))
        call.callee_route = tuple(reversed(routes[:ours]))  # downstream of us, nearest first
        for branch in context.branches:
            if branch.response is response and branch.txn is not None:
                call.callee_flow = branch.txn.flow
        heapq.heappush(self._ack_timers, (now + self.settings.ack_wait, next(self._seq),
                                          (call.call_id, call.from_tag)))
        self._events.append(CallAnswered(call))

    def _call_failed(self, context: Context, status: int, now: float) -> None:
        call = context.call
        if call is None or call.ended is not None or call.answered is not None:
            return
        call.ended = now
        call.outcome = "cancelled" if context.cancelled else f"failed {status}"
        self._finish_call(call)

    def _finish_call(self, call: Call) -> None:
        self._uncount(call)
        self.calls.pop((call.call_id, call.from_tag), None)
        self.ended_calls.append(call)
        del self.ended_calls[:-200]
        self._events.append(CallEnded(call))

    def _track_in_dialog(self, request: Request, now: float) -> None:
        """Follow BYE (the end of a call) and CSeq numbers (for BYEs sent from the middle)."""
        from_tag = request.from_.tag or ""
        to_tag = request.to.tag or ""
        call = self.calls.get((request.call_id, from_tag))
        from_caller = True
        if call is None:
            call = self.calls.get((request.call_id, to_tag))
            from_caller = False
        if call is None:
            return
        if from_caller:
            call.cseq_from_caller = max(call.cseq_from_caller, request.cseq.number)
            if request.method == "ACK" and call.answered is not None and call.confirmed is None:
                call.confirmed = now  # RFC 3261 section 13.2.2.4: the dialog is confirmed
                self._uncount(call)
        else:
            call.cseq_from_callee = max(call.cseq_from_callee, request.cseq.number)
        if request.method == "BYE" and call.ended is None:
            call.ended = now
            call.outcome = "hung up by caller" if from_caller else "hung up by callee"
            self._finish_call(call)

    def _capped_source(self, flow: Flow, side: Side) -> str | None:
        """The source IP an INVITE counts against, or None when it is not capped (the
        softphone side, an exempt network, no cap)."""
        settings = self.settings
        if not settings.calls_per_source or side is not Side.PUBLIC:
            return None
        source = str(flow.remote[0])
        if settings.cap_exempt and _in_networks(source, settings.cap_exempt):
            return None
        return source

    def _over_cap(self, source: str, now: float) -> bool:
        """Whether ``source`` already has ``calls_per_source`` calls in progress: an
        attacker who never ACKs (from many ports) would otherwise hold every media port
        pair; one log line when a source reaches the cap."""
        if self._in_progress.get(source, 0) < self.settings.calls_per_source:
            return False
        if source not in self._capped:
            self._capped.add(source)
            suffix = self._cap_log.allow(now)
            if suffix is not None:
                log.warning("call cap: %s has %d calls in progress (security.calls_per_source):"
                            " its new INVITEs get 503 until some end%s", source,
                            self.settings.calls_per_source, suffix)
        return True

    def _uncount(self, call: Call) -> None:
        """``call`` no longer counts against its source's cap (confirmed or ended)."""
        source = call.source
        if source is None:
            return
        call.source = None
        left = self._in_progress.get(source, 0) - 1
        if left > 0:
            self._in_progress[source] = left
        else:
            self._in_progress.pop(source, None)
        if left < self.settings.calls_per_source:
            self._capped.discard(source)

    def _retry_after(self) -> list[tuple[str, object]]:
        """RFC 3261 section 20.33: seconds before a refused caller should try again; by
        then every call answered before the refusal is confirmed or ended."""
        return [("Retry-After", max(1, round(self.settings.ack_wait)))]

    def _no_ack(self, call: Call, now: float) -> None:
        """An answered call whose ACK did not come within 64*T1: the UAS would end it with
        BYE (RFC 3261 section 13.3.1.4); a UAS that does not (a flooding tool's peer, a
        crashed phone) must not leave the call holding its media ports, so the proxy ends it
        itself, BYE to both parties, as Timer H/L end the transaction (section 17.2.1, RFC
        6026 section 8.7)."""
        self.unacknowledged_total += 1
        suffix = self._no_ack_log.allow(now)
        if suffix is not None:
            log.info("call %s from %s: no ACK for the 2xx within %.0f s (RFC 3261 section "
                     "13.3.1.4): ending it%s", call.id, call.caller_flow.remote[0]
                     if call.caller_flow else "?", self.settings.ack_wait, suffix)
        self.hang_up(call, now, "no ACK for the answer")

    def hang_up(self, call: Call, now: float, reason: str = "hung up by the node") -> bool:
        """End an answered call from the middle: a BYE to each party (shutdown, API)."""
        if call.answered is None or call.ended is not None:
            return False
        for to_caller in (True, False):
            bye = self._bye(call, to_caller, reason)
            flow = call.caller_flow if to_caller else call.callee_flow
            if bye is None or flow is None:
                continue
            bye.prepend(
                "Via",
                Via(
                    flow.via_transport,
                    *self._sent_by(flow),
                    {"branch": f"{Via.MAGIC_COOKIE}{self.rng.getrandbits(64):016x}", "rport": None},
                ),
            )
            self.layer.request(bye, self._with_local(flow), now)
        call.ended = now
        call.outcome = reason
        self._finish_call(call)
        return True

    def _bye(self, call: Call, to_caller: bool, reason: str = "") -> Request | None:
        if call.caller_from is None or call.callee_to is None:
            return None
        target = call.caller_contact if to_caller else call.callee_contact
        if target is None:
            return None
        bye = Request("BYE", target)
        for route in call.caller_route if to_caller else call.callee_route:
            bye.append("Route", route)
        bye.append("Max-Forwards", 70)
        if to_caller:
            # as if from the callee: From = callee's To (with its tag), To = caller's From
            bye.append("From", call.callee_to)
            bye.append("To", call.caller_from)
            call.cseq_from_callee += 1
            bye.append("CSeq", CSeq(call.cseq_from_callee, "BYE"))
        else:
            bye.append("From", call.caller_from)
            bye.append("To", call.callee_to)
            call.cseq_from_caller += 1
            bye.append("CSeq", CSeq(call.cseq_from_caller, "BYE"))
        bye.append("Call-ID", call.call_id)
        text = _quotable(f"Call ended by the freecall node: {reason}" if reason else
                         "Call ended by the freecall node")
        bye.append("Reason", f'SIP;cause=200;text="{text}"')  # RFC 3326
        return bye

    def tell(self, call: Call, to_caller: bool, text: str, now: float) -> bool:
        """Tell one party of a call something (its security outcome and SAS) with a MESSAGE
        (RFC 3428) to the contact it called from or answered with. Out of dialog: softphones
        show it as a text message from ``freecall@<domain>``."""
        target = call.caller_contact if to_caller else call.callee_contact
        flow = call.caller_flow if to_caller else call.callee_flow
        party = call.caller_from if to_caller else call.callee_to
        if target is None or flow is None or party is None:
            return False
        domain = self._canonical_domain()
        message = Request("MESSAGE", target)
        for route in call.caller_route if to_caller else call.callee_route:
            message.append("Route", route)
        message.append("Via", Via(flow.via_transport, *self._sent_by(flow), {
            "branch": f"{Via.MAGIC_COOKIE}{self.rng.getrandbits(64):016x}", "rport": None}))
        message.append("Max-Forwards", 70)
        message.append("From", Address.parse(
            f'"freecall" <sip:freecall@{domain}>;tag={self.rng.getrandbits(48):012x}'))
        message.append("To", Address(party.uri, party.display))
        message.append("Call-ID", f"{self.rng.getrandbits(96):024x}@{domain}")
        message.append("CSeq", CSeq(1, "MESSAGE"))
        message.append("Content-Type", "text/plain;charset=utf-8")
        message.body = text.encode()
        self.layer.request(message, self._with_local(flow), now)
        return True

    def hang_up_all(self, now: float) -> int:
        return sum(self.hang_up(call, now, "node shut down") for call in list(self.calls.values()))


# -- helpers ------------------------------------------------------------------------------------
def _quotable(text: str) -> str:
    """Text that fits in a quoted-string (RFC 3261 25.1) and one log line."""
    return "".join(c if c.isprintable() and c not in '"\\' else " " for c in text)[:200]


@functools.lru_cache(maxsize=4096)
def _in_networks(host: str, networks: tuple[Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return any(address in net for net in networks)


@functools.lru_cache(maxsize=4096)
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _aor(uri: Uri) -> str:
    if isinstance(uri, SipUri):
        return f"{uri.scheme}:{uri.aor}"
    return str(uri)


def flow_for_uri(uri: SipUri) -> Flow | None:
    """A flow for a URI whose host is an IP literal (RFC 3263 section 4.2: no lookup needed)."""
    host = uri.maddr or uri.bare_host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    transport = uri.transport or ("tls" if uri.secure else "udp")
    port = uri.port or (5061 if transport == "tls" else 5060)
    return Flow(transport, (host, port))


_GLOBAL_NUMBER = re.compile(r"\+[0-9][0-9\-.()]{2,30}")  # RFC 3966 global-number-digits

# RFC 3261 section 16.7 step 6: which final response is "best"
_PREFERRED_4XX = (401, 407, 415, 420, 484)


def choose_best(responses: Sequence[Response]) -> Response | None:
    """6xx first; then the lowest class; among 4xx, those that let the caller retry."""
    finals = [r for r in responses if r.status >= 200]
    if not finals:
        return None
    six = [r for r in finals if r.status >= 600]
    if six:
        return six[0]

    def rank(response: Response) -> tuple[int, int, int]:
        status = response.status
        preferred = 0 if status in _PREFERRED_4XX else 1
        return (status // 100, preferred, status)

    return min(finals, key=rank)


__all__ = [
    "Call",
    "CallAnswered",
    "CallEnded",
    "CallStarted",
    "Listener",
    "Location",
    "NoRoutes",
    "Proxy",
    "ProxySettings",
    "Refused",
    "Registered",
    "Resolution",
    "Side",
    "Target",
    "TargetResolver",
    "choose_best",
    "flow_for_uri",
]
