"""Secure media between endpoints (issue 6): the daemons bridge their softphones' plain RTP to
ZRTP-keyed SRTP, and the far end is another freecall daemon or a ZRTP softphone we did not
write (linphonec with bzrtp).

Node A (127.0.0.2, a.test) and node B (127.0.0.3, b.test) route to each other by static
routes; everything else runs on 127.0.0.1. A capture on the loopback interface sees both the
softphone legs (127.0.0.1) and the wire between the nodes (127.0.0.2 <-> 127.0.0.3).
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import Baresip, FreecallDaemon, Harness, Linphonec, assert_tone
from harness.calls import USERS_A, USERS_B, Nodes, phone, static_pair, talk_and_hang_up
from harness.daemon import MEDIA_NATIVE
from harness.pcap import Datagram, udp_datagrams
from harness.proc import wait_until

SECURE = r"call (\w+): media secure, SAS (\w+) \((B32|B256)\)"


@pytest.fixture
def nodes(harness: Harness) -> Nodes:
    return static_pair(harness)


class Capture:
    """tcpdump on lo for the duration of a ``with`` block; then its UDP datagrams."""

    def __init__(self, path: Path, bpf: str = "udp") -> None:
        self.path = path
        self.bpf = bpf
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Capture:
        self.process = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-U", "-s0", "-w", str(self.path), "-Z", "root", self.bpf],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # tcpdump needs a moment before it captures
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)
        assert self.process is not None
        self.process.terminate()
        self.process.wait(5)

    def datagrams(self) -> list[Datagram]:
        return udp_datagrams(self.path)


def rtp_payload(data: bytes) -> tuple[int, bytes] | None:
    """(payload type, payload) of a plain RTP packet (RFC 3550 5.1), else None."""
    if len(data) < 12 or data[0] >> 6 != 2 or 72 <= (data[1] & 0x7F) <= 79:
        return None
    csrc = (data[0] & 0x0F) * 4
    return data[1] & 0x7F, data[12 + csrc:]


def is_zrtp(data: bytes) -> bool:
    """RFC 6189 section 5: first octet 0x10, magic cookie 'ZRTP' at offset 4."""
    return len(data) >= 12 and data[0] == 0x10 and data[4:8] == b"ZRTP"


def secure_lines(node: FreecallDaemon) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(SECURE, node.log_text())]


@pytest.mark.parametrize("phone_socket", ["per-stream", "shared"])
def test_a_call_between_two_nodes_is_srtp_on_the_wire_with_one_sas(
    harness: Harness, baresip: Callable[..., Baresip], phone_socket: str
) -> None:
    """Also with ``media.phone_socket: shared`` (baresip sends from the ports its SDP names,
    RFC 4961): every softphone leg then goes through the node's one shared port pair."""
    nodes = static_pair(harness, config={"media": {"phone_socket": phone_socket}})
    capture = Capture(nodes.run_dir / "media.pcap")
    with capture:
        alice = phone(baresip, nodes.a, "alice", USERS_A["alice"], "a.test", 440)
        bob = phone(baresip, nodes.b, "bob", USERS_B["bob"], "b.test", 880)
        alice.dial("sip:bob@b.test")
        talk_and_hang_up(alice, bob, 880, 440)
    # both daemons report the call secure, with the same SAS
    [(_, sas_a)] = secure_lines(nodes.a)
    [(_, sas_b)] = secure_lines(nodes.b)
    assert sas_a == sas_b
    datagrams = capture.datagrams()
    wire = [d for d in datagrams if d.between("127.0.0.2", "127.0.0.3") and d.src[1] >= 1024
            and d.dst[1] >= 1024]
    loop = [d for d in datagrams if d.src[0] == d.dst[0] == "127.0.0.1"]
    # the softphone legs carry plain PCMU (payload type 0) ...
    plain = [p for d in loop if (p := rtp_payload(d.payload)) is not None and p[0] == 0
             and len(p[1]) == 160]
    assert len(plain) > 200, f"only {len(plain)} plain RTP packets on the softphone legs"
    tone_payloads = {payload for _, payload in plain}
    for node in (nodes.a, nodes.b):
        first, last = node.media_ports
        sent = {d.src[1] for d in loop if first <= d.src[1] <= last
                and rtp_payload(d.payload) is not None}
        shared = re.search(r"softphone side on one shared port pair (\d+)-", node.log_text())
        assert (shared is not None) == (phone_socket == "shared"), node.log_text()
        if shared is not None:  # everything toward the softphone left the shared RTP port
            assert sent == {int(shared.group(1))}, sent
            # a source no softphone SDP names is dropped and counted
            before = node.metric("freecall_media_phone_unrouted_total")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
                stranger.sendto(bytes(172), ("127.0.0.1", int(shared.group(1))))
            wait_until(lambda node=node, before=before:  # type: ignore[misc]
                       node.metric("freecall_media_phone_unrouted_total") == before + 1,
                       timeout=5)
    # ... and the wire between the nodes ZRTP, then SRTP: never those payloads, never in clear
    media = [d for d in wire if not d.payload.startswith((b"SIP/2.0", b"INVITE", b"ACK", b"BYE"))
             and b"SIP/2.0" not in d.payload]
    assert any(is_zrtp(d.payload) for d in media), "no ZRTP between the nodes"
    # ICE (RFC 8445) found the path first: signed Binding requests between the media ports
    checks = [d for d in media if d.payload[:2] == b"\x00\x01" and d.payload[4:8] == b"!\x12\xa4B"]
    assert checks, "no ICE connectivity checks between the nodes"
    for node in (nodes.a, nodes.b):
        assert re.search(r"stream \d+: media directly to", node.log_text()), node.log_text()
        # the secure per-packet path ran in C (media.native: auto), or in Python when the
        # suite runs with FREECALL_TEST_MEDIA_NATIVE=off
        native = re.search(r"stream \d+: secure path in C", node.log_text()) is not None
        assert native == (MEDIA_NATIVE != "off"), node.log_text()
    srtp = [d for d in media if not is_zrtp(d.payload) and rtp_payload(d.payload) is not None]
    assert len(srtp) > 200, f"only {len(srtp)} media packets between the nodes"
    for d in srtp:
        header = rtp_payload(d.payload)
        assert header is not None
        body = header[1]
        assert len(body) in (160 + 10, 160 + 4), f"not an SRTP packet: {len(body)} octets"
        assert body[:160] not in tone_payloads, "a plain PCMU payload crossed between the nodes"
        assert not any(body[i:i + 32] in d2 for d2 in list(tone_payloads)[:20]
                       for i in (0, 64)), "tone samples in clear between the nodes"


