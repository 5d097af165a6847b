"""The DNS edge without a network: the TTL cache on virtual time, and AsyncDns over a fake
dnspython resolver on a virtual-time event loop (timeouts are exact and take no real time)."""

from __future__ import annotations

import asyncio
import math
from typing import Any, cast

import dns.asyncresolver
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from freecall.routing.dns import AsyncDns, DnsCache, drive, negative_ttl
from freecall.routing.plan import (
    FAILURE,
    NXDOMAIN,
    TIMEOUT,
    Answer,
    Answers,
    Naptr,
    Outcome,
    Plan,
    Query,
    Srv,
    ask,
)
from routing.fakedns import FakeDns, run_virtual

Q = Query("example.net", "A")


# -- the cache ----------------------------------------------------------------------------------


def test_positive_answers_live_for_their_ttl() -> None:
    cache = DnsCache()
    cache.put(Q, Answer(("192.0.2.1",)), 30, now=100.0)
    assert cache.get(Q, 129.9) == Answer(("192.0.2.1",))
    assert cache.get(Q, 130.0) is None  # expired exactly at now + ttl
    assert len(cache) == 0


def test_ttls_are_capped() -> None:
    cache = DnsCache(max_ttl=60, max_negative_ttl=10)
    cache.put(Q, Answer(("192.0.2.1",)), 86400, now=0)
    cache.put(Query("gone.example", "A"), NXDOMAIN, 3600, now=0)
    cache.put(Query("empty.example", "A"), Answer(), 3600, now=0)  # NODATA is negative too
    assert cache.get(Q, 59) is not None and cache.get(Q, 60) is None
    assert cache.get(Query("gone.example", "A"), 9.9) is NXDOMAIN
    assert cache.get(Query("gone.example", "A"), 10) is None
    assert cache.get(Query("empty.example", "A"), 10) is None


def test_uncacheable_answers() -> None:
    cache = DnsCache()
    cache.put(Q, NXDOMAIN, None, now=0)  # no SOA: RFC 2308 section 5 SHOULD NOT cache
    cache.put(Q, Answer(("192.0.2.1",)), 0, now=0)  # TTL 0: use once
    cache.put(Q, TIMEOUT, 30, now=0)  # a timeout is never cached
    assert len(cache) == 0


def test_cache_is_bounded_least_recently_used_first() -> None:
    cache = DnsCache(max_entries=3)
    for i in range(3):
        cache.put(Query(f"h{i}.example", "A"), Answer((f"192.0.2.{i}",)), 60, now=0)
    assert cache.get(Query("h0.example", "A"), 1) is not None  # h0 is now the most recent
    cache.put(Query("h3.example", "A"), Answer(("192.0.2.3",)), 60, now=1)
    assert len(cache) == 3
    assert cache.get(Query("h1.example", "A"), 1) is None  # the least recently used went
    assert cache.get(Query("h0.example", "A"), 1) is not None
    assert cache.stats.evictions == 1
    # expired entries go before live ones
    small = DnsCache(max_entries=3)
    small.put(Query("short.example", "A"), Answer(("192.0.2.9",)), 1, now=0)
    small.put(Query("b.example", "A"), Answer(("192.0.2.10",)), 60, now=0)
    small.put(Query("c.example", "A"), Answer(("192.0.2.11",)), 60, now=0)
    small.put(Query("d.example", "A"), Answer(("192.0.2.12",)), 60, now=5)
    assert small.stats.evictions == 0 and len(small) == 3
    assert small.get(Query("b.example", "A"), 5) is not None


# -- AsyncDns over a fake dnspython resolver ----------------------------------------------------


def add_rrset(message: dns.message.Message, section: list[dns.rrset.RRset],
              rrset: dns.rrset.RRset) -> None:
    """Through find_rrset, so the message's index knows the rrset."""
    target = message.find_rrset(section, rrset.name, rrset.rdclass, rrset.rdtype, create=True)
    for rdata in rrset:
        target.add(rdata, rrset.ttl)


