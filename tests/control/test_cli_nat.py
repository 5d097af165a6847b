"""``freecall status`` renders the NAT state from what the daemon's own objects summarise
(freecall.peering.nat: NatView, RelayLink), and a relay's SIP edge figures."""

from __future__ import annotations

import random

from freecall.control.cli import render_status
from freecall.peering.nat import NatStatus, NatView, RelayLink
from freecall.peering.records import RelayVia

RELAY = RelayVia(bytes(range(16)), bytes(32), "198.51.100.1", 5061)


def test_status_shows_the_verdict_its_source_and_the_relay_link() -> None:
    view = NatView()
    link = RelayLink(random.Random(1))
    base = {"version": "0.1.0", "name": "b", "role": "endpoint", "uptime_s": 3.0}
    text = render_status({**base, "nat": {**view.summary(), "attach": "auto",
                                           "relay_link": link.summary(0.0)}})
    assert "NAT          unknown\n" in text and "relay link   idle (0 attach(es)" in text
    view.from_media(True, [("203.0.113.9", 20002)])
    link.want([RELAY], 0.0)
    link.connected(0.1)
    link.registered(200, 600.0, 0.2)
    text = render_status({**base, "nat": {**view.summary(), "attach": "auto",
                                           "relay_link": link.summary(12.2)}})
    assert ("NAT          behind NAT (by media gathering, mapping unknown, public "
            "203.0.113.9:20002)") in text, text
    assert ("relay link   attached 0001020304050607 at 198.51.100.1:5061 for 12 s "
            "(1 attach(es), 0 failure(s) in a row, 0/0 keep-alives answered)") in text, text
    view.from_stun(NatStatus(("198.51.100.7", 4000), False, "none"))
    text = render_status({**base, "nat": {**view.summary(), "attach": "never",
                                           "relay_link": None}})
    assert "NAT          not behind NAT (by STUN, public 198.51.100.7:4000)" in text, text
    assert "relay link   none (nat.attach: never)" in text
    assert "NAT" not in render_status({**base, "nat": None})


def test_a_relay_status_shows_its_sip_edge() -> None:
    text = render_status({"version": "0.1.0", "name": "r", "role": "relay", "uptime_s": 1,
                          "allocations": 3, "sip_edge": {
                              "attached": 2, "connections_open": 2, "forwarded": 8,
                              "refused": 1, "attach_refused": 1}})
    assert "allocations  3 (TURN); peers known: 0" in text
    assert "calls " not in text and "registered" not in text  # no softphones on a relay
    assert ("SIP edge     2 node(s) attached, 2 TLS connection(s); 8 forwarded, 1 refused, "
            "1 attach(es) refused") in text
