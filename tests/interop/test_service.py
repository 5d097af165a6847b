"""The daemon as a service (issue 10): readiness through systemd's notification socket, a
reload on SIGHUP that keeps a call up, call records, metrics, and kill -9 in a burst of calls
leaving every state file intact.

systemd is not PID 1 where the suite runs (a container), so the unit itself cannot be booted;
the daemon is started the way ``Type=notify`` starts it, with ``$NOTIFY_SOCKET`` and
``$WATCHDOG_USEC`` pointing at a socket the test listens on (issue 10 allows this), and
``systemd-analyze verify`` checks the units (tests/ops/test_units.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import Baresip, FreecallDaemon, Harness, Sipp, wait_until
from harness.calls import phone, static_pair

USERS_A = {"alice": "alice-pw"}
USERS_B = {"bob": "bob-pw"}
SCENARIOS = Path(__file__).parent / "scenarios"


def _pair(harness: Harness, *, log: dict[str, Any] | None = None,
          ) -> tuple[FreecallDaemon, FreecallDaemon]:
    """A and B by static routes, B A's seed, no SAS signatures (the call stays unverified)."""
    config: dict[str, Any] = {"openpgp": {"sign": False}}
    if log is not None:
        config["log"] = log
    nodes = static_pair(harness, config=config, seed=True, wait_control=True)
    return nodes.a, nodes.b


def _records(node: FreecallDaemon) -> list[dict[str, Any]]:
    """calls.jsonl, every line of which must be one JSON object."""
    path = node.state_dir / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _rewrite(node: FreecallDaemon, change: Callable[[dict[str, Any]], None]) -> None:
    config = yaml.safe_load(node.config_path.read_text())
    change(config)
    node.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def _log_after(node: FreecallDaemon, marker: int) -> str:
    return node.log_text()[marker:]


