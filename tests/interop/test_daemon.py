"""The daemon as a program: clean shutdown, logs a person can read, configuration errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness import Baresip, FreecallDaemon

USERS = {"alice": "alice-Secret-123", "bob": "bob-Secret-456"}


def test_sigterm_ends_every_call_with_bye(
    freecall_daemon: Callable[..., FreecallDaemon], baresip: Callable[..., Baresip]
) -> None:
    node = freecall_daemon(users=USERS, domains=["example.org"])
    alice = baresip("alice", registrar=node.sip_addr, password=USERS["alice"],
                    domain="example.org")
    bob = baresip("bob", registrar=node.sip_addr, password=USERS["bob"], domain="example.org")
    alice.wait_registered()
    bob.wait_registered()
    alice.dial("sip:bob@example.org")
    alice.wait_event("CALL_ESTABLISHED", 10)
    bob.wait_event("CALL_ESTABLISHED", 5)
    time.sleep(1.0)
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    alice.wait_event("CALL_CLOSED", 5)  # the BYE from the node, not an RTP timeout (10 s)
    bob.wait_event("CALL_CLOSED", 5)
    assert node.process.wait(10) == 0
    log = node.log_text()
    assert "ended 1 call(s) with BYE" in log and "node shut down" in log
    assert "freecall stopped" in log


def test_logs_name_registrations_and_calls_and_never_a_password(
    freecall_daemon: Callable[..., FreecallDaemon], baresip: Callable[..., Baresip]
) -> None:
    node = freecall_daemon(users=USERS, domains=["example.org"])  # debug level, SIP traces on
    alice = baresip("alice", registrar=node.sip_addr, password=USERS["alice"],
                    domain="example.org")
    bob = baresip("bob", registrar=node.sip_addr, password=USERS["bob"], domain="example.org")
    alice.wait_registered()
    bob.wait_registered()
    alice.dial("sip:bob@example.org")
    alice.wait_event("CALL_ESTABLISHED", 10)
    time.sleep(1.0)
    alice.hangup()
    bob.wait_event("CALL_CLOSED", 5)
    time.sleep(0.2)
    log = node.log_text()
    info = [line for line in log.splitlines() if " INFO " in line]
    assert any("registered alice@example.org" in line for line in info)
    assert any("registered bob@example.org" in line for line in info)
    ended = [line for line in info if "hung up by caller" in line]
    assert len(ended) == 1
    assert "sip:alice@example.org -> sip:bob@example.org" in ended[0]
    assert "duration 1 s" in ended[0] or "duration 2 s" in ended[0]
    for password in USERS.values():
        assert password not in log
    assert "Proxy-Authorization" not in "\n".join(info)  # SIP traces only at debug


def freecall(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "freecall", *args], cwd=cwd, capture_output=True, text=True,
        timeout=30, check=False,
    )


def test_configuration_errors_name_key_and_line_and_the_daemon_refuses_to_start(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sip:\n  listen: [\"udpx:127.0.0.1:5060\"]\nsecurity:\n  polcy: require\n")
    check = freecall("config", "check", str(bad), cwd=tmp_path)
    assert check.returncode == 1
    assert "sip.listen[0]: line 2" in check.stderr and "udpx" in check.stderr
    assert "security.polcy: line 4" in check.stderr and "policy" in check.stderr
    run = freecall("run", "-c", str(bad), "--state-dir", str(tmp_path / "s"), cwd=tmp_path)
    assert run.returncode == 1 and "sip.listen[0]: line 2" in run.stderr
    good = tmp_path / "good.yaml"
    good.write_text("sip:\n  domains: [example.org]\nusers:\n  alice: {password: pw}\n")
    assert freecall("config", "check", str(good), cwd=tmp_path).returncode == 0
    version = freecall("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("freecall ")


def test_no_configuration_at_all_serves_defaults(tmp_path: Path) -> None:
    """`freecall run` with no file: loopback only, a generated user, and how to use it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "freecall", "run", "--state-dir", str(tmp_path / "state")],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        env={"PATH": "/usr/bin:/bin", "USER": "carol", "HOME": str(tmp_path)},
    )
    try:
        deadline = time.monotonic() + 15
        lines = []
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if line.startswith("  baresip"):
                break
        text = "".join(lines)
        assert "udp:127.0.0.1:5060" in text and "tcp:127.0.0.1:5060" in text
        assert "user name   : carol" in text and "password    : " in text
        auto = (tmp_path / "state" / "auto-user.json")
        assert auto.stat().st_mode & 0o777 == 0o600
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
