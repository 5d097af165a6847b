"""Discrete-event simulator: thousands of pure gossip nodes on virtual time, in one process.

A heap of (time, seq, node, datagram); no sockets, no tasks, no wall clock. The link model
gives each datagram a latency, drops some, and drops everything across a partition. Churn
kills nodes (they fall silent) and starts new ones that know only two seed addresses.
Everything random comes from one seeded ``random.Random``: the same seed gives the same run.

Crypto: by default every node verifies records with its own RecordCodec and derives real
X25519 MAC keys (``fast_crypto=False``). Large speed runs (``fast_crypto=True``) share one
codec between all nodes, so each distinct record is verified once in the whole simulation
instead of once per node, and replace the per-peer X25519 step by a hash (SimPairKeys); the
per-datagram MAC is still computed and checked. docs/peering.md states which run used what.

Run ``python -m freecall.peering.simulate --help``.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from freecall.peering import wire
from freecall.peering.gossip import (
    Addr,
    Event,
    Gossip,
    GossipConfig,
    KeyAgreement,
    LookupCompleted,
    PairKeys,
    PeerRemoved,
    SimPairKeys,
)
from freecall.peering.hostcache import HostCache, Prepared
from freecall.peering.records import (
    SIGN_CONTEXT,
    Address,
    AddrKind,
    NodeIdentity,
    NodeRecord,
    RecordCodec,
    RecordError,
    encode_body,
    id_group,
)
from freecall.peering.wire import Builder, Sec

START = 1_700_000_000.0
WARM_AGE = 600.0
"""Warm-start records were signed this long before the run starts (so they are not news)."""
UDP_IP_OVERHEAD = 28
"""IPv4 + UDP header bytes per datagram (wire figures add this to payload figures)."""


@dataclass(frozen=True)
class LinkModel:
    """One-way latency uniform in [latency_min, latency_max]; independent loss."""

    latency_min: float = 0.010
    latency_max: float = 0.120
    loss: float = 0.01


@dataclass(frozen=True)
class SimConfig:
    """A simulated mesh."""

    nodes: int = 1000
    seed: int = 1
    gossip: GossipConfig = field(
        default_factory=lambda: GossipConfig(emit_peer_events=False, capacity=2048)
    )
    link: LinkModel = field(default_factory=LinkModel)
    routes_per_node: int = 1
    fast_crypto: bool = False
    warm: bool = True
    contacts_per_group: int = 2
    keep_events: bool = False
    freeze_gc: bool = False
    """Disable the garbage collector during setup and rounds and freeze what they built (big
    runs: millions of long-lived objects and no reference cycles worth collecting)."""


class SimNode:
    """A simulated node: its gossip core, address and life."""

    __slots__ = ("addr", "alive", "born", "gossip", "index", "routes")

    def __init__(self, index: int, gossip: Gossip, addr: Addr, routes: tuple[str, ...],
                 born: int) -> None:
        self.index = index
        self.gossip = gossip
        self.addr = addr
        self.alive = True
        self.born = born
        self.routes = routes


@dataclass
class RoundTraffic:
    """Per-node traffic in one round, over live nodes (payload bytes and datagrams)."""

    round: int
    live: int
    sent_mean: float
    sent_p99: float
    sent_max: int
    recv_mean: float
    recv_p99: float
    recv_max: int
    wire_mean: float
    wire_p99: float
    wire_max: int
    datagrams_mean: float


def _pct(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, math.ceil(q * len(sorted_vals)) - 1))
    return float(sorted_vals[i])


def node_addr(i: int) -> Addr:
    """Simulated address of node ``i``."""
    return (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 5064)


def node_routes(i: int, per_node: int) -> tuple[str, ...]:
    """Routes node ``i`` serves: a mix of domains and user addresses."""
    dom = f"n{i}.sim"
    user = f"u{i}@d{i % 97}.sim"
    if per_node >= 2:
        return (dom, user)
    return (dom,) if i % 2 == 0 else (user,)


class Simulation:
    """The event loop and the measurements."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.now = START
        self.heap: list[tuple[float, int, int, bytes | None, Addr | None]] = []
        self.seq = 0
        self.timers: list[tuple[float, int, int]] = []
        """Round timers due after the current window: (time, seq, node)."""
        self.nodes: list[SimNode] = []
        self.by_addr: dict[Addr, int] = {}
        self.timer_at: list[float] = []
        self.sent: list[int] = []
        self.recv: list[int] = []
        self.dgrams: list[int] = []
        self.traffic: list[RoundTraffic] = []
        self.round = 0
        self.side: list[int] | None = None
        self.shared_codec = RecordCodec(capacity=None) if cfg.fast_crypto else None
        self.sim_ids: dict[bytes, tuple[int, bytes]] = {}
        self.lookups: dict[tuple[int, int], tuple[bytes, int, int, int]] = {}
        """(node, query id) -> (target key, round, target node, tag)"""
        self.lookup_results: list[tuple[int, bool]] = []
        self.lookup_detail: list[tuple[int, bool, int, bool]] = []
        """(round, found, tag, target still alive when the lookup ended)"""
        self.events: list[tuple[int, Event]] | None = [] if cfg.keep_events else None
        """Every event of every node, when ``keep_events`` (tests)."""
        self.on_deliver: Callable[[int, bytes, Addr], bool] | None = None
        """Test hook: return False to drop a datagram before delivery."""
        self.interval = cfg.gossip.interval
        collecting = gc.isenabled()
        if cfg.freeze_gc:
            gc.disable()  # millions of long-lived objects: generational GC only slows setup
        try:
            for _ in range(cfg.nodes):
                self.add_node(settled=cfg.warm)
            if cfg.warm:
                self.warm_start()
        finally:
            if cfg.freeze_gc and collecting:
                gc.enable()
        if cfg.freeze_gc:
            gc.freeze()  # keep the setup out of every later collection

    # -- population ------------------------------------------------------------------------

    def add_node(self, *, settled: bool, seeds: list[int] | None = None,
                 routes: tuple[str, ...] | None = None) -> int:
        """Create a node (its identity from the simulation's seed) and schedule its timer."""
        i = len(self.nodes)
        ident = NodeIdentity.from_seed(self.rng.randbytes(32))
        addr = node_addr(i)
        rts = routes if routes is not None else node_routes(i, self.cfg.routes_per_node)
        gcfg = self.cfg.gossip
        keys: KeyAgreement = (
            SimPairKeys(ident, self.sim_ids) if self.cfg.fast_crypto else PairKeys(ident)
        )
        cache = HostCache(
            rng=random.Random(self.rng.getrandbits(64)),
            capacity=gcfg.capacity,
            group_bits=gcfg.group_bits,
            source_quota=gcfg.source_quota,
            contacts_min=gcfg.contacts_min,
        )
        born = self.now - WARM_AGE if settled else self.now
        g = Gossip(
            ident,
            now=born,
            rng=random.Random(self.rng.getrandbits(64)),
            addresses=(
                Address(AddrKind.GOSSIP, addr[0], addr[1]),
                Address(AddrKind.SIP_TLS, addr[0], 5061),
            ),
            routes=rts,
            config=gcfg,
            cache=cache,
            codec=self.shared_codec or RecordCodec(),
            keys=keys,
            settled=settled,
        )
        g.next_round = self.now + self.rng.random() * gcfg.interval  # signed earlier, runs now
        if self.shared_codec is not None:
            self.shared_codec.remember(g.local)
        node = SimNode(i, g, addr, rts, self.round)
        self.nodes.append(node)
        self.by_addr[addr] = i
        self.timer_at.append(g.get_timer())
        self.sent.append(0)
        self.recv.append(0)
        self.dgrams.append(0)
        self._push(g.get_timer(), i, None, None)
        for s in seeds or ():
            g.add_seed(self.nodes[s].addr)
        return i

    def warm_start(self) -> None:
        """Converged starting state, as if loaded from each node's hostcache.json: every
        node holds all records homed in its group plus ``contacts_per_group`` members of
        every other group (records are trusted here: the simulator signed them)."""
        bits = self.cfg.gossip.group_bits
        groups = 1 << bits
        homed: list[list[NodeRecord]] = [[] for _ in range(groups)]
        members: list[list[NodeRecord]] = [[] for _ in range(groups)]
        for n in self.nodes:
            rec = n.gossip.local
            for g in rec.homes(bits):
                homed[g].append(rec)
            members[id_group(rec.node_id, bits)].append(rec)
        for ms in members:  # contacts are drawn in turn from a shuffled list per group
            self.rng.shuffle(ms)
        lowest = min((r.expires for ms in members for r in ms), default=float("inf"))
        c = self.cfg.contacts_per_group
        # node idx takes members (idx*c + j) % m, j < c, of each other group: slices of each
        # group's list with its first c members appended (the turn wraps around)
        rings = [
            (g, [r.key for r in ms] * (1 + c // len(ms)), ms * (1 + c // len(ms)), len(ms),
             [g] * c)
            for g, ms in enumerate(members) if ms
        ]
        for _g, ks, rs, _m, _gl in rings:
            ks.extend(ks[:c])
            rs.extend(rs[:c])
        templates: dict[int, Prepared] = {}
        pages_of: dict[int, HostCache] = {}
        for idx, n in enumerate(self.nodes):
            mine = n.gossip.my_group
            cache = n.gossip.cache
            tpl = templates.get(mine)
            if tpl is None:
                tpl = templates[mine] = cache.prepare(homed[mine])
            cache.remove(n.gossip.key, self.now)  # the template holds this node's record too
            cache.bulk_load(tpl, self.now)
            entries = cache.entries
            keys: list[bytes] = []
            recs: list[NodeRecord] = []
            grps: list[int] = []
            base = idx * c
            for g, ks, rs, m, gl in rings:
                if g != mine:
                    st = base % m
                    keys += ks[st : st + c]
                    recs += rs[st : st + c]
                    grps += gl
            if len(set(keys)) == len(keys):
                # contacts homed here (the template has them): about two per node, found by
                # a set intersection and dropped by index, not by a pass over every contact
                for k in entries.keys() & keys:
                    j = keys.index(k)
                    del keys[j], recs[j], grps[j]
            else:
                # a group smaller than c: keep each contact's first place
                seen = set(entries)
                sel = []
                for j, k in enumerate(keys):
                    if k not in seen:
                        seen.add(k)
                        sel.append(j)
                keys = [keys[j] for j in sel]
                recs = [recs[j] for j in sel]
                grps = [grps[j] for j in sel]
            cache.bulk_load(Prepared(recs, keys, [False] * len(keys), grps, lowest), self.now)
            cache.put(n.gossip.local, self.now)
            # the group's members hold the same home records: one set of page memos for all
            first = pages_of.get(mine)
            if first is None or not cache.adopt_pages(first):
                pages_of[mine] = cache
                sub_bits = n.gossip.page_bits()
                for page in range(1 << sub_bits):
                    cache.home_page_set(sub_bits, page)
                    cache.home_page_bytes(sub_bits, page)
                cache.home_summary(sub_bits)

    def live(self) -> list[int]:
        """Indexes of live nodes."""
        return [n.index for n in self.nodes if n.alive]

    def kill(self, i: int) -> None:
        """Node ``i`` stops (crash or leave: it sends nothing more)."""
        self.nodes[i].alive = False

    def churn(self, leave: int, join: int) -> list[int]:
        """Kill ``leave`` random live nodes and start ``join`` new ones seeded with 2 live."""
        live = self.live()
        for i in self.rng.sample(live, min(leave, len(live) - 2)):
            self.kill(i)
        live = self.live()
        # seeds are what operators configure: nodes that have been up a while
        stable = [i for i in live if self.round - self.nodes[i].born >= 10] or live
        return [
            self.add_node(settled=False, seeds=self.rng.sample(stable, 2)) for _ in range(join)
        ]

    def partition(self, side: list[int] | None) -> None:
        """Drop every datagram between nodes on different sides (None heals)."""
        if side is not None:
            side = side + [0] * (len(self.nodes) - len(side))
        self.side = side

    # -- event loop ------------------------------------------------------------------------

    def _push(self, t: float, i: int, data: bytes | None, src: Addr | None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, i, data, src))

    def run_rounds(self, n: int, each: Callable[[int], None] | None = None) -> None:
        """Advance ``n`` rounds; ``each(round)`` runs at every round boundary."""
        collecting = gc.isenabled()
        if self.cfg.freeze_gc:
            gc.disable()  # the event loop makes no reference cycles worth collecting
        try:
            for _ in range(n):
                if each is not None:
                    each(self.round)
                self._run_until(START + (self.round + 1) * self.interval)
                self._close_round()
        finally:
            if self.cfg.freeze_gc:
                # and what the rounds built stays out of later collections too: otherwise
                # the first allocation after gc.enable() scans every object the rounds
                # allocated (2.5 s over a 50-round run of 10,000 nodes, one round at a time)
                gc.freeze()
                if collecting:
                    gc.enable()

    def _run_until(self, t_end: float) -> None:
        """Deliver everything due before ``t_end``. Round timers due in a later window wait
        in ``self.timers`` (sorted once per window, nearly in order already) instead of the
        heap: they are a third of all events, and a heap a tenth the size is cheaper to pop
        (same order of events, so the same run)."""
        heap = self.heap
        nodes = self.nodes
        timer_at = self.timer_at
        sent = self.sent
        recv = self.recv
        dgrams = self.dgrams
        by_addr = self.by_addr
        link = self.cfg.link
        lat_min = link.latency_min
        lat_span = link.latency_max - link.latency_min
        loss = link.loss
        rnd = self.rng.random
        push = heapq.heappush
        pop = heapq.heappop
        hook = self.on_deliver
        side = self.side  # partitions change between rounds, not within one
        seq = self.seq
        due = self.timers
        later = [x for x in due if x[0] >= t_end]
        if later:
            due = [x for x in due if x[0] < t_end]
        due.sort()
        self.timers = later
        defer = later.append
        n_due = len(due)
        ti = 0
        t_timer, s_timer = due[0][:2] if n_due else (t_end, 0)
        while True:
            if heap and (
                (h := heap[0])[0] < t_timer or (h[0] == t_timer and h[1] < s_timer and ti < n_due)
            ):
                t, _, i, data, src = pop(heap)  # (t_timer <= t_end)
            elif ti < n_due:
                t, _, i = due[ti]
                ti += 1
                t_timer, s_timer = due[ti][:2] if ti < n_due else (t_end, 0)
                data = src = None
            else:
                break
            node = nodes[i]
            if not node.alive:
                continue
            g = node.gossip
            if data is None:
                if timer_at[i] != t:
                    continue
                self.now = t
                g.handle_timer(t)
            else:
                assert src is not None
                self.now = t
                if hook is not None and not hook(i, data, src):
                    continue
                recv[i] += len(data)
                g.receive(data, src, t)
            out = g._out
            if out:
                g._out = []
                src_addr = node.addr
                for d, dst in out:
                    sent[i] += len(d)
                    dgrams[i] += 1
                    j = by_addr.get(dst)
                    if j is None or rnd() < loss:
                        continue
                    if side is not None and side[i] != side[j]:
                        continue
                    seq += 1
                    push(heap, (t + lat_min + rnd() * lat_span, seq, j, d, src_addr))
            nt = g.next_round
            if g._lookups:
                nt = g.get_timer()
            if nt != timer_at[i]:
                timer_at[i] = nt
                seq += 1
                if nt < t_end:
                    push(heap, (nt, seq, i, None, None))
                else:
                    defer((nt, seq, i))
            if g._events:
                self.seq = seq
                self._drain(i, g)
                seq = self.seq
        self.seq = seq
        self.now = t_end

    def _drain(self, i: int, g: Gossip) -> None:
        while (ev := g.next_event()) is not None:
            if self.events is not None:
                self.events.append((i, ev))
            if isinstance(ev, LookupCompleted):
                want = self.lookups.pop((i, ev.query_id), None)
                if want is not None:
                    ok = any(r.key == want[0] for r in ev.records)
                    self.lookup_results.append((want[1], ok))
                    alive = self.nodes[want[2]].alive
                    self.lookup_detail.append((want[1], ok, want[3], alive))

    def _close_round(self) -> None:
        live = [n.index for n in self.nodes if n.alive]
        s = sorted(self.sent[i] for i in live)
        r = sorted(self.recv[i] for i in live)
        w = sorted(self.sent[i] + self.dgrams[i] * UDP_IP_OVERHEAD for i in live)
        k = max(1, len(live))
        self.traffic.append(RoundTraffic(
            round=self.round,
            live=len(live),
            sent_mean=sum(s) / k,
            sent_p99=_pct(s, 0.99),
            sent_max=s[-1] if s else 0,
            recv_mean=sum(r) / k,
            recv_p99=_pct(r, 0.99),
            recv_max=r[-1] if r else 0,
            wire_mean=sum(w) / k,
            wire_p99=_pct(w, 0.99),
            wire_max=w[-1] if w else 0,
            datagrams_mean=sum(self.dgrams[i] for i in live) / k,
        ))
        n = len(self.nodes)
        self.sent = [0] * n
        self.recv = [0] * n
        self.dgrams = [0] * n
        self.round += 1

    # -- measurements ----------------------------------------------------------------------

    def reach(self, rec: NodeRecord) -> float:
        """Share of live nodes whose host cache holds ``rec`` or newer."""
        key, seq = rec.key, rec.seq
        live = [n for n in self.nodes if n.alive]
        have = 0
        for n in live:
            e = n.gossip.cache.entries.get(key)
            if e is not None and e.record.seq >= seq:
                have += 1
        return have / max(1, len(live))

    def home_coverage(self, recs: list[NodeRecord]) -> float:
        """Share of (record, live member of one of its home groups) pairs holding it (or newer)."""
        bits = self.cfg.gossip.group_bits
        by_group: dict[int, list[SimNode]] = {}
        for n in self.nodes:
            if n.alive:
                by_group.setdefault(n.gossip.my_group, []).append(n)
        total = have = 0
        for rec in recs:
            for g in rec.homes(bits):
                for n in by_group.get(g, ()):
                    total += 1
                    e = n.gossip.cache.entries.get(rec.key)
                    if e is not None and e.record.seq >= rec.seq:
                        have += 1
        return have / max(1, total)

    def lookup(
        self, src: int, route: str, target: int, tag: int = 0, *, use_cache: bool = True
    ) -> int:
        """Start a network lookup at ``src``; success = the target's record comes back."""
        g = self.nodes[src].gossip
        qid = g.start_lookup(route, self.now, use_cache=use_cache)
        self.lookups[(src, qid)] = (self.nodes[target].gossip.key, self.round, target, tag)
        self.flush(src)
        return qid

    def flush(self, i: int) -> None:
        """After calling into node ``i`` from outside the loop: send its datagrams, schedule
        its timer, collect its events."""
        g = self.nodes[i].gossip
        for d, dst in g.datagrams_to_send():
            self.send_raw(i, d, dst)
        nt = g.get_timer()
        if nt != self.timer_at[i]:
            self.timer_at[i] = nt
            self._push(nt, i, None, None)
        if g._events:
            self._drain(i, g)

    def send_raw(self, i: int, data: bytes, dst: Addr) -> None:
        """Put a datagram from node ``i`` on the simulated network (tests inject with it)."""
        self.sent[i] += len(data)
        self.dgrams[i] += 1
        j = self.by_addr.get(dst)
        link = self.cfg.link
        if j is None or self.rng.random() < link.loss:
            return
        if self.side is not None and self.side[i] != self.side[j]:
            return
        delay = link.latency_min + self.rng.random() * (link.latency_max - link.latency_min)
        self._push(self.now + delay, j, data, self.nodes[i].addr)

    def traffic_summary(self, rounds: list[RoundTraffic] | None = None) -> dict[str, float]:
        """Worst and mean of the per-round figures."""
        rs = rounds if rounds is not None else self.traffic
        if not rs:
            return {}
        return {
            "sent_mean": round(sum(r.sent_mean for r in rs) / len(rs), 1),
            "sent_mean_worst_round": round(max(r.sent_mean for r in rs), 1),
            "sent_p99_worst_round": max(r.sent_p99 for r in rs),
            "sent_max": max(r.sent_max for r in rs),
            "recv_mean": round(sum(r.recv_mean for r in rs) / len(rs), 1),
            "recv_p99_worst_round": max(r.recv_p99 for r in rs),
            "recv_max": max(r.recv_max for r in rs),
            "wire_sent_mean": round(sum(r.wire_mean for r in rs) / len(rs), 1),
            "wire_sent_p99_worst_round": max(r.wire_p99 for r in rs),
            "wire_sent_max": max(r.wire_max for r in rs),
            "datagrams_per_node_round": round(sum(r.datagrams_mean for r in rs) / len(rs), 2),
        }


