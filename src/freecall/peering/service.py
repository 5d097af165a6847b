"""The gossip engine at work in the daemon: its UDP socket, clock, bootstrap and persistence.

:class:`PeeringService` is the asyncio edge of :mod:`freecall.peering.gossip` (pure) and the
daemon's :class:`~freecall.routing.router.PeerRoutes`: the router asks it which node serves a
domain or user, and, when the host cache does not know yet, to ask the mesh (a lookup in the
route's home group, docs/peering.md).  It also tells the transport which TLS key the node at an
address must hold (its record's TLS fingerprint), so a call routed by the host cache reaches
the node the record names or nobody.

Bootstrap, in order (issue 5): the host cache saved in the state directory; ``peering.seeds``;
the SRV records ``_freecall._udp.<peering.srv_domain>``; multicast DNS (DNS-SD type
``_freecall._udp.local.``, like GNU SIP Witch's zeroconf plugin), which also announces this
node.  Seeds found later are added as they come; the gossip engine contacts them while it knows
fewer than a handful of nodes, and now and then after.

Time: node records carry Unix times (seq in ms, expiry), so the engine runs on the wall clock
(``clock``, injected); its deadlines become loop timers.  The cache is written atomically every
``SAVE_INTERVAL`` seconds when it changed, and at shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import logging
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ..routing.dns import Lookup, drive
from ..routing.plan import Plan, Query, ask
from ..routing.rfc3263 import addresses_of, is_ip, order_srv
from ..sip.uri import SipUri, parse_sip_uri
from .gossip import (
    Gossip,
    GossipConfig,
    LookupCompleted,
    PeerAdded,
    PeerRemoved,
    PeerUpdated,
)
from .hostcache import CACHE_FILE, HostCache
from .records import (
    MAX_ROUTES,
    Address,
    AddrKind,
    Ext,
    NodeIdentity,
    NodeRecord,
    RecordCodec,
    RecordError,
    RelayVia,
    kind_name,
    normalize_route,
)

log = logging.getLogger("freecall.peering")

Addr = tuple[str, int]
SAVE_INTERVAL = 10.0  # when changed: a crash loses at most this much of what was learned
REBOOTSTRAP_INTERVAL = 600.0  # seed names and SRV records are looked up again this often
ANSWER_TTL = 300.0  # routes learned by a lookup stay usable this long (at most their expiry)
ANSWER_CAP = 1024
MDNS_TYPE = "_freecall._udp.local."
SIP_KINDS = ((AddrKind.SIP_TLS, "tls"), (AddrKind.SIP_TCP, "tcp"), (AddrKind.SIP_UDP, "udp"))
"""Preference among a node's SIP addresses: TLS first (encrypted, and the key is checked)."""


class Keep:
    """Type of :data:`KEEP`: "leave this part of the record as it is"."""


KEEP = Keep()


@dataclass(frozen=True, slots=True)
class RecordKey:
    """An OpenPGP key a peer node's record names (docs/security.md, "Keys from the mesh")."""

    fingerprint: str  # upper-case hex, as GnuPG prints it
    node_id: str  # the node whose signed record names it (32 hex digits)
    route: str  # the route of that record the call's address matched


@dataclass(frozen=True)
class Announcement:
    """What this node tells the mesh about itself (signed into its record)."""

    addresses: tuple[Address, ...]
    routes: tuple[str, ...]
    extensions: tuple[tuple[int, bytes], ...] = ()
    flags: int = 0


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, service: PeeringService) -> None:
        self.service = service

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.service._on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("gossip socket: %s", exc)


