"""Test doubles for routing: a zone-backed fake resolver and an asyncio loop on virtual time."""

from __future__ import annotations

import asyncio
import math
import selectors
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from freecall.routing.plan import NXDOMAIN, TIMEOUT, Answer, Naptr, Query, Record, Srv

T = TypeVar("T")


class FakeDns:
    """A zone in a dict: answers both ``run_sync`` plans (``answer``) and the async ``Lookup``
    protocol (``query``), records what was asked, and can delay or never answer some names.

    Names absent from the zone are NXDOMAIN unless some record exists at that name (then the
    missing type is NODATA), like a real authoritative server.
    """

    def __init__(self) -> None:
        self.zone: dict[Query, Answer] = {}
        self.asked: list[Query] = []
        self.delays: dict[str, float] = {}  # name -> seconds before the answer
        self.hang: set[str] = set()  # names whose queries are never answered

    def add(self, name: str, rdtype: str, *records: Record) -> FakeDns:
        query = Query.of(name, rdtype)
        old = self.zone.get(query, Answer())
        self.zone[query] = Answer((*old.records, *records))
        return self

    def a(self, name: str, *addresses: str) -> FakeDns:
        v4 = [a for a in addresses if ":" not in a]
        v6 = [a for a in addresses if ":" in a]
        if v4:
            self.add(name, "A", *v4)
        if v6:
            self.add(name, "AAAA", *v6)
        return self

    def srv(self, name: str, *records: tuple[int, int, int, str]) -> FakeDns:
        return self.add(name, "SRV", *(Srv(*r) for r in records))

    def naptr(self, name: str, *records: tuple[int, int, str, str, str, str]) -> FakeDns:
        return self.add(name, "NAPTR", *(Naptr(*r) for r in records))

    def put(self, name: str, rdtype: str, answer: Answer) -> FakeDns:
        self.zone[Query.of(name, rdtype)] = answer
        return self

    def names(self) -> set[str]:
        return {q.name for q in self.zone}

    def answer(self, query: Query) -> Answer:
        self.asked.append(query)
        found = self.zone.get(query)
        if found is not None:
            return found
        exists = any(n == query.name or n.endswith("." + query.name) for n in self.names())
        return Answer() if exists else NXDOMAIN

    async def query(self, name: str, rdtype: str, timeout: float | None = None) -> Answer:
        query = Query.of(name, rdtype)
        delay = math.inf if query.name in self.hang else self.delays.get(query.name, 0.0)
        budget = math.inf if timeout is None else timeout
        if delay > budget:
            self.asked.append(query)
            await asyncio.sleep(budget if budget != math.inf else 3600)
            return TIMEOUT
        if delay:
            await asyncio.sleep(delay)
        return self.answer(query)

    def asked_types(self, name: str) -> list[str]:
        return [q.rdtype for q in self.asked if q.name == name]

    def asked_names(self) -> list[str]:
        return [f"{q.name}/{q.rdtype}" for q in self.asked]


class _VirtualSelector(selectors.DefaultSelector):
    """Polls the real selector (the loop's self-pipe) without blocking; when nothing is ready
    and the loop would sleep until its next timer, jumps the virtual clock there instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready: list[Any] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # nothing scheduled: only real I/O can wake us
            return list(super().select(None))
        self._loop.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when every task waits for a timer: a test that
    waits 2 s of timeouts runs in microseconds, and its timing is exact."""

    def __init__(self) -> None:
        self.now = 1000.0
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self.now


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh :class:`VirtualTimeLoop`."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)


def flows_text(flows: Iterable[object]) -> list[str]:
    return [str(f) for f in flows]