# -- scenarios -------------------------------------------------------------------------------


def scenario_spread(
    cfg: SimConfig, rounds: int = 30, settle: int = 3, keep: list[Simulation] | None = None
) -> dict[str, Any]:
    """A node adds a route; how many rounds until 99% (and 100%) of live nodes hold it."""
    t0 = time.perf_counter()
    sim = Simulation(cfg)
    setup = time.perf_counter() - t0
    if keep is not None:
        keep.append(sim)  # the caller frees it, outside the scenario's timing
    sim.run_rounds(settle)
    origin = sim.nodes[sim.rng.randrange(len(sim.nodes))].gossip
    rec = origin.update_local(sim.now, routes=(*origin.local.routes, "new-route.sim"))
    curve: list[float] = []
    for _ in range(rounds):
        sim.run_rounds(1)
        curve.append(round(sim.reach(rec), 4))
    r99 = next((i + 1 for i, v in enumerate(curve) if v >= 0.99), None)
    r100 = next((i + 1 for i, v in enumerate(curve) if v >= 1.0), None)
    return {
        "scenario": "spread",
        "nodes": cfg.nodes,
        "rounds": rounds,
        "rounds_to_99pct": r99,
        "rounds_to_100pct": r100,
        "reach_curve": curve,
        "traffic": sim.traffic_summary(),
        "setup_s": round(setup, 1),
        "run_s": round(time.perf_counter() - t0 - setup, 1),
    }