def make_answer(name: str, rdtype: str, texts: list[str], ttl: int) -> dns.resolver.Answer:
    query = dns.message.make_query(name, rdtype)
    response = cast(dns.message.QueryMessage, dns.message.make_response(query))
    add_rrset(response, response.answer, dns.rrset.from_text(name, ttl, "IN", rdtype, *texts))
    return dns.resolver.Answer(dns.name.from_text(name), dns.rdatatype.from_text(rdtype),
                               dns.rdataclass.IN, response)


def make_negative(name: str, rdtype: str, soa_ttl: int | None, minimum: int = 30,
                  nxdomain: bool = False) -> tuple[dns.message.Message, dns.resolver.Answer | None]:
    query = dns.message.make_query(name, rdtype)
    response = cast(dns.message.QueryMessage, dns.message.make_response(query))
    if nxdomain:
        response.set_rcode(dns.rcode.NXDOMAIN)
    if soa_ttl is not None:
        add_rrset(response, response.authority, dns.rrset.from_text(
            "example.net.", soa_ttl, "IN", "SOA",
            f"ns.example.net. hostmaster.example.net. 1 1200 120 1209600 {minimum}"))
    if nxdomain:
        return response, None
    return response, dns.resolver.Answer(dns.name.from_text(name),
                                         dns.rdatatype.from_text(rdtype),
                                         dns.rdataclass.IN, response)


class FakeResolver:
    """Stands in for dns.asyncresolver.Resolver: scripted results, optional delays."""

    def __init__(self) -> None:
        self.results: dict[tuple[str, str], Any] = {}
        self.delays: dict[str, float] = {}
        self.calls: list[tuple[str, str]] = []
        self.active = 0
        self.max_active = 0

    async def resolve(self, qname: str, rdtype: str, **kwargs: Any) -> dns.resolver.Answer:
        name = qname.rstrip(".")
        self.calls.append((name, rdtype))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            delay = self.delays.get(name, 0.0)
            if delay == math.inf:
                await asyncio.sleep(3600)
            elif delay:
                await asyncio.sleep(delay)
            result = self.results[(name, rdtype)]
            if isinstance(result, BaseException):
                raise result
            return cast(dns.resolver.Answer, result)
        finally:
            self.active -= 1


def async_dns(fake: FakeResolver, **kw: Any) -> AsyncDns:
    return AsyncDns(resolver=cast(dns.asyncresolver.Resolver, fake), **kw)


def test_records_are_converted_and_cached_for_their_ttl() -> None:
    fake = FakeResolver()
    fake.results[("example.net", "NAPTR")] = make_answer(
        "example.net.", "NAPTR", ['10 20 "s" "SIP+D2U" "" _sip._udp.example.net.'], 300)
    fake.results[("_sip._udp.example.net", "SRV")] = make_answer(
        "_sip._udp.example.net.", "SRV", ["10 60 5060 sip1.example.net.", "0 0 0 ."], 120)
    clock = [0.0]
    resolver = async_dns(fake, clock=lambda: clock[0])

    async def main() -> None:
        naptr = await resolver.query("Example.NET.", "naptr")
        assert naptr.records == (Naptr(10, 20, "s", "SIP+D2U", "", "_sip._udp.example.net"),)
        srv = await resolver.query("_sip._udp.example.net", "SRV")
        assert set(srv.records) == {Srv(10, 60, 5060, "sip1.example.net"), Srv(0, 0, 0, ".")}
        clock[0] = 119.0
        await resolver.query("_sip._udp.example.net", "SRV")
        assert len(fake.calls) == 2  # from the cache
        clock[0] = 120.0
        await resolver.query("_sip._udp.example.net", "SRV")
        assert len(fake.calls) == 3  # expired: asked again
        assert resolver.stats.cache_hits == 1

    run_virtual(main())


