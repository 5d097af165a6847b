"""Calls between daemons, routed by real DNS (issue 4).

Each node is its own "host" on loopback (127.0.0.2, 127.0.0.3, ...) serving its own domain; a
dnsmasq on loopback holds NAPTR, SRV and A records for those domains and an ENUM zone. baresip
users register with their own node and call users of the other node by address and by number.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import Baresip, FreecallDaemon, Harness
from harness.calls import phone, talk_and_hang_up
from harness.dns import BlackHoleDns, Dnsmasq, DnsZone

USERS_A = {"alice": "alice-pw", "carol": "carol-pw"}
USERS_B = {"bob": "bob-pw"}


@dataclass
class Mesh:
    a: FreecallDaemon
    b: FreecallDaemon
    dns: Dnsmasq  # the authoritative server (what it was asked)
    run_dir: Path


def zone_for(a: FreecallDaemon, b: FreecallDaemon, dead_port: int) -> DnsZone:
    zone = DnsZone()
    for node, domain in ((a, "a.test"), (b, "b.test")):
        host = f"sip.{domain}"
        zone.host(host, node.public_host)
        zone.naptr(domain, 10, 10, "s", "SIP+D2U", replacement=f"_sip._udp.{domain}")
        zone.srv(f"_sip._udp.{domain}", host, node.public_port)
    # failover.test: its first SRV target refuses TCP, the second is node B
    zone.host("down.failover.test", "127.0.0.9")
    zone.host("up.failover.test", b.public_host)
    zone.srv("_sip._tcp.failover.test", "down.failover.test", dead_port, priority=10)
    zone.srv("_sip._tcp.failover.test", "up.failover.test", b.public_port, priority=20)
    # tls.test: node B over TLS only (RFC 3263 NAPTR SIPS+D2T)
    zone.host("sip.tls.test", b.public_host)
    zone.naptr("tls.test", 10, 10, "s", "SIPS+D2T", replacement="_sips._tcp.tls.test")
    zone.srv("_sips._tcp.tls.test", "sip.tls.test", b.tls_port)
    # ENUM: +1 555 0100 is bob
    zone.enum("+15550100", "sip:bob@b.test")
    return zone


@pytest.fixture
def mesh(harness: Harness) -> Iterator[Mesh]:
    block = harness.pool.block()
    dns_port, resolver_port, dead_port = block.take(1), block.take(1), block.take(1)
    with BlackHoleDns() as hole:
        auth_dns = harness.run_dir / "dns"
        auth_dns.mkdir(parents=True, exist_ok=True)
        resolver_dir = harness.run_dir / "resolver"
        resolver_dir.mkdir(parents=True, exist_ok=True)
        a = harness.daemon("a", users=USERS_A, domains=["a.test"], public_host="127.0.0.2",
                           start=False)
        b = harness.daemon(
            "b", users=USERS_B, domains=["b.test", "failover.test", "tls.test"],
            public_host="127.0.0.3", start=False,
        )
        with Dnsmasq(auth_dns, dns_port, zone_for(a, b, dead_port), ttl=30) as server:
            # the nodes ask a recursive dnsmasq: slow.invalid goes to a server that never
            # answers, everything else to the authoritative one
            resolver_zone = (DnsZone(zones=()).forward("slow.invalid", hole.address)
                             .forward("", server.address))
            with Dnsmasq(resolver_dir, resolver_port, resolver_zone) as resolver:
                dns = {"dns": {"servers": [f"127.0.0.1:{resolver_port}"], "timeout": "2s"}}
                for node in (a, b):
                    node.extra_config.update(dns)
                    harness.started.append(node)
                    node.start()
                del resolver
                yield Mesh(a, b, server, harness.run_dir)


def test_call_by_address_through_naptr_srv_and_a(
    mesh: Mesh, baresip: Callable[..., Baresip]
) -> None:
    alice = phone(baresip, mesh.a, "alice", USERS_A["alice"], "a.test", 440)
    bob = phone(baresip, mesh.b, "bob", USERS_B["bob"], "b.test", 880)
    alice.dial("sip:bob@b.test")
    talk_and_hang_up(alice, bob, 880, 440)
    log_a, log_b = mesh.a.log_text(), mesh.b.log_text()
    assert "sip:alice@a.test -> sip:bob@b.test out" in log_a
    assert "sip:alice@a.test -> sip:bob@b.test in" in log_b
    assert mesh.dns.queries("b.test", "NAPTR") >= 1


def test_call_by_number_through_enum(mesh: Mesh, baresip: Callable[..., Baresip]) -> None:
    alice = phone(baresip, mesh.a, "alice", USERS_A["alice"], "a.test", 440)
    bob = phone(baresip, mesh.b, "bob", USERS_B["bob"], "b.test", 880)
    alice.dial("sip:+15550100@a.test;user=phone")
    talk_and_hang_up(alice, bob, 880, 440)
    assert mesh.dns.queries("0.0.1.0.5.5.5.1.e164.arpa", "NAPTR") >= 1


def test_failover_to_the_second_srv_target(mesh: Mesh, baresip: Callable[..., Baresip]) -> None:
    alice = phone(baresip, mesh.a, "alice", USERS_A["alice"], "a.test", 440)
    bob = phone(baresip, mesh.b, "bob", USERS_B["bob"], "b.test", 880)
    alice.dial("sip:bob@failover.test")
    talk_and_hang_up(alice, bob, 880, 440)


def test_missing_domain_fails_fast_and_a_dead_resolver_within_its_bound(
    mesh: Mesh, baresip: Callable[..., Baresip]
) -> None:
    alice = phone(baresip, mesh.a, "alice", USERS_A["alice"], "a.test", 440)
    carol = phone(baresip, mesh.a, "carol", USERS_A["carol"], "a.test", 660)
    bob = phone(baresip, mesh.b, "bob", USERS_B["bob"], "b.test", 880)
    start = time.monotonic()
    alice.dial("sip:nobody@nowhere.test")
    closed = alice.wait_event("CALL_CLOSED", 5)
    assert "404" in str(closed) and time.monotonic() - start < 2.0
    time.sleep(1.1)  # baresip names its recordings by the second
    start = time.monotonic()
    alice.dial("sip:somebody@slow.invalid")
    carol.dial("sip:bob@b.test")  # meanwhile another call goes through
    carol.wait_event("CALL_ESTABLISHED", 5)
    bob.wait_event("CALL_ESTABLISHED", 5)
    assert time.monotonic() - start < 2.0  # not held up by the hanging lookup
    closed = alice.wait_event("CALL_CLOSED", 6)
    elapsed = time.monotonic() - start
    assert ("408" in str(closed) or "503" in str(closed)) and 1.5 < elapsed < 4.0
    carol.hangup()
    bob.wait_event("CALL_CLOSED", 5)


def test_signalling_between_nodes_is_tls_on_the_wire(
    mesh: Mesh, baresip: Callable[..., Baresip]
) -> None:
    capture = mesh.run_dir / "nodes.pcap"
    # Only these two nodes' SIP ports: other daemons on 127.0.0.x (benchmarks, a parallel
    # run) must not count as clear signalling of ours.
    ports = " or ".join(f"port {p}" for node in (mesh.a, mesh.b)
                        for p in (node.public_port, node.tls_port))
    tcpdump = subprocess.Popen(
        ["tcpdump", "-i", "lo", "-U", "-s0", "-w", str(capture), "-Z", "root",
         f"host 127.0.0.2 and host 127.0.0.3 and ({ports})"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        alice = phone(baresip, mesh.a, "alice", USERS_A["alice"], "a.test", 440)
        bob = phone(baresip, mesh.b, "bob", USERS_B["bob"], "tls.test", 880)
        alice.dial("sip:bob@tls.test")
        talk_and_hang_up(alice, bob, 880, 440)
        time.sleep(0.5)
    finally:
        tcpdump.terminate()
        tcpdump.wait(5)
    data = capture.read_bytes()
    assert len(data) > 2000  # the signalling between the nodes was captured
    for clear in (b"SIP/2.0", b"INVITE sip:", b"bob@", b"Via:"):
        assert clear not in data, f"{clear!r} in clear between the nodes"
    # node A saw node B's TLS identity: the key of the certificate B generated on first start
    from freecall.tls import certificate_fingerprint

    cert = (mesh.b.state_dir / "tls" / "cert.pem").read_bytes()
    assert f"peer key sha256:{certificate_fingerprint(cert)}" in mesh.a.log_text()
