"""RFC 3263 section 4 target selection and RFC 2782 SRV ordering, against a fake zone."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from freecall.routing.plan import (
    FAILURE,
    TIMEOUT,
    Answer,
    Naptr,
    Outcome,
    Query,
    Srv,
    ask,
    parallel,
    run_sync,
)
from freecall.routing.rfc3263 import (
    Hop,
    Located,
    locate,
    order_srv,
    select_naptr,
    uri_transport,
)
from freecall.sip.uri import SipUri, parse_sip_uri
from routing.fakedns import FakeDns


def run(dns: FakeDns, uri: str, *, seed: int = 1, **kw: object) -> Located:
    return run_sync(locate(parse_sip_uri(uri), rng=random.Random(seed), **kw), dns.answer)  # type: ignore[arg-type]


def hops(located: Located) -> list[str]:
    return [f"{h.transport}:{h.address}:{h.port}" for h in located.hops]


def rfc3263_example() -> FakeDns:
    """The zone of RFC 3263 section 4.1: TLS, TCP and UDP in that order of preference."""
    return (
        FakeDns()
        .naptr("example.com",
               (50, 50, "s", "SIPS+D2T", "", "_sips._tcp.example.com"),
               (90, 50, "s", "SIP+D2T", "", "_sip._tcp.example.com"),
               (100, 50, "s", "SIP+D2U", "", "_sip._udp.example.com"))
        .srv("_sips._tcp.example.com", (0, 0, 5061, "server1.example.com"))
        .srv("_sip._tcp.example.com", (0, 1, 5060, "server1.example.com"),
             (0, 2, 5060, "server2.example.com"))
        .srv("_sip._udp.example.com", (0, 0, 5060, "server1.example.com"))
        .a("server1.example.com", "192.0.2.1")
        .a("server2.example.com", "192.0.2.2")
    )


# -- 4.1 / 4.2: numeric targets, explicit ports and transports ----------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sip:bob@192.0.2.7", "udp:192.0.2.7:5060"),
        ("sips:bob@192.0.2.7", "tls:192.0.2.7:5061"),
        ("sip:bob@192.0.2.7:5070;transport=tcp", "tcp:192.0.2.7:5070"),
        ("sip:bob@192.0.2.7;transport=tls", "tls:192.0.2.7:5061"),
        ("sips:bob@192.0.2.7;transport=tcp", "tls:192.0.2.7:5061"),
        ("sip:bob@[2001:db8::7]:5099", "udp:2001:db8::7:5099"),
        ("sip:bob@example.com;maddr=192.0.2.9", "udp:192.0.2.9:5060"),
    ],
)
def test_numeric_target_needs_no_lookup(uri: str, expected: str) -> None:
    dns = FakeDns()
    assert hops(run(dns, uri)) == [expected]
    assert dns.asked == []  # 4.2: "If TARGET is a numeric IP address, the client uses that address"


def test_explicit_port_means_a_and_aaaa_only() -> None:
    dns = rfc3263_example().a("example.com", "192.0.2.10", "2001:db8::10")
    located = run(dns, "sip:bob@example.com:5080")
    assert hops(located) == ["udp:192.0.2.10:5080", "udp:2001:db8::10:5080"]
    assert dns.asked_types("example.com") == ["A", "AAAA"]  # no NAPTR, no SRV (4.2)


def test_explicit_transport_queries_that_srv_only() -> None:
    dns = rfc3263_example()
    located = run(dns, "sip:bob@example.com;transport=tcp")
    assert {h.transport for h in located.hops} == {"tcp"}
    assert "example.com/NAPTR" not in dns.asked_names()
    assert dns.asked[0] == Query("_sip._tcp.example.com", "SRV")


@pytest.mark.parametrize("uri", ["sip:bob@example.com;transport=tls",
                                 "sips:bob@example.com;transport=tcp"])
def test_tls_uses_the_sips_service(uri: str) -> None:
    dns = rfc3263_example()
    assert hops(run(dns, uri)) == ["tls:192.0.2.1:5061"]
    assert dns.asked[0] == Query("_sips._tcp.example.com", "SRV")


def test_explicit_transport_without_srv_falls_back_to_a_at_default_port() -> None:
    dns = FakeDns().a("plain.example", "192.0.2.30")
    assert hops(run(dns, "sip:bob@plain.example;transport=tcp")) == ["tcp:192.0.2.30:5060"]
    assert hops(run(dns, "sip:bob@plain.example;transport=tls")) == ["tls:192.0.2.30:5061"]


def test_sips_over_udp_and_unknown_transports_are_refused() -> None:
    for uri in ("sips:bob@192.0.2.7;transport=udp", "sip:bob@example.com;transport=sctp"):
        located = run(FakeDns(), uri)
        assert located.hops == ()
        assert located.errors == {Outcome.FAILURE}
    assert uri_transport(parse_sip_uri("sips:a@b;transport=udp")) == "sips+udp"


def test_transport_the_node_lacks_is_refused() -> None:
    located = run(FakeDns(), "sip:bob@192.0.2.7;transport=tls", transports=("udp",))
    assert located.hops == () and Outcome.FAILURE in located.errors


# -- 4.1: NAPTR ---------------------------------------------------------------------------------


def test_rfc3263_example_client_with_tcp_and_udp_uses_tcp() -> None:
    """RFC 3263 section 4.1: "Since the client supports TCP and UDP, TCP will be used, targeted
    to a host determined by an SRV lookup of _sip._tcp.example.com"."""
    dns = rfc3263_example()
    located = run(dns, "sip:user@example.com", transports=("tcp", "udp"))
    assert {h.transport for h in located.hops} == {"tcp"}
    assert sorted(hops(located)) == ["tcp:192.0.2.1:5060", "tcp:192.0.2.2:5060"]
    assert dns.asked[:2] == [Query("example.com", "NAPTR"), Query("_sip._tcp.example.com", "SRV")]
    assert "_sip._udp.example.com/SRV" not in dns.asked_names()  # order 100 never considered


