"""The host cache: verified node records this node knows, bounded and scored.

It answers the routing layer (which nodes serve ``example.net`` or ``bob@example.net``) and
feeds gossip (members of a group, anti-entropy pages, contacts). Records arrive already
verified (RecordCodec); the cache only decides whether to keep them.

Bounds and flood resistance: at most ``capacity`` records; at most ``source_quota`` of them
learned from one source (an IP address, or a /64 for IPv6); when full, the victim is the least
useful of a few randomly sampled entries, never a record this node stores for its own group
("home" records) while other entries remain. Random sampling means a flood cannot aim
evictions at chosen honest entries.

Tombstones remember (key, seq) of records removed as dead, so gossip does not bring back that
version; a newer seq from the node itself passes.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import random
from collections import OrderedDict, deque
from dataclasses import dataclass
from itertools import repeat

from freecall.peering.records import (
    KEY_SIZE,
    NodeRecord,
    RecordCodec,
    RecordError,
    fine_bucket,
    id_group,
    normalize_domain,
    normalize_route,
)
from freecall.peering.wire import digests
from freecall.storage import atomic_write

FINE_BUCKETS = 64
CACHE_FILE = "hostcache.json"
_EVICT_SAMPLE = 8


class CacheEntry:
    """A record plus what this node observed about it (never sent to others)."""

    __slots__ = (
        "added", "failures", "group", "home", "last_heard", "record", "rumour", "source"
    )

    def __init__(
        self, record: NodeRecord, home: bool, group: int, source: str | None, now: float
    ) -> None:
        self.record = record
        self.home = home
        self.group = group
        self.source = source
        self.added = now
        self.last_heard: float | None = None
        self.failures = 0
        self.rumour = False
        """Only known from a rumour (in nearly every cache): never a contact or a partner
        until heard from directly, or everyone would pick the same few nodes."""

    def score(self) -> float:
        """Usefulness for eviction and ranking: recent direct contact first, failures last."""
        base = self.last_heard if self.last_heard is not None else self.added - 300.0
        return base - 600.0 * self.failures


@dataclass(frozen=True, slots=True)
class Tomb:
    """A record version removed as dead, remembered until the record would have expired."""

    seq: int
    until: float
    record: NodeRecord


@dataclass(frozen=True, slots=True)
class Prepared:
    """Records with their keys, home flags and groups computed for one group's caches."""

    records: list[NodeRecord]
    keys: list[bytes]
    homes: list[bool]
    groups: list[int]
    expiry: float
    by_group: list[tuple[int, list[bytes]]] | None = None
    """Keys by group (filled by :meth:`HostCache.prepare` for templates loaded many times)."""
    fine: list[tuple[int, dict[bytes, int]]] | None = None
    """Home records' key -> seq by anti-entropy bucket (likewise)."""


_MIX = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def digest_hash(key: bytes, seq: int) -> int:
    """64-bit hash of one (key, seq) digest for the slice summaries: the key is already
    uniform (a hash of the public key); the seq goes through an odd multiplier, so two
    versions of one record always hash apart."""
    return int.from_bytes(key, "big") ^ ((seq * _MIX) & _M64)


