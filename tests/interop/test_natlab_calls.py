"""Calls between homes behind NAT (issue 9): baresip alice behind NAT 1 calls baresip bob behind
NAT 2 through two freecall daemons, with the real relay (``freecall run --role relay``) on the
public segment of harness.natlab's lab, and nothing else: no port forward, no static route, no
DNS.

Each daemon learns the relay from the host cache (the relay is its only gossip seed), finds by
STUN that it is behind NAT, attaches to the relay's SIP edge (TLS, node key, RFC 5626
keepalives) and signs "through the relay" into its record, so alice's call to ``bob@b.test``
reaches bob's node through the relay. Media: each daemon gathers server-reflexive and relayed
candidates from the relay (node-key TURN credentials), keeps a pool of gathered streams, and
runs ICE (RFC 8445) in the SDP between them. Full-cone NATs carry the media directly; two
symmetric NATs only through the relay. Either way ZRTP secures the call (the same SAS on both
daemons), both phones hear each other's tone, and a capture on the relay host sees only ZRTP and
SRTP in what it relays.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import Baresip, FreecallDaemon, Harness
from harness.calls import USERS_A, USERS_B, talk_and_hang_up
from harness.natlab import RELAY_ADDRESS, NatLab, relayed_packets, start_relay
from harness.pcap import Datagram, udp_datagrams
from harness.proc import wait_until

pytestmark = [pytest.mark.interop]

SECURE = r"call (\w+): media secure, SAS (\w+) \((B32|B256)\)"


def _node(harness: Harness, lab: NatLab, home: int, name: str, domain: str,
          users: dict[str, str]) -> FreecallDaemon:
    node = harness.daemon(
        name, users=users, domains=[domain], public_host=lab.host_address(home),
        netns=lab.run(f"h{home}"), start=False,
        config={"peering": {"seeds": [f"{RELAY_ADDRESS}:5064"], "interval": "0.3s"},
                "security": {"policy": "require"},
                "dns": {"servers": ["127.0.0.1:9"], "timeout": "1s"}})
    harness.started.append(node)
    return node


def _knows_through_relay(node: FreecallDaemon, domain: str) -> bool:
    """``node`` holds the record of ``domain``'s node naming the relay (/api/peers)."""
    return any(domain in peer["routes"] and peer["through_relay"]
               for peer in node.unix_api("/api/peers"))


def _attached(node: FreecallDaemon) -> bool:
    link = (node.unix_api("/api/status").get("nat") or {}).get("relay_link") or {}
    return bool(link.get("state") == "attached")


def _phone(harness: Harness, lab: NatLab, home: int, node: FreecallDaemon, user: str,
           password: str, domain: str, tone: int) -> Baresip:
    ua = harness.baresip(user, registrar=node.sip_addr, password=password, tone_hz=tone,
                         domain=domain, namespace=lab.name(f"h{home}"))
    ua.wait_registered()
    return ua


def _is_srtp_or_zrtp(payload: bytes) -> bool:
    """ZRTP (RFC 6189 section 5), or SRTP: an RTP header, then a PCMU frame's 160 octets that
    look random (a tone in clear has a few dozen distinct octets) and the auth tag."""
    if len(payload) >= 12 and payload[0] == 0x10 and payload[4:8] == b"ZRTP":
        return True
    if len(payload) < 12 or payload[0] >> 6 != 2:
        return False
    body = payload[12 + (payload[0] & 0x0F) * 4:]
    return len(body) in (160 + 4, 160 + 10) and len(set(body[:160])) > 80


RELAYED_PORTS = range(49152, 49408)  # harness.natlab.start_relay's relay.ports


