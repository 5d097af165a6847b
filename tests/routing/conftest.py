"""Fixtures for the routing tests: real dnsmasq servers and a black-hole server.

The pure tests need none of them.  The wire tests (marked ``interop``) share, per module:
``dnsmasq``, authoritative for the test zones (negative answers carry an SOA), and
``recursive``, a dnsmasq resolver in front of it that forwards ``slow.invalid`` into the black
hole (so one domain hangs on a resolver that answers everything else).  Ports come from the
harness's allocator; both are stopped at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.dns import BlackHoleDns, Dnsmasq, DnsZone
from harness.ports import PortAllocator
from harness.session import MissingTool

TTL = 30  # every TTL in the zone, and the SOA minimum (negative answers)


@pytest.fixture(scope="module")
def black_hole() -> Iterator[BlackHoleDns]:
    with BlackHoleDns() as server:
        yield server


def wire_zone() -> DnsZone:
    """RFC 3263 and ENUM data on the wire.

    * ``example.test``: NAPTR for TCP (order 10) and UDP (order 20); the TCP SRV set has a
      first target (priority 10) and a backup (priority 20), as for "the first SRV target is
      down, the call still connects via the second";
    * ``plain.test``: an A record only (the RFC 3263 fallback);
    * ENUM: +1 555 0100 -> sip:bob@example.test, +1 555 0101 -> sip:carol@plain.test;
    """
    return (
        DnsZone()
        .host("sip1.example.test", "127.0.0.1")
        .host("sip2.example.test", "127.0.0.2", "::1")
        .host("plain.test", "127.0.0.5")
        .srv("_sip._tcp.example.test", "sip1.example.test", 5070, priority=10, weight=10)
        .srv("_sip._tcp.example.test", "sip2.example.test", 5072, priority=20, weight=10)
        .srv("_sip._udp.example.test", "sip1.example.test", 5070, priority=10)
        .naptr("example.test", 10, 10, "s", "SIP+D2T", replacement="_sip._tcp.example.test")
        .naptr("example.test", 20, 10, "s", "SIP+D2U", replacement="_sip._udp.example.test")
        .enum("+15550100", "sip:bob@example.test")
        .enum("+15550101", "sip:carol@plain.test")
        .naptr("2.0.1.0.5.5.5.1.e164.arpa", 100, 10, "u", "E2U+sip",
               "!^\\+1555(.*)$!sip:\\1@plain.test!")
    )


@pytest.fixture(scope="module")
def dns_servers(tmp_path_factory: pytest.TempPathFactory,
                black_hole: BlackHoleDns) -> Iterator[tuple[Dnsmasq, Dnsmasq]]:
    allocator = PortAllocator()
    block = allocator.block(4)
    run_dir: Path = tmp_path_factory.mktemp("dnsmasq")
    auth = Dnsmasq(run_dir, block.take(), wire_zone(), ttl=TTL, name="dnsmasq-auth")
    recursive_zone = (DnsZone(zones=())
                      .forward("slow.invalid", black_hole.address)
                      .forward("", auth.address))
    recursive = Dnsmasq(run_dir, block.take(), recursive_zone, ttl=TTL, name="dnsmasq-recursive")
    started: list[Dnsmasq] = []
    try:
        for server in (auth, recursive):
            server.start()
            started.append(server)
        yield auth, recursive
    except MissingTool as exc:
        pytest.fail(str(exc))
    finally:
        for server in reversed(started):
            server.stop()
        allocator.release_all()


@pytest.fixture(scope="module")
def dnsmasq(dns_servers: tuple[Dnsmasq, Dnsmasq]) -> Dnsmasq:
    """The authoritative server."""
    return dns_servers[0]


@pytest.fixture(scope="module")
def recursive(dns_servers: tuple[Dnsmasq, Dnsmasq]) -> Dnsmasq:
    """A recursive resolver: the test zones through ``dnsmasq``, slow.invalid never answers."""
    return dns_servers[1]
