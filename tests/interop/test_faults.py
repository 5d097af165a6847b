"""Faults (issue 11 item 4, issue 10's crash safety): the far daemon killed mid-call, a full
disk under the state directory, 20% loss and 200 ms of jitter between the nodes.

kill -9 of the *local* daemon in a burst of calls is tests/interop/test_service.py's
``test_kill_9_in_a_burst_of_calls_leaves_every_state_file_intact``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import (
    Baresip,
    Harness,
    ManagedProcess,
    Sipp,
    parse_stats_csv,
    wait_until,
)
from harness.calls import phone, static_pair
from harness.jitter import JitterLink
from harness.keys import exchange_keys

SCENARIOS = Path(__file__).parent / "scenarios"
RTP_TIMEOUT = 3.0


def test_the_far_daemon_killed_mid_call_ends_the_call_within_the_rtp_timeout(
    harness: Harness, baresip: Callable[..., Baresip],
) -> None:
    nodes = static_pair(harness, wait_control=True, config={
        "openpgp": {"sign": False}, "media": {"rtp_timeout": f"{RTP_TIMEOUT}s"}})
    a, b = nodes.a, nodes.b
    alice = phone(baresip, a, "alice", "alice-pw", "a.test", 440)
    phone(baresip, b, "bob", "bob-pw", "b.test", 880)
    alice.dial("sip:bob@b.test")
    alice.wait_event("CALL_ESTABLISHED", 10)
    wait_until(lambda: any(c["state"] == "active" and c["security"]["media"] == "srtp"
                           for c in a.api("GET", "/api/calls")), 10,
               message="the call to be secure")
    assert b.process is not None
    killed = time.monotonic()
    b.process.stop(sig=signal.SIGKILL)  # no BYE from B: its process is simply gone
    alice.wait_event("CALL_CLOSED", RTP_TIMEOUT + 5)
    elapsed = time.monotonic() - killed
    # the bridge checks every rtp_timeout/8 (at most 1 s): BYE between the bound and one check
    assert RTP_TIMEOUT - 0.5 <= elapsed <= RTP_TIMEOUT + 2.0, elapsed
    assert "no media for" in a.log_text()
    [call] = [c for c in a.api("GET", "/api/calls") if c["state"] == "ended"]
    assert call["outcome"] == "media timeout"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: the state directory's own file system, which the test fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
                   check=True, capture_output=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def _fill(directory: Path) -> Path:
    """Write until the file system is full (ENOSPC)."""
    filler = directory / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_under_the_state_directory_does_not_stop_calls(
    harness: Harness, sipp: Sipp, small_disk: Path,
) -> None:
    node = harness.daemon("full", users={"alice": "a", "bob": "b"}, start=False,
                          config={"sip": {"trusted": ["127.0.0.1/32"]},
                                  "openpgp": {"sign": False},
                                  "log": {"level": "info", "sip_trace": False}})
    node.state_dir = small_disk / "state"
    harness.started.append(node)
    node.start(wait_control=True)
    uas = sipp.start("uas", service="bob", time_limit=60, calls=1000)

    def register() -> None:
        done = sipp.run(SCENARIOS / "register_trusted.xml", str(node.sip_addr), service="bob",
                        variables={"contact_port": str(uas.port)}, time_limit=10)
        assert done.successful == 1, done

    register()
    first = sipp.run("uac", str(node.sip_addr), service="bob", calls=2, rate=10, time_limit=20)
    assert first.successful == 2, first
    filler = _fill(small_disk)
    register()  # a REGISTER still answered: the registrar works from memory
    # calls go on with the disk full (the file's last, partly used page may take a record
    # or two before a write fails: ten calls are sure to need a new page)
    during = sipp.run("uac", str(node.sip_addr), service="bob", calls=10, rate=20,
                      time_limit=20)
    assert during.successful == 10, during
    wait_until(lambda: node.metric("freecall_call_records_failures_total") >= 1, 5,
               message="the failed record writes to be counted")
    held = node.metric("freecall_call_records_pending")
    assert held >= 1
    wait_until(lambda: node.metric("freecall_state_write_failures_total") >= 1, 10,
               message="the failed registrations save to be counted")  # every 5 s
    log = node.log_text()
    assert log.count("cannot write call records") == 1  # once a streak, not once a call
    assert "No space left on device" in log
    # room again: the held-back records are written with the next call, none lost
    filler.unlink()
    after = sipp.run("uac", str(node.sip_addr), service="bob", calls=1, rate=10, time_limit=20)
    assert after.successful == 1, after
    lines = (node.state_dir / "calls.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 13 and all(r["outcome"] == "hung up by caller" for r in records)
    assert len({r["id"] for r in records}) == 13  # each call once, none lost
    assert node.metric("freecall_call_records_pending") == 0
    assert "call records written again" in node.log_text()
    uas.stop()
    assert node.process is not None and node.process.alive()
    assert os.path.exists(node.state_dir / "control.token")


@pytest.fixture
def lossy_link() -> Iterator[Callable[[str, str, int], None]]:
    """nftables rules that drop a share of the UDP datagrams between two loopback addresses,
    both ways (signalling, ZRTP and SRTP alike); the table is removed afterwards. The drop is
    on input: a drop on output makes the sender's sendto() fail with EPERM, which real loss on
    a network never does."""
    table = f"freecall_loss_{os.getpid()}"
    made = False

    def lose(host_a: str, host_b: str, percent: int) -> None:
        nonlocal made
        rules = [f"add table inet {table}",
                 f"add chain inet {table} inp {{ type filter hook input priority 0; }}"]
        for src, dst in ((host_a, host_b), (host_b, host_a)):
            rules.append(f"add rule inet {table} inp ip saddr {src} ip daddr {dst} "
                         f"meta l4proto udp numgen random mod 100 < {percent} counter drop")
        subprocess.run(["nft", "-f", "-"], input="\n".join(rules) + "\n", text=True,
                       check=True, capture_output=True)
        made = True

    yield lose
    if made:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False,
                       capture_output=True)


def _dropped(table_rules: str) -> list[int]:
    return [int(part.split()[0]) for part in table_rules.split("counter packets ")[1:]]


def test_calls_set_up_and_zrtp_completes_with_20_percent_loss_between_nodes(
    harness: Harness, baresip: Callable[..., Baresip],
    lossy_link: Callable[[str, str, int], None],
) -> None:
    """20% of every UDP datagram between the nodes is dropped by the kernel (nftables; this
    kernel has no sch_netem; the 200 ms jitter half of issue 11's fault is the next test's,
    through a userspace delay link): SIP retransmissions and ZRTP's own timers still get each
    call up and secure."""
    nodes = static_pair(harness, wait_control=True, config={
        "security": {"policy": "require", "zrtp_timeout": "20s"}})
    a, b = nodes.a, nodes.b
    exchange_keys(a, b)  # each expects the other's key: the signatures must verify
    alice = phone(baresip, a, "alice", "alice-pw", "a.test", 440)
    bob = phone(baresip, b, "bob", "bob-pw", "b.test", 880)
    lossy_link("127.0.0.2", "127.0.0.3", 20)
    for attempt in range(3):
        alice.dial("sip:bob@b.test")
        alice.wait_event("CALL_ESTABLISHED", 30)
        bob.wait_event("CALL_ESTABLISHED", 10)
        call = wait_until(lambda: next((c for c in a.api("GET", "/api/calls")
                                        if c["state"] == "active"
                                        and c["security"]["state"] == "secure"), None),
                          25, message=f"call {attempt + 1} to be secure despite the loss")
        inc = wait_until(lambda: next((c for c in b.api("GET", "/api/calls")
                                       if c["state"] == "active"
                                       and c["security"]["state"] == "secure"), None),
                         10, message="B's side to be secure")
        assert call["security"]["sas"] == inc["security"]["sas"]
        # signatures ride in Confirm: verified even through the loss
        path = f"/api/calls/{call['id']}"
        wait_until(lambda path=path: a.api("GET", path)["security"]["verification"]  # type: ignore[misc]
                   == "verified", 15,
                   message="the OpenPGP verification")
        time.sleep(1.5)  # some media through the loss too
        alice.hangup()
        alice.wait_event("CALL_CLOSED", 30)
        bob.wait_event("CALL_CLOSED", 30)
    listed = subprocess.run(["nft", "list", "table", "inet", f"freecall_loss_{os.getpid()}"],
                            capture_output=True, text=True, check=True).stdout
    dropped = _dropped(listed)
    assert len(dropped) == 2 and min(dropped) > 20, listed  # the loss really happened


def _sipp_in(harness: Harness, link: JitterLink, host: int, name: str,
             args: list[str]) -> tuple[ManagedProcess, int, Path]:
    """SIPp on a host of the jitter link, its own ports; (process, SIP port, stats CSV)."""
    block = harness.pool.block()
    port, control, media = block.take(1), block.take(1), block.take(8, align=4)
    csv_path = harness.run_dir / f"{name}.csv"
    proc = harness.process(name, [
        *link.run(host), "sipp", *args, "-i", "127.0.0.1", "-p", str(port), "-cp", str(control),
        "-mi", "127.0.0.1", "-mp", str(media), "-nostdin", "-trace_stat", "-stf", str(csv_path),
        "-fd", "1", "-trace_err", "-error_file", str(harness.run_dir / f"{name}_errors.log")])
    return proc, port, csv_path


def test_calls_set_up_and_zrtp_completes_through_200_ms_of_jitter(harness: Harness) -> None:
    """Every packet between the nodes (signalling, ZRTP, SRTP) held a random 0 to 200 ms, each
    way, by a userspace delay link (harness.jitter: netns, policy routing and a TUN device;
    this kernel has no sch_netem). A SIPp call through both daemons sets up, ZRTP completes
    (the same SAS on both sides) and the call ends cleanly; three calls in a row."""
    with JitterLink(200, directory=harness.run_dir) as link:
        nodes = []
        for host, (name, domain, users) in enumerate(
                (("a", "a.test", {"caller": "caller-pw"}), ("b", "b.test", {"bench": "b-pw"})),
                start=1):
            node = harness.daemon(
                name, users=users, domains=[domain], public_host=link.address(host),
                netns=link.run(host), start=False,
                config={"sip": {"trusted": ["127.0.0.1/32"]},
                        "security": {"policy": "require", "zrtp_timeout": "20s"},
                        "openpgp": {"sign": False}, "log": {"sip_trace": False},
                        "dns": {"servers": ["127.0.0.1:9"], "timeout": "1s"}})
            nodes.append(node)
        a, b = nodes
        a.extra_config["routes"] = {"b.test": f"sip:{b.public_host}:{b.public_port}"}
        b.extra_config["routes"] = {"a.test": f"sip:{a.public_host}:{a.public_port}"}
        for node in nodes:
            harness.started.append(node)
            node.start()
        try:
            _, uas_port, _ = _sipp_in(harness, link, 2, "uas", [
                "-sf", str(SCENARIOS / "uas_no180.xml"), "-m", "10", "-timeout", "120s"])
            time.sleep(0.5)
            reg, _, _ = _sipp_in(harness, link, 2, "register", [
                "-sf", str(SCENARIOS / "register_trusted.xml"), f"127.0.0.1:{b.sip_port}",
                "-s", "bench", "-key", "contact_port", str(uas_port), "-m", "1",
                "-timeout", "10s", "-timeout_error"])
            assert reg.wait(15) == 0, reg.log_text()
            calls, _, calls_csv = _sipp_in(harness, link, 1, "calls", [
                "-sf", str(Path(__file__).parents[1] / "harness" / "scenarios" / "uac_hold.xml"),
                f"127.0.0.1:{a.sip_port}", "-s", "bench", "-key", "domain", "b.test",
                "-m", "3", "-l", "1", "-r", "1", "-d", "6000", "-recv_timeout", "30s",
                "-timeout", "90s", "-timeout_error"])
            secure: list[tuple[str, str]] = []

            def both_secure() -> bool:
                sides = [[c for c in n.unix_api("/api/calls") if c["state"] == "active"
                          and c["security"]["media"] == "srtp"] for n in (a, b)]
                if sides[0] and sides[1]:
                    pair = (sides[0][0]["security"]["sas"], sides[1][0]["security"]["sas"])
                    if pair not in secure:
                        secure.append(pair)
                return len(secure) >= 3

            wait_until(both_secure, 90, interval=0.5, message="three calls secured by ZRTP")
            assert calls.wait(60) == 0, calls.log_text()
            for sas_a, sas_b in secure:
                assert sas_a and sas_a == sas_b, secure
        finally:
            for node in nodes:
                node.stop()
    stats = link.stats()
    rows = parse_stats_csv(calls_csv)
    print(f"\n[jitter] {stats['packets']} packets delayed {stats['min_ms']:.0f} to "
          f"{stats['max_ms']:.0f} ms (mean {stats['mean_ms']:.0f}); calls "
          f"{rows[-1]['SuccessfulCall(C)']} ok, {rows[-1]['FailedCall(C)']} failed, "
          f"{rows[-1]['Retransmissions(C)']} retransmissions; SAS {secure}")
    assert stats["packets"] > 60 and stats["max_ms"] > 150, stats  # SIP and ZRTP, no RTP
    assert rows[-1]["SuccessfulCall(C)"] == "3", rows[-1]