def scenario_churn(
    cfg: SimConfig,
    rounds: int = 50,
    rate: float = 0.01,
    lookups_per_round: int = 100,
    warmup: int = 10,
    min_age: int = 5,
    keep: list[Simulation] | None = None,
) -> dict[str, Any]:
    """``rate`` of the nodes leave and as many join every round (0.01 = 10% per 10 rounds);
    from ``warmup`` on, random live nodes (even ones that joined this very round) look up
    routes of random live nodes up at least ``min_age`` rounds. Success = the target's
    record comes back; lookups whose target died meanwhile are not counted (not a live
    route any more). Reported for all targets and for targets up 10 rounds or more."""
    t0 = time.perf_counter()
    sim = Simulation(cfg)
    setup = time.perf_counter() - t0
    if keep is not None:
        keep.append(sim)  # the caller frees it, outside the scenario's timing
    n_churn = max(1, round(rate * cfg.nodes))

    def each(r: int) -> None:
        if r == 0:
            return
        sim.churn(n_churn, n_churn)
        if r < warmup or r > rounds - 4:
            return
        live = [n for n in sim.nodes if n.alive]
        old = [n for n in live if r - n.born >= min_age]
        for _ in range(lookups_per_round):
            src = sim.rng.choice(live)
            dst = sim.rng.choice(old)
            if src is dst:
                continue
            sim.lookup(src.index, sim.rng.choice(dst.routes), dst.index, r - dst.born)

    sim.run_rounds(rounds, each)
    sim.run_rounds(4)
    live_ones = [(ok, age) for _, ok, age, alive in sim.lookup_detail if alive]
    ok = sum(1 for good, _ in live_ones if good)
    total = len(live_ones)
    settled = [good for good, age in live_ones if age >= 10]
    return {
        "scenario": "churn",
        "nodes": cfg.nodes,
        "rounds": rounds,
        "churn_per_round": n_churn,
        "lookups": total,
        "lookup_success": round(ok / max(1, total), 5),
        "lookup_success_targets_up_10_rounds": round(sum(settled) / max(1, len(settled)), 5),
        "lookups_target_died": len(sim.lookup_detail) - total,
        "lookups_unanswered": len(sim.lookups),
        "traffic": sim.traffic_summary(sim.traffic[warmup:rounds]),
        "live_end": len(sim.live()),
        "setup_s": round(setup, 1),
        "run_s": round(time.perf_counter() - t0 - setup, 1),
    }


