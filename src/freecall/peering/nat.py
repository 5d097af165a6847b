"""A node behind NAT: what STUN says about it, the proof it attaches to a relay with, and the
life of the connection it keeps to that relay (pure: no sockets, no clock, no asyncio).

* Node-level STUN (RFC 5389 section 7, Binding): :func:`binding_request` and
  :func:`mapped_address` build and read the datagrams; :func:`classify` turns the mapped
  addresses one socket got from several servers into a :class:`NatStatus`. "Behind NAT" means
  the mapped address is not one of this host's own (RFC 5389 section 1: the reflexive address
  differs from the local one only when a NAT is on the path); different mapped ports for one
  socket towards different servers mean address-dependent mapping (RFC 4787 section 4.1),
  through which nobody can call in directly.
* Attachment: the node opens TLS to a relay (checking the relay's key against the relay's
  signed record), then sends ``REGISTER`` with a ``Freecall-Attach`` header: its Ed25519
  node key and a signature over a context string, the relay's TLS key fingerprint it saw and
  the time (:func:`attach_proof`, checked by :func:`check_attach_proof`). Bound to the relay's
  TLS key, the proof cannot be replayed to another relay; sent inside that TLS connection,
  only that relay ever sees it.
* :class:`RelayLink` is the client side: connect, attach, RFC 5626 section 4.4.1 CRLF keep-alives
  (a double-CRLF ping at a random 80-100% of the interval, the flow failed when no CRLF pong
  comes within 10 s), re-attach before the registration ends, and on any failure RFC 5626
  section 4.5 back-off with the next relay. It says what to do through actions, aioquic-style.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import random
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from freecall.relay.stun import (
    Attr,
    Class,
    Method,
    StunError,
    decode_xor_address,
    encode_message,
    parse_message,
)

from .records import (
    PUBLIC_KEY_SIZE,
    AddrKind,
    Flag,
    NodeIdentity,
    NodeRecord,
    RelayVia,
    node_id_of,
)

__all__ = [
    "ATTACH_HEADER",
    "Close",
    "Connect",
    "NatStatus",
    "NatView",
    "Publish",
    "RelayLink",
    "SendPing",
    "SendRegister",
    "attach_proof",
    "binding_request",
    "check_attach_proof",
    "classify",
    "mapped_address",
    "rank_relays",
    "relay_candidates",
]

ATTACH_HEADER = "Freecall-Attach"
ATTACH_CONTEXT = b"freecall-attach-v1\x00"
ATTACH_SKEW = 300.0
"""A proof older or newer than this (seconds, wall clock) is refused."""
PONG_TIMEOUT = 10.0
"""RFC 5626 section 4.4.1: no pong within 10 s of a ping and the flow has failed."""
DEFAULT_KEEPALIVE = 120.0
"""RFC 5626 section 4.4.1: the keep-alive interval for connection-oriented transports."""
MAX_WAIT = 1800.0
"""RFC 5626 section 4.5: max-time, the longest wait before retrying."""


# -- node-level STUN (RFC 5389) -----------------------------------------------------------------

def binding_request(transaction_id: bytes) -> bytes:
    """A Binding request (RFC 5389 section 7.1) with FINGERPRINT; ``transaction_id`` is 12
    random bytes from the caller."""
    if len(transaction_id) != 12:
        raise ValueError("a STUN transaction id is 12 bytes")
    return encode_message(Method.BINDING, Class.REQUEST, transaction_id, ())


def mapped_address(data: bytes, transaction_id: bytes) -> tuple[str, int] | None:
    """The XOR-MAPPED-ADDRESS of a success response to our request (section 15.2), else
    None (garbage, another transaction, an error response: hostile input never raises)."""
    try:
        msg = parse_message(data)
    except StunError:
        return None
    if (msg.method != Method.BINDING or msg.cls != Class.SUCCESS
            or msg.transaction_id != transaction_id):
        return None
    value = msg.get(Attr.XOR_MAPPED_ADDRESS)
    if value is None:
        return None
    try:
        return decode_xor_address(value, transaction_id)
    except (StunError, ValueError, struct.error):
        return None


@dataclass(frozen=True, slots=True)
class NatStatus:
    """What node-level STUN found (``/api/status`` ``nat``)."""

    public: tuple[str, int] | None
    """The mapped address the first server answered with (None: no server answered)."""
    behind_nat: bool | None
    """None: unknown (no answer)."""
    mapping: str
    """``none`` (not behind NAT), ``endpoint-independent``, ``address-dependent`` (RFC 4787
    section 4.1; symmetric NAT) or ``unknown`` (one server only, or none)."""

    def summary(self) -> dict[str, object]:
        return {"public_address": f"{_host(self.public[0])}:{self.public[1]}"
                if self.public else None,
                "behind_nat": self.behind_nat, "mapping": self.mapping}


UNKNOWN = NatStatus(None, None, "unknown")


def classify(mappings: Sequence[tuple[str, int]], is_local: Callable[[str], bool]) -> NatStatus:
    """``mappings``: what each server answered for one local socket, in order; ``is_local``:
    whether an address is one of this host's own."""
    if not mappings:
        return UNKNOWN
    first = mappings[0]
    if is_local(_norm(first[0])):
        return NatStatus(first, False, "none")
    if len(mappings) < 2:
        return NatStatus(first, True, "unknown")
    same = all(m == first for m in mappings[1:])
    return NatStatus(first, True, "endpoint-independent" if same else "address-dependent")


