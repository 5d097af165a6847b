"""SIP floods at five times the measured capacity, and garbage floods on the media and gossip ports
(issue 11, item 2).

    .venv/bin/python bench/flood.py              # about 4 minutes
    .venv/bin/python bench/flood.py --seconds 5  # shorter floods

Part 1, SIP.  One node (B: public listener on 127.0.0.3, user ``bench`` registered by a SIPp uas
on the softphone side, trusted from 127.0.0.1 like bench/cps.py).  First its capacity is
measured in the same run, bench/cps.py's way: SIPp's uac at rising rates through the softphone
listener to the uas, ``--probe`` seconds each; capacity is the highest rate at which every call
completed.  Then floods of 5x that many messages per second hit the public listener from
127.0.0.9: INVITEs to ``bench`` (the costly case: each one that passes is forwarded to the phone
and takes media ports) and REGISTERs, each from one source port (``-t u1``) and from a new
source port per message (``-t un``), sent once and never retransmitted
(tests/harness/scenarios/flood_*.xml).  A last INVITE flood comes from 127.0.0.10, which B
exempts from the rate limit (``security.rate_exempt``): it stands for a flood spread over more
addresses than the limiter can tell from honest peers, so the daemon's own overload behaviour
is what is measured.  During every flood a legitimate caller on 127.0.0.4 (another node, as far
as B knows) places calls to ``bench`` through the public listener at ``--legit-rate`` per
second.  Printed per flood: messages sent, legitimate calls completed, B's RSS before, at peak
and after.  Afterwards: B's RSS once the flood's transactions expired (Timer H/J, 32 s), and a
run at the measured capacity through the softphone listener (recovery).

Part 2, garbage.  Two nodes (harness.calls.static_pair) carry a ZRTP call between two baresip
phones; a Python blaster sends random datagrams (1 to 1400 bytes) as fast as it can to every
media port of B, then to B's gossip port, ``--seconds`` each.  During each: the call's media
still flows both ways, a second call placed meanwhile sets up with ZRTP, and (gossip flood) a
third node started with B as its seed learns B's record.  RSS as above.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from harness import UAS_NO180, FreecallDaemon, Harness, Sipp, SippProcess, wait_until  # noqa: E402
from harness.calls import USERS_A, USERS_B, phone, static_pair  # noqa: E402
from harness.flood import RssSampler, blaster, open_fds, rss_mb  # noqa: E402

SCENARIOS = ROOT / "tests" / "harness" / "scenarios"
REGISTER_TRUSTED = ROOT / "tests" / "interop" / "scenarios" / "register_trusted.xml"
FLOOD_SOURCE = "127.0.0.9"
EXEMPT_SOURCE = "127.0.0.10"
LEGIT_SOURCE = "127.0.0.4"
GARBAGE_SOURCE = "127.0.0.11"
MEDIA_PORTS = (20000, 29999)  # the default range (the harness pool is 14000-19999)


# -- part 1: SIP floods ------------------------------------------------------------------------


@dataclass
class SipNode:
    daemon: FreecallDaemon
    sipp: Sipp
    uas: SippProcess

    @property
    def pid(self) -> int:
        assert self.daemon.process is not None
        return self.daemon.process.pid


def sip_node(h: Harness, *, media_ports: tuple[int, int] = MEDIA_PORTS,
             rate_limit: int = 200, log_level: str = "info") -> SipNode:
    """B with ``bench`` registered at a SIPp uas (no 180: harness gotcha K1)."""
    daemon = h.daemon(
        "b", users={"bench": "bench-pw"}, domains=["b.test"], public_host="127.0.0.3",
        config={"sip": {"trusted": ["127.0.0.1/32"]},
                "log": {"level": log_level, "sip_trace": False},
                "openpgp": {"sign": False},
                "media": {"ports": f"{media_ports[0]}-{media_ports[1]}"},
                "security": {"rate_limit": rate_limit,
                             "rate_exempt": [f"{EXEMPT_SOURCE}/32"]}},
        start=False)
    h.started.append(daemon)
    daemon.start(wait_control=True)
    sipp = h.sipp
    uas = sipp.start(UAS_NO180, service="bench", calls=10_000_000, time_limit=3600,
                     extra_args=["-l", "100000"])
    reg = sipp.run(REGISTER_TRUSTED, str(daemon.sip_addr), service="bench",
                   variables={"contact_port": str(uas.port)}, time_limit=10)
    if reg.returncode != 0:
        raise RuntimeError(f"the uas could not register: {reg}")
    return SipNode(daemon, sipp, uas)


def calls(node: SipNode, rate: float, count: int, *, public: bool = False,
          name: str | None = None) -> tuple[int, int]:
    """``count`` calls at ``rate``/s (built-in uac, no hold) to ``bench``: (ok, failed).
    ``public``: from LEGIT_SOURCE to the public listener, as another node would."""
    d = node.daemon
    target = f"{d.public_host}:{d.public_port}" if public else str(d.sip_addr)
    extra = ["-recv_timeout", "10s", "-l", str(int(rate * 4) + 50)]
    if public:
        extra += ["-i", LEGIT_SOURCE]  # the last -i wins: SIPp's own -i 127.0.0.1 comes first
    result = node.sipp.run("uac", target, name=name, service="bench", calls=count, rate=rate,
                           time_limit=count / rate + 40, extra_args=extra)
    return result.successful, result.failed + (count - result.successful - result.failed)


def capacity(node: SipNode, rates: list[int], seconds: float) -> int:
    """The highest rate at which every call of a ``seconds`` run completed (bench/cps.py)."""
    best = 0
    for rate in rates:
        ok, failed = calls(node, rate, int(rate * seconds), name=f"capacity_{rate}")
        print(f"  capacity probe {rate:5}/s: {ok} ok, {failed} failed", flush=True)
        if failed:
            break
        best = rate
        time.sleep(2)
    return best


@dataclass
class FloodResult:
    name: str
    rate: int
    sent: int
    seconds: float
    legit_ok: int
    legit_failed: int
    rss_before: float
    rss_peak: float
    rss_after: float
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return (f"  {self.name:34} {self.sent:7} sent ({self.sent / self.seconds:6.0f}/s)  "
                f"legit {self.legit_ok}/{self.legit_ok + self.legit_failed}  RSS "
                f"{self.rss_before:4.0f} -> peak {self.rss_peak:4.0f} -> {self.rss_after:4.0f} MB"
                + "".join(f"  {k} {v}" for k, v in self.extra.items()))


def refused_503(node: SipNode) -> dict[str, int]:
    """B's own 503s so far, by reason (``freecall_overload_refused_total``)."""
    found = re.findall(r'^freecall_overload_refused_total\{reason="(\w+)"\} (\S+)$',
                       node.daemon.metrics_text(), re.MULTILINE)
    return {reason: int(float(value)) for reason, value in found}


