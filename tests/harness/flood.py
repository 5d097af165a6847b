"""Flood tools for issue 11 (bench/flood.py, tests/interop/test_floods.py, bench/soak.py): a
process's RSS and open descriptors from /proc, a peak-RSS sampler, and a garbage UDP blaster
in its own process (so that it does not share the caller's GIL)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class RssSampler:
    """Samples a process's RSS every 0.1 s in a thread: the peak of a phase."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(0.1)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _blast(source: str, ports: list[tuple[str, int]], seconds: float, seed: int,
           out: Any) -> None:
    """Random datagrams (1 to 1400 bytes) round-robin to ``ports`` for ``seconds``, as fast as
    the socket takes them; puts the count in ``out``."""
    rng = random.Random(seed)
    payloads = [rng.randbytes(rng.randint(1, 1400)) for _ in range(512)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    n = len(ports)
    while time.monotonic() < deadline:
        for i in range(256):
            try:  # noqa: SIM105 -- the hot loop: suppress() costs a call per datagram
                sock.sendto(payloads[(sent + i) & 511], ports[(sent + i) % n])
            except OSError:  # ECONNREFUSED from an ICMP, a full buffer
                pass
        sent += 256
    sock.close()
    out.put(sent)


@contextmanager
def blaster(source: str, ports: list[tuple[str, int]], seconds: float,
            seed: int = 1) -> Iterator[list[int]]:
    """Garbage UDP from ``source`` to ``ports`` for ``seconds`` in a child process; yields a
    list that holds the number of datagrams sent once the block is over (it waits for it)."""
    context = mp.get_context("fork")
    queue: Any = context.Queue()
    proc = context.Process(target=_blast, args=(source, ports, seconds, seed, queue),
                           daemon=True)
    box: list[int] = []
    proc.start()
    try:
        yield box
    finally:
        box.append(queue.get(timeout=seconds + 30))
        proc.join(10)
