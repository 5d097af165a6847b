"""Host-cache gossip at the issue's scale: prints the figures docs/peering.md quotes.

    .venv/bin/python bench/gossip.py                 # everything (about 15 minutes)
    .venv/bin/python bench/gossip.py spread churn    # a selection
    .venv/bin/python bench/gossip.py --nodes 2000    # smaller mesh

Scenarios (all 10,000 nodes unless --nodes): spread (one new route, 50 rounds: the speed
run), churn (1 % of the nodes leave and 1 % join every round, i.e. 10 % per 10 rounds, with
lookups), partition (two halves for 20 rounds), flood (attackers; real per-node crypto, so
run at --flood-nodes, 1,000 by default); small (not in the default set: the one-hour soak's
five-node mesh with the daemon's 64 groups for 3,600 rounds, real crypto, 1 % loss: false
deaths and traffic).

Speed runs use the simulator's shortcuts, stated in every result: one Ed25519 verification
per distinct record for the whole simulation (a real node verifies each record once too) and
hashed instead of X25519 pair keys (the per-datagram MAC is still computed and checked).

Timing: ``wall_s`` and ``cpu_s`` cover building the mesh and running its rounds. Freeing a
scenario's simulation (millions of objects, ~2 s at 10,000 nodes) is timed apart as
``teardown_s`` when another scenario follows; after the last one the process exits without
freeing anything (``os._exit``, the operating system takes the memory back at once), so the
time of the whole command does not include it either.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import replace
from typing import Any

from freecall.peering.gossip import GossipConfig
from freecall.peering.simulate import (
    SimConfig,
    scenario_churn,
    scenario_flood,
    scenario_partition,
    scenario_small,
    scenario_spread,
)

KEEP: list[Any] = []
"""The running scenario's simulation, kept so that freeing it is not timed with it."""


def run(name: str, fn: Any, cfg: SimConfig, **kw: Any) -> dict[str, Any]:
    wall = time.perf_counter()
    cpu = time.process_time()
    out: dict[str, Any] = fn(cfg, keep=KEEP, **kw)
    out["wall_s"] = round(time.perf_counter() - wall, 1)
    out["cpu_s"] = round(time.process_time() - cpu, 1)
    out["group_bits"] = cfg.gossip.group_bits
    out["crypto"] = (
        "real, per node" if not cfg.fast_crypto else "shared verify cache, hashed pair keys"
    )
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    for k in ("reach_curve", "home_curve"):
        if k in out:
            out[k] = " ".join(f"{v:.4f}" for v in out[k])
    print(f"== {name}", flush=True)
    print(json.dumps(out, indent=1), flush=True)
    return out


def free() -> None:
    """Free the last scenario's simulation and say how long that took."""
    if KEEP:
        t = time.perf_counter()
        KEEP.clear()
        print(f"teardown_s {time.perf_counter() - t:.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", default=["spread", "churn", "partition", "flood"])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--flood-nodes", type=int, default=1_000)
    ap.add_argument("--group-bits", type=int, default=7)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    gcfg = GossipConfig(emit_peer_events=False, capacity=2048, group_bits=args.group_bits)
    fast = SimConfig(nodes=args.nodes, seed=args.seed, gossip=gcfg, fast_crypto=True,
                     freeze_gc=True)
    print(f"python {sys.version.split()[0]}, {args.nodes} nodes, group_bits {args.group_bits}, "
          f"send_budget {gcfg.send_budget} B/round (wire), interval {gcfg.interval} s",
          flush=True)
    for name in args.scenarios:
        free()
        if name == "spread":
            run(name, scenario_spread, fast, rounds=47)  # + 3 settling rounds = 50
        elif name == "churn":
            run(name, scenario_churn, fast, rounds=50, rate=0.01, lookups_per_round=100)
        elif name == "partition":
            run(name, scenario_partition, fast, split=20, after=25)
        elif name == "small":
            # the daemon's own settings (64 groups), real crypto, the link model's 1 % loss
            small = SimConfig(nodes=0, seed=args.seed, gossip=GossipConfig())
            run(name, scenario_small, small, rounds=3600)
        elif name == "flood":
            real = replace(fast, nodes=args.flood_nodes, fast_crypto=False,
                           gossip=replace(gcfg, group_bits=max(3, args.group_bits - 3),
                                          hot_window=10))
            run(name, scenario_flood, real, attackers=max(5, args.flood_nodes // 100))
        else:
            ap.error(f"unknown scenario {name}")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # not freeing the last simulation: see "Timing" above