def sip_flood(node: SipNode, name: str, scenario: str, transport: str, source: str, rate: int,
              seconds: float, legit_rate: float) -> FloodResult:
    """One flood with legitimate calls alongside it; B's 503s during it in ``extra``."""
    d = node.daemon
    before = refused_503(node)
    target = f"{d.public_host}:{d.public_port}"
    rss_before = rss_mb(node.pid)
    count = int(rate * seconds)
    legit_result: list[tuple[int, int]] = []
    with RssSampler(node.pid) as sampler:
        flood = node.sipp.start(SCENARIOS / scenario, target, name=name, service="bench",
                                calls=count, rate=rate, transport=transport,
                                time_limit=seconds * 3 + 20,
                                extra_args=["-i", source, "-l", "100000", "-max_socket",
                                            "10000"])
        time.sleep(min(1.0, seconds / 4))  # the flood is under way
        legit = threading.Thread(target=lambda: legit_result.append(calls(
            node, legit_rate, max(1, int(legit_rate * (seconds - 2))), public=True,
            name=f"{name}_legit")))
        legit.start()
        started = time.monotonic()
        result = flood.wait()
        elapsed = max(time.monotonic() - started + min(1.0, seconds / 4), 0.001)
        legit.join()
    ok, failed = legit_result[0] if legit_result else (0, 0)
    after = refused_503(node)
    extra: dict[str, Any] = {f"503 {reason}": after[reason] - before.get(reason, 0)
                             for reason in sorted(after)}
    return FloodResult(name, rate, result.created, min(elapsed, result.duration_s) or elapsed,
                       ok, failed, rss_before, sampler.peak, rss_mb(node.pid), extra)