def test_linphonec_zrtp_calls_a_baresip_user_behind_freecall_and_back(
    nodes: Nodes, baresip: Callable[..., Baresip], linphonec: Callable[..., Linphonec]
) -> None:
    """linphonec (bzrtp) is an outside ZRTP softphone: it sends to node B's public side and
    takes calls on 127.0.0.4; the daemon speaks ZRTP with it directly."""
    bob = phone(baresip, nodes.b, "bob", USERS_B["bob"], "b.test", 880)
    carol = linphonec("carol", registrar=nodes.b.public_addr, domain="127.0.0.4",
                      media_encryption="zrtp", register=False, tone_hz=660)
    # it has no account anywhere: it calls bob at node B's public address
    carol.dial(f"sip:bob@{nodes.b.public_host}:{nodes.b.public_port}")
    bob.wait_event("CALL_ESTABLISHED", 15)
    carol.wait_established(10)
    sas = carol.sas(10)
    time.sleep(2.5)
    carol.hangup()
    carol.wait_closed(5)
    bob.wait_event("CALL_CLOSED", 5)
    [(_, ours)] = secure_lines(nodes.b)
    assert ours.lower() == sas.lower(), f"freecall {ours}, linphonec {sas}"
    assert_tone(bob.last_decoded_wav(), 660)

    # the other way: bob calls carol at her own address
    bob.dial(f"sip:carol@127.0.0.4:{carol.sip_port}")
    carol.wait_established(15)
    bob.wait_event("CALL_ESTABLISHED", 10)
    time.sleep(2.5)
    bob.hangup()
    bob.wait_event("CALL_CLOSED", 5)
    carol.wait_closed(5)
    lines = secure_lines(nodes.b)
    assert len(lines) == 2
    sas2 = re.findall(r"auth token is (\w+)", carol.output())
    assert len(sas2) == 2 and lines[1][1].lower() == sas2[1].lower()


@pytest.mark.parametrize("policy", ["prefer", "require"])
def test_a_far_end_without_zrtp_is_shown_insecure_or_refused(
    harness: Harness, baresip: Callable[..., Baresip], policy: str
) -> None:
    """security.policy on node B: alice calls from node A, which plays a plain SIP system
    (policy off: no ZRTP, no a=zrtp-hash, clear RTP). Under prefer the call goes on in clear
    and is marked insecure; under require node B ends it with BYE once ZRTP has not started
    within security.zrtp_timeout."""
    a = harness.daemon("a", users=USERS_A, domains=["a.test"], public_host="127.0.0.2",
                       start=False, config={"security": {"policy": "off"}})
    b = harness.daemon("b", users=USERS_B, domains=["b.test"], public_host="127.0.0.3",
                       start=False,
                       config={"security": {"policy": policy, "zrtp_timeout": "1.5s"}})
    a.extra_config["routes"] = {"b.test": f"sip:{b.public_host}:{b.public_port}"}
    for node in (a, b):
        harness.started.append(node)
        node.start()
    alice = phone(baresip, a, "alice", USERS_A["alice"], "a.test", 440)
    bob = phone(baresip, b, "bob", USERS_B["bob"], "b.test", 880)
    alice.dial("sip:bob@b.test")
    alice.wait_event("CALL_ESTABLISHED", 10)
    bob.wait_event("CALL_ESTABLISHED", 5)
    start = time.monotonic()
    if policy == "prefer":
        time.sleep(3.0)
        alice.hangup()
        bob.wait_event("CALL_CLOSED", 5)
        assert_tone(bob.last_decoded_wav(), 440)
        assert_tone(alice.last_decoded_wav(), 880)
        assert re.search(r"call \w+: media in clear: ", b.log_text())
        assert "media was insecure" in b.log_text()
    else:
        bob.wait_event("CALL_CLOSED", 10)  # ended by node B, not by either phone
        alice.wait_event("CALL_CLOSED", 5)
        assert time.monotonic() - start < 6
        assert re.search(r"call \w+: media security failed \(.*\): ending the call",
                         b.log_text())
    assert not secure_lines(b)
