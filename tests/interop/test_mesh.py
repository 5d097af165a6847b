"""Five real daemons find each other by gossip and route a call by the host cache (issue 5).

Each node is its own host on loopback (127.0.0.11 ... 127.0.0.15) serving its own domain
(n1.test ... n5.test). Only node 1's gossip address is configured, on nodes 2-5; nobody has
a DNS record: the nodes' resolver is a black hole, so any call routed by DNS would fail with
408. Everything a node learns about the others comes from the mesh.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from freecall.peering.records import RecordCodec
from freecall.tls import certificate_fingerprint
from harness import Baresip, FreecallDaemon, Harness
from harness.calls import phone, talk_and_hang_up
from harness.dns import BlackHoleDns
from harness.netns import Lan

NODES = 5
PASSWORD = "pw-{}"


def node_id(node: FreecallDaemon) -> str:
    found = re.search(r"peering: node ([0-9a-f]{32})", node.log_text())
    assert found, f"{node.name} logged no node id"
    return found.group(1)


def peers_joined(node: FreecallDaemon) -> set[str]:
    """Node id prefixes this node logged as joined (since its last start, minus departures)."""
    text = node.log_text()
    text = text[text.rfind("peering: node "):]
    joined = set(re.findall(r"peer ([0-9a-f]{16}) joined", text))
    return joined - set(re.findall(r"peer ([0-9a-f]{16}) left", text))


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def cached_routes(state_dir: Path) -> set[str]:
    """Routes in a node's saved host cache (hostcache.json, records as stored)."""
    try:
        doc = json.loads((state_dir / "hostcache.json").read_bytes())
    except (OSError, ValueError):
        return set()
    codec = RecordCodec()
    routes: set[str] = set()
    for item in doc["records"]:
        routes.update(codec.load(base64.b64decode(item["record"])).routes)
    return routes


@pytest.fixture
def nodes(harness: Harness) -> Iterator[list[FreecallDaemon]]:
    with BlackHoleDns() as hole:
        dns = {"servers": [f"{hole.address[0]}:{hole.address[1]}"], "timeout": "2s"}
        out: list[FreecallDaemon] = []
        for i in range(1, NODES + 1):
            users = {"alice": PASSWORD.format("alice")} if i == 1 else {}
            if i == NODES:
                users = {"bob": PASSWORD.format("bob")}
            node = harness.daemon(
                f"n{i}", users=users, domains=[f"n{i}.test"], public_host=f"127.0.0.{10 + i}",
                start=False,
            )
            seeds = [f"{out[0].public_host}:{out[0].peering_port}"] if out else []
            node.extra_config.update(dns=dns, peering={"seeds": seeds})
            out.append(node)
        for node in out:
            harness.started.append(node)
            node.start()
        yield out
        assert hole.received() == 0, "a node asked DNS"


def test_five_nodes_find_each_other_and_route_a_call_by_the_host_cache(
    nodes: list[FreecallDaemon], baresip: Callable[..., Baresip]
) -> None:
    ids = [node_id(n)[:16] for n in nodes]
    took = wait_until(
        "every node knows the four others",
        lambda: all(peers_joined(n) >= set(ids) - {ids[i]} for i, n in enumerate(nodes)),
        20,
    )
    print(f"five nodes knew each other {took:.1f} s after the last start")

    n1, n5 = nodes[0], nodes[-1]
    alice = phone(baresip, n1, "alice", PASSWORD.format("alice"), "n1.test", 440)
    bob = phone(baresip, n5, "bob", PASSWORD.format("bob"), "n5.test", 880)
    alice.dial("sip:bob@n5.test")
    talk_and_hang_up(alice, bob, 880, 440)
    log1 = n1.log_text()
    assert "sip:alice@n1.test -> sip:bob@n5.test out" in log1
    # routed by the host cache, over TLS, to the node holding the key its record names
    n5_key = certificate_fingerprint((n5.state_dir / "tls" / "cert.pem").read_bytes())
    assert re.search(rf"TLS outgoing tls:{n5.public_host}:{n5.tls_port} \(conn \d+\) open, "
                     rf"peer key sha256:{n5_key}", log1), "no TLS to node 5"
    assert "is not the key its node record names" not in log1

    # node 5 crashes (SIGKILL: no clean shutdown) after saving what it learned...
    others = {f"n{i}.test" for i in range(1, NODES)}
    wait_until("node 5 saved its host cache", lambda: cached_routes(n5.state_dir) >= others, 15)
    assert n5.process is not None
    n5.process.stop(sig=signal.SIGKILL)
    # ... and comes back with no seed at all: its host cache is all it knows
    n5.extra_config["peering"] = {"seeds": []}
    n5.start()
    loaded = re.findall(r"peering: node [0-9a-f]+ on udp:\S+, (\d+) node\(s\) from hostcache",
                        n5.log_text())
    assert len(loaded) == 2 and int(loaded[-1]) >= NODES - 1, loaded
    bob.dial("sip:alice@n1.test")  # bob's phone never noticed (it authenticates the INVITE)
    talk_and_hang_up(bob, alice, 440, 880)


def test_a_node_with_no_seeds_finds_the_others_on_its_lan_by_mdns(harness: Harness) -> None:
    """Three hosts (network namespaces on one bridge), no seeds anywhere, no DNS: the first
    two find each other by mDNS; a third started later finds both, and they it."""
    with Lan(3) as lan:
        nodes: list[FreecallDaemon] = []
        for i in (1, 2, 3):
            node = harness.daemon(
                f"lan{i}", domains=[f"lan{i}.test"], public_host=lan.address(i),
                netns=lan.run(i), start=False,
                config={"peering": {"mdns": True, "seeds": []},
                        "dns": {"servers": ["127.0.0.1:9"], "timeout": "1s"}},
            )
            nodes.append(node)
        for node in nodes[:2]:
            harness.started.append(node)
            node.start()
        ids = [node_id(n)[:16] for n in nodes[:2]]
        wait_until("the first two found each other",
                   lambda: ids[1] in peers_joined(nodes[0]) and ids[0] in peers_joined(nodes[1]),
                   20)
        third = nodes[2]
        harness.started.append(third)
        third.start()
        ids.append(node_id(third)[:16])
        took = wait_until(
            "the third knows both and both know it",
            lambda: peers_joined(third) >= set(ids[:2])
            and all(ids[2] in peers_joined(n) for n in nodes[:2]),
            20,
        )
        print(f"found by mDNS {took:.1f} s after start")
        assert "mDNS: announcing and browsing _freecall._udp.local." in third.log_text()
        assert re.search(r"seed 10\.77\.0\.[12]:\d+ from mDNS", third.log_text())
        for node in nodes:  # stopped inside the namespaces' lifetime
            node.stop()
