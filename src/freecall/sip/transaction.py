"""SIP transactions: the four RFC 3261 section 17 state machines, with RFC 6026's corrections.

Sans-I/O, aioquic-style.  :class:`TransactionLayer` takes parsed messages with the flow they
arrived on and the time (``receive(msg, flow, now)``), timer expiry (``handle_timer(now)``) and
the transaction user's sends (``request``, ``respond``, ``send_stateless``); the caller pulls what
to send (``messages_to_send()``), what happened (``next_event()``) and when to call back
(``get_timer()``).  Nothing here reads a clock or touches a socket, so a test of an unanswered
INVITE over UDP steps virtual time and sees sends at 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s and
Timer B at 32 s.

Matching (sections 17.1.3 and 17.2.3): responses by the branch of their top Via and the CSeq
method; requests by branch, sent-by and method (ACK matching INVITE), with the RFC 2543
fallback for branches without the magic cookie (RFC 4475 section 3.2.1).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass
from typing import Final

from .flow import Flow
from .headers import CSeq, Via
from .message import Header, Request, Response, make_response

# -- timers -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimerValues:
    """T1, T2, T4 (RFC 3261 section 17.1.1.1 and table 4); the other timers derive from them."""

    t1: float = 0.5  # RTT estimate
    t2: float = 4.0  # maximum retransmit interval for non-INVITE requests and INVITE responses
    t4: float = 5.0  # maximum duration a message remains in the network

    @property
    def b(self) -> float:  # INVITE transaction timeout (also F, H, J, L, M: 64*T1)
        return 64 * self.t1

    @property
    def d(self) -> float:  # wait time for response retransmits: "at least 32 seconds"
        return max(32.0, 64 * self.t1)


class State(enum.Enum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"  # RFC 6026 sections 7.1 and 7.2
    TERMINATED = "Terminated"


# -- events for the transaction user ------------------------------------------------------------


@dataclass(slots=True)
class RequestReceived:
    """A new request created a server transaction; the TU must answer through it."""

    transaction: ServerTransaction
    request: Request


@dataclass(slots=True)
class AckReceived:
    """An ACK for a 2xx (RFC 3261 section 17.1.1.3: not part of the INVITE transaction)."""

    request: Request
    flow: Flow


@dataclass(slots=True)
class ResponseReceived:
    transaction: ClientTransaction
    response: Response


@dataclass(slots=True)
class TransactionTimedOut:
    """Timer B or F (client: no final response) or H (server: no ACK for a final response)."""

    transaction: ClientTransaction | ServerTransaction


@dataclass(slots=True)
class TransportFailed:
    """The transport could not send for this transaction (sections 17.1.4 and 17.2.4)."""

    transaction: ClientTransaction | ServerTransaction


@dataclass(slots=True)
class TransactionTerminated:
    transaction: ClientTransaction | ServerTransaction


@dataclass(slots=True)
class StrayResponse:
    """A response matching no client transaction.  RFC 6026 section 7.5: not forwarded."""

    response: Response
    flow: Flow


Event = (
    RequestReceived
    | AckReceived
    | ResponseReceived
    | TransactionTimedOut
    | TransportFailed
    | TransactionTerminated
    | StrayResponse
)

ServerKey = tuple[str, ...]
ClientKey = tuple[str, ...]


def server_key(request: Request) -> ServerKey:
    """Section 17.2.3: branch, sent-by and method, ACK matching INVITE; else RFC 2543 rules."""
    via = request.via
    method = "INVITE" if request.method == "ACK" else request.method
    if via.rfc3261_branch:
        return (via.branch or "", via.sent_by.lower(), method)
    # RFC 2543 (section 17.2.3, second half): Request-URI, From tag, Call-ID, CSeq number and
    # top Via identify the transaction; the To tag is compared separately for an ACK.
    return (
        "rfc2543",
        str(request.uri),
        request.from_.tag or "",
        request.call_id,
        str(request.cseq.number),
        str(via),
        method,
    )


def client_key(branch: str, method: str) -> ClientKey:
    """Section 17.1.3: the branch of the top Via and the method of the CSeq."""
    return (branch, "INVITE" if method == "ACK" else method)


def new_branch(rng: random.Random) -> str:
    """A branch with the magic cookie and 64 random bits (section 8.1.1.7)."""
    return f"{Via.MAGIC_COOKIE}{rng.getrandbits(64):016x}"


def response_flow(request_flow: Flow, via: Via) -> Flow:
    """Where a response to a request goes (section 18.2.2, RFC 3581 section 4).

    Reliable transports answer on the connection the request came on.  Over UDP the answer goes
    to the received address and the rport (symmetric response routing) or the Via port.
    """
    if request_flow.reliable:
        return request_flow
    if via.received is not None and via.rport is None:
        # The sent-by address was not the source (a NAT, or a Via that lies): its port is no
        # more reliable than its address, so answer the source, as with rport ("force_rport").
        return request_flow
    host = via.received or via.host
    if host.startswith("["):
        host = host[1:-1]
    port = via.rport or via.port or 5060
    if (host, port) == request_flow.remote:
        return request_flow
    return Flow(request_flow.transport, (host, port), request_flow.local)


def stamp_received(request: Request, flow: Flow) -> None:
    """Add received= (and rport=) to the top Via of a request from ``flow`` (section 18.2.1).

    RFC 3581 section 4: with an empty rport the port is filled in and received is added even
    when the address matches the sent-by.
    """
    via = request.via
    source_host, source_port = flow.remote
    sent_host = via.host[1:-1] if via.host.startswith("[") else via.host
    changes: dict[str, str | None] = {}
    if via.wants_rport:
        changes["received"] = source_host
        changes["rport"] = str(source_port)
    elif sent_host.lower() != source_host.lower():
        changes["received"] = source_host
    if changes:
        request.replace_first("via", via.with_params(**changes))


# -- transactions -------------------------------------------------------------------------------


class Transaction:
    """What client and server transactions share: state, flow, timers."""

    __slots__ = ("flow", "invite", "key", "layer", "state", "timers", "user_data")

    def __init__(self, layer: TransactionLayer, key: tuple[str, ...], flow: Flow, invite: bool):
        self.layer: Final = layer
        self.key: Final = key
        self.flow = flow
        self.invite: Final = invite
        self.state = State.TERMINATED
        self.timers: dict[str, float] = {}
        self.user_data: object = None  # for the TU (the proxy keeps its context here)

    def _start_timer(self, name: str, delay: float, now: float) -> None:
        deadline = now + delay
        self.timers[name] = deadline
        self.layer._schedule(deadline, self, name)

    def _stop_timer(self, name: str) -> None:
        self.timers.pop(name, None)

    def _terminate(self) -> None:
        if self.state is State.TERMINATED and not self.timers:
            return
        self.state = State.TERMINATED
        self.timers.clear()
        self.layer._remove(self)

    def on_timer(self, name: str, now: float) -> None:
        raise NotImplementedError


class ClientTransaction(Transaction):
    """Sections 17.1.1 (INVITE) and 17.1.2 (non-INVITE), RFC 6026 section 7.2 (Accepted)."""

    __slots__ = ("_interval", "ack", "request", "wire")

    def __init__(self, layer: TransactionLayer, request: Request, flow: Flow, now: float):
        branch = request.via.branch or ""
        super().__init__(
            layer, client_key(branch, request.method), flow, request.method == "INVITE"
        )
        self.request: Final = request
        self.wire: Final = request.to_bytes()
        self.ack: bytes | None = None
        t = layer.timers
        self._interval = t.t1
        layer._send(self.wire, flow)
        if self.invite:
            self.state = State.CALLING
            if not flow.reliable:
                self._start_timer("A", t.t1, now)
            self._start_timer("B", t.b, now)
        else:
            self.state = State.TRYING
            if not flow.reliable:
                self._start_timer("E", t.t1, now)
            self._start_timer("F", t.b, now)

    def on_response(self, response: Response, now: float) -> None:
        layer = self.layer
        state = self.state
        status = response.status
        t = layer.timers
        if self.invite:
            if state in (State.CALLING, State.PROCEEDING):
                if status < 200:
                    if state is State.CALLING:
                        self.state = State.PROCEEDING
                        self._stop_timer("A")
                        self._stop_timer("B")  # Timer C of the proxy takes over
                    layer._emit(ResponseReceived(self, response))
                elif status < 300:
                    # RFC 6026 section 7.2: wait in Accepted for retransmitted 2xx (Timer M).
                    self.state = State.ACCEPTED
                    self.timers.clear()
                    self._start_timer("M", t.b, now)
                    layer._emit(ResponseReceived(self, response))
                else:
                    self.ack = self._build_ack(response)
                    layer._send(self.ack, self.flow)
                    self.state = State.COMPLETED
                    self.timers.clear()
                    self._start_timer("D", 0.0 if self.flow.reliable else t.d, now)
                    layer._emit(ResponseReceived(self, response))
                    if self.flow.reliable:
                        self._finish()
            elif state is State.COMPLETED:
                if status >= 300 and self.ack is not None:
                    layer._send(self.ack, self.flow)  # retransmitted final: ACK again
            elif state is State.ACCEPTED and 200 <= status < 300:
                layer._emit(ResponseReceived(self, response))
            return
        # non-INVITE
        if state in (State.TRYING, State.PROCEEDING):
            if status < 200:
                if state is State.TRYING:
                    self.state = State.PROCEEDING
                layer._emit(ResponseReceived(self, response))
            else:
                self.state = State.COMPLETED
                self.timers.clear()
                layer._emit(ResponseReceived(self, response))
                if self.flow.reliable:
                    self._finish()
                else:
                    self._start_timer("K", t.t4, now)
        # Completed: retransmitted finals are absorbed

    def on_timer(self, name: str, now: float) -> None:
        layer = self.layer
        t = layer.timers
        if name == "A" and self.state is State.CALLING:
            layer._send(self.wire, self.flow)
            self._interval *= 2
            self._start_timer("A", self._interval, now)
        elif name == "E" and self.state in (State.TRYING, State.PROCEEDING):
            layer._send(self.wire, self.flow)
            if self.state is State.TRYING:
                self._interval = min(2 * self._interval, t.t2)
            else:
                self._interval = t.t2
            self._start_timer("E", self._interval, now)
        elif (name == "B" and self.state is State.CALLING) or (
            name == "F" and self.state in (State.TRYING, State.PROCEEDING)
        ):
            layer._emit(TransactionTimedOut(self))
            self._finish()
        elif name in ("D", "K", "M"):
            self._finish()

    def transport_failed(self) -> None:
        if self.state is not State.TERMINATED:
            self.layer._emit(TransportFailed(self))
            self._finish()

    def _finish(self) -> None:
        self._terminate()
        self.layer._emit(TransactionTerminated(self))

    def _build_ack(self, response: Response) -> bytes:
        """The ACK for a non-2xx final response (section 17.1.1.3)."""
        request = self.request
        ack = Request("ACK", request.uri)
        ack.headers.append(Header("via", "Via", request.via))
        for h in request.headers:
            if h.key == "route":
                ack.headers.append(h)
        ack.append("Max-Forwards", 70)
        ack.append("From", request.from_)
        ack.append("To", response.to)
        ack.append("Call-ID", request.call_id)
        ack.append("CSeq", CSeq(request.cseq.number, "ACK"))
        return ack.to_bytes()


class ServerTransaction(Transaction):
    """Sections 17.2.1 (INVITE) and 17.2.2 (non-INVITE), RFC 6026 section 7.1 (Accepted)."""

    __slots__ = ("_interval", "last_wire", "request", "request_flow", "to_tag")

    def __init__(self, layer: TransactionLayer, key: ServerKey, request: Request, flow: Flow):
        super().__init__(layer, key, response_flow(flow, request.via), request.method == "INVITE")
        self.request: Final = request
        self.request_flow: Final = flow  # where the request came from (``flow`` is where
        # responses go, section 18.2.2)
        self.last_wire: bytes | None = None  # what a retransmitted request gets again
        self.to_tag: str | None = None  # tag of the final response, for RFC 2543 ACK matching
        self._interval = layer.timers.t1
        self.state = State.PROCEEDING if self.invite else State.TRYING

    @property
    def final_sent(self) -> bool:
        return self.state not in (State.TRYING, State.PROCEEDING)

    def respond(self, response: Response, now: float) -> None:
        """Send a response from the TU (the only way the TU answers a request)."""
        state = self.state
        status = response.status
        if state in (State.TERMINATED, State.CONFIRMED):
            return
        if state is State.COMPLETED or (state is State.ACCEPTED and not 200 <= status < 300):
            return  # a final response was already sent
        layer = self.layer
        t = layer.timers
        wire = response.to_bytes()
        self.last_wire = wire
        layer._send(wire, self.flow)
        if status < 200:
            if state is State.TRYING:
                self.state = State.PROCEEDING
            return
        self.to_tag = response.to.tag
        reliable = self.flow.reliable
        if self.invite:
            if status < 300:
                if state is not State.ACCEPTED:
                    self.state = State.ACCEPTED
                    self._start_timer("L", t.b, now)
            else:
                self.state = State.COMPLETED
                if not reliable:
                    self._start_timer("G", t.t1, now)
                self._start_timer("H", t.b, now)
        else:
            self.state = State.COMPLETED
            if reliable:
                self._finish()
            else:
                self._start_timer("J", t.b, now)

    def on_retransmission(self, request: Request, now: float) -> None:
        """A retransmitted request: re-send the last response (sections 17.2.1, 17.2.2)."""
        if request.method == "ACK":
            self._on_ack(request, now)
            return
        if self.state is State.ACCEPTED:
            return  # RFC 6026 section 7.1: absorbed; the TU retransmits the 2xx itself
        if self.last_wire is not None and self.state in (State.PROCEEDING, State.COMPLETED):
            self.layer._send(self.last_wire, self.flow)

    def _on_ack(self, ack: Request, now: float) -> None:
        if self.state is State.COMPLETED and self.invite:
            self.state = State.CONFIRMED
            self._stop_timer("G")
            self._stop_timer("H")
            if self.flow.reliable:
                self._finish()
            else:
                self._start_timer("I", self.layer.timers.t4, now)
        elif self.state is State.ACCEPTED:
            # RFC 6026 section 7.1: an ACK in Accepted goes to the TU (it acknowledges a 2xx).
            self.layer._emit(AckReceived(ack, self.flow))

    def on_timer(self, name: str, now: float) -> None:
        layer = self.layer
        if name == "G" and self.state is State.COMPLETED:
            if self.last_wire is not None:
                layer._send(self.last_wire, self.flow)
            self._interval = min(2 * self._interval, layer.timers.t2)
            self._start_timer("G", self._interval, now)
        elif name == "H" and self.state is State.COMPLETED:
            layer._emit(TransactionTimedOut(self))
            self._finish()
        elif name in ("I", "J", "L"):
            self._finish()

    def transport_failed(self) -> None:
        if self.state is not State.TERMINATED:
            self.layer._emit(TransportFailed(self))
            self._finish()

    def _finish(self) -> None:
        self._terminate()
        self.layer._emit(TransactionTerminated(self))


# -- the layer ----------------------------------------------------------------------------------


class TransactionLayer:
    """All transactions of one SIP element, driven by the caller (see the module docstring)."""

    def __init__(
        self,
        timers: TimerValues | None = None,
        *,
        max_server_transactions: int = 100_000,
        auto_trying: bool = True,
        server_header: str | None = None,
    ) -> None:
        self.timers = timers or TimerValues()
        self.max_server_transactions = max_server_transactions
        self.auto_trying = auto_trying
        self.server_header = server_header
        self.server: dict[ServerKey, ServerTransaction] = {}
        self.client: dict[ClientKey, ClientTransaction] = {}
        self._rfc2543_acks: dict[ServerKey, ServerTransaction] = {}
        self._heap: list[tuple[float, int, Transaction, str]] = []
        self._seq = itertools.count()
        self._outbox: list[tuple[bytes, Flow]] = []
        self._events: deque[Event] = deque()
        self.overloaded = 0  # requests refused with 503 because the table was full

    # -- inputs ---------------------------------------------------------------------------
    def receive(self, msg: Request | Response, flow: Flow, now: float) -> None:
        """A parsed message from the transport."""
        if isinstance(msg, Response):
            self._receive_response(msg, flow, now)
        else:
            self._receive_request(msg, flow, now)

    def _receive_request(self, request: Request, flow: Flow, now: float) -> None:
        stamp_received(request, flow)
        key = server_key(request)
        txn = self.server.get(key)
        if request.method == "ACK":
            if txn is None and key[0] == "rfc2543":
                txn = self._rfc2543_acks.get(key)
                if txn is not None and request.to.tag != txn.to_tag:
                    txn = None
            if txn is not None:
                txn.on_retransmission(request, now)
            else:
                self._emit(AckReceived(request, flow))
            return
        if txn is not None:
            txn.on_retransmission(request, now)
            return
        if len(self.server) >= self.max_server_transactions:
            # Bounded state under a flood: refuse statelessly (section 21.5.4).
            self.overloaded += 1
            busy = make_response(request, 503, headers=[("Retry-After", "5")])
            self._send(busy.to_bytes(), response_flow(flow, request.via))
            return
        txn = ServerTransaction(self, key, request, flow)
        self.server[key] = txn
        if key[0] == "rfc2543" and txn.invite:
            self._rfc2543_acks[key] = txn
        if txn.invite and self.auto_trying:
            # Section 17.2.1: a 100 unless the TU answers within 200 ms; a proxy always does
            # (section 16.2), and it quenches the UAC's retransmissions at once.
            trying = make_response(request, 100)
            if self.server_header:
                trying.append("Server", self.server_header)
            txn.respond(trying, now)
        self._emit(RequestReceived(txn, request))

    def _receive_response(self, response: Response, flow: Flow, now: float) -> None:
        branch = response.via.branch
        txn = self.client.get(client_key(branch or "", response.cseq.method))
        if txn is None:
            self._emit(StrayResponse(response, flow))
            return
        txn.on_response(response, now)

    def handle_timer(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, txn, name = heapq.heappop(heap)
            if txn.timers.get(name) == deadline:
                del txn.timers[name]
                txn.on_timer(name, now)

    # -- TU actions -----------------------------------------------------------------------
    def request(self, request: Request, flow: Flow, now: float) -> ClientTransaction:
        """Start a client transaction; the request's top Via carries a fresh branch."""
        txn = ClientTransaction(self, request, flow, now)
        self.client[txn.key] = txn
        return txn

    def respond(self, txn: ServerTransaction, response: Response, now: float) -> None:
        txn.respond(response, now)

    def send_stateless(self, msg: Request | Response, flow: Flow) -> None:
        """Send outside any transaction: ACK for 2xx, stateless replies."""
        self._send(msg.to_bytes(), flow)

    def transport_failed(self, flow: Flow) -> None:
        """The edge could not deliver to ``flow``: fail the transactions using it."""
        for txn in [t for t in self.client.values() if t.flow == flow]:
            txn.transport_failed()
        for stxn in [t for t in self.server.values() if t.flow == flow]:
            stxn.transport_failed()

    def find_invite(self, cancel: Request) -> ServerTransaction | None:
        """The INVITE server transaction a CANCEL refers to (section 9.2)."""
        key = server_key(cancel)
        return self.server.get((*key[:-1], "INVITE"))

    # -- outputs --------------------------------------------------------------------------
    def messages_to_send(self) -> list[tuple[bytes, Flow]]:
        out = self._outbox
        self._outbox = []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def timer_entries(self) -> int:
        """Entries in the timer heap, stale ones included (a soak gauge: it must stay flat)."""
        return len(self._heap)

    def get_timer(self) -> float | None:
        heap = self._heap
        while heap:
            deadline, _, txn, name = heap[0]
            if txn.timers.get(name) == deadline:
                return deadline
            heapq.heappop(heap)  # stale entry (timer stopped or restarted)
        return None

    # -- internals used by the transactions -----------------------------------------------
    def _send(self, data: bytes, flow: Flow) -> None:
        self._outbox.append((data, flow))

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _schedule(self, deadline: float, txn: Transaction, name: str) -> None:
        heap = self._heap
        heapq.heappush(heap, (deadline, next(self._seq), txn, name))
        if len(heap) > 4096 and len(heap) > 4 * (len(self.client) + len(self.server)) * 2:
            # Stale entries (stopped timers, finished transactions) would otherwise keep their
            # transactions, and the messages in them, alive until each deadline passed.
            self._heap = [e for e in heap if e[2].timers.get(e[3]) == e[0]]
            heapq.heapify(self._heap)

    def _remove(self, txn: Transaction) -> None:
        if isinstance(txn, ClientTransaction):
            if self.client.get(txn.key) is txn:
                del self.client[txn.key]
        else:
            if self.server.get(txn.key) is txn:
                del self.server[txn.key]
            if self._rfc2543_acks.get(txn.key) is txn:
                del self._rfc2543_acks[txn.key]