# -- the attachment proof -----------------------------------------------------------------------

def _signed(public_key: bytes, relay_tls: bytes, when: int) -> bytes:
    return ATTACH_CONTEXT + public_key + relay_tls + struct.pack(">Q", when)


def attach_proof(identity: NodeIdentity, relay_tls: bytes, now: float) -> str:
    """The ``Freecall-Attach`` header value: ``pk=<b64>;ts=<unix>;sig=<b64>``."""
    when = int(now)
    signature = identity.sign(_signed(identity.public_key, relay_tls, when))
    return (f"pk={_b64(identity.public_key)};ts={when};sig={_b64(signature)}")


def check_attach_proof(value: str, relay_tls: bytes, now: float,
                       skew: float = ATTACH_SKEW) -> bytes:
    """The node id a proof is for; ValueError (with the reason) if it does not hold."""
    fields: dict[str, str] = {}
    for part in value.split(";"):
        key, sep, item = part.strip().partition("=")
        if sep and key in ("pk", "ts", "sig") and key not in fields:
            fields[key] = item.strip()
    if len(fields) != 3:
        raise ValueError("malformed proof")
    try:
        public_key = _unb64(fields["pk"])
        signature = _unb64(fields["sig"])
        when = int(fields["ts"])
    except (ValueError, binascii.Error) as exc:
        raise ValueError("malformed proof") from exc
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != 64 or not 0 <= when < 2**63:
        raise ValueError("malformed proof")
    if abs(now - when) > skew:
        raise ValueError("stale proof (check the clocks)")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            signature, _signed(public_key, relay_tls, when))
    except (InvalidSignature, ValueError) as exc:
        raise ValueError("bad signature") from exc
    return node_id_of(public_key)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text or len(text) > 200:
        raise ValueError("bad base64")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- the one verdict ----------------------------------------------------------------------------