class PeeringService:
    """One node's membership in the mesh (module docstring)."""

    def __init__(
        self,
        identity: NodeIdentity,
        announcement: Announcement,
        *,
        listen: Addr,
        state_dir: Path,
        config: GossipConfig,
        seeds: Sequence[tuple[str, int]] = (),
        srv_domain: str | None = None,
        mdns: bool = False,
        dns: Lookup | None = None,
        dns_timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.announcement = announcement
        self.listen = listen
        self.cache_path = state_dir / CACHE_FILE
        self.config = config
        self.seeds = tuple(seeds)
        self.srv_domain = srv_domain
        self.mdns = mdns
        self.dns = dns
        self.dns_timeout = dns_timeout
        self.clock = clock
        self.rng = rng or random.SystemRandom()
        self.gossip: Gossip | None = None
        self.bound: Addr | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lookups: dict[int, asyncio.Future[bool]] = {}
        self._answers: OrderedDict[str, tuple[float, tuple[NodeRecord, ...]]] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dirty = False
        self._mdns: _Mdns | None = None
        self._gossip_address: Address | None = None

    # -- life cycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the gossip socket, load the saved host cache, start the engine and bootstrap."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        family = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self), local_addr=self.listen, family=family
        )
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        self.bound = (str(sockname[0]), int(sockname[1]))
        now = self.clock()
        cache = HostCache(
            rng=self.rng,
            capacity=self.config.capacity,
            group_bits=self.config.group_bits,
            source_quota=self.config.source_quota,
            contacts_min=self.config.contacts_min,
        )
        codec = RecordCodec()
        loaded = cache.load(self.cache_path, codec, now)  # every record verified again
        announcement = self.announcement
        self.gossip = Gossip(
            self.identity,
            now=now,
            rng=self.rng,
            addresses=announcement.addresses,
            routes=announcement.routes,
            flags=announcement.flags,
            extensions=announcement.extensions,
            config=self.config,
            cache=cache,
            codec=codec,
        )
        log.info(
            "peering: node %s on udp:%s:%d, %d node(s) from %s; announcing %s; routes: %s%s",
            self.identity.node_id.hex(),
            self.bound[0],
            self.bound[1],
            loaded,
            self.cache_path.name,
            _addresses(announcement.addresses),
            ", ".join(announcement.routes) or "none",
            _openpgp_note(announcement.extensions),
        )
        self._spawn(self._bootstrap())
        self._spawn(self._save_periodically())
        self._flush()

    async def stop(self) -> None:
        """Save the host cache, leave mDNS, close the socket."""
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._mdns is not None:
            await self._mdns.close()
            self._mdns = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.save()
        for future in self._lookups.values():
            if not future.done():
                future.set_result(False)
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def save(self) -> None:
        """Write the host cache now (atomically)."""
        if self.gossip is None:
            return
        try:
            self.gossip.cache.save(self.cache_path, self.clock())
            self._dirty = False
        except OSError as error:
            log.warning("cannot save the host cache to %s: %s", self.cache_path, error)

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the engine -----------------------------------------------------------------------
    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        if self.gossip is None:
            return
        try:
            self.gossip.receive(data, addr, self.clock())
        except Exception:  # a bug must not take the daemon down with it
            log.exception("gossip datagram from %s:%d failed", *addr)
        self._flush()

    def _on_timer(self) -> None:
        self._timer = None
        if self.gossip is None:
            return
        try:
            self.gossip.handle_timer(self.clock())
        except Exception:
            log.exception("gossip round failed")
        self._flush()

    def _flush(self) -> None:
        """Send what the engine produced, handle its events, re-arm its timer."""
        gossip, transport, loop = self.gossip, self._transport, self._loop
        if gossip is None or transport is None or loop is None:
            return
        for data, addr in gossip.datagrams_to_send():
            transport.sendto(data, addr)
        while (event := gossip.next_event()) is not None:
            if isinstance(event, LookupCompleted):
                self._lookup_done(event)
            elif isinstance(event, PeerAdded):
                self._dirty = True
                log.info("peer %s joined: %s", event.record.node_id.hex()[:16],
                         _describe(event.record))
            elif isinstance(event, PeerUpdated):
                self._dirty = True
                log.debug("peer %s updated: %s", event.record.node_id.hex()[:16],
                          _describe(event.record))
            elif isinstance(event, PeerRemoved):
                self._dirty = True
                log.info("peer %s left (%s)", event.node_id.hex()[:16], event.reason)
        delay = max(0.0, gossip.get_timer() - self.clock())
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(delay, self._on_timer)

    # -- bootstrap --------------------------------------------------------------------------
    async def _bootstrap(self) -> None:
        if self.mdns:
            try:
                self._mdns = _Mdns(self)
                await self._mdns.start()
            except Exception as error:  # no multicast here: the other sources still work
                log.warning("mDNS discovery is off: %s", error)
                self._mdns = None
        while True:
            for host, port in self.seeds:
                for address in await self._addresses(host):
                    self.add_seed((address, port), None, "peering.seeds")
            if self.srv_domain and self.dns is not None:
                for seed in await self._srv_seeds(self.srv_domain):
                    self.add_seed(seed, None, f"SRV _freecall._udp.{self.srv_domain}")
            await asyncio.sleep(REBOOTSTRAP_INTERVAL)

    def add_seed(self, addr: Addr, public_key: bytes | None, source: str) -> None:
        """A node to contact (from configuration, DNS or mDNS); ignored if it is us."""
        if self.gossip is None or public_key == self.identity.public_key:
            return
        if self.bound is not None and addr == self.bound:
            return
        log.debug("seed %s:%d from %s", addr[0], addr[1], source)
        self.gossip.add_seed(addr, public_key)
        self._flush()

    def reconfigure(self, *, seeds: Sequence[tuple[str, int]], srv_domain: str | None,
                    routes: Sequence[str], openpgp_key: bytes | Keep | None = KEEP) -> None:
        """A configuration reload: new seeds are contacted at once; changed routes (users
        added or removed) or a changed OpenPGP key are re-signed into our record and spread
        (a new sequence number)."""
        added = [seed for seed in seeds if seed not in self.seeds]
        self.seeds = tuple(seeds)
        self.srv_domain = srv_domain
        if added:
            self._spawn(self._add_seeds(added))
        current = self.announcement
        extensions = current.extensions
        if not isinstance(openpgp_key, Keep):
            extensions = with_openpgp_key(extensions, openpgp_key)
        if tuple(routes) == tuple(current.routes) and extensions == current.extensions:
            return
        self.announcement = dataclasses.replace(current, routes=tuple(routes),
                                                extensions=extensions)
        if self.gossip is not None:
            self.gossip.update_local(self.clock(), routes=tuple(routes), extensions=extensions)
            log.info("peering: now announcing routes %s%s", ", ".join(routes) or "none",
                     _openpgp_note(extensions))
            self._dirty = True
            self._flush()

    def set_nat(self, *, reflexive: tuple[str, int] | Keep | None = KEEP,
                relay: RelayVia | Keep | None = KEEP) -> None:
        """What node-level STUN learned (an AddrKind.REFLEXIVE address) and the relay we are
        attached to (Ext.VIA_RELAY), re-signed into our record when they change
        (docs/peering.md, "Behind NAT"). While a relay is named, the record leaves out our
        gossip address: nobody outside can reach it, and nodes that tried would declare us
        dead and spread it; we still gossip outwards, and answers come back to our source."""
        current = self.announcement
        if self._gossip_address is None:
            self._gossip_address = next(
                (a for a in current.addresses if a.kind == AddrKind.GOSSIP), None)
        addresses, extensions = current.addresses, current.extensions
        if not isinstance(reflexive, Keep):
            addresses = tuple(a for a in addresses if a.kind != AddrKind.REFLEXIVE)
            if reflexive is not None:
                addresses = (*addresses, Address(AddrKind.REFLEXIVE, *reflexive))
        if not isinstance(relay, Keep):
            extensions = tuple(e for e in extensions if e[0] != Ext.VIA_RELAY)
            addresses = tuple(a for a in addresses if a.kind != AddrKind.GOSSIP)
            if relay is not None:
                extensions = (*extensions, (Ext.VIA_RELAY, relay.encode()))
            elif self._gossip_address is not None:
                addresses = (self._gossip_address, *addresses)
        if addresses == current.addresses and extensions == current.extensions:
            return
        self.announcement = dataclasses.replace(current, addresses=addresses,
                                                extensions=extensions)
        if self.gossip is not None:
            self.gossip.update_local(self.clock(), addresses=addresses, extensions=extensions)
            log.info("peering: now announcing %s%s", _addresses(addresses),
                     _via_note(extensions))
            self._dirty = True
            self._flush()

    def records(self) -> list[NodeRecord]:
        """Every record in the host cache (ours included)."""
        return [] if self.gossip is None else list(self.gossip.cache.records())

    def records_for(self, route: str) -> list[NodeRecord]:
        """Records serving ``route`` (``user@domain``: user-specific first, then domain)."""
        gossip = self.gossip
        if gossip is None:
            return []
        found = gossip.lookup_user(route) if "@" in route else gossip.lookup_domain(route)
        return [*found, *self._answer(route)]

    def republish(self, *, gossip: Address | None, sip: Sequence[Address]) -> bool:
        """This node's own addresses changed at run time (a public address learnt later,
        say by STUN, or a reload that moved them): sign a new record with them (seq + 1) and
        spread it; peers replace the old one by its sequence number (docs/peering.md, 3).
        The arguments are those of :func:`announcement_for`; routes and extensions stay as
        they are. True if the record changed; False if nothing did, or if the addresses do
        not fit a record (logged, the old record stays)."""
        current = self.announcement
        addresses = addresses_for(gossip, sip)
        # What set_nat put in stays: the reflexive address, and no gossip address while a
        # relay is named (the new one is kept for when the node leaves the relay).
        addresses = (*addresses, *(a for a in current.addresses if a.kind == AddrKind.REFLEXIVE))
        if any(e[0] == Ext.VIA_RELAY for e in current.extensions):
            self._gossip_address = gossip
            addresses = tuple(a for a in addresses if a.kind != AddrKind.GOSSIP)
        if addresses == current.addresses:
            return False
        try:  # a trial signature: the record must fit its size limit
            self.identity.make_record(seq=0, expires=0, addresses=addresses,
                                      routes=current.routes, flags=current.flags,
                                      extensions=current.extensions)
        except RecordError as error:
            log.warning("peering: cannot announce %s (%s); keeping %s",
                        _addresses(addresses), error, _addresses(current.addresses))
            return False
        self.announcement = dataclasses.replace(current, addresses=addresses)
        if self.gossip is not None:
            self.gossip.update_local(self.clock(), addresses=addresses)
            log.info("peering: now announcing %s (record %d)", _addresses(addresses),
                     self.gossip.local.seq)
            self._dirty = True
            self._flush()
        return True

    async def _add_seeds(self, seeds: Sequence[tuple[str, int]]) -> None:
        for host, port in seeds:
            for address in await self._addresses(host):
                self.add_seed((address, port), None, "peering.seeds (reload)")

    async def _addresses(self, host: str) -> list[str]:
        if is_ip(host):
            return [host]
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM), self.dns_timeout
            )
        except (OSError, TimeoutError) as error:
            log.warning("seed %s: cannot resolve it (%s)", host, error)
            return []
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    async def _srv_seeds(self, domain: str) -> list[Addr]:
        assert self.dns is not None
        try:
            return await drive(_srv_plan(domain, self.rng), self.dns, timeout=self.dns_timeout)
        except Exception:
            log.exception("SRV lookup of _freecall._udp.%s failed", domain)
            return []

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            if self._dirty:
                self.save()

    # -- routes for the router (PeerRoutes) --------------------------------------------------
    def next_hops(self, key: str) -> Sequence[SipUri]:
        """SIP URIs of the nodes serving ``user@domain`` or ``domain``, best first."""
        gossip = self.gossip
        if gossip is None:
            return ()
        records = gossip.lookup_user(key) if "@" in key else gossip.lookup_domain(key)
        if not records:
            records = list(self._answer(key))
        else:  # a lookup may have brought a newer version of a cached record (or the reverse)
            newer = {r.node_id: r for r in self._answer(key)}
            records = [newer[r.node_id] if r.node_id in newer and newer[r.node_id].newer_than(r)
                       else r for r in records]
        uris: list[SipUri] = []
        for record in records:
            if record.key != gossip.key:
                uris.extend(_sip_uris(record))
        return uris

    def prepare(self, keys: Sequence[str]) -> Awaitable[object] | None:
        """Ask the mesh for each key; the awaitable ends when one is found or all are not."""
        gossip = self.gossip
        if gossip is None or self._loop is None or self.known_nodes() == 0:
            return None  # nobody to ask: routing goes on at once
        futures: list[asyncio.Future[bool]] = []
        now = self.clock()
        for key in keys:
            try:
                qid = gossip.start_lookup(key, now)
            except RecordError:
                continue
            future: asyncio.Future[bool] = self._loop.create_future()
            self._lookups[qid] = future
            futures.append(future)
        if not futures:
            return None
        self._flush()
        return _any_true(futures)

    def _lookup_done(self, event: LookupCompleted) -> None:
        future = self._lookups.pop(event.query_id, None)
        if event.found:
            self._answers[event.route] = (self.clock() + ANSWER_TTL, event.records)
            self._answers.move_to_end(event.route)
            while len(self._answers) > ANSWER_CAP:
                self._answers.popitem(last=False)
            log.info("mesh lookup of %s: %s", event.route,
                     "; ".join(_describe(r) for r in event.records))
        else:
            log.info("mesh lookup of %s: no node serves it", event.route)
        if future is not None and not future.done():
            future.set_result(event.found)

    def _answer(self, key: str) -> tuple[NodeRecord, ...]:
        """Records a recent lookup brought (they may not have stayed in the cache)."""
        found = self._answers.get(key)
        if found is None:
            return ()
        now = self.clock()
        expiry, records = found
        if expiry < now:
            del self._answers[key]
            return ()
        return tuple(r for r in records if r.expires > now)

    # -- checks and views -------------------------------------------------------------------
    def tls_key_ok(self, remote: Addr, key: str | None) -> bool:
        """The transport's check of an outgoing TLS connection: if a node record names this
        address for SIP over TLS with a TLS key fingerprint, the peer must hold that key."""
        gossip = self.gossip
        if gossip is None:
            return True
        wanted: set[str] = set()
        host = _norm_ip(remote[0])
        records = list(gossip.cache.records())
        for _, answered in self._answers.values():
            records.extend(answered)
        for record in records:
            via = record.via_relay  # a node behind NAT names its relay's address and key
            if via is not None and via.port == remote[1] and _norm_ip(via.host) == host:
                wanted.add(via.tls_fingerprint.hex())
            fingerprint = record.tls_fingerprint
            if fingerprint is None:
                continue
            for address in record.addresses_of(AddrKind.SIP_TLS):
                if address.port == remote[1] and _norm_ip(address.host) == host:
                    wanted.add(fingerprint.hex())
        return not wanted or key in wanted

    def peers(self) -> list[dict[str, object]]:
        """The `/api/peers` view, with the OpenPGP key each record names (``openpgp``)."""
        if self.gossip is None:
            return []
        named = {r.node_id.hex(): r.openpgp_fingerprint for r in self.gossip.cache.records()}
        out = self.gossip.peers(self.clock())
        for peer in out:
            fingerprint = named.get(str(peer.get("node_id")))
            peer["openpgp"] = fingerprint.hex().upper() if fingerprint else None
        return out

    def openpgp_key_for(self, address: str, remote: Addr) -> RecordKey | None:
        """The OpenPGP key the host cache names for ``address`` (``user@domain``) when the
        call's far node is at ``remote``: records that serve the address (its user route or
        its domain) and list a SIP address on that host, this node's own excepted. A record
        with the exact SIP address (host and port: the node a call was sent to) wins over
        one with the host only (a call that came in: its source port is the node's or an
        ephemeral one). Two such records naming different keys name none (logged)."""
        gossip = self.gossip
        if gossip is None:
            return None
        try:
            route = normalize_route(address)
        except RecordError:
            return None
        domain = route.rpartition("@")[2]
        records = list(gossip.lookup_user(route)) if "@" in route else []
        records += [*gossip.lookup_domain(domain), *self._answer(route), *self._answer(domain)]
        host = _norm_ip(remote[0])
        exact: dict[bytes, NodeRecord] = {}
        same_host: dict[bytes, NodeRecord] = {}
        for record in records:
            if record.key == gossip.key or record.openpgp_fingerprint is None:
                continue
            for kind, _ in SIP_KINDS:
                for sip in record.addresses_of(kind):
                    if _norm_ip(sip.host) != host:
                        continue
                    same_host[record.node_id] = record
                    if sip.port == remote[1]:
                        exact[record.node_id] = record
        found = exact or same_host
        keys = {r.openpgp_fingerprint for r in found.values()}
        if len(keys) != 1:
            if len(keys) > 1:
                log.warning("peering: records of %d nodes at %s name different OpenPGP keys for "
                            "%s: none is used", len(found), host, route)
            return None
        record = next(iter(found.values()))
        fingerprint = record.openpgp_fingerprint
        assert fingerprint is not None
        return RecordKey(fingerprint.hex().upper(), record.node_id.hex(), route)

    def known_nodes(self) -> int:
        """Records in the host cache, this node's own excluded."""
        return 0 if self.gossip is None else len(self.gossip.cache) - 1


