"""The gossip engine on small meshes with real crypto: bootstrap, spread, liveness, lookups,
authentication, persistence, bounds."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from freecall.peering import wire
from freecall.peering.gossip import (
    Gossip,
    GossipConfig,
    LookupCompleted,
    PeerAdded,
    PeerRemoved,
    PeerUpdated,
)
from freecall.peering.hostcache import HostCache
from freecall.peering.records import Address, AddrKind, NodeIdentity, RecordCodec, route_group
from freecall.peering.simulate import SimConfig, Simulation

CFG = GossipConfig(emit_peer_events=True, group_bits=3)


def sim(n: int, *, warm: bool = True, seed: int = 1, events: bool = True, **kw: Any) -> Simulation:
    return Simulation(SimConfig(nodes=n, seed=seed, warm=warm, gossip=replace(CFG, **kw),
                                keep_events=events))


def test_two_nodes_meet_through_hello() -> None:
    s = sim(1, warm=False)
    j = s.add_node(settled=False, seeds=[0])
    s.run_rounds(4)
    a, b = s.nodes[0].gossip, s.nodes[j].gossip
    assert a.cache.get(b.node_id) is not None and b.cache.get(a.node_id) is not None
    assert b._seeds[0].public_key == a.identity.public_key
    assert a.stats.get("drop_badmac", 0) == 0
    assert any(isinstance(ev, PeerAdded) and i == j for i, ev in s.events or [])


def test_two_nodes_that_know_each_others_key_but_no_record_meet() -> None:
    """mDNS gives a seed's key with its address: both sides seed each other that way, and
    neither has the other's record. They must still meet (HELLO carries the record)."""
    s = sim(1, warm=False)
    j = s.add_node(settled=False)
    a, b = s.nodes[0].gossip, s.nodes[j].gossip
    a.add_seed(s.nodes[j].addr, b.identity.public_key)
    b.add_seed(s.nodes[0].addr, a.identity.public_key)
    s.run_rounds(4)
    assert a.cache.get(b.node_id) is not None and b.cache.get(a.node_id) is not None


def test_cold_start_through_seeds_then_every_route_resolves() -> None:
    s = sim(1, warm=False, events=False)
    s.add_node(settled=False, seeds=[0])
    s.add_node(settled=False, seeds=[0, 1])
    for _ in range(57):
        s.add_node(settled=False, seeds=[0, 1, 2])
    s.run_rounds(40)
    assert min(len(n.gossip.cache) for n in s.nodes) > 10
    rng = random.Random(5)
    for _ in range(120):
        src, dst = rng.sample(range(60), 2)
        s.lookup(src, s.nodes[dst].routes[0], dst)
    s.run_rounds(6)
    assert len(s.lookup_results) == 120
    assert all(ok for _, ok in s.lookup_results)


def test_update_spreads_with_events_and_bounded_datagrams() -> None:
    s = sim(120)
    origin = s.nodes[7].gossip
    new = origin.update_local(s.now, routes=(*origin.local.routes, "fresh.example"))
    s.flush(7)
    sizes: list[int] = []

    def size(i: int, data: bytes, src: tuple[str, int]) -> bool:
        sizes.append(len(data))
        return True

    s.on_deliver = size
    s.run_rounds(12)
    assert s.reach(new) == 1.0
    told = {i for i, ev in s.events or [] if isinstance(ev, PeerUpdated | PeerAdded)
            and ev.record == new}
    assert len(told) == 119
    assert any(isinstance(ev, PeerUpdated) and ev.previous_seq < new.seq
               for _, ev in s.events or [])
    assert max(sizes) <= wire.MAX_DATAGRAM
    assert all(n.gossip.lookup_domain("fresh.example")[0].seq == new.seq for n in s.nodes)


