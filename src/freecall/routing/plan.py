"""DNS answers as plain values, and *plans*: pure resolution logic that asks for DNS queries.

The routing logic (RFC 3263, ENUM, the routing chain) never performs I/O.  It is written as a
generator, a :data:`Plan`, that yields a batch of :class:`Query` values and is sent back a
mapping of each query to its :class:`Answer`; its return value is the result.  The asyncio edge
(:func:`freecall.routing.dns.drive`) runs the queries of a batch concurrently under a deadline;
tests run the same plans synchronously against a dictionary of answers (:func:`run_sync`).  A
plan that needs no DNS at all (an IP literal, a static route to an address) finishes on the
first ``next()``, which lets the router answer the proxy at once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

T = TypeVar("T")


class Query(NamedTuple):
    """One DNS question: an owner name (lower case, no final dot) and a type name."""

    name: str
    rdtype: str  # "NAPTR", "SRV", "A", "AAAA"

    @classmethod
    def of(cls, name: str, rdtype: str) -> Query:
        return cls(normalize_name(name), rdtype.upper())


def normalize_name(name: str) -> str:
    """Names compare case-insensitively (RFC 4343); the final dot is implied."""
    name = name.lower()
    return name[:-1] if name.endswith(".") and name != "." else name


@dataclass(frozen=True, slots=True)
class Naptr:
    """A NAPTR record (RFC 3403 section 4.1)."""

    order: int
    preference: int
    flags: str
    services: str
    regexp: str
    replacement: str  # a domain name, "." for none


@dataclass(frozen=True, slots=True)
class Srv:
    """An SRV record (RFC 2782); target "." means "decidedly not available"."""

    priority: int
    weight: int
    port: int
    target: str


Record = Naptr | Srv | str  # str: an IPv4 or IPv6 address (A or AAAA)


class Outcome(enum.Enum):
    """How a query ended.  OK with no records is NODATA (RFC 2308 section 2.2)."""

    OK = "ok"
    NXDOMAIN = "nxdomain"  # the name does not exist (RFC 2308 section 2.1)
    TIMEOUT = "timeout"  # no answer within the deadline
    FAILURE = "failure"  # SERVFAIL, REFUSED, a network error: the resolver could not tell


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer to one :class:`Query` (never an exception: plans branch on the outcome)."""

    records: tuple[Record, ...] = ()
    outcome: Outcome = Outcome.OK

    @property
    def naptrs(self) -> list[Naptr]:
        return [r for r in self.records if isinstance(r, Naptr)]

    @property
    def srvs(self) -> list[Srv]:
        return [r for r in self.records if isinstance(r, Srv)]

    @property
    def addresses(self) -> list[str]:
        return [r for r in self.records if isinstance(r, str)]

    @property
    def failed(self) -> bool:
        """The resolver could not answer (as opposed to "there is nothing")."""
        return self.outcome in (Outcome.TIMEOUT, Outcome.FAILURE)


NXDOMAIN = Answer(outcome=Outcome.NXDOMAIN)
TIMEOUT = Answer(outcome=Outcome.TIMEOUT)
FAILURE = Answer(outcome=Outcome.FAILURE)

Batch = tuple[Query, ...]
Answers = Mapping[Query, Answer]
Plan = Generator[Batch, Answers, T]
"""Yields batches of queries (run concurrently), receives their answers, returns a result."""


def ask(*queries: Query) -> Plan[Answers]:
    """``answers = yield from ask(q1, q2)``: one batch, answered together."""
    if not queries:
        return {}
    answers = yield tuple(dict.fromkeys(queries))
    return answers


def parallel(plans: Sequence[Plan[T]]) -> Plan[list[T]]:
    """Run several plans side by side: each round merges their batches into one, so their
    lookups go out concurrently; the results come back in the order of ``plans``."""
    results: dict[int, T] = {}
    pending: dict[int, Batch] = {}
    for i, plan in enumerate(plans):
        try:
            pending[i] = next(plan)
        except StopIteration as stop:
            results[i] = stop.value
    while pending:
        batch = tuple(dict.fromkeys(q for qs in pending.values() for q in qs))
        answers = yield batch
        following: dict[int, Batch] = {}
        for i, queries in pending.items():
            try:
                following[i] = plans[i].send({q: answers[q] for q in queries})
            except StopIteration as stop:
                results[i] = stop.value
        pending = following
    return [results[i] for i in range(len(plans))]


def run_sync(plan: Plan[T], answer: Callable[[Query], Answer]) -> T:
    """Run a plan against a synchronous answer function (tests, tools).  Queries asked are
    answered in batch order, so ``answer`` can also record what was asked, and when."""
    try:
        batch = next(plan)
        while True:
            batch = plan.send({q: answer(q) for q in batch})
    except StopIteration as stop:
        result: T = stop.value
        return result


def start(plan: Plan[T]) -> tuple[T, None] | tuple[None, Batch]:
    """Advance a plan to its first batch: ``(result, None)`` if it needed no DNS at all,
    else ``(None, first_batch)`` and the plan is suspended at that batch."""
    try:
        return None, next(plan)
    except StopIteration as stop:
        result: T = stop.value
        return result, None


__all__ = [
    "FAILURE",
    "NXDOMAIN",
    "TIMEOUT",
    "Answer",
    "Answers",
    "Batch",
    "Naptr",
    "Outcome",
    "Plan",
    "Query",
    "Record",
    "Srv",
    "ask",
    "normalize_name",
    "parallel",
    "run_sync",
    "start",
]
