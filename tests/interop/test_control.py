"""The control API, CLI and event stream of real daemons during real calls (issue 8).

Node A (127.0.0.2, a.test) and node B (127.0.0.3, b.test) route to each other by static
routes and know each other through gossip (B is A's seed). alice (baresip) on A calls bob
(baresip) on B; the daemons secure the media with ZRTP. Everything is read through the HTTP
API with the token, the Unix socket (the CLI) and the event stream, and the call is ended
through the API.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import Baresip, FreecallDaemon, Harness, ManagedProcess, wait_until
from harness.calls import USERS_A, USERS_B, phone, static_pair
from harness.netns import Lan


@dataclass
class Nodes:
    a: FreecallDaemon
    b: FreecallDaemon


@pytest.fixture
def nodes(harness: Harness) -> Iterator[Nodes]:
    yield two_nodes(harness)


def two_nodes(harness: Harness, *, env: dict[str, str] | None = None,
              config: dict[str, Any] | None = None) -> Nodes:
    """A and B (B A's seed); ``env`` and ``config`` go to A only. No SAS signatures: the
    call stays "unverified", the state whose SAS a person confirms by voice (the signed
    outcomes are tests/interop/test_openpgp.py's)."""
    pair = static_pair(harness, config={"openpgp": {"sign": False}}, a_config=config,
                       a_env=env, seed=True, wait_control=True)
    return Nodes(pair.a, pair.b)


def cli(node: FreecallDaemon, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "freecall", *args, "--state-dir",
                           str(node.state_dir)], capture_output=True, text=True, timeout=20,
                          check=check)


def watch(harness: Harness, node: FreecallDaemon) -> ManagedProcess:
    """``freecall watch --json``: the event stream over the Unix socket, one line an event."""
    process = harness.process(f"watch-{node.name}", [
        sys.executable, "-u", "-m", "freecall", "watch", "--json", "--state-dir",
        str(node.state_dir)])
    wait_until(lambda: "freecall_control_event_subscribers 1" in raw(node, "/metrics"), 10,
               message="the watcher to subscribe")
    return process


def events_of(process: ManagedProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in process.log_text().splitlines()
            if line.startswith("{")]


def raw(node: FreecallDaemon, path: str, token: str | None = "", timeout: float = 5.0,
        method: str = "GET") -> str:
    """GET with an explicit token ("" = the right one, None = none); the body as text, or
    raise HTTPError."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token or node.token()}"
    req = urllib.request.Request(node.control_url + path, headers=headers, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return str(resp.read().decode())


def http_status(node: FreecallDaemon, path: str, token: str | None) -> int:
    try:
        raw(node, path, token)
    except urllib.error.HTTPError as error:
        return int(error.code)
    return 200


def live_call(node: FreecallDaemon) -> dict[str, Any] | None:
    calls = node.api("GET", "/api/calls")
    live = [c for c in calls if c["state"] != "ended"]
    return live[0] if len(live) == 1 else None


def secure_call(node: FreecallDaemon) -> dict[str, Any] | None:
    call = live_call(node)
    if call and call["state"] == "active" and call["security"]["state"] == "secure":
        return call
    return None


def subsequence(kinds: list[tuple[str, str]], wanted: list[tuple[str, str]]) -> bool:
    it = iter(kinds)
    return all(any(k == w for k in it) for w in wanted)


def test_every_resource_and_event_follows_a_call_that_the_api_hangs_up(
    nodes: Nodes, harness: Harness, baresip: Callable[..., Baresip]
) -> None:
    a, b = nodes.a, nodes.b
    watcher = watch(harness, a)
    # status: who the node is and where it listens
    status = a.api("GET", "/api/status")
    assert status["version"] and status["role"] == "endpoint"
    assert len(status["node_id"]) == 32 and status["uptime_s"] >= 0
    assert f"sip:udp:127.0.0.1:{a.sip_port} (softphone)" in status["listeners"]
    assert f"control:http://127.0.0.1:{a.control_port}" in status["listeners"]
    assert "key_fingerprint" in status
    # peers: B, learned by gossip from its seed record, with its routes
    b_id = b.api("GET", "/api/status")["node_id"]
    peer = wait_until(lambda: next((p for p in a.api("GET", "/api/peers")
                                    if p["node_id"] == b_id), None), 20,
                      message="A to learn B from gossip")
    assert "b.test" in peer["routes"] and set(peer) >= {"addresses", "last_seen_s", "relay"}
    # registrations: the phones as they register
    assert a.api("GET", "/api/registrations") == []
    alice = phone(baresip, a, "alice", USERS_A["alice"], "a.test", 440)
    bob = phone(baresip, b, "bob", USERS_B["bob"], "b.test", 880)
    [reg] = a.api("GET", "/api/registrations")
    assert reg["user"] == "alice" and reg["aor"] == "alice@a.test"
    assert reg["expires_s"] > 0 and "127.0.0.1" in reg["source"]
    assert [r["user"] for r in b.api("GET", "/api/registrations")] == ["bob"]

    alice.dial("sip:bob@b.test")
    alice.wait_event("CALL_ESTABLISHED", 10)
    bob.wait_event("CALL_ESTABLISHED", 5)
    out = wait_until(lambda: secure_call(a), 10, message="A's call to be active and secure")
    inc = wait_until(lambda: secure_call(b), 10, message="B's call to be active and secure")
    assert out["direction"] == "out" and inc["direction"] == "in"
    assert out["from"] == inc["from"] == "sip:alice@a.test"
    assert out["to"] == inc["to"] == "sip:bob@b.test"
    assert out["route"] == "static" and out["ended"] is None and out["started"].endswith("Z")
    assert out["remote_node"] == b_id  # the host cache knows B's address
    sec = out["security"]
    assert (sec["media"], sec["keying"], sec["verification"]) == ("srtp", "zrtp", "unverified")
    assert sec["sas"] and sec["sas"] == inc["security"]["sas"]  # one SAS, both ends
    assert sec["peer_key"] is None  # the OpenPGP layer (issue 7) fills it
    # media: the codec, both ends of the wire between the nodes, packets flowing
    call = wait_until(lambda: (c := a.api("GET", f"/api/calls/{out['id']}"))["media"][
        "packets_in"] > 50 and c, 10, message="media packets to be counted")
    media = call["media"]
    assert media["codec"] == "PCMU/8000"
    assert media["local"].startswith("127.0.0.2:") and media["remote"].startswith("127.0.0.3:")
    assert media["packets_out"] > 50 and media["lost"] >= 0
    # the CLI over the Unix socket sees the same
    listed = json.loads(cli(a, "calls", "--json").stdout)
    assert [c["id"] for c in listed] == [out["id"]]
    table = cli(a, "calls").stdout
    assert out["id"] in table and f"compare SAS '{sec['sas']}'" in table
    assert "peers known: 1" in cli(a, "status").stdout
    # the SAS confirmed by voice (here: by the test) through the CLI
    confirmed = cli(a, "verify", out["id"], "--yes")
    assert "secure, verified" in confirmed.stdout
    assert a.api("GET", f"/api/calls/{out['id']}")["security"]["verification"] == "verified"
    # hang up through the API: both softphones see the call closed
    ended = a.api("POST", f"/api/calls/{out['id']}/hangup")
    assert ended["state"] == "ended"
    alice.wait_event("CALL_CLOSED", 5)
    bob.wait_event("CALL_CLOSED", 5)
    [after] = a.api("GET", "/api/calls")
    assert after["state"] == "ended" and after["ended"] is not None
    assert after["outcome"] == "hung up from the control API"
    assert after["media"]["packets_in"] >= media["packets_in"]  # figures kept after the end
    wait_until(lambda: b.api("GET", "/api/calls")[0]["state"] == "ended", 5,
               message="B to see the call end")
    try:
        a.api("POST", f"/api/calls/{out['id']}/hangup")
    except urllib.error.HTTPError as error:
        assert error.code == 409
    else:
        raise AssertionError("a second hang-up must be refused")
    assert "freecall_calls_total 1" in raw(a, "/metrics")
    # the events, in order, as `freecall watch` printed them
    kinds: list[tuple[str, str]] = []

    def seen() -> bool:
        kinds[:] = [(e["type"], e.get("state") or e.get("action")
                     or e["security"]["verification"]) for e in events_of(watcher)]
        return ("call", "ended") in kinds

    wait_until(seen, 5, message="the watcher to print the end of the call")
    assert subsequence(kinds, [("registration", "added"), ("call", "trying"),
                               ("call", "active"), ("security", "unverified"),
                               ("security", "verified"), ("call", "ended")]), kinds
    events = events_of(watcher)
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    secure = next(e for e in events if e["type"] == "security")
    assert secure["call_id"] == out["id"] and secure["security"]["sas"] == sec["sas"]


def test_tokens_sockets_and_file_modes(nodes: Nodes) -> None:
    a = nodes.a
    assert http_status(a, "/api/status", None) == 401
    assert http_status(a, "/api/status", "0" * 64) == 401
    assert http_status(a, "/api/calls", a.token()[:-1]) == 401
    assert http_status(a, "/api/status", "") == 200
    token_file = a.state_dir / "control.token"
    sock = a.state_dir / "control.sock"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert sock.stat().st_uid == os.getuid()
    # another user cannot even connect to the socket
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n sys.exit(3)\n")
    denied = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                             sys.executable, "-c", probe, str(sock)], capture_output=True,
                            timeout=10, check=False)
    assert denied.returncode == 3, denied.stderr
    # the Unix socket needs no token: the CLI works with file permissions alone
    assert json.loads(cli(a, "peers", "--json").stdout) == a.api("GET", "/api/peers")
    # no daemon: a clear message, exit status 1
    gone = subprocess.run([sys.executable, "-m", "freecall", "calls", "--state-dir",
                           str(a.directory / "nowhere")], capture_output=True, text=True,
                          timeout=20, check=False)
    assert gone.returncode == 1 and "no daemon" in gone.stderr


def _get_from(lan: Lan, host: int, url: str, token: str | None) -> int:
    """Status of a GET made from another host (a network namespace)."""
    code = ("import sys,urllib.request,urllib.error\n"
            "r=urllib.request.Request(sys.argv[1])\n"
            "if len(sys.argv)>2: r.add_header('Authorization','Bearer '+sys.argv[2])\n"
            "try:\n print(urllib.request.urlopen(r,timeout=5).status)\n"
            "except urllib.error.HTTPError as e:\n print(e.code)\n")
    out = lan.exec(host, [sys.executable, "-c", code, url, *([token] if token else [])])
    return int(out.strip())


def test_bound_wider_the_api_still_refuses_other_hosts_unless_allowed(
    harness: Harness,
) -> None:
    """Two hosts on one LAN: the daemon on host 1 binds the API to 0.0.0.0. Host 2 is refused
    with the right token; loopback is served. Only ``control.allow_from`` admits host 2."""
    with Lan(2) as lan:
        node = harness.daemon("wide", public_host=lan.address(1), netns=lan.run(1),
                              start=False, users={"carol": "pw"},
                              config={"peering": {"seeds": []},
                                      "dns": {"servers": ["127.0.0.1:9"], "timeout": "1s"}})
        node.extra_config["control"] = {"listen": f"0.0.0.0:{node.control_port}"}
        harness.started.append(node)
        node.start()
        wait_until((node.state_dir / "control.token").exists, 10,
                   message="the token file")
        token = node.token()
        url = f"http://{lan.address(1)}:{node.control_port}/api/status"
        local = f"http://127.0.0.1:{node.control_port}/api/status"
        assert _get_from(lan, 2, url, token) == 403
        assert _get_from(lan, 2, url, None) == 403
        assert _get_from(lan, 1, local, token) == 200
        assert _get_from(lan, 1, local, None) == 401
        assert "refused a connection from 10.77.0.2" in node.log_text()
        node.stop()
        node.extra_config["control"]["allow_from"] = ["127.0.0.0/8", f"{lan.subnet}.0/24"]
        node.start()
        wait_until(lambda: _probe(lan, url), 10, message="the restarted daemon")
        assert _get_from(lan, 2, url, token) == 200
        assert _get_from(lan, 2, url, "wrong") == 401
        node.stop()


def _probe(lan: Lan, url: str) -> bool:
    try:
        return _get_from(lan, 2, url, None) == 401
    except (subprocess.CalledProcessError, ValueError):
        return False


def test_the_control_socket_path_is_refused_when_another_daemon_serves_it(
    nodes: Nodes, tmp_path: Path
) -> None:
    """Two daemons on one state directory would fight over its files: the second one stops
    at start with a message naming the socket."""
    a = nodes.a
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(a.state_dir / "control.sock"))  # the first one serves it
    config = tmp_path / "second.yaml"
    config.write_text(f"sip:\n  listen: ['udp:127.0.0.1:0']\n  public: []\n"
                      f"control:\n  listen: null\n  socket: {a.state_dir / 'control.sock'}\n")
    second = subprocess.run([sys.executable, "-m", "freecall", "run", "-c", str(config),
                             "--state-dir", str(tmp_path / "state")], capture_output=True,
                            text=True, timeout=20, check=False)
    assert second.returncode == 1
    assert "another daemon is serving this state directory" in second.stderr


def test_security_changes_raise_a_desktop_notification(
    harness: Harness, baresip: Callable[..., Baresip], tmp_path: Path
) -> None:
    """``control.notify: true``: ``notify-send`` (here a stand-in that records its arguments:
    the test machine has no desktop) is told when the call becomes secure, with the SAS."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "notifications.txt"
    fake = bindir / "notify-send"
    fake.write_text(f"#!/bin/sh\nprintf '%s|' \"$@\" >> {record}\necho >> {record}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    nodes = two_nodes(harness, env=env, config={"control": {"notify": True}})
    alice = phone(baresip, nodes.a, "alice", USERS_A["alice"], "a.test", 440)
    bob = phone(baresip, nodes.b, "bob", USERS_B["bob"], "b.test", 880)
    alice.dial("sip:bob@b.test")
    alice.wait_event("CALL_ESTABLISHED", 10)
    bob.wait_event("CALL_ESTABLISHED", 5)
    call = wait_until(lambda: secure_call(nodes.a), 10, message="a secure call")
    wait_until(record.exists, 5, message="a notification")
    [line] = record.read_text().splitlines()
    assert "--app-name=freecall" in line and "--urgency=normal" in line
    assert "Call with sip:bob@b.test is encrypted" in line
    assert call["security"]["sas"] in line
    alice.hangup()
    bob.wait_event("CALL_CLOSED", 5)