def _relay_media(datagrams: list[Datagram]) -> list[bytes]:
    """What the relay carried: the inside of TURN ChannelData to and from its port 3478, and
    what peers exchanged with its relayed addresses as it is (ICE's STUN left out)."""
    out = []
    for d in datagrams:
        data = d.payload
        if not data or data[0] < 4:
            continue
        if 0x40 <= data[0] <= 0x4F and 3478 in (d.src[1], d.dst[1]):
            out.append(data[4:4 + int.from_bytes(data[2:4], "big")])
        elif (d.src[0] == RELAY_ADDRESS and d.src[1] in RELAYED_PORTS) or (
                d.dst[0] == RELAY_ADDRESS and d.dst[1] in RELAYED_PORTS):
            out.append(data)
    return out


def _sas(node: FreecallDaemon) -> str:
    found = re.findall(SECURE, node.log_text())
    assert len(found) == 1, found
    return str(found[0][1])


@dataclass
class Outcome:
    a: FreecallDaemon
    b: FreecallDaemon
    relay_log: str
    relay_capture: list[Datagram]


def _call(harness: Harness, lab: NatLab, tmp_path: Path) -> Outcome:
    relay, _ = start_relay(lab, tmp_path / "relay", sip=True, gossip_interval="0.3s")
    capture_path = tmp_path / "relay.pcap"
    capture = subprocess.Popen(
        [*lab.run("relay"), "tcpdump", "-i", "eth0", "-U", "-s0", "-w", str(capture_path),
         "-Z", "root", "udp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        a = _node(harness, lab, 1, "a", "a.test", USERS_A)
        b = _node(harness, lab, 2, "b", "b.test", USERS_B)
        for node in (a, b):
            node.start()
        # Both attached to the relay's SIP edge, each record names it and has reached the
        # other node, and each media pool gathered from the relay.
        wait_until(lambda: _attached(a) and _attached(b), 30, message="both nodes attached")
        wait_until(lambda: _knows_through_relay(a, "b.test") and _knows_through_relay(b, "a.test")
                   and all("media: behind NAT" in n.log_text() for n in (a, b)), 30,
                   message="records naming the relay at the other node, and pools gathered")
        alice = _phone(harness, lab, 1, a, "alice", USERS_A["alice"], "a.test", 440)
        bob = _phone(harness, lab, 2, b, "bob", USERS_B["bob"], "b.test", 880)
        alice.dial("sip:bob@b.test")
        talk_and_hang_up(alice, bob, 880, 440)  # 2.5 s of both tones, each heard
        assert _sas(a) == _sas(b)
    finally:
        time.sleep(0.3)
        capture.terminate()
        capture.wait(5)
        relay.stop(5)
    return Outcome(a, b, relay.log_text(), udp_datagrams(capture_path))


def test_full_cone_homes_talk_directly_and_securely(harness: Harness, tmp_path: Path) -> None:
    with NatLab(("full-cone", "full-cone")) as lab:
        seen = _call(harness, lab, tmp_path)
    for node, far_wan in ((seen.a, lab.wan_address(2)), (seen.b, lab.wan_address(1))):
        assert re.search(rf"media directly to \('{re.escape(far_wan)}'", node.log_text()), \
            node.log_text()[-3000:]
    relayed = relayed_packets(seen.relay_log)
    assert relayed < 60, relayed  # ICE checks on relayed pairs at most; 2.5 s of media is 250


def test_symmetric_homes_talk_through_the_relay_which_sees_only_srtp(
        harness: Harness, tmp_path: Path) -> None:
    with NatLab(("symmetric", "symmetric")) as lab:
        seen = _call(harness, lab, tmp_path)
    assert any("media through the relay to" in n.log_text() for n in (seen.a, seen.b))
    relayed = relayed_packets(seen.relay_log)
    assert relayed >= 200, relayed  # both directions of 2.5 s of 20 ms packets: 250
    media = _relay_media(seen.relay_capture)
    rtp_like = [p for p in media if len(p) >= 12 and p[0] >> 6 == 2]
    assert len(rtp_like) >= 150, len(rtp_like)  # the tone one way or the other (also seen twice)
    clear = [p for p in rtp_like if not _is_srtp_or_zrtp(p)]
    assert not clear, f"{len(clear)} media packets through the relay are not SRTP: {clear[:2]}"