def source_of(host: str) -> str:
    """Quota bucket of a sender address: the IP, or its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class HostCache:
    """Bounded store of verified records with indexes for routing and gossip.

    ``group_bits`` and ``my_group`` describe the node's place in the mesh (see gossip): records
    homed in ``my_group`` are "home" records, kept in preference and compared in anti-entropy.
    With ``my_group=None`` every record is an ordinary cache entry.
    """

    __slots__ = (
        "_by_route", "_fine_hash", "_keys_memo", "_need",
        "_need_dirty", "_page_bytes", "_page_sets", "_pages", "_summaries", "by_source",
        "capacity", "contacts_min", "counters", "dropped", "entries", "group_bits",
        "home_count", "home_fine", "home_version", "max_tombs", "members", "my_group",
        "next_expiry", "protected", "rng", "source_quota", "tombs", "version"
    )

    def __init__(
        self,
        *,
        rng: random.Random,
        capacity: int = 4096,
        group_bits: int = 6,
        my_group: int | None = None,
        source_quota: int | None = None,
        contacts_min: int = 2,
        max_tombs: int = 1024,
    ) -> None:
        if not 0 <= group_bits <= 16:
            raise ValueError("group_bits must be 0..16")
        self.rng = rng
        self.capacity = capacity
        self.group_bits = group_bits
        self.my_group = my_group
        self.source_quota = source_quota if source_quota is not None else max(64, capacity // 16)
        self.contacts_min = contacts_min
        self.max_tombs = max_tombs
        self.entries: dict[bytes, CacheEntry] = {}
        self._by_route: dict[str, list[bytes]] | None = None  # built on first lookup
        self.members: list[list[bytes]] = [[] for _ in range(1 << group_bits)]
        """Keys of cached nodes by their own group, in insertion order (lists, not sets:
        iteration order must not depend on hash seeds, or simulations would not repeat; not
        dicts either: a node holds 2**group_bits of them, mostly of two or three keys, and a
        list is a third of the memory and sampled at random without a copy)."""
        self.home_fine: list[dict[bytes, int]] = [{} for _ in range(FINE_BUCKETS)]
        """Home records by anti-entropy bucket: key -> seq (pages are built from this)."""
        self.home_count = 0
        self.home_version = 0
        """Bumped whenever a home record comes, goes or changes (anti-entropy page memos)."""
        self._pages: dict[tuple[int, int], tuple[int, list[tuple[bytes, int]]]] = {}
        self._page_sets: dict[tuple[int, int], tuple[int, frozenset[tuple[bytes, int]]]] = {}
        self._page_bytes: dict[tuple[int, int], tuple[int, bytes]] = {}
        self._fine_hash: list[int | None] = [None] * FINE_BUCKETS
        """XOR of :func:`digest_hash` over each fine bucket's home records (None: stale)."""
        self._summaries: dict[int, tuple[int, bytes]] = {}
        self.by_source: dict[str, dict[bytes, None]] = {}
        self.tombs: OrderedDict[bytes, Tomb] = OrderedDict()
        self.protected: set[bytes] = set()
        self.next_expiry = float("inf")
        self.counters: dict[str, int] = {}
        self.version = 0
        """Bumped on every insert and removal (lets callers cache derived views)."""
        self.dropped: list[NodeRecord] = []
        """Records evicted to make room, until the owner (gossip) drains them into events."""
        self._need: tuple[int, bytes] = (-1, b"")
        self._need_dirty = True
        self._keys_memo: tuple[int, list[bytes]] = (-1, [])

    def set_group(self, my_group: int | None) -> None:
        """Place this cache's node in a group; home flags and indexes follow."""
        if my_group == self.my_group:
            return
        self.my_group = my_group
        self._need_dirty = True
        for key, e in list(self.entries.items()):
            self._unindex(key, e)
            e.home = self.is_home(e.record)
            self._index(key, e)

    def prepare(self, records: list[NodeRecord]) -> Prepared:
        """Precompute what :meth:`bulk_load` needs; reusable for every cache of the same
        group (the simulator loads one group's home records into all its members)."""
        bits = self.group_bits
        my_group = self.my_group
        shift = 32 - bits if bits else 32
        keys = [r.key for r in records]
        homes = [my_group is not None and my_group in r.homes(bits) for r in records]
        groups = [int.from_bytes(k[:4], "big") >> shift for k in keys]
        by_group: dict[int, list[bytes]] = {}
        fine: dict[int, dict[bytes, int]] = {}
        for k, g, h, r in zip(keys, groups, homes, records, strict=True):
            by_group.setdefault(g, []).append(k)
            if h:
                fine.setdefault(k[7] & 63, {})[k] = r.seq
        return Prepared(
            records,
            keys,
            homes,
            groups,
            min((r.expires for r in records), default=float("inf")),
            list(by_group.items()),
            list(fine.items()),
        )

    def bulk_load(self, records: list[NodeRecord] | Prepared, now: float) -> None:
        """Add verified, unexpired, distinct records (simulator warm start) in one sweep;
        falls back to :meth:`put` whenever one of put's checks could matter."""
        p = records if isinstance(records, Prepared) else self.prepare(records)
        entries = self.entries
        if (
            self._by_route is not None
            or self.tombs
            or len(p.records) > self.capacity - len(entries)
            or not entries.keys().isdisjoint(p.keys)
        ):
            for r in p.records:
                self.put(r, now)
            return
        ents = list(map(CacheEntry, p.records, p.homes, p.groups, repeat(None), repeat(now)))
        entries.update(zip(p.keys, ents, strict=True))
        members = self.members
        home_fine = self.home_fine
        self._need_dirty = True
        if p.by_group is not None:
            for g, ks in p.by_group:
                members[g].extend(ks)
        else:  # members[g].append(k) for each key, in order, without a bytecode per key
            deque(map(list.append, map(members.__getitem__, p.groups), p.keys), maxlen=0)
        homes = sum(p.homes)
        fine_hash = self._fine_hash
        if p.fine is not None:
            for f, seqs in p.fine:
                home_fine[f].update(seqs)
                fine_hash[f] = None
        elif homes:
            for k, h, r in zip(p.keys, p.homes, p.records, strict=True):
                if h:
                    home_fine[k[7] & 63][k] = r.seq
                    fine_hash[k[7] & 63] = None
        self.home_count += homes
        self.home_version += 1
        self.next_expiry = min(self.next_expiry, p.expiry)
        self.version += 1

    # -- queries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def get(self, key: bytes) -> NodeRecord | None:
        """Record by node id (16 bytes) or internal key (8 bytes)."""
        e = self.entries.get(key[:KEY_SIZE])
        if e is None or e.record.node_id[: len(key)] != key:
            return None
        return e.record

    def entry(self, key: bytes) -> CacheEntry | None:
        """Entry (record and observations) by internal key."""
        return self.entries.get(key[:KEY_SIZE])

    def records(self) -> list[NodeRecord]:
        """All records (a copy)."""
        return [e.record for e in self.entries.values()]

    def _routes(self) -> dict[str, list[bytes]]:
        """Route index, built on first use and kept up to date afterwards."""
        idx = self._by_route
        if idx is None:
            idx = self._by_route = {}
            for key, e in self.entries.items():
                for r in e.record.routes:
                    lst = idx.get(r)
                    if lst is None:
                        idx[r] = [key]
                    else:
                        lst.append(key)
        return idx

    def lookup(self, route: str) -> list[NodeRecord]:
        """Records serving exactly this route, best first (recently heard, fewest failures)."""
        try:
            norm = normalize_route(route)
        except RecordError:
            return []
        keys = self._routes().get(norm)
        if not keys:
            return []
        found = [self.entries[k] for k in keys]
        found.sort(key=lambda e: (-e.score(), -e.record.seq))
        return [e.record for e in found]

    def lookup_domain(self, domain: str) -> list[NodeRecord]:
        """Records of nodes serving a domain."""
        try:
            return self.lookup(normalize_domain(domain))
        except RecordError:
            return []

    def lookup_user(self, address: str) -> list[NodeRecord]:
        """Records for ``user@domain``: nodes serving that address first, then the domain's."""
        if "@" not in address:
            return self.lookup_domain(address)
        out = self.lookup(address)
        seen = {r.key for r in out}
        out.extend(r for r in self.lookup_domain(address.rpartition("@")[2]) if r.key not in seen)
        return out

    def contacts(self, group: int, limit: int = 3) -> list[CacheEntry]:
        """Best known members of a group (for lookups and contact offers)."""
        ms = self.members[group]
        if not ms:
            return []
        entries = self.entries
        found = [e for e in (entries[k] for k in ms) if not e.rumour]
        found = [e for e in found if e.record.key not in self.protected]
        found.sort(key=lambda e: -e.score())
        return found[:limit]

    def need_bitmap(self) -> bytes:
        """Groups with fewer than ``contacts_min`` members cached, one bit each (recomputed
        only when some group's member count crossed the threshold)."""
        if not self._need_dirty:
            return self._need[1]
        self._need_dirty = False
        groups = 1 << self.group_bits
        out = bytearray((groups + 7) // 8)
        cmin = self.contacts_min
        for g, ms in enumerate(self.members):
            if len(ms) - (g == self.my_group) < cmin:  # our own group: not counting ourselves
                out[g >> 3] |= 0x80 >> (g & 7)
        self._need = (self.version, bytes(out))
        return self._need[1]

    def keys_list(self) -> list[bytes]:
        """All keys as a list, rebuilt only when the cache changed (for random sampling)."""
        memo = self._keys_memo
        if memo[0] != self.version:
            memo = self._keys_memo = (self.version, list(self.entries))
        return memo[1]

    def members_list(self, group: int) -> list[bytes]:
        """Keys of a group's members (the cache's own list: read only)."""
        return self.members[group]

    def home_page(self, sub_bits: int, index: int) -> list[tuple[bytes, int]]:
        """(key, seq) of the home records in one anti-entropy page (fine buckets in range);
        remembered until a home record changes (in a quiet mesh pages repeat). Read only."""
        memo = self._pages.get((sub_bits, index))
        if memo is not None and memo[0] == self.home_version:
            return memo[1]
        width = FINE_BUCKETS >> sub_bits
        out: list[tuple[bytes, int]] = []
        for f in range(index * width, (index + 1) * width):
            out.extend(self.home_fine[f].items())
        self._pages[(sub_bits, index)] = (self.home_version, out)
        return out

    def home_page_set(self, sub_bits: int, index: int) -> frozenset[tuple[bytes, int]]:
        """:meth:`home_page` as a set (the in-sync test of anti-entropy), remembered too."""
        memo = self._page_sets.get((sub_bits, index))
        if memo is not None and memo[0] == self.home_version:
            return memo[1]
        out = frozenset(self.home_page(sub_bits, index))
        self._page_sets[(sub_bits, index)] = (self.home_version, out)
        return out

    def adopt_pages(self, other: HostCache) -> bool:
        """Share ``other``'s remembered anti-entropy pages if both hold exactly the same home
        records (the simulator's warm start: all members of a group do); True if shared.
        The pages are read only, so sharing them is safe until either cache changes."""
        if self.home_count != other.home_count or self.home_fine != other.home_fine:
            return False
        mine, theirs = self.home_version, other.home_version
        self._pages = {k: (mine, v) for k, (ver, v) in other._pages.items() if ver == theirs}
        self._page_sets = {
            k: (mine, v) for k, (ver, v) in other._page_sets.items() if ver == theirs
        }
        self._page_bytes = {
            k: (mine, v) for k, (ver, v) in other._page_bytes.items() if ver == theirs
        }
        self._fine_hash = list(other._fine_hash)
        self._summaries = {
            k: (mine, v) for k, (ver, v) in other._summaries.items() if ver == theirs
        }
        return True

    def home_page_bytes(self, sub_bits: int, index: int) -> bytes:
        """:meth:`home_page` encoded as PAGE digests (what a complete page carries; equal
        bytes from a member mean the same page), remembered too."""
        memo = self._page_bytes.get((sub_bits, index))
        if memo is not None and memo[0] == self.home_version:
            return memo[1]
        out = digests(self.home_page(sub_bits, index))
        self._page_bytes[(sub_bits, index)] = (self.home_version, out)
        return out

    def home_summary(self, sub_bits: int) -> bytes:
        """One u32 per anti-entropy slice: the XOR of :func:`digest_hash` over the slice's
        home records (what a SUMMARY carries; a member whose slice hashes to the same value
        holds the same versions, but for a 2**-32 chance). Kept per fine bucket and redone
        only where a home record changed, so it costs little even under churn."""
        memo = self._summaries.get(sub_bits)
        if memo is not None and memo[0] == self.home_version:
            return memo[1]
        fh = self._fine_hash
        fine = self.home_fine
        for f in range(FINE_BUCKETS):
            if fh[f] is None:
                x = 0
                for k, seq in fine[f].items():
                    x ^= digest_hash(k, seq)
                fh[f] = x
        width = FINE_BUCKETS >> sub_bits
        out = bytearray()
        for i in range(0, FINE_BUCKETS, width):
            x = 0
            for f in range(i, i + width):
                x ^= fh[f]  # type: ignore[operator]
            out += ((x ^ (x >> 32)) & 0xFFFFFFFF).to_bytes(4, "big")
        res = bytes(out)
        self._summaries[sub_bits] = (self.home_version, res)
        return res

    def home_keys_in_page(self, sub_bits: int, index: int) -> dict[bytes, int]:
        """Keys (and seqs) of the home records in one anti-entropy page."""
        width = FINE_BUCKETS >> sub_bits
        out: dict[bytes, int] = {}
        for f in range(index * width, (index + 1) * width):
            out.update(self.home_fine[f])
        return out

    def is_home(self, record: NodeRecord) -> bool:
        """True if this node stores the record for its group."""
        return self.my_group is not None and self.my_group in record.homes(self.group_bits)

    def tombstoned(self, key: bytes, seq: int) -> bool:
        """True if this version (or an older one) of the record was removed as dead."""
        t = self.tombs.get(key)
        return t is not None and seq <= t.seq

    # -- updates ---------------------------------------------------------------------------

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def put(self, record: NodeRecord, now: float, source: str | None = None) -> str:
        """Offer a verified record. Returns added, updated, same, stale, tomb, collision, quota
        or full. The caller checks signature and expiry first (RecordCodec, check_time)."""
        key = record.key
        old = self.entries.get(key)
        if old is not None:
            if old.record.raw == record.raw:
                return "same"
            if old.record.public_key != record.public_key:
                self._count("collision")
                return "collision"
            if not record.newer_than(old.record):
                return "stale"
            self._replace(old, record, now)
            return "updated"
        tomb = self.tombs.get(key)
        if tomb is not None:
            if record.seq <= tomb.seq:
                return "tomb"
            del self.tombs[key]
        home = self.is_home(record)
        if (
            source is not None
            and len(self.by_source.get(source, ())) >= self.source_quota
            and not self._evict_from(self.by_source[source])
        ):
            self._count("quota")
            return "quota"
        if len(self.entries) >= self.capacity and not self._evict(home):
            self._count("full")
            return "full"
        e = CacheEntry(record, home, id_group(record.node_id, self.group_bits), source, now)
        self._index(key, e)
        return "added"

    def _index(self, key: bytes, e: CacheEntry) -> None:
        self.version += 1
        self.entries[key] = e
        idx = self._by_route
        if idx is not None:
            for r in e.record.routes:
                lst = idx.get(r)
                if lst is None:
                    idx[r] = [key]
                else:
                    lst.append(key)
        ms = self.members[e.group]
        ms.append(key)  # absent: members hold exactly the entries' keys
        n, cmin = len(ms), self.contacts_min
        if n == cmin or (n == cmin + 1 and e.group == self.my_group):  # crossed upwards
            self._need_dirty = True
        if e.home:
            fb = fine_bucket(key)
            self.home_fine[fb][key] = e.record.seq
            self._fine_hash[fb] = None
            self.home_count += 1
            self.home_version += 1
        if e.source is not None:
            s = self.by_source.get(e.source)
            if s is None:
                self.by_source[e.source] = {key: None}
            else:
                s[key] = None
        self.next_expiry = min(self.next_expiry, e.record.expires)

    def _unindex(self, key: bytes, e: CacheEntry) -> None:
        self.version += 1
        del self.entries[key]
        idx = self._by_route
        if idx is not None:
            for r in e.record.routes:
                lst = idx.get(r)
                if lst is not None:
                    if key in lst:
                        lst.remove(key)
                    if not lst:
                        del idx[r]
        ms = self.members[e.group]
        ms.remove(key)  # O(group size), but removals are rare next to reads
        n, cmin = len(ms), self.contacts_min
        if n == cmin - 1 or (n == cmin and e.group == self.my_group):  # crossed downwards
            self._need_dirty = True
        if e.home:
            fb = fine_bucket(key)
            self.home_fine[fb].pop(key, None)
            self._fine_hash[fb] = None
            self.home_count -= 1
            self.home_version += 1
        if e.source is not None:
            s = self.by_source.get(e.source)
            if s is not None:
                s.pop(key, None)
                if not s:
                    del self.by_source[e.source]

    def _replace(self, e: CacheEntry, record: NodeRecord, now: float) -> None:
        key = record.key
        if record.routes == e.record.routes:
            e.record = record
            if e.home:
                fb = fine_bucket(key)
                self.home_fine[fb][key] = record.seq
                self._fine_hash[fb] = None
                self.home_version += 1
            self.version += 1
            self.next_expiry = min(self.next_expiry, record.expires)
            return
        self._unindex(key, e)
        e.record = record
        was_home, e.home = e.home, self.is_home(record)
        if was_home != e.home:
            e.added = now
        self._index(key, e)

    def remove(self, key: bytes, now: float, *, tomb: bool = False) -> NodeRecord | None:
        """Forget a record; with ``tomb`` remember its version as dead until it would expire."""
        e = self.entries.get(key)
        if e is None:
            return None
        self._unindex(key, e)
        if tomb:
            self.add_tomb(e.record)
        return e.record

    def add_tomb(self, record: NodeRecord) -> None:
        """Remember ``record`` as dead (bounded, oldest forgotten first)."""
        self.tombs[record.key] = Tomb(record.seq, float(record.expires), record)
        self.tombs.move_to_end(record.key)
        while len(self.tombs) > self.max_tombs:
            self.tombs.popitem(last=False)

    def lift_tomb(self, key: bytes, now: float) -> NodeRecord | None:
        """The node proved alive: forget its tombstone and restore its record if unexpired."""
        t = self.tombs.pop(key, None)
        if t is None or t.record.expires <= now:
            return None
        if self.put(t.record, now) in ("added", "updated"):
            return t.record
        return None

    def _drop(self, e: CacheEntry) -> None:
        self._unindex(e.record.key, e)
        self.dropped.append(e.record)
        self._count("evicted")

    def _evict_from(self, keys: dict[bytes, None]) -> bool:
        """Make room inside one source's quota: drop its least useful non-home entry."""
        cands = [
            e for e in (self.entries[k] for k in keys)
            if not e.home and e.record.key not in self.protected
        ]
        if not cands:
            return False
        sample = cands if len(cands) <= _EVICT_SAMPLE else self.rng.sample(cands, _EVICT_SAMPLE)
        self._drop(min(sample, key=CacheEntry.score))
        return True

    def _evict(self, incoming_home: bool) -> bool:
        """Drop the least useful of a few random non-home entries; spare scarce contacts."""
        keys = list(self.entries)
        best: CacheEntry | None = None
        for _ in range(4 * _EVICT_SAMPLE):
            e = self.entries[keys[self.rng.randrange(len(keys))]]
            if e.home or e.record.key in self.protected:
                continue
            if len(self.members[e.group]) <= self.contacts_min:
                continue  # a scarce contact: keep the way into its group
            if best is None or e.score() < best.score():
                best = e
        if best is None:
            if not incoming_home:
                return False
            others = [
                e for e in self.entries.values()
                if not e.home and e.record.key not in self.protected
            ]
            if not others:
                return False
            best = self.rng.choice(others)
        self._drop(best)
        return True

    def heard(self, key: bytes, now: float) -> None:
        """Direct, authenticated evidence that the node is alive."""
        e = self.entries.get(key)
        if e is not None:
            e.last_heard = now
            e.failures = 0
            e.rumour = False

    def failed(self, key: bytes) -> int:
        """A probe or exchange got no answer; returns the consecutive failure count."""
        e = self.entries.get(key)
        if e is None:
            return 0
        e.failures += 1
        return e.failures

    def expire(self, now: float) -> list[NodeRecord]:
        """Drop expired records and tombstones (cheap unless something is due)."""
        if now < self.next_expiry:
            return []
        gone = [e for e in self.entries.values() if e.record.expires <= now]
        for e in gone:
            self._unindex(e.record.key, e)
        self.next_expiry = min(
            (e.record.expires for e in self.entries.values()), default=float("inf")
        )
        for k in [k for k, t in self.tombs.items() if t.until <= now]:
            del self.tombs[k]
        return [e.record for e in gone]

    # -- control API and persistence -------------------------------------------------------

    def peers(self, now: float) -> list[dict[str, object]]:
        """The `/api/peers` view: node_id, addresses, routes, last_seen_s, relay,
        through_relay (``<relay node id>@<host>:<port>`` for a node reached through a relay)."""
        out = []
        for e in self.entries.values():
            s = e.record.summary()
            out.append({
                "node_id": s["node_id"],
                "addresses": s["addresses"],
                "routes": s["routes"],
                "last_seen_s": None if e.last_heard is None else round(now - e.last_heard, 1),
                "relay": s["relay"],
                "through_relay": s["through_relay"],
            })
        return out

    def to_json(self, now: float) -> bytes:
        """Serialized cache (records in their signed form, plus our observations)."""
        items = [
            {
                "record": base64.b64encode(e.record.raw).decode(),
                "last_heard": e.last_heard,
                "failures": e.failures,
            }
            for e in self.entries.values()
        ]
        doc = {"version": 1, "saved_at": now, "records": items}
        return json.dumps(doc, separators=(",", ":")).encode()

    def save(self, path: str | os.PathLike[str], now: float) -> None:
        """Persist atomically (``hostcache.json`` in the state directory)."""
        atomic_write(path, self.to_json(now))

    def load_json(self, data: bytes, codec: RecordCodec, now: float) -> int:
        """Add records from a saved cache: every one re-verified, expired ones skipped.

        A damaged or foreign file never raises; it just loads nothing. Returns the count.
        """
        try:
            doc = json.loads(data)
            items = doc["records"] if isinstance(doc, dict) else []
        except (ValueError, KeyError, TypeError):
            return 0
        n = 0
        if not isinstance(items, list):
            return 0
        for item in items:
            try:
                rec = codec.load(base64.b64decode(item["record"], validate=True))
                rec.check_time(now)
            except (RecordError, ValueError, KeyError, TypeError):
                continue
            if self.put(rec, now) in ("added", "updated"):
                e = self.entries[rec.key]
                lh = item.get("last_heard")
                if isinstance(lh, (int, float)) and lh <= now:
                    e.last_heard = float(lh)
                n += 1
        return n

    def load(self, path: str | os.PathLike[str], codec: RecordCodec, now: float) -> int:
        """Load ``path`` if it exists (see :meth:`load_json`)."""
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            return 0
        return self.load_json(data, codec, now)
