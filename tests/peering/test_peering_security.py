"""Hostile peers, with real Ed25519 verification and real X25519 MAC keys on every node."""

from __future__ import annotations

import random
from dataclasses import replace

from freecall.peering.gossip import GossipConfig
from freecall.peering.records import NodeIdentity
from freecall.peering.simulate import SimConfig, Simulation, scenario_flood
from freecall.peering.wire import Builder, Sec


def test_flood_of_forged_oversized_and_replayed_records_changes_nothing() -> None:
    cfg = SimConfig(nodes=300, seed=11, fast_crypto=False,
                    gossip=GossipConfig(emit_peer_events=False, group_bits=4, hot_window=10))
    out = scenario_flood(cfg, attackers=5, rounds=20)
    assert out["real_crypto"]
    assert out["invalid_records_held"] == 0  # nothing forged or oversized got in anywhere
    assert out["evil_routes_held"] == 0
    assert out["records_rolled_back"] == 0  # replays never replaced a newer version
    assert out["home_records_missing"] == 0  # false death claims removed nobody
    assert out["news_reach"] >= 0.99  # honest news still reached everyone
    d = out["dropped"]
    for reason in ("rec_forged", "rec_oversized", "rec_stale", "drop_badmac",
                   "drop_malformed", "drop_banned", "bans"):
        assert d.get(reason, 0) > 0, reason


def test_every_node_verified_for_itself() -> None:
    s = Simulation(SimConfig(nodes=20, fast_crypto=False))
    codecs = {id(n.gossip.codec) for n in s.nodes}
    assert len(codecs) == 20
    s.run_rounds(3)
    assert all(type(n.gossip.keys).__name__ == "PairKeys" for n in s.nodes)


def test_valid_sybil_records_from_one_source_stay_within_its_quota() -> None:
    cfg = SimConfig(nodes=40, seed=3, fast_crypto=False,
                    gossip=replace(GossipConfig(emit_peer_events=False, group_bits=2),
                                   capacity=400, source_quota=25))
    s = Simulation(cfg)
    rng = random.Random(5)
    atk = s.nodes[0].gossip
    victim = s.nodes[1]
    key = atk.keys.derive(victim.gossip.identity.public_key)[0]
    for _ in range(60):
        b = Builder()
        for _ in range(5):
            ident = NodeIdentity.from_seed(rng.randbytes(32))
            r = ident.make_record(seq=int(s.now * 1000), expires=int(s.now) + 600,
                                  routes=(f"sybil{rng.randrange(10**9)}.example",))
            b.add(Sec.RECORD, r.raw)
        s.send_raw(0, b.finish(atk.identity.public_key, int(s.now), key), victim.addr)
        s.run_rounds(1)
    cache = victim.gossip.cache
    sybils = [e for e in cache.entries.values() if e.record.routes[0].startswith("sybil")]
    attacker_ip = s.nodes[0].addr[0]
    assert 0 < len(cache.by_source[attacker_ip]) <= 25
    # honest peers may relay a few (they are validly signed), but the flood stays contained
    assert len(sybils) <= 50
    assert len(cache) <= 400
    assert all(s.nodes[i].gossip.key in cache.entries for i in range(2, 40)
               if victim.gossip.my_group in s.nodes[i].gossip.local.homes(2))
