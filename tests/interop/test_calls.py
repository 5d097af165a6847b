"""Real softphones register with a freecall daemon and call each other through it."""

from __future__ import annotations

import time
from collections.abc import Callable

from harness import Baresip, FreecallDaemon, assert_tone

USERS = {"alice": "alice-secret", "bob": "bob-secret"}


def test_two_baresip_call_through_the_daemon(
    freecall_daemon: Callable[..., FreecallDaemon], baresip: Callable[..., Baresip]
) -> None:
    node = freecall_daemon(users=USERS, domains=["example.org"])
    alice = baresip("alice", registrar=node.sip_addr, password=USERS["alice"], tone_hz=440,
                    domain="example.org")
    bob = baresip("bob", registrar=node.sip_addr, password=USERS["bob"], tone_hz=880,
                  domain="example.org")
    alice.wait_registered()
    bob.wait_registered()
    alice.dial("sip:bob@example.org")
    alice.wait_event("CALL_ESTABLISHED", 10)
    bob.wait_event("CALL_ESTABLISHED", 5)
    time.sleep(3.0)
    alice.hangup()
    alice.wait_event("CALL_CLOSED", 5)
    bob.wait_event("CALL_CLOSED", 5)
    for ua, heard in ((alice, 880), (bob, 440)):
        stats = ua.wait_rtp_stats()
        assert stats[-1].rx_packets >= 75, stats
        assert_tone(ua.last_decoded_wav(), heard)
    log = node.log_text()
    assert "registered" in log and "answered" in log
    assert "hung up by caller" in log
