"""The issue's figures at test size (fixed seeds; the 10,000-node runs are in bench/gossip.py).

These runs use the simulator's speed shortcuts (one shared verification cache, hashed MAC
keys); test_peering_security.py runs with real per-node crypto.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from dataclasses import replace
from typing import Any

from freecall.peering.gossip import GossipConfig
from freecall.peering.records import Address, AddrKind
from freecall.peering.simulate import (
    LinkModel,
    SimConfig,
    Simulation,
    main,
    scenario_churn,
    scenario_partition,
    scenario_small,
    scenario_spread,
)

GCFG = GossipConfig(emit_peer_events=False, capacity=2048)
BUDGET = GCFG.send_budget  # wire bytes per node per round, hard cap (< 2 KB)


def _cfg(nodes: int, seed: int, **kw: Any) -> SimConfig:
    return SimConfig(nodes=nodes, seed=seed, fast_crypto=True, gossip=replace(GCFG, **kw))


def test_new_route_reaches_99_percent_within_20_rounds_under_2kb() -> None:
    out = scenario_spread(_cfg(2000, seed=3), rounds=20)
    assert out["rounds_to_99pct"] is not None and out["rounds_to_99pct"] <= 20
    assert out["reach_curve"][-1] >= 0.99
    t = out["traffic"]
    assert t["wire_sent_max"] <= BUDGET < 2048
    assert t["recv_mean"] < 2048 and t["sent_mean"] < 2048


def test_lookups_succeed_under_ten_percent_churn_per_ten_rounds() -> None:
    """The issue asks 99.9 %; measured 100 % here (seeds 5, 6 and 7 alike), 10,000-node
    figures in docs/peering.md."""
    out = scenario_churn(_cfg(1000, seed=5), rounds=40, rate=0.01, lookups_per_round=100)
    assert out["lookups"] >= 2500
    assert out["lookup_success"] >= 0.999
    t = out["traffic"]
    assert t["wire_sent_max"] <= BUDGET < 2048
    assert t["recv_mean"] < 2048


def test_halves_converge_within_20_rounds_after_a_partition() -> None:
    out = scenario_partition(_cfg(1000, seed=7), split=20, after=20)
    assert out["home_coverage_before_heal"] < 0.7  # the split really cut the mesh
    # every record changed on either side is back in every live member of its home groups
    # (measured: 8 rounds; the issue allows 20)
    assert out["rounds_to_home_100pct"] is not None and out["rounds_to_home_100pct"] <= 12
    assert min(out["home_curve"][out["rounds_to_home_100pct"] - 1 :]) >= 0.998
    assert out["traffic"]["wire_sent_max"] <= BUDGET


def test_same_seed_same_run() -> None:
    a = scenario_spread(_cfg(150, seed=9), rounds=6)
    b = scenario_spread(_cfg(150, seed=9), rounds=6)
    for k in ("reach_curve", "traffic"):
        assert a[k] == b[k]
    c = scenario_spread(_cfg(150, seed=10), rounds=6)
    assert c["traffic"] != a["traffic"]


def test_command_line() -> None:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["spread", "--nodes", "120", "--rounds", "4", "--group-bits", "3"]) == 0
    out = json.loads(buf.getvalue())
    assert out["scenario"] == "spread" and out["nodes"] == 120 and len(out["reach_curve"]) == 4


def test_changed_addresses_replace_the_old_record_everywhere() -> None:
    """A node's SIP address changes at run time (update_local, what
    PeeringService.republish calls): within 20 rounds every member of its home groups, and
    99 % of all nodes, hold the new record (seq + 1) instead of the old one."""
    sim = Simulation(_cfg(300, seed=4, group_bits=3))
    sim.run_rounds(3)
    g = sim.nodes[17].gossip
    old = g.local
    moved = (old.addresses[0], Address(AddrKind.SIP_TLS, "198.51.100.7", 5061))
    rec = g.update_local(sim.now, addresses=moved)
    sim.flush(17)
    assert rec.seq > old.seq and rec.addresses == moved
    for _ in range(20):
        sim.run_rounds(1)
        if sim.home_coverage([rec]) == 1.0 and sim.reach(rec) >= 0.99:
            break
    assert sim.home_coverage([rec]) == 1.0 and sim.reach(rec) >= 0.99
    routes = [n.gossip.cache.lookup(old.routes[0]) for n in sim.nodes if n.index != 17]
    assert sum(r == [rec] for r in routes) >= 0.99 * len(routes)  # the new address, alone


def test_a_mesh_smaller_than_its_groups_stays_quiet_and_declares_nobody_dead() -> None:
    """The one-hour soak's mesh (five daemons, four seeded to the first, one with eleven
    routes) with the daemon's settings: most of its 64 groups are empty for good. Publishing
    to them and looking for their members every round used to spend every node's send
    budget (about 1,500 B per node and round) so that answers were dropped and live nodes
    declared dead; retries and lookups for empty groups now back off."""
    out = scenario_small(SimConfig(nodes=0, seed=3, gossip=GossipConfig(),
                                   link=LinkModel(loss=0.0)), rounds=900)
    assert out["caches"] == [5] * 5
    assert out["declared_dead"] == 0
    assert out["traffic"]["wire_sent_mean"] < 800, out["traffic"]