def _tcp_touch(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        time.sleep(0.1)


def test_a_call_stays_up_across_a_sighup_that_adds_a_user_and_changes_the_log_level(
    harness: Harness, baresip: Callable[..., Baresip],
) -> None:
    a, b = _pair(harness, log={"level": "info", "sip_trace": False})  # no DEBUG lines
    assert a.process is not None
    alice = phone(baresip, a, "alice", USERS_A["alice"], "a.test", 440)
    bob = phone(baresip, b, "bob", USERS_B["bob"], "b.test", 880)
    alice.dial("sip:bob@b.test")
    alice.wait_event("CALL_ESTABLISHED", 10)
    bob.wait_event("CALL_ESTABLISHED", 5)
    [call] = wait_until(lambda: [c for c in a.api("GET", "/api/calls")
                                 if c["state"] == "active"
                                 and c["security"]["media"] == "srtp"] or None,
                        10, message="the call to be up and secure")
    marker = len(a.log_text())
    _tcp_touch(a.sip_port)
    time.sleep(0.3)
    assert " DEBUG " not in _log_after(a, marker)

    def add_carol(config: dict[str, Any]) -> None:
        config["users"]["carol"] = {"password": "carol-pw"}
        config["log"]["level"] = "debug"
        config["sip"]["public"] = config["sip"]["public"][:2]  # needs a restart: reported

    _rewrite(a, add_carol)
    before = a.api("GET", f"/api/calls/{call['id']}")["media"]["packets_in"]
    os.kill(a.process.pid, signal.SIGHUP)
    reloaded = wait_until(lambda: "reload: applied" in (text := _log_after(a, marker))
                          and text, 5, message="the reload line")
    line = next(x for x in reloaded.splitlines() if "reload: applied" in x)
    assert "log.level" in line and "users" in line and "carol" in line
    assert "needs a restart: sip.public" in line
    # the log level changed: a new connection is now logged at DEBUG
    marker = len(a.log_text())
    _tcp_touch(a.sip_port)
    wait_until(lambda: " DEBUG " in _log_after(a, marker), 5, message="a DEBUG line")
    # the new user registers; the call never noticed
    carol = phone(baresip, a, "carol", "carol-pw", "a.test", 660)
    assert carol is not None
    now = wait_until(lambda: (c := a.api("GET", f"/api/calls/{call['id']}"))["media"][
        "packets_in"] > before + 50 and c, 10, message="media to keep flowing")
    assert now["state"] == "active" and now["security"]["media"] == "srtp"
    assert alice.wait_event is not None
    # the API action reloads too, and reports the same
    again = a.api("POST", "/api/reload")
    assert again["applied"] == [] and again["restart_needed"] == ["sip.public"]
    assert again["calls_kept"] == 1
    alice.hangup()
    alice.wait_event("CALL_CLOSED", 5)
    bob.wait_event("CALL_CLOSED", 5)
    # the call's record, written as it ended
    record = wait_until(lambda: next((r for r in _records(a) if r["id"] == call["id"]), None),
                        5, message="the call record")
    assert record["from"] == "sip:alice@a.test" and record["to"] == "sip:bob@b.test"
    assert record["direction"] == "out" and record["route"] == "static"
    assert record["duration_s"] >= 1 and record["outcome"] == "hung up by caller"
    assert record["security"]["media"] == "srtp" and record["security"]["keying"] == "zrtp"
    assert record["packets_in"] > 50
    metrics = a.metrics_text()
    assert "freecall_reloads_total 2" in metrics
    assert 'freecall_calls_ended_total{result="answered",verification="unverified"} 1' in metrics
    assert 'freecall_sip_requests_received_total{method="REGISTER"}' in metrics
    assert "freecall_call_records_written_total 1" in metrics
    assert 'freecall_media_packets_total{leg="net",direction="in"}' in metrics


def test_a_bad_configuration_on_reload_changes_nothing(
    freecall_daemon: Callable[..., FreecallDaemon],
) -> None:
    node = freecall_daemon(users=USERS_A)
    assert node.process is not None
    node.config_path.write_text("sip:\n  listen: [\"udpx:127.0.0.1:1\"]\n")
    os.kill(node.process.pid, signal.SIGHUP)
    wait_until(lambda: "keeping the running one" in node.log_text(), 5,
               message="the refused reload")
    assert "udpx" in node.log_text()
    try:
        node.api("POST", "/api/reload")
    except urllib.error.HTTPError as error:
        assert error.code == 400 and b"udpx" in error.read()
    else:
        raise AssertionError("a bad configuration must be refused")
    assert node.process.alive()
    assert node.api("GET", "/api/status")["version"]


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    with tempfile.TemporaryDirectory(prefix="fcsd") as directory:
        path = os.path.join(directory, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        yield sock, path
        sock.close()


def _next(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """The next notification that contains ``wanted`` (watchdog pings in between skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        fields = sock.recv(4096).decode().split("\n")
        if wanted in fields:
            return fields
        assert time.monotonic() < deadline, f"no {wanted}"


def test_readiness_watchdog_reload_and_stop_reach_notify_socket(
    harness: Harness, notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    node = harness.daemon("svc", users=USERS_A, env=env, start=False)
    harness.started.append(node)
    node.write_config()
    # started by hand, as systemd would: the test waits on the socket, not on the log
    from harness import ManagedProcess

    process = ManagedProcess("freecall-svc", [
        sys.executable, "-m", "freecall", "run", "-c", str(node.config_path)],
        log_path=node.log_path, cwd=node.directory, env=env).start()
    node.process = process
    ready = _next(sock, "READY=1", 30)
    assert f"MAINPID={process.pid}" in ready
    assert any(f.startswith("STATUS=serving 1 user(s) on udp:127.0.0.1:") for f in ready)
    # ready means ready: the softphone port answers at once
    options = (f"OPTIONS sip:127.0.0.1:{node.sip_port} SIP/2.0\r\n"
               "Via: SIP/2.0/UDP 127.0.0.1:9;rport;branch=z9hG4bK-ready\r\nMax-Forwards: 70\r\n"
               "From: <sip:t@127.0.0.1>;tag=1\r\nTo: <sip:127.0.0.1>\r\nCall-ID: ready-1\r\n"
               f"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(2)
        udp.sendto(options.encode(), ("127.0.0.1", node.sip_port))
        assert udp.recv(4096).startswith(b"SIP/2.0 200 ")
    # the watchdog is fed from the event loop, every 0.2 s here
    started = time.monotonic()
    pings = 0
    while time.monotonic() - started < 1.0:
        sock.settimeout(1)
        if sock.recv(100) == b"WATCHDOG=1":
            pings += 1
    assert 3 <= pings <= 7
    os.kill(process.pid, signal.SIGHUP)
    reloading = _next(sock, "RELOADING=1", 5)
    assert any(f.startswith("MONOTONIC_USEC=") for f in reloading)
    _next(sock, "READY=1", 5)
    process.popen.send_signal(signal.SIGTERM) if process.popen else None
    _next(sock, "STOPPING=1", 5)
    assert process.wait(10) == 0


def test_kill_9_in_a_burst_of_calls_leaves_every_state_file_intact(
    harness: Harness, sipp: Sipp,
) -> None:
    """kill -9 while SIPp places calls and registers: after a restart the call records, host
    cache, OpenPGP keys, pins and registrations are intact and parseable, and calls work
    again without waiting for the softphone to register again."""
    users = {"alice": "alice-pw", "bob": "bob-pw"}
    b = harness.daemon("b", users=USERS_B, domains=["b.test"], public_host="127.0.0.3",
                       start=False)
    a = harness.daemon("a", users=users, domains=["a.test"], public_host="127.0.0.2",
                       start=False, config={"sip": {"trusted": ["127.0.0.1/32"]}})
    a.extra_config["peering"] = {"seeds": [f"{b.public_host}:{b.peering_port}"]}
    for node in (b, a):
        node.extra_config["dns"] = {"servers": ["127.0.0.1:9"], "timeout": "1s"}
        node.extra_config["log"] = {"level": "info", "sip_trace": False}
        harness.started.append(node)
        node.start(wait_control=True)
    # a pin (bob's key trusted for bob@b.test) and B in the saved host cache
    from harness.keys import keys_cli

    keys_cli(a, "import", "-", stdin=keys_cli(b, "export").encode())
    b_fpr = b.api("GET", "/api/status")["key_fingerprint"]
    keys_cli(a, "trust", "bob@b.test", b_fpr)
    a_fpr = a.api("GET", "/api/status")["key_fingerprint"]
    cache_path = a.state_dir / "hostcache.json"
    wait_until(lambda: cache_path.exists()
               and len(json.loads(cache_path.read_text())["records"]) >= 2, 30,
               message="B in A's saved host cache")  # signed records: ours and B's
    # the burst: a SIPp UAS registered as bob, SIPp calling it, REGISTERs in between
    uas = sipp.start("uas", service="bob", time_limit=60, calls=100000)
    registered = sipp.run(SCENARIOS / "register_trusted.xml", str(a.sip_addr), service="bob",
                          variables={"contact_port": str(uas.port)}, time_limit=10)
    assert registered.successful == 1, registered
    saved = a.state_dir / "registrations.json"
    wait_until(lambda: saved.exists() and "bob@a.test" in saved.read_text(), 10,
               message="bob's registration saved")
    burst = sipp.start("uac", str(a.sip_addr), service="bob", calls=100000, rate=60,
                       time_limit=60)
    regs = sipp.start(SCENARIOS / "register_trusted.xml", str(a.sip_addr), service="alice",
                      variables={"contact_port": "5999"}, calls=100000, rate=30, time_limit=60)
    assert a.process is not None
    wait_until(lambda: len(_records(a)) >= 40, 20, message="calls to finish during the burst")
    a.process.popen.kill() if a.process.popen else None  # SIGKILL, mid-burst
    a.process.wait(5)
    burst.stop()
    regs.stop()
    # every file parses; every call the log saw end has its record
    records = _records(a)
    ended_in_log = {line.split("call ", 1)[1].split(":", 1)[0]
                    for line in a.log_text().splitlines() if ", duration " in line}
    assert ended_in_log and ended_in_log <= {r["id"] for r in records}
    cache = json.loads(cache_path.read_text())
    assert len(cache["records"]) >= 2
    pins = json.loads((a.state_dir / "openpgp-pins.json").read_text())
    assert b_fpr in json.dumps(pins)
    # after a restart: same key, B known from the cache, pins kept, calls recorded again
    marker = len(a.log_text())
    a.start(wait_control=True)
    log = _log_after(a, marker)
    assert "set aside" not in log and "Traceback" not in log
    assert a.api("GET", "/api/status")["key_fingerprint"] == a_fpr
    assert any(p["node_id"] == b.api("GET", "/api/status")["node_id"]
               for p in a.api("GET", "/api/peers"))
    assert any(k.get("pin") == "trusted" and "bob@b.test" in k.get("pinned_for", [])
               for k in a.api("GET", "/api/keys"))
    # bob's UDP registration came back from registrations.json: calls reach him at once
    assert "registration(s) restored from registrations.json" in log
    again = sipp.run("uac", str(a.sip_addr), service="bob", calls=3, rate=10, time_limit=20)
    assert again.successful == 3, again
    assert len(_records(a)) >= len(records) + 3
    uas.stop()
    done = subprocess.run([sys.executable, "-m", "freecall", "keys", "show", "-c",
                           str(a.config_path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0 and a_fpr[-16:] in done.stdout.replace(" ", "")