async def _any_true(futures: list[asyncio.Future[bool]]) -> bool:
    """True as soon as one future is True; False once all are done."""
    pending: set[asyncio.Future[bool]] = set(futures)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if any(f.result() for f in done):
            return True
    return False


def _srv_plan(domain: str, rng: random.Random) -> Plan[list[Addr]]:
    """``_freecall._udp.<domain>`` SRV (RFC 2782 order), then the targets' addresses."""
    answers = yield from ask(Query.of(f"_freecall._udp.{domain}", "SRV"))
    srvs = order_srv(next(iter(answers.values())).srvs, rng)
    errors: set[Any] = set()
    found = yield from addresses_of([s.target for s in srvs], (4, 6), errors)
    out: list[Addr] = []
    for srv in srvs:
        for address in found[srv.target.lower().rstrip(".")]:
            out.append((address, srv.port))
    return out


def _sip_uris(record: NodeRecord) -> list[SipUri]:
    """Where to send SIP to a node: over TLS only if its record names a TLS key (the
    transport then checks the node holds it; plain TCP or UDP to the same node would let
    whoever answers at that address take the call), else TLS, TCP, UDP in that order."""
    via = record.via_relay
    if via is not None:
        # Behind NAT: only through the relay its signed record names, over TLS, the relay's
        # key checked (tls_key_ok); its own addresses are private or unreachable.
        host = f"[{via.host}]" if ":" in via.host else via.host
        return [parse_sip_uri(f"sip:{host}:{via.port};transport=tls")]
    kinds: tuple[tuple[AddrKind, str], ...] = SIP_KINDS
    if record.tls_fingerprint is not None and record.addresses_of(AddrKind.SIP_TLS):
        kinds = SIP_KINDS[:1]
    uris: list[SipUri] = []
    for kind, transport in kinds:
        for address in record.addresses_of(kind):
            host = f"[{address.host}]" if ":" in address.host else address.host
            uris.append(parse_sip_uri(f"sip:{host}:{address.port};transport={transport}"))
    return uris


