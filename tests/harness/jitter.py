"""A link with random delay between two hosts, in userspace (issue 11, item 4: this kernel has no
sch_netem, so ``tc qdisc ... netem delay`` is not available).

``JitterLink(max_ms=200)`` makes three network namespaces: hosts ``h1`` (10.78.1.2) and ``h2``
(10.78.2.2), each with a default route through the router ``r`` (10.78.1.1 and 10.78.2.1 on two
veth pairs). In ``r``, policy routing sends every packet that arrives on either veth into a TUN
device ``dly`` (``ip rule iif v1|v2 lookup 100``, table 100: ``default dev dly``). This module,
run as a program inside ``r``, reads each packet from the TUN device, holds it a uniformly random
0 to ``max_ms`` milliseconds, and writes it back; the kernel then receives it on ``dly``, which no
rule sends back to the TUN, and forwards it by the main table out of the other veth. So every
packet between the hosts, both ways, is delayed independently (and so reordered, as netem's
jitter does without a rate). Reverse-path filtering is off in ``r`` (a packet from 10.78.1.2
arrives on ``dly``, not on ``v1``). On exit the program writes its statistics (packets, least,
mean and largest delay) as JSON to the file it was given; everything is deleted on exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from .netns import ip

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
_COUNTER = itertools.count(1)


def serve(tun: str, max_ms: float, stats_path: str, seed: int = 11) -> None:
    """The delay loop (runs inside the router namespace until SIGTERM)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tun.encode(), IFF_TUN | IFF_NO_PI))
    rng = random.Random(seed)
    held: list[tuple[float, int, bytes]] = []
    seq = itertools.count()
    delays: list[float] = []
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    Path(stats_path).with_suffix(".ready").write_text("ready\n")
    while running:
        now = time.monotonic()
        timeout = max(0.0, held[0][0] - now) if held else 0.2
        try:
            readable, _, _ = select.select([fd], [], [], min(timeout, 0.2))
        except InterruptedError:
            continue
        now = time.monotonic()
        if readable:
            for _ in range(256):
                try:
                    packet = os.read(fd, 65535)
                except BlockingIOError:
                    break
                delay = rng.uniform(0.0, max_ms / 1000)
                delays.append(delay)
                heapq.heappush(held, (now + delay, next(seq), packet))
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, _, packet = heapq.heappop(held)
            with contextlib.suppress(OSError):  # unroutable (a host gone): a lost packet
                os.write(fd, packet)
    stats = {"packets": len(delays),
             "min_ms": min(delays) * 1000 if delays else 0.0,
             "mean_ms": sum(delays) / len(delays) * 1000 if delays else 0.0,
             "max_ms": max(delays) * 1000 if delays else 0.0}
    Path(stats_path).write_text(json.dumps(stats))


class JitterLink:
    """Two hosts behind a router that delays every packet 0 to ``max_ms`` ms (module doc)."""

    def __init__(self, max_ms: float = 200.0, directory: Path | None = None) -> None:
        self.max_ms = max_ms
        self.tag = f"fj{os.getpid() % 100000}x{next(_COUNTER)}"
        self.router = f"{self.tag}-r"
        self.created: list[str] = []
        self.directory = directory or Path("/tmp")
        self.stats_path = self.directory / f"{self.tag}-jitter.json"
        self.process: subprocess.Popen[bytes] | None = None

    def name(self, host: int) -> str:
        return f"{self.tag}-h{host}"

    @staticmethod
    def address(host: int) -> str:
        return f"10.78.{host}.2"

    def run(self, host: int) -> list[str]:
        """Command prefix that runs a program on ``host`` (1 or 2)."""
        return ["ip", "netns", "exec", self.name(host)]

    def stats(self) -> dict[str, float]:
        """The delay statistics, once the link is closed."""
        return dict(json.loads(self.stats_path.read_text()))

    def __enter__(self) -> JitterLink:
        try:
            r = self.router
            self._netns(r)
            for host in (1, 2):
                name = self.name(host)
                self._netns(name)
                ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name",
                   f"v{host}", "netns", r)
                ip("-n", r, "addr", "add", f"10.78.{host}.1/24", "dev", f"v{host}")
                ip("-n", r, "link", "set", f"v{host}", "up")
                ip("-n", name, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
                ip("-n", name, "link", "set", "eth0", "up")
                ip("-n", name, "link", "set", "lo", "up")
                ip("-n", name, "route", "add", "default", "via", f"10.78.{host}.1")
                ip("-n", r, "rule", "add", "iif", f"v{host}", "lookup", "100")
            ip("-n", r, "link", "set", "lo", "up")
            ip("-n", r, "tuntap", "add", "dev", "dly", "mode", "tun")
            ip("-n", r, "link", "set", "dly", "up")
            ip("-n", r, "route", "add", "default", "dev", "dly", "table", "100")
            subprocess.run(["ip", "netns", "exec", r, "sysctl", "-q", "-w",
                            "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                            "net.ipv4.conf.default.rp_filter=0", "net.ipv4.conf.dly.rp_filter=0"],
                           check=True, capture_output=True)
            ready = self.stats_path.with_suffix(".ready")
            ready.unlink(missing_ok=True)
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", r, sys.executable, "-m", "harness.jitter", "dly",
                 str(self.max_ms), str(self.stats_path)],
                cwd=Path(__file__).resolve().parents[1])
            deadline = time.monotonic() + 10
            while not ready.exists():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the jitter process did not start")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        return self

    def _netns(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)

    def close(self) -> None:
        """Stop the delay process (it writes its statistics), delete the namespaces."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.created.clear()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


if __name__ == "__main__":
    serve(sys.argv[1], float(sys.argv[2]), sys.argv[3])
