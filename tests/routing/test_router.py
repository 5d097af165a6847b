"""The routing chain: static routes, host cache, ENUM, RFC 3263; synchronous answers, delivery
of asynchronous ones, deadlines on virtual time, and a real Proxy wired like the daemon."""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest

from freecall.routing.dns import AsyncDns
from freecall.routing.plan import FAILURE, TIMEOUT, Answer, Query, run_sync
from freecall.routing.router import Router, parse_routes, worse
from freecall.sip.flow import Flow
from freecall.sip.message import Request, Response, parse_message
from freecall.sip.proxy import Listener, Proxy, ProxySettings, Resolution, Side
from freecall.sip.transaction import TransactionLayer
from freecall.sip.uri import SipUri, Uri, parse_sip_uri, parse_uri
from routing.fakedns import FakeDns, run_virtual

ENUM_DOMAIN = "0.0.1.0.5.5.5.1.e164.arpa"  # +15550100


def zone() -> FakeDns:
    return (
        FakeDns()
        .naptr("example.net",
               (10, 10, "s", "SIP+D2U", "", "_sip._udp.example.net"))
        .srv("_sip._udp.example.net",
             (10, 0, 5070, "sip1.example.net"),
             (20, 0, 5072, "sip2.example.net"))
        .a("sip1.example.net", "192.0.2.1")
        .a("sip2.example.net", "192.0.2.2", "2001:db8::2")
        .a("gw.example.org", "192.0.2.50")
        .a("plain.example", "192.0.2.60")
        .naptr(ENUM_DOMAIN, (100, 10, "u", "E2U+sip", "!^.*$!sip:bob@example.net!", "."))
    )