def test_rfc3263_example_client_with_tls_prefers_sips() -> None:
    dns = rfc3263_example()
    assert hops(run(dns, "sip:user@example.com")) == ["tls:192.0.2.1:5061"]


def test_sips_uri_discards_services_without_sips() -> None:
    dns = (FakeDns()
           .naptr("example.net", (10, 10, "s", "SIP+D2U", "", "_sip._udp.example.net"))
           .srv("_sip._udp.example.net", (0, 0, 5060, "h.example.net"))
           .a("h.example.net", "192.0.2.41")
           .a("example.net", "192.0.2.40"))
    # no usable NAPTR: SRV _sips._tcp only (none), then A at the TLS port
    assert hops(run(dns, "sips:bob@example.net")) == ["tls:192.0.2.40:5061"]
    assert "_sip._udp.example.net/SRV" not in dns.asked_names()
    assert "_sips._tcp.example.net/SRV" in dns.asked_names()


def test_select_naptr_filters_and_sorts() -> None:
    records = [
        Naptr(20, 5, "s", "SIP+D2U", "", "_sip._udp.x"),
        Naptr(10, 50, "s", "SIP+D2T", "", "_sip._tcp.x"),
        Naptr(10, 10, "S", "sips+d2t", "", "_sips._tcp.x"),
        Naptr(5, 5, "s", "SIP+D2S", "", "_sip._sctp.x"),  # SCTP: not supported
        Naptr(5, 5, "s", "SIP+D2W", "", "_sip._ws.x"),  # WebSocket: not supported
        Naptr(5, 5, "u", "SIP+D2U", "!^.*$!sip:x!", "."),  # not an "s" rule
        Naptr(5, 5, "s", "E2U+sip", "", "_sip._udp.x"),  # another application
    ]
    chosen = select_naptr(records, secure=False, transports=("tls", "tcp", "udp"))
    assert [(r.order, r.preference, t) for r, t in chosen] == [
        (10, 10, "tls"), (10, 50, "tcp"), (20, 5, "udp")]
    assert [t for _, t in select_naptr(records, secure=True, transports=("tls", "tcp"))] == ["tls"]
    assert [t for _, t in select_naptr(records, secure=False, transports=("udp",))] == ["udp"]


def test_naptr_same_order_records_are_failover_in_preference_order() -> None:
    dns = (FakeDns()
           .naptr("example.org",
                  (10, 20, "s", "SIP+D2U", "", "_sip._udp.example.org"),
                  (10, 10, "s", "SIP+D2T", "", "_sip._tcp.example.org"))
           .srv("_sip._tcp.example.org", (0, 0, 5060, "t.example.org"))
           .srv("_sip._udp.example.org", (0, 0, 5060, "u.example.org"))
           .a("t.example.org", "192.0.2.51")
           .a("u.example.org", "192.0.2.52"))
    assert hops(run(dns, "sip:bob@example.org")) == ["tcp:192.0.2.51:5060", "udp:192.0.2.52:5060"]
    # both SRV queries go out in one batch
    assert dns.asked[1:3] == [Query("_sip._udp.example.org", "SRV"),
                              Query("_sip._tcp.example.org", "SRV")] or dns.asked[1:3] == [
        Query("_sip._tcp.example.org", "SRV"), Query("_sip._udp.example.org", "SRV")]