def part_sip(h: Harness, args: argparse.Namespace) -> list[str]:
    node = sip_node(h)
    pid = node.pid
    idle = rss_mb(pid)
    print(f"B: RSS idle {idle:.0f} MB, {open_fds(pid)} open fds", flush=True)
    if args.capacity:
        cap = args.capacity
        print(f"capacity given: {cap} calls/s")
    else:
        cap = capacity(node, [200, 400, 600, 800, 1000, 1200, 1400], args.probe)
        print(f"capacity: {cap} calls/s (every call of a {args.probe:g} s run completed)")
    if cap == 0:
        raise SystemExit("no rate passed: the machine is too busy")
    rate = 5 * cap
    print(f"floods: {rate} messages/s (5x), {args.seconds:g} s each; legitimate calls "
          f"{args.legit_rate:g}/s from {LEGIT_SOURCE} to the public listener", flush=True)
    failures: list[str] = []
    results: list[FloodResult] = []
    floods = [
        ("INVITE, one source port", "flood_invite.xml", "u1", FLOOD_SOURCE),
        ("INVITE, a port per message", "flood_invite.xml", "un", FLOOD_SOURCE),
        ("REGISTER, one source port", "flood_register.xml", "u1", "127.0.0.12"),
        ("REGISTER, a port per message", "flood_register.xml", "un", "127.0.0.12"),
        ("INVITE, limiter exempt", "flood_invite.xml", "u1", EXEMPT_SOURCE),
        ("INVITE, limiter exempt, again", "flood_invite.xml", "u1", EXEMPT_SOURCE),
    ]
    for label, scenario, transport, source in floods:
        tag = f"flood{len(results)}_{label.split(',')[0].lower()}_{transport}"
        res = sip_flood(node, tag, scenario, transport, source, rate, args.seconds,
                        args.legit_rate)
        res.name = label
        print(res.line(), flush=True)
        if res.legit_failed and EXEMPT_SOURCE not in source:
            failures.append(f"{label}: {res.legit_failed} legitimate calls failed")
        results.append(res)
        time.sleep(2)
    print("waiting 70 s: the floods' unacknowledged calls end at media.rtp_timeout (30 s) or "
          "64*T1 without ACK (32 s), their transactions 32 s later ...", flush=True)
    time.sleep(70)
    settled = rss_mb(pid)
    after_first = results[-2].rss_after  # the first exempt flood: the costliest
    ok, failed = calls(node, cap, int(cap * args.probe), name="recovery")
    print(f"recovery: {ok} ok, {failed} failed at {cap} calls/s; RSS idle {idle:.0f}, after "
          f"the first exempt flood {after_first:.0f}, the second {results[-1].rss_after:.0f}, "
          f"settled {settled:.0f}, after recovery "
          f"{rss_mb(pid):.0f} MB; {open_fds(pid)} open fds", flush=True)
    if failed:
        failures.append(f"recovery: {failed} calls failed at {cap}/s")
    if results[-1].rss_after > after_first + args.rss_tolerance:
        failures.append(f"RSS grew with a second flood: {after_first:.0f} -> "
                        f"{results[-1].rss_after:.0f} MB")
    if settled > after_first + args.rss_tolerance:
        failures.append(f"RSS grew after the floods: {after_first:.0f} -> {settled:.0f} MB")
    log = node.daemon.log_text()
    for bad in ("Traceback", " ERROR "):
        if bad in log:
            failures.append(f"{bad.strip()} in B's log")
    return failures


# -- part 2: garbage on the media and gossip ports ---------------------------------------------


def knows(node: FreecallDaemon, host: str) -> bool:
    """Whether ``node``'s host cache holds a node at ``host`` (learned by gossip)."""
    return any(host in str(peer.get("addresses")) for peer in node.api("GET", "/api/peers"))


def call_media(node: FreecallDaemon, call_id: str) -> dict[str, Any]:
    for call in node.api("GET", "/api/calls"):
        if call["id"] == call_id:
            return dict(call)
    raise AssertionError(f"call {call_id} gone from {node.name}")


