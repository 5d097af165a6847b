"""The relay's STUN and TURN server core (RFC 5389, RFC 5766, RFC 6156): pure and bounded.

Inputs are datagrams with ``now``: :meth:`RelayServer.receive` for the listening socket,
:meth:`RelayServer.receive_relayed` for an allocation's relayed socket, and
:meth:`RelayServer.handle_timer`. Outputs are pulled: :meth:`datagrams_to_send` gives
``(relayed address or None, bytes, destination)`` where None means "from the listening socket",
and :meth:`get_timer` the next deadline. Relayed ports come from an injected
:class:`RelayPorts` (the edge binds sockets; tests use a fake), randomness from an injected
``urandom``. The core never raises on input: every datagram ends as a response, a relayed
packet, or a counted drop.

Bounds: ``max_allocations`` in total, ``allocations_per_user`` per node, ``max_permissions`` per
allocation (channels count against it too), one remembered Allocate response per allocation,
nonces without state, and a token bucket per allocation for bandwidth. Unauthenticated requests
create nothing.
"""

from __future__ import annotations

import heapq
import ipaddress
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .credentials import NonceBox, node_key_password, parse_username, turn_password
from .stun import (
    Attr,
    Class,
    Method,
    StunError,
    StunMessage,
    decode_xor_address,
    encode_error_code,
    encode_message,
    encode_unknown_attributes,
    encode_xor_address,
    long_term_key,
    parse_message,
)

__all__ = [
    "Addr",
    "RelayPorts",
    "RelayServer",
    "RelayStats",
    "TurnSettings",
    "peer_forbidden",
]

Addr = tuple[str, int]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Datagram = tuple[Addr | None, bytes, Addr]

# RFC 5766 section 2.2 (allocation), 8 (permission, 300 s) and 11 (channel, 10 minutes).
DEFAULT_LIFETIME = 600
PERMISSION_LIFETIME = 300.0
CHANNEL_LIFETIME = 600.0
CHANNEL_MIN, CHANNEL_MAX = 0x4000, 0x7FFF  # RFC 5766 section 11
UDP_TRANSPORT = 17  # REQUESTED-TRANSPORT protocol number (RFC 5766 section 14.7)
SWEEP_INTERVAL = 30.0  # expired permissions and channels are freed at least this often
_CHANNEL_HEADER = struct.Struct("!HH")

_BINDING_KNOWN = frozenset({Attr.USERNAME, Attr.MESSAGE_INTEGRITY, 0x0024, 0x0025})
"""Binding may carry ICE's short-term USERNAME/MESSAGE-INTEGRITY, PRIORITY and USE-CANDIDATE
(RFC 8445 section 16.1); a public STUN server ignores them (RFC 5389 section 10)."""
_TURN_KNOWN = frozenset({
    Attr.USERNAME, Attr.MESSAGE_INTEGRITY, Attr.REALM, Attr.NONCE, Attr.LIFETIME,
    Attr.REQUESTED_TRANSPORT, Attr.REQUESTED_ADDRESS_FAMILY, Attr.EVEN_PORT,
    Attr.XOR_PEER_ADDRESS, Attr.CHANNEL_NUMBER, Attr.DATA,
})
"""DONT-FRAGMENT and RESERVATION-TOKEN are left out on purpose: this server cannot set the DF
bit or reserve ports, and RFC 5766 section 6.2 says to treat them as unknown (420)."""

_REASONS = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 420: "Unknown Attribute",
    437: "Allocation Mismatch", 438: "Stale Nonce", 440: "Address Family not Supported",
    441: "Wrong Credentials", 442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch", 486: "Allocation Quota Reached",
    508: "Insufficient Capacity",
}


class RelayPorts(Protocol):
    """Where relayed transport addresses come from (the edge binds real sockets)."""

    def open(self, family: int, even: bool) -> Addr | None:
        """Bind a relayed socket of IP ``family`` (4 or 6); its address, or None if none free."""

    def close(self, relayed: Addr) -> None:
        """Release a relayed socket opened by :meth:`open`."""


@dataclass(frozen=True, slots=True)
class TurnSettings:
    """What the core needs from ``relay:`` in the configuration (config.RelayConfig)."""

    realm: str
    secret: str
    software: str = "freecall"
    allow_peers: tuple[IPNetwork, ...] = ()
    max_allocations: int = 1000
    allocations_per_user: int = 10
    bandwidth: int = 0
    """Bytes per second per allocation, both directions together; 0 = unlimited."""
    max_lifetime: int = 3600
    max_permissions: int = 64
    nonce_lifetime: float = 600.0
    wall_offset: float = 0.0
    """Unix time minus ``now``: credential expiry times are Unix times."""
    node_secret: Callable[[str], bytes | None] | None = None
    """The node-key credential secret ``K`` for a node id (credentials module), None for a
    node the relay does not know; unset: shared-secret credentials only."""