def test_naptr_order_leading_nowhere_tries_the_next_order() -> None:
    dns = (FakeDns()
           .naptr("example.org",
                  (10, 10, "s", "SIPS+D2T", "", "_sips._tcp.example.org"),  # no SRV there
                  (20, 10, "s", "SIP+D2U", "", "_sip._udp.example.org"))
           .srv("_sip._udp.example.org", (0, 0, 5062, "u.example.org"))
           .a("u.example.org", "192.0.2.52"))
    assert hops(run(dns, "sip:bob@example.org")) == ["udp:192.0.2.52:5062"]


def test_naptr_replacement_in_another_domain() -> None:
    dns = (FakeDns()
           .naptr("example.com", (10, 10, "s", "SIP+D2U", "", "_sip._udp.school.edu"))
           .srv("_sip._udp.school.edu", (0, 0, 5060, "sip.school.edu"))
           .a("sip.school.edu", "192.0.2.60"))
    assert hops(run(dns, "sip:bob@example.com")) == ["udp:192.0.2.60:5060"]


# -- 4.1 without NAPTR, 4.2 without SRV ---------------------------------------------------------


def test_no_naptr_queries_srv_for_each_supported_transport_at_once() -> None:
    dns = (FakeDns()
           .srv("_sip._udp.example.net", (0, 0, 5060, "u.example.net"))
           .srv("_sip._tcp.example.net", (0, 0, 5060, "t.example.net"))
           .a("u.example.net", "192.0.2.71")
           .a("t.example.net", "192.0.2.72"))
    located = run(dns, "sip:bob@example.net")
    assert hops(located) == ["tcp:192.0.2.72:5060", "udp:192.0.2.71:5060"]  # our preference
    assert dns.asked[1:4] == [Query("_sips._tcp.example.net", "SRV"),
                              Query("_sip._tcp.example.net", "SRV"),
                              Query("_sip._udp.example.net", "SRV")]
    located = run(dns, "sip:bob@example.net", transports=("udp", "tcp"))
    assert hops(located) == ["udp:192.0.2.71:5060", "tcp:192.0.2.72:5060"]


def test_no_srv_uses_a_records_udp_for_sip_tls_for_sips() -> None:
    dns = FakeDns().a("plain.example", "192.0.2.80", "2001:db8::80")
    assert hops(run(dns, "sip:bob@plain.example")) == ["udp:192.0.2.80:5060",
                                                       "udp:2001:db8::80:5060"]
    assert hops(run(dns, "sips:bob@plain.example")) == ["tls:192.0.2.80:5061",
                                                        "tls:2001:db8::80:5061"]
    assert hops(run(dns, "sip:bob@plain.example", ip_versions=(6, 4)))[0] == (
        "udp:2001:db8::80:5060")
    assert hops(run(dns, "sip:bob@plain.example", ip_versions=(4,))) == ["udp:192.0.2.80:5060"]
    # "another transport MAY be used": a node without UDP uses its first transport
    assert hops(run(dns, "sip:bob@plain.example", transports=("tcp",), ip_versions=(4,))) == [
        "tcp:192.0.2.80:5060"]


def test_nxdomain_stops_at_the_naptr_query() -> None:
    dns = FakeDns()
    located = run(dns, "sip:bob@missing.example")
    assert located.hops == () and located.errors == frozenset()
    assert dns.asked == [Query("missing.example", "NAPTR")]  # RFC 8020: nothing below either


def test_srv_target_dot_means_not_available_and_no_a_fallback() -> None:
    dns = (FakeDns()
           .srv("_sip._udp.nosip.example", (0, 0, 0, "."))
           .a("nosip.example", "192.0.2.90"))
    located = run(dns, "sip:bob@nosip.example")
    assert located.hops == () and located.errors == frozenset()
    assert "nosip.example/A" not in dns.asked_names()
    located = run(dns, "sip:bob@nosip.example;transport=udp")
    assert located.hops == ()


def test_unanswered_queries_are_reported() -> None:
    dns = FakeDns().put("slow.example", "NAPTR", TIMEOUT)
    for q in ("_sips._tcp", "_sip._tcp", "_sip._udp"):
        dns.put(f"{q}.slow.example", "SRV", TIMEOUT)
    dns.put("slow.example", "A", TIMEOUT).put("slow.example", "AAAA", TIMEOUT)
    located = run(dns, "sip:bob@slow.example")
    assert located.hops == () and located.errors == {Outcome.TIMEOUT}

    broken = FakeDns().put("broken.example", "NAPTR", FAILURE).a("broken.example", "192.0.2.99")
    located = run(broken, "sip:bob@broken.example")
    # the NAPTR failed but the A record answered: use it, and remember the failure
    assert hops(located) == ["udp:192.0.2.99:5060"]
    assert located.errors == {Outcome.FAILURE}


# -- 4.3: failover order --------------------------------------------------------------------------