def test_negative_answers_cached_per_rfc2308() -> None:
    fake = FakeResolver()
    response, _ = make_negative("gone.example.net.", "A", soa_ttl=600, minimum=45, nxdomain=True)
    fake.results[("gone.example.net", "A")] = dns.resolver.NXDOMAIN(  # type: ignore[no-untyped-call]
        qnames=[dns.name.from_text("gone.example.net.")],
        responses={dns.name.from_text("gone.example.net."): response})
    _, nodata = make_negative("example.net.", "AAAA", soa_ttl=20, minimum=300)
    fake.results[("example.net", "AAAA")] = nodata
    no_soa, _ = make_negative("nosoa.example.net.", "A", soa_ttl=None, nxdomain=True)
    fake.results[("nosoa.example.net", "A")] = dns.resolver.NXDOMAIN(  # type: ignore[no-untyped-call]
        qnames=[dns.name.from_text("nosoa.example.net.")],
        responses={dns.name.from_text("nosoa.example.net."): no_soa})
    assert negative_ttl(response) == 45  # min(SOA TTL, MINIMUM)
    clock = [0.0]
    resolver = async_dns(fake, clock=lambda: clock[0])

    async def main() -> None:
        assert (await resolver.query("gone.example.net", "A")) == NXDOMAIN
        assert (await resolver.query("example.net", "AAAA")) == Answer()
        assert (await resolver.query("nosoa.example.net", "A")) == NXDOMAIN
        calls = len(fake.calls)
        clock[0] = 19.0
        await resolver.query("gone.example.net", "A")
        await resolver.query("example.net", "AAAA")
        await resolver.query("nosoa.example.net", "A")
        assert len(fake.calls) == calls + 1  # only the SOA-less one was asked again
        clock[0] = 20.0
        await resolver.query("example.net", "AAAA")  # NODATA: min(20, 300) passed
        clock[0] = 45.0
        await resolver.query("gone.example.net", "A")  # NXDOMAIN: min(600, 45) passed
        assert len(fake.calls) == calls + 3

    run_virtual(main())


def test_resolver_failures_are_cached_briefly_timeouts_not_at_all() -> None:
    fake = FakeResolver()
    fake.results[("broken.example", "A")] = dns.resolver.NoNameservers()  # type: ignore[no-untyped-call]
    fake.results[("dead.example", "A")] = dns.resolver.LifetimeTimeout(  # type: ignore[no-untyped-call]
        timeout=1.0, errors=[])
    clock = [0.0]
    resolver = async_dns(fake, clock=lambda: clock[0], failure_ttl=5.0)

    async def main() -> None:
        assert (await resolver.query("broken.example", "A")) is FAILURE
        assert (await resolver.query("dead.example", "A")) is TIMEOUT
        await resolver.query("broken.example", "A")
        await resolver.query("dead.example", "A")
        assert fake.calls.count(("broken.example", "A")) == 1
        assert fake.calls.count(("dead.example", "A")) == 2
        clock[0] = 5.0
        await resolver.query("broken.example", "A")
        assert fake.calls.count(("broken.example", "A")) == 2

    run_virtual(main())


def test_identical_lookups_in_flight_share_one_query() -> None:
    fake = FakeResolver()
    fake.results[("example.net", "A")] = make_answer("example.net.", "A", ["192.0.2.1"], 60)
    fake.delays["example.net"] = 0.3
    resolver = async_dns(fake)

    async def main() -> None:
        answers = await asyncio.gather(*(resolver.query("example.net", "A") for _ in range(50)))
        assert all(a.addresses == ["192.0.2.1"] for a in answers)
        assert fake.calls == [("example.net", "A")]
        assert resolver.stats.coalesced == 49 and resolver.stats.queries == 1

    run_virtual(main())


