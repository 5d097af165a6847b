"""Gossip: a pure state machine that keeps the host cache filled, fresh and answerable.

Shape of the mesh (Kelips-like; docs/peering.md has the reasoning and the measured figures):
the id space is cut into ``2**group_bits`` groups. A record is *homed* in its node's group and
in the home group of each route it serves; every member of a group stores all records homed
there. Everything else a node holds is cache: contacts in other groups, rumours, answers.
Lookups go to the route's home group (one hop, or two through a forwarder).

Each round (``interval``) a node opens one exchange with one partner: a member of its own group
half of the time, else a member of a random other group (now and then a node it thinks dead):

    SYNC   PING [NEED] [NEED_HOME] [WANT, SUMMARY (PAGE while new): same group]
           [HOME_HAVE] [HAVE] [DEAD]
    REPLY  ACK [WANT] [WANT_LOW] [RECORD...] [HOME_HAVE, PAGE: where summaries differ]
           [HOME_HAVE] [HAVE] [DEAD]
    then   [WANT] [RECORD...]  until nobody wants anything more  (at most 4 datagrams)

HAVE/HOME_HAVE carry digests (key, seq) of new record versions (rumour-mongering, a bounded
number of times each); PAGE carries one slice of the sender's home records, SUMMARY a hash
of each slice (anti-entropy between group members: repairs what rumours missed, heals
partitions; a page travels only for a slice where two members differ). Records travel only
when asked for, when a digest comparison proves the other side lacks them, or as news for a
group (pushed once by each member that first gets it). A node hands its own record to its home
groups (acknowledged) and probes, suspects and buries peers that stop answering.

Every datagram is authenticated: it names its sender by Ed25519 public key and ends with a
keyed BLAKE2b MAC under a static-static X25519 key of the two node keys (no handshake; one key
agreement per peer, ~55 µs, then ~1.5 µs per datagram). A first contact with a seed whose key
is unknown uses HELLO (unauthenticated, padded; the answer is authenticated and never larger).
A node sends at most ``send_budget`` bytes in any one interval, whatever it is asked.

Pure: the caller passes ``now`` (Unix seconds), feeds datagrams in, pulls datagrams and events
out and calls ``handle_timer`` at ``get_timer()``. No sockets, no clock, no global state.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from freecall.peering import wire
from freecall.peering.hostcache import HostCache, source_of
from freecall.peering.records import (
    KEY_SIZE,
    Address,
    NodeIdentity,
    NodeRecord,
    RecordCodec,
    RecordError,
    ed25519_to_x25519_public,
    fine_bucket,
    id_group,
    node_id_of,
    normalize_route,
    route_group,
)
from freecall.peering.wire import Answer, Builder, Sec

Addr = tuple[str, int]
UDP_IP_OVERHEAD = 28
GROUP_KEY = "_group."
"""Lookup key prefix meaning "any member of this group": how a node finds a group it knows
nobody in (to publish its record there). Never a valid route (records cannot carry it)."""


def _group_key(key: str, bits: int) -> int | None:
    """Group number of a ``_group.<n>`` key, else None."""
    if not key.startswith(GROUP_KEY):
        return None
    tail = key[len(GROUP_KEY) :]
    if not tail.isdigit() or len(tail) > 5 or int(tail) >= 1 << bits:
        return None
    return int(tail)

_MAC_PERSON = b"fc-gossip-mac-v1"
_HEADER_SIZE = wire.HEADER.size
_HEADER_UNPACK = wire.HEADER.unpack_from
_MAC_SIZE = wire.MAC_SIZE
_ROOM_USED = UDP_IP_OVERHEAD + wire.SECTION.size
_blake2b = hashlib.blake2b
_compare_digest = hmac.compare_digest
_BITS = [tuple(j for j in range(8) if byte & (0x80 >> j)) for byte in range(256)]
"""Bits set in a byte, most significant first (NEED bitmaps)."""


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Tunables (docs/peering.md explains each). ``group_bits`` must be the same on every
    node of a mesh: about log2(sqrt(nodes)), so 6 for a few thousand nodes, 7 for 10,000."""

    interval: float = 1.0  # one gossip round (seconds)
    group_bits: int = 6  # 2**group_bits groups
    capacity: int = 4096  # host cache bound (records)
    source_quota: int | None = None  # records one source IP may place (default capacity/16)
    contacts_min: int = 2  # members wanted per group; fewer: ask (NEED)
    p_group: float = 0.5  # share of rounds spent with our own group (anti-entropy)
    p_grave: float = 0.03  # share spent retrying a node we think dead (heals partitions)
    fail_limit: int = 3  # unanswered exchanges/probes before a node is declared dead
    probe_timeout: float = 0.5  # an exchange or probe unanswered this long has failed
    probe_cap: int = 3  # first-hand probes per round (suspects, revivals)
    claim_probe_share: float = 0.3  # share of a group that checks one death claim
    refute_rounds: int = 30  # at most one refutation (re-sign) per this many rounds
    hot_transmissions: int = 8  # times each node advertises each new record version
    hot_window: float = 60.0  # a record signed this recently (seq = ms) is news
    max_hot: int = 256  # rumour table bound
    max_have: int = 12  # digests per datagram
    dead_transmissions: int = 6  # times a node repeats a first-hand death
    max_dead: int = 6  # death digests per datagram (and processed per datagram)
    max_want: int = 6  # records asked for per datagram
    want_budget: int = 8  # records asked for per round: news for our group, updates
    want_budget_low: int = 1  # records asked for per round: other news (global rumour)
    missing_asks: int = 8  # times a home record we know we lack is asked for again
    send_budget: int = 2000
    """Wire bytes (UDP payload + 28 bytes of IPv4/UDP header) a node may send in any one
    interval: a hard cap, whatever peers ask."""
    control_reserve: int = 600
    """Part of send_budget only control datagrams (acks, probes, lookups) may use."""
    bulk_reserve: int = 500
    """Part of the content budget bulk (repairs, newcomers' catch-up) may not use."""
    low_reserve: int = 200
    """Part of the content budget records merely of interest (WANT_LOW) may not use."""
    page_target: int = 12  # digests per anti-entropy page (the page count follows)
    page_max: int = 40  # digests per page at most (an incomplete page says so)
    contact_offers: int = 2  # contacts offered per NEED
    eager_fanout: int = 2  # members a node pushes news for its group to, once per record
    contact_fresh: float = 30.0  # contacts of a group unheard this long: ask for fresh ones
    record_ttl: int = 3600  # lifetime of our record (seconds)
    refresh_before: int = 1200  # re-sign this long before it expires
    republish_rounds: int = 300  # hand our record to our home groups again this often
    publish_backoff_max: int = 64
    """Rounds between publish retries at most while no home group left to confirm has a
    member we know (a mesh of fewer nodes than groups: most groups are empty for good)."""
    publish_per_round: int = 2  # publish datagrams per round
    seed_rounds: int = 60  # contact a seed this often even when not alone
    bootstrap_min: int = 8  # below this many records, keep asking seeds
    lookup_timeout: float = 0.5  # per attempt
    lookup_attempts: int = 8  # 0.5 s apart: a call setup can wait ~5 s in all
    lookup_fanout: int = 2  # contacts asked at once per attempt
    lookup_records: int = 4  # records in one answer
    settle_rounds: int = 30  # before this, our "not found" is not authoritative
    clock_skew: float = 120.0  # accepted datagram timestamp error (replay window)
    hello_per_round: int = 8  # first contacts answered per round
    hello_size: int = 800
    """HELLO is padded to this; the answer is never larger than the HELLO (no amplification)."""
    hello_reply: int = 560  # and not larger than this either
    new_keys_per_round: int = 256  # X25519 derivations for unknown peers per round
    relays_per_round: int = 4  # newcomers' records relayed per round
    ban_seconds: float = 600.0  # a peer that sent a forged record is ignored this long
    emit_peer_events: bool = True  # PeerAdded/Updated/Removed (simulations turn them off)
    max_datagram: int = wire.MAX_DATAGRAM


# -- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerAdded:
    """A node's record entered the host cache."""

    record: NodeRecord


@dataclass(frozen=True)
class PeerUpdated:
    """A newer record replaced an older one (routes or addresses may have changed)."""

    record: NodeRecord
    previous_seq: int


@dataclass(frozen=True)
class PeerRemoved:
    """A record left the cache: dead, expired, evicted or reported dead."""

    node_id: bytes
    reason: str


@dataclass(frozen=True)
class LookupCompleted:
    """Result of :meth:`Gossip.start_lookup`: the records found (verified) and whether any."""

    query_id: int
    route: str
    records: tuple[NodeRecord, ...]
    found: bool


Event = PeerAdded | PeerUpdated | PeerRemoved | LookupCompleted


# -- datagram keys ---------------------------------------------------------------------------


