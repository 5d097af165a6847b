"""SIP scanners against a daemon with public listeners (issue 11, item 1).

The real sipvicious tools (Debian's package: ``svmap``, ``svwar``, ``svcrack``) run as
subprocesses against one node on loopback: B (public listeners on 127.0.0.3, domain b.test,
users alice and bob; bob's device registered, so one existing user is online). Expected:
svmap sees only the generic ``freecall`` token, svwar finds no user with INVITE, OPTIONS or
REGISTER (and raw probes show identical answers and timings for existing and missing users),
svcrack is locked out before it reaches the right password while a softphone on another source
registers, and a flooding source is dropped by the rate limit with one log line and a metric.
"""

from __future__ import annotations

import re
import secrets
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from harness import FreecallDaemon, Harness, Sipp, wait_until

SCENARIOS = Path(__file__).parent / "scenarios"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
WORDS = ["bob", "alice", "carol", "dave", "100", "101", "admin", "eve", "200", "test"]
TIMING_SOURCE = "127.0.0.8"  # exempt from the rate limit: it sends hundreds of probes
FLOOD_SOURCE = "127.0.0.9"
RATE_LIMIT = 100  # per 2 s: svwar's scans from 127.0.0.1 stay under it
RATE_BLOCK = 3.0


@dataclass
class Node:
    daemon: FreecallDaemon
    harness: Harness


@pytest.fixture
def node(harness: Harness, sipp: Sipp) -> Iterator[Node]:
    daemon = harness.daemon(
        "b", users=USERS, domains=["b.test"], public_host="127.0.0.3", start=False,
        config={
            "log": {"sip_trace": False},
            "openpgp": {"sign": False},
            "security": {"auth_failures": 5, "auth_window": "60s", "lockout": "30s",
                         "rate_limit": RATE_LIMIT, "rate_window": "2s",
                         "rate_block": f"{RATE_BLOCK:g}s",
                         "rate_exempt": [f"{TIMING_SOURCE}/32"]},
        })
    harness.started.append(daemon)
    daemon.start(wait_control=True)
    # bob's device is online: a registered user must look like a missing one too
    uas = sipp.start(SCENARIOS / "uas_busy.xml", service="bob", time_limit=60, calls=1000)
    result = sipp.run(SCENARIOS / "register.xml", str(daemon.sip_addr), service="bob",
                      auth=("bob", USERS["bob"]), variables={"contact_port": str(uas.port)},
                      time_limit=10)
    assert result.returncode == 0 and result.successful == 1, result
    yield Node(daemon, harness)


def _tool(harness: Harness, *argv: str, timeout: float = 90.0) -> str:
    """Run a sipvicious tool from its own local port (responses retransmitted to an earlier
    run's port must not reach the next one) and return what it printed."""
    port = harness.pool.block().take(1)
    result = subprocess.run([*argv[:1], "-P", str(port), *argv[1:]], capture_output=True,
                            text=True, timeout=timeout, check=False)
    return result.stdout + result.stderr


def test_svmap_sees_only_a_generic_server(node: Node) -> None:
    daemon = node.daemon
    out = _tool(node.harness, "svmap", "-p", str(daemon.public_port), daemon.public_host)
    rows = [line for line in out.splitlines() if f"{daemon.public_host}:" in line]
    assert rows, out
    agent = rows[0].split("|")[2].strip()
    assert agent == "freecall", out  # the product token, no version, no library
    assert not re.search(r"\d", agent)


@pytest.mark.parametrize("method", ["INVITE", "OPTIONS", "REGISTER"])
def test_svwar_enumerates_no_user(node: Node, tmp_path: Path, method: str) -> None:
    daemon = node.daemon
    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS) + "\n")
    for domain in ("b.test", daemon.public_host):  # the users' domain, and the bare address
        out = _tool(node.harness, "svwar", "-v", "--force", "-m", method, "-d", str(words),
                    "--domain", domain, "-p", str(daemon.public_port), daemon.public_host)
        assert "found nothing" in out, out
        assert not re.search(r"extension '[^']*' (exists|probably exists)", out), out
        assert "reqauth" not in out and "noauth" not in out and "weird" not in out, out
    assert "Traceback" not in daemon.log_text()


# -- raw probes: the same answer, in the same time, for every user ---------------------------


