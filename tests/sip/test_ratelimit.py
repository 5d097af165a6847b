"""The per-source rate limiter and the authentication lockout, on virtual time (issue 11)."""

from __future__ import annotations

import pytest

from freecall.sip.ratelimit import AuthLockout, Decision, SourceLimiter


def test_limiter_passes_up_to_the_limit_then_blocks_once() -> None:
    limiter = SourceLimiter(10, 2.0, 30.0)
    decisions = [limiter.check("192.0.2.1", 100.0) for _ in range(15)]
    assert decisions[:10] == [Decision.PASS] * 10
    assert decisions[10] is Decision.BLOCKED  # one log line for the block ...
    assert decisions[11:] == [Decision.DROP] * 4  # ... and silence for the rest
    assert limiter.blocked_total == 1 and limiter.dropped_total == 5
    assert limiter.blocked(100.0) == ["192.0.2.1"]


def test_limiter_is_per_source() -> None:
    limiter = SourceLimiter(3, 1.0, 30.0)
    for _ in range(10):
        limiter.check("192.0.2.1", 5.0)
    assert limiter.check("192.0.2.2", 5.0) is Decision.PASS


def test_steady_rate_under_the_limit_is_never_blocked() -> None:
    limiter = SourceLimiter(10, 2.0, 30.0)  # 5 per second sustained
    now = 0.0
    for _ in range(10_000):
        assert limiter.check("192.0.2.1", now) is Decision.PASS
        now += 0.21
    assert limiter.blocked_total == 0


def test_block_expires_and_the_source_is_counted_afresh() -> None:
    limiter = SourceLimiter(2, 1.0, 10.0)
    for _ in range(3):
        limiter.check("192.0.2.1", 0.0)
    assert limiter.check("192.0.2.1", 9.99) is Decision.DROP
    assert limiter.blocked(9.99) == ["192.0.2.1"]
    assert limiter.blocked(10.0) == []
    assert limiter.check("192.0.2.1", 10.0) is Decision.PASS
    assert limiter.check("192.0.2.1", 10.0) is Decision.PASS  # a full bucket after the block
    assert limiter.check("192.0.2.1", 10.0) is Decision.BLOCKED  # a flood that goes on: again
    assert limiter.blocked_total == 2


def test_spoofed_sources_cannot_grow_memory() -> None:
    limiter = SourceLimiter(5, 1.0, 10.0, max_sources=100)
    for i in range(100_000):
        limiter.check(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", i * 1e-4)
    assert len(limiter) == 100


def test_a_flooding_source_stays_blocked_while_spoofed_sources_churn() -> None:
    """The flooder keeps sending, so it stays among the recently seen and is not evicted."""
    limiter = SourceLimiter(5, 1.0, 60.0, max_sources=50)
    now = 0.0
    for i in range(5_000):
        limiter.check("192.0.2.66", now)
        limiter.check(f"10.0.{i >> 8 & 255}.{i & 255}", now)
        now += 0.001
    assert "192.0.2.66" in limiter.blocked(now)
    assert limiter.blocked_total == 1


@pytest.mark.parametrize("args", [(0, 1.0, 1.0), (1, 0.0, 1.0), (1, 1.0, -1.0)])
def test_limiter_rejects_nonsense(args: tuple[int, float, float]) -> None:
    with pytest.raises(ValueError):
        SourceLimiter(*args)


def test_lockout_after_failures_within_the_window() -> None:
    lockout = AuthLockout(5, 60.0, 300.0)
    started = [lockout.failed("192.0.2.1", 10.0 + i) for i in range(5)]
    assert started == [False] * 4 + [True]
    assert lockout.locked("192.0.2.1", 14.0)
    assert lockout.locked("192.0.2.1", 313.9)
    assert not lockout.locked("192.0.2.1", 314.0)  # expired
    assert not lockout.locked("192.0.2.2", 20.0)  # another source is not affected
    assert lockout.lockouts_total == 1


def test_failures_further_apart_than_the_window_never_lock() -> None:
    lockout = AuthLockout(3, 10.0, 300.0)
    for i in range(100):
        assert lockout.failed("192.0.2.1", i * 5.0) is False  # 2 per window at most
    assert not lockout.locked("192.0.2.1", 500.0)
    assert lockout.lockouts_total == 0


def test_failures_while_locked_do_not_extend_or_recount() -> None:
    lockout = AuthLockout(2, 60.0, 100.0)
    lockout.failed("192.0.2.1", 0.0)
    assert lockout.failed("192.0.2.1", 1.0)
    for t in range(2, 100):
        assert lockout.failed("192.0.2.1", float(t)) is False
    assert not lockout.locked("192.0.2.1", 101.0)
    assert lockout.lockouts_total == 1
    lockout.failed("192.0.2.1", 102.0)
    assert lockout.failed("192.0.2.1", 103.0)  # a guesser that comes back is locked again
    assert lockout.lockouts_total == 2


def test_lockout_memory_is_bounded() -> None:
    lockout = AuthLockout(5, 60.0, 300.0, max_sources=10)
    for i in range(1000):
        lockout.failed(f"10.0.{i >> 8}.{i & 255}", float(i))
    assert len(lockout) == 10


def test_reconfigure_keeps_blocks_and_counters_and_applies_the_new_limit() -> None:
    limiter = SourceLimiter(10, 1.0, 5.0)
    for _ in range(10):
        assert limiter.check("a", 0.0) is Decision.PASS
    assert limiter.check("a", 0.0) is Decision.BLOCKED
    limiter.reconfigure(3, 1.0, 60.0, 100)
    assert limiter.check("a", 1.0) is Decision.DROP  # the block in progress runs on
    assert [limiter.check("b", 1.0) for _ in range(4)] == [
        Decision.PASS, Decision.PASS, Decision.PASS, Decision.BLOCKED]
    assert limiter.blocked_total == 2
    assert limiter.check("b", 50.0) is Decision.DROP  # the new block length: 60 s


def test_lockout_reconfigure_applies_the_new_threshold() -> None:
    lockout = AuthLockout(5, 60.0, 30.0)
    assert not lockout.failed("a", 0.0)
    lockout.reconfigure(2, 60.0, 30.0, 100)
    assert lockout.failed("a", 1.0)  # the second failure now locks
    assert lockout.locked("a", 2.0) and lockout.lockouts_total == 1
