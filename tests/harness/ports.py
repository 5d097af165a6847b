"""Port allocation that does not collide: across tests, pytest-xdist workers and other users.

Every process of a test gets its own *block* of consecutive ports (default 32). A block is
reserved with an ``flock`` on a lock file (released automatically if the test process dies), and
each of its ports is checked to be free for both UDP and TCP on 127.0.0.1 before use. Blocks
cover the sub-ports programs take implicitly: baresip binds TLS on its SIP port + 1 (gotcha
B2), RTP takes port + 1 for RTCP, SIPp opens control and media sockets.

The range defaults to 14000-19999: below Linux's ephemeral range (32768-60999), so a kernel-chosen
client port cannot steal a reserved one, and clear of the well-known SIP ports, the fixed ports of
the shared shell recipes (4445, 5060-5090, 10000-10212) and freecall's default media range
(20000-29999). Override with ``FREECALL_HARNESS_PORTS=FIRST-LAST``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

DEFAULT_RANGE = (14000, 19999)
BLOCK_SIZE = 32


class PortsExhausted(RuntimeError):
    """No free block of ports in the whole range."""


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing holds ``port`` for UDP or TCP on ``host`` (or on a wildcard address)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


class PortBlock:
    """Consecutive ports reserved for one process; hand them out with ``take``."""

    def __init__(self, first: int, size: int, lock_fd: int | None) -> None:
        self.first = first
        self.size = size
        self._next = first
        self._lock_fd = lock_fd

    def take(self, count: int = 1, *, align: int = 1) -> int:
        """The first of ``count`` consecutive unused ports (``align=2`` for an even RTP port)."""
        start = self._next + (-(self._next - self.first) % align)
        if start + count > self.first + self.size:
            raise PortsExhausted(f"block {self.first}+{self.size} has no {count} more ports")
        self._next = start + count
        return start

    def take_range(self, count: int, *, align: int = 2) -> tuple[int, int]:
        """An inclusive ``(first, last)`` range of ``count`` ports, e.g. for ``rtp_ports``."""
        first = self.take(count, align=align)
        return first, first + count - 1

    @property
    def last(self) -> int:
        return self.first + self.size - 1

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def __repr__(self) -> str:
        return f"PortBlock({self.first}-{self.last})"


class BlockSource(Protocol):
    """What wrappers take ports from: a ``PortAllocator`` or a test's ``PortPool``."""

    def block(self, size: int | None = None) -> PortBlock: ...


class PortAllocator:
    """Hands out free ``PortBlock``s; shared by every process on the machine through lock files."""

    def __init__(
        self,
        first: int | None = None,
        last: int | None = None,
        *,
        block_size: int = BLOCK_SIZE,
        lock_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        env = os.environ.get("FREECALL_HARNESS_PORTS")
        if first is None or last is None:
            if env:
                lo, _, hi = env.partition("-")
                first, last = int(lo), int(hi)
            else:
                first, last = DEFAULT_RANGE
        self.first, self.last, self.block_size = first, last, block_size
        self.lock_dir = Path(lock_dir or Path(tempfile.gettempdir()) / "freecall-harness-ports")
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):
            os.chmod(self.lock_dir, 0o1777)  # shared by every user, like /tmp
        self._blocks: list[PortBlock] = []

    def _candidates(self) -> Iterator[int]:
        count = (self.last - self.first + 1) // self.block_size
        start = random.randrange(count)  # spread concurrent allocators over the range
        for i in range(count):
            yield self.first + ((start + i) % count) * self.block_size

    def block(self, size: int | None = None) -> PortBlock:
        """Reserve a block of ``size`` (default ``block_size``) ports, all free right now."""
        size = size or self.block_size
        if size > self.block_size:
            raise ValueError(f"block of {size} ports > block_size {self.block_size}")
        for base in self._candidates():
            lock_path = self.lock_dir / f"{base}.lock"
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    continue
                raise
            if all(port_free(p) for p in range(base, base + self.block_size)):
                blk = PortBlock(base, size, fd)
                self._blocks.append(blk)
                return blk
            os.close(fd)
        raise PortsExhausted(f"no free block of {size} ports in {self.first}-{self.last}")

    def release_all(self) -> None:
        for blk in self._blocks:
            blk.release()
        self._blocks.clear()


class PortPool:
    """The blocks one test took; ``release()`` at teardown frees them for the next test."""

    def __init__(self, allocator: PortAllocator) -> None:
        self.allocator = allocator
        self.blocks: list[PortBlock] = []

    def block(self, size: int | None = None) -> PortBlock:
        blk = self.allocator.block(size)
        self.blocks.append(blk)
        return blk

    def port(self) -> int:
        """One free port (its own block), e.g. for a registrar under test."""
        return self.block().take(1)

    def release(self) -> None:
        for blk in self.blocks:
            blk.release()
        self.blocks.clear()
