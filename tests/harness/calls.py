"""Call helpers shared by the multi-node tests: a registered phone, a call that is talked
through and checked (both ways' packets and tones), then hung up."""

from __future__ import annotations

import time
from collections.abc import Callable

from .baresip import Baresip
from .daemon import FreecallDaemon
from .wav import assert_tone


def phone(baresip: Callable[..., Baresip], node: FreecallDaemon, user: str, password: str,
          domain: str, tone: int) -> Baresip:
    ua = baresip(user, registrar=node.sip_addr, password=password, tone_hz=tone, domain=domain)
    ua.wait_registered()
    return ua


def talk_and_hang_up(caller: Baresip, callee: Baresip, heard_by_caller: int,
                     heard_by_callee: int) -> None:
    caller.wait_event("CALL_ESTABLISHED", 10)
    callee.wait_event("CALL_ESTABLISHED", 5)
    time.sleep(2.5)
    caller.hangup()
    caller.wait_event("CALL_CLOSED", 5)
    callee.wait_event("CALL_CLOSED", 5)
    assert caller.wait_rtp_stats()[-1].rx_packets >= 50
    assert callee.wait_rtp_stats()[-1].rx_packets >= 50
    assert_tone(caller.last_decoded_wav(), heard_by_caller)
    assert_tone(callee.last_decoded_wav(), heard_by_callee)