def scenario_small(cfg: SimConfig, rounds: int = 3600, steady_after: int = 300,
                   keep: list[Simulation] | None = None) -> dict[str, Any]:
    """The one-hour soak's mesh (bench/soak.py) on virtual time: five nodes, four seeded to the
    first and the first to the second, the second serving eleven routes; ``cfg.nodes`` is
    ignored, ``cfg.keep_events`` is forced on. Counts live peers declared dead (the soak's
    nodes did so before publish retries and member lookups backed off in a mesh smaller than
    its groups, docs/peering.md 5.3) and the steady traffic per node and round."""
    sim = Simulation(replace(cfg, nodes=0, keep_events=True))
    sim.add_node(settled=False, routes=("a.test", "caller@a.test"))
    sim.add_node(settled=False, seeds=[0], routes=(
        "b.test", "bench@b.test", *(f"dev{i}@b.test" for i in range(10))))
    for i in range(2, 5):
        sim.add_node(settled=False, seeds=[0], routes=(f"n{i}.test", f"root@n{i}.test"))
    sim.nodes[0].gossip.add_seed(sim.nodes[1].addr)
    if keep is not None:
        keep.append(sim)
    sim.run_rounds(rounds)
    removed = [ev for _, ev in sim.events or [] if isinstance(ev, PeerRemoved)]
    return {
        "scenario": "small",
        "nodes": len(sim.nodes),
        "rounds": rounds,
        "group_bits": cfg.gossip.group_bits,
        "loss": cfg.link.loss,
        "caches": [len(n.gossip.cache) for n in sim.nodes],
        "declared_dead": len(removed),
        "drop_budget": sum(n.gossip.stats.get("drop_budget", 0) for n in sim.nodes),
        "traffic": sim.traffic_summary(sim.traffic[steady_after:]),
    }