class NatView:
    """The node's one answer to "behind NAT?", from two observers.

    * Node-level STUN (:class:`NatStatus`, ``NatService``): a socket of its own asks up to
      three servers on purpose, again every ``nat.probe_interval``, and also tells the mapping
      behaviour. When it has an answer, that answer is the verdict.
    * The media engine's ICE gathering (RFC 8445 section 5.1.1.2: a server-reflexive candidate
      other than the host candidate means a NAT on the path): the verdict while STUN has none
      (``nat.stun: false``, or no server answered the probe).

    Each informs the other: a gathering that contradicts STUN's answer sets :attr:`recheck`
    (the network may have changed under a laptop; STUN is asked again at once rather than at
    the next probe), and the listeners hear of every change of verdict (the relay link is
    then wanted or dropped without waiting for its next look).
    """

    def __init__(self) -> None:
        self.stun: NatStatus = UNKNOWN
        self.media: bool | None = None
        """What the last gathering showed (None: no gathering got a server-reflexive answer)."""
        self.media_public: tuple[str, int] | None = None
        """A server-reflexive address of the last gathering that showed a NAT (its port is
        that of a media socket)."""
        self.recheck = False
        """A gathering contradicted STUN's answer: probe again now."""
        self.changes = 0
        """How often the verdict changed (``/api/status``: a flapping verdict is a finding)."""
        self.listeners: list[Callable[[], None]] = []

    @property
    def behind_nat(self) -> bool | None:
        """The verdict: True, False, or None while neither observer has an answer."""
        if self.stun.behind_nat is not None:
            return self.stun.behind_nat
        return self.media

    @property
    def source(self) -> str:
        """Whose answer :attr:`behind_nat` is: ``stun``, ``media`` or ``none``."""
        if self.stun.behind_nat is not None:
            return "stun"
        return "media" if self.media is not None else "none"

    @property
    def public(self) -> tuple[str, int] | None:
        """The public address of whoever gave the verdict (None: not behind NAT, unknown)."""
        if self.stun.behind_nat is not None:
            return self.stun.public
        return self.media_public if self.media else None

    def from_stun(self, status: NatStatus) -> None:
        """A probe's classification (UNKNOWN when no server answered: the gathering rules)."""
        before = self.behind_nat
        self.stun = status
        self.recheck = False
        self._changed(before, False)

    def from_media(self, behind: bool, reflexive: Iterable[tuple[str, int]] = ()) -> None:
        """A gathering's server-reflexive addresses were (``behind``) or were not our own."""
        before = self.behind_nat
        self.media = behind
        if behind:
            self.media_public = min(reflexive, default=self.media_public)
        ask = self.stun.behind_nat is not None and behind != self.stun.behind_nat \
            and not self.recheck
        if ask:
            self.recheck = True
        self._changed(before, ask)

    def _changed(self, before: bool | None, ask: bool) -> None:
        changed = self.behind_nat != before
        if changed and before is not None:
            self.changes += 1
        if changed or ask:
            for listener in list(self.listeners):
                listener()

    def summary(self) -> dict[str, object]:
        """``/api/status`` ``nat``: the verdict and what each observer said."""
        public = self.public
        return {"public_address": f"{_host(public[0])}:{public[1]}" if public else None,
                "behind_nat": self.behind_nat, "mapping": self.stun.mapping,
                "source": self.source, "stun_behind_nat": self.stun.behind_nat,
                "media_behind_nat": self.media, "verdict_changes": self.changes}


# -- relay choice -------------------------------------------------------------------------------

def relay_weight(own_id: bytes, node_id: bytes) -> bytes:
    """Rendezvous (highest random weight) hashing: every node ranks the relays differently, so
    the load spreads, and a node keeps its choice while its relay stays in the host cache."""
    return hashlib.sha256(own_id + node_id).digest()


def rank_relays(records: Iterable[NodeRecord], own_id: bytes, preferred: bytes | None = None,
                *, flags: int = Flag.RELAY) -> list[NodeRecord]:
    """The one order in which a node prefers the relays of its host cache (records with one
    of ``flags``, not its own), for its signalling (:func:`relay_candidates`), its TURN and
    its STUN servers alike: ``preferred`` (a node id: ``nat.relay``, or the relay the node is
    attached to) first, then by :func:`relay_weight`, highest first. Callers filter by the
    addresses and keys each use needs; the order stays the same (docs/relay.md, "One relay
    per node")."""
    found = [r for r in records if r.flags & flags and r.node_id != own_id]
    found.sort(key=lambda r: relay_weight(own_id, r.node_id), reverse=True)
    found.sort(key=lambda r: r.node_id != preferred)  # stable: the preferred one moves first
    return found