def test_dead_node_is_found_out_and_removed() -> None:
    s = sim(150, probe_cap=3)
    victim = s.nodes[42]
    group = victim.gossip.my_group
    s.kill(42)
    s.run_rounds(40)
    members = [n for n in s.nodes if n.alive and n.gossip.my_group == group]
    still = sum(1 for n in members if victim.gossip.key in n.gossip.cache.entries)
    # first-hand only (claims are checked, not believed), so it takes a while to be everywhere
    assert still <= len(members) // 3
    removed = [ev for _, ev in s.events or [] if isinstance(ev, PeerRemoved)
               and ev.node_id == victim.gossip.node_id]
    assert removed and {ev.reason for ev in removed} <= {"unreachable", "reported-dead"}


def test_network_lookup_finds_a_route_missing_from_the_cache() -> None:
    s = sim(150)
    bits = CFG.group_bits
    done = 0
    for dst in range(0, 150, 7):
        route = s.nodes[dst].routes[0]
        g = route_group(route, bits)
        src = next(n.index for n in s.nodes if n.gossip.my_group != g
                   and s.nodes[dst].gossip.key not in n.gossip.cache.entries)
        s.lookup(src, route, dst, use_cache=False)
        done += 1
    s.run_rounds(3)
    assert len(s.lookup_results) == done and all(ok for _, ok in s.lookup_results)
    found = [ev for _, ev in s.events or [] if isinstance(ev, LookupCompleted)]
    assert all(ev.found and ev.records for ev in found)


def test_lookup_without_any_peer_fails_cleanly() -> None:
    s = sim(1, warm=False)
    g = s.nodes[0].gossip
    qid = g.start_lookup("nowhere.example", s.now)
    s.flush(0)
    s.run_rounds(6)
    (ev,) = [ev for _, ev in s.events or [] if isinstance(ev, LookupCompleted)]
    assert ev.query_id == qid and not ev.found and ev.records == ()


def _pair() -> tuple[Gossip, Gossip, bytes, tuple[str, int]]:
    now = 1_700_000_000.0
    nodes = []
    for i in (1, 2):
        ident = NodeIdentity.from_seed(bytes([i]) * 32)
        nodes.append(Gossip(ident, now=now, rng=random.Random(i), config=CFG,
                            addresses=(Address(AddrKind.GOSSIP, f"192.0.2.{i}", 5064),)))
    a, b = nodes
    a.cache.put(b.local, now)
    b.cache.put(a.local, now)
    a.handle_timer(a.next_round)
    (data, dst), *_ = a.datagrams_to_send()
    assert dst == ("192.0.2.2", 5064)
    return a, b, data, ("192.0.2.1", 5064)


def test_authentication_and_replay_window() -> None:
    _, b, data, src = _pair()
    now = 1_700_000_001.0
    bad = bytearray(data)
    bad[50] ^= 1
    b.receive(bytes(bad), src, now)
    assert b.stats["drop_badmac"] == 1
    b.receive(data, src, now + 3600)
    assert b.stats["drop_clock"] == 1
    b.receive(data, src, now)
    assert b.datagrams_to_send()  # the genuine one is answered
    spoof = bytearray(data)
    spoof[1:33] = b.identity.public_key  # claims to come from b itself
    b.receive(bytes(spoof), src, now)
    assert b.stats["drop_self"] == 1


def test_send_budget_is_a_hard_cap() -> None:
    """Over any one-interval window, measured when datagrams leave, whatever the load."""
    s = sim(200, events=False, group_bits=3, send_budget=1500)
    worst = 0
    window: dict[int, list[tuple[float, int]]] = {}
    original = Gossip._emit

    def emit(self: Gossip, data: bytes, addr: tuple[str, int], content: bool = False) -> bool:
        nonlocal worst
        ok = original(self, data, addr, content)
        if ok:
            log = window.setdefault(id(self), [])
            log.append((self._now, len(data) + 28))
            log[:] = [(t, n) for t, n in log if t > self._now - 1.0]
            worst = max(worst, sum(n for _, n in log))
        return ok

    Gossip._emit = emit  # type: ignore[method-assign]
    try:
        _run_churn(s)
    finally:
        Gossip._emit = original  # type: ignore[method-assign]
    assert 1000 < worst <= 1500
    assert sum(n.gossip.stats.get("drop_budget", 0) for n in s.nodes) > 0