def scenario_partition(
    cfg: SimConfig,
    split: int = 20,
    after: int = 25,
    change: float = 0.02,
    settle: int = 3,
    keep: list[Simulation] | None = None,
) -> dict[str, Any]:
    """Split the mesh in two halves for ``split`` rounds while ``change`` of each half's
    nodes add a route; heal; count rounds until every changed record is back in all its
    home groups (and how far rumours carry it to every cache)."""
    t0 = time.perf_counter()
    sim = Simulation(cfg)
    setup = time.perf_counter() - t0
    if keep is not None:
        keep.append(sim)  # the caller frees it, outside the scenario's timing
    sim.run_rounds(settle)
    side = [sim.rng.randrange(2) for _ in sim.nodes]
    sim.partition(side)
    changed: list[NodeRecord] = []
    movers = sim.rng.sample(range(len(sim.nodes)), max(2, round(change * len(sim.nodes))))
    sim.run_rounds(2)
    for i in movers:
        g = sim.nodes[i].gossip
        changed.append(g.update_local(sim.now, routes=(*g.local.routes, f"moved{i}.sim")))
    sim.run_rounds(split - 2)
    before = sim.home_coverage(changed)
    sim.partition(None)
    home_curve: list[float] = []
    reach_curve: list[float] = []
    for _ in range(after):
        sim.run_rounds(1)
        home_curve.append(round(sim.home_coverage(changed), 4))
        reach_curve.append(round(sum(sim.reach(r) for r in changed) / len(changed), 4))
    conv = next((i + 1 for i, v in enumerate(home_curve) if v >= 1.0), None)
    conv999 = next((i + 1 for i, v in enumerate(home_curve) if v >= 0.999), None)
    r99 = next((i + 1 for i, v in enumerate(reach_curve) if v >= 0.99), None)
    return {
        "scenario": "partition",
        "nodes": cfg.nodes,
        "split_rounds": split,
        "changed_records": len(changed),
        "home_coverage_before_heal": round(before, 4),
        "rounds_to_home_100pct": conv,
        "rounds_to_home_99_9pct": conv999,
        "rounds_to_caches_99pct": r99,
        "home_curve": home_curve,
        "reach_curve": reach_curve,
        "traffic": sim.traffic_summary(),
        "setup_s": round(setup, 1),
        "run_s": round(time.perf_counter() - t0 - setup, 1),
    }


