"""The asyncio edge of :mod:`freecall.peering.nat`: node-level STUN and the kept relay flow.

:class:`NatService` asks STUN servers (``media.stun`` and the STUN/relay nodes of the host
cache) for the node's public address from one UDP socket, publishes it in the node record
(AddrKind.REFLEXIVE), gives its classification to the node's one verdict
(:class:`~freecall.peering.nat.NatView`, which the media engine's gathering informs too) and,
when that verdict says behind NAT (``nat.attach``), drives a
:class:`~freecall.peering.nat.RelayLink` over the daemon's own :class:`SipTransport`: the TLS
connection to the relay is an ordinary transport connection, so the requests the relay forwards
over it reach the proxy like any other, and their responses go back over it (RFC 3261 section
18.2.2). The attaching REGISTER's responses are claimed here before the transaction layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ..config import NatConfig
from ..sip.flow import Flow
from ..sip.message import Response
from ..transport import SipTransport, Timer
from .nat import (
    ATTACH_HEADER,
    UNKNOWN,
    Close,
    Connect,
    NatStatus,
    NatView,
    Publish,
    RelayLink,
    SendPing,
    SendRegister,
    attach_proof,
    binding_request,
    classify,
    mapped_address,
    rank_relays,
    relay_candidates,
)
from .records import AddrKind, Flag, NodeIdentity, RelayVia
from .service import PeeringService

log = logging.getLogger("freecall.nat")

STUN_TIMEOUT = 3.0
STUN_SERVERS = 3  # at most this many asked per probe (two tell the mapping behaviour)
IDLE_CHECK = 5.0  # while behind NAT and not attached: look for relays in the cache this often
RECHECK_MIN = 60.0
"""A gathering that contradicts STUN's answer brings the next probe forward, to no sooner than
this after the last one (a disagreement that persists does not turn into a probe per call)."""


class NatService:
    """Node-level STUN and the relay link of one endpoint (module docstring)."""

    def __init__(self, config: NatConfig, *, transport: SipTransport, peering: PeeringService,
                 identity: NodeIdentity, stun: Sequence[tuple[str, int]],
                 is_local: Callable[[str], bool], sent_by: str,
                 clock: Callable[[], float] = time.time, view: NatView | None = None) -> None:
        self.config = config
        self.transport = transport
        self.peering = peering
        self.identity = identity
        self.stun = list(stun)
        self.is_local = is_local
        self.sent_by = sent_by
        self.clock = clock
        self.rng = random.SystemRandom()
        self.view = view if view is not None else NatView()
        """The node's one "behind NAT?" verdict: ours when STUN answers, else the media's."""
        self.view.listeners.append(self._wake_up)
        self._wake = asyncio.Event()
        self._last_probe: float | None = None
        self.link = RelayLink(self.rng, keepalive=config.keepalive, expires=config.expires,
                              retry_base=config.retry_base, retry_max=config.retry_max)
        self.flow: Flow | None = None
        self._branch: str | None = None
        self._call_id = uuid.uuid4().hex
        self._cseq = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: Timer | None = None
        self._preferred = bytes.fromhex(config.relay) if config.relay else None

    # -- life cycle -----------------------------------------------------------------------
    @property
    def status(self) -> NatStatus:
        """What node-level STUN found (the verdict itself is :attr:`view`)."""
        return self.view.stun

    def preferred_relay(self) -> bytes | None:
        """The relay this node prefers for everything (rank_relays' ``preferred``): the one its
        signalling is attached to, else ``nat.relay``."""
        published = self.link.published
        return published.node_id if published is not None else self._preferred

    def _wake_up(self) -> None:
        """The verdict changed (or a gathering contradicted STUN): look again now."""
        self._wake.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = Timer(loop, self._on_timer)
        self.transport.on_flow_opened = self._opened
        self.transport.on_pong = self._pong
        self._spawn(self._run())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        """Probe now and every ``probe_interval``; in between, look for relays while one is
        wanted and none is attached, and at once when the verdict changes."""
        loop = asyncio.get_running_loop()
        next_probe = loop.time()
        while True:
            if self.view.recheck and self.config.stun and self._last_probe is not None:
                next_probe = min(next_probe, self._last_probe + RECHECK_MIN)
            if loop.time() >= next_probe:
                if self.config.stun:
                    self._last_probe = loop.time()
                    await self.probe()
                # no answer yet (no server known before gossip found one): ask again soon
                next_probe = loop.time() + (self.config.probe_interval
                                            if self.status.public is not None or not
                                            self.config.stun else IDLE_CHECK)
            self._choose_relays()
            self._wake.clear()
            wait = (IDLE_CHECK if self.link.state in ("idle", "waiting")
                    else min(self.config.probe_interval, 60.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, min(
                    wait, next_probe - loop.time())))

    # -- STUN (RFC 5389 section 7) ---------------------------------------------------------
    def stun_servers(self) -> list[tuple[str, int]]:
        """``media.stun``, then STUN/relay nodes of the host cache (their STUN address) in the
        node's one order of preference (rank_relays: its own relay first)."""
        out = list(self.stun)
        for record in rank_relays(self.peering.records(), self.identity.node_id,
                                  self.preferred_relay(), flags=Flag.STUN | Flag.RELAY):
            for address in record.addresses_of(AddrKind.STUN):
                if address.addr not in out:
                    out.append(address.addr)
        return out[:STUN_SERVERS]

    async def probe(self) -> NatStatus:
        """Ask each server from one socket (retransmitting at 0.5, 1.5 s: RFC 5389 section
        7.2.1's RTO doubling), classify what came back, publish it."""
        self.view.recheck = False
        servers = self.stun_servers()
        if not servers:
            return self.status
        loop = asyncio.get_running_loop()
        answers: dict[tuple[str, int], tuple[str, int]] = {}
        waiting: dict[bytes, tuple[str, int]] = {}
        done = loop.create_future()

        class Probe(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
                for tid, server in list(waiting.items()):
                    mapped = mapped_address(data, tid)
                    if mapped is not None:
                        answers[server] = mapped
                        del waiting[tid]
                if not waiting and not done.done():
                    done.set_result(None)

        family = socket.AF_INET6 if ":" in servers[0][0] else socket.AF_INET
        try:
            transport, _ = await loop.create_datagram_endpoint(Probe, family=family,
                                                               local_addr=None)
        except OSError as exc:
            log.warning("STUN: no socket: %s", exc)
            return self.status
        try:
            requests = {}
            for server in servers:
                tid = os.urandom(12)
                waiting[tid] = server
                requests[tid] = (binding_request(tid), server)
            for delay in (0.0, 0.5, 1.0):
                if delay:  # the next retransmission, unless every server answered by then
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(done), delay)
                if done.done():
                    break
                for tid in list(waiting):
                    data, server = requests[tid]
                    with contextlib.suppress(OSError):
                        transport.sendto(data, server)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), STUN_TIMEOUT)
        finally:
            transport.close()
        mappings = [answers[s] for s in servers if s in answers]
        status = classify(mappings, self.is_local) if mappings else UNKNOWN
        if status != self.status:
            log.info("STUN: public address %s, %s, mapping %s (asked %s)",
                     f"{status.public[0]}:{status.public[1]}" if status.public else "unknown",
                     "behind NAT" if status.behind_nat else "not behind NAT"
                     if status.behind_nat is False else "NAT unknown", status.mapping,
                     ", ".join(f"{h}:{p}" for h, p in servers))
        if mappings or self.status.public is None:
            self.view.from_stun(status)
        self._publish_reflexive()
        return self.status

    def _publish_reflexive(self) -> None:
        """The record's reflexive address follows the one verdict (STUN's mapping, else the
        media gathering's), so the record never says otherwise than ``/api/status``."""
        view = self.view
        self.peering.set_nat(reflexive=view.public if view.behind_nat else None)

    # -- the relay link --------------------------------------------------------------------
    def _choose_relays(self) -> None:
        self._publish_reflexive()
        mode = self.config.attach
        wanted = mode == "always" or (mode == "auto" and self.view.behind_nat is True)
        relays = relay_candidates(self.peering.records(), self.identity.node_id,
                                  self._preferred) if wanted else []
        if relays or not wanted or self.link.state not in ("idle", "waiting"):
            self.link.want(relays, self._now())
            self._drive()

    def _now(self) -> float:
        return self.transport.loop.time()

    def _drive(self) -> None:
        link = self.link
        while (action := link.next_action()) is not None:
            if isinstance(action, Connect):
                relay = action.relay
                log.info("attaching to relay %s at %s:%d", relay.node_id.hex()[:16], relay.host,
                         relay.port)
                self.flow = self.transport.connect("tls", (relay.host, relay.port))
                if self.flow is None:
                    link.lost("cannot connect", self._now())
            elif isinstance(action, SendRegister):
                self._register(action.relay)
            elif isinstance(action, SendPing):
                if self.flow is None or self.flow.conn is None or not self.transport.ping(
                        self.flow.conn):
                    link.lost("connection gone", self._now())
            elif isinstance(action, Close):
                log.info("relay link: %s", action.reason)
                if self.flow is not None and self.flow.conn is not None:
                    self.transport.close_conn(self.flow.conn)
                self.flow = None
            elif isinstance(action, Publish):
                self._publish(action.relay)
        if self._timer is not None:
            self._timer.arm(link.get_timer())

    def _publish(self, relay: RelayVia | None) -> None:
        if relay is not None:
            log.info("attached to relay %s at %s:%d: calls reach us through it",
                     relay.node_id.hex()[:16], relay.host, relay.port)
            if self.flow is not None and self.flow.conn is not None:
                # RFC 5626: the node keeps the flow; its pings, not idleness, decide its end
                self.transport.keep_alive(self.flow.conn, float("inf"))
        self.peering.set_nat(relay=relay)

    def _register(self, relay: RelayVia) -> None:
        flow = self.flow
        if flow is None:
            return
        self._cseq += 1
        self._branch = f"z9hG4bK{uuid.uuid4().hex[:20]}"
        host = f"[{relay.host}]" if ":" in relay.host else relay.host
        user = self.identity.node_id.hex()
        proof = attach_proof(self.identity, relay.tls_fingerprint, self.clock())
        lines = [
            f"REGISTER sip:{host}:{relay.port};transport=tls SIP/2.0",
            f"Via: SIP/2.0/TLS {self.sent_by};branch={self._branch}",
            "Max-Forwards: 70",
            f"From: <sip:{user}@{host}>;tag={self._call_id[:12]}",
            f"To: <sip:{user}@{host}>",
            f"Call-ID: {self._call_id}",
            f"CSeq: {self._cseq} REGISTER",
            f"Contact: <sip:{user}@{self.sent_by};transport=tls>",
            f"Expires: {int(self.config.expires)}",
            "Supported: outbound",
            f"{ATTACH_HEADER}: {proof}",
            "Content-Length: 0",
        ]
        self.transport.send(("\r\n".join(lines) + "\r\n\r\n").encode(), flow)

    # -- inputs from the transport and the daemon ------------------------------------------
    def response(self, response: Response, flow: Flow) -> bool:
        """A response that may answer our attaching REGISTER: True when it was ours."""
        if self._branch is None or response.cseq.method != "REGISTER":
            return False
        if response.via.branch != self._branch:
            return False
        if response.status < 200:
            return True
        self._branch = None
        if self.flow is None or flow.conn != self.flow.conn:
            return True  # an answer on a connection we gave up
        if not 200 <= response.status < 300:
            log.warning("relay refused the attachment: %d %s", response.status,
                        response.reason)
        self.link.registered(response.status, response.expires, self._now())
        self._drive()
        return True

    def _opened(self, flow: Flow) -> None:
        if self.flow is not None and flow.conn == self.flow.conn:
            self.flow = flow
            self.link.connected(self._now())
            self._drive()

    def flow_closed(self, flow: Flow) -> None:
        if self.flow is not None and flow.conn == self.flow.conn:
            self.flow = None
            log.info("relay link: the connection closed")
            self.link.lost("connection closed", self._now())
            self._drive()

    def _pong(self, conn: int) -> None:
        if self.flow is not None and conn == self.flow.conn:
            self.link.pong(self._now())
            self._drive()

    def _on_timer(self, now: float) -> None:
        self.link.handle_timer(now)
        self._drive()

    def summary(self) -> dict[str, object]:
        """``/api/status`` ``nat``."""
        return {**self.view.summary(), "attach": self.config.attach,
                "relay_link": self.link.summary(self._now())}
