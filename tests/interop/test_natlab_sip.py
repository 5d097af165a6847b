"""Signalling from behind NAT (issue 9): the NAT lab of harness.natlab, the real relay daemon
with its SIP edge on the public segment, node A behind the full-cone NAT and node B behind the
symmetric NAT. Both learn by STUN that they are behind NAT, attach to the relay over TLS with
their node key, keep the flow with RFC 5626 CRLF pings and publish "through the relay" in their
signed records. A SIPp UAC on A calls a SIPp UAS registered at B by address (``bob@b.test``),
with no DNS and no static route: INVITE, 200, ACK and BYE all cross the relay. B's connection is
then killed: B reconnects (a new symmetric-NAT mapping) and a second call works. The relay
refuses what is not for an attached node. What an operator sees is checked on the way: the
relay's /metrics and /api/status (its SIP edge's figures, over its Unix control socket) and
``freecall status`` of node B (its NAT state and relay link) and of the relay.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness import FreecallDaemon, Harness
from harness.daemon import unix_api, unix_metric
from harness.natlab import RELAY_ADDRESS, RELAY_SIP_PORT, NatLab, start_relay
from harness.proc import wait_until
from harness.sipp import Sipp

pytestmark = [pytest.mark.interop]

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
SRC = Path(__file__).resolve().parents[2] / "src"
KEEPALIVE = 1.0  # seconds: pings every 0.8-1 s (RFC 5626's 120 s shortened for the test)


def _node(harness: Harness, lab: NatLab, home: int, name: str, domain: str,
          user: str) -> FreecallDaemon:
    node = harness.daemon(
        name, users={user: f"{user}-pw"}, domains=[domain], public_host=lab.host_address(home),
        netns=lab.run(f"h{home}"), start=False,
        config={"peering": {"seeds": [f"{RELAY_ADDRESS}:5064"], "interval": "0.3s"},
                "dns": {"servers": ["127.0.0.1:9"], "timeout": "1s"},
                "sip": {"trusted": ["127.0.0.0/8"]},
                # signalling only: with ZRTP the verdict MESSAGE to the UAS would count as a
                # call of SIPp's built-in scenario (media through NAT: test_natlab_calls.py)
                "security": {"policy": "off"},
                "control": {"listen": None},
                "nat": {"keepalive": f"{KEEPALIVE}s", "retry_base": "0.5s", "retry_max": "2s"}})
    harness.started.append(node)
    return node.start()


def _status(node: FreecallDaemon) -> dict[str, Any]:
    status: dict[str, Any] = node.unix_api("/api/status")
    return status


def _attached(node: FreecallDaemon) -> bool:
    link = (_status(node).get("nat") or {}).get("relay_link") or {}
    return link.get("state") == "attached"


def _tls_request(lab: NatLab, home: int, request_uri: str, method: str = "INVITE") -> str:
    """One request sent straight to the relay's SIP edge over TLS from a home: the status
    line."""
    script = f"""
import socket, ssl
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = ctx.wrap_socket(socket.create_connection(("{RELAY_ADDRESS}", {RELAY_SIP_PORT}), 5))
s.sendall(("{method} {request_uri} SIP/2.0\\r\\n"
           "Via: SIP/2.0/TLS 10.9.9.9:5061;branch=z9hG4bKprobe1\\r\\n"
           "From: <sip:mallory@m.test>;tag=1\\r\\nTo: <{request_uri}>\\r\\n"
           "Call-ID: probe@m.test\\r\\nCSeq: 1 {method}\\r\\nMax-Forwards: 70\\r\\n"
           "Content-Length: 0\\r\\n\\r\\n").encode())
