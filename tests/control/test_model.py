"""The call book and the event bus: the CONTRACT call shape, security updates, bounded
subscribers and history."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from freecall.control.model import CallBook, EventBus, iso_time

CONTRACT_FIELDS = {"id", "direction", "from", "to", "state", "started", "ended", "route",
                   "remote_node", "media", "security"}


@dataclass
class FakeCall:
    id: str = "c1"
    call_id: str = "abc@host"
    caller: str = "sip:alice@a.test"
    callee: str = "sip:bob@b.test"
    from_tag: str = "t1"
    started: float = 100.0
    direction: str = "out"
    route: str = "static"
    answered: float | None = None
    ended: float | None = None
    outcome: str = "trying"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_call_through_its_life_in_the_contract_shape() -> None:
    clock = Clock()
    bus = EventBus(clock)
    sub = bus.subscribe()
    live_media = {"codec": "PCMU/8000", "local": "192.0.2.1:20000", "remote": "192.0.2.2:20002",
                  "packets_in": 5, "packets_out": 6, "lost": 0}
    book = CallBook(bus, wall_offset=clock.now - 100.0, media_source=lambda key: live_media)
    call = FakeCall()
    book.started(call)
    [view] = book.views()
    assert view.keys() >= CONTRACT_FIELDS
    assert set(view["media"]) >= {"codec", "local", "remote", "packets_in", "packets_out", "lost"}
    assert set(view["security"]) >= {"media", "keying", "sas", "verification", "peer_key"}
    assert view["state"] == "trying" and view["started"] == iso_time(clock.now)
    assert view["security"]["state"] == "pending"
    call.answered, call.outcome = 101.0, "answered"
    book.answered(call)
    book.update_security(("abc@host", "t1"), media="srtp", keying="zrtp", sas="ybnd",
                         state="secure", verification="unverified")
    book.update_security("c1", verification="unverified")  # no change: no event
    call.ended, call.outcome = 110.0, "hung up by caller"
    book.ended(call)
    live_media["packets_in"] = 999  # the ended call keeps the figures it had
    [view] = book.views()
    assert view["state"] == "ended" and view["media"]["packets_in"] == 5
    assert view["duration_s"] == 9.0
    assert view["ended"] == iso_time(clock.now + 10.0)
    events = sub.take()
    assert [(e["type"], e.get("state")) for e in events] == [
        ("call", "trying"), ("call", "active"), ("security", None), ("call", "ended")]
    assert [e["id"] for e in events] == [1, 2, 3, 4]
    assert events[2]["security"]["sas"] == "ybnd"
    with pytest.raises(ValueError, match="verification"):
        book.update_security("c1", verification="maybe")


def test_a_local_call_says_so() -> None:
    book = CallBook(EventBus(Clock()))
    book.started(FakeCall(direction="internal"))
    assert book.views()[0]["security"]["state"] == "local"


def test_recent_calls_are_bounded() -> None:
    book = CallBook(EventBus(Clock()), recent=3)
    for i in range(10):
        call = FakeCall(id=f"c{i}", from_tag=f"t{i}")
        book.started(call)
        book.ended(call)
    assert [v["id"] for v in book.views()] == ["c9", "c8", "c7"]
    assert book.find("c0") is None and book.find("c9") is not None


def test_a_slow_subscriber_is_dropped_and_never_blocks() -> None:
    bus = EventBus(Clock(), queue_limit=10, history=50)
    slow, fast = bus.subscribe(), bus.subscribe()
    woken = []
    slow.wake = lambda: woken.append(1)
    for i in range(30):
        bus.publish("peer", n=i)
        fast.take()
    assert slow.dropped and slow.closed and slow not in bus.subscribers
    assert not fast.dropped
    assert bus.dropped_subscribers == 1 and woken  # it was told, so its stream can end
    again = bus.subscribe(since=25)  # a reconnection replays what the history holds
    assert [e["n"] for e in again.take()] == [25, 26, 27, 28, 29]


def test_history_is_bounded() -> None:
    bus = EventBus(Clock(), history=5)
    for i in range(20):
        bus.publish("peer", n=i)
    assert [e["n"] for e in bus.subscribe(since=0).take()] == [15, 16, 17, 18, 19]