def relay_candidates(records: Iterable[NodeRecord], own_id: bytes,
                     preferred: bytes | None = None) -> list[RelayVia]:
    """Relays the node ``own_id`` can attach to: records with the RELAY flag, a SIP-over-TLS
    address and a TLS key (the key is what makes the relay's identity checkable), in
    :func:`rank_relays` order (the caller rotates through them on failure)."""
    found: list[RelayVia] = []
    for record in rank_relays(records, own_id, preferred):
        fingerprint = record.tls_fingerprint
        tls = record.addresses_of(AddrKind.SIP_TLS)
        if fingerprint is None or len(fingerprint) != 32 or not tls:
            continue
        found.append(RelayVia(record.node_id, fingerprint, tls[0].host, tls[0].port))
    return found


# -- the link to the relay ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Connect:
    """Open TLS to ``relay`` (its key checked against ``relay.tls_fingerprint``)."""

    relay: RelayVia


@dataclass(frozen=True, slots=True)
class SendRegister:
    """Send the attaching REGISTER (with :func:`attach_proof`) over the connection."""

    relay: RelayVia


@dataclass(frozen=True, slots=True)
class SendPing:
    """Write a CRLFCRLF ping on the connection (RFC 5626 section 4.4.1)."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection: the flow failed (``reason``)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Publish:
    """Sign ``relay`` (None: no relay) into our node record."""

    relay: RelayVia | None


Action = Connect | SendRegister | SendPing | Close | Publish


class RelayLink:
    """One node's attachment to a relay (module docstring). States: ``idle`` (no relay
    wanted), ``connecting``, ``registering``, ``attached``, ``waiting`` (backing off).

    Inputs: :meth:`want` (the relays to use, or none), :meth:`connected`, :meth:`lost` (the
    connection closed or could not open), :meth:`registered` (the REGISTER's final status),
    :meth:`pong`, :meth:`handle_timer`. Outputs: :meth:`next_action`, :meth:`get_timer`.
    """

    def __init__(self, rng: random.Random, *, keepalive: float = DEFAULT_KEEPALIVE,
                 expires: float = 600.0, retry_base: float = 30.0,
                 retry_max: float = MAX_WAIT, register_timeout: float = 32.0) -> None:
        self.rng = rng
        self.keepalive = keepalive
        self.expires = expires
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.register_timeout = register_timeout
        self.state = "idle"
        self.relays: list[RelayVia] = []
        self.current: RelayVia | None = None
        self.published: RelayVia | None = None
        self.failures = 0
        """Consecutive failures (RFC 5626 section 4.5's consecutive-failures)."""
        self.attached_at: float | None = None
        self.pings = 0
        self.pongs = 0
        self.attaches = 0
        self._next = 0
        self._actions: list[Action] = []
        self._ping_at: float | None = None
        self._pong_due: float | None = None
        self._refresh_at: float | None = None
        self._deadline: float | None = None  # connecting/registering gives up at
        self._retry_at: float | None = None

    # -- outputs ------------------------------------------------------------------------------
    def next_action(self) -> Action | None:
        return self._actions.pop(0) if self._actions else None

    def get_timer(self) -> float | None:
        times = [t for t in (self._ping_at, self._pong_due, self._refresh_at, self._deadline,
                             self._retry_at) if t is not None]
        return min(times) if times else None

    # -- inputs -------------------------------------------------------------------------------
    def want(self, relays: Sequence[RelayVia], now: float) -> None:
        """The relays to attach through (best first); empty: none wanted (detach)."""
        self.relays = list(relays)
        if not relays:
            if self.state in ("connecting", "registering", "attached"):
                self._actions.append(Close("no relay wanted"))
            self._reset_timers()
            self.state, self.current = "idle", None
            self._publish(None)
            return
        if self.state == "idle":
            self._connect(now)
        elif self.state == "attached" and self.current not in self.relays:
            self._fail("the relay left the host cache", now)

    def connected(self, now: float) -> None:
        if self.state != "connecting" or self.current is None:
            return
        self.state = "registering"
        self._deadline = now + self.register_timeout
        self._actions.append(SendRegister(self.current))

    def registered(self, status: int, expires: float | None, now: float) -> None:
        """The final response to our REGISTER (``expires``: what the relay granted)."""
        if self.state not in ("registering", "attached") or self.current is None:
            return
        if not 200 <= status < 300:
            self._fail(f"the relay answered {status}", now)
            return
        first = self.state == "registering"
        self.state, self._deadline, self.failures = "attached", None, 0
        granted = self.expires if expires is None else max(1.0, min(expires, self.expires))
        # re-attach when 80% of the registration has passed (RFC 5626 section 4.4.1's margin)
        self._refresh_at = now + 0.8 * granted
        if first:
            self.attached_at = now
            self.attaches += 1
            self._schedule_ping(now)
            self._publish(self.current)

    def pong(self, now: float) -> None:
        """A CRLF pong came (RFC 5626 section 4.4.1): the flow is alive."""
        if self.state != "attached":
            return
        self.pongs += 1
        if self._pong_due is not None:
            self._pong_due = None
            self._schedule_ping(now)

    def lost(self, reason: str, now: float) -> None:
        if self.state in ("connecting", "registering", "attached"):
            self._fail(reason, now, close=False)

    def handle_timer(self, now: float) -> None:
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            if self.state == "waiting":
                self._connect(now)
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            self._fail(f"no answer while {self.state}", now)
        if self._pong_due is not None and now >= self._pong_due:
            self._pong_due = None
            self._fail("no pong within 10 s (RFC 5626 section 4.4.1)", now)
        if self._ping_at is not None and now >= self._ping_at and self.state == "attached":
            self._ping_at = None
            self.pings += 1
            self._pong_due = now + PONG_TIMEOUT
            self._actions.append(SendPing())
        if self._refresh_at is not None and now >= self._refresh_at and self.state == "attached":
            self._refresh_at = now + self.register_timeout  # until the answer re-arms it
            assert self.current is not None
            self._actions.append(SendRegister(self.current))

    # -- internals ----------------------------------------------------------------------------
    def _schedule_ping(self, now: float) -> None:
        # RFC 5626 section 4.4.1: randomly between 80% and 100% of the keep-alive interval
        self._ping_at = now + self.keepalive * self.rng.uniform(0.8, 1.0)

    def _reset_timers(self) -> None:
        self._ping_at = self._pong_due = self._refresh_at = self._deadline = None
        self._retry_at = None

    def _connect(self, now: float) -> None:
        if not self.relays:
            self.state = "idle"
            return
        self.current = self.relays[self._next % len(self.relays)]
        self.state = "connecting"
        self._deadline = now + self.register_timeout
        self._actions.append(Connect(self.current))

    def _fail(self, reason: str, now: float, *, close: bool = True) -> None:
        if close:
            self._actions.append(Close(reason))
        self._reset_timers()
        self.failures += 1
        self._next += 1  # the next relay, if there are others
        self.state = "waiting"
        self.attached_at = None
        # The record keeps naming the relay while we reconnect: withdrawing it would spread a
        # record that sends callers to our unreachable addresses, then another one back.
        # RFC 5626 section 4.5: wait-time = min(max-time, base-time * 2^consecutive-failures),
        # the actual wait a random 50-100% of it
        wait = min(self.retry_max, self.retry_base * 2 ** min(self.failures - 1, 30))
        self._retry_at = now + wait * self.rng.uniform(0.5, 1.0)
        self.last_failure = reason

    def _publish(self, relay: RelayVia | None) -> None:
        if relay != self.published:
            self.published = relay
            self._actions.append(Publish(relay))

    def summary(self, now: float) -> dict[str, object]:
        """``/api/status`` ``nat.relay``."""
        current = self.current
        return {
            "state": self.state,
            "relay": None if current is None else {
                "node_id": current.node_id.hex(),
                "address": f"{_host(current.host)}:{current.port}"},
            "attached_s": None if self.attached_at is None else round(now - self.attached_at, 1),
            "failures": self.failures,
            "keepalives_sent": self.pings,
            "pongs": self.pongs,
            "attaches": self.attaches,
        }

    last_failure: str = ""


def _norm(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