EVIL = "evil.example"


def _forged(victim: NodeRecord, attacker: NodeIdentity, how: int) -> bytes:
    """A record claiming to be the victim's, newer, pointing elsewhere: never validly signed."""
    body = encode_body(victim.public_key, victim.seq + 1000, victim.expires, victim.addresses,
                       (EVIL,), victim.flags)
    if how == 0:
        return body + victim.signature  # the victim's signature over other content
    if how == 1:
        return body + attacker.sign(SIGN_CONTEXT + body)  # the wrong key
    return body + bytes(64)


def _oversized(rng: random.Random, now: float) -> bytes:
    """Validly signed by its own fresh key, but larger than any record may be."""
    ident = NodeIdentity.from_seed(rng.randbytes(32))
    routes = tuple(f"u{i}-{'x' * 12}@{EVIL}" for i in range(32))
    body = encode_body(ident.public_key, int(now * 1000), int(now) + 600, (), routes)
    return body + ident.sign(SIGN_CONTEXT + body)


def scenario_flood(
    cfg: SimConfig,
    attackers: int = 5,
    rounds: int = 20,
    victims_per_round: int = 25,
    keep: list[Simulation] | None = None,
) -> dict[str, Any]:
    """Attackers (authenticated members of the mesh, so their datagrams pass the MAC) flood
    honest nodes every round with forged records (others' keys, new routes), oversized
    records, genuine but superseded versions (replays), bait digests, false death claims,
    garbage and bad MACs, while an honest node publishes news. Reports what got through."""
    t0 = time.perf_counter()
    sim = Simulation(cfg)
    setup = time.perf_counter() - t0
    if keep is not None:
        keep.append(sim)  # the caller frees it, outside the scenario's timing
    rng = random.Random(cfg.seed + 1)
    honest = list(range(attackers, len(sim.nodes)))
    movers = honest[::10]
    replays: list[NodeRecord] = []
    for step in range(2):  # history an attacker can replay: a route served, then dropped
        for i in movers:
            g = sim.nodes[i].gossip
            replays.append(g.local)
            routes = (g.local.routes[0], f"old{i}.sim") if step == 0 else g.local.routes[:1]
            g.update_local(sim.now, routes=routes)
            sim.flush(i)
        sim.run_rounds(8)
    sim.run_rounds(10)
    old = {i: sim.nodes[i].gossip.local for i in honest}
    mover = sim.nodes[honest[7]].gossip
    news = mover.update_local(sim.now, routes=(*mover.local.routes, "news.sim"))
    sim.flush(honest[7])
    snapshot = {
        i: {k: e.record.seq for k, e in sim.nodes[i].gossip.cache.entries.items()}
        for i in honest
    }

    def flood(r: int) -> None:
        for a in range(attackers):
            atk = sim.nodes[a].gossip
            for v in rng.sample(honest, min(victims_per_round, len(honest))):
                victim = sim.nodes[v]
                key = atk.keys.derive(victim.gossip.identity.public_key)[0]
                pk, ts = atk.identity.public_key, int(sim.now)
                others = rng.sample(honest, 3)
                b = Builder()
                for k, o in enumerate(others):
                    b.add(Sec.RECORD, _forged(old[o], atk.identity, k))
                b.add(Sec.RECORD, rng.choice(replays).raw)
                b.add(Sec.HAVE, wire.digests([(old[o].key, old[o].seq + 1000) for o in others]))
                b.add(Sec.DEAD, wire.digests([(old[o].key, old[o].seq) for o in others]))
                data = b.finish(pk, ts, key)
                sim.send_raw(a, data, victim.addr)
                big = Builder()
                big.add(Sec.RECORD, _oversized(rng, sim.now))
                sim.send_raw(a, big.finish(pk, ts, key), victim.addr)
                sim.send_raw(a, rng.randbytes(rng.randrange(1, 1200)), victim.addr)
                sim.send_raw(a, data[:-1] + bytes((data[-1] ^ 1,)), victim.addr)

    sim.run_rounds(rounds, flood)
    # what honest nodes hold now, checked from scratch
    checker = RecordCodec(capacity=None)
    bad_records = evil_routes = rolled_back = 0
    seen: dict[bytes, bool] = {}
    for i in honest:
        for k, e in sim.nodes[i].gossip.cache.entries.items():
            raw = e.record.raw
            ok = seen.get(raw)
            if ok is None:
                try:
                    checker.load(raw)
                    ok = True
                except RecordError:
                    ok = False
                seen[raw] = ok
            bad_records += not ok
            evil_routes += EVIL in e.record.routes
            before = snapshot[i].get(k)
            rolled_back += before is not None and e.record.seq < before
    bits = cfg.gossip.group_bits
    missing = sum(
        1
        for i in honest
        for o in honest
        if sim.nodes[i].gossip.my_group in old[o].homes(bits)
        and old[o].key not in sim.nodes[i].gossip.cache.entries
    )
    totals: dict[str, int] = {}
    for i in honest:
        for name, v in sim.nodes[i].gossip.stats.items():
            totals[name] = totals.get(name, 0) + v
    return {
        "scenario": "flood",
        "nodes": cfg.nodes,
        "attackers": attackers,
        "rounds": rounds,
        "real_crypto": not cfg.fast_crypto,
        "invalid_records_held": bad_records,
        "evil_routes_held": evil_routes,
        "records_rolled_back": rolled_back,
        "home_records_missing": missing,
        "news_reach": round(sim.reach(news), 4),
        "dropped": {k: v for k, v in sorted(totals.items())
                    if k.startswith(("rec_", "drop_", "bans", "false_claims", "claims_"))},
        "setup_s": round(setup, 1),
        "run_s": round(time.perf_counter() - t0 - setup, 1),
    }


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "spread": scenario_spread,
    "churn": scenario_churn,
    "partition": scenario_partition,
    "flood": scenario_flood,
}


def main(argv: list[str] | None = None) -> int:
    """Command line: run one scenario and print its figures as JSON."""
    ap = argparse.ArgumentParser(prog="python -m freecall.peering.simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--group-bits", type=int, default=6)
    ap.add_argument("--routes-per-node", type=int, default=1)
    ap.add_argument("--loss", type=float, default=0.01)
    ap.add_argument("--real-crypto", action="store_true",
                    help="per-node verification and X25519 (slow at 10,000 nodes)")
    args = ap.parse_args(argv)
    gcfg = GossipConfig(emit_peer_events=False, capacity=2048, group_bits=args.group_bits)
    cfg = SimConfig(
        nodes=args.nodes,
        seed=args.seed,
        gossip=gcfg,
        link=replace(LinkModel(), loss=args.loss),
        routes_per_node=args.routes_per_node,
        fast_crypto=not args.real_crypto,
        freeze_gc=True,
    )
    kwargs: dict[str, Any] = {}
    if args.rounds is not None:
        kwargs["rounds" if args.scenario != "partition" else "after"] = args.rounds
    out = SCENARIOS[args.scenario](cfg, **kwargs)
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
