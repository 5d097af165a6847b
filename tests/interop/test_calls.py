"""Real softphones register with a freecall daemon and call each other through it."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from harness import Baresip, FreecallDaemon, Linphonec, assert_tone

USERS = {"alice": "alice-secret", "bob": "bob-secret"}


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_two_baresip_call_through_the_daemon(
    transport: str,
    freecall_daemon: Callable[..., FreecallDaemon],
    baresip: Callable[..., Baresip],
) -> None:
    node = freecall_daemon(users=USERS, domains=["example.org"])
    alice = baresip("alice", registrar=node.sip_addr, password=USERS["alice"], tone_hz=440,
                    domain="example.org", transport=transport)
    bob = baresip("bob", registrar=node.sip_addr, password=USERS["bob"], tone_hz=880,
                  domain="example.org", transport=transport)
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
    assert "registered alice@example.org at sip:" in log and f" via {transport}:" in log
    assert "answered" in log
    assert "hung up by caller" in log


def test_baresip_and_linphonec_call_both_ways(
    freecall_daemon: Callable[..., FreecallDaemon],
    baresip: Callable[..., Baresip],
    linphonec: Callable[..., Linphonec],
) -> None:
    """A second, independent SIP stack (liblinphone/belle-sip) on one side of the call."""
    node = freecall_daemon(users=USERS, domains=["example.org"])
    alice = baresip("alice", registrar=node.sip_addr, password=USERS["alice"], tone_hz=440,
                    domain="example.org")
    bob = linphonec("bob", registrar=node.sip_addr, password=USERS["bob"], tone_hz=660,
                    domain="example.org", auto_answer=True)
    alice.wait_registered()
    bob.wait_registered()
    alice.dial("sip:bob@example.org")
    alice.wait_event("CALL_ESTABLISHED", 10)
    bob.wait_established(5)
    time.sleep(3.0)
    alice.hangup()
    alice.wait_event("CALL_CLOSED", 5)
    bob.wait_closed(5)
    assert alice.wait_rtp_stats()[-1].rx_packets >= 75
    assert_tone(alice.last_decoded_wav(), 660)
    assert_tone(bob.recorded_wav, 440)
    # and the other way round: linphonec calls, baresip answers (auto), linphonec hangs up
    time.sleep(1.1)  # baresip names its WAV dumps by the second (harness pitfall 3)
    bob.dial("sip:alice@example.org")
    alice.wait_event("CALL_ESTABLISHED", 10)  # baresip answers by itself
    bob.wait_established(5)
    time.sleep(2.0)
    bob.hangup()
    alice.wait_event("CALL_CLOSED", 5)
    assert node.log_text().count("answered") == 2
