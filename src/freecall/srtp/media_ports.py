"""Media port pairs from the configured range: even RTP port, RTCP on the next (RFC 3550 11).

Pure bookkeeping, no sockets: the bridge binds what `take` hands out and gives a pair back with
`give_back` when the call ends or when the bind failed (another program holds the port). Pairs
come out oldest-freed first, so a port is reused as late as the range allows: packets still in
flight to a finished call, or a far end that has not yet seen the BYE, then reach a closed port
instead of the next call using it.
"""

from __future__ import annotations

from collections import deque


class PortPairPool:
    """Even ports ``p`` of ``first..last`` with ``p + 1`` also in range, handed out FIFO."""

    __slots__ = ("_free", "_in_use", "first", "last")

    def __init__(self, first: int, last: int) -> None:
        if not 0 < first <= last <= 65535:
            raise ValueError(f"bad port range {first}-{last}")
        start = first + (first & 1)
        self.first, self.last = first, last
        self._free: deque[int] = deque(range(start, last, 2))  # last is excluded: p + 1 <= last
        if not self._free:
            raise ValueError(f"port range {first}-{last} holds no even/odd pair")
        self._in_use: set[int] = set()

    def __len__(self) -> int:
        """Pairs free now."""
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pairs in the range."""
        return len(self._free) + len(self._in_use)

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    def take(self) -> int | None:
        """The even (RTP) port of the longest-free pair, or None when all are in use."""
        if not self._free:
            return None
        port = self._free.popleft()
        self._in_use.add(port)
        return port

    def give_back(self, port: int) -> None:
        """Return a pair (to the back of the queue); unknown or already free ports are ignored."""
        if port in self._in_use:
            self._in_use.discard(port)
            self._free.append(port)


__all__ = ["PortPairPool"]