def with_openpgp_key(extensions: tuple[tuple[int, bytes], ...], key: bytes | None
                     ) -> tuple[tuple[int, bytes], ...]:
    """``extensions`` with the OpenPGP fingerprint replaced (first), or removed if None."""
    rest = tuple(e for e in extensions if e[0] != Ext.OPENPGP_FINGERPRINT)
    return rest if key is None else ((Ext.OPENPGP_FINGERPRINT, key), *rest)


def _openpgp_note(extensions: tuple[tuple[int, bytes], ...]) -> str:
    key = next((v for t, v in extensions if t == Ext.OPENPGP_FINGERPRINT), None)
    return f"; OpenPGP key {key.hex().upper()}" if key is not None else ""


def _via_note(extensions: tuple[tuple[int, bytes], ...]) -> str:
    value = next((v for t, v in extensions if t == Ext.VIA_RELAY), None)
    via = RelayVia.decode(value) if value is not None else None
    return f"; reachable through relay {via.node_id.hex()[:16]} at {via.host}:{via.port}" \
        if via is not None else ""


def _addresses(addresses: Sequence[Address]) -> str:
    return ", ".join(f"{kind_name(a.kind)}:{a.host}:{a.port}" for a in addresses) or "no address"


def _describe(record: NodeRecord) -> str:
    return f"routes [{', '.join(record.routes)}] at {_addresses(record.addresses)}"


