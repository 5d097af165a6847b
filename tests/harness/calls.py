"""Call helpers shared by the multi-node tests: a registered phone, a call that is talked
through and checked (both ways' packets and tones), then hung up."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .baresip import Baresip
from .daemon import FreecallDaemon, deep_merge
from .session import Harness
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
    # this call's statistics come after CALL_CLOSED: wait for them, not an earlier call's
    before = len(caller.rtp_stats()), len(callee.rtp_stats())
    time.sleep(2.5)
    caller.hangup()
    caller.wait_event("CALL_CLOSED", 5)
    callee.wait_event("CALL_CLOSED", 5)
    assert caller.wait_rtp_stats(before[0] + 1)[-1].rx_packets >= 50
    assert callee.wait_rtp_stats(before[1] + 1)[-1].rx_packets >= 50
    assert_tone(caller.last_decoded_wav(), heard_by_caller)
    assert_tone(callee.last_decoded_wav(), heard_by_callee)


USERS_A = {"alice": "alice-pw"}
USERS_B = {"bob": "bob-pw"}


@dataclass
class Nodes:
    """Two nodes that route to each other by static routes: A (127.0.0.2, a.test, alice) and
    B (127.0.0.3, b.test, bob); DNS points at a port nothing answers on."""

    a: FreecallDaemon
    b: FreecallDaemon
    run_dir: Path


def static_pair(harness: Harness, *, config: Mapping[str, Any] | None = None,
                a_config: Mapping[str, Any] | None = None,
                b_config: Mapping[str, Any] | None = None,
                a_env: Mapping[str, str] | None = None,
                seed: bool = False, wait_control: bool = False,
                static_routes: bool = True) -> Nodes:
    """A and B started; ``config`` is merged into both nodes' configuration, ``a_config`` and
    ``b_config`` into one each; ``a_env`` is A's environment; ``seed`` makes B A's gossip
    seed (A learns B's record, B A's); without ``static_routes`` (and with ``seed``) calls
    between them are routed by the host cache."""
    a = harness.daemon("a", users=USERS_A, domains=["a.test"], public_host="127.0.0.2",
                       start=False, env=a_env)
    b = harness.daemon("b", users=USERS_B, domains=["b.test"], public_host="127.0.0.3",
                       start=False)
    if static_routes:
        a.extra_config["routes"] = {"b.test": f"sip:{b.public_host}:{b.public_port}"}
        b.extra_config["routes"] = {"a.test": f"sip:{a.public_host}:{a.public_port}"}
    if seed:
        a.extra_config["peering"] = {"seeds": [f"{b.public_host}:{b.peering_port}"]}
    for node, own in ((b, b_config), (a, a_config)):
        node.extra_config["dns"] = {"servers": ["127.0.0.1:9"], "timeout": "1s"}
        node.extra_config = deep_merge(node.extra_config, config or {})
        node.extra_config = deep_merge(node.extra_config, own or {})
        harness.started.append(node)
        node.start(wait_control=wait_control)
    return Nodes(a, b, harness.run_dir)
