"""Calls per second through freecall, against Kamailio doing the same work in the same run.

    .venv/bin/python bench/cps.py            # about 6-10 minutes
    .venv/bin/python bench/cps.py --quick    # 5 s runs, fewer rates

SIPp's built-in uac calls (INVITE, 100, 200, ACK, BYE, 200; no hold time) through the proxy to a
SIPp uas (the built-in one without its 180, which avoids the false failures of a late 180 at a
multi-worker proxy: shared harness gotcha K1) registered with the proxy as ``bench``.  Both
proxies record-route and look the callee up in their location service:

* freecall: one process (asyncio, uvloop), the source trusted (no digest), INFO logging;
* Kamailio 5.6: the shared harness configuration (bench/kamailio/kamailio.cfg), 4 UDP workers,
  WITH_RR, usrloc in memory.

For each, the rate rises until a run has a failed call; the figure is the highest rate whose run
of ``--seconds`` had none (every call completed).  Also printed: CPU used by the proxy (percent
of one core, all processes) and freecall's memory idle and after the load.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
UAS_SCENARIO = HERE / "uas_no180.xml"
REGISTER = ROOT / "tests" / "interop" / "scenarios" / "register_trusted.xml"
HZ = os.sysconf("SC_CLK_TCK")

PROXY_PORT = 15170
UAS_PORT = 15190
UAC_PORT = 15161
REG_PORT = 15191


@dataclass
class Run:
    rate: int
    successful: int
    failed: int
    retransmissions: int
    cpu_percent: float
    passed: bool


def port_free(port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_free(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [pid] + [int(p) for p in out.stdout.split()]


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def freecall(work: Path) -> Iterator[subprocess.Popen[bytes]]:
    config = work / "freecall.yaml"
    config.write_text(
        f'sip:\n  listen: ["udp:127.0.0.1:{PROXY_PORT}"]\n  trusted: ["127.0.0.0/8"]\n'
        "users:\n  bench: {password: bench}\nlog: {level: info}\n"
        "media: {ports: 30000-30999}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "freecall", "run", "-c", str(config), "--state-dir",
         str(work / "state")],
        stdout=subprocess.DEVNULL, stderr=(work / "freecall.log").open("wb"),
    )
    try:
        wait_port(PROXY_PORT)
        yield proc
    finally:
        stop(proc)


@contextmanager
def kamailio(work: Path) -> Iterator[subprocess.Popen[bytes]]:
    cfg = work / "kamailio.cfg"
    template = (HERE / "kamailio" / "kamailio.cfg").read_text()
    cfg.write_text(template.replace("5070", str(PROXY_PORT)))
    proc = subprocess.Popen(
        ["kamailio", "-DD", "-E", "-f", str(cfg), "-Y", str(work), "-A", "WITH_RR",
         "-A", f'FWD_DST="sip:127.0.0.1:{UAS_PORT}"', "-A", "KAM_CHILDREN=4",
         "-A", f'CTL_SOCK="unix:{work}/kamailio_ctl"', "-m", "256", "-M", "16"],
        stdout=subprocess.DEVNULL, stderr=(work / "kamailio.log").open("wb"),
    )
    try:
        wait_port(PROXY_PORT)
        yield proc
    finally:
        stop(proc)


def one_run(proxy_pids: list[int], rate: int, seconds: int, work: Path) -> Run:
    calls = rate * seconds
    uas = subprocess.Popen(
        ["sipp", "-sf", str(UAS_SCENARIO), "-i", "127.0.0.1", "-p", str(UAS_PORT), "-nostdin",
         "-timeout", f"{seconds * 3 + 30}s", "-buff_size", "4194304"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(UAS_PORT)
        reg = subprocess.run(
            ["sipp", "-sf", str(REGISTER), f"127.0.0.1:{PROXY_PORT}", "-i", "127.0.0.1",
             "-p", str(REG_PORT), "-s", "bench", "-key", "contact_port", str(UAS_PORT),
             "-m", "1", "-nostdin", "-timeout", "5s"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )
        if reg.returncode != 0:
            raise RuntimeError("the uas could not register with the proxy")
        stats = work / f"uac_{rate}.csv"
        ticks0 = cpu_ticks(proxy_pids)
        start = time.monotonic()
        uac = subprocess.run(
            ["sipp", "-sn", "uac", f"127.0.0.1:{PROXY_PORT}", "-i", "127.0.0.1",
             "-p", str(UAC_PORT), "-s", "bench", "-r", str(rate), "-m", str(calls),
             "-l", str(rate * 4 + 100), "-buff_size", "4194304", "-recv_timeout", "8s",
             "-timeout", f"{seconds * 3 + 20}s", "-timeout_error", "-nostdin",
             "-trace_stat", "-stf", str(stats), "-fd", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )
        elapsed = time.monotonic() - start
        ticks1 = cpu_ticks(proxy_pids)
    finally:
        stop(uas, signal.SIGKILL)
    rows = list(csv.reader(stats.open(), delimiter=";"))
    head, last = rows[0], rows[-1]
    successful = int(last[head.index("SuccessfulCall(C)")])
    failed = int(last[head.index("FailedCall(C)")])
    retrans = int(last[head.index("Retransmissions(C)")])
    cpu = 100.0 * (ticks1 - ticks0) / HZ / elapsed
    passed = uac.returncode == 0 and failed == 0 and successful == calls
    return Run(rate, successful, failed, retrans, cpu, passed)


def sweep(name: str, rates: list[int], seconds: int, work: Path) -> tuple[Run | None, list[Run]]:
    runs: list[Run] = []
    best: Run | None = None
    for rate in rates:
        runs_dir = work / f"{name}_{rate}"
        runs_dir.mkdir()
        manager = freecall if name == "freecall" else kamailio
        with manager(runs_dir) as proc:
            pids = children(proc.pid)
            idle = rss_mb(proc.pid) if name == "freecall" else 0.0
            time.sleep(0.5)
            run = one_run(pids, rate, seconds, runs_dir)
            after = rss_mb(proc.pid) if name == "freecall" else 0.0
        runs.append(run)
        memory = f"  RSS idle {idle:.0f} MB, after {after:.0f} MB" if name == "freecall" else ""
        print(
            f"  {name:9} {rate:5} cps: {run.successful:6} ok {run.failed:5} failed "
            f"{run.retransmissions:6} retransmissions  proxy CPU {run.cpu_percent:4.0f}%"
            f"{memory}  {'PASS' if run.passed else 'FAIL'}",
            flush=True,
        )
        if not run.passed:
            break
        best = run
    return best, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="5 s runs, fewer rates")
    args = parser.parse_args()
    for tool in ("sipp", "kamailio"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (scripts/test installs it)")
    for port in (PROXY_PORT, UAS_PORT, UAC_PORT, REG_PORT):
        if not port_free(port):
            sys.exit(f"port {port} is busy")
    seconds = 5 if args.quick else args.seconds
    ours = [300, 600, 800, 1000, 1200, 1400, 1600, 1800, 2000]
    theirs = [1000, 2000, 2500, 3000, 3500, 4000, 5000]
    if args.quick:
        ours, theirs = ours[::2], theirs[::2]
    load = os.getloadavg()[0]
    print(f"SIPp uac -> proxy -> SIPp uas, {seconds} s per rate, {os.cpu_count()} cores, "
          f"load average {load:.2f} at start")
    with tempfile.TemporaryDirectory(prefix="freecall-cps-") as tmp:
        work = Path(tmp)
        fc_best, _ = sweep("freecall", ours, seconds, work)
        kam_best, _ = sweep("kamailio", theirs, seconds, work)
    fc_rate = fc_best.rate if fc_best else 0
    kam_rate = kam_best.rate if kam_best else 0
    print(f"\nfreecall: {fc_rate} calls/s with no failed call; Kamailio: {kam_rate} calls/s")
    if kam_rate:
        print(f"ratio freecall/Kamailio: {fc_rate / kam_rate:.2f}x (target 0.5x)")


if __name__ == "__main__":
    main()