@dataclass(slots=True)
class RelayStats:
    """Counters for logs and the bench: nothing here holds per-client state."""

    requests: int = 0
    errors: int = 0
    dropped: int = 0
    """Datagrams discarded: not STUN, malformed, no permission or channel, over bandwidth."""
    relayed_packets: int = 0
    relayed_bytes: int = 0
    allocations_created: int = 0
    allocations_expired: int = 0


@dataclass(slots=True)
class Allocation:
    """One allocation, keyed by its client's address (the 5-tuple of RFC 5766 section 2.2)."""

    client: Addr
    relayed: Addr
    node: str
    expires: float
    permissions: dict[str, float] = field(default_factory=dict)
    channels: dict[int, tuple[Addr, float]] = field(default_factory=dict)
    peer_channels: dict[Addr, int] = field(default_factory=dict)
    tokens: float = 0.0
    filled: float = 0.0
    allocate_tid: bytes = b""
    allocate_response: bytes = b""


def peer_forbidden(host: str, allow: Sequence[IPNetwork]) -> bool:
    """Peers a public relay must not reach (RFC 5766 section 17, "other" attacks): loopback,
    private, link-local, multicast and every other non-global range, unless ``allow`` lists them."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allow):
        return False
    return ip.is_multicast or not ip.is_global


class RelayServer:
    """STUN binding and TURN allocations on one listening address (module docstring)."""

    def __init__(
        self,
        settings: TurnSettings,
        ports: RelayPorts,
        *,
        family: int = 4,
        urandom: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.settings = settings
        self.ports = ports
        self.family = family
        self.stats = RelayStats()
        self._urandom = urandom
        self._nonces = NonceBox(urandom(32), settings.nonce_lifetime)
        self._software = settings.software.encode()[:128]
        self._realm = settings.realm.encode()
        self._by_client: dict[Addr, Allocation] = {}
        self._by_relayed: dict[Addr, Allocation] = {}
        self._per_node: dict[str, int] = {}
        self._expiries: list[tuple[float, Addr]] = []
        self._next_sweep: float | None = None
        self._out: list[Datagram] = []
        rate = settings.bandwidth
        self._rate = float(rate)
        self._burst = float(max(rate, 8192))  # one second of traffic, at least a few packets

    # -- outputs ----------------------------------------------------------------------------
    def datagrams_to_send(self) -> list[Datagram]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        """The earliest allocation expiry or sweep of expired permissions and channels."""
        deadline = self._expiries[0][0] if self._expiries else None
        if self._next_sweep is not None and (deadline is None or self._next_sweep < deadline):
            return self._next_sweep
        return deadline

    @property
    def allocations(self) -> int:
        return len(self._by_client)

    def allocation_of(self, client: Addr) -> Allocation | None:
        return self._by_client.get(client)

    # -- timers -----------------------------------------------------------------------------
    def handle_timer(self, now: float) -> None:
        """Expire allocations (RFC 5766 section 5), permissions (8) and channels (11)."""
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, client = heapq.heappop(heap)
            alloc = self._by_client.get(client)
            if alloc is None:
                continue
            if alloc.expires <= now:
                self._delete(alloc)
                self.stats.allocations_expired += 1
            else:  # refreshed since: one heap entry per allocation, moved on lazily
                heapq.heappush(heap, (alloc.expires, client))
        if self._next_sweep is not None and self._next_sweep <= now:
            for alloc in self._by_client.values():
                self._sweep(alloc, now)
            self._next_sweep = now + SWEEP_INTERVAL if self._by_client else None

    @staticmethod
    def _sweep(alloc: Allocation, now: float) -> None:
        for ip in [ip for ip, until in alloc.permissions.items() if until <= now]:
            del alloc.permissions[ip]
        for number in [n for n, (_, until) in alloc.channels.items() if until <= now]:
            peer, _ = alloc.channels.pop(number)
            alloc.peer_channels.pop(peer, None)

    # -- the data path ---------------------------------------------------------------------
    def receive(self, data: bytes, source: Addr, now: float) -> None:
        """A datagram on the listening socket: ChannelData or a STUN message."""
        if data and 0x40 <= data[0] <= 0x7F:
            self._channel_data(data, source, now)
            return
        try:
            msg = parse_message(data)
        except StunError:
            self.stats.dropped += 1  # RFC 5389 section 7.3: silently discarded
            return
        if msg.cls == Class.REQUEST:
            self.stats.requests += 1
            self._request(msg, source, now)
        elif msg.cls == Class.INDICATION and msg.method == Method.SEND:
            self._send_indication(msg, source, now)
        else:
            self.stats.dropped += 1  # responses, and indications we do not take

    def _channel_data(self, data: bytes, source: Addr, now: float) -> None:
        """RFC 5766 section 11.6: ChannelData from the client goes to the bound peer."""
        alloc = self._by_client.get(source)
        if alloc is None or len(data) < 4:
            self.stats.dropped += 1
            return
        number, length = _CHANNEL_HEADER.unpack_from(data, 0)
        bound = alloc.channels.get(number)
        if bound is None or bound[1] <= now or length > len(data) - 4:
            self.stats.dropped += 1
            return
        if self._rate and not self._spend(alloc, length, now):
            return
        self._out.append((alloc.relayed, data[4 : 4 + length], bound[0]))
        self.stats.relayed_packets += 1
        self.stats.relayed_bytes += length

    def receive_relayed(self, relayed: Addr, data: bytes, peer: Addr, now: float) -> None:
        """RFC 5766 section 10.3 and 11.5: a peer's datagram goes to the client over its channel
        (ChannelData) or as a Data indication, if a permission for the peer's IP is installed."""
        alloc = self._by_relayed.get(relayed)
        if alloc is None:
            self.stats.dropped += 1
            return
        until = alloc.permissions.get(peer[0])
        if until is None or until <= now:
            self.stats.dropped += 1
            return
        size = len(data)
        if size > 0xFFFF - 4 or (self._rate and not self._spend(alloc, size, now)):
            self.stats.dropped += 1
            return
        number = alloc.peer_channels.get(peer)
        if number is not None and alloc.channels[number][1] > now:
            packet = _CHANNEL_HEADER.pack(number, size) + data
        else:
            tid = self._urandom(12)
            packet = encode_message(
                Method.DATA, Class.INDICATION, tid,
                [(Attr.XOR_PEER_ADDRESS, encode_xor_address(peer, tid)), (Attr.DATA, data)],
                fingerprint=False)
        self._out.append((None, packet, alloc.client))
        self.stats.relayed_packets += 1
        self.stats.relayed_bytes += size

    def _spend(self, alloc: Allocation, size: int, now: float) -> bool:
        """Token bucket per allocation (``relay.bandwidth_kbps``): over budget is dropped."""
        tokens = alloc.tokens + (now - alloc.filled) * self._rate
        alloc.filled = now
        tokens = min(tokens, self._burst)
        if tokens < size:
            alloc.tokens = tokens
            self.stats.dropped += 1
            return False
        alloc.tokens = tokens - size
        return True

    def _send_indication(self, msg: StunMessage, source: Addr, now: float) -> None:
        """RFC 5766 section 10.2: unauthenticated; dropped unless everything is in order."""
        alloc = self._by_client.get(source)
        peer_value, data = msg.get(Attr.XOR_PEER_ADDRESS), msg.get(Attr.DATA)
        if alloc is None or peer_value is None or data is None or msg.unknown_required(
                _TURN_KNOWN):
            self.stats.dropped += 1
            return
        try:
            peer = decode_xor_address(peer_value, msg.transaction_id)
        except StunError:
            self.stats.dropped += 1
            return
        until = alloc.permissions.get(peer[0])
        if until is None or until <= now:
            self.stats.dropped += 1
            return
        if self._rate and not self._spend(alloc, len(data), now):
            return
        self._out.append((alloc.relayed, data, peer))
        self.stats.relayed_packets += 1
        self.stats.relayed_bytes += len(data)

    # -- requests ---------------------------------------------------------------------------
    def _request(self, msg: StunMessage, source: Addr, now: float) -> None:
        method = msg.method
        if method == Method.BINDING:
            self._binding(msg, source)
            return
        handlers: dict[int, Callable[[StunMessage, Addr, float, str, bytes], None]] = {
            Method.ALLOCATE: self._allocate,
            Method.REFRESH: self._refresh,
            Method.CREATE_PERMISSION: self._create_permission,
            Method.CHANNEL_BIND: self._channel_bind,
        }
        handler = handlers.get(method)
        if handler is None:  # RFC 5389 section 7.3.1: a request we do not know is bad
            self._error(msg, source, 400, "unknown method")
            return
        unknown = msg.unknown_required(_TURN_KNOWN)
        if unknown:
            self._error(msg, source, 420, extra=[(Attr.UNKNOWN_ATTRIBUTES,
                                                 encode_unknown_attributes(unknown))])
            return
        auth = self._authenticate(msg, source, now)
        if auth is None:
            return
        node, key = auth
        handler(msg, source, now, node, key)

    def _binding(self, msg: StunMessage, source: Addr) -> None:
        """RFC 5389 section 7.3.1 and 12: XOR-MAPPED-ADDRESS, SOFTWARE, FINGERPRINT."""
        unknown = msg.unknown_required(_BINDING_KNOWN)
        if unknown:
            self._error(msg, source, 420, extra=[(Attr.UNKNOWN_ATTRIBUTES,
                                                 encode_unknown_attributes(unknown))])
            return
        tid = msg.transaction_id
        response = encode_message(
            Method.BINDING, Class.SUCCESS, tid,
            [(Attr.XOR_MAPPED_ADDRESS, encode_xor_address(source, tid)),
             (Attr.SOFTWARE, self._software)])
        self._out.append((None, response, source))

    def _error(
        self,
        msg: StunMessage,
        source: Addr,
        code: int,
        detail: str = "",
        *,
        key: bytes | None = None,
        extra: Sequence[tuple[int, bytes]] = (),
    ) -> None:
        """An error response (RFC 5389 section 7.3.1.1); signed once the client is known."""
        self.stats.errors += 1
        reason = _REASONS.get(code, "Error") + (f": {detail}" if detail else "")
        attrs = [(Attr.ERROR_CODE, encode_error_code(code, reason)), *extra,
                 (Attr.SOFTWARE, self._software)]
        self._out.append((None, encode_message(msg.method, Class.ERROR, msg.transaction_id,
                                               attrs, key=key), source))

    def _success(
        self, msg: StunMessage, source: Addr, attrs: Sequence[tuple[int, bytes]], key: bytes
    ) -> bytes:
        response = encode_message(msg.method, Class.SUCCESS, msg.transaction_id,
                                  [*attrs, (Attr.SOFTWARE, self._software)], key=key)
        self._out.append((None, response, source))
        return response

    def _challenge(self, msg: StunMessage, source: Addr, code: int, now: float,
                   detail: str = "") -> None:
        """401 or 438 with REALM and a fresh NONCE (RFC 5389 section 10.2.2), unsigned."""
        self._error(msg, source, code, detail, extra=[
            (Attr.REALM, self._realm), (Attr.NONCE, self._nonces.make(now, source))])

    def _authenticate(
        self, msg: StunMessage, source: Addr, now: float
    ) -> tuple[str, bytes] | None:
        """The long-term credential mechanism (RFC 5389 section 10.2.2) with TURN REST
        usernames; returns (node id, key) or answers the request itself and returns None."""
        if msg.integrity_at is None:
            self._challenge(msg, source, 401, now)
            return None
        user_value, realm, nonce = (msg.get(Attr.USERNAME), msg.get(Attr.REALM),
                                    msg.get(Attr.NONCE))
        if user_value is None or realm is None or nonce is None:
            self._error(msg, source, 400, "USERNAME, REALM and NONCE are required")
            return None
        if not self._nonces.check(nonce, now, source):
            self._challenge(msg, source, 438, now)
            return None
        try:
            username = user_value.decode("utf-8")
        except UnicodeDecodeError:
            username = ""
        parsed = parse_username(username) if len(user_value) <= 513 else None
        if parsed is None or realm != self._realm:
            self._challenge(msg, source, 401, now, "unknown user or realm")
            return None
        expiry, node = parsed
        if expiry <= now + self.settings.wall_offset:
            self._challenge(msg, source, 401, now, "credentials expired")
            return None
        key = long_term_key(username, self.settings.realm,
                            turn_password(self.settings.secret, username))
        if msg.check_integrity(key):
            return node, key
        lookup = self.settings.node_secret
        secret = lookup(node) if lookup is not None else None
        if secret is not None:
            key = long_term_key(username, self.settings.realm, node_key_password(secret, username))
            if msg.check_integrity(key):
                return node, key
        self._challenge(msg, source, 401, now, "bad MESSAGE-INTEGRITY")
        return None

    def _lifetime(self, msg: StunMessage) -> int | None:
        """RFC 5766 section 6.2: max(default, min(requested, maximum)); None if malformed."""
        value = msg.get(Attr.LIFETIME)
        if value is None:
            return DEFAULT_LIFETIME
        if len(value) != 4:
            return None
        requested = int.from_bytes(value, "big")
        if requested == 0:
            return 0
        return max(DEFAULT_LIFETIME, min(requested, self.settings.max_lifetime))

    def _allocate(self, msg: StunMessage, source: Addr, now: float, node: str,
                  key: bytes) -> None:
        """RFC 5766 section 6.2."""
        existing = self._by_client.get(source)
        if existing is not None:
            if existing.allocate_tid == msg.transaction_id:  # a retransmission
                self._out.append((None, existing.allocate_response, source))
            else:
                self._error(msg, source, 437, key=key)
            return
        transport = msg.get(Attr.REQUESTED_TRANSPORT)
        if transport is None or len(transport) != 4:
            self._error(msg, source, 400, "REQUESTED-TRANSPORT is required", key=key)
            return
        if transport[0] != UDP_TRANSPORT:
            self._error(msg, source, 442, key=key)
            return
        family_value = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)  # RFC 6156 section 4.2
        if family_value is not None:
            if len(family_value) != 4 or family_value[0] not in (1, 2):
                self._error(msg, source, 400, "bad REQUESTED-ADDRESS-FAMILY", key=key)
                return
            if {1: 4, 2: 6}[family_value[0]] != self.family:
                self._error(msg, source, 440, key=key)
                return
        even = msg.get(Attr.EVEN_PORT)
        if even is not None and len(even) != 1:
            self._error(msg, source, 400, "bad EVEN-PORT", key=key)
            return
        lifetime = self._lifetime(msg)
        if lifetime is None:
            self._error(msg, source, 400, "bad LIFETIME", key=key)
            return
        if lifetime == 0:
            lifetime = DEFAULT_LIFETIME
        if self._per_node.get(node, 0) >= self.settings.allocations_per_user:
            self._error(msg, source, 486, key=key)
            return
        if len(self._by_client) >= self.settings.max_allocations:
            self._error(msg, source, 508, "too many allocations", key=key)
            return
        relayed = self.ports.open(self.family, even is not None)
        if relayed is None:
            self._error(msg, source, 508, "no relay port free", key=key)
            return
        alloc = Allocation(source, relayed, node, now + lifetime, tokens=self._burst,
                           filled=now)
        self._by_client[source] = alloc
        self._by_relayed[relayed] = alloc
        self._per_node[node] = self._per_node.get(node, 0) + 1
        heap = self._expiries
        heapq.heappush(heap, (alloc.expires, source))
        if len(heap) > 2 * len(self._by_client) + 64:  # entries of deleted allocations
            self._expiries = [(a.expires, c) for c, a in self._by_client.items()]
            heapq.heapify(self._expiries)
        if self._next_sweep is None:
            self._next_sweep = now + SWEEP_INTERVAL
        self.stats.allocations_created += 1
        tid = msg.transaction_id
        alloc.allocate_tid = tid
        alloc.allocate_response = self._success(msg, source, [
            (Attr.XOR_RELAYED_ADDRESS, encode_xor_address(relayed, tid)),
            (Attr.LIFETIME, lifetime.to_bytes(4, "big")),
            (Attr.XOR_MAPPED_ADDRESS, encode_xor_address(source, tid)),
        ], key)

    def _delete(self, alloc: Allocation) -> None:
        self._by_client.pop(alloc.client, None)
        self._by_relayed.pop(alloc.relayed, None)
        left = self._per_node.get(alloc.node, 0) - 1
        if left > 0:
            self._per_node[alloc.node] = left
        else:
            self._per_node.pop(alloc.node, None)
        self.ports.close(alloc.relayed)

    def _owned(self, msg: StunMessage, source: Addr, node: str, key: bytes) -> Allocation | None:
        """The allocation of this 5-tuple, held by this node (437, 441 otherwise)."""
        alloc = self._by_client.get(source)
        if alloc is None:
            self._error(msg, source, 437, key=key)
            return None
        if alloc.node != node:  # RFC 5766 section 4: same credentials as the Allocate
            self._error(msg, source, 441, key=key)
            return None
        return alloc

    def _refresh(self, msg: StunMessage, source: Addr, now: float, node: str,
                 key: bytes) -> None:
        """RFC 5766 section 7.2; LIFETIME 0 deletes the allocation."""
        alloc = self._owned(msg, source, node, key)
        if alloc is None:
            return
        lifetime = self._lifetime(msg)
        if lifetime is None:
            self._error(msg, source, 400, "bad LIFETIME", key=key)
            return
        if lifetime == 0:
            self._delete(alloc)
        else:
            alloc.expires = now + lifetime  # its heap entry moves on when it comes due
        self._success(msg, source, [(Attr.LIFETIME, lifetime.to_bytes(4, "big"))], key)

    def _peer(self, msg: StunMessage, value: bytes, source: Addr,
              key: bytes) -> Addr | None:
        try:
            peer = decode_xor_address(value, msg.transaction_id)
        except StunError:
            self._error(msg, source, 400, "bad XOR-PEER-ADDRESS", key=key)
            return None
        if {4: ":" in peer[0], 6: ":" not in peer[0]}[self.family]:
            self._error(msg, source, 443, key=key)
            return None
        if peer_forbidden(peer[0], self.settings.allow_peers):
            self._error(msg, source, 403, "peer address not allowed", key=key)
            return None
        return peer

    def _room_for(self, alloc: Allocation, new_ips: set[str], now: float) -> bool:
        fresh = {ip for ip in new_ips if ip not in alloc.permissions}
        if len(alloc.permissions) + len(fresh) <= self.settings.max_permissions:
            return True
        self._sweep(alloc, now)
        return len(alloc.permissions) + len(fresh) <= self.settings.max_permissions

    def _create_permission(self, msg: StunMessage, source: Addr, now: float, node: str,
                           key: bytes) -> None:
        """RFC 5766 section 9.2: every XOR-PEER-ADDRESS valid, or none installed."""
        alloc = self._owned(msg, source, node, key)
        if alloc is None:
            return
        values = [v for kind, v in msg.attributes if kind == Attr.XOR_PEER_ADDRESS]
        if not values:
            self._error(msg, source, 400, "XOR-PEER-ADDRESS is required", key=key)
            return
        ips: set[str] = set()
        for value in values:
            peer = self._peer(msg, value, source, key)
            if peer is None:
                return
            ips.add(peer[0])
        if not self._room_for(alloc, ips, now):
            self._error(msg, source, 508, "too many permissions", key=key)
            return
        for ip in ips:
            alloc.permissions[ip] = now + PERMISSION_LIFETIME
        self._success(msg, source, [], key)

    def _channel_bind(self, msg: StunMessage, source: Addr, now: float, node: str,
                      key: bytes) -> None:
        """RFC 5766 section 11.2: bind or refresh a channel; it also installs a permission."""
        alloc = self._owned(msg, source, node, key)
        if alloc is None:
            return
        number_value, peer_value = msg.get(Attr.CHANNEL_NUMBER), msg.get(Attr.XOR_PEER_ADDRESS)
        if number_value is None or peer_value is None or len(number_value) != 4:
            self._error(msg, source, 400, "CHANNEL-NUMBER and XOR-PEER-ADDRESS are required",
                        key=key)
            return
        number = int.from_bytes(number_value[:2], "big")
        if not CHANNEL_MIN <= number <= CHANNEL_MAX:
            self._error(msg, source, 400, "channel number out of range", key=key)
            return
        peer = self._peer(msg, peer_value, source, key)
        if peer is None:
            return
        bound = alloc.channels.get(number)
        if bound is not None and bound[1] <= now:
            self._sweep(alloc, now)
            bound = None
        other = alloc.peer_channels.get(peer)
        if (bound is not None and bound[0] != peer) or (other is not None and other != number):
            self._error(msg, source, 400, "channel or peer already bound", key=key)
            return
        if bound is None and (len(alloc.channels) >= self.settings.max_permissions
                              or not self._room_for(alloc, {peer[0]}, now)):
            self._error(msg, source, 508, "too many permissions", key=key)
            return
        alloc.channels[number] = (peer, now + CHANNEL_LIFETIME)
        alloc.peer_channels[peer] = number
        alloc.permissions[peer[0]] = now + PERMISSION_LIFETIME
        self._success(msg, source, [], key)


def is_channel_data(data: bytes) -> bool:
    """RFC 5766 section 11.4 / RFC 7983: first byte 0x40-0x7F."""
    return len(data) >= 4 and 0x40 <= data[0] <= 0x7F