print(s.recv(4096).decode().split("\\r\\n")[0])
"""
    done = subprocess.run([*lab.run(f"h{home}"), sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=15, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _cli_status(state: Path) -> str:
    """``freecall status`` as an operator runs it, for the daemon of a state directory."""
    done = subprocess.run([sys.executable, "-m", "freecall", "status", "--state-dir",
                           str(state)], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _call(sipp: Sipp, lab: NatLab, a: FreecallDaemon, name: str) -> None:
    result = sipp.run(SCENARIOS / "uac_domain.xml", f"127.0.0.1:{a.sip_port}", name=name,
                      service="bob", variables={"domain": "b.test"}, time_limit=20,
                      netns=lab.run("h1"))
    assert result.ok, result.errors()


def test_calls_reach_a_node_behind_symmetric_nat_through_its_relay(
        harness: Harness, sipp: Sipp, tmp_path: Path) -> None:
    with NatLab(("full-cone", "symmetric")) as lab:
        relay, relay_state = start_relay(lab, tmp_path / "relay", sip=True,
                                         gossip_interval="0.3s")
        try:
            a = _node(harness, lab, 1, "a", "a.test", "alice")
            b = _node(harness, lab, 2, "b", "b.test", "bob")
            uas = sipp.start("uas", service="bob", time_limit=90, calls=2, netns=lab.run("h2"))
            reg = sipp.run(SCENARIOS / "register_trusted.xml", f"127.0.0.1:{b.sip_port}",
                           name="register", service="bob",
                           variables={"contact_port": str(uas.port)}, netns=lab.run("h2"))
            assert reg.ok, reg.errors()
            wait_until(lambda: _attached(a) and _attached(b), 30,
                       message=lambda: f"both attached: {_status(b).get('nat')}")
            nat_b = _status(b)["nat"]
            assert nat_b["behind_nat"] is True, nat_b
            assert nat_b["public_address"].startswith(lab.wan_address(2) + ":"), nat_b
            assert nat_b["mapping"] in ("unknown", "address-dependent"), nat_b
            # A learns B's record "through the relay" by gossip, then calls by address
            wait_until(lambda: re.search(r"peer \w+ (joined|updated).*", a.log_text())
                       and "reachable through relay" in b.log_text(), 20,
                       message="B's record to spread")
            deadline = time.monotonic() + 20
            while True:  # the record naming the relay may take a gossip round or two more
                result = sipp.run(SCENARIOS / "uac_domain.xml", f"127.0.0.1:{a.sip_port}",
                                  name=f"first{int(deadline - time.monotonic())}",
                                  service="bob", variables={"domain": "b.test"},
                                  time_limit=15, netns=lab.run("h1"))
                if result.ok or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert result.ok, result.errors()
            # the operator's view: the relay's SIP edge figures, and B's NAT state
            assert unix_metric(relay_state, "freecall_relay_sip_attached") == 2
            assert unix_metric(relay_state, "freecall_relay_sip_connections") >= 2
            assert unix_metric(relay_state, "freecall_relay_sip_forwarded_total") >= 3
            edge = unix_api(relay_state, "/api/status")["sip_edge"]
            assert edge["attached"] == 2 and edge["forwarded"] >= 3, edge
            assert nat_b["source"] in ("stun", "media"), nat_b
            assert unix_metric(b.state_dir, "freecall_nat_behind") == 1
            assert unix_metric(b.state_dir, "freecall_nat_relay_attached") == 1
            shown = _cli_status(b.state_dir)
            assert re.search(r"^NAT +behind NAT \(by (STUN|media gathering)", shown, re.M), shown
            assert re.search(rf"^relay link +attached [0-9a-f]{{16}} at {re.escape(RELAY_ADDRESS)}:"
                             rf"{RELAY_SIP_PORT} for \d+ s", shown, re.M), shown
            relay_shown = _cli_status(relay_state)
            assert re.search(r"^SIP edge +2 node\(s\) attached", relay_shown, re.M), relay_shown
            print(shown, relay_shown, sep="\n")
            # every message of the call crossed the relay: B saw the INVITE and the BYE on
            # the connection it keeps to the relay
            b_log = b.log_text()
            for method in ("INVITE sip:bob@b\\.test", "ACK sip:", "BYE sip:"):
                assert re.search(rf"recv \d+ octets from tls:{re.escape(RELAY_ADDRESS)}:"
                                 rf"{RELAY_SIP_PORT}[^\n]{{0,40}}? \\n {method}", b_log), method
            # keep-alives: B pinged, the relay answered every ping
            def pinged() -> bool:
                link = _status(b)["nat"]["relay_link"]
                return bool(link["keepalives_sent"] >= 3 and link["pongs"] >= 3)

            wait_until(pinged, 10 * KEEPALIVE, message=lambda: str(_status(b)["nat"]))
            # kill B's kept connection (at the relay's end): B reconnects and is called again
            killed = subprocess.run([*lab.run("relay"), "ss", "-K", "state", "established",
                                     "sport", "=", f":{RELAY_SIP_PORT}", "dst",
                                     lab.wan_address(2)], capture_output=True, text=True,
                                    check=False)
            assert killed.returncode == 0, killed.stderr
            wait_until(lambda: (_status(b)["nat"]["relay_link"]["attaches"] >= 2
                                and _attached(b)), 20,
                       message=lambda: f"B to attach again: {_status(b)['nat']}")
            _call(sipp, lab, a, "after-reconnect")
            uas.stop()
            # never an open relay: a domain no record routes through the relay, then bob once
            # B is gone (its record still names the relay; it is not attached)
            assert _tls_request(lab, 1, "sip:carol@c.test").startswith("SIP/2.0 403"), "c"
            assert _tls_request(lab, 1, f"sip:{RELAY_ADDRESS}", "REGISTER").startswith(
                "SIP/2.0 403")  # no attach proof
            assert unix_metric(relay_state, "freecall_relay_sip_refused_total") >= 1
            assert unix_metric(relay_state, "freecall_relay_sip_attach_refused_total") >= 1
            b.stop()
            assert _tls_request(lab, 1, "sip:bob@b.test").startswith("SIP/2.0 404")
            a.stop()
        finally:
            relay.stop(5)
    text = relay.log_text()
    found = re.findall(r"relay SIP edge at stop: \d+ node\(s\) attached; (\d+) forwarded, "
                       r"(\d+) refused, \d+ attach\(es\) refused; (\d+) keep-alive", text)
    assert found, text[-3000:]
    forwarded, refused, pings = (int(x) for x in found[-1])
    print(f"relay: {forwarded} forwarded, {refused} refused, {pings} CRLF pings answered")
    assert forwarded >= 6 and refused >= 2 and pings >= 4  # two calls: INVITE, ACK, BYE each
