"""What the control API shows: one record per call and an event bus, fed by the daemon.

Pure (no asyncio, no sockets): the daemon hands in proxy calls, media security and clock
readings; the API layer reads :meth:`CallBook.views` and subscribes to the :class:`EventBus`.
A call's JSON has exactly the fields of docs/CONTRACT.md (plus a few extra ones, never fewer):
``security.state`` says at a glance what a person needs to know (``pending``, ``local``,
``secure``, ``insecure``, ``failed``) and ``security.verification`` whether the far end is who
it claims to be.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

DialogKey = tuple[str, str]
"""(Call-ID, the caller's From tag), as in ``srtp.calls``."""

RECENT_CALLS = 100
EVENT_HISTORY = 512
SUBSCRIBER_QUEUE = 256

VERIFICATIONS = ("verified", "trusted-first-use", "unverified", "mitm-suspected", "none")


def iso_time(wall: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC with milliseconds (``...Z``)."""
    if wall is None:
        return None
    moment = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- events ------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Subscription:
    """One listener of the event stream. ``wake`` is set by the I/O side (an asyncio.Event's
    ``set``); ``dropped`` means the listener fell too far behind and was cut off."""

    limit: int
    queue: deque[dict[str, Any]] = field(default_factory=deque)
    dropped: bool = False
    closed: bool = False
    wake: Callable[[], None] | None = None

    def take(self) -> list[dict[str, Any]]:
        items = list(self.queue)
        self.queue.clear()
        return items

    def _notify(self) -> None:
        if self.wake is not None:
            self.wake()


class EventBus:
    """Events ``{id, type, time, ...}`` to every subscriber, never blocking the publisher.

    Each subscriber has a bounded queue: one that lets ``limit`` events pile up is dropped (its
    stream ends; the client reconnects with ``Last-Event-ID`` and gets what the history still
    holds). The last ``history`` events are kept for those reconnections.
    """

    def __init__(self, clock: Callable[[], float], *, history: int = EVENT_HISTORY,
                 queue_limit: int = SUBSCRIBER_QUEUE) -> None:
        self.clock = clock
        self.queue_limit = queue_limit
        self.history: deque[dict[str, Any]] = deque(maxlen=history)
        self.subscribers: list[Subscription] = []
        self.next_id = 1
        self.published = 0
        self.dropped_subscribers = 0

    def publish(self, type_: str, **fields: Any) -> dict[str, Any]:
        event: dict[str, Any] = {"id": self.next_id, "type": type_,
                                 "time": iso_time(self.clock()), **fields}
        self.next_id += 1
        self.published += 1
        self.history.append(event)
        for sub in list(self.subscribers):
            if len(sub.queue) >= sub.limit:
                sub.dropped = True
                self.dropped_subscribers += 1
                self.unsubscribe(sub)
            else:
                sub.queue.append(event)
            sub._notify()
        return event

    def subscribe(self, since: int | None = None) -> Subscription:
        """A new subscriber; with ``since``, first the kept events with a larger id."""
        sub = Subscription(self.queue_limit)
        if since is not None:
            sub.queue.extend(e for e in self.history if e["id"] > since)
        self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)
        sub.closed = True

    def close(self) -> None:
        for sub in list(self.subscribers):
            self.unsubscribe(sub)
            sub._notify()


# -- calls -------------------------------------------------------------------------------------


class ProxyCall(Protocol):
    """What the book reads of a :class:`freecall.sip.proxy.Call`."""

    id: str
    call_id: str
    caller: str
    callee: str
    from_tag: str
    started: float
    direction: str
    route: str
    answered: float | None
    ended: float | None
    outcome: str


def _initial_security(direction: str) -> dict[str, Any]:
    local = direction == "internal"
    return {
        "media": "clear", "keying": "none", "sas": None, "verification": "none",
        "peer_key": None,
        # extra fields (docs/api.md)
        "state": "local" if local else "pending",
        "sas_confirmed": False, "cipher": None, "continuity": None, "peer_client": None,
        "reason": "media stays on this host" if local else None,
    }


def empty_media() -> dict[str, Any]:
    return {"codec": None, "local": None, "remote": None, "packets_in": 0, "packets_out": 0,
            "lost": 0}


@dataclass(eq=False, slots=True)
class CallRecord:
    key: DialogKey
    call: ProxyCall
    state: str = "trying"  # trying, active, ended
    security: dict[str, Any] = field(default_factory=dict)
    media: dict[str, Any] = field(default_factory=empty_media)  # the snapshot when it ended
    remote_node: str | None = None


MediaSource = Callable[[DialogKey], dict[str, Any] | None]
"""Live media figures of a call (None: no bridged media, e.g. a call between two local
phones)."""


class CallBook:
    """Live calls and the last ``recent`` ended ones, in the API's shape (module docstring)."""

    def __init__(self, bus: EventBus, *, wall_offset: float = 0.0, recent: int = RECENT_CALLS,
                 media_source: MediaSource | None = None,
                 remote_node: Callable[[ProxyCall], str | None] | None = None) -> None:
        self.bus = bus
        self.wall_offset = wall_offset  # wall clock = loop time + offset
        self.live: dict[DialogKey, CallRecord] = {}
        self.recent: deque[CallRecord] = deque(maxlen=recent)
        self.media_source = media_source
        self.remote_node = remote_node

    # -- feeding ----------------------------------------------------------------------------
    def started(self, call: ProxyCall) -> CallRecord:
        key = (call.call_id, call.from_tag)
        record = CallRecord(key, call, security=_initial_security(call.direction))
        if self.remote_node is not None:
            record.remote_node = self.remote_node(call)
        self.live[key] = record
        self._call_event(record)
        return record

    def answered(self, call: ProxyCall) -> CallRecord | None:
        record = self.live.get((call.call_id, call.from_tag))
        if record is None:
            return None
        record.state = "active"
        if self.remote_node is not None:
            record.remote_node = self.remote_node(call) or record.remote_node
        self._call_event(record)
        return record

    def ended(self, call: ProxyCall) -> CallRecord | None:
        """The call ended: freeze its media figures (read before the streams are freed)."""
        record = self.live.pop((call.call_id, call.from_tag), None)
        if record is None:
            return None
        record.media = self._media(record)
        record.state = "ended"
        self.recent.appendleft(record)
        self._call_event(record)
        return record

    def update_security(self, key_or_id: DialogKey | str, **fields: Any) -> CallRecord | None:
        """Change a live call's security fields and announce it (``security`` event).

        The media bridge sets ``media``, ``keying``, ``sas`` and ``state``; the OpenPGP layer
        (issue 7) sets ``verification`` and ``peer_key``; confirm-SAS sets ``verification``.
        Nothing is announced when nothing changed.
        """
        record = self.find(key_or_id)
        if record is None:
            return None
        if "verification" in fields and fields["verification"] not in VERIFICATIONS:
            raise ValueError(f"unknown verification {fields['verification']!r}")
        changed = {k: v for k, v in fields.items() if record.security.get(k, object()) != v}
        if not changed:
            return record
        record.security.update(changed)
        self.bus.publish("security", call_id=record.call.id, changed=sorted(changed),
                         security=dict(record.security), call=self.view(record))
        return record

    # -- reading ----------------------------------------------------------------------------
    def find(self, key_or_id: DialogKey | str) -> CallRecord | None:
        if isinstance(key_or_id, tuple):
            return self.live.get(key_or_id)
        for record in self.live.values():
            if record.call.id == key_or_id:
                return record
        for record in self.recent:
            if record.call.id == key_or_id:
                return record
        return None

    def records(self) -> Iterator[CallRecord]:
        """Live calls (newest first), then ended ones (newest first)."""
        yield from sorted(self.live.values(), key=lambda r: r.call.started, reverse=True)
        yield from self.recent

    def views(self) -> list[dict[str, Any]]:
        return [self.view(r) for r in self.records()]

    def view(self, record: CallRecord) -> dict[str, Any]:
        """The CONTRACT call JSON (and extra fields: outcome, answered, duration_s)."""
        call = record.call
        wall = self.wall_offset
        ended = call.ended if record.state == "ended" else None
        answered = call.answered
        end = ended if ended is not None else None
        duration = 0.0
        if answered is not None:
            duration = (end if end is not None else self._now_loop()) - answered
        return {
            "id": call.id,
            "direction": call.direction,
            "from": call.caller,
            "to": call.callee,
            "state": record.state,
            "started": iso_time(call.started + wall),
            "ended": iso_time(ended + wall) if ended is not None else None,
            "route": call.route,
            "remote_node": record.remote_node,
            "media": self._media(record),
            "security": dict(record.security),
            "answered": iso_time(answered + wall) if answered is not None else None,
            "duration_s": round(max(0.0, duration), 1),
            "outcome": call.outcome,
        }

    def _now_loop(self) -> float:
        return self.bus.clock() - self.wall_offset

    def _media(self, record: CallRecord) -> dict[str, Any]:
        if record.state == "ended" or self.media_source is None:
            return dict(record.media)
        live = self.media_source(record.key)
        return dict(live) if live is not None else dict(record.media)

    def _call_event(self, record: CallRecord) -> None:
        self.bus.publish("call", call_id=record.call.id, state=record.state,
                         call=self.view(record))