def _norm_ip(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host


class _Mdns:
    """DNS-SD over multicast DNS (RFC 6762/6763) with ``zeroconf``: announce this node's
    gossip address with its public key, and hand every other node found to the engine as a
    seed (with its key, so the first contact needs no HELLO)."""

    def __init__(self, service: PeeringService) -> None:
        self.service = service
        self.zc: Any = None
        self.browser: Any = None
        self.info: Any = None

    async def start(self) -> None:
        service = self.service
        gossip_address = next(
            (a for a in service.announcement.addresses if a.kind == AddrKind.GOSSIP), None
        )
        interfaces: Any
        if gossip_address is not None:
            interfaces = [gossip_address.host]
            version = IPVersion.V6Only if ":" in gossip_address.host else IPVersion.V4Only
        else:
            interfaces, version = InterfaceChoice.All, IPVersion.V4Only
        self.zc = AsyncZeroconf(interfaces=interfaces, ip_version=version)
        if gossip_address is not None:
            key = base64.urlsafe_b64encode(service.identity.public_key).rstrip(b"=").decode()
            self.info = AsyncServiceInfo(
                MDNS_TYPE,
                f"freecall-{service.identity.node_id.hex()[:16]}.{MDNS_TYPE}",
                port=gossip_address.port,
                properties={"pk": key, "v": "1"},
                parsed_addresses=[gossip_address.host],
            )
            await self.zc.async_register_service(self.info)
        def changed(zeroconf: Any, service_type: str, name: str,
                    state_change: ServiceStateChange) -> None:
            if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
                self.service._spawn(self._resolve(service_type, name))

        self.browser = AsyncServiceBrowser(self.zc.zeroconf, MDNS_TYPE, handlers=[changed])
        log.info("mDNS: announcing and browsing %s", MDNS_TYPE)

    async def _resolve(self, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self.zc.zeroconf, 3000) or info.port is None:
            return
        raw = (info.properties or {}).get(b"pk")
        public_key: bytes | None = None
        if isinstance(raw, bytes):
            with contextlib.suppress(ValueError):
                decoded = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
                public_key = decoded if len(decoded) == 32 else None
        for address in info.parsed_addresses():
            self.service.add_seed((address, info.port), public_key, f"mDNS {name}")

    async def close(self) -> None:
        if self.browser is not None:
            await self.browser.async_cancel()
        if self.zc is not None:
            if self.info is not None:
                await self.zc.async_unregister_service(self.info)
            await self.zc.async_close()


def addresses_for(gossip: Address | None, sip: Sequence[Address]) -> tuple[Address, ...]:
    """The addresses a record announces, in order: gossip first, then SIP."""
    return ((gossip,) if gossip is not None else ()) + tuple(sip)


def announcement_for(
    identity: NodeIdentity,
    *,
    gossip: Address | None,
    sip: Sequence[Address],
    routes: Sequence[str],
    tls_key: bytes | None,
    name: str,
    openpgp_key: bytes | None = None,
) -> Announcement:
    """This node's record content: its addresses, its routes (domains first, then users) as
    far as a record's limits allow (the rest is left out with a warning), the fingerprint of
    the OpenPGP key that signs its SAS hashes, its TLS key fingerprint and its name."""
    addresses = addresses_for(gossip, sip)
    announced: list[str] = []
    for route in routes:
        try:
            norm = normalize_route(route)
        except RecordError:
            log.warning("peering: %r cannot be announced (not a domain or user@domain)", route)
            continue
        if norm not in announced:
            announced.append(norm)
    extensions: list[tuple[int, bytes]] = []
    if openpgp_key is not None:
        extensions.append((Ext.OPENPGP_FINGERPRINT, openpgp_key))
    if tls_key is not None:
        extensions.append((Ext.TLS_FINGERPRINT, tls_key))
    if name:
        extensions.append((Ext.NAME, name.encode()[:64]))
    kept = announced[:MAX_ROUTES]
    while True:
        try:  # a trial signature: the record must fit its size limit
            identity.make_record(seq=0, expires=0, addresses=addresses, routes=tuple(kept),
                                 extensions=tuple(extensions))
            break
        except RecordError:
            if not kept:
                raise
            kept.pop()
    if len(kept) < len(announced):
        left = announced[len(kept):]
        log.warning("peering: announcing %d of %d routes (a node record is limited); left "
                    "out: %s%s", len(kept), len(announced), ", ".join(left[:5]),
                    ", ..." if len(left) > 5 else "")
    return Announcement(addresses, tuple(kept), tuple(extensions))
