"""A short flood against a node with public listeners (issue 11, item 2; bench/flood.py is the
full version at five times the measured capacity, with figures in docs/performance.md).

For 4 s, SIPp sends 2,000 INVITEs a second (sent once, never retransmitted: a flooding tool,
tests/harness/scenarios/flood_invite.xml) from 127.0.0.9 to B's public listener, aimed at a
registered user (the costly case), while a Python blaster sends garbage UDP as fast as it can
to B's media ports and its gossip port. Meanwhile a legitimate caller on 127.0.0.4 places calls
to the same user at 2 a second through the public listener: every one must complete. After it:
calls through the softphone listener complete at 50 a second, RSS grew by less than
``RSS_GROWTH_MB``, the rate limit logged its block once, no error in the log.

The second test floods from three addresses and a new port per INVITE with the rate limit off,
never acknowledging the answers: ``security.calls_per_source`` holds each source to its cap
(``503`` with ``Retry-After`` beyond it), a legitimate caller gets through, and the proxy frees
the held calls itself after 64*T1.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from harness import UAS_NO180, Baresip, Harness, Sipp, SippResult, wait_until
from harness.calls import USERS_A, USERS_B, phone, static_pair
from harness.flood import RssSampler, blaster, rss_mb

SCENARIOS = Path(__file__).resolve().parents[1] / "harness" / "scenarios"
REGISTER_TRUSTED = Path(__file__).parent / "scenarios" / "register_trusted.xml"
FLOOD_SOURCE = "127.0.0.9"
LEGIT_SOURCE = "127.0.0.4"
GARBAGE_SOURCE = "127.0.0.11"
FLOOD_RATE = 2000
FLOOD_SECONDS = 4
RATE_LIMIT = 20  # per 2 s: 20 flood INVITEs pass and hold media until media.rtp_timeout
MEDIA_PORTS = (33000, 33199)  # 50 calls; outside the harness pool and the daemon's default
RSS_GROWTH_MB = 30


def test_flood_leaves_legitimate_calls_and_memory_alone(harness: Harness, sipp: Sipp) -> None:
    b = harness.daemon(
        "b", users={"bench": "bench-pw"}, domains=["b.test"], public_host="127.0.0.3",
        start=False,
        config={"sip": {"trusted": ["127.0.0.1/32"]},
                "log": {"level": "info", "sip_trace": False},
                "openpgp": {"sign": False},
                "media": {"ports": f"{MEDIA_PORTS[0]}-{MEDIA_PORTS[1]}"},
                "security": {"rate_limit": RATE_LIMIT, "rate_window": "2s",
                             "rate_block": "60s"}})
    harness.started.append(b)
    b.start(wait_control=True)
    assert b.process is not None
    pid = b.process.pid
    uas = sipp.start(UAS_NO180, service="bench", calls=1_000_000, time_limit=120,
                     extra_args=["-l", "100000"])
    reg = sipp.run(REGISTER_TRUSTED, str(b.sip_addr), service="bench",
                   variables={"contact_port": str(uas.port)}, time_limit=10)
    assert reg.returncode == 0, reg
    warm = sipp.run("uac", str(b.sip_addr), name="warm", service="bench", calls=100, rate=50,
                    time_limit=30, extra_args=["-recv_timeout", "10s"])
    assert warm.ok and warm.successful == 100, warm
    rss_before = rss_mb(pid)

    public = f"{b.public_host}:{b.public_port}"
    garbage = [(b.public_host, p) for p in range(MEDIA_PORTS[0], MEDIA_PORTS[1] + 1)]
    garbage.append((b.public_host, b.peering_port))
    legit: list[SippResult] = []
    with RssSampler(pid) as sampler, blaster(GARBAGE_SOURCE, garbage, FLOOD_SECONDS) as sent:
        flood = sipp.start(SCENARIOS / "flood_invite.xml", public, name="flood",
                           service="bench", calls=FLOOD_RATE * FLOOD_SECONDS, rate=FLOOD_RATE,
                           time_limit=FLOOD_SECONDS * 3 + 10,
                           extra_args=["-i", FLOOD_SOURCE, "-l", "100000"])
        time.sleep(0.5)
        caller = threading.Thread(target=lambda: legit.append(sipp.run(
            "uac", public, name="legit", service="bench", calls=6, rate=2, time_limit=40,
            extra_args=["-i", LEGIT_SOURCE, "-recv_timeout", "10s"])))
        caller.start()
        flooded = flood.wait()
        caller.join()
    print(f"\n[flood] {flooded.created} INVITEs in {flooded.duration_s:.1f} s, {sent[0]} garbage "
          f"datagrams; RSS {rss_before:.0f} -> peak {sampler.peak:.0f} MB")
    assert flooded.created >= 0.9 * FLOOD_RATE * FLOOD_SECONDS, flooded
    [call] = legit
    assert call.ok and call.successful == 6, (call, call.errors())

    # recovery: calls at the normal rate, memory back within bounds, one block logged
    after = sipp.run("uac", str(b.sip_addr), name="after", service="bench", calls=100, rate=50,
                     time_limit=30, extra_args=["-recv_timeout", "10s"])
    assert after.ok and after.successful == 100, (after, after.errors())
    growth = rss_mb(pid) - rss_before
    print(f"[flood] RSS growth {growth:.1f} MB; legit {call.successful}/6, after "
          f"{after.successful}/100")
    assert growth < RSS_GROWTH_MB, growth
    assert b.metric("freecall_ratelimit_blocked_total") == 1
    log = b.log_text()
    assert log.count(f"rate limit: {FLOOD_SOURCE} sent over") == 1
    for bad in ("Traceback", " ERROR ", "Task exception"):
        assert bad not in log, log[log.find(bad) - 1500:log.find(bad) + 1500]


CAP = 10  # security.calls_per_source
CAP_SOURCES = ("127.0.0.21", "127.0.0.22", "127.0.0.23")
CAP_RATE = 150  # INVITEs/s from each source, a new source port per INVITE
CAP_SECONDS = 3
CAP_PORTS = (33200, 33359)  # 80 pairs: 40 bridged calls (2 pairs each); the flood alone
# would take them all, the cap leaves it 3 x 10
T1 = 0.25  # sip.timers.t1: an answer unacknowledged for 64*T1 = 16 s ends the call


def _labelled(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{{{labels}}} not in /metrics"
    return float(match.group(1))


def test_never_acknowledged_invites_from_many_ports_hit_the_per_source_cap(
    harness: Harness, sipp: Sipp
) -> None:
    """Three sources flood INVITEs to a registered user from a new port each, never ACK the
    answers (SIPp's uas answers at once and never sends BYE), and the rate limit is off:
    each source gets ``CAP`` calls, the rest ``503`` with ``Retry-After``; a caller on
    another address completes its calls meanwhile; after 64*T1 the proxy ends the held calls
    itself (BYE both ways; media.rtp_timeout is set longer so that only this frees them) and
    every port pair is free again."""
    b = harness.daemon(
        "b", users={"bench": "bench-pw"}, domains=["b.test"], public_host="127.0.0.3",
        start=False,
        config={"sip": {"trusted": ["127.0.0.1/32"], "timers": {"t1": f"{T1}s"}},
                "log": {"level": "info", "sip_trace": False},
                "openpgp": {"sign": False},
                "media": {"ports": f"{CAP_PORTS[0]}-{CAP_PORTS[1]}", "rtp_timeout": "120s"},
                "security": {"rate_limit": 0, "calls_per_source": CAP}})
    harness.started.append(b)
    b.start(wait_control=True)
    uas = sipp.start(UAS_NO180, service="bench", calls=1_000_000, time_limit=120,
                     extra_args=["-l", "100000"])
    reg = sipp.run(REGISTER_TRUSTED, str(b.sip_addr), service="bench",
                   variables={"contact_port": str(uas.port)}, time_limit=10)
    assert reg.returncode == 0, reg
    pairs = b.metric("freecall_media_port_pairs_free")
    assert pairs == (CAP_PORTS[1] - CAP_PORTS[0] + 1) // 2

    public = f"{b.public_host}:{b.public_port}"
    legit: list[SippResult] = []
    started = time.monotonic()
    floods = [sipp.start(SCENARIOS / "flood_invite.xml", public, name=f"flood{i}",
                         service="bench", calls=CAP_RATE * CAP_SECONDS, rate=CAP_RATE,
                         transport="un", time_limit=CAP_SECONDS * 3 + 10,
                         extra_args=["-i", source, "-l", "100000", "-max_socket", "5000"])
              for i, source in enumerate(CAP_SOURCES)]
    time.sleep(0.5)
    caller = threading.Thread(target=lambda: legit.append(sipp.run(
        "uac", public, name="legit", service="bench", calls=4, rate=2, time_limit=30,
        extra_args=["-i", LEGIT_SOURCE, "-recv_timeout", "10s"])))
    caller.start()
    sent = sum(flood.wait().created for flood in floods)
    caller.join()
    [call] = legit
    assert call.ok and call.successful == 4, (call, call.errors())
    metrics = b.metrics_text()
    refused = _labelled(metrics, "freecall_overload_refused_total", 'reason="calls_per_source"')
    held = b.metric("freecall_calls_in_progress")
    print(f"\n[cap] {sent} INVITEs from {len(CAP_SOURCES)} sources, {refused:.0f} answered 503, "
          f"{held:.0f} held; legit {call.successful}/4")
    assert sent >= 0.9 * len(CAP_SOURCES) * CAP_RATE * CAP_SECONDS
    assert held == CAP * len(CAP_SOURCES)
    assert b.metric("freecall_calls_capped_sources") == len(CAP_SOURCES)
    assert refused >= 0.9 * (sent - held)  # the rest: UDP lost in a full socket buffer
    assert _labelled(metrics, "freecall_overload_refused_total", 'reason="media_ports"') == 0

    # released: the proxy ends each unacknowledged call 64*T1 after its answer
    while b.metric("freecall_media_port_pairs_free") < pairs:
        assert time.monotonic() - started < 64 * T1 + 20, "media ports still held"
        time.sleep(0.25)
    hold = time.monotonic() - started
    print(f"[cap] every port pair free {hold:.1f} s after the flood began (64*T1 = "
          f"{64 * T1:g} s)")
    assert hold >= 64 * T1 - 1
    assert b.metric("freecall_calls_unacknowledged_total") == CAP * len(CAP_SOURCES)
    assert b.metric("freecall_calls_in_progress") == 0
    assert b.metric("freecall_calls_capped_sources") == 0
    assert b.metric("freecall_media_calls") == 0
    after = sipp.run("uac", public, name="after", service="bench", calls=10, rate=5,
                     time_limit=30, extra_args=["-i", CAP_SOURCES[0], "-recv_timeout", "10s"])
    assert after.ok and after.successful == 10, (after, after.errors())
    # the cap follows a reload (security.calls_per_source is live)
    config = yaml.safe_load(b.config_path.read_text())
    config["security"]["calls_per_source"] = 1
    b.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    summary = b.api("POST", "/api/reload")
    assert "security.calls_per_source" in summary["applied"], summary
    sipp.run(SCENARIOS / "flood_invite.xml", public, name="reloaded", service="bench", calls=3,
             rate=10, transport="un", time_limit=10,
             extra_args=["-i", LEGIT_SOURCE, "-max_socket", "100"])
    wait_until(lambda: b.metric("freecall_calls_in_progress") == 1, 5)
    total = _labelled(b.metrics_text(), "freecall_overload_refused_total",
                      'reason="calls_per_source"')
    assert total == refused + 2, (total, refused)
    log = b.log_text()
    for source in CAP_SOURCES:
        assert log.count(f"call cap: {source} has {CAP} calls in progress") == 1
    assert "no ACK for the 2xx within 16 s" in log
    for bad in ("Traceback", " ERROR ", "Task exception"):
        assert bad not in log, log[log.find(bad) - 1500:log.find(bad) + 1500]


def test_acknowledged_calls_between_two_nodes_outlive_64_t1(
    harness: Harness, baresip: Callable[..., Baresip]
) -> None:
    """The other side of the no-ACK release: a real call through two nodes (baresip, which
    follows Record-Route) is seen confirmed by both proxies and lasts past 64*T1 (T1 0.1 s:
    6.4 s) until the caller hangs up."""
    nodes = static_pair(harness, wait_control=True,
                        config={"sip": {"timers": {"t1": "100ms"}}, "openpgp": {"sign": False}})
    alice = phone(baresip, nodes.a, "alice", USERS_A["alice"], "a.test", 440)
    bob = phone(baresip, nodes.b, "bob", USERS_B["bob"], "b.test", 880)
    alice.dial("sip:bob@b.test")
    alice.wait_event("CALL_ESTABLISHED", 10)
    bob.wait_event("CALL_ESTABLISHED", 5)
    time.sleep(64 * 0.1 + 2)
    for node in (nodes.a, nodes.b):
        [call] = node.api("GET", "/api/calls")
        assert call["state"] == "active" and call["ended"] is None, call
        assert node.metric("freecall_calls_unacknowledged_total") == 0
    alice.hangup()
    bob.wait_event("CALL_CLOSED", 5)
    for node in (nodes.a, nodes.b):
        assert "no ACK" not in node.log_text()