def _request(method: str, user: str, domain: str, from_uri: str, local: tuple[str, int],
             call_id: str) -> bytes:
    uri = f"sip:{domain}" if method == "REGISTER" else f"sip:{user}@{domain}"
    return (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {local[0]}:{local[1]};branch=z9hG4bK{call_id};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <{from_uri}>;tag={call_id[:8]}\r\n"
        f"To: <sip:{user}@{domain}>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        f"Contact: <sip:{user}@{local[0]}:{local[1]}>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def _ack(response: bytes, domain: str, user: str, local: tuple[str, int]) -> bytes:
    """The ACK of a non-2xx INVITE answer (RFC 3261 section 17.1.1.3): no retransmissions."""
    head = response.decode(errors="replace").split("\r\n")
    keep = {h.split(":", 1)[0].lower(): h for h in head[1:] if ":" in h}
    return (f"ACK sip:{user}@{domain} SIP/2.0\r\n{keep['via']}\r\nMax-Forwards: 70\r\n"
            f"{keep['from']}\r\n{keep['to']}\r\n{keep['call-id']}\r\nCSeq: 1 ACK\r\n"
            "Content-Length: 0\r\n\r\n").encode()


@dataclass(frozen=True)
class Answer:
    status_line: str
    header_names: tuple[str, ...]
    seconds: float


def _probe(sock: socket.socket, target: tuple[str, int], method: str, user: str, domain: str,
           from_uri: str) -> Answer:
    local = sock.getsockname()
    call_id = secrets.token_hex(8)
    start = time.perf_counter()
    sock.sendto(_request(method, user, domain, from_uri, local, call_id), target)
    while True:
        data = sock.recv(65535)
        lines = data.decode(errors="replace").split("\r\n")
        if f"Call-ID: {call_id}" not in lines or lines[0].startswith("SIP/2.0 1"):
            continue  # a provisional answer, or a retransmission for an earlier probe
        seconds = time.perf_counter() - start
        break
    if method == "INVITE":
        sock.sendto(_ack(data, domain, user, local), target)
    names = tuple(line.split(":", 1)[0] for line in lines[1:] if ":" in line)
    return Answer(lines[0], names, seconds)


@pytest.mark.parametrize("method", ["INVITE", "OPTIONS", "REGISTER"])
def test_existing_and_missing_users_answer_alike_and_as_fast(node: Node, method: str) -> None:
    """The svwar-style From (the probed user at our domain) and a foreign From: status line and
    header names equal for bob (registered), alice (offline) and missing users; the median
    response times of existing and missing users differ by less than 0.5 ms."""
    daemon = node.daemon
    target = (daemon.public_host, daemon.public_port)
    rounds = 60
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((TIMING_SOURCE, 0))
        sock.settimeout(5.0)
        for from_kind in ("ours", "foreign"):
            times: dict[str, list[float]] = {"existing": [], "missing": []}
            shapes: set[tuple[str, tuple[str, ...]]] = set()
            for i in range(rounds):
                pairs = [("existing", "alice"), ("missing", f"nobody{i}")]
                if from_kind == "ours" or method == "REGISTER":
                    # online: only a real call (or OPTIONS) from another node reaches it
                    pairs.append(("existing", "bob"))
                for kind, user in pairs[:: 1 if i % 2 else -1]:
                    from_uri = (f"sip:{user}@b.test" if from_kind == "ours"
                                else f"sip:scanner{i}@elsewhere.test")
                    answer = _probe(sock, target, method, user, "b.test", from_uri)
                    shapes.add((answer.status_line, answer.header_names))
                    times[kind].append(answer.seconds)
            assert len(shapes) == 1, (from_kind, shapes)
            existing = statistics.median(times["existing"])
            missing = statistics.median(times["missing"])
            print(f"\n[timing] {method} From {from_kind}: {len(times['existing'])} existing "
                  f"{existing * 1000:.3f} ms, {len(times['missing'])} missing "
                  f"{missing * 1000:.3f} ms (medians)")
            assert abs(existing - missing) < 0.0005, (from_kind, existing, missing)


# -- svcrack and the lockout -------------------------------------------------------------------


def test_svcrack_is_locked_out_while_another_source_registers(node: Node, tmp_path: Path,
                                                              sipp: Sipp) -> None:
    daemon = node.daemon
    passwords = tmp_path / "passwords.txt"
    # the right password comes after more wrong ones than the lockout allows
    passwords.write_text("\n".join([f"guess{i}" for i in range(8)] + [USERS["alice"]]) + "\n")
    out = _tool(node.harness, "svcrack", "-u", "alice", "-d", str(passwords),
                "-p", str(daemon.sip_port), "127.0.0.1")
    assert "found nothing" in out, out
    assert USERS["alice"] not in out, out
    log = daemon.log_text()
    assert len(re.findall(r"authentication: 127\.0\.0\.1 locked out for 30 s", log)) == 1, log
    assert USERS["alice"] not in log and "guess" not in log  # no password in the log
    assert daemon.metric("freecall_auth_lockouts_total") == 1
    # meanwhile a softphone from another address registers as alice with her password
    uas = sipp.start(SCENARIOS / "uas_busy.xml", service="alice", time_limit=30, calls=10)
    result = sipp.run(SCENARIOS / "register.xml", str(daemon.sip_addr), service="alice",
                      auth=("alice", USERS["alice"]), variables={"contact_port": str(uas.port)},
                      time_limit=10, extra_args=["-i", "127.0.0.7"])
    assert result.returncode == 0 and result.successful == 1, result
    regs = daemon.api("GET", "/api/registrations")
    assert any(r["user"] == "alice" and "127.0.0.7" in r["source"] for r in regs), regs
    # the locked-out source: the right password gets a challenge, like any wrong one
    again = _tool(node.harness, "svcrack", "-u", "alice", "-d", str(passwords),
                  "-p", str(daemon.sip_port), "127.0.0.1")
    assert "found nothing" in again and USERS["alice"] not in again, again


# -- Pike-style rate limit -----------------------------------------------------------------------


def _options(call_id: str, local: tuple[str, int], domain: str) -> bytes:
    return _request("OPTIONS", "ping", domain, "sip:ping@elsewhere.test", local, call_id)


def _answered(sock: socket.socket, target: tuple[str, int], count: int) -> int:
    """Send ``count`` OPTIONS as fast as possible; how many got an answer."""
    local = sock.getsockname()
    for i in range(count):
        sock.sendto(_options(f"flood{i}-{secrets.token_hex(4)}", local, target[0]), target)
    answers = 0
    sock.settimeout(0.5)
    try:
        while True:
            sock.recv(65535)
            answers += 1
    except TimeoutError:
        return answers


def test_a_flooding_source_is_dropped_then_forgiven(node: Node) -> None:
    daemon = node.daemon
    target = (daemon.public_host, daemon.public_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        flood.bind((FLOOD_SOURCE, 0))
        other.bind(("127.0.0.10", 0))
        answered = _answered(flood, target, 3 * RATE_LIMIT)
        assert RATE_LIMIT <= answered < RATE_LIMIT + 10, answered  # then silence
        assert _answered(flood, target, 5) == 0  # still blocked
        assert _answered(other, target, 5) == 5  # another source is not affected
        wait_until(lambda: daemon.metric("freecall_ratelimit_blocked_sources") == 0,
                   RATE_BLOCK + 3, message="the block to expire")
        assert _answered(flood, target, 5) == 5  # the block expired
    log = daemon.log_text()
    lines = re.findall(rf"rate limit: {re.escape(FLOOD_SOURCE)} sent over", log)
    assert len(lines) == 1, log  # one line per block, not per packet
    assert daemon.metric("freecall_ratelimit_blocked_total") == 1
    # the rest of the burst may also be lost in the kernel's socket buffer; these are not
    assert daemon.metric("freecall_ratelimit_dropped_total") >= 1 + 5


def test_rate_limit_and_lockout_follow_a_reload(node: Node, sipp: Sipp) -> None:
    """``security.rate_*`` and ``security.auth_*`` apply on reload, without a restart."""
    daemon = node.daemon
    target = (daemon.public_host, daemon.public_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as before:
        before.bind(("127.0.0.13", 0))
        assert _answered(before, target, 60) == 60  # under the running limit (100)
    config = yaml.safe_load(daemon.config_path.read_text())
    config["security"].update({"rate_limit": 40, "rate_block": "30s", "auth_failures": 2})
    daemon.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    summary = daemon.api("POST", "/api/reload")
    assert {"security.rate_limit", "security.rate_block",
            "security.auth_failures"} <= set(summary["applied"]), summary
    assert summary["restart_needed"] == [], summary
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as after:
        after.bind(("127.0.0.14", 0))
        answered = _answered(after, target, 60)
        assert 40 <= answered < 50, answered  # the new limit
    assert "rate limit: 127.0.0.14 sent over 40 messages in 2 s: dropping it for 30 s" in (
        daemon.log_text())
    # two wrong passwords from one source now lock it out; then the right one fails too
    uas = sipp.start(SCENARIOS / "uas_busy.xml", service="alice", time_limit=30, calls=10)
    for password in ("wrong-1", "wrong-2", USERS["alice"]):
        result = sipp.run(SCENARIOS / "register.xml", str(daemon.sip_addr), service="alice",
                          auth=("alice", password), variables={"contact_port": str(uas.port)},
                          time_limit=10, extra_args=["-i", "127.0.0.15"])
        assert result.successful == 0, (password, result)
    assert re.search(r"authentication: 127\.0\.0\.15 locked out for 30 s after 2 failed",
                     daemon.log_text()), daemon.log_text()[-3000:]
    assert daemon.metric("freecall_auth_lockouts_total") == 1
