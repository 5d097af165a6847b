"""The peer node's host-cache record as a source of its OpenPGP key (issue 7, build 2).

Node A (127.0.0.2, a.test, alice) and node B (127.0.0.3, b.test, bob) have no static routes
and no DNS: A's only seed is B's gossip address, so each learns the other's signed record,
which names the fingerprint of the key that signs the node's SAS hashes. A first call between
them is routed by the host cache and, with no key ever exchanged or pinned, ends ``verified``
on both sides: the key each offers in its SDP is the one the other's record names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import Baresip, Harness, wait_until
from harness.calls import USERS_A, USERS_B, Nodes, phone, static_pair, talk_and_hang_up
from harness.keys import keys_cli, wait_outcomes
from harness.mitm import Mitm, make_gpg_key, stop_gpg_agent

pytestmark = pytest.mark.interop


@pytest.fixture
def mesh(harness: Harness) -> Nodes:
    nodes = static_pair(harness, seed=True, static_routes=False, wait_control=True)
    for node, other in ((nodes.a, nodes.b), (nodes.b, nodes.a)):
        wait_until(lambda node=node, other=other: any(  # type: ignore[misc]
            other.public_host in str(p["addresses"]) and p.get("openpgp")
            for p in node.api("GET", "/api/peers")), 20,
            message=f"{node.name} to learn {other.name}'s record")
    return nodes


def fingerprint_of(node_log: str) -> str:
    match = re.search(r"OpenPGP key ([0-9A-F]{40}) signs", node_log)
    assert match, "the daemon logged no OpenPGP key"
    return match.group(1)


def test_a_first_call_between_mesh_peers_verifies_through_their_records(
    mesh: Nodes, baresip: Callable[..., Baresip]
) -> None:
    a, b = mesh.a, mesh.b
    a_key, b_key = fingerprint_of(a.log_text()), fingerprint_of(b.log_text())
    # each record names its node's key, and the peer shows it (/api/peers "openpgp")
    [b_seen] = [p for p in a.api("GET", "/api/peers") if b.public_host in str(p["addresses"])]
    assert b_seen["openpgp"] == b_key
    assert re.search(rf"peering: node \w+ on .*; OpenPGP key {a_key}", a.log_text())

    alice = phone(baresip, a, "alice", USERS_A["alice"], "a.test", 440)
    bob = phone(baresip, b, "bob", USERS_B["bob"], "b.test", 880)
    alice.dial("sip:bob@b.test")
    talk_and_hang_up(alice, bob, 880, 440)
    [(_, outcome_a, why_a, sas_a)] = wait_outcomes(a, 1)
    [(_, outcome_b, why_b, sas_b)] = wait_outcomes(b, 1)
    assert (outcome_a, outcome_b) == ("verified", "verified"), (why_a, why_b)
    assert "host-cache record of node" in why_a and "host-cache record of node" in why_b
    assert sas_a == sas_b
    [call] = a.api("GET", "/api/calls")
    assert call["route"] == "hostcache"
    assert call["security"]["peer_key"] == b_key
    # the key is now pinned, marked as learnt from a record
    rows = json.loads(keys_cli(a, "show", "--json"))
    assert [(r["pinned_for"], r["pin"]) for r in rows if r["fingerprint"] == b_key] == \
        [(["bob@b.test"], "record")]


def test_an_attacker_at_the_peers_address_is_caught_on_the_first_call(
    harness: Harness, baresip: Callable[..., Baresip], tmp_path: Path
) -> None:
    """The attacker (tests/harness/mitm.py, mode ``own``) sits on B's host (127.0.0.3, as one
    who intercepts B's traffic would), terminates ZRTP on both legs, replaces the key B
    offers by his own (with a user ID for bob@b.test) and signs with it. Without a record this
    first call would be ``trusted-first-use`` with his key pinned (test_mitm.py); with B's
    record naming B's key, A says ``mitm-suspected`` on the first call and ends it."""
    home = tmp_path / "mallory"
    try:
        a = harness.daemon("a", users=USERS_A, domains=["a.test"], public_host="127.0.0.2",
                           start=False)
        b = harness.daemon("b", users=USERS_B, domains=["b.test"], public_host="127.0.0.3",
                           start=False)
        mitm = Mitm(harness, a, b, mode="own", host=b.public_host, offered_key="own",
                    gpg_home=home, gpg_key=make_gpg_key(home, "bob@b.test"))
        mitm.point_routes("a.test", "b.test")
        mitm.start()
        a.extra_config["peering"] = {"seeds": [f"{b.public_host}:{b.peering_port}"]}
        for node in (a, b):
            node.extra_config["dns"] = {"servers": ["127.0.0.1:9"], "timeout": "1s"}
            harness.started.append(node)
            node.start(wait_control=True)
        wait_until(lambda: any(b.public_host in str(p["addresses"]) and p.get("openpgp")
                               for p in a.api("GET", "/api/peers")), 20,
                   message="A to learn B's record")
        b_key = fingerprint_of(b.log_text())

        alice = phone(baresip, a, "alice", USERS_A["alice"], "a.test", 440)
        bob = phone(baresip, b, "bob", USERS_B["bob"], "b.test", 880)
        alice.dial("sip:bob@b.test")
        [(_, outcome, why, _)] = wait_outcomes(a, 1, timeout=20)
        assert outcome == "mitm-suspected", why
        assert "host-cache record of node" in why and b_key in why, why
        alice.wait_event("CALL_CLOSED", 10)  # on_mitm: hangup
        bob.wait_event("CALL_CLOSED", 10)
        pins = [r["pinned_for"] for r in json.loads(keys_cli(a, "show", "--json"))]
        assert not any("bob@b.test" in pinned for pinned in pins), pins  # nothing pinned
    finally:
        stop_gpg_agent(home)