class KeyAgreement(Protocol):
    """Source of per-peer MAC keys (and the peer's record key, from its public key)."""

    def get(self, public_key: bytes) -> tuple[bytes, bytes] | None:
        """(mac key, 8-byte record key) if already known, else None."""

    def derive(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Compute and remember; RecordError if the key is unusable."""


class PairKeys:
    """Static-static X25519 MAC keys, one per peer, bounded LRU (derivation ~55 µs)."""

    def __init__(self, identity: NodeIdentity, capacity: int = 4096) -> None:
        self.identity = identity
        self.capacity = capacity
        self._cache: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()

    def get(self, public_key: bytes) -> tuple[bytes, bytes] | None:
        """Cached key for a peer."""
        return self._cache.get(public_key)

    def derive(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Diffie-Hellman of the two node keys, bound to both public keys."""
        hit = self._cache.get(public_key)
        if hit is not None:
            self._cache.move_to_end(public_key)
            return hit
        try:
            peer = X25519PublicKey.from_public_bytes(ed25519_to_x25519_public(public_key))
            shared = self.identity.x25519().exchange(peer)
        except ValueError as exc:
            raise RecordError("forged", "unusable peer key") from exc
        a, b = sorted((self.identity.public_key, public_key))
        key = hashlib.blake2b(shared + a + b, digest_size=32, person=_MAC_PERSON).digest()
        out = (key, node_id_of(public_key)[:KEY_SIZE])
        self._cache[public_key] = out
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return out


class SimPairKeys:
    """INSECURE stand-in for the simulator's speed runs: the MAC key is the XOR of a public
    hash of each public key, so per-datagram MAC cost is real but no X25519 is spent (and no
    per-pair memory). Never use outside tests.

    ``ids`` may be shared by all simulated nodes (public key -> (its hash as an integer, its
    record key): pure functions of the key)."""

    __slots__ = ("_last", "_last_pk", "_mask", "ids", "public_key")

    def __init__(
        self, identity: NodeIdentity, ids: dict[bytes, tuple[int, bytes]] | None = None
    ) -> None:
        self.public_key = identity.public_key
        self.ids = ids if ids is not None else {}
        self._mask = self._entry(identity.public_key)[0]
        self._last_pk: bytes | None = None
        self._last: tuple[bytes, bytes] = (b"", b"")
        """The last answer: a reply goes to the key just received from (the same object)."""

    def _entry(self, public_key: bytes) -> tuple[int, bytes]:
        v = self.ids.get(public_key)
        if v is None:
            h = hashlib.blake2b(public_key, digest_size=8, person=b"fc-sim-INSECURE!")
            v = self.ids[public_key] = (
                int.from_bytes(h.digest(), "big"),
                node_id_of(public_key)[:KEY_SIZE],
            )
        return v

    def get(self, public_key: bytes) -> tuple[bytes, bytes] | None:
        """Always computable (a 64-bit key: the MAC costs the same, the XOR less)."""
        if public_key is self._last_pk:
            return self._last
        v = self.ids.get(public_key) or self._entry(public_key)
        out = ((v[0] ^ self._mask).to_bytes(8, "big"), v[1])
        self._last_pk = public_key
        self._last = out
        return out

    def derive(self, public_key: bytes) -> tuple[bytes, bytes]:
        """XOR of the two keys' hashes (symmetric)."""
        v = self._entry(public_key)
        return ((v[0] ^ self._mask).to_bytes(8, "big"), v[1])


# -- internal state --------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    key: bytes | None
    sent: float
    kind: str  # sync, probe, hello
    addr: Addr


@dataclass(slots=True)
class _Lookup:
    qid: int
    route: str
    group: int
    deadline: float
    attempts: int = 0
    waiting: dict[bytes, int] = field(default_factory=dict)  # asked, not answered: key -> hops
    forwarded: bool = False
    give_up: float = 0.0
    tried: set[bytes] = field(default_factory=set)
    records: dict[bytes, NodeRecord] = field(default_factory=dict)
    internal: bool = False  # finding a home group member to publish to; no event


@dataclass(slots=True)
class _Seed:
    addr: Addr
    public_key: bytes | None


class Gossip:
    """One node's gossip engine (see the module docstring for the protocol)."""

    # fixed attributes: ~70 of them is past what CPython shares as an instance-dict key
    # table (30), so without slots every node carried its own dict and every access hashed
    __slots__ = (
        "_acks", "_addresses", "_backlog", "_bans", "_changed", "_claimers", "_claims",
        "_confirmed", "_dead", "_deaf", "_events", "_expired_at", "_extensions", "_false_claims",
        "_flags", "_group_search", "_hello_left", "_hot", "_hot_home", "_inflight", "_keys_left",
        "_lookups", "_low_keys", "_missing", "_need", "_need_src", "_news", "_now", "_out",
        "_page_fill", "_page_turn", "_pending", "_pk", "_publish_due", "_publish_wait", "_refuted",
        "_relay_seen", "_relays_left", "_republish_at", "_revive", "_routes", "_seed_next",
        "_seed_turn", "_seed_wait", "_seeds", "_sent_log", "_settled_at", "_spent",
        "_spent_content", "_suspects", "_wanted", "_wanted_low", "_withdraw", "cache", "codec",
        "config", "identity", "key", "keys", "local", "my_group", "next_round", "rng", "round",
        "rx_bytes", "rx_datagrams", "stats", "tx_bytes", "tx_datagrams"
    )

    def __init__(
        self,
        identity: NodeIdentity,
        *,
        now: float,
        rng: random.Random,
        addresses: tuple[Address, ...],
        routes: tuple[str, ...] = (),
        flags: int = 0,
        extensions: tuple[tuple[int, bytes], ...] = (),
        config: GossipConfig | None = None,
        cache: HostCache | None = None,
        codec: RecordCodec | None = None,
        keys: KeyAgreement | None = None,
        settled: bool = False,
    ) -> None:
        self.identity = identity
        self._pk = identity.public_key
        self.config = cfg = config or GossipConfig()
        self.rng = rng
        self.key = identity.key
        self.my_group = id_group(identity.node_id, cfg.group_bits)
        self.cache = cache or HostCache(
            rng=rng,
            capacity=cfg.capacity,
            group_bits=cfg.group_bits,
            source_quota=cfg.source_quota,
            contacts_min=cfg.contacts_min,
        )
        if self.cache.group_bits != cfg.group_bits:
            raise ValueError("cache and config disagree on group_bits")
        self.cache.set_group(self.my_group)
        self.codec = codec or RecordCodec()
        self.keys: KeyAgreement = keys or PairKeys(identity)
        self.stats: dict[str, int] = {}
        """Drop and event counters by reason (see docs/peering.md, Failure behaviour)."""
        self.rx_datagrams = self.rx_bytes = self.tx_datagrams = self.tx_bytes = 0
        self._out: list[tuple[bytes, Addr]] = []
        self._events: deque[Event] = deque()
        self._pending: dict[int, _Pending] = {}
        self._hot: dict[bytes, list[int]] = {}
        self._hot_home: dict[bytes, list[int]] = {}
        self._news: list[NodeRecord] = []
        self._low_keys: dict[bytes, None] = {}  # asked for as mere interest (rumour)
        self._backlog: dict[bytes, list[Any]] = {}  # eager pushes waiting for budget
        self._dead: dict[bytes, list[int]] = {}
        self._suspects: dict[bytes, bytes | None] = {}  # to probe -> who claimed it (or us)
        self._claims: dict[bytes, bytes] = {}  # probed on someone's claim -> claimer
        self._revive: dict[bytes, None] = {}  # buried nodes a peer still believes alive
        self._changed: dict[bytes, int] = {}  # home records changed lately -> round
        self._false_claims: dict[bytes, int] = {}
        self._deaf: dict[bytes, float] = {}  # peers whose death claims we ignore, until
        self._inflight: dict[bytes, float] = {}
        self._missing: dict[bytes, list[int]] = {}
        """Home records we know we lack (a digest showed them): key -> [seq, asks left].
        Asked for again from each member of our group we sync with until they arrive: the
        member first asked may be out of budget, and rumours about them stop."""
        self._lookups: dict[int, _Lookup] = {}
        self._bans: dict[object, float] = {}
        self._seeds: list[_Seed] = []
        self._seed_wait = 1
        self._seed_next = 0
        self._seed_turn = -1  # next seed to greet (first one at random)
        self._withdraw: set[int] = set()
        self._confirmed: set[int] = set()  # home groups members acknowledged this version in
        self._acks: dict[int, set[bytes]] = {}
        self._republish_at = 0
        self._refuted = -10**6
        self._claimers: dict[bytes, int] = {}
        self._relay_seen: dict[bytes, int] = {}
        self._need: bytes | None = None
        self._need_src = b""
        self.round = 0
        self._settled_at = 0 if settled else cfg.settle_rounds
        self._page_fill = -10  # last round anti-entropy brought us home records we lacked
        self._page_turn = rng.getrandbits(6)  # next anti-entropy slice (taken in turn)
        self._spent = 0  # wire bytes sent in the last interval (all datagrams)
        self._spent_content = 0  # of which datagrams carrying records or digests
        self._sent_log: list[tuple[float, int, bool]] = []  # a deque is 10x the memory
        self._expired_at = -1.0
        self._now = now
        self._wanted = 0
        self._wanted_low = 0
        self._hello_left = cfg.hello_per_round
        self._keys_left = cfg.new_keys_per_round
        self._relays_left = cfg.relays_per_round
        self._publish_due = 0 if not settled else rng.randrange(1, cfg.republish_rounds + 1)
        self._publish_wait = 1  # rounds to the next publish retry (doubles while in vain)
        self._group_search: dict[int, tuple[int, int]] = {}
        """Home groups we know nobody in: (round of the next member lookup, its wait)."""
        self.next_round = now + rng.random() * cfg.interval
        self._addresses = addresses
        self._routes = routes
        self._flags = flags
        self._extensions = extensions
        prev = self.cache.entry(self.key)
        seq = max(int(now * 1000), prev.record.seq + 1 if prev is not None else 0)
        self.local = self._sign(seq, now)
        if settled:  # a warm start: our record is where it belongs already
            self._confirmed = set(self.local.homes(cfg.group_bits))
            self._republish_at = self._publish_due
        self.cache.protected.add(self.key)
        self.cache.remove(self.key, now)
        self.cache.put(self.local, now)

    # -- public API ------------------------------------------------------------------------

    @property
    def node_id(self) -> bytes:
        """This node's id."""
        return self.identity.node_id

    @property
    def settled(self) -> bool:
        """True once this node's negative lookup answers for its group are authoritative."""
        return self.round >= self._settled_at and self.round - self._page_fill >= 10

    def add_seed(self, addr: Addr, public_key: bytes | None = None) -> None:
        """A bootstrap address (config seeds, DNS SRV, mDNS); the key, if known, skips HELLO."""
        for s in self._seeds:
            if s.addr == addr:
                if public_key is not None:
                    s.public_key = public_key
                return
        self._seeds.append(_Seed(addr, public_key))

    def update_local(
        self,
        now: float,
        *,
        addresses: tuple[Address, ...] | None = None,
        routes: tuple[str, ...] | None = None,
        flags: int | None = None,
        extensions: tuple[tuple[int, bytes], ...] | None = None,
    ) -> NodeRecord:
        """Change what this node announces: bump seq, re-sign, spread and publish."""
        self._now = now
        if addresses is not None:
            self._addresses = addresses
        if routes is not None:
            self._routes = routes
        if flags is not None:
            self._flags = flags
        if extensions is not None:
            self._extensions = extensions
        self._resign(now)
        return self.local

    def lookup_domain(self, domain: str) -> list[NodeRecord]:
        """Cached records of nodes serving ``domain`` (no network; see start_lookup)."""
        return self.cache.lookup_domain(domain)

    def lookup_user(self, address: str) -> list[NodeRecord]:
        """Cached records for ``user@domain``, user-specific first (no network)."""
        return self.cache.lookup_user(address)

    def start_lookup(self, route: str, now: float, *, use_cache: bool = True) -> int:
        """Ask the route's home group; a LookupCompleted event follows. Returns its id."""
        self._now = now
        return self._start(normalize_route(route), now, use_cache=use_cache)

    def _start(self, norm: str, now: float, *, use_cache: bool, internal: bool = False) -> int:
        group = _group_key(norm, self.config.group_bits)
        qid = self.rng.getrandbits(32)
        while qid in self._lookups:
            qid = self.rng.getrandbits(32)
        if group is None:
            group = route_group(norm, self.config.group_bits)
        st = _Lookup(qid, norm, group, now, internal=internal)
        st.give_up = now + self.config.lookup_timeout * (self.config.lookup_attempts + 2)
        self._lookups[qid] = st
        if use_cache:
            for r in self.cache.lookup(norm):
                st.records[r.key] = r
            if st.records:
                self._finish_lookup(st)
                return qid
        self._lookup_attempt(st, now)
        return qid

    def receive(self, data: bytes, addr: Addr, now: float) -> None:
        """Handle one datagram. Anything malformed, unauthenticated or replayed is dropped."""
        self._now = now
        self.rx_datagrams += 1
        n = len(data)
        self.rx_bytes += n
        # wire.split and wire.mac inline (every datagram takes this path)
        if n > wire.MAX_DATAGRAM or n < _HEADER_SIZE:
            self._count("drop_malformed")
            return
        magic, pk, ts = _HEADER_UNPACK(data, 0)
        if magic == wire.MAGIC_AUTH:
            if n < wire.OVERHEAD:
                self._count("drop_malformed")
                return
        elif magic != wire.MAGIC_HELLO:
            self._count("drop_malformed")
            return
        cfg = self.config
        if pk == self._pk:
            self._count("drop_self")
            return
        if abs(ts - now) > cfg.clock_skew:
            self._count("drop_clock")
            return
        host = addr[0]
        src = host if ":" not in host else source_of(host)
        if self._bans and self._banned(pk, src, now):
            self._count("drop_banned")
            return
        if magic == wire.MAGIC_HELLO:
            self._on_hello(data, pk, addr, src, now)
            return
        keys = self.keys.get(pk)
        if keys is None:
            if self._keys_left <= 0:
                self._count("drop_keyrate")
                return
            self._keys_left -= 1
            try:
                keys = self.keys.derive(pk)
            except RecordError:
                self._count("drop_badkey")
                return
        mac_key, sender = keys
        body_end = n - _MAC_SIZE
        tag = _blake2b(data[:body_end], key=mac_key, digest_size=_MAC_SIZE).digest()
        if not _compare_digest(tag, data[body_end:]):
            self._count("drop_badmac")
            return
        if self._bans and self._banned(sender, src, now):
            self._count("drop_banned")
            return
        try:
            m = wire.parse(data, _HEADER_SIZE, body_end)
        except wire.WireError:
            self._count("drop_malformed")
            return
        self._on_message(m, pk, sender, addr, src, now)

    def handle_timer(self, now: float) -> None:
        """Run due work: the gossip round and lookup retries."""
        self._now = now
        if now >= self.next_round:
            self.next_round += self.config.interval
            if self.next_round <= now:
                self.next_round = now + self.config.interval
            self._round(now)
        if self._lookups:
            for st in [s for s in self._lookups.values() if s.deadline <= now]:
                self._lookup_attempt(st, now)

    def get_timer(self) -> float:
        """When handle_timer must run next."""
        t = self.next_round
        for st in self._lookups.values():
            t = min(t, st.deadline)
        return t

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        """Datagrams produced since the last call (each <= max_datagram bytes)."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        """Next event, or None."""
        return self._events.popleft() if self._events else None

    def peers(self, now: float) -> list[dict[str, object]]:
        """The `/api/peers` view of the host cache (without this node itself)."""
        me = self.node_id.hex()
        return [p for p in self.cache.peers(now) if p["node_id"] != me]

    # -- own record ------------------------------------------------------------------------

    def _sign(self, seq: int, now: float) -> NodeRecord:
        return self.identity.make_record(
            seq=seq,
            expires=int(now) + self.config.record_ttl,
            addresses=self._addresses,
            routes=self._routes,
            flags=self._flags,
            extensions=self._extensions,
        )

    def _resign(self, now: float, above: int = 0) -> None:
        seq = max(self.local.seq + 1, int(now * 1000), above + 1)
        bits = self.config.group_bits
        # groups that stored the old version and will not store the new one still get it
        # once: it supersedes the old version there, so a replay of that cannot bring back
        # a route we dropped
        self._withdraw |= self.local.homes(bits)
        self.local = self._sign(seq, now)
        self._withdraw -= self.local.homes(bits)
        self._confirmed = set()
        self._acks = {}
        self.cache.put(self.local, now)
        self._hot_add(self.key, seq)
        self._publish_due = self.round + 1
        self._publish_wait = 1
        self._republish_at = self.round + self.config.republish_rounds

    def _publish(self, now: float) -> None:
        """Hand our record to members of each home group, acknowledged, a few datagrams per
        round; groups not acknowledged yet are retried every other round (through a relay
        while we know nobody there). Groups that held our previous version get the new one
        too (withdrawal). Every republish_rounds, everything once more."""
        cfg = self.config
        rec = self.local
        homes = rec.homes(cfg.group_bits)
        if self.round >= self._republish_at:
            self._republish_at = self.round + cfg.republish_rounds
            self._confirmed = set()
            self._acks = {}
            self._publish_wait = 1
        todo = [g for g in sorted(homes | self._withdraw) if g not in self._confirmed]
        self._publish_due = self._republish_at
        sent = 0
        missing = False
        reachable = False  # some group left to confirm has a member we know
        for g in todo:
            if sent >= cfg.publish_per_round:
                reachable = True  # (groups were left for the next round)
                break
            cs = [e for e in self.cache.contacts(g, 2) if e.record.gossip_addr is not None]
            if not self._live_contacts(g):
                missing = True
            if not cs:
                continue
            reachable = True
            for c in cs[: 1 if g in self._withdraw else 2]:
                b = Builder(cfg.max_datagram)
                nonce = self.rng.getrandbits(32)
                b.add(Sec.PING, wire.encode_u32(nonce))
                b.add(Sec.RECORD, rec.raw)
                addr = c.record.gossip_addr
                if addr is not None and self._send(b, c.record, now):
                    self._pending[nonce] = _Pending(c.record.key, now, "publish", addr)
                    sent += 1
            self._withdraw.discard(g)  # withdrawals are best effort: one try
        if todo:
            # Retry next round while some group left has a member we know (a send the budget
            # refused included); while none has, back off, doubling: in a mesh smaller than
            # 2**group_bits most home groups are empty for good, and a relay and a lookup per
            # round for each of them spent a 5-node mesh's send budgets (answers dropped,
            # live nodes declared dead). A lookup that finds a member publishes to it at once
            # (_on_answers).
            # Only in a small mesh (most groups without a known member) and once settled: in
            # a large mesh an empty home group means our contacts there died (churn, a
            # partition) or we just joined, and the group has other members to find at once
            # (backing off there cost churn lookups 99.95 -> 99.87 % and partition heal 16 ->
            # 20 rounds at 10,000 nodes).
            patient = not reachable and self._small_mesh()
            self._publish_wait = min(2 * self._publish_wait, cfg.publish_backoff_max) \
                if patient else 1
            self._publish_due = self.round + self._publish_wait
        if missing:
            peer = self._live_peer(exclude=set())
            if peer is not None:
                b = Builder(cfg.max_datagram)
                b.add(Sec.RELAY, b"\x01" + rec.raw)
                self._send(b, peer, now)
            # and find a member there the way lookups do: whoever answers, we publish to.
            # Per group, these lookups back off (8, 16, 32 ... rounds, up to republish_rounds):
            # a group that stays empty (a mesh smaller than 2**group_bits) must not cost a
            # lookup, its attempts and their forwards, every few rounds for ever.
            # At most two at a time, so a node with many empty home groups does not start a
            # lookup for each of them in the same round. Only in a small mesh, as above.
            busy = {st.group for st in self._lookups.values() if st.internal}
            small = self._small_mesh()
            for g in todo:
                if g in busy or self._live_contacts(g):
                    self._group_search.pop(g, None)
                    continue
                due, wait = self._group_search.get(g, (0, 4))
                if small and (self.round < due or len(busy) >= 2):
                    continue
                busy.add(g)
                wait = min(2 * wait, cfg.republish_rounds)
                self._group_search[g] = (self.round + wait, wait)
                self._start(f"{GROUP_KEY}{g}", now, use_cache=False, internal=True)

    # -- rounds ----------------------------------------------------------------------------

    def _round(self, now: float) -> None:
        cfg = self.config
        self.round += 1
        self._wanted = 0
        self._wanted_low = 0
        self._hello_left = cfg.hello_per_round
        self._keys_left = cfg.new_keys_per_round
        self._relays_left = cfg.relays_per_round
        if self._pending:
            for nonce, p in list(self._pending.items()):
                if now - p.sent >= cfg.probe_timeout:
                    del self._pending[nonce]
                    if p.key is not None:
                        self._no_answer(p.key, p.kind, now)
        if self._inflight:
            self._inflight = {k: t for k, t in self._inflight.items() if t > now}
        for rec in self.cache.expire(now):
            self._emit_removed(rec.node_id, "expired")
        if self.local.expires - now < cfg.refresh_before:
            self._resign(now)
        if self._backlog:
            self._flush_backlog(now)
        # one exchange per round
        partner = self._choose_partner(now)
        if partner is not None:
            self._send_sync(partner, now)
        if self._seeds and len(self.cache.entries) < cfg.bootstrap_min:
            # (nearly) alone: ask a seed, backing off (up to 3 rounds) so a crowd of
            # newcomers does not drown it; two newcomers that only know each other keep asking
            if self.round >= self._seed_next:
                # nobody at all yet: two seeds at once, so one dead seed costs no rounds
                self._contact_seeds(now, 2 if len(self.cache) <= 1 else 1)
                self._seed_turn += 1
                self._seed_wait = min(3, self._seed_wait + 1)
                self._seed_next = self.round + self.rng.randint(1, self._seed_wait)
        else:
            self._seed_wait = 1
            if self._seeds and self.round % cfg.seed_rounds == 0:
                self._contact_seeds(now)  # now and then: rejoins after a partition
                self._seed_turn += 1
        # confirm suspicions first-hand
        if self._suspects:
            for _ in range(min(cfg.probe_cap, len(self._suspects))):
                key = next(iter(self._suspects))
                claimer = self._suspects.pop(key)
                e = self.cache.entry(key)
                if e is None or (e.last_heard is not None and now - e.last_heard < cfg.interval):
                    continue
                b = Builder(cfg.max_datagram)
                nonce = self.rng.getrandbits(32)
                b.add(Sec.PING, wire.encode_u32(nonce))
                addr = e.record.gossip_addr
                if addr is not None and self._send(b, e.record, now):
                    self._pending[nonce] = _Pending(key, now, "probe", addr)
                    if claimer is not None:
                        self._claims[key] = claimer
        # a peer still has a node we buried: ask that node ourselves (it answers: restored)
        for _ in range(min(cfg.probe_cap, len(self._revive)) if self._revive else 0):
            key = next(iter(self._revive))
            del self._revive[key]
            tomb = self.cache.tombs.get(key)
            addr = tomb.record.gossip_addr if tomb is not None else None
            if tomb is None or addr is None or tomb.until <= now:
                continue
            b = Builder(cfg.max_datagram)
            nonce = self.rng.getrandbits(32)
            b.add(Sec.PING, wire.encode_u32(nonce))
            if self._send(b, tomb.record, now):
                self._pending[nonce] = _Pending(None, now, "revive", addr)
        if self.round >= self._publish_due and len(self.cache.entries) > 1:
            self._publish(now)
        if self.cache.dropped:
            self._drain_dropped()

    def _choose_partner(self, now: float) -> NodeRecord | None:
        cfg = self.config
        cache = self.cache
        r = self.rng.random()
        if r < cfg.p_grave and cache.tombs:
            tomb = self.rng.choice(list(cache.tombs.values()))
            if tomb.until > now and tomb.record.gossip_addr is not None:
                return tomb.record
        p_group = cfg.p_group if self.settled else 0.9  # newcomers: fill the home store first
        if r < cfg.p_grave + p_group and len(cache.members[self.my_group]) > 1:
            pick = self._pick(self.my_group)
            if pick is not None:
                return pick
        # a member of a random other group: mixes rumours across the mesh and keeps checking
        # (and, through NEED, renewing) the contacts lookups depend on
        for _ in range(3):
            g = self.rng.randrange(1 << cfg.group_bits)
            if g != self.my_group and cache.members[g]:
                pick = self._pick(g)
                if pick is not None:
                    return pick
        return self._random_peer(exclude=set())

    def _pick(self, group: int) -> NodeRecord | None:
        """A random usable member of ``group`` (a few tries)."""
        pool = self.cache.members[group]
        n = len(pool)
        if not n:
            return None
        rnd = self.rng.random
        for _ in range(6):
            k = pool[int(rnd() * n)]
            if k == self.key or k in self._suspects:
                continue
            e = self.cache.entries.get(k)
            if e is not None and not e.rumour and e.record.gossip_addr is not None:
                return e.record
        return None

    def _random_peer(self, exclude: set[bytes]) -> NodeRecord | None:
        entries = self.cache.entries
        if len(entries) <= 1:
            return None
        keys = self.cache.keys_list()
        for _ in range(6):
            k = keys[self.rng.randrange(len(keys))]
            if k == self.key or k in exclude or k in self._suspects:
                continue
            e = entries[k]
            if e.rumour and len(entries) > 16:
                continue
            if e.record.gossip_addr is not None:
                return e.record
        return None

    def _live_peer(self, exclude: set[bytes]) -> NodeRecord | None:
        """A random peer, preferring one heard from recently (for forwarding)."""
        best: NodeRecord | None = None
        best_seen = -1.0
        entries = self.cache.entries
        for _ in range(4):
            rec = self._random_peer(exclude)
            if rec is None:
                break
            seen = entries[rec.key].last_heard or 0.0
            if seen > best_seen:
                best, best_seen = rec, seen
        return best

    def _contact_seeds(self, now: float, count: int = 1) -> None:
        """Greet ``count`` seeds, in turn (a dead seed is skipped next time, not re-drawn)."""
        cfg = self.config
        n = len(self._seeds)
        if self._seed_turn < 0:
            self._seed_turn = self.rng.randrange(n)
        for j in range(min(count, n)):
            seed = self._seeds[(self._seed_turn + j) % n]
            nonce = self.rng.getrandbits(32)
            b = Builder(cfg.max_datagram)
            # A seed whose record we lack gets HELLO even when its key is known (mDNS gives
            # it): a PING would carry no record either way, and the two would stay strangers.
            known = seed.public_key is not None and (
                node_id_of(seed.public_key)[:KEY_SIZE] in self.cache.entries
            )
            b.add(Sec.PING if known else Sec.HELLO, wire.encode_u32(nonce))
            if not known or seed.public_key is None:
                b.add(Sec.RECORD, self.local.raw)
                data = b.finish_hello(self.identity.public_key, int(now), cfg.hello_size)
                self._emit(data, seed.addr)
                self._pending[nonce] = _Pending(None, now, "hello", seed.addr)
                continue
            need = self._need_bitmap()
            if need is not None:
                b.add(Sec.NEED, need)
            self._add_home_need(b)
            if self._send_to(b, seed.public_key, seed.addr, now):
                key = node_id_of(seed.public_key)[:KEY_SIZE]
                self._pending[nonce] = _Pending(key, now, "sync", seed.addr)

    def _add_home_need(self, b: Builder) -> None:
        """Groups our own record is homed in where we know nobody: we cannot publish there."""
        if self._need is None:
            return  # every group has members: nothing urgent
        members = self.cache.members
        urgent = [
            g for g in sorted(self.local.homes(self.config.group_bits))
            if len(members[g]) - (g == self.my_group) <= 0
        ]
        if urgent:
            b.add(Sec.NEED_HOME, b"".join(g.to_bytes(2, "big") for g in urgent[:8]))

    def _need_bitmap(self) -> bytes | None:
        bm = self.cache.need_bitmap()
        if bm is not self._need_src:
            self._need_src = bm
            self._need = bm if any(bm) else None
        return self._need

    def _send_sync(self, partner: NodeRecord, now: float) -> None:
        cfg = self.config
        addr = partner.gossip_addr
        if addr is None:
            return
        b = Builder(cfg.max_datagram)
        nonce = self.rng.getrandbits(32)
        b.add(Sec.PING, wire.encode_u32(nonce))
        need = self._need_bitmap()
        pgroup = id_group(partner.node_id, cfg.group_bits)
        if pgroup != self.my_group and self._stale_contacts(pgroup, now):
            # ask the partner for members of its own group it heard from lately
            bm = bytearray(need or bytes(((1 << cfg.group_bits) + 7) // 8))
            bm[pgroup >> 3] |= 0x80 >> (pgroup & 7)
            need = bytes(bm)
        if need is not None:
            b.add(Sec.NEED, need)
        self._add_home_need(b)
        pkey = partner.key
        paged = False
        if pgroup == self.my_group:
            if self._missing:
                self._ask_missing(b, now)
            if self.settled:
                # a summary of every slice: the partner answers with its page of a slice
                # where we differ (none when in sync, the common case)
                sub_bits = self.page_bits()
                if 4 + (4 << sub_bits) <= self._budget_room(b, bulk=True):
                    b.add(Sec.SUMMARY, wire.encode_summary(
                        sub_bits, self.cache.home_summary(sub_bits)))
            else:  # a newcomer shows its pages: the partner pushes what it lacks, as bulk
                paged = self._add_page(b)
        self._add_rumours(b, pkey, pgroup)
        if self._send(b, partner, now):
            self._pending[nonce] = _Pending(pkey, now, "sync", addr)
            if paged:
                self._page_turn += 1

    def _small_mesh(self) -> bool:
        """Settled, and most groups without any member we know: a mesh of a few nodes, where
        most home groups are empty for good (docs/peering.md 5.3, "A mesh smaller than its
        groups"). A node of a large mesh knows members of every group (two contacts each at
        least), so it never looks like this."""
        if not self.settled:
            return False
        members = self.cache.members
        empty = sum(1 for ms in members if not ms)
        return 2 * empty > len(members)

    def _live_contacts(self, group: int) -> bool:
        """True if some member of ``group`` we know has not failed us lately."""
        entries = self.cache.entries
        return any(entries[k].failures == 0 for k in self.cache.members[group] if k != self.key)

    def _stale_contacts(self, group: int, now: float) -> bool:
        """True if we have heard from no member of ``group`` for ``contact_fresh`` seconds."""
        horizon = now - self.config.contact_fresh
        entries = self.cache.entries
        for k in self.cache.members[group]:
            heard = entries[k].last_heard
            if heard is not None and heard >= horizon:
                return False
        return True

    def _ask_missing(self, b: Builder, now: float) -> None:
        """WANT the home records we still lack from this member of our group."""
        cfg = self.config
        entries = self.cache.entries
        asks: list[bytes] = []
        for k, miss in list(self._missing.items()):
            e = entries.get(k)
            if (e is not None and e.record.seq >= miss[0]) or self.cache.tombstoned(k, miss[0]):
                del self._missing[k]
                continue
            t = self._inflight.get(k)
            if t is not None and t > now:
                continue
            if self._wanted >= cfg.want_budget or len(asks) >= cfg.max_want:
                break
            asks.append(k)
        if not asks or 8 * len(asks) > self._budget_room(b):
            return
        b.add(Sec.WANT, b"".join(asks))
        self._wanted += len(asks)
        for k in asks:
            self._inflight[k] = now + cfg.interval
            miss = self._missing[k]
            miss[1] -= 1
            if miss[1] <= 0:
                del self._missing[k]

    def page_bits(self) -> int:
        """Anti-entropy pages are 2**page_bits slices of our home records (~page_target
        digests each)."""
        n = self.cache.home_count
        target = self.config.page_target
        sub_bits = 0
        while (n >> sub_bits) > target and sub_bits < 6:
            sub_bits += 1
        return sub_bits

    def _add_page(self, b: Builder) -> bool:
        """Add the next anti-entropy page; True if it went in complete (the slice is done).

        Slices are taken in turn, not at random, and a slice counts as sent only when its
        page went out complete: every slice then goes out once per ``2**sub_bits`` SYNCs to
        our group, so a member lacking a change is shown it within a bounded number of
        rounds. At random, (7/8)**20 = 7 % of 8 slices were still unsent after 20 rounds,
        and a budget-cut page always dropped the same tail of its slice."""
        sub_bits = self.page_bits()
        return self._page_into(b, sub_bits, self._page_turn & ((1 << sub_bits) - 1))

    def _page_into(self, b: Builder, sub_bits: int, index: int) -> bool:
        """Add our page of one slice (bulk); True if it went in complete."""
        cfg = self.config
        items = self.cache.home_page(sub_bits, index)
        limit = min(cfg.page_max, (self._budget_room(b, bulk=True) - 3) // wire.DIGEST_SIZE)
        if limit < 0:
            return False
        if len(items) <= limit:  # complete: the encoding is remembered with the page
            payload = wire.encode_page_raw(
                sub_bits, index, True, self.cache.home_page_bytes(sub_bits, index)
            )
            b.add(Sec.PAGE, payload)
            return True
        if limit:  # incomplete: a window at a random place, not always the slice's head
            start = self.rng.randrange(len(items))
            part = (items[start:] + items[:start])[:limit]
            b.add(Sec.PAGE, wire.encode_page(sub_bits, index, False, part))
        return False

    def _add_rumours(self, b: Builder, partner: bytes, pgroup: int) -> None:
        """HAVE and DEAD digests, newest first, each sent a bounded number of times.

        Digests of records homed in the partner's group go in HOME_HAVE, which the partner
        fetches first; a partner in our own group first hears what changed in the group.
        That keeps home groups complete while global rumours compete for the budget.
        ``pgroup`` is the partner's group (the callers know it already)."""
        cfg = self.config
        bits = cfg.group_bits
        room = min(cfg.max_have, self._budget_room(b) // wire.DIGEST_SIZE - 2)
        if room <= 0:
            return
        homed: list[tuple[bytes, int]] = []
        items: list[tuple[bytes, int]] = []
        if pgroup == self.my_group and self._hot_home:
            self._take(self._hot_home, homed, partner, room)
        if self._hot and len(homed) < room:
            entries = self.cache.entries
            taken = {k for k, _ in homed}
            spent: list[bytes] = []
            for k in reversed(self._hot):
                if k == partner or k in taken:
                    continue
                v = self._hot[k]
                e = entries.get(k)
                if e is not None and pgroup in e.record.homes(bits):
                    homed.append((k, v[0]))
                else:
                    items.append((k, v[0]))
                v[1] -= 1
                if v[1] <= 0:
                    spent.append(k)
                if len(items) + len(homed) >= room:
                    break
            for k in spent:
                del self._hot[k]
        if homed:
            b.add(Sec.HOME_HAVE, wire.digests(homed))
        if items:
            b.add(Sec.HAVE, wire.digests(items))
        if self._dead:
            claims: list[tuple[bytes, int]] = []
            room = min(cfg.max_dead, self._budget_room(b) // wire.DIGEST_SIZE - 1)
            if room > 0:
                self._take(self._dead, claims, partner, room)
            if claims:
                b.add(Sec.DEAD, wire.digests(claims))

    @staticmethod
    def _take(
        table: dict[bytes, list[int]], out: list[tuple[bytes, int]], partner: bytes, room: int
    ) -> None:
        """Newest rumours first; each costs one of its remaining transmissions."""
        spent: list[bytes] = []
        for k in reversed(table):
            if k == partner:
                continue
            v = table[k]
            out.append((k, v[0]))
            v[1] -= 1
            if v[1] <= 0:
                spent.append(k)
            if len(out) >= room:
                break
        for k in spent:
            del table[k]

    def _expire_log(self) -> None:
        now = self._expired_at = self._now
        log = self._sent_log
        if not log:
            return
        horizon = now - self.config.interval
        if log[0][0] > horizon:
            return
        gone = 0
        for t, n, content in log:
            if t > horizon:
                break
            gone += 1
            self._spent -= n
            if content:
                self._spent_content -= n
        del log[:gone]

    def _budget_room(self, b: Builder, bulk: bool | int = False) -> int:
        """Payload bytes one more section of ``b`` may still take: datagram room, and the
        sliding one-interval budget. Content may not eat the control reserve; bulk content
        (anti-entropy, catch-up, global rumours, contact offers) not the news reserve either,
        so what changed in our group and what someone waits for always gets through first."""
        if self._expired_at != self._now:
            self._expire_log()
        cfg = self.config
        size = b.size
        used = size + _ROOM_USED
        reserve = bulk if not isinstance(bulk, bool) else cfg.bulk_reserve if bulk else 0
        budget = cfg.send_budget
        return min(
            b.limit - size - 3,  # b.room()
            budget - cfg.control_reserve - reserve - self._spent_content - used,
            budget - self._spent - used,
        )

    # -- sending ---------------------------------------------------------------------------

    def _emit(self, data: bytes, addr: Addr, content: bool = False) -> bool:
        """Queue a datagram if the budget allows: never more than ``send_budget`` wire bytes
        in any one interval; content (records, digests) never more than the budget minus
        ``control_reserve``, so acks and probes always have room."""
        if self._expired_at != self._now:
            self._expire_log()
        cfg = self.config
        n = len(data) + UDP_IP_OVERHEAD
        if self._spent + n > cfg.send_budget or (
            content and self._spent_content + n > cfg.send_budget - cfg.control_reserve
        ):
            self._count("drop_budget")
            return False
        self._out.append((data, addr))
        self._spent += n
        if content:
            self._spent_content += n
        self._sent_log.append((self._now, n, content))
        self.tx_datagrams += 1
        self.tx_bytes += len(data)
        return True

    def _send(self, b: Builder, rec: NodeRecord, now: float) -> bool:
        addr = rec.gossip_addr
        if addr is None:
            return False
        return self._send_to(b, rec.public_key, addr, now)

    def _send_to(self, b: Builder, pk: bytes, addr: Addr, now: float) -> bool:
        keys = self.keys.get(pk)
        if keys is None:
            try:
                keys = self.keys.derive(pk)
            except RecordError:
                return False
        return self._emit(b.finish(self._pk, int(now), keys[0]), addr, b.content)

    # -- receiving -------------------------------------------------------------------------

    def _banned(self, pk: bytes, src: str, now: float) -> bool:
        """Banned by public key, record key or source address."""
        for k in (pk, src):
            until = self._bans.get(k)
            if until is not None:
                if until > now:
                    return True
                del self._bans[k]
        return False

    def _false_claim(self, claimer: bytes, now: float) -> None:
        """A node said a peer was dead; the peer answered us. Repeat offenders' claims are
        ignored for a while (not the offenders: after a partition heals, honest nodes of
        each side make many claims that are false for the other side, and cutting them off
        would keep the halves apart; their claims cost us probes, nothing more)."""
        self._count("false_claims")
        n = self._false_claims.get(claimer, 0) + 1
        self._false_claims[claimer] = n
        if n >= 3:
            self._deaf[claimer] = now + self.config.ban_seconds
            self._count("claims_ignored")
            if len(self._deaf) > 1024:
                self._deaf = {k: t for k, t in self._deaf.items() if t > now}
        if len(self._false_claims) > 1024:
            self._false_claims.clear()

    def _ban(self, pk: bytes, src: str, now: float) -> None:
        until = now + self.config.ban_seconds
        self._bans[pk] = until
        self._bans[src] = until
        self._count("bans")

    def _accept(self, raw: bytes, src: str, pk: bytes, now: float) -> NodeRecord | None:
        """Verify a record and offer it to the cache; the verified record or None."""
        try:
            rec = self.codec.load(raw)
            rec.check_time(now)
        except RecordError as exc:
            self._count("rec_" + exc.reason)
            if exc.reason in ("forged", "malformed", "oversized"):
                self._ban(pk, src, now)
            return None
        key = rec.key
        asked = self._inflight.pop(key, None) is not None
        if self._missing:
            miss = self._missing.get(key)
            if miss is not None and rec.seq >= miss[0]:
                del self._missing[key]
        if key == self.key:
            if rec.public_key == self.identity.public_key and rec.seq > self.local.seq:
                self._resign(now, above=rec.seq)  # an older incarnation's record: outrank it
            return rec
        old = self.cache.entry(key)
        old_seq = old.record.seq if old is not None else -1
        res = self.cache.put(rec, now, src)
        if res == "added" and key in self._low_keys:
            e_new = self.cache.entries[key]
            e_new.rumour = not e_new.home
        self._low_keys.pop(key, None)
        if res in {"added", "updated"}:
            if res == "updated":
                # a newer incarnation clears the failures counted against the older one
                # (SWIM, Das et al. 2002, section 4.2): after a partition heals, probes of a
                # node every member of the other side calls at once fail for a round or
                # two, and a third failure used to bury the very version just learned
                self.cache.entries[key].failures = 0
            if res == "updated" or self._fresh(rec.seq, now):
                self._hot_add(key, rec.seq)
                if self.cache.entries[key].home and (not asked or self.round >= self._settled_at):
                    # news for the group. A newcomer filling its home store asks for dozens
                    # of fresh records that members have already: it must not spend its
                    # budget pushing those around (its own record would spread slowly)
                    self._news.append(rec)
            elif self.cache.entries[key].home:
                self._page_fill = self.round  # an old home record we lacked: still syncing
            self._suspects.pop(key, None)
            if self.cache.dropped:
                self._drain_dropped()
            if self.config.emit_peer_events:
                if res == "added":
                    self._events.append(PeerAdded(rec))
                else:
                    self._events.append(PeerUpdated(rec, old_seq))
        else:
            self._count("rec_" + res)
            t = self.cache.tombs.get(key) if res == "tomb" else None
            if (
                t is not None
                and t.seq == rec.seq
                and self.cache.is_home(rec)
                and len(self._revive) < 64
            ):
                # a peer still passes on the version we buried: check the node first-hand
                # (it answers: restored) instead of waiting for a page to show it
                self._revive[key] = None
        return rec

    def _fresh(self, seq: int, now: float) -> bool:
        """Signed recently (seq is the signing time in ms by convention): worth a rumour."""
        return seq >= (now - self.config.hot_window) * 1000

    def _hot_add(self, key: bytes, seq: int) -> None:
        """Start a rumour about a new record version (and a group rumour if it is ours)."""
        n = self.config.hot_transmissions
        e = self.cache.entries.get(key)
        home = e is not None and e.home
        tables = (self._hot, self._hot_home) if home else (self._hot,)
        if home:
            self._changed.pop(key, None)
            self._changed[key] = self.round
            if len(self._changed) > 64:
                del self._changed[next(iter(self._changed))]
        for hot in tables:
            hot.pop(key, None)
            hot[key] = [seq, n]
            if len(hot) > self.config.max_hot:
                del hot[next(iter(hot))]

    def _on_hello(self, data: bytes, pk: bytes, addr: Addr, src: str, now: float) -> None:
        if self._hello_left <= 0:
            self._count("drop_hellorate")
            return
        self._hello_left -= 1
        try:
            m = wire.parse(data, wire.HEADER.size, len(data))
        except wire.WireError:
            self._count("drop_malformed")
            return
        if m.hello is None:
            self._count("drop_malformed")
            return
        joiner: NodeRecord | None = None
        self._news = []
        for raw in m.records[:1]:
            joiner = self._accept(raw, src, pk, now)
            if joiner is None or joiner.public_key != pk:
                return
        b = Builder(min(self.config.max_datagram, len(data), self.config.hello_reply))
        b.add(Sec.ACK, wire.encode_u32(m.hello))
        b.add(Sec.RECORD, self.local.raw)
        if joiner is not None:
            # a head start: members of each group the newcomer must publish to and sync with
            for g in joiner.homes(self.config.group_bits):
                for c in self.cache.contacts(g, 2):
                    if c.record.key != joiner.key and not b.add(Sec.RECORD, c.record.raw):
                        break
        b.content = False  # a newcomer depends on it (and hello_per_round bounds it)
        self._send_to(b, pk, addr, now)
        if joiner is not None and self._relays_left > 0 and joiner.key not in self._relay_seen:
            # pre-announce it: its home groups learn of it now, not after it has found
            # members there itself (with a dead contact or two, that takes rounds)
            self._relays_left -= 1
            if self._news:
                self._eager_push(self._news, joiner.key, now)
            self._store_for(joiner, self.config.contacts_min, now)

    def _on_message(
        self, m: wire.Message, pk: bytes, sender: bytes, addr: Addr, src: str, now: float
    ) -> None:
        cfg = self.config
        cache = self.cache
        e = cache.entries.get(sender)
        if e is not None:
            e.last_heard = now
            e.failures = 0
            e.rumour = False
        elif sender in cache.tombs:
            restored = cache.lift_tomb(sender, now)
            if restored is not None and cfg.emit_peer_events:
                self._events.append(PeerAdded(restored))
        if self._suspects:
            self._suspects.pop(sender, None)
        if self._claims:
            claimer = self._claims.pop(sender, None)
            if claimer is not None:
                self._false_claim(claimer, now)
        if self._dead:
            self._dead.pop(sender, None)
        for nonce in m.acks:
            p = self._pending.pop(nonce, None)
            if p is not None and p.kind == "publish" and p.key == sender:
                # confirmed once two members have it: one may die before passing it on
                g = id_group(sender, cfg.group_bits)
                acks = self._acks.setdefault(g, set())
                acks.add(sender)
                if len(acks) >= 2 or len(self.cache.members[g]) - (g == self.my_group) < 2:
                    self._confirmed.add(g)
            if p is not None and p.kind == "hello":
                for s in self._seeds:
                    if s.addr == p.addr and s.public_key is None:
                        s.public_key = pk
        got: list[NodeRecord] = []
        self._news = []
        for raw in m.records:
            rec = self._accept(raw, src, pk, now)
            if rec is not None:
                got.append(rec)
        for raw in m.relays:
            self._on_relay(raw, pk, sender, src, now)
        if self._news:
            self._eager_push(self._news, sender, now)
        reply = Builder(cfg.max_datagram)
        for nonce in m.pings:
            reply.add(Sec.ACK, wire.encode_u32(nonce))
        for q in m.lookups:
            self._on_lookup(q, pk, addr, now)
        if m.answers:
            self._on_answers(m.answers, got, sender, pk, addr, now)
        # decide what to ask for and what to push
        want: list[bytes] = []
        low: list[bytes] = []
        push: list[NodeRecord] = []
        claims: list[tuple[bytes, int]] = []
        sender_group = e.group if e is not None else id_group(sender, cfg.group_bits)
        same_group = sender_group == self.my_group
        if m.page is not None and same_group:
            page = m.page
            if not (
                page[2] & wire.PAGE_COMPLETE
                and m.page_raw == cache.home_page_bytes(page[0], page[1])
            ):  # (the same bytes: in sync, the common case, decided without a set)
                self._on_page(page, want, push, claims, now)
        if m.home_have:
            self._want_from(m.home_have, want, now, high=True)
        if m.have:
            self._want_from(m.have, want, now, high=False, low=low)
        if want or low:
            for asks, stype in ((want, Sec.WANT), (low, Sec.WANT_LOW)):
                if asks:
                    payload = b"".join(asks)
                    if len(payload) <= self._budget_room(reply):  # never at the ack's price
                        reply.add(stype, payload)
                    else:
                        for k in asks:
                            self._inflight.pop(k, None)
        # their wants first (what they need before what merely interests them), then repairs
        if m.want or m.want_low:
            for keys, reserve in ((m.want, 0), (m.want_low, cfg.low_reserve)):
                for k in keys:
                    e2 = cache.entries.get(k)
                    if e2 is not None and not self._add_record(reply, e2.record, reserve):
                        break
        if m.summary is not None and m.page is None and same_group:
            self._answer_summary(reply, m.summary)
        for i, rec in enumerate(push):  # anti-entropy repairs and newcomers' catch-up: bulk
            if not self._add_record(reply, rec, bulk=True):
                # no room for the records: their digests (16 bytes, not ~150) put them on
                # the sender's missing list, asked for again until they arrive, instead of
                # the repair being lost until a page shows that slice again
                rest = [(r.key, r.seq) for r in push[i : i + cfg.max_have]]
                if 16 * len(rest) + 16 <= self._budget_room(reply):
                    reply.add(Sec.HOME_HAVE, wire.digests(rest))
                break
        if m.need_home:
            self._offer_home(reply, m.need_home, sender)
        if m.need is not None:
            self._offer_contacts(reply, m.need, sender)
        if claims:
            reply.add(Sec.DEAD, wire.digests(claims[: cfg.max_dead]))
        if m.dead:
            self._on_dead(m.dead, sender, now)
        if m.pings:
            self._add_rumours(reply, sender, sender_group)
        if reply:
            self._send_to(reply, pk, addr, now)

    def _answer_summary(self, b: Builder, summary: tuple[int, bytes]) -> None:
        """Answer a member's SUMMARY where a slice differs: the digests of our home records
        that changed lately in the differing slices (HOME_HAVE, 16 bytes each: the member
        asks for those it lacks), then our page of one differing slice, at random (the
        member asks for what we have newer and pushes what we lack). Nothing when every
        slice agrees. Rumours stop after a few transmissions and a page shows one slice;
        this keeps naming a change to every member whose summary shows it lacks it."""
        sub_bits, theirs = summary
        mine = self.cache.home_summary(sub_bits)
        if mine == theirs:
            return
        differ = [
            i for i in range(1 << sub_bits) if mine[4 * i : 4 * i + 4] != theirs[4 * i : 4 * i + 4]
        ]
        if self._changed:
            shift = 6 - sub_bits
            horizon = self.round - 2 * self.config.settle_rounds
            entries = self.cache.entries
            slices = set(differ)
            recent: list[tuple[bytes, int]] = []
            for k, r in reversed(self._changed.items()):
                if r < horizon:
                    break
                e = entries.get(k)
                if e is not None and e.home and fine_bucket(k) >> shift in slices:
                    recent.append((k, e.record.seq))
                    if len(recent) >= self.config.max_have:
                        break
            if recent:
                room = self._budget_room(b) // wire.DIGEST_SIZE
                if room > 0:
                    b.add(Sec.HOME_HAVE, wire.digests(recent[:room]))
        index = differ[self.rng.randrange(len(differ))] if len(differ) > 1 else differ[0]
        self._page_into(b, sub_bits, index)

    def _add_record(self, b: Builder, rec: NodeRecord, bulk: bool | int = False) -> bool:
        if len(rec.raw) > self._budget_room(b, bulk):
            self._count("budget_cut")
            return False
        return b.add(Sec.RECORD, rec.raw)

    def _want_from(
        self,
        items: list[tuple[bytes, int]],
        want: list[bytes],
        now: float,
        *,
        high: bool,
        low: list[bytes] | None = None,
    ) -> None:
        """Ask for newer or missing records; low-priority ones only within the round budget."""
        cfg = self.config
        cache = self.cache
        entries = cache.entries
        for k, seq in items:
            if len(want) >= cfg.max_want:
                return
            if k == self.key:
                continue
            e = entries.get(k)
            if e is not None:
                if e.record.seq >= seq:
                    continue
                prio = True
            else:
                if cache.tombs and cache.tombstoned(k, seq):
                    if high and cache.tombs[k].seq == seq and len(self._revive) < 64:
                        self._revive[k] = None  # alive to a member: check it first-hand
                    continue
                prio = high or (
                    cfg.group_bits == 0
                    or int.from_bytes(k[:4], "big") >> (32 - cfg.group_bits) == self.my_group
                )
                if not prio and not self._fresh(seq, now):
                    continue  # an old record someone just learned: not news
            if high:
                miss = self._missing.get(k)
                if miss is None:
                    self._missing[k] = [seq, cfg.missing_asks]
                    if len(self._missing) > 64:
                        del self._missing[next(iter(self._missing))]
                elif miss[0] < seq:
                    miss[0] = seq
            t = self._inflight.get(k)
            if t is not None and t > now:
                continue
            if prio:
                if self._wanted >= cfg.want_budget:
                    continue
                self._wanted += 1
            else:
                if self._wanted_low >= cfg.want_budget_low:
                    continue
                self._wanted_low += 1
            self._inflight[k] = now + cfg.interval
            if prio or low is None:
                want.append(k)
            else:
                low.append(k)
                self._low_keys[k] = None
                if len(self._low_keys) > 256:
                    del self._low_keys[next(iter(self._low_keys))]

    def _on_page(
        self,
        page: tuple[int, int, int, list[tuple[bytes, int]]],
        want: list[bytes],
        push: list[NodeRecord],
        claims: list[tuple[bytes, int]],
        now: float,
    ) -> None:
        sub_bits, index, flags, items = page
        cache = self.cache
        mine_items = cache.home_page(sub_bits, index)
        if (
            flags & wire.PAGE_COMPLETE
            and len(mine_items) == len(items)
            and cache.home_page_set(sub_bits, index) == set(items)
        ):
            return  # in sync: the common case, decided at C speed
        entries = cache.entries
        mine = dict(mine_items)
        newer: list[tuple[bytes, int]] = []
        for k, seq in items:
            mine.pop(k, None)
            e = entries.get(k)
            if e is None:
                t = cache.tombs.get(k) if cache.tombs else None
                if t is not None and seq <= t.seq:
                    claims.append((k, seq))
                    if len(self._revive) < 64:
                        self._revive[k] = None  # they think it alive: check first-hand
                else:
                    newer.append((k, seq))
            elif e.record.seq < seq:
                newer.append((k, seq))
            elif e.record.seq > seq:
                push.append(e.record)
        if newer:
            self._want_from(newer, want, now, high=True)
        if flags & wire.PAGE_COMPLETE and mine:
            extra = list(mine)
            if len(extra) > 4:
                extra = self.rng.sample(extra, 4)
            push.extend(entries[k].record for k in extra)

    def _eager_push(self, recs: list[NodeRecord], sender: bytes, now: float) -> None:
        """News for our group, received for the first time: push it whole to a few random
        members at once (each member does this once per record, so within a fraction of a
        round most of the group has it; HOME_HAVE digests and anti-entropy do the rest).
        What the budget does not allow now waits (a little) for the next round."""
        for rec in recs:
            self._backlog[rec.key] = [rec, self.config.eager_fanout, self.round + 3, sender]
        while len(self._backlog) > 64:
            del self._backlog[next(iter(self._backlog))]
        self._flush_backlog(now)

    def _flush_backlog(self, now: float) -> None:
        for key in [k for k, v in self._backlog.items() if self.round > v[2] or v[1] <= 0]:
            del self._backlog[key]
        for _ in range(self.config.eager_fanout):
            if not self._backlog:
                return
            peer = self._pick(self.my_group)
            if peer is None:
                return
            b = Builder(self.config.max_datagram)
            sent: list[bytes] = []
            for key, (rec, _left, _until, sender) in self._backlog.items():
                if peer.key in (sender, rec.key):
                    continue
                if not self._add_record(b, rec):
                    break
                sent.append(key)
            if not sent or not self._send(b, peer, now):
                return  # out of budget: the rest waits
            for key in sent:
                item = self._backlog[key]
                item[1] -= 1
                if item[1] <= 0:
                    del self._backlog[key]

    def _offer_home(self, b: Builder, groups: list[int], requester: bytes) -> None:
        """Members of the groups a peer must publish its record to (two each)."""
        for g in groups[:4]:
            if g >= 1 << self.config.group_bits:
                continue
            for c in self.cache.contacts(g, 3)[:2]:
                if c.record.key != requester and not self._add_record(b, c.record):
                    return

    def _offer_contacts(self, b: Builder, need: bytes, requester: bytes) -> None:
        cfg = self.config
        members = self.cache.members
        limit = 1 << cfg.group_bits
        groups = [
            g
            for i, byte in enumerate(need)
            if byte
            for j in _BITS[byte]
            if (g := i * 8 + j) < limit and members[g]
        ]
        if not groups:
            return
        self.rng.shuffle(groups)
        for g in groups[: cfg.contact_offers]:
            rec = self._heard_member(g, requester)
            if rec is not None and not self._add_record(b, rec):
                return

    def _heard_member(self, group: int, exclude: bytes) -> NodeRecord | None:
        """Of a few random members of ``group``, the one heard from last (a group's own
        members know it best)."""
        pool = self.cache.members_list(group)
        entries = self.cache.entries
        best: NodeRecord | None = None
        best_seen = -1.0
        n = len(pool)
        rnd = self.rng.random
        for k in (pool if n <= 6 else [pool[int(rnd() * n)] for _ in range(6)]):
            if k in (self.key, exclude):
                continue
            e = entries[k]
            if e.rumour:
                continue
            seen = e.last_heard or 0.0
            if seen > best_seen:
                best, best_seen = e.record, seen
        return best

    def _on_relay(self, payload: bytes, pk: bytes, sender: bytes, src: str, now: float) -> None:
        """Store a newcomer's record in its home groups on its behalf (rate limited). The
        newcomer sends it with one hop left; a relayer missing contacts for some home group
        passes it once to the best-known member of its own group."""
        if self._relays_left <= 0 or len(payload) < 2:
            self._count("drop_relayrate")
            return
        hops = payload[0]
        rec = self._accept(payload[1:], src, pk, now)
        if rec is None or (hops > 0 and rec.key != sender):
            return  # first hop: only a node's own record
        last = self._relay_seen.get(rec.key)
        if last is not None and self.round - last < 3:
            return
        self._relays_left -= 1
        missing = self._store_for(rec, 3, now)
        if missing and hops > 0:
            peer = self._forwarder({rec.key, sender})
            if peer is not None:
                b = Builder(self.config.max_datagram)
                b.add(Sec.RELAY, bytes((hops - 1,)) + rec.raw)
                self._send(b, peer, now)

    def _store_for(self, rec: NodeRecord, per_group: int, now: float) -> bool:
        """Hand a newcomer's record to ``per_group`` contacts in each of its home groups
        (ours, if one, gets it by eager push when accepted); True if some group got none."""
        self._relay_seen[rec.key] = self.round
        if len(self._relay_seen) > 1024:
            self._relay_seen.clear()
        missing = False
        for g in rec.homes(self.config.group_bits):
            if g == self.my_group:
                continue
            sent = 0
            for c in self.cache.contacts(g, per_group):
                if c.record.key != rec.key:
                    b = Builder(self.config.max_datagram)
                    b.add(Sec.RECORD, rec.raw)
                    sent += self._send(b, c.record, now)
            missing = missing or not sent
        return missing

    def _on_dead(self, items: list[tuple[bytes, int]], sender: bytes, now: float) -> None:
        """Claims are hints: a home copy (which we answer lookups from) is probed first-hand and
        removed only if the probe fails; a mere cache copy is dropped at once, with a
        tombstone, so a false claim cannot make room for a replay of an older version (the
        node comes back with its next record, or as soon as it talks to us)."""
        cfg = self.config
        if self._deaf:
            until = self._deaf.get(sender)
            if until is not None and until > now:
                self._count("drop_claims")
                return
        for k, seq in items[: cfg.max_dead]:
            if k == self.key:
                # peers think we are dead: a newer record supersedes every tombstone of the
                # old one (SWIM's refutation, seq as the incarnation number). Two claimers,
                # at most once per refute_rounds, so one liar cannot keep us re-signing.
                if seq >= self.local.seq:
                    self._claimers[sender] = self.round
                    recent = [c for c, r in self._claimers.items() if self.round - r < 10]
                    if len(recent) >= 2 and self.round >= self._refuted + cfg.refute_rounds:
                        self._refuted = self.round
                        self._claimers.clear()
                        self._count("refuted")
                        self._resign(now)
                    if len(self._claimers) > 64:
                        self._claimers.clear()
                continue
            if k == sender:
                continue
            e = self.cache.entries.get(k)
            if e is None or e.record.seq != seq:
                continue
            if e.last_heard is not None and now - e.last_heard < 2 * cfg.interval:
                continue
            if e.home:
                # only some of the group checks each claim: a claim must not turn the whole
                # group against one node (its acks are budgeted like everything else)
                if (
                    k not in self._suspects
                    and len(self._suspects) < 64
                    and self.rng.random() < cfg.claim_probe_share
                ):
                    self._suspects[k] = sender
            else:
                self.cache.remove(k, now, tomb=True)
                self._emit_removed(e.record.node_id, "reported-dead")

    def _no_answer(self, key: bytes, kind: str, now: float) -> None:
        if kind == "publish":
            self._publish_due = min(self._publish_due, self.round + 1)
            self._publish_wait = 1
        n = self.cache.failed(key)
        if n >= self.config.fail_limit:
            self._claims.pop(key, None)
            self._declare_dead(key, now)
        elif n > 0 and len(self._suspects) < 64:
            self._suspects[key] = self._claims.pop(key, None)  # probe again next round

    def _declare_dead(self, key: bytes, now: float) -> None:
        """First-hand: we got no answer. Remove, remember, tell the group and the homes."""
        rec = self.cache.remove(key, now, tomb=True)
        self._suspects.pop(key, None)
        if rec is None:
            return
        self._count("declared_dead")
        self._emit_removed(rec.node_id, "unreachable")
        self._dead[key] = [rec.seq, self.config.dead_transmissions]
        if len(self._dead) > 128:
            del self._dead[next(iter(self._dead))]
        if id_group(rec.node_id, self.config.group_bits) != self.my_group:
            return
        for g in rec.homes(self.config.group_bits):
            if g == self.my_group:
                continue
            cs = self.cache.contacts(g, 1)
            if cs:
                b = Builder(self.config.max_datagram)
                b.add(Sec.DEAD, wire.digests([(key, rec.seq)]))
                self._send(b, cs[0].record, now)

    def _emit_removed(self, node_id: bytes, reason: str) -> None:
        if self.config.emit_peer_events:
            self._events.append(PeerRemoved(node_id, reason))

    def _drain_dropped(self) -> None:
        """Evictions the cache made on its own become PeerRemoved events."""
        dropped = self.cache.dropped
        if dropped:
            if self.config.emit_peer_events:
                for rec in dropped:
                    self._events.append(PeerRemoved(rec.node_id, "evicted"))
            dropped.clear()

    # -- lookups ---------------------------------------------------------------------------

    def _on_lookup(self, q: wire.Lookup, pk: bytes, addr: Addr, now: float) -> None:
        """Answer from our cache; a settled member of the home group answers authoritatively;
        anyone else with hops left passes it on (to its contacts in the home group, else to a
        well-known member of its own group), and whoever knows answers the origin directly."""
        cfg = self.config
        gk = _group_key(q.key, cfg.group_bits)
        if gk is None:
            try:
                route = normalize_route(q.key)
            except RecordError:
                return
        else:
            route = q.key
        direct = q.origin_pk is None
        origin_pk, origin_addr = (pk, addr) if direct else (q.origin_pk, q.origin_addr)
        if origin_pk is None or origin_addr is None or origin_pk == self.identity.public_key:
            return
        g = route_group(route, cfg.group_bits) if gk is None else gk
        found = (
            self.cache.lookup(route)
            if gk is None and (not q.home_only or g == self.my_group)
            else []
        )
        b = Builder(cfg.max_datagram)
        if gk is not None and g == self.my_group:
            # "anyone in group g?": we are; here is our record, so the asker can use us
            b.add(Sec.ANSWER, wire.encode_answer(q.qid, Answer.UNSURE))
            b.add(Sec.RECORD, self.local.raw)
        elif found:
            b.add(Sec.ANSWER, wire.encode_answer(q.qid, Answer.FOUND))
            for rec in found[: cfg.lookup_records]:
                if not b.add(Sec.RECORD, rec.raw):
                    break
        elif g == self.my_group and self.settled and q.hops == 0:
            b.add(Sec.ANSWER, wire.encode_answer(q.qid, Answer.NOT_FOUND))
        elif q.hops > 0 and self._forward_lookup(q, route, g, origin_pk, origin_addr, now):
            # (a member without the record asks other members: news takes a few rounds to
            # reach the whole group, and one miss must not fail the lookup)
            if not direct:
                return
            b.add(Sec.ANSWER, wire.encode_answer(q.qid, Answer.FORWARDED))
        elif direct:
            b.add(Sec.ANSWER, wire.encode_answer(q.qid, Answer.UNSURE))
        else:
            return
        b.content = False  # someone waits on this: it may use the control reserve
        self._send_to(b, origin_pk, origin_addr, now)

    def _forward_lookup(
        self, q: wire.Lookup, route: str, group: int, origin_pk: bytes, origin_addr: Addr,
        now: float,
    ) -> bool:
        """Pass a lookup on with one hop less: to our best contacts in ``group`` or, with
        none, to the best-known member of our own group."""
        hops = q.hops - 1
        fwd = wire.encode_lookup(
            wire.Lookup(q.qid, hops, route, origin_pk, origin_addr, q.home_only)
        )
        targets = [
            c.record for c in self.cache.contacts(group, self.config.lookup_fanout + 1)
            if c.record.public_key != origin_pk and c.record.key not in self._suspects
        ]
        if not targets and hops > 0:
            peer = self._forwarder({node_id_of(origin_pk)[:KEY_SIZE]})
            if peer is not None:
                targets.append(peer)
        sent = False
        for t in targets:
            b = Builder(self.config.max_datagram)
            b.add(Sec.LOOKUP, fwd)
            sent = self._send(b, t, now) or sent
        return sent

    def _forwarder(self, exclude: set[bytes]) -> NodeRecord | None:
        """Who to ask to forward a lookup: among a few members of our own group (the peers
        whose liveness we know best) and our seeds, one heard from lately whose record is not
        new (a long-lived node knows the mesh; a newcomer like us may know nobody yet)."""
        cfg = self.config
        entries = self.cache.entries
        pool = self.cache.members_list(self.my_group)
        cands: list[bytes] = []
        if len(pool) > 1:
            cands.extend(pool[self.rng.randrange(len(pool))] for _ in range(8))
        for seed in self._seeds:
            if seed.public_key is not None:
                cands.append(node_id_of(seed.public_key)[:KEY_SIZE])
        settled_before = (self._now - cfg.hot_window) * 1000
        best: NodeRecord | None = None
        best_score = (-1, -1.0)
        for k in cands:
            e = entries.get(k)
            if e is None or k == self.key or k in exclude or k in self._suspects:
                continue
            if e.record.gossip_addr is None:
                continue
            score = (int(e.record.seq < settled_before), e.last_heard or 0.0)
            if score > best_score:
                best, best_score = e.record, score
        return best if best is not None else self._live_peer(exclude)

    def _on_answers(
        self,
        answers: list[tuple[int, int]],
        got: list[NodeRecord],
        sender: bytes,
        pk: bytes,
        addr: Addr,
        now: float,
    ) -> None:
        for qid, status in answers:
            st = self._lookups.get(qid)
            if st is None:
                continue
            if st.internal:
                if id_group(sender, self.config.group_bits) == st.group:
                    # a live member of a home group we knew nobody in: publish to it
                    self._finish_lookup(st)
                    b = Builder(self.config.max_datagram)
                    nonce = self.rng.getrandbits(32)
                    b.add(Sec.PING, wire.encode_u32(nonce))
                    b.add(Sec.RECORD, self.local.raw)
                    if self._send_to(b, pk, addr, now):
                        self._pending[nonce] = _Pending(sender, now, "publish", addr)
                    continue
                st.records.clear()
            for rec in got:
                if st.route in rec.routes:
                    st.records[rec.key] = rec
            if st.records:
                self._finish_lookup(st)
                continue
            st.tried.add(sender)
            if st.waiting.pop(sender, None) is not None and status == Answer.FORWARDED:
                st.forwarded = True
            # a "no" does not end the attempt early: a record can be a few hops short of
            # full coverage in its group, and the next attempt half a second later finds it

    def _lookup_attempt(self, st: _Lookup, now: float) -> None:
        """Ask up to ``lookup_fanout`` contacts in the home group at once (or, without any,
        a live peer who forwards); silent contacts count as failures."""
        cfg = self.config
        if st.deadline <= now:
            for key, hops in st.waiting.items():
                if hops == 1:
                    self._no_answer(key, "lookup", now)  # a contact that said nothing
        st.waiting.clear()
        st.forwarded = False
        if st.attempts >= cfg.lookup_attempts or now >= st.give_up:
            self._finish_lookup(st)
            return
        st.attempts += 1
        st.deadline = now + cfg.lookup_timeout
        if st.group == self.my_group and self.settled and st.attempts == 1:
            for r in self.cache.lookup(st.route):
                st.records[r.key] = r
            if st.records:
                self._finish_lookup(st)
                return
        targets: list[NodeRecord] = []
        for e in self.cache.contacts(st.group, cfg.lookup_fanout + len(st.tried) + 2):
            k = e.record.key
            if k not in st.tried and k not in self._suspects:
                targets.append(e.record)
                if len(targets) >= cfg.lookup_fanout:
                    break
        asks = [(t, 1) for t in targets]  # one hop: an unsynced member may pass it on
        if len(targets) < cfg.lookup_fanout or st.attempts > 1:
            # few or failing contacts: also ask a well-known peer to forward into the group
            peer = self._forwarder(st.tried | {t.key for t in targets})
            if peer is not None:
                asks.append((peer, 2))
        if not asks:
            st.attempts -= 1  # nobody to ask yet (still bootstrapping): wait, up to give_up
            return
        for t, hops in asks:
            b = Builder(cfg.max_datagram)
            q = wire.Lookup(st.qid, hops, st.route, home_only=st.internal)
            b.add(Sec.LOOKUP, wire.encode_lookup(q))
            if self._send(b, t, now):
                st.tried.add(t.key)
                st.waiting[t.key] = hops

    def _finish_lookup(self, st: _Lookup) -> None:
        self._lookups.pop(st.qid, None)
        if st.internal:
            return
        recs = tuple(st.records.values())
        self._events.append(LookupCompleted(st.qid, st.route, recs, bool(recs)))

    # -- misc ------------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n
