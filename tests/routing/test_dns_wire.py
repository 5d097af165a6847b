"""Routing against real DNS on the wire: dnsmasq on loopback (NAPTR, SRV, A/AAAA, an ENUM zone),
a black-hole server that never answers, and a domain dnsmasq forwards into that black hole."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest

from freecall.routing.dns import AsyncDns
from freecall.routing.plan import NXDOMAIN, TIMEOUT, Answer, Naptr, Outcome, Srv
from freecall.routing.router import Router
from freecall.sip.message import Request, parse_message
from freecall.sip.proxy import Resolution
from freecall.sip.uri import Uri, parse_uri
from harness.dns import BlackHoleDns, Dnsmasq
from harness.proc import wait_until

pytestmark = pytest.mark.interop

T = TypeVar("T")
BOUND = 0.6  # dns.timeout for the failure tests
SLACK = 0.5  # scheduling slack on a loaded machine


async def timed(aw: Awaitable[T]) -> tuple[T, float]:
    start = time.monotonic()
    result = await aw
    return result, time.monotonic() - start


def client(server: Dnsmasq | BlackHoleDns, **kw: Any) -> AsyncDns:
    return AsyncDns([server.address], **kw)


def test_records_on_the_wire(dnsmasq: Dnsmasq) -> None:
    async def main() -> dict[str, Answer]:
        dns = client(dnsmasq, timeout=2.0)
        names = {
            "a": ("sip2.example.test", "A"),
            "aaaa": ("sip2.example.test", "AAAA"),
            "srv": ("_sip._tcp.example.test", "SRV"),
            "naptr": ("example.test", "NAPTR"),
            "enum": ("0.0.1.0.5.5.5.1.e164.arpa", "NAPTR"),
        }
        answers = await asyncio.gather(*(dns.query(n, t) for n, t in names.values()))
        await dns.close()
        return dict(zip(names, answers, strict=True))

    got = asyncio.run(main())
    assert got["a"].addresses == ["127.0.0.2"]
    assert got["aaaa"].addresses == ["::1"]
    assert set(got["srv"].records) == {Srv(10, 10, 5070, "sip1.example.test"),
                                       Srv(20, 10, 5072, "sip2.example.test")}
    assert set(got["naptr"].records) == {
        Naptr(10, 10, "s", "SIP+D2T", "", "_sip._tcp.example.test"),
        Naptr(20, 10, "s", "SIP+D2U", "", "_sip._udp.example.test")}
    assert got["enum"].records == (Naptr(100, 10, "u", "E2U+sip",
                                         "!^.*$!sip:bob@example.test!", "."),)


def test_nxdomain_is_fast_and_cached_without_a_second_query(dnsmasq: Dnsmasq) -> None:
    dns = client(dnsmasq, timeout=2.0)

    async def main() -> tuple[Answer, float, Answer]:
        first, took = await timed(dns.query("nope.example.test", "A"))
        wait_until(lambda: dnsmasq.queries("nope.example.test", "A") == 1, 2.0,
                   message="dnsmasq to log the query")
        second = await dns.query("nope.example.test", "A")
        await dns.close()
        return first, took, second

    first, took, second = asyncio.run(main())
    assert first == NXDOMAIN and second == NXDOMAIN
    assert took < 0.5
    assert dns.stats.queries == 1 and dns.stats.cache_hits == 1
    time.sleep(0.1)
    assert dnsmasq.queries("nope.example.test", "A") == 1  # the server saw one query


def test_nodata_is_cached_too(dnsmasq: Dnsmasq) -> None:
    dns = client(dnsmasq, timeout=2.0)

    async def main() -> list[Answer]:
        answers = [await dns.query("plain.test", "NAPTR") for _ in range(3)]
        await dns.close()
        return answers

    answers = asyncio.run(main())
    assert answers == [Answer()] * 3  # NOERROR, no records (RFC 2308 section 2.2)
    assert dns.stats.queries == 1


def test_ttl_expiry_on_virtual_time(dnsmasq: Dnsmasq) -> None:
    clock = [0.0]
    dns = client(dnsmasq, timeout=2.0, clock=lambda: clock[0])
    ttl = dnsmasq.ttl

    async def main() -> None:
        await dns.query("sip1.example.test", "A")
        clock[0] = ttl - 0.5
        await dns.query("sip1.example.test", "A")
        assert dns.stats.queries == 1
        clock[0] = ttl
        await dns.query("sip1.example.test", "A")
        assert dns.stats.queries == 2
        # NXDOMAIN lives for the SOA minimum (dnsmasq sets it to the same TTL)
        await dns.query("gone.plain.test", "A")
        clock[0] = 2 * ttl - 0.5
        await dns.query("gone.plain.test", "A")
        assert dns.stats.queries == 3
        clock[0] = 2 * ttl
        await dns.query("gone.plain.test", "A")
        assert dns.stats.queries == 4
        await dns.close()

    asyncio.run(main())
    wait_until(lambda: dnsmasq.queries("gone.plain.test") == 2, 2.0,
               message="two queries for gone.plain.test")


def test_dead_resolver_times_out_in_bound_while_a_good_one_answers(
        dnsmasq: Dnsmasq, black_hole: BlackHoleDns) -> None:
    async def main() -> tuple[tuple[Answer, float], tuple[Answer, float]]:
        dead = client(black_hole, timeout=BOUND)
        good = client(dnsmasq, timeout=BOUND)
        results = await asyncio.gather(timed(dead.query("example.test", "NAPTR")),
                                       timed(good.query("example.test", "NAPTR")))
        await dead.close()
        await good.close()
        return results[0], results[1]

    (dead, dead_took), (good, good_took) = asyncio.run(main())
    assert dead is TIMEOUT and BOUND - 0.05 <= dead_took <= BOUND + SLACK
    assert good.outcome is Outcome.OK and len(good.records) == 2 and good_took < 0.3
    assert black_hole.received() >= 1  # the query really went out (and was retried)


def test_slow_domain_does_not_block_others_on_the_same_resolver(recursive: Dnsmasq) -> None:
    async def main() -> list[tuple[Answer, float]]:
        dns = client(recursive, timeout=BOUND)
        results = await asyncio.gather(
            timed(dns.query("x.slow.invalid", "NAPTR")),
            timed(dns.query("example.test", "NAPTR")),
            timed(dns.query("sip1.example.test", "A")),
            timed(dns.query("nope.example.test", "AAAA")),
        )
        await dns.close()
        return list(results)

    (slow, slow_took), *others = asyncio.run(main())
    assert slow is TIMEOUT and BOUND - 0.05 <= slow_took <= BOUND + SLACK
    for answer, took in others:
        assert not answer.failed and took < 0.3


# -- the router on the wire -----------------------------------------------------------------------


def router(server: Dnsmasq | BlackHoleDns, deliver: Any = None, *, timeout: float = 2.0,
           **kw: Any) -> Router:
    """A router as the daemon makes it: dns.timeout bounds each query and the whole chain."""
    return Router(client(server, timeout=timeout), deliver or (lambda t, r: None),
                  timeout=timeout, **kw)


def flows(res: Resolution) -> list[str]:
    (target,) = res.targets
    return [str(f) for f in target.flows]


def test_router_rfc3263_failover_list(dnsmasq: Dnsmasq) -> None:
    async def main() -> Resolution:
        return await router(dnsmasq).locate(parse_uri("sip:bob@example.test"))

    res = asyncio.run(main())
    # NAPTR order 10 (TCP) -> SRV priority 10 then 20 -> every address of each target:
    # when the first SRV target is down, the next flow is the second target
    assert res.targets[0].route == "dns"
    assert flows(res) == ["tcp:127.0.0.1:5070", "tcp:127.0.0.2:5072", "tcp:[::1]:5072"]


@pytest.mark.parametrize(
    ("uri", "target", "first_flow"),
    [
        ("tel:+1-555-0100", "sip:bob@example.test", "tcp:127.0.0.1:5070"),
        ("tel:+15550101", "sip:carol@plain.test", "udp:127.0.0.5:5060"),
        ("tel:+15550102", "sip:0102@plain.test", "udp:127.0.0.5:5060"),  # back-reference
        ("sip:+15550101@elsewhere.test;user=phone", "sip:carol@plain.test",
         "udp:127.0.0.5:5060"),
    ],
)
def test_router_enum(dnsmasq: Dnsmasq, uri: str, target: str, first_flow: str) -> None:
    async def main() -> Resolution:
        return await router(dnsmasq).locate(parse_uri(uri))

    res = asyncio.run(main())
    assert res.targets[0].route == "enum"
    assert str(res.targets[0].uri) == target
    assert flows(res)[0] == first_flow


def test_router_static_route_naming_a_host(dnsmasq: Dnsmasq) -> None:
    async def main() -> Resolution:
        r = router(dnsmasq, routes={"partner.example": "sip:plain.test;transport=tcp"})
        return await r.locate(parse_uri("sip:bob@partner.example"))

    res = asyncio.run(main())
    assert res.targets[0].route == "static" and flows(res) == ["tcp:127.0.0.5:5060"]


def _request(uri: Uri) -> Request:
    data = (f"INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5081;branch=z9hG4bKw\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:alice@a.test>;tag=1\r\nTo: <sip:bob@b.test>\r\n"
            "Call-ID: w1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n").encode()
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def test_router_delivers_404_fast_408_in_bound_and_others_meanwhile(
        recursive: Dnsmasq) -> None:
    delivered: dict[int, tuple[Resolution, float]] = {}

    async def main() -> None:
        start = time.monotonic()
        r = router(recursive, lambda t, res: delivered.__setitem__(t, (res, time.monotonic()
                                                                       - start)),
                   timeout=BOUND)
        for ticket, text in ((1, "sip:bob@x.slow.invalid"), (2, "sip:bob@missing.test"),
                             (3, "sip:bob@example.test"), (4, "tel:+15550101")):
            uri = parse_uri(text)
            assert r.resolve(uri, _request(uri), ticket) is None
        while r.pending:
            await asyncio.sleep(0.01)
        await r.close()

    asyncio.run(main())
    slow, slow_at = delivered[1]
    assert slow.status == 408 and BOUND - 0.05 <= slow_at <= BOUND + SLACK
    missing, missing_at = delivered[2]
    assert missing.status == 404 and missing_at < 0.3
    for ticket in (3, 4):
        res, at = delivered[ticket]
        assert res.targets and at < 0.3
