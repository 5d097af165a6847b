"""Separate hosts for a test: network namespaces on one Ethernet segment, removed afterwards.

``Lan(3)`` makes namespaces ``<tag>-h1`` ... ``<tag>-h3``, each with ``eth0`` (10.77.0.1/24,
...) and ``lo`` up, their veth peers enslaved to a bridge that lives in its own namespace
``<tag>-lan``: multicast (mDNS) floods between the hosts and nothing reaches the machine's
real interfaces.  ``lan.run(i)`` is the prefix that runs a command on host ``i``.  Everything
is deleted on exit, even after a failure half way through setting up.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import socket
import subprocess
from collections.abc import Sequence
from types import TracebackType

_COUNTER = itertools.count(1)


def ip(*args: str) -> None:
    """Run ``ip ARGS``; a failure raises with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


_CLONE_NEWNET = 0x40000000


def connect_in(namespace: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection made from inside the named namespace (``ip netns add`` name) by this
    thread (setns(2) on the calling thread only), which then returns to its own namespace: the
    socket stays in the namespace it was made in. Reaches a namespace's loopback (a softphone's
    control port there) from the test process."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
        try:
            return socket.create_connection((host, port), timeout=timeout)
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")  # never continue elsewhere
    finally:
        os.close(own)
        os.close(target)


class Namespaces:
    """Network namespaces a test made: all deleted by `close` (and on leaving a ``with``),
    even after a setup that failed half way."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def _netns(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)

    def close(self) -> None:
        """Delete every namespace made (their interfaces go with them)."""
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.created.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Lan(Namespaces):
    """``hosts`` namespaces on one bridged segment ``subnet.0/24`` (module docstring)."""

    def __init__(self, hosts: int, subnet: str = "10.77.0") -> None:
        super().__init__()
        self.count = hosts
        self.subnet = subnet
        self.tag = f"fc{os.getpid() % 100000}x{next(_COUNTER)}"
        self.lan = f"{self.tag}-lan"

    def name(self, host: int) -> str:
        return f"{self.tag}-h{host}"

    def address(self, host: int) -> str:
        return f"{self.subnet}.{host}"

    def run(self, host: int) -> list[str]:
        """Command prefix that runs a program on ``host`` (1-based)."""
        return ["ip", "netns", "exec", self.name(host)]

    def exec(self, host: int, argv: Sequence[str]) -> str:
        """Run a short command on ``host``; its output."""
        return subprocess.run([*self.run(host), *argv], capture_output=True, text=True,
                              check=True, timeout=10).stdout

    def __enter__(self) -> Lan:
        try:
            self._netns(self.lan)
            ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
            ip("-n", self.lan, "link", "set", "br0", "up")
            for i in range(1, self.count + 1):
                host = self.name(i)
                self._netns(host)
                ip("-n", host, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
                   "netns", self.lan)
                ip("-n", self.lan, "link", "set", f"p{i}", "master", "br0", "up")
                ip("-n", host, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                ip("-n", host, "link", "set", "eth0", "up")
                ip("-n", host, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self