def test_dead_resolver_times_out_at_the_deadline_and_blocks_nobody() -> None:
    fake = FakeResolver()
    fake.delays["dead.example"] = math.inf
    fake.results[("live.example", "A")] = make_answer("live.example.", "A", ["192.0.2.2"], 60)
    fake.delays["live.example"] = 0.01
    resolver = async_dns(fake, timeout=2.0)
    times: dict[str, float] = {}

    async def timed(name: str, timeout: float | None = None) -> Answer:
        loop = asyncio.get_running_loop()
        start = loop.time()
        answer = await resolver.query(name, "A", timeout)
        times[name if timeout is None else f"{name}/{timeout}"] = loop.time() - start
        return answer

    async def main() -> None:
        dead, short, live = await asyncio.gather(
            timed("dead.example"), timed("dead.example", 0.5), timed("live.example"))
        assert dead is TIMEOUT and short is TIMEOUT
        assert live.addresses == ["192.0.2.2"]

    run_virtual(main())
    assert times["live.example"] == pytest.approx(0.01)
    assert times["dead.example/0.5"] == pytest.approx(0.5)  # the caller's own deadline
    assert times["dead.example"] == pytest.approx(2.0)  # the configured bound


def test_a_caller_giving_up_does_not_cancel_the_shared_query() -> None:
    fake = FakeResolver()
    fake.results[("slow.example", "A")] = make_answer("slow.example.", "A", ["192.0.2.3"], 60)
    fake.delays["slow.example"] = 1.0
    resolver = async_dns(fake, timeout=2.0)

    async def main() -> None:
        impatient = asyncio.create_task(resolver.query("slow.example", "A", 0.2))
        patient = asyncio.create_task(resolver.query("slow.example", "A"))
        assert (await impatient) is TIMEOUT
        assert (await patient).addresses == ["192.0.2.3"]
        assert len(fake.calls) == 1
        # and the answer is now cached for the next caller
        assert (await resolver.query("slow.example", "A", 0)).addresses == ["192.0.2.3"]

    run_virtual(main())


def test_concurrency_is_bounded() -> None:
    fake = FakeResolver()
    for i in range(20):
        fake.results[(f"h{i}.example", "A")] = make_answer(f"h{i}.example.", "A",
                                                           ["192.0.2.1"], 60)
        fake.delays[f"h{i}.example"] = 0.1
    resolver = async_dns(fake, max_inflight=4, timeout=5.0)

    async def main() -> None:
        answers = await asyncio.gather(*(resolver.query(f"h{i}.example", "A")
                                         for i in range(20)))
        assert all(a.outcome is Outcome.OK for a in answers)

    run_virtual(main())
    assert fake.max_active == 4


def test_close_cancels_queries_in_flight() -> None:
    fake = FakeResolver()
    fake.delays["dead.example"] = math.inf
    resolver = async_dns(fake, timeout=30.0)

    async def main() -> None:
        waiting = asyncio.create_task(resolver.query("dead.example", "A"))
        await asyncio.sleep(0.1)
        assert resolver.inflight == 1
        await resolver.close()
        assert resolver.inflight == 0
        with pytest.raises(asyncio.CancelledError):
            await waiting

    run_virtual(main())


def test_drive_bounds_a_whole_plan() -> None:
    """A plan of several rounds ends within the overall timeout: once it is spent, the rest
    is answered TIMEOUT at once."""
    fake = FakeDns().a("one.example", "192.0.2.1")
    fake.hang.add("two.example")
    rounds: list[float] = []

    def plan() -> Plan[tuple[Answers, Answers]]:
        loop = asyncio.get_event_loop()
        first = yield from ask(Query("two.example", "A"))
        rounds.append(loop.time())
        second = yield from ask(Query("one.example", "A"), Query("two.example", "AAAA"))
        rounds.append(loop.time())
        return first, second

    async def main() -> tuple[Answers, Answers]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await drive(plan(), fake, timeout=1.5)
        rounds.insert(0, start)
        return result

    first, second = run_virtual(main())
    assert first[Query("two.example", "A")] is TIMEOUT
    assert second[Query("one.example", "A")].addresses == ["192.0.2.1"]
    assert second[Query("two.example", "AAAA")] is TIMEOUT
    start, after_first, after_second = rounds
    assert after_first - start == pytest.approx(1.5)
    assert after_second == after_first  # no time left: answered at once