def _run_churn(s: Simulation) -> None:
    def each(r: int) -> None:
        if r:
            s.churn(4, 4)

    s.run_rounds(20, each)


def test_restart_keeps_the_cache_and_outranks_the_old_record(tmp_path: Path) -> None:
    s = sim(40, events=False)
    s.run_rounds(3)
    old = s.nodes[5].gossip
    path = tmp_path / "hostcache.json"
    old.cache.save(path, s.now)
    cache = HostCache(rng=random.Random(2), group_bits=CFG.group_bits)
    assert cache.load(path, RecordCodec(), s.now + 10) == len(old.cache)
    again = Gossip(old.identity, now=s.now + 10, rng=random.Random(3), config=CFG, cache=cache,
                   addresses=old.local.addresses, routes=old.local.routes)
    assert again.local.seq > old.local.seq
    assert len(again.cache) == len(old.cache)
    mine = again.cache.entry(again.key)
    assert mine is not None and mine.record == again.local
    assert len(again.peers(s.now)) == len(old.cache) - 1


def test_false_death_claims_silence_the_claims_not_the_claimer() -> None:
    """After a partition heals, honest nodes make many claims the other side finds false:
    a repeat offender's claims are ignored for a while, but it is still heard (a ban would
    keep the halves apart)."""
    s = sim(64, events=False, claim_probe_share=1.0)
    s.run_rounds(2)
    atk, v = s.nodes[0].gossip, s.nodes[1].gossip
    homes = [n.gossip.local for n in s.nodes[2:] if v.my_group in n.gossip.local.homes(3)]
    key = atk.keys.derive(v.identity.public_key)[0]
    for _ in range(20):
        b = wire.Builder()
        b.add(wire.Sec.DEAD, wire.digests([(h.key, h.seq) for h in homes[:6]]))
        s.send_raw(0, b.finish(atk.identity.public_key, int(s.now), key), s.nodes[1].addr)
        s.run_rounds(2)
    assert v.stats.get("false_claims", 0) >= 3
    assert v.stats.get("claims_ignored", 0) >= 1 and v.stats.get("drop_claims", 0) >= 1
    b = wire.Builder()
    b.add(wire.Sec.RECORD, atk.local.raw)
    s.send_raw(0, b.finish(atk.identity.public_key, int(s.now), key), s.nodes[1].addr)
    s.run_rounds(1)
    assert v.stats.get("drop_banned", 0) == 0 and atk.key in v.cache.entries
    assert all(h.key in v.cache.entries for h in homes)  # nobody was buried on a claim


def test_settled_members_find_a_silent_change_through_slice_summaries() -> None:
    """A newer version that one member holds and nobody rumours (put straight into its cache)
    reaches the whole group only through anti-entropy: settled members send a SUMMARY, not
    a page, and a partner whose summary differs answers with the page of that slice."""
    s = sim(16, group_bits=0, events=False)
    s.run_rounds(2)
    a, k = s.nodes[0].gossip, s.nodes[5].gossip
    newer = k.identity.make_record(seq=k.local.seq + 1, expires=k.local.expires,
                                   addresses=k.local.addresses, routes=k.local.routes)
    assert a.cache.put(newer, s.now) == "updated"
    sent: list[wire.Message] = []
    a_addr = s.nodes[0].addr

    def spy(i: int, data: bytes, src: tuple[str, int]) -> bool:
        if src == a_addr:  # what node a sends (and the network delivers)
            sent.append(wire.parse(data, wire.HEADER.size, len(data) - wire.MAC_SIZE))
        return True

    s.on_deliver = spy
    s.run_rounds(20)
    syncs = [m for m in sent if m.pings and m.summary is not None]
    assert syncs and not any(m.page for m in syncs)  # settled: summaries, no pages
    assert any(m.page for m in sent if not m.pings)  # pages answer differing summaries
    holders = [n for n in s.nodes
               if (e := n.gossip.cache.entry(k.key)) is not None and e.record.seq >= newer.seq]
    assert len(holders) == len(s.nodes)
