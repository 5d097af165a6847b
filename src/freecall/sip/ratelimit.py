"""Per-source limits against scanners and floods, pure and sans-I/O (every call takes ``now``).

:class:`SourceLimiter` is a Pike-style flood guard (after Kamailio's ``pike`` module): each
source IP has a token bucket of ``limit`` requests refilled over ``window`` seconds; a source that
empties it is *blocked* for ``block`` seconds, during which its messages are dropped unanswered
(an answer would only feed the flood).  :class:`AuthLockout` counts failed digest answers per
source (a password guesser such as sipvicious ``svcrack``) and locks that source out for
``lockout`` seconds once ``failures`` happened within ``window``; while it is locked, the proxy
answers every attempt with a plain challenge without checking it, so the answer is the same
whether the password was right or not.

Both keep at most ``max_sources`` entries, least recently seen evicted first (an LRU), so a
flood from spoofed source addresses cannot grow memory.  Neither logs: each returns whether a
block or lockout just started, so the caller writes one line per block, not one per packet.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass, field

__all__ = ["AuthLockout", "Decision", "SourceLimiter"]


class Decision(enum.Enum):
    """What to do with one message from a source."""

    PASS = "pass"  # noqa: S105 -- a decision, not a password
    BLOCKED = "blocked"  # this message started a block: drop it and log once
    DROP = "drop"  # the source is blocked: drop it silently


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last: float
    blocked_until: float = 0.0
    dropped: int = 0  # messages dropped during the current block


class SourceLimiter:
    """A token bucket per source; an empty bucket blocks the source for ``block`` seconds."""

    def __init__(
        self, limit: int, window: float, block: float, *, max_sources: int = 10_000
    ) -> None:
        if limit < 1 or window <= 0 or block < 0 or max_sources < 1:
            raise ValueError("limit and max_sources must be >= 1, window > 0, block >= 0")
        self.limit = limit
        self.window = window
        self.block = block
        self.max_sources = max_sources
        self._rate = limit / window
        self._sources: OrderedDict[str, _Bucket] = OrderedDict()
        self.blocked_total = 0
        """Blocks started (the ``freecall_ratelimit_blocked_total`` counter)."""
        self.dropped_total = 0
        """Messages dropped because their source was blocked."""

    def __len__(self) -> int:
        return len(self._sources)

    def reconfigure(self, limit: int, window: float, block: float, max_sources: int) -> None:
        """New settings (a reload): sources already blocked stay blocked until their block
        ends; buckets keep their tokens, capped at the new limit."""
        if limit < 1 or window <= 0 or block < 0 or max_sources < 1:
            raise ValueError("limit and max_sources must be >= 1, window > 0, block >= 0")
        self.limit, self.window, self.block = limit, window, block
        self.max_sources = max_sources
        self._rate = limit / window
        for bucket in self._sources.values():
            bucket.tokens = min(bucket.tokens, float(limit))
        while len(self._sources) > max_sources:
            self._sources.popitem(last=False)

    def check(self, source: str, now: float) -> Decision:
        """Count one message from ``source`` at ``now``."""
        bucket = self._sources.get(source)
        if bucket is None:
            bucket = self._sources[source] = _Bucket(float(self.limit), now)
            if len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        if now < bucket.blocked_until:
            bucket.dropped += 1
            self.dropped_total += 1
            return Decision.DROP
        elapsed = max(0.0, now - bucket.last)
        bucket.tokens = min(float(self.limit), bucket.tokens + elapsed * self._rate)
        bucket.last = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return Decision.PASS
        # Over the limit: block.  Once the block is over the source starts with a full bucket.
        bucket.blocked_until = now + self.block
        bucket.tokens = float(self.limit)
        bucket.last = bucket.blocked_until
        bucket.dropped = 1
        self.blocked_total += 1
        self.dropped_total += 1
        return Decision.BLOCKED

    def blocked(self, now: float) -> list[str]:
        """The sources blocked at ``now`` (for metrics and the status)."""
        return [src for src, b in self._sources.items() if now < b.blocked_until]


@dataclass(slots=True)
class _Failures:
    times: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


class AuthLockout:
    """Failed authentications per source; ``failures`` within ``window`` lock it out."""

    def __init__(
        self, failures: int, window: float, lockout: float, *, max_sources: int = 10_000
    ) -> None:
        if failures < 1 or window <= 0 or lockout < 0 or max_sources < 1:
            raise ValueError("failures and max_sources must be >= 1, window > 0, lockout >= 0")
        self.failures = failures
        self.window = window
        self.lockout = lockout
        self.max_sources = max_sources
        self._sources: OrderedDict[str, _Failures] = OrderedDict()
        self.lockouts_total = 0
        """Lockouts started (the ``freecall_auth_lockouts_total`` counter)."""

    def __len__(self) -> int:
        return len(self._sources)

    def reconfigure(self, failures: int, window: float, lockout: float,
                    max_sources: int) -> None:
        """New settings (a reload): lockouts in progress run to their end."""
        if failures < 1 or window <= 0 or lockout < 0 or max_sources < 1:
            raise ValueError("failures and max_sources must be >= 1, window > 0, lockout >= 0")
        self.failures, self.window, self.lockout = failures, window, lockout
        self.max_sources = max_sources
        while len(self._sources) > max_sources:
            self._sources.popitem(last=False)

    def locked(self, source: str, now: float) -> bool:
        """Whether ``source`` is locked out: its credentials must not even be checked."""
        entry = self._sources.get(source)
        return entry is not None and now < entry.locked_until

    def failed(self, source: str, now: float) -> bool:
        """Record a failed attempt; True when this one started a lockout (log it once)."""
        entry = self._sources.get(source)
        if entry is None:
            entry = self._sources[source] = _Failures()
            if len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        if now < entry.locked_until:
            return False
        times = entry.times
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.failures:
            return False
        times.clear()
        entry.locked_until = now + self.lockout
        self.lockouts_total += 1
        return True
