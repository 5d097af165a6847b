"""The routing chain: where a request for a destination this node does not serve goes next.

The proxy asks its :class:`~freecall.sip.proxy.TargetResolver` only for Request-URIs that are
not local (local users go through the registrar's location service first).  :class:`Router`
decides, in this order:

1. a static route from the configuration (``routes:``), by ``user@domain`` then ``domain``; the
   route's URI is itself resolved with RFC 3263 when it names a host (route ``"static"``);
2. a route learned from other nodes through :class:`PeerRoutes` (the host cache), by
   ``user@domain`` then ``domain`` (route ``"hostcache"``); none by default;
3. ENUM (RFC 6116) for ``tel:`` URIs and for SIP URIs whose user is a global number (leading
   "+", with or without ``user=phone``): the resulting SIP URI becomes the Request-URI and is
   routed by 1, 2 and 4, not by ENUM again (route ``"enum"``); a SIP URI for which ENUM finds
   nothing falls through to 4;
4. RFC 3263 on the URI (route ``"dns"``).

The result is one :class:`~freecall.sip.proxy.Target` whose flows are the RFC 3263 failover
list (at most ``max_flows``), or a status:

* 404 when the name does not exist or has no SIP service or address (NXDOMAIN, NODATA, an SRV
  of "."), or a tel: number is not global (ENUM cannot look it up);
* 408 when a lookup did not answer within ``dns.timeout`` (RFC 3261 section 21.4.9: "could not
  determine the location of the user in time");
* 503 when the resolver failed (SERVFAIL, REFUSED, unreachable) or a URI asks for a transport
  this node does not have (RFC 3261 section 21.5.4);
* 416 for a URI scheme other than sip, sips and tel.

A failure in one step is reported only if no later step finds a target.  Everything runs as a
pure :data:`~freecall.routing.plan.Plan`; :meth:`Router.resolve` answers at once when no DNS
is needed (an IP literal, a static route to an address), else it returns None, runs the lookups
as an asyncio task bounded by ``timeout`` (the whole chain), and hands the answer to the
``deliver(ticket, resolution)`` callback, which the daemon wires to ``Proxy.resolved`` followed
by a pump.  :meth:`Router.close` cancels the lookups in flight at shutdown (nothing is
delivered for them).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from ..sip.flow import Flow
from ..sip.message import Request
from ..sip.proxy import Resolution, Target
from ..sip.uri import SipUri, TelUri, Uri, parse_uri
from .dns import AsyncDns, Lookup, drive
from .e164 import e164_of, enum_lookup
from .plan import Batch, Outcome, Plan, parallel, start
from .rfc3263 import TRANSPORTS, Hop, Located, is_ip, locate

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("freecall.routing")

Deliver = Callable[[int, Resolution], None]
"""``deliver(ticket, resolution)``: the daemon calls ``proxy.resolved(ticket, resolution, now)``
and pumps the cores."""

REASONS = {404: "Not Found", 408: "Request Timeout", 416: "Unsupported URI Scheme",
           500: "Server Internal Error", 503: "Service Unavailable"}


class PeerRoutes(Protocol):
    """Routes learned from other nodes (the host cache fills this in).

    ``next_hops`` gets ``user@domain`` (user unescaped, domain lower case) and then ``domain``
    and returns the URIs of the node that serves it, best first (e.g.
    ``sip:198.51.100.7:5061;transport=tls``); empty when it knows no route.
    """

    def next_hops(self, key: str) -> Sequence[SipUri]: ...

    def prepare(self, keys: Sequence[str]) -> Awaitable[object] | None:
        """Called when ``next_hops`` knows none of ``keys``: something to await while the
        mesh is asked (the router waits at most half its time budget), or None."""


class NoPeers:
    """The default :class:`PeerRoutes`: no host cache, no learned routes."""

    def next_hops(self, key: str) -> Sequence[SipUri]:
        return ()

    def prepare(self, keys: Sequence[str]) -> Awaitable[object] | None:
        return None


def parse_routes(routes: Mapping[str, str]) -> dict[str, SipUri]:
    """The ``routes:`` table: keys ``domain`` or ``user@domain`` (domain lower-cased) to the
    next-hop URI.  Raises ValueError for a value that is not a sip:/sips: URI."""
    table: dict[str, SipUri] = {}
    for key, value in routes.items():
        user, sep, domain = key.rpartition("@")
        norm = f"{user}@{domain.lower()}" if sep else key.lower()
        uri = parse_uri(value)
        if not isinstance(uri, SipUri):
            raise ValueError(f"route {key!r}: {value!r} is not a sip: or sips: URI")
        table[norm] = uri
    return table


def _keys(uri: SipUri) -> tuple[str, ...]:
    """Lookup keys, most specific first: ``user@domain``, then ``domain``."""
    host = uri.bare_host
    return (uri.aor, host) if uri.user is not None else (host,)


def worse(a: int, b: int) -> int:
    """Of two failures, the one to report: "could not find out" (408, 503) beats 404."""
    if a == 404:
        return b
    if b == 404:
        return a
    return max(a, b)


def status_for(errors: frozenset[Outcome]) -> int:
    """No target: 408 if a lookup timed out, 503 if the resolver failed, else 404."""
    if Outcome.TIMEOUT in errors:
        return 408
    if Outcome.FAILURE in errors:
        return 503
    return 404


class Router:
    """The routing chain as a :class:`~freecall.sip.proxy.TargetResolver` (module docstring)."""

    def __init__(
        self,
        dns: Lookup,
        deliver: Deliver,
        *,
        routes: Mapping[str, str] | None = None,
        peers: PeerRoutes | None = None,
        enum_suffixes: Sequence[str] = ("e164.arpa",),
        transports: Sequence[str] = TRANSPORTS,
        ip_versions: Sequence[int] = (4, 6),
        timeout: float = 2.0,
        max_flows: int = 8,
        rng: random.Random | None = None,
    ) -> None:
        self.dns = dns
        self.deliver = deliver
        self.routes = parse_routes(routes or {})
        self.peers: PeerRoutes = peers or NoPeers()
        self.enum_suffixes = tuple(enum_suffixes)
        self.transports = tuple(transports)
        self.ip_versions = tuple(ip_versions)
        self.timeout = timeout
        self.max_flows = max_flows
        self.rng = rng or random.Random()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._owned_dns: AsyncDns | None = None

    @classmethod
    def from_config(
        cls,
        config: Config,
        deliver: Deliver,
        *,
        peers: PeerRoutes | None = None,
        dns: Lookup | None = None,
        rng: random.Random | None = None,
    ) -> Router:
        """A router for a daemon: ``routes:``, ``dns:``, and the transports and address families
        of the node-side listeners (``sip.public``, else ``sip.listen``)."""
        owned = None
        if dns is None:
            servers = [(s.host, s.port) for s in config.dns.servers] or None
            owned = AsyncDns(servers, timeout=config.dns.timeout)
            dns = owned
        listeners = config.sip.public or config.sip.listen
        have = {str(lst.transport) for lst in listeners}
        transports: list[str] = [t for t in TRANSPORTS if t in have] or list(TRANSPORTS)
        ip_versions = [v for v, present in (
            (4, any(":" not in lst.host or lst.host == "::" for lst in listeners)),
            (6, any(":" in lst.host for lst in listeners)),
        ) if present] or [4, 6]
        router = cls(
            dns,
            deliver,
            routes=config.routes,
            peers=peers,
            enum_suffixes=config.dns.enum_suffixes,
            transports=transports,
            ip_versions=ip_versions,
            timeout=config.dns.timeout,
            rng=rng,
        )
        router._owned_dns = owned
        return router

    # -- the TargetResolver interface --------------------------------------------------------
    def resolve(self, uri: Uri, request: Request, ticket: int) -> Resolution | None:
        """The resolution now if no DNS is needed, else None and ``deliver(ticket, ...)`` later
        (never from inside this call)."""
        warm = self._ask_mesh(uri)
        if warm is not None:
            self._spawn(ticket, self._run_after(ticket, uri, warm))
            return None
        plan = self.plan(uri)
        result, first = start(plan)
        if first is None:
            assert result is not None
            return result
        self._spawn(ticket, self._run(ticket, plan, first, self.timeout))
        return None

    def _ask_mesh(self, uri: Uri) -> Awaitable[object] | None:
        """The mesh lookup to await first: a name (not an address) with no static route whose
        route the host cache does not hold yet (a sparse mesh keeps a record in its home group
        only)."""
        if not isinstance(uri, SipUri) or is_ip(uri.bare_host):
            return None
        keys = _keys(uri)
        if any(key in self.routes or self.peers.next_hops(key) for key in keys):
            return None
        return self.peers.prepare(keys)

    def _spawn(self, ticket: int, work: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks[ticket] = task
        task.add_done_callback(lambda t: self._forget(ticket, t))

    def _forget(self, ticket: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(ticket) is task:
            del self._tasks[ticket]

    async def _run(
        self, ticket: int, plan: Plan[Resolution], first: Batch, timeout: float
    ) -> None:
        try:
            resolution = await drive(plan, self.dns, timeout=timeout, first=first)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("routing ticket %d failed", ticket)
            resolution = Resolution(status=500, reason=REASONS[500])
        try:
            self.deliver(ticket, resolution)
        except Exception:
            log.exception("delivering the route of ticket %d failed", ticket)

    async def _run_after(self, ticket: int, uri: Uri, warm: Awaitable[object]) -> None:
        """Wait (at most half the budget) for the mesh to answer, then run the chain in the
        time left."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await asyncio.wait_for(warm, timeout=self.timeout / 2)
        except TimeoutError:
            log.debug("the mesh did not answer for %s in time", uri)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("asking the mesh for %s failed", uri)
        plan = self.plan(uri)
        result, first = start(plan)
        if first is None:
            assert result is not None
            self.deliver(ticket, result)
            return
        await self._run(ticket, plan, first, self.timeout - (loop.time() - started))

    @property
    def pending(self) -> int:
        """Resolutions in progress."""
        return len(self._tasks)

    def cancel(self, ticket: int) -> None:
        """Forget a resolution in progress (its answer is not delivered)."""
        task = self._tasks.pop(ticket, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        """Cancel every resolution in flight (shutdown); then the DNS client, if we made it."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._owned_dns is not None:
            await self._owned_dns.close()

    # -- awaited, for tools and tests -------------------------------------------------------
    async def locate(self, uri: Uri) -> Resolution:
        """The whole chain for one URI, awaited (tools and tests)."""
        return await drive(self.plan(uri), self.dns, timeout=self.timeout)

    # -- the chain, pure --------------------------------------------------------------------
    def plan(self, uri: Uri, *, enum: bool = True) -> Plan[Resolution]:
        """The routing chain for ``uri`` as a plan (module docstring); ``enum=False`` for the
        URI an ENUM lookup produced."""
        if isinstance(uri, TelUri):
            number = e164_of(uri) if self.enum_suffixes else None
            if number is None:
                log.info("no route for %s: not a global number, or ENUM is off", uri)
                return Resolution(status=404, reason=REASONS[404])
            return (yield from self._enum(number))
        if not isinstance(uri, SipUri):
            return Resolution(status=416, reason=REASONS[416])
        # 1. static routes
        for key in _keys(uri):
            hop_uri = self.routes.get(key)
            if hop_uri is not None:
                located = yield from self._locate(hop_uri)
                return self._resolution(uri, [located], "static")
        # 2. routes learned from other nodes
        for key in _keys(uri):
            peer_uris = list(self.peers.next_hops(key))
            if peer_uris:
                results = yield from parallel([self._locate(p) for p in peer_uris])
                resolution = self._resolution(uri, results, "hostcache")
                if resolution.targets:
                    return resolution
                log.info("host cache route for %s gave no address: trying DNS", key)
                break
        # 3. ENUM for a global number in the user part
        number = e164_of(uri) if enum and self.enum_suffixes else None
        enum_status: Resolution | None = None
        if number is not None:
            enum_status = yield from self._enum(number)
            if enum_status.targets:
                return enum_status
        # 4. RFC 3263
        located = yield from self._locate(uri)
        resolution = self._resolution(uri, [located], "dns")
        if not resolution.targets and enum_status is not None:
            status = worse(enum_status.status, resolution.status)
            return Resolution(status=status, reason=REASONS.get(status))
        return resolution

    def _locate(self, uri: SipUri) -> Plan[Located]:
        return locate(uri, rng=self.rng, transports=self.transports, ip_versions=self.ip_versions)

    def _enum(self, number: str) -> Plan[Resolution]:
        """ENUM, then each resulting URI in turn through the chain (without ENUM)."""
        found = yield from enum_lookup(number, self.enum_suffixes)
        worst = status_for(found.errors)
        for candidate in found.uris:
            resolution = yield from self.plan(candidate, enum=False)
            if resolution.targets:
                targets = tuple(dataclasses.replace(t, route="enum") for t in resolution.targets)
                return Resolution(targets)
            worst = worse(worst, resolution.status)
        if not found.uris:
            log.info("ENUM: no SIP URI for %s", number)
        return Resolution(status=worst, reason=REASONS.get(worst))

    def _resolution(self, uri: SipUri, results: Sequence[Located], route: str) -> Resolution:
        hops: dict[Hop, None] = {}
        errors: set[Outcome] = set()
        for located in results:
            hops.update(dict.fromkeys(located.hops))
            errors |= located.errors
        if hops:
            flows = tuple(Flow(h.transport, (h.address, h.port)) for h in hops)[: self.max_flows]
            return Resolution((Target(uri, flows, route),))
        status = status_for(frozenset(errors))
        why = "; ".join(r.reason for r in results if r.reason) or "no target"
        log.info("no route for %s via %s: %d (%s)", uri, route, status, why)
        return Resolution(status=status, reason=REASONS[status])


__all__ = ["Deliver", "NoPeers", "PeerRoutes", "Router", "parse_routes", "status_for", "worse"]