def test_srv_priority_then_every_address_of_each_target() -> None:
    dns = (FakeDns()
           .srv("_sip._udp.example.net",
                (20, 0, 5062, "backup.example.net"),
                (10, 0, 5060, "main.example.net"))
           .a("main.example.net", "192.0.2.1", "192.0.2.2")
           .a("backup.example.net", "192.0.2.3"))
    located = run(dns, "sip:bob@example.net;transport=udp")
    assert hops(located) == ["udp:192.0.2.1:5060", "udp:192.0.2.2:5060", "udp:192.0.2.3:5062"]


def test_duplicate_hops_are_tried_once() -> None:
    dns = (FakeDns()
           .srv("_sip._udp.example.net", (10, 0, 5060, "a.example.net"),
                (20, 0, 5060, "b.example.net"))
           .a("a.example.net", "192.0.2.1")
           .a("b.example.net", "192.0.2.1"))
    assert hops(run(dns, "sip:bob@example.net;transport=udp")) == ["udp:192.0.2.1:5060"]


def test_order_srv_priorities_never_mix() -> None:
    records = [Srv(2, 50, 1, "c"), Srv(1, 10, 1, "a"), Srv(1, 90, 1, "b"), Srv(3, 0, 1, "d")]
    rng = random.Random(7)
    for _ in range(200):
        order = order_srv(records, rng)
        assert [s.priority for s in order] == [1, 1, 2, 3]


def test_order_srv_weights_follow_rfc2782_distribution() -> None:
    """RFC 2782: a uniform draw in [0, sum] against running sums.  With weights 10, 20, 70 and
    the records shuffled first, a record is drawn first with probability
    (weight + 1/3) / 101 (each is at the head of the list a third of the time)."""
    records = [Srv(0, 10, 5060, "a"), Srv(0, 20, 5060, "b"), Srv(0, 70, 5060, "c")]
    rng = random.Random(2024)
    draws = 30_000
    first = Counter(order_srv(records, rng)[0].target for _ in range(draws))
    for target, weight in (("a", 10), ("b", 20), ("c", 70)):
        expected = (weight + 1 / 3) / 101
        assert abs(first[target] / draws - expected) < 0.01, (target, first)
    # the second pick among the two left follows their weights too: given "c" first,
    # "b" comes second with probability (20 + 1/2) / 31
    second = Counter(o[1].target for o in (order_srv(records, rng) for _ in range(draws))
                     if o[0].target == "c")
    total = second["a"] + second["b"]
    assert abs(second["b"] / total - 20.5 / 31) < 0.02


def test_order_srv_weight_zero_has_a_very_small_chance() -> None:
    """RFC 2782: "records with weight 0 should have a very small chance of being selected"."""
    records = [Srv(0, 0, 5060, "zero"), Srv(0, 100, 5060, "heavy")]
    rng = random.Random(5)
    draws = 20_000
    first = Counter(order_srv(records, rng)[0].target for _ in range(draws))
    assert 0 < first["zero"] / draws < 0.02  # exactly 1/101 in theory
    # all-zero weights: every order is possible (the shuffle spreads the load)
    flat = [Srv(0, 0, 5060, t) for t in "xyz"]
    seen = Counter(order_srv(flat, rng)[0].target for _ in range(3000))
    assert all(800 < seen[t] < 1200 for t in "xyz")


def test_order_srv_is_reproducible_with_a_seed() -> None:
    records = [Srv(0, w, 5060, f"h{w}") for w in (1, 5, 10, 20, 40)]
    assert order_srv(records, random.Random(99)) == order_srv(records, random.Random(99))


# -- the plan machinery --------------------------------------------------------------------------


def test_parallel_plans_share_one_batch_per_round() -> None:
    dns = FakeDns().a("one.example", "192.0.2.1").a("two.example", "192.0.2.2")
    batches: list[int] = []

    def answer(query: Query) -> Answer:
        return dns.answer(query)

    plans = [locate(SipUri("one.example", port=5060), rng=random.Random(1)),
             locate(SipUri("two.example", port=5060), rng=random.Random(1)),
             locate(SipUri("192.0.2.3"), rng=random.Random(1))]
    combined = parallel(plans)
    batch = next(combined)
    try:
        while True:
            batches.append(len(batch))
            batch = combined.send({q: answer(q) for q in batch})
    except StopIteration as stop:
        results: list[Located] = stop.value
    assert batches == [4]  # A and AAAA of both names, in one round
    assert [r.hops for r in results] == [(Hop("udp", "192.0.2.1", 5060),),
                                         (Hop("udp", "192.0.2.2", 5060),),
                                         (Hop("udp", "192.0.2.3", 5060),)]


def test_ask_deduplicates() -> None:
    plan = ask(Query("a", "A"), Query("a", "A"), Query("b", "A"))
    assert next(plan) == (Query("a", "A"), Query("b", "A"))
