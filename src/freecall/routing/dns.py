"""DNS at the edge: dnspython's asyncio resolver behind a TTL cache, with deadlines everywhere.

* :class:`DnsCache` is pure (every call takes ``now``): positive answers live for their TTL
  (the smallest of the CNAME chain), NXDOMAIN and NODATA for the SOA's negative TTL,
  ``min(SOA TTL, SOA MINIMUM)`` (RFC 2308 section 5; a negative answer without an SOA is not
  cached), resolver failures (SERVFAIL, REFUSED) for a few seconds (RFC 2308 section 7.1 allows
  up to five minutes).  TTLs are capped, the size is bounded (least recently used goes first).
  Timeouts are never cached: the next call asks again.
* :class:`AsyncDns` answers :class:`~freecall.routing.plan.Query` values and never raises: a
  timeout or failure is an :class:`~freecall.routing.plan.Answer` outcome.  Identical lookups in
  flight are coalesced into one query; at most ``max_inflight`` queries are outstanding; every
  query and every wait has a deadline, so a dead or slow resolver delays only the lookups that
  depend on it and only up to their deadline.
* :func:`drive` runs a :data:`~freecall.routing.plan.Plan` against a :class:`Lookup` under one
  overall deadline, each batch of queries concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from dns.rdtypes.IN.NAPTR import NAPTR
from dns.rdtypes.IN.SRV import SRV

from .plan import FAILURE, TIMEOUT, Answer, Batch, Naptr, Outcome, Plan, Query, Record, Srv

log = logging.getLogger("freecall.dns")

T = TypeVar("T")

SUPPORTED_TYPES = ("A", "AAAA", "SRV", "NAPTR")


class Lookup(Protocol):
    """What plans are run against: :class:`AsyncDns`, or a fake in tests."""

    async def query(self, name: str, rdtype: str, timeout: float | None = None) -> Answer: ...


# -- the cache ----------------------------------------------------------------------------------


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class DnsCache:
    """Answers by query until they expire (see the module docstring); pure, clock passed in."""

    def __init__(
        self,
        max_entries: int = 4096,
        *,
        max_ttl: float = 3600.0,
        max_negative_ttl: float = 300.0,
    ) -> None:
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self._entries: OrderedDict[Query, tuple[float, Answer]] = OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, query: Query, now: float) -> Answer | None:
        entry = self._entries.get(query)
        if entry is None:
            self.stats.misses += 1
            return None
        expires, answer = entry
        if now >= expires:
            del self._entries[query]
            self.stats.misses += 1
            return None
        self._entries.move_to_end(query)
        self.stats.hits += 1
        return answer

    def put(self, query: Query, answer: Answer, ttl: float | None, now: float) -> None:
        """Keep ``answer`` for ``ttl`` seconds (capped); None or <= 0 keeps nothing."""
        if ttl is None or ttl <= 0 or answer.outcome is Outcome.TIMEOUT:
            return
        negative = answer.outcome is not Outcome.OK or not answer.records
        ttl = min(ttl, self.max_negative_ttl if negative else self.max_ttl)
        self._entries[query] = (now + ttl, answer)
        self._entries.move_to_end(query)
        if len(self._entries) > self.max_entries:
            self.expire(now)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.stats.evictions += 1

    def expire(self, now: float) -> None:
        """Drop every expired entry."""
        for query in [q for q, (expires, _) in self._entries.items() if now >= expires]:
            del self._entries[query]

    def clear(self) -> None:
        self._entries.clear()


# -- dnspython answers -> plain values ------------------------------------------------------------


def _name_text(name: dns.name.Name) -> str:
    return "." if name == dns.name.root else name.to_text(omit_final_dot=True)


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def _record(rdata: object) -> Record | None:
    """One rdata as a plain value (NAPTR, SRV, or an address string)."""
    if isinstance(rdata, A | AAAA):
        return str(rdata.address)
    if isinstance(rdata, SRV):
        return Srv(rdata.priority, rdata.weight, rdata.port, _name_text(rdata.target))
    if isinstance(rdata, NAPTR):
        return Naptr(
            rdata.order,
            rdata.preference,
            _text(rdata.flags),
            _text(rdata.service),
            _text(rdata.regexp),
            _name_text(rdata.replacement),
        )
    return None


def negative_ttl(response: dns.message.Message | None) -> float | None:
    """RFC 2308 section 5: a negative answer is cached for min(SOA TTL, SOA MINIMUM), the SOA
    being in the authority section; with no SOA it SHOULD NOT be cached (None)."""
    if response is None:
        return None
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            soa = rrset[0]
            if isinstance(soa, SOA):
                return float(min(rrset.ttl, soa.minimum))
    return None


def _nxdomain_response(exc: dns.resolver.NXDOMAIN) -> dns.message.Message | None:
    responses = exc.kwargs.get("responses") or {}
    for response in responses.values():
        if isinstance(response, dns.message.Message):
            return response
    return None


# -- the resolver -------------------------------------------------------------------------------


@dataclass(slots=True)
class DnsStats:
    queries: int = 0  # sent to a server (cache misses that were not coalesced)
    cache_hits: int = 0
    coalesced: int = 0  # lookups that joined a query already in flight
    timeouts: int = 0
    failures: int = 0


class AsyncDns:
    """Cached, coalesced, bounded DNS lookups through ``dns.asyncresolver`` (module docstring).

    ``servers`` are ``(address, port)`` pairs, None for the system's resolv.conf.  ``timeout``
    bounds one query, retries and the wait for a free slot included.  ``clock`` is the cache's
    clock only (tests pass virtual time); the deadlines use the running loop's clock.
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, int]] | None = None,
        *,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        cache: DnsCache | None = None,
        max_inflight: int = 256,
        failure_ttl: float = 5.0,
        resolver: dns.asyncresolver.Resolver | None = None,
    ) -> None:
        self.timeout = timeout
        self.clock = clock
        self.cache = cache if cache is not None else DnsCache()
        self.failure_ttl = failure_ttl
        self.stats = DnsStats()
        self.resolver = resolver or _make_resolver(servers, timeout)
        self._slots = asyncio.Semaphore(max_inflight)
        self._inflight: dict[Query, asyncio.Task[Answer]] = {}

    async def query(self, name: str, rdtype: str, timeout: float | None = None) -> Answer:
        """The answer from the cache, or from the resolver within ``timeout`` (at most the
        configured one); TIMEOUT when it does not come in time."""
        key = Query.of(name, rdtype)
        cached = self.cache.get(key, self.clock())
        if cached is not None:
            self.stats.cache_hits += 1
            return cached
        wait = self.timeout if timeout is None else min(timeout, self.timeout)
        if wait <= 0:
            self.stats.timeouts += 1
            return TIMEOUT
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(key))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._finished, key))
        else:
            self.stats.coalesced += 1
        try:
            async with asyncio.timeout(wait):
                # shielded: one caller giving up must not cancel the query the others wait for
                return await asyncio.shield(task)
        except TimeoutError:
            self.stats.timeouts += 1
            return TIMEOUT

    def _finished(self, key: Query, task: asyncio.Task[Answer]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("DNS lookup %s %s failed", key.name, key.rdtype, exc_info=task.exception())

    async def _fetch(self, key: Query) -> Answer:
        try:
            async with asyncio.timeout(self.timeout):
                async with self._slots:
                    self.stats.queries += 1
                    answer, ttl = await self._ask(key)
        except TimeoutError:
            return TIMEOUT
        if answer.outcome is Outcome.FAILURE:
            self.stats.failures += 1
        self.cache.put(key, answer, ttl, self.clock())
        return answer

    async def _ask(self, key: Query) -> tuple[Answer, float | None]:
        """One query through dnspython: the answer and how long it may be cached."""
        if key.rdtype not in SUPPORTED_TYPES:
            return FAILURE, None
        try:
            result = await self.resolver.resolve(
                key.name + ".",
                key.rdtype,
                raise_on_no_answer=False,
                lifetime=self.timeout,
                search=False,
            )
        except dns.resolver.NXDOMAIN as exc:
            return Answer(outcome=Outcome.NXDOMAIN), negative_ttl(_nxdomain_response(exc))
        except dns.exception.Timeout:
            return TIMEOUT, None
        except (dns.resolver.NoNameservers, dns.exception.DNSException, OSError) as exc:
            log.debug("DNS %s %s: %s", key.name, key.rdtype, exc)
            return FAILURE, self.failure_ttl
        if result.rrset is None:
            return Answer(), negative_ttl(result.response)  # NODATA (RFC 2308 section 2.2)
        records = tuple(r for r in (_record(rd) for rd in result.rrset) if r is not None)
        return Answer(records), float(result.chaining_result.minimum_ttl)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def close(self) -> None:
        """Cancel the queries in flight (shutdown)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()


def _make_resolver(
    servers: Sequence[tuple[str, int]] | None, timeout: float
) -> dns.asyncresolver.Resolver:
    if servers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
    else:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration:
            log.warning("no resolver configuration (resolv.conf): using 127.0.0.1")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    # One attempt may take a third of the time, so a lost UDP datagram is retried in time
    # and a dead first server leaves time for the next one.
    resolver.timeout = max(0.05, timeout / 3)
    resolver.lifetime = timeout
    resolver.retry_servfail = False
    resolver.cache = None  # ours is in front (with negative caching and a bound)
    return resolver


# -- running plans ------------------------------------------------------------------------------


async def _answer(lookup: Lookup, query: Query, timeout: float) -> Answer:
    try:
        return await lookup.query(query.name, query.rdtype, timeout)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("DNS lookup %s %s raised", query.name, query.rdtype)
        return FAILURE


async def drive(
    plan: Plan[T],
    lookup: Lookup,
    *,
    timeout: float,
    first: Batch | None = None,
) -> T:
    """Run ``plan`` to its result, every batch concurrently, all within ``timeout`` seconds
    from now: once the time is spent, the remaining queries are answered TIMEOUT (or from the
    cache) at once.  ``first`` is the batch of a plan already advanced by
    :func:`~freecall.routing.plan.start`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        batch = first if first is not None else next(plan)
        while True:
            remaining = max(0.0, deadline - loop.time())
            results = await asyncio.gather(*(_answer(lookup, q, remaining) for q in batch))
            batch = plan.send(dict(zip(batch, results, strict=True)))
    except StopIteration as stop:
        result: T = stop.value
        return result


__all__ = ["AsyncDns", "CacheStats", "DnsCache", "DnsStats", "Lookup", "drive", "negative_ttl"]
