"""A short flood against a node with public listeners (issue 11, item 2; bench/flood.py is the
full version at five times the measured capacity, with figures in docs/performance.md).

For 4 s, SIPp sends 2,000 INVITEs a second (sent once, never retransmitted: a flooding tool,
tests/harness/scenarios/flood_invite.xml) from 127.0.0.9 to B's public listener, aimed at a
registered user (the costly case), while a Python blaster sends garbage UDP as fast as it can
to B's media ports and its gossip port. Meanwhile a legitimate caller on 127.0.0.4 places calls
to the same user at 2 a second through the public listener: every one must complete. After it:
calls through the softphone listener complete at 50 a second, RSS grew by less than
``RSS_GROWTH_MB``, the rate limit logged its block once, no error in the log.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from harness import UAS_NO180, Harness, Sipp, SippResult
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