def part_garbage(h: Harness, args: argparse.Namespace,
                 check: Callable[[bool, str], None]) -> None:
    pair = static_pair(h, wait_control=True,
                       config={"log": {"level": "info", "sip_trace": False},
                               "openpgp": {"sign": False}},
                       b_config={"users": {"bob2": {"password": "bob2-pw"}}})
    a, b = pair.a, pair.b
    assert b.process is not None
    pid = b.process.pid
    alice = phone(h.baresip, a, "alice", USERS_A["alice"], "a.test", 440)
    bob = phone(h.baresip, b, "bob", USERS_B["bob"], "b.test", 880)
    phone(h.baresip, b, "bob2", "bob2-pw", "b.test", 660)  # answers the second call
    alice2 = h.baresip("alice2", registrar=a.sip_addr, password=USERS_A["alice"],
                       tone_hz=550, domain="a.test", user="alice")
    alice2.wait_registered()
    alice.dial("sip:bob@b.test")
    alice.wait_event("CALL_ESTABLISHED", 15)
    [call] = wait_until(lambda: [c for c in b.api("GET", "/api/calls")
                                 if c["state"] == "active" and c["media"]
                                 and c["media"]["packets_in"] > 0] or None, 10,
                        message="B to see the call's media")
    wait_until(lambda: call_media(b, call["id"])["security"]["media"] == "srtp", 10,
               message="the first call's ZRTP")
    lo, hi = (int(p) for p in b.config_dict()["media"]["ports"].split("-"))
    targets = {
        f"media ports ({hi - lo + 1})": [(b.public_host, p) for p in range(lo, hi + 1)],
        "gossip port": [(b.public_host, b.peering_port)],
    }
    for round_, (label, ports) in enumerate(targets.items()):
        rss_before = rss_mb(pid)
        first = call_media(b, call["id"])["media"]
        t_first = time.monotonic()
        with RssSampler(pid) as sampler, \
                blaster(GARBAGE_SOURCE, ports, args.seconds, seed=round_) as sent:
            started = time.monotonic()
            time.sleep(1.0)
            # a second call placed during the flood: set up, ZRTP completes
            alice2.dial("sip:bob2@b.test")
            alice2.wait_event("CALL_ESTABLISHED", 15)
            second = wait_until(lambda: [c for c in b.api("GET", "/api/calls")
                                         if c["state"] == "active" and c["id"] != call["id"]
                                         and c["security"]["media"] == "srtp"] or None,
                                max(5.0, args.seconds - 3),
                                message="the second call's ZRTP during the flood")
            joined = "n/a"
            if "gossip" in label:
                c = h.daemon(f"c{round_}", users={"carol": "carol-pw"}, domains=["c.test"],
                             public_host="127.0.0.5",
                             config={"peering": {"seeds": [f"{b.public_host}:{b.peering_port}"]},
                                     "log": {"level": "info", "sip_trace": False},
                                     "openpgp": {"sign": False}},
                             start=False)
                h.started.append(c)
                c.start(wait_control=True)
                wait_until(partial(knows, c, b.public_host),
                           max(5.0, args.seconds - 5),
                           message="a new node to learn B through gossip during the flood")
                joined = "yes"
            during = call_media(b, call["id"])["media"]
            window = time.monotonic() - t_first
            alice2.hangup()
            alice2.wait_event("CALL_CLOSED", 10)
            remaining = args.seconds - (time.monotonic() - started)
            if remaining > 0:
                time.sleep(remaining)
        seconds = time.monotonic() - started
        time.sleep(1.0)
        later = call_media(b, call["id"])
        flowing = (round((during["packets_in"] - first["packets_in"]) / window),
                   round((during["packets_out"] - first["packets_out"]) / window))
        print(f"  garbage on {label:18} {sent[0]:8} datagrams ({sent[0] / seconds:7.0f}/s)  "
              f"first call's media in/out {flowing[0]}/{flowing[1]} packets/s (50 sent), "
              f"state "
              f"{later['state']}; second call srtp {second[0]['security']['media']}; "
              f"new node joined {joined}; RSS {rss_before:.0f} -> peak {sampler.peak:.0f} -> "
              f"{rss_mb(pid):.0f} MB", flush=True)
        check(later["state"] == "active", f"{label}: the first call ended")
        check(min(flowing) > 5, f"{label}: media stalled during the flood {flowing}")
    settled_before = rss_mb(pid)
    time.sleep(10)
    check(rss_mb(pid) <= settled_before + args.rss_tolerance, "RSS grew after the floods")
    alice.hangup()
    alice.wait_event("CALL_CLOSED", 5)
    bob.wait_event("CALL_CLOSED", 5)
    for bad in ("Traceback", " ERROR "):
        check(bad not in b.log_text(), f"{bad.strip()} in B's log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each flood")
    parser.add_argument("--probe", type=float, default=5.0, help="seconds per capacity probe")
    parser.add_argument("--capacity", type=int, default=0, help="skip the capacity probes")
    parser.add_argument("--legit-rate", type=float, default=2.0)
    parser.add_argument("--rss-tolerance", type=float, default=15.0, help="MB")
    parser.add_argument("--only", choices=["sip", "garbage"])
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    run_dir = Path(os.environ.get("FREECALL_BENCH_DIR", "/tmp")) / f"freecall-flood-{os.getpid()}"
    if args.only != "garbage":
        print("part 1: SIP floods", flush=True)
        with Harness(run_dir / "sip") as h:
            failures += part_sip(h, args)
    if args.only != "sip":
        print("part 2: garbage UDP on B's media and gossip ports during a ZRTP call", flush=True)
        with Harness(run_dir / "garbage") as h:
            part_garbage(h, args, check)
    print("\n" + ("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures)))
    print(f"(logs in {run_dir})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
