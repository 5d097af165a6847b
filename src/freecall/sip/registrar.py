"""Registrar and location service (RFC 3261 section 10), pure and sans-I/O.

The daemon authenticates a REGISTER (``auth.py``, via the proxy's ``Registered`` event) and then
calls :meth:`Registrar.register` with the request, the authenticated user, the :class:`Flow` it
arrived on and ``now``; it gets the response to send.  Expiry runs on the caller's clock through
:meth:`Registrar.get_timer` / :meth:`Registrar.handle_timer`; what happened is pulled with
:meth:`Registrar.next_event` (one event per binding added, refreshed or removed, for the log line
and the control API).  :meth:`Registrar.lookup` is the location service the proxy forks to
(it satisfies ``freecall.sip.proxy.Location``).

Time: ``now`` is the daemon's clock, the same one the proxy and transaction layer get (monotonic
in the daemon).  ``wall_offset`` turns it into POSIX time for the two things that need a calendar:
the Date header of a 200 (section 10.3 step 8) and the snapshot, whose expiry times must survive a
restart (the monotonic origin does not).

Decisions (each is documented again where it is implemented):

- Processing follows section 10.3 steps 1-8 in order.  The request is applied atomically: every
  contact is validated first (400, 423), the changes are computed on a copy, the caps are checked
  (403, 503), and only then committed.
- Binding identity: RFC 3261 section 19.1.4 URI equality, except that a contact carrying
  ``+sip.instance`` is the same binding as an earlier one with that instance (RFC 5626 section 6,
  RFC 5627): a device that changed its Contact URI replaces its old binding instead of adding one.
  With ``outbound=True`` and ``Supported: outbound``, ``reg-id`` separates the flows of one
  instance (RFC 5626 section 6), and the 200 carries ``Require: outbound``.
- Section 10.3 step 7 ordering: an update with the Call-ID of the existing binding and a CSeq that
  is not higher is ignored (that binding is left as it is) and the 200 shows the true current
  bindings.  The RFC says the update "MUST be aborted and the request fails"; we abort the update
  but answer 200, as SER/Kamailio do, because the sender of a delayed or retransmitted REGISTER
  has already moved on and an error would only make it retry something stale.
- Routing: a binding keeps the Contact exactly as sent *and* the flow the REGISTER came on.
  Requests to the device go to ``Binding.next_hop`` (that flow: same TCP/TLS connection, same UDP
  source address), with ``Binding.target_uri`` (the Contact URI without its escaped headers) as
  Request-URI.  We never route to the host in the Contact: the softphone is on loopback or behind
  a NAT, and its Contact may name an interface we cannot reach, a private address, or an
  ephemeral TCP port nobody listens on (RFC 5626 section 5.3 does the same for outbound).
- A REGISTER that creates or refreshes a SIP binding from a flow replaces the AOR's other SIP
  bindings from that same flow made with a *different* Call-ID: one UDP source address or one
  connection is one running UA, and a new Call-ID means it restarted (section 10.2: one Call-ID
  per boot cycle) without unregistering, so its old bindings are dead and would be forked to twice.
  (A REGISTER of the old boot cycle delayed past the new one would undo this until the UA's next
  refresh; on loopback, where the transaction layer absorbs retransmissions, that does not occur.)
- A closed TCP/TLS connection (:meth:`Registrar.remove_flow`) removes every binding that arrived
  over it: requests for those devices would have to go over that connection, and the softphone
  re-registers over a new connection as soon as it notices (RFC 5626 section 4.4 behaviour).
  For the same reason the snapshot does not restore bindings of stream flows.
- Caps, for bounded memory under a flood: ``max_aors`` AORs with bindings (a new AOR beyond it
  gets 503 with Retry-After), ``max_bindings_per_aor`` (a REGISTER that would exceed it gets 403
  and changes nothing, so a misbehaving device cannot push out the user's other devices), a
  Contact longer than ``max_contact_length`` gets 400, User-Agent is truncated and an overlong
  Call-ID is stored as a digest (it is only ever compared).
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import json
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from typing import Any, Final, Literal

from .errors import SipError, SipParseError
from .flow import Flow
from .headers import Address
from .message import Request, Response, make_response
from .uri import SipUri, Uri, parse_uri, unescape

RemovalReason = Literal["unregistered", "expired", "replaced", "flow-closed", "account-removed"]

MAX_DELTA_SECONDS: Final = 2**32 - 1
"""RFC 3261 section 20.19 / 10.2.1.1: larger delta-seconds are read as 2**32-1."""
MAX_USER_AGENT: Final = 200
"""Characters of User-Agent kept per binding (display only)."""
MAX_CALL_ID: Final = 256
"""Longer Call-IDs are stored as a digest: they are only compared, never shown or sent."""
RETRY_AFTER_FULL: Final = 300
"""Retry-After (seconds) of the 503 sent when the AOR table is full (section 21.5.4)."""
SNAPSHOT_VERSION: Final = 1


# -- bindings and events --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Binding:
    """One contact bound to an address-of-record (immutable; a refresh makes a new one).

    ``contact`` is the Contact header value exactly as the UA sent it (URI parameters, contact
    parameters and escaped URI headers included, RFC 4475 sections 3.3.12-3.3.14); ``flow`` is
    where the REGISTER came from, and where requests for this device are sent.
    """

    aor: str  # canonical "user@domain" (see Registrar.canonical_aor)
    contact: Address
    expires_at: float  # on the daemon's clock
    q: float
    call_id: str
    cseq: int
    flow: Flow
    registered_at: float  # first registration of this binding
    updated_at: float  # last REGISTER that refreshed it
    user: str | None = None  # the authenticated user who registered it
    user_agent: str | None = None
    instance: str | None = None  # +sip.instance, normalised (RFC 5626 section 4.1)
    reg_id: int | None = None  # only when outbound processing applied (RFC 5626 section 6)
    _hop: Flow | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        # computed once: every call to this device asks for it
        object.__setattr__(self, "_hop", self._compute_next_hop())

    def expires_in(self, now: float) -> int:
        """Whole seconds left, rounded up so a live binding never shows expires=0."""
        return max(0, math.ceil(self.expires_at - now - 1e-6))

    @property
    def next_hop(self) -> Flow | None:
        return self._hop

    def _compute_next_hop(self) -> Flow | None:
        """Where requests for this device go.

        Over TCP/TLS: the connection the REGISTER came on (the device may not listen at its
        Contact at all).  Over UDP: the Contact's port when the Contact names the very address
        the REGISTER came from (the device listens there; SIPp and some phones send from
        another port), else the source flow itself (a NAT rewrote the address, RFC 3581
        symmetric routing).  None for contacts that are not SIP (mailto:, tel:, RFC 3665
        section 2.2): they are listed in the 200 but cannot be forked to.
        """
        uri = self.contact.uri
        if not isinstance(uri, SipUri):
            return None
        flow = self.flow
        if flow.reliable:
            return flow
        contact_host = _bare(uri.maddr or uri.host)
        if contact_host != _bare(flow.remote[0]):
            return flow
        transport = uri.transport or "udp"
        if transport != "udp":
            return flow
        port = uri.port or 5060
        if port == flow.remote[1]:
            return flow
        return Flow("udp", (flow.remote[0], port), flow.local)

    @property
    def target_uri(self) -> Uri:
        """The Request-URI for a request to this device: the Contact URI without escaped headers.

        RFC 4475 section 3.3.14 (regescrt): the escaped Route stays in the binding, but it must
        never become a header field or stay in a Request-URI (section 3.1.2.11).
        """
        uri = self.contact.uri
        if isinstance(uri, SipUri) and uri.headers is not None:
            return uri.replace(headers=None)
        return uri

    @property
    def contact_matches_source(self) -> bool:
        """True when the Contact names the address the REGISTER came from (no NAT, no
        multi-homing): what the log shows next to the source."""
        uri = self.contact.uri
        if not isinstance(uri, SipUri):
            return False
        port = uri.port or (5061 if uri.secure or uri.transport == "tls" else 5060)
        return (_bare(uri.host), port) == (_bare(self.flow.remote[0]), self.flow.remote[1])

    def describe(self, now: float) -> dict[str, Any]:
        """What the control API shows for one registration."""
        return {
            "user": self.user if self.user is not None else self.aor.rsplit("@", 1)[0],
            "aor": self.aor,
            "contact": str(self.contact),
            "expires_s": self.expires_in(now),
            "source": str(self.flow),
            "q": self.q,
            "user_agent": self.user_agent,
            "instance": self.instance,
            "registered_s_ago": max(0, int(now - self.registered_at)),
        }

    def log_line(self, now: float) -> str:
        agent = f" ({self.user_agent})" if self.user_agent else ""
        return (
            f"{self.aor} at {self.contact.uri} via {self.flow}{agent}, "
            f"expires in {self.expires_in(now)} s"
        )


@dataclass(frozen=True, slots=True)
class BindingAdded:
    binding: Binding

    def __str__(self) -> str:
        return "registered " + self.binding.log_line(self.binding.updated_at)


@dataclass(frozen=True, slots=True)
class BindingRefreshed:
    binding: Binding
    previous: Binding

    def __str__(self) -> str:
        return "refreshed " + self.binding.log_line(self.binding.updated_at)


@dataclass(frozen=True, slots=True)
class BindingRemoved:
    binding: Binding
    reason: RemovalReason

    def __str__(self) -> str:
        b = self.binding
        return f"removed {b.aor} at {b.contact.uri} via {b.flow}: {self.reason}"


RegistrarEvent = BindingAdded | BindingRefreshed | BindingRemoved


# -- helpers --------------------------------------------------------------------------------


def _bare(host: str) -> str:
    return host[1:-1].lower() if host.startswith("[") else host.lower()


def _normal_host(host: str) -> str:
    """Lower case, IPv6 without brackets and in canonical form ("[::0001]" == "::1")."""
    bare = _bare(host.strip())
    if ":" in bare:
        try:
            return str(ipaddress.IPv6Address(bare))
        except ValueError:
            return bare
    return bare


def _delta_seconds(value: object) -> int | None:
    """delta-seconds (section 25.1), None when absent or malformed; capped at 2**32-1."""
    if value is None:
        return None
    text = str(value).strip(" \t")
    if not text or not text.isascii() or not text.isdigit():
        return None
    if len(text) > 10:
        return MAX_DELTA_SECONDS
    return min(int(text), MAX_DELTA_SECONDS)


def _instance_id(value: str | None) -> str | None:
    """The instance-id of a ``+sip.instance`` value (``"<urn:uuid:...>"``, RFC 5626 4.1).

    Quotes and angle brackets are dropped; a UUID URN is case-insensitive (RFC 4122 section 3).
    """
    if value is None:
        return None
    text = value.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1].strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if not text:
        return None
    return text.lower() if text[:9].lower() == "urn:uuid:" else text


def _call_id_key(call_id: str) -> str:
    if len(call_id) <= MAX_CALL_ID:
        return call_id
    return "#" + hashlib.sha256(call_id.encode("utf-8", "surrogateescape")).hexdigest()


def _same_binding(
    uri_a: Uri,
    inst_a: str | None,
    reg_a: int | None,
    uri_b: Uri,
    inst_b: str | None,
    reg_b: int | None,
) -> bool:
    """Whether two contacts designate the same binding.

    Both with an instance-id: the same instance (RFC 5627 / RFC 5626 section 6), and the same
    reg-id when both have one (two reg-ids are two flows of one device).  Otherwise URI equality
    (RFC 3261 section 10.3 step 7, comparison per section 19.1.4), so a device that adds or drops
    its instance-id still finds its binding.
    """
    if inst_a is not None and inst_b is not None:
        return inst_a == inst_b and (reg_a is None or reg_b is None or reg_a == reg_b)
    return bool(uri_a == uri_b)


@dataclass(slots=True)
class _Op:
    """One Contact of a REGISTER after validation."""

    contact: Address
    instance: str | None
    reg_id: int | None
    granted: int  # seconds; 0 removes


class _Refusal(SipError):
    """Internal: the request fails with this status (raised during validation)."""

    def __init__(self, status: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = tuple(headers)


# -- the registrar --------------------------------------------------------------------------


class Registrar:
    """Location service for the domains this node serves (RFC 3261 section 10.3)."""

    def __init__(
        self,
        domains: Iterable[str],
        *,
        canonical_domain: str | None = None,
        min_expires: int = 60,
        max_expires: int = 3600,
        default_expires: int = 3600,
        max_bindings_per_aor: int = 10,
        max_aors: int = 1000,
        max_contact_length: int = 2048,
        outbound: bool = False,
        wall_offset: float = 0.0,
    ) -> None:
        """``domains``: every host name or address that names this registrar (its domains and,
        if softphones are configured with it as their domain, 127.0.0.1 and the like).  A node
        has one user namespace (digest authenticates a user name, not a domain), so an AOR at
        any of them is stored as ``user@canonical_domain``; the default, the smallest domain,
        is what ``Proxy`` uses for its look-ups.

        ``outbound``: apply RFC 5626 reg-id processing.  Enable it only when the edge answers
        outbound keep-alives (CRLF pong on streams, STUN on UDP, RFC 5626 sections 3.5.1 and
        4.4.1); without it reg-id is ignored (RFC 5626 section 6) and ``Require: outbound`` is
        refused with 420.
        """
        names = {_normal_host(d) for d in domains if d.strip()}
        if not names:
            raise ValueError("a registrar needs at least one domain")
        canonical = _normal_host(canonical_domain) if canonical_domain else min(names)
        names.add(canonical)
        # RFC 3261 section 10.3 step 7 lets 423 be used below one hour only.
        if not 0 < min_expires <= max_expires or min_expires > 3600:
            raise ValueError("need 0 < min_expires <= max_expires and min_expires <= 3600")
        if max_bindings_per_aor < 1 or max_aors < 1:
            raise ValueError("the caps must be at least 1")
        self.domains: frozenset[str] = frozenset(names)
        self.canonical_domain = canonical
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.default_expires = min(max(default_expires, min_expires), max_expires)
        self.max_bindings_per_aor = max_bindings_per_aor
        self.max_aors = max_aors
        self.max_contact_length = max_contact_length
        self.outbound = outbound
        self.wall_offset = wall_offset
        self.supported: frozenset[str] = frozenset({"outbound"} if outbound else ())
        self._aors: dict[str, list[Binding]] = {}
        self._count = 0
        self._heap: list[tuple[float, str]] = []  # (expires_at, aor); stale entries allowed
        self._events: deque[RegistrarEvent] = deque()

    # -- names ----------------------------------------------------------------------------
    def serves(self, request: Request) -> bool:
        """Section 10.3 step 1: whether the Request-URI names a domain we hold bindings for.

        When False the daemon proxies the REGISTER to that domain (a softphone using us as
        outbound proxy for another provider) or, if it will not, lets :meth:`register` answer
        416/404.
        """
        uri = request.uri
        return isinstance(uri, SipUri) and _normal_host(uri.host) in self.domains

    def canonical_aor(self, uri: Uri) -> str | None:
        """The key of an AOR in one of our domains (section 10.3 step 5), else None.

        URI parameters are dropped and the user part unescaped (so ``sip:null-%00-null@...``
        keeps its NUL, RFC 4475 section 3.1.1.4); the scheme does not matter (sip and sips name
        the same user); every local domain maps to the canonical one.
        """
        if not isinstance(uri, SipUri) or _normal_host(uri.host) not in self.domains:
            return None
        if uri.user is None:
            return self.canonical_domain
        return f"{unescape(uri.user)}@{self.canonical_domain}"

    def _aor_key(self, aor: str) -> str | None:
        """Canonical key for an AOR given as text: "alice@example.org" (user part as is, already
        unescaped) or a URI "sip:alice@example.org" (parsed, so escapes are decoded)."""
        text = aor.strip()
        if text[:5].lower().startswith(("sip:", "sips:")):
            try:
                return self.canonical_aor(parse_uri(text))
            except SipParseError:
                return None
        user, at, host = text.rpartition("@")
        if _normal_host(host) not in self.domains:
            return None
        return f"{user}@{self.canonical_domain}" if at else self.canonical_domain

    def _authorized(self, authenticated_user: str, to_uri: SipUri, aor: str | None) -> bool:
        """Section 10.3 step 4: a user may change the bindings of their own AOR only.

        A bare user name ("alice", what digest authenticates) owns that user at our domains;
        "alice@example.org" must name the same AOR.
        """
        if "@" in authenticated_user:
            mine = self._aor_key(authenticated_user)
            return mine is not None and mine == aor
        return to_uri.user is not None and unescape(to_uri.user) == authenticated_user

    # -- REGISTER -------------------------------------------------------------------------
    def register(
        self, request: Request, authenticated_user: str | None, flow: Flow, now: float
    ) -> Response:
        """Process a REGISTER (RFC 3261 section 10.3) and return the response to send.

        ``authenticated_user`` is who digest authenticated (step 3 is the caller's); None means
        the caller trusts the source (a trusted loopback without authentication) and step 4 is
        skipped.  Never raises on a parsed request; raises ValueError for another method.
        """
        if request.method != "REGISTER":
            raise ValueError(f"not a REGISTER: {request.method}")
        self.handle_timer(now)
        try:
            aor, outbound_applied = self._process(request, authenticated_user, flow, now)
        except _Refusal as refusal:
            return self._reply(request, refusal.status, refusal.reason, list(refusal.headers))
        return self._ok(request, aor, now, outbound_applied)

    def _process(
        self, request: Request, authenticated_user: str | None, flow: Flow, now: float
    ) -> tuple[str, bool]:
        # Step 1: the Request-URI must name one of our domains (see serves()).
        uri = request.uri
        if not isinstance(uri, SipUri):
            raise _Refusal(416, "Unsupported URI Scheme")  # section 8.2.2.1
        if _normal_host(uri.host) not in self.domains:
            raise _Refusal(404, "Not Found")
        # Step 2: Require, processed as a UAS does (section 8.2.2.3).
        unsupported = [t for t in request.get_list("Require") if t.lower() not in self.supported]
        if unsupported:
            raise _Refusal(420, "Bad Extension", [("Unsupported", ", ".join(unsupported))])
        # Step 3 (authentication) is the caller's.  Steps 4 and 5 read the To AOR, which must
        # be a SIP or SIPS URI (section 10.2; RFC 4475 section 3.3.4, unksm2).
        to_uri = request.to.uri
        if not isinstance(to_uri, SipUri):
            raise _Refusal(400, "To Must Be a SIP or SIPS URI")
        aor = self.canonical_aor(to_uri)
        # Step 4: authorisation.
        if authenticated_user is not None and not self._authorized(authenticated_user, to_uri, aor):
            raise _Refusal(403, "Forbidden")
        # Step 5: the AOR must be valid for our domain.
        if aor is None:
            raise _Refusal(404, "Not Found")
        # Step 6: Contact: '*' (section 10.2.2), or the contacts, validated before any change.
        call_id = _call_id_key(request.call_id)
        cseq = request.cseq.number
        if request.contact_star:
            stars = sum(1 for h in request.headers if h.key == "contact" and h.value == "*")
            if stars > 1 or request.contacts or _delta_seconds(request.get("expires")) != 0:
                raise _Refusal(400, "Contact * Needs Expires 0 and No Other Contact")
            self._remove_all(aor, call_id, cseq)
            return aor, False
        contacts = request.contacts
        if not contacts:
            return aor, False  # a query (section 10.2.3): bindings unchanged
        ops, outbound_applied = self._validate(request, contacts)
        # Step 7: compute the new binding set on a copy, check the caps, then commit.
        self._apply(aor, ops, request, authenticated_user, flow, call_id, cseq, now)
        return aor, outbound_applied

    def _validate(self, request: Request, contacts: list[Address]) -> tuple[list[_Op], bool]:
        """Per-contact expiry (section 10.3 step 7, 10.2.1.1) and RFC 5626 parameters."""
        header_expires = _delta_seconds(request.get("expires"))
        outbound = self.outbound and any(
            t.lower() == "outbound" for t in request.get_list("Supported")
        )
        ops: list[_Op] = []
        too_brief = False
        with_reg_id = 0
        for contact in contacts:
            if len(str(contact)) > self.max_contact_length:
                raise _Refusal(400, "Contact Too Long")
            instance = _instance_id(contact.params.get("+sip.instance"))
            reg_id: int | None = None
            if outbound and instance is not None and "reg-id" in contact.params:
                raw = contact.params["reg-id"] or ""
                if not (raw.isascii() and raw.isdigit() and len(raw) <= 10):
                    raise _Refusal(400, "Malformed reg-id")
                reg_id = int(raw)
                if not 1 <= reg_id <= 2**31 - 1:  # RFC 5626 section 10 grammar
                    raise _Refusal(400, "Malformed reg-id")
                with_reg_id += 1
            # The expires parameter, else the Expires header, else our default; a malformed
            # value counts as absent (section 20.19 asks malformed values be read as 3600).
            requested = _delta_seconds(contact.params.get("expires"))
            if requested is None:
                requested = header_expires
            if requested is None:
                requested = self.default_expires
            if 0 < requested < self.min_expires:
                too_brief = True
            ops.append(_Op(contact, instance, reg_id, min(requested, self.max_expires)))
        if too_brief:
            # Section 10.3 step 7 and 21.4.17: 423 with the minimum we accept.
            raise _Refusal(423, "Interval Too Brief", [("Min-Expires", str(self.min_expires))])
        if with_reg_id > 1:
            # RFC 5626 section 6: one flow per REGISTER.
            raise _Refusal(400, "More Than One Contact with reg-id")
        return _merge_duplicates(ops), with_reg_id > 0

    def _apply(
        self,
        aor: str,
        ops: list[_Op],
        request: Request,
        user: str | None,
        flow: Flow,
        call_id: str,
        cseq: int,
        now: float,
    ) -> None:
        """Section 10.3 step 7 for every contact, atomically (section 10.3: all or nothing)."""
        current = list(self._aors.get(aor, ()))
        working = list(current)
        events: list[RegistrarEvent] = []
        touched: set[int] = set()  # ids of bindings created or refreshed by this request
        agent = request.get("user-agent")
        user_agent = str(agent)[:MAX_USER_AGENT] if agent is not None else None
        registered_sip = False
        for op in ops:
            uri = op.contact.uri
            matches = [
                b
                for b in working
                if _same_binding(uri, op.instance, op.reg_id, b.contact.uri, b.instance, b.reg_id)
            ]
            if matches:
                primary = max(matches, key=lambda b: b.updated_at)
                if primary.call_id == call_id and cseq <= primary.cseq:
                    # Step 7: same Call-ID and a CSeq not higher: a delayed or repeated request
                    # must not undo a newer one.  This binding is left unchanged.
                    continue
                if op.granted == 0:
                    for b in matches:
                        working.remove(b)
                        events.append(BindingRemoved(b, "unregistered"))
                    continue
                fresh = Binding(
                    aor,
                    op.contact,
                    now + op.granted,
                    op.contact.q,
                    call_id,
                    cseq,
                    flow,
                    primary.registered_at,
                    now,
                    user,
                    user_agent,
                    op.instance,
                    op.reg_id,
                )
                for b in matches:
                    working.remove(b)
                    if b is not primary:
                        events.append(BindingRemoved(b, "replaced"))
                if bool(primary.contact.uri == uri):
                    events.append(BindingRefreshed(fresh, primary))
                else:
                    # The same device (instance-id) with a new Contact URI (RFC 5626 section 6).
                    events.append(BindingRemoved(primary, "replaced"))
                    fresh = replace(fresh, registered_at=now)
                    events.append(BindingAdded(fresh))
            elif op.granted == 0:
                continue  # removing a binding that does not exist: nothing to do
            else:
                fresh = Binding(
                    aor,
                    op.contact,
                    now + op.granted,
                    op.contact.q,
                    call_id,
                    cseq,
                    flow,
                    now,
                    now,
                    user,
                    user_agent,
                    op.instance,
                    op.reg_id,
                )
                events.append(BindingAdded(fresh))
            working.append(fresh)
            touched.add(id(fresh))
            registered_sip = registered_sip or isinstance(uri, SipUri)
        if registered_sip:
            # One source address or connection is one running UA: its SIP bindings from an
            # earlier Call-ID (an earlier boot cycle, section 10.2) are dead.
            for b in list(working):
                if (
                    id(b) not in touched
                    and b.flow == flow
                    and b.call_id != call_id
                    and isinstance(b.contact.uri, SipUri)
                ):
                    working.remove(b)
                    events.append(BindingRemoved(b, "replaced"))
        if len(working) > self.max_bindings_per_aor:
            raise _Refusal(403, "Too Many Registrations")
        if working and not current and len(self._aors) >= self.max_aors:
            raise _Refusal(503, "Registrar Full", [("Retry-After", str(RETRY_AFTER_FULL))])
        self._commit(aor, working, events)

    def _remove_all(self, aor: str, call_id: str, cseq: int) -> None:
        """Section 10.3 step 6, Contact '*': every binding goes, except those a delayed
        request with their Call-ID and an older CSeq would wrongly remove."""
        kept: list[Binding] = []
        events: list[RegistrarEvent] = []
        for b in self._aors.get(aor, ()):
            if b.call_id == call_id and cseq <= b.cseq:
                kept.append(b)
            else:
                events.append(BindingRemoved(b, "unregistered"))
        self._commit(aor, kept, events)

    def _commit(self, aor: str, bindings: list[Binding], events: list[RegistrarEvent]) -> None:
        old = self._aors.get(aor, [])
        self._count += len(bindings) - len(old)
        if bindings:
            self._aors[aor] = bindings
        else:
            self._aors.pop(aor, None)
        old_times = {b.expires_at for b in old}
        for t in {b.expires_at for b in bindings} - old_times:
            heapq.heappush(self._heap, (t, aor))
        self._events.extend(events)
        if len(self._heap) > 4 * self._count + 64:
            self._rebuild_heap()

    # -- responses ------------------------------------------------------------------------
    @staticmethod
    def _to_tag(request: Request) -> str:
        """A To tag (section 8.2.6.2) that is the same for every retransmission."""
        seed = f"{request.call_id}\x00{request.from_.tag}\x00{request.cseq.number}"
        return hashlib.blake2s(seed.encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()

    def _reply(
        self,
        request: Request,
        status: int,
        reason: str | None = None,
        headers: list[tuple[str, Any]] | None = None,
    ) -> Response:
        return make_response(
            request, status, reason, to_tag=self._to_tag(request), headers=headers or []
        )

    def _ok(self, request: Request, aor: str, now: float, outbound: bool) -> Response:
        """Section 10.3 step 8: 200 with every current binding and its remaining expiry."""
        headers: list[tuple[str, Any]] = []
        if outbound:
            headers.append(("Require", "outbound"))  # RFC 5626 section 6
        for b in self.lookup(aor, now):
            headers.append(("Contact", b.contact.with_params(expires=str(b.expires_in(now)))))
        headers.append(("Date", formatdate(now + self.wall_offset, usegmt=True)))
        return self._reply(request, 200, None, headers)

    # -- location service -----------------------------------------------------------------
    def lookup(self, aor: str | Uri, now: float) -> list[Binding]:
        """Live bindings of an AOR, highest q first, then the most recently refreshed.

        ``aor`` is "user@domain" (any of our domains, or a sip:/sips: URI text) or a parsed URI.
        """
        key = self.canonical_aor(aor) if not isinstance(aor, str) else self._aor_key(aor)
        if key is None:
            return []
        live = [b for b in self._aors.get(key, ()) if b.expires_at > now]
        live.sort(key=lambda b: (-b.q, -b.updated_at))
        return live

    def exists(self, user: str) -> bool:
        """Whether ``user`` has any binding (``freecall.sip.proxy.Location``).

        The registrar knows registrations, not accounts: a daemon that must tell an unknown
        user from an offline one answers this from its account list instead.
        """
        return f"{user}@{self.canonical_domain}" in self._aors

    def bindings(self, now: float) -> list[Binding]:
        """Every live binding, by AOR then as :meth:`lookup` orders them (control API)."""
        out: list[Binding] = []
        for aor in sorted(self._aors):
            out.extend(self.lookup(aor, now))
        return out

    @property
    def binding_count(self) -> int:
        return self._count

    @property
    def aor_count(self) -> int:
        return len(self._aors)

    def remove_flow(self, flow: Flow) -> int:
        """A connection closed: drop the bindings registered over it (reason "flow-closed").

        Requests for those devices could only go over that connection; the softphone opens a
        new one and re-registers.  Returns how many bindings were removed.
        """
        removed = 0
        for aor in [a for a, bs in self._aors.items() if any(b.flow == flow for b in bs)]:
            kept: list[Binding] = []
            events: list[RegistrarEvent] = []
            for b in self._aors[aor]:
                if b.flow == flow:
                    events.append(BindingRemoved(b, "flow-closed"))
                else:
                    kept.append(b)
            removed += len(events)
            self._commit(aor, kept, events)
        return removed

    def remove_user(self, user: str, now: float) -> int:
        """The account is gone (configuration reload): drop its bindings at once, so that
        nothing is delivered to a user this node no longer has. Returns how many went."""
        del now  # the removal is immediate; kept for the cores' uniform signature
        aor = f"{user}@{self.canonical_domain}"
        bindings = self._aors.get(aor, [])
        self._commit(aor, [], [BindingRemoved(b, "account-removed") for b in bindings])
        return len(bindings)

    # -- timers and events ----------------------------------------------------------------
    @property
    def timer_entries(self) -> int:
        """Entries in the expiry heap, stale ones included (a soak gauge)."""
        return len(self._heap)

    def get_timer(self) -> float | None:
        """When the next binding expires (call :meth:`handle_timer` then), or None."""
        heap = self._heap
        while heap:
            t, aor = heap[0]
            for binding in self._aors.get(aor, ()):
                if binding.expires_at == t:
                    return t
            heapq.heappop(heap)  # stale: refreshed or removed since
        return None

    def handle_timer(self, now: float) -> None:
        """Remove every binding whose expiry has passed (reason "expired")."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, aor = heapq.heappop(heap)
            bindings = self._aors.get(aor)
            if not bindings:
                continue
            kept = [b for b in bindings if b.expires_at > now]
            if len(kept) != len(bindings):
                gone = [b for b in bindings if b.expires_at <= now]
                self._commit(aor, kept, [BindingRemoved(b, "expired") for b in gone])

    def _rebuild_heap(self) -> None:
        self._heap = [
            (t, aor) for aor, bs in self._aors.items() for t in {b.expires_at for b in bs}
        ]
        heapq.heapify(self._heap)

    def next_event(self) -> RegistrarEvent | None:
        """The oldest event not yet pulled (drain after every call, like the other cores)."""
        return self._events.popleft() if self._events else None

    # -- snapshot -------------------------------------------------------------------------
    def to_json(self) -> str:
        """Every binding as JSON, times in POSIX seconds (the caller writes it atomically)."""
        off = self.wall_offset
        entries = [
            {
                "aor": b.aor,
                "contact": str(b.contact),
                "expires_at": b.expires_at + off,
                "call_id": b.call_id,
                "cseq": b.cseq,
                "flow": {
                    "transport": b.flow.transport,
                    "remote": list(b.flow.remote),
                    "local": list(b.flow.local) if b.flow.local is not None else None,
                },
                "registered_at": b.registered_at + off,
                "updated_at": b.updated_at + off,
                "user": b.user,
                "user_agent": b.user_agent,
                "instance": b.instance,
                "reg_id": b.reg_id,
            }
            for bs in self._aors.values()
            for b in bs
        ]
        return json.dumps({"version": SNAPSHOT_VERSION, "bindings": entries}, indent=1)

    def from_json(self, text: str, now: float) -> int:
        """Load a :meth:`to_json` snapshot into this registrar; return how many bindings came back.

        An instance method because the configuration (domains, caps) is this registrar's, not
        the snapshot's.  Dropped: expired bindings, bindings of stream flows (their connections
        died with the old process), AORs no longer in our domains, malformed entries, duplicates
        of bindings already present, and anything beyond the caps.  No events are emitted.
        Raises ValueError when the text is not a snapshot at all.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"registrar snapshot is not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != SNAPSHOT_VERSION:
            raise ValueError("not a registrar snapshot of a known version")
        entries = data.get("bindings")
        if not isinstance(entries, list):
            raise ValueError("registrar snapshot without a binding list")
        restored = 0
        for entry in entries:
            binding = self._binding_from_entry(entry, now)
            if binding is None:
                continue
            bindings = self._aors.get(binding.aor, [])
            if any(
                _same_binding(
                    binding.contact.uri,
                    binding.instance,
                    binding.reg_id,
                    b.contact.uri,
                    b.instance,
                    b.reg_id,
                )
                for b in bindings
            ):
                continue
            if len(bindings) >= self.max_bindings_per_aor or (
                not bindings and len(self._aors) >= self.max_aors
            ):
                continue
            self._commit(binding.aor, [*bindings, binding], [])
            restored += 1
        return restored

    def _binding_from_entry(self, entry: object, now: float) -> Binding | None:
        if not isinstance(entry, dict):
            return None
        off = self.wall_offset
        try:
            f = entry["flow"]
            transport = str(f["transport"]).lower()
            remote = (str(f["remote"][0]), int(f["remote"][1]))
            local = (str(f["local"][0]), int(f["local"][1])) if f.get("local") else None
            flow = Flow(transport, remote, local)
            if flow.reliable:
                return None  # the connection did not survive the restart
            aor = self._aor_key(str(entry["aor"]))
            expires_at = float(entry["expires_at"]) - off
            if aor is None or not expires_at > now or not math.isfinite(expires_at):
                return None
            contact_text = str(entry["contact"])
            if len(contact_text) > self.max_contact_length:
                return None
            registered_at = float(entry["registered_at"]) - off
            updated_at = float(entry["updated_at"]) - off
            if not (math.isfinite(registered_at) and math.isfinite(updated_at)):
                return None
            contact = Address.parse(contact_text, "Contact")
            reg_id = entry.get("reg_id")
            user = entry.get("user")
            agent = entry.get("user_agent")
            instance = entry.get("instance")
            return Binding(
                aor,
                contact,
                min(expires_at, now + self.max_expires),
                contact.q,
                _call_id_key(str(entry["call_id"])),
                int(entry["cseq"]),
                flow,
                registered_at,
                updated_at,
                str(user) if user is not None else None,
                str(agent)[:MAX_USER_AGENT] if agent is not None else None,
                _instance_id(str(instance)) if instance is not None else None,
                int(reg_id) if reg_id is not None else None,
            )
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            return None  # SipParseError is a ValueError


def _merge_duplicates(ops: list[_Op]) -> list[_Op]:
    """Contacts of one REGISTER that designate the same binding collapse into one.

    The last one wins, except that a removal (expires=0) never overrides a registration of the
    same binding in the same request: Linphone sends its old Contact with expires=0 next to the
    new one, both with the same +sip.instance, and means "move", not "remove".
    """
    out: list[_Op] = []
    for op in ops:
        for i, seen in enumerate(out):
            if _same_binding(
                op.contact.uri,
                op.instance,
                op.reg_id,
                seen.contact.uri,
                seen.instance,
                seen.reg_id,
            ):
                if not (op.granted == 0 and seen.granted > 0):
                    out[i] = op
                break
        else:
            out.append(op)
    return out


__all__ = [
    "Binding",
    "BindingAdded",
    "BindingRefreshed",
    "BindingRemoved",
    "Registrar",
    "RegistrarEvent",
    "RemovalReason",
]