class Peers:
    """A host cache stand-in."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def next_hops(self, key: str) -> Sequence[SipUri]:
        self.asked.append(key)
        return [parse_sip_uri(u) for u in self.table.get(key, [])]

    def prepare(self, keys: Sequence[str]) -> Awaitable[object] | None:
        return None


class SlowMesh(Peers):
    """A host cache that learns ``learn`` (key -> URIs) ``after`` seconds into a lookup."""

    def __init__(self, learn: dict[str, list[str]], after: float) -> None:
        super().__init__({})
        self.learn = learn
        self.after = after
        self.prepared: list[tuple[str, ...]] = []

    def prepare(self, keys: Sequence[str]) -> Awaitable[object] | None:
        self.prepared.append(tuple(keys))
        return self._lookup()

    async def _lookup(self) -> None:
        await asyncio.sleep(self.after)
        self.table.update(self.learn)


def make_router(dns: FakeDns | None = None, deliver: Any = None, **kw: Any) -> Router:
    return Router(dns or zone(), deliver or (lambda ticket, res: None),
                  rng=random.Random(1), **kw)


def plan_sync(router: Router, uri: str, dns: FakeDns) -> Resolution:
    return run_sync(router.plan(parse_uri(uri)), dns.answer)


def flows(resolution: Resolution) -> list[str]:
    (target,) = resolution.targets
    return [str(f) for f in target.flows]


# -- the chain, synchronously ---------------------------------------------------------------------


def test_rfc3263_route_gives_the_failover_list() -> None:
    dns = zone()
    res = plan_sync(make_router(dns), "sip:bob@example.net", dns)
    (target,) = res.targets
    assert target.route == "dns" and str(target.uri) == "sip:bob@example.net"
    assert flows(res) == ["udp:192.0.2.1:5070", "udp:192.0.2.2:5072", "udp:[2001:db8::2]:5072"]


def test_max_flows_and_address_families() -> None:
    dns = zone()
    assert flows(plan_sync(make_router(dns, max_flows=2), "sip:bob@example.net", dns)) == [
        "udp:192.0.2.1:5070", "udp:192.0.2.2:5072"]
    assert flows(plan_sync(make_router(dns, ip_versions=(4,)), "sip:bob@example.net", dns)) == [
        "udp:192.0.2.1:5070", "udp:192.0.2.2:5072"]


def test_static_routes_win_user_before_domain() -> None:
    dns = zone()
    router = make_router(dns, routes={
        "example.net": "sip:192.0.2.20:5061;transport=tls",
        "carol@example.net": "sip:192.0.2.21",
        "Example.ORG": "sip:gw.example.org:5080;transport=tcp",
    })
    res = plan_sync(router, "sip:bob@example.net", dns)
    assert flows(res) == ["tls:192.0.2.20:5061"]
    assert res.targets[0].route == "static"
    assert str(res.targets[0].uri) == "sip:bob@example.net"  # the Request-URI is kept
    assert flows(plan_sync(router, "sip:carol@example.net", dns)) == ["udp:192.0.2.21:5060"]
    # a route naming a host is resolved with RFC 3263 itself (explicit port: A/AAAA only)
    assert flows(plan_sync(router, "sip:dave@example.org", dns)) == ["tcp:192.0.2.50:5080"]
    # the static route beats ENUM for a number at that domain too
    assert flows(plan_sync(router, "sip:+15550100@example.net", dns)) == ["tls:192.0.2.20:5061"]


def test_static_route_to_an_address_answers_at_once() -> None:
    router = make_router(routes={"example.net": "sip:192.0.2.20:5061;transport=tls"})
    uri = parse_uri("sip:bob@example.net")
    res = router.resolve(uri, _request(uri), ticket=1)  # no running loop needed: no DNS
    assert res is not None and flows(res) == ["tls:192.0.2.20:5061"]
    ip = parse_uri("sip:bob@198.51.100.7:5062")
    res = router.resolve(ip, _request(ip), ticket=2)
    assert res is not None and flows(res) == ["udp:198.51.100.7:5062"]
    assert res.targets[0].route == "dns"


def test_parse_routes_rejects_non_sip_values() -> None:
    assert str(parse_routes({"A.Test": "sips:gw.a.test"})["a.test"]) == "sips:gw.a.test"
    with pytest.raises(ValueError, match="not a sip"):
        parse_routes({"a.test": "tel:+1555"})


def test_host_cache_after_static_before_dns() -> None:
    dns = zone()
    peers = Peers({"bob@example.net": ["sip:198.51.100.7:5062", "sip:198.51.100.8:5062"],
                   "example.org": ["sip:198.51.100.9:5061;transport=tls"]})
    router = make_router(dns, peers=peers, routes={"static.example": "sip:192.0.2.99"})
    res = plan_sync(router, "sip:bob@example.net", dns)
    assert res.targets[0].route == "hostcache"
    assert flows(res) == ["udp:198.51.100.7:5062", "udp:198.51.100.8:5062"]
    assert flows(plan_sync(router, "sip:anyone@example.org", dns)) == ["tls:198.51.100.9:5061"]
    assert peers.asked[-2:] == ["anyone@example.org", "example.org"]
    res = plan_sync(router, "sip:carol@example.net", dns)  # no peer route: DNS
    assert res.targets[0].route == "dns"
    assert plan_sync(router, "sip:x@static.example", dns).targets[0].route == "static"


def test_host_cache_route_without_address_falls_back_to_dns() -> None:
    dns = zone()
    router = make_router(dns, peers=Peers({"example.net": ["sip:gone.example:5062"]}))
    res = plan_sync(router, "sip:bob@example.net", dns)
    assert res.targets[0].route == "dns"


def test_enum_for_tel_uris() -> None:
    dns = zone()
    res = plan_sync(make_router(dns), "tel:+1-555-0100", dns)
    (target,) = res.targets
    assert target.route == "enum" and str(target.uri) == "sip:bob@example.net"
    assert flows(res)[0] == "udp:192.0.2.1:5070"
    assert dns.asked[0].name == ENUM_DOMAIN


def test_enum_for_numeric_sip_users_then_dns_on_the_host() -> None:
    dns = zone()
    router = make_router(dns)
    res = plan_sync(router, "sip:+15550100@plain.example;user=phone", dns)
    assert res.targets[0].route == "enum" and str(res.targets[0].uri) == "sip:bob@example.net"
    # a number ENUM does not know: RFC 3263 on the URI's own host
    res = plan_sync(router, "sip:+15550199@plain.example", dns)
    assert res.targets[0].route == "dns" and flows(res) == ["udp:192.0.2.60:5060"]
    assert str(res.targets[0].uri) == "sip:+15550199@plain.example"


def test_enum_result_goes_through_static_routes() -> None:
    dns = zone()
    router = make_router(dns, routes={"example.net": "sip:192.0.2.20"})
    res = plan_sync(router, "tel:+15550100", dns)
    assert res.targets[0].route == "enum" and flows(res) == ["udp:192.0.2.20:5060"]


def test_enum_suffixes_configurable_and_off() -> None:
    dns = zone().naptr("0.0.1.0.5.5.5.1.e164.example",
                       (10, 10, "u", "E2U+sip", "!^.*$!sip:x@plain.example!", "."))
    router = make_router(dns, enum_suffixes=["e164.example", "e164.arpa"])
    assert str(plan_sync(router, "tel:+15550100", dns).targets[0].uri) == "sip:x@plain.example"
    off = make_router(dns, enum_suffixes=[])
    assert plan_sync(off, "tel:+15550100", dns).status == 404


@pytest.mark.parametrize(
    ("uri", "status"),
    [
        ("sip:bob@missing.example", 404),  # NXDOMAIN
        ("tel:+15550111", 404),  # no ENUM record
        ("tel:5550100;phone-context=example.net", 404),  # not a global number
        ("mailto:bob@example.net", 416),
        ("sips:bob@192.0.2.7;transport=udp", 503),  # no TLS over UDP
    ],
)
def test_statuses(uri: str, status: int) -> None:
    dns = zone()
    res = plan_sync(make_router(dns), uri, dns)
    assert res.targets == () and res.status == status and res.reason


class Scripted(FakeDns):
    """Every query gets the same answer."""

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self.fixed = answer

    def answer(self, query: Query) -> Answer:
        self.asked.append(query)
        return self.fixed


def test_resolver_trouble_gives_408_or_503() -> None:
    dead = Scripted(TIMEOUT)
    assert plan_sync(make_router(dead), "sip:bob@example.net", dead).status == 408
    assert plan_sync(make_router(dead), "tel:+15550100", dead).status == 408
    broken = Scripted(FAILURE)
    assert plan_sync(make_router(broken), "sip:bob@example.net", broken).status == 503
    assert worse(404, 503) == 503 and worse(408, 404) == 408 and worse(404, 404) == 404


def test_missing_domain_asks_one_question() -> None:
    dns = zone()
    plan_sync(make_router(dns), "sip:bob@missing.example", dns)
    assert dns.asked_names() == ["missing.example/NAPTR"]


# -- asynchronous delivery ------------------------------------------------------------------------


def _request(uri: Uri) -> Request:
    data = (f"INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5081;branch=z9hG4bKx\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:alice@a.test>;tag=1\r\nTo: <sip:bob@b.test>\r\n"
            "Call-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n").encode()
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def test_lookups_are_delivered_later_and_a_dead_one_blocks_nobody() -> None:
    dns = zone()
    dns.hang.add("dead.example")
    dns.delays["sip2.example.net"] = 0.05
    delivered: list[tuple[int, Resolution, float]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        router = make_router(dns, lambda t, r: delivered.append((t, r, loop.time())),
                             timeout=2.0)
        start = loop.time()
        for ticket, text in ((1, "sip:bob@dead.example"), (2, "sip:bob@example.net"),
                             (3, "sip:bob@missing.example"), (4, "sip:bob@192.0.2.9")):
            uri = parse_uri(text)
            result = router.resolve(uri, _request(uri), ticket)
            assert (result is None) == (ticket != 4)  # an IP literal is answered at once
            assert not delivered  # never from inside resolve()
        assert router.pending == 3
        while router.pending:
            await asyncio.sleep(0.01)
        for i, (ticket, res, when) in enumerate(delivered):
            delivered[i] = (ticket, res, when - start)

    run_virtual(main())
    by_ticket = {t: (r, when) for t, r, when in delivered}
    assert [t for t, _, _ in delivered] == [3, 2, 1]  # the dead lookup comes last
    assert by_ticket[3][0].status == 404 and by_ticket[3][1] == pytest.approx(0.0)
    assert flows(by_ticket[2][0])[0] == "udp:192.0.2.1:5070"
    assert by_ticket[2][1] == pytest.approx(0.05)
    assert by_ticket[1][0].status == 408 and by_ticket[1][1] == pytest.approx(2.0)


@pytest.mark.parametrize(("after", "route", "at"), [(0.3, "hostcache", 0.3),
                                                     (5.0, "dns", 1.0)])
def test_the_mesh_is_asked_first_within_half_the_budget(
    after: float, route: str, at: float
) -> None:
    """A name the host cache does not know: the mesh lookup runs first; an answer in time
    routes by it, a slow mesh gives way to DNS at half the budget. Addresses, static routes
    and names already cached never wait for the mesh."""
    dns = zone()
    mesh = SlowMesh({"example.net": ["sip:198.51.100.7:5062"]}, after)
    delivered: list[tuple[Resolution, float]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        start: float = loop.time()
        router = make_router(dns, lambda t, r: delivered.append((r, loop.time() - start)),
                             peers=mesh, timeout=2.0, routes={"static.example": "sip:192.0.2.99"})
        for text in ("sip:bob@192.0.2.9", "sip:x@static.example"):
            uri = parse_uri(text)
            assert router.resolve(uri, _request(uri), 9) is not None
        uri = parse_uri("sip:bob@example.net")
        assert router.resolve(uri, _request(uri), 1) is None
        while router.pending:
            await asyncio.sleep(0.01)

    run_virtual(main())
    assert mesh.prepared == [("bob@example.net", "example.net")]
    [(res, when)] = delivered
    assert res.targets[0].route == route and when == pytest.approx(at)


def test_the_whole_chain_is_bounded_by_one_timeout() -> None:
    """ENUM times out, then RFC 3263 on the host has no time left: 408 at the bound, not at
    twice the bound."""
    dns = zone()
    dns.hang.update({ENUM_DOMAIN, "plain.example"})

    async def main() -> tuple[Resolution, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        res = await make_router(dns, timeout=1.0).locate(parse_uri("sip:+15550100@plain.example"))
        return res, loop.time() - start

    res, took = run_virtual(main())
    assert res.status == 408 and took == pytest.approx(1.0)


def test_close_cancels_without_delivering() -> None:
    dns = zone()
    dns.hang.add("dead.example")
    delivered: list[int] = []

    async def main() -> None:
        router = make_router(dns, lambda t, r: delivered.append(t), timeout=30.0)
        uri = parse_uri("sip:bob@dead.example")
        assert router.resolve(uri, _request(uri), 7) is None
        assert router.resolve(uri, _request(uri), 8) is None
        await asyncio.sleep(1.0)
        router.cancel(8)
        await router.close()
        assert router.pending == 0
        await asyncio.sleep(60)

    run_virtual(main())
    assert delivered == []


# -- with the proxy, wired as the daemon does -----------------------------------------------------

SOFT = Listener("udp", "127.0.0.1", 5060, Side.SOFTPHONE)
PUBLIC = Listener("udp", "192.0.2.10", 5062, Side.PUBLIC)
ALICE = Flow("udp", ("127.0.0.1", 5081), ("127.0.0.1", 5060))


class Daemonish:
    """The daemon's wiring in miniature: deliver -> proxy.resolved(...) -> pump."""

    def __init__(self, dns: FakeDns, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.layer = TransactionLayer()
        self.sent: list[tuple[Request | Response, Flow]] = []
        self.router = Router(dns, self.on_resolved, transports=("udp",), ip_versions=(4,),
                             timeout=2.0, rng=random.Random(3))
        self.proxy = Proxy(
            self.layer,
            ProxySettings(domains=frozenset({"a.test"}), listeners=(SOFT, PUBLIC),
                          secret=b"k" * 32, realm="a.test",
                          trusted=(ipaddress.ip_network("127.0.0.0/8"),)),
            _NoLocation(),
            resolver=self.router,
            side_of=lambda f: Side.SOFTPHONE if f.remote[0] == "127.0.0.1" else Side.PUBLIC,
            rng=random.Random(1),
        )

    def on_resolved(self, ticket: int, resolution: Resolution) -> None:
        self.proxy.resolved(ticket, resolution, self.loop.time())
        self.pump()

    def feed(self, request: Request, flow: Flow) -> None:
        self.layer.receive(parse_message(request.to_bytes()), flow, self.loop.time())
        self.pump()

    def pump(self) -> None:
        now = self.loop.time()
        while (event := self.layer.next_event()) is not None:
            self.proxy.handle_event(event, now)
        while self.proxy.next_event() is not None:
            pass
        self.sent.extend((parse_message(d), f) for d, f in self.layer.messages_to_send())


class _NoLocation:
    def lookup(self, aor: str, now: float) -> list[Any]:
        return []

    def exists(self, user: str) -> bool:
        return False


def _invite(to: str, branch: str) -> Request:
    data = (f"INVITE {to} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5081;branch={branch};rport\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:alice@a.test>;tag=al1\r\n"
            f"To: <{to}>\r\nCall-ID: {branch}@127.0.0.1\r\nCSeq: 1 INVITE\r\n"
            "Contact: <sip:alice@127.0.0.1:5081>\r\nContent-Length: 0\r\n\r\n").encode()
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def test_proxy_forwards_after_dns_and_answers_404_and_408() -> None:
    dns = zone()
    dns.hang.add("dead.example")

    async def main() -> Daemonish:
        node = Daemonish(dns, asyncio.get_running_loop())
        node.feed(_invite("sip:bob@example.net", "z9hG4bKdns"), ALICE)
        node.feed(_invite("sip:bob@missing.example", "z9hG4bKmiss"), ALICE)
        node.feed(_invite("tel:+15550100", "z9hG4bKenum"), ALICE)
        node.feed(_invite("sip:bob@dead.example", "z9hG4bKdead"), ALICE)
        await asyncio.sleep(2.5)
        await node.router.close()
        return node

    node = run_virtual(main())
    forwarded = [(m, f) for m, f in node.sent if isinstance(m, Request)]
    assert [(str(m.uri), f.remote) for m, f in forwarded] == [
        ("sip:bob@example.net", ("192.0.2.1", 5070)),  # the first SRV target
        ("sip:bob@example.net", ("192.0.2.1", 5070)),  # ENUM -> the same SIP URI
    ]
    finals = sorted((m.status, m.call_id) for m, _ in node.sent
                    if isinstance(m, Response) and m.status >= 200)
    assert finals == [(404, "z9hG4bKmiss@127.0.0.1"), (408, "z9hG4bKdead@127.0.0.1")]


# -- from the configuration --------------------------------------------------------------------


def test_from_config() -> None:
    from freecall.config import parse_config

    config = parse_config(
        "sip:\n"
        "  listen: ['udp:127.0.0.1:5060']\n"
        "  public: ['udp:0.0.0.0:5062', 'tls:0.0.0.0:5061']\n"
        "routes:\n"
        "  example.net: 'sip:192.0.2.20:5061;transport=tls'\n"
        "  bob@example.org: 'sip:192.0.2.21'\n"
        "dns:\n"
        "  servers: ['127.0.0.1:5353']\n"
        "  timeout: 1.5\n"
        "  enum_suffixes: [e164.example, e164.arpa]\n"
    )

    async def main() -> Router:
        router = Router.from_config(config, lambda t, r: None)
        await router.close()
        return router

    router = run_virtual(main())
    assert router.transports == ("tls", "udp")  # those of sip.public, in preference order
    assert router.ip_versions == (4,)
    assert router.timeout == 1.5 and router.enum_suffixes == ("e164.example", "e164.arpa")
    assert set(router.routes) == {"example.net", "bob@example.org"}
    dns = router.dns
    assert isinstance(dns, AsyncDns) and dns.timeout == 1.5
    assert [(ns.address, ns.port) for ns in dns.resolver.nameservers  # type: ignore[union-attr]
            ] == [("127.0.0.1", 5353)]
    uri = parse_uri("sip:bob@example.net")
    res = router.resolve(uri, _request(uri), 1)
    assert res is not None and flows(res) == ["tls:192.0.2.20:5061"]
