"""The relay's SIP edge: a stateless proxy (RFC 3261 section 16.11) for attached nodes only.

A node behind NAT keeps a TLS connection to the relay and attaches over it with a REGISTER
carrying a node-key proof (:mod:`freecall.peering.nat`); its signed record then says "reach me
through this relay". The edge keeps a bounded table node id -> that connection and forwards:

* an initial request whose Request-URI (``user@domain``, then ``domain``) the relay's own host
  cache routes to a node whose record names this relay: over that node's connection, with
  our Record-Route (``fcn=<node id>``) so the dialog's later requests come back here;
* an in-dialog request carrying that Record-Route as its Route: to the node it names, or,
  coming from that very node, on to the next Route (the far end), loose routing (section
  16.12);
* an in-dialog request without it (freecall nodes hide their route sets and send in-dialog
  requests to the Contact they minted, over the connection the call came on): to the
  attached node whose record lists the Request-URI's address, or, coming from an attached
  node, to the Request-URI;
* a response: back along the Via we added (section 16.11), over the connection the request
  came on (section 18.2.2), which our Via names under a MAC so nobody can steer it.

Everything else gets an answer of RFC 3261 and no forwarding: never an open relay. 404 when a
record names this relay but its node is not attached now, 403 when nothing names this relay,
483 on Max-Forwards 0. Bodies (SDP) pass untouched. Pure: messages and ``now`` in, (bytes, flow)
pairs out.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from freecall.peering.nat import ATTACH_HEADER, check_attach_proof
from freecall.peering.records import AddrKind, NodeRecord, RecordError, normalize_route
from freecall.sip.flow import Flow
from freecall.sip.headers import Address, Via
from freecall.sip.message import Request, Response, make_response
from freecall.sip.uri import SipUri

__all__ = ["Attachment", "SipEdge"]

log = logging.getLogger("freecall.relay.sip")

BRANCH_PREFIX = f"{Via.MAGIC_COOKIE}fcr"
NODE_PARAM = "fcn"
FLOW_PARAM = "fcf"
RECORD_ROUTED = frozenset({"INVITE", "SUBSCRIBE", "REFER", "NOTIFY"})
_FLOW = struct.Struct(">QH")

Out = list[tuple[bytes, Flow]]
_SIP_KINDS = frozenset({AddrKind.SIP_UDP, AddrKind.SIP_TCP, AddrKind.SIP_TLS})


@dataclass(slots=True)
class Attachment:
    """One attached node: the connection it keeps to us and when its registration ends."""

    node_id: bytes
    flow: Flow
    expires: float
    since: float


class SipEdge:
    """The forwarding core (module docstring).

    ``records_for(route)``: host-cache records serving a route (``user@domain`` or
    ``domain``); ``tls_fingerprint``: this relay's TLS key (what attach proofs are bound to);
    ``host``/``port``: the TLS listener named in Via and Record-Route.
    """

    def __init__(self, *, host: str, port: int, node_id: bytes, tls_fingerprint: bytes,
                 secret: bytes, records_for: Callable[[str], Sequence[NodeRecord]],
                 max_attached: int = 10_000, max_expires: float = 3600.0,
                 min_expires: float = 60.0, server: str = "freecall relay",
                 alive: Callable[[int], bool] = lambda conn: True,
                 record_of: Callable[[bytes], NodeRecord | None] = lambda node: None) -> None:
        self.host = host
        self.port = port
        self.node_id = node_id
        self.tls_fingerprint = tls_fingerprint
        self.secret = secret
        self.records_for = records_for
        self.max_attached = max_attached
        self.max_expires = max_expires
        self.min_expires = min_expires
        self.server = server
        self.alive = alive
        self.record_of = record_of
        """The host-cache record of a node id (its SIP addresses name it in Request-URIs)."""
        self._by_address: dict[tuple[str, int], bytes] = {}
        self._unindexed: set[bytes] = set()
        """Whether a connection (by id) is still open: a dead one is not named as a target."""
        self.attached: OrderedDict[bytes, Attachment] = OrderedDict()
        self.forwarded = 0
        self.refused = 0
        self.attach_refused = 0

    # -- inputs -------------------------------------------------------------------------------
    def receive(self, msg: Request | Response, flow: Flow, now: float, wall: float) -> Out:
        """One message from ``flow``; ``wall`` is the Unix time (attach proofs carry it)."""
        if isinstance(msg, Response):
            return self._response(msg)
        return self._request(msg, flow, now, wall)

    def flow_closed(self, flow: Flow) -> list[bytes]:
        """A connection closed: the nodes attached over it are detached (returned)."""
        gone = [n for n, a in self.attached.items() if a.flow.conn == flow.conn]
        for node in gone:
            self._forget(node)
        return gone

    def handle_timer(self, now: float) -> list[bytes]:
        """Registrations past their expiry are dropped (returned)."""
        gone = [n for n, a in self.attached.items() if a.expires <= now]
        for node in gone:
            self._forget(node)
        return gone

    def get_timer(self) -> float | None:
        return min((a.expires for a in self.attached.values()), default=None)

    # -- requests -----------------------------------------------------------------------------
    def _request(self, request: Request, flow: Flow, now: float, wall: float) -> Out:
        method = request.method
        if method == "REGISTER":
            return self._register(request, flow, now, wall)
        max_forwards = request.max_forwards
        if max_forwards == 0:  # section 16.3 step 3
            return self._answer(request, flow, 483)
        routes = request.routes
        own = routes[0] if routes and self._is_ours(routes[0]) else None
        if own is not None:  # section 16.4: our own Route is removed
            request.pop_first("Route")
            target = self._in_dialog(request, flow, own)
        elif routes:
            return self._refuse(request, flow, 403, "a Route that is not ours")
        elif request.to.tag is not None:
            target = self._by_uri(request, flow)
        elif method == "OPTIONS" and self._to_us(request):
            return self._answer(request, flow, 200)
        else:
            target = self._initial(request)
        if isinstance(target, int):
            return self._refuse(request, flow, target, "no attached node")
        return self._forward(request, flow, target, record_route=own is None)

    def _register(self, request: Request, flow: Flow, now: float, wall: float) -> Out:
        """Attach (or detach, Expires 0) the node whose proof the REGISTER carries."""
        proof = request.get(ATTACH_HEADER)
        if proof is None or flow.transport != "tls" or flow.conn is None:
            self.attach_refused += 1
            return self._answer(request, flow, 403, reason="Attach Proof Required")
        try:
            node = check_attach_proof(str(proof), self.tls_fingerprint, wall)
        except ValueError as exc:
            self.attach_refused += 1
            log.info("attach from %s refused: %s", flow, exc)
            return self._answer(request, flow, 403, reason="Bad Attach Proof")
        wanted = request.expires
        if wanted == 0:
            self._forget(node)
            return self._answer(request, flow, 200, headers=[("Expires", "0")])
        expires = min(self.max_expires, max(self.min_expires,
                                            float(wanted if wanted is not None else 600)))
        known = self.attached.pop(node, None)
        if known is None and len(self.attached) >= self.max_attached:
            self.attach_refused += 1
            return self._answer(request, flow, 503, headers=[("Retry-After", "300")])
        since = known.since if known is not None and known.flow == flow else now
        self.attached[node] = Attachment(node, flow, now + expires, since)
        self._index(node)
        if known is None or known.flow != flow:
            log.info("node %s attached over %s for %.0f s", node.hex()[:16], flow, expires)
        return self._answer(request, flow, 200, headers=[("Expires", str(int(expires)))])

    def _index(self, node: bytes) -> None:
        """Remember which SIP addresses the node's record lists (its minted Contacts)."""
        record = self.record_of(node)
        if record is None:
            self._unindexed.add(node)
            return
        self._unindexed.discard(node)
        for address in record.addresses:
            if address.kind in _SIP_KINDS:
                self._by_address[(_norm(address.host), address.port)] = node

    def _forget(self, node: bytes) -> None:
        self.attached.pop(node, None)
        self._unindexed.discard(node)
        for key in [k for k, v in self._by_address.items() if v == node]:
            del self._by_address[key]

    def _by_uri(self, request: Request, flow: Flow) -> Flow | int:
        """An in-dialog request without our Route: to the attached node at the Request-URI,
        or, from an attached node, on to the Request-URI."""
        uri = request.uri
        if not isinstance(uri, SipUri):
            return 403
        transport = (uri.params.get("transport") or ("tls" if uri.secure else "udp")).lower()
        key = (_norm(uri.bare_host), uri.port or (5061 if transport == "tls" else 5060))
        if key not in self._by_address and self._unindexed:
            for node in list(self._unindexed)[:64]:  # records that came after the attach
                self._index(node)
        found = self._by_address.get(key)
        attachment = self.attached.get(found) if found is not None else None
        if attachment is not None and attachment.flow.conn != flow.conn:
            return attachment.flow
        sender = any(a.flow.conn == flow.conn for a in self.attached.values()) \
            if flow.conn is not None else False
        if not sender or transport not in ("udp", "tcp", "tls"):
            return 403
        try:
            ipaddress.ip_address(key[0])
        except ValueError:
            return 404  # records carry addresses; a relay resolves no names
        return Flow(transport, key)

    def _initial(self, request: Request) -> Flow | int:
        """Section 16.5 for an initial request: the attached node the host cache routes the
        Request-URI to, through us."""
        uri = request.uri
        if not isinstance(uri, SipUri):
            return 403
        keys: list[str] = []
        host = uri.bare_host
        if uri.user:
            keys.append(f"{uri.user}@{host}")
        keys.append(host)
        named = False
        for key in keys:
            try:
                route = normalize_route(key)
            except RecordError:
                continue
            for record in self.records_for(route):
                via = record.via_relay
                if via is None or via.node_id != self.node_id:
                    continue
                named = True
                attachment = self.attached.get(record.node_id)
                if attachment is not None:
                    return attachment.flow
        return 404 if named else 403

    def _in_dialog(self, request: Request, flow: Flow, own: Address) -> Flow | int:
        """Our Route names the attached node of the dialog: to it, or from it onwards."""
        value = own.uri.params.get(NODE_PARAM) if isinstance(own.uri, SipUri) else None
        try:
            node = bytes.fromhex(value or "")
        except ValueError:
            return 403
        attachment = self.attached.get(node)
        if attachment is None:
            return 404 if len(node) == 16 else 403
        if attachment.flow.conn != flow.conn:
            return attachment.flow
        # From the attached node: back over the connection the dialog's first request came
        # on (RFC 5626 section 5.3's flow token: the far end may be behind NAT as well), else
        # the next Route, else the Request-URI (section 16.12).
        back = self._flow_of("rr", own.uri.params.get(FLOW_PARAM) or "") if isinstance(
            own.uri, SipUri) else None
        if back is not None and back.conn is not None and self.alive(back.conn):
            return back
        routes = request.routes
        target = routes[0].uri if routes else request.uri
        if not isinstance(target, SipUri):
            return 403
        host = target.bare_host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return 404  # records carry addresses; a relay resolves no names
        transport = (target.params.get("transport") or ("tls" if target.secure else "udp"))
        transport = transport.lower()
        if transport not in ("udp", "tcp", "tls"):
            return 403
        port = target.port or (5061 if transport == "tls" else 5060)
        return Flow(transport, (host, port))

    def _forward(self, request: Request, flow: Flow, target: Flow,
                 *, record_route: bool) -> Out:
        """Section 16.6/16.11: Max-Forwards, Record-Route, our Via; the body untouched."""
        mf = request.max_forwards
        request.set("Max-Forwards", 70 if mf is None else mf - 1)
        top = request.via
        host = flow.remote[0]
        if top.host.strip("[]") != host or top.port != flow.remote[1]:
            request.replace_first("Via", top.with_params(received=host))  # section 18.2.1
        if record_route and request.method in RECORD_ROUTED and request.to.tag is None:
            node = next((n for n, a in self.attached.items() if a.flow == target), None)
            if node is not None:
                token = self._flow_token("rr", flow)
                request.prepend("Record-Route", Address.parse(
                    f"<sip:{self._sent_by()};transport=tls;lr;{NODE_PARAM}={node.hex()};"
                    f"{FLOW_PARAM}={token}>"))
        branch = self._branch(top)
        via = Via("TLS", self._host(), self.port,
                  {"branch": branch, FLOW_PARAM: self._flow_token(branch, flow)})
        request.prepend("Via", via)
        self.forwarded += 1
        return [(request.to_bytes(), target)]

    # -- responses ----------------------------------------------------------------------------
    def _response(self, response: Response) -> Out:
        vias = response.vias
        if len(vias) < 2:
            return []
        ours = vias[0]
        branch = ours.branch or ""
        token = ours.params.get(FLOW_PARAM) or ""
        back = self._flow_of(branch, token) if branch.startswith(BRANCH_PREFIX) else None
        if back is None:
            return []  # not a Via of ours: dropped (section 16.11, 18.2.2)
        response.pop_first("Via")
        return [(response.to_bytes(), back)]

    # -- helpers ------------------------------------------------------------------------------
    def _branch(self, top: Via) -> str:
        """Section 16.11: the same branch for a request and its retransmissions, CANCEL and
        non-2xx ACK (all carry the incoming top Via's branch)."""
        text = f"{top.branch}|{top.sent_by}".encode()
        return BRANCH_PREFIX + hmac.new(self.secret, text, hashlib.sha256).hexdigest()[:20]

    def _flow_token(self, branch: str, flow: Flow) -> str:
        ip = ipaddress.ip_address(flow.remote[0])
        data = _FLOW.pack(flow.conn or 0, flow.remote[1]) + bytes((
            {"udp": 0, "tcp": 1, "tls": 2}[flow.transport],)) + ip.packed
        mac = hmac.new(self.secret, branch.encode() + data, hashlib.sha256).digest()[:8]
        return (data + mac).hex()

    def _flow_of(self, branch: str, token: str) -> Flow | None:
        try:
            raw = bytes.fromhex(token)
        except ValueError:
            return None
        if len(raw) not in (_FLOW.size + 1 + 4 + 8, _FLOW.size + 1 + 16 + 8):
            return None
        data, mac = raw[:-8], raw[-8:]
        good = hmac.new(self.secret, branch.encode() + data, hashlib.sha256).digest()[:8]
        if not hmac.compare_digest(mac, good) or data[_FLOW.size] > 2:
            return None
        conn, port = _FLOW.unpack_from(data)
        transport = ("udp", "tcp", "tls")[data[_FLOW.size]]
        host = str(ipaddress.ip_address(data[_FLOW.size + 1:]))
        return Flow(transport, (host, port), None, conn or None)

    def _is_ours(self, route: Address) -> bool:
        uri = route.uri
        return (isinstance(uri, SipUri) and uri.bare_host == self.host.lower()
                and (uri.port or 5061) == self.port)

    def _to_us(self, request: Request) -> bool:
        uri = request.uri
        return (isinstance(uri, SipUri) and not uri.user and uri.bare_host == self.host.lower()
                and (uri.port or 5061) == self.port)

    def _host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def _sent_by(self) -> str:
        return f"{self._host()}:{self.port}"

    def _refuse(self, request: Request, flow: Flow, status: int, why: str) -> Out:
        self.refused += 1
        log.info("refused %s %s from %s: %d (%s)", request.method, request.uri, flow, status,
                 why)
        return self._answer(request, flow, status)

    def _answer(self, request: Request, flow: Flow, status: int, *, reason: str | None = None,
                headers: Sequence[tuple[str, str]] = ()) -> Out:
        if request.method == "ACK":
            return []  # never answered (section 17.2.3)
        response = make_response(request, status, reason, to_tag=_to_tag(request),
                                 headers=[*headers, ("Server", self.server)])
        return [(response.to_bytes(), flow)]


def _norm(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host.lower()


def _to_tag(request: Request) -> str:
    """A stable To tag for our own answers (retransmissions get the same one)."""
    return hashlib.sha256(f"{request.call_id}|{request.via.branch}".encode()).hexdigest()[:16]

