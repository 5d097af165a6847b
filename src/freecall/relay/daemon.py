"""``freecall run --role relay``: the headless relay node.

STUN and TURN on ``relay.listen`` (:mod:`freecall.relay.service`) and, unless ``peering.listen``
is null, the gossip host cache, so the relay is also a seed other nodes bootstrap from. Its node
record carries the RELAY and STUN flags and the STUN/TURN address. No softphone listener, no
media bridge, no OpenPGP key: a relay sees only SRTP and never signs anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import signal
import time

from freecall import __version__
from freecall.config import Config
from freecall.netaddr import own_address
from freecall.ops.sdnotify import Notifier
from freecall.peering.gossip import GossipConfig
from freecall.peering.records import (
    NODE_ID_SIZE,
    Address,
    AddrKind,
    Flag,
    NodeIdentity,
    NodeRecord,
)
from freecall.peering.service import Announcement, PeeringService, announcement_for
from freecall.sip.errors import SipParseError
from freecall.sip.flow import Flow
from freecall.sip.message import Request, make_error_response, parse_message
from freecall.sip.ratelimit import Decision, SourceLimiter
from freecall.tls import certificate_fingerprint, client_context, make_self_signed, server_context
from freecall.transport import SipTransport, Timer, TransportOptions

from .control import RelayControl
from .credentials import load_or_create_secret, node_key_secret
from .server import TurnSettings
from .service import RelayService
from .sipedge import SipEdge

__all__ = ["RelayDaemon", "public_address"]

log = logging.getLogger("freecall")

STATS_INTERVAL = 300.0  # one line of relay counters in the log this often
NODE_SECRETS_KEPT = 4096  # node-key credential secrets remembered (one X25519 each)


def public_address(config: Config) -> str:
    """The relay's public IP (``relay.address``'s documented order)."""
    relay = config.relay
    if relay.address:
        return relay.address
    if not ipaddress.ip_address(relay.listen.host).is_unspecified:
        return relay.listen.host
    advertise = config.sip.advertise
    if advertise:
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(advertise))
    v6 = relay.listen.family.name == "AF_INET6"
    return own_address(6 if v6 else 4) or ("::1" if v6 else "127.0.0.1")


class RelayDaemon:
    """One relay node (module docstring)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.relay: RelayService | None = None
        self.peering: PeeringService | None = None
        self._stopping = asyncio.Event()
        self._stats_task: asyncio.Task[None] | None = None
        self._node_secrets: dict[str, bytes] = {}
        self.notifier = Notifier()
        """systemd's Type=notify (the same units as the endpoint, freecall.ops.units)."""
        self.listening: list[str] = []
        self.control: RelayControl | None = None
        """``/api/status``, ``/api/peers`` and ``/metrics`` (control.* keys)."""
        self.sip: SipTransport | None = None
        """The SIP edge's TLS listener (``relay.sip``), for attached nodes only."""
        self.edge: SipEdge | None = None
        self._edge_timer: Timer | None = None
        self._limiter: SourceLimiter | None = None

    async def start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stopping.set)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        relay = config.relay
        secret = load_or_create_secret(relay.secret_file)
        public = public_address(config)
        settings = TurnSettings(
            realm=relay.realm,
            secret=secret,
            software=f"freecall {__version__}",
            allow_peers=tuple(relay.allow_peers),
            max_allocations=relay.max_allocations,
            allocations_per_user=relay.allocations_per_user,
            bandwidth=relay.bandwidth_kbps * 125,  # kbit/s -> bytes/s
            max_lifetime=relay.max_lifetime,
            max_permissions=relay.max_permissions,
            wall_offset=time.time() - loop.time(),
            node_secret=self._node_secret if config.peering.listen is not None else None,
        )
        service = RelayService(settings, (relay.listen.host, relay.listen.port), public,
                               relay.ports)
        bound = await service.start()
        self.relay = service
        listening = [f"udp:{bound[0]}:{bound[1]} (STUN, TURN)"]
        sip_port: int | None = None
        tls_key: bytes | None = None
        if relay.sip is not None and config.peering.listen is not None:
            sip_port, tls_key = await self._start_sip(loop)
            listening.append(f"tls:{relay.sip.host}:{sip_port} (SIP edge)")
        elif relay.sip is not None:
            log.info("relay: no SIP edge (relay.sip needs peering: attached nodes are found "
                     "in the host cache)")
        if config.peering.listen is not None:
            self.peering = await self._start_peering(public, bound[1], sip_port, tls_key)
            if self.peering.bound is not None:
                host, port = self.peering.bound
                listening.append(f"udp:{host}:{port} (gossip)")
            if self.sip is not None and sip_port is not None and tls_key is not None:
                self._start_edge(public, sip_port, tls_key)
        self.listening = list(listening)
        self._stats_task = asyncio.ensure_future(self._log_stats())
        self.control = RelayControl(self)
        bound_control = await self.control.start()
        if bound_control:
            log.info("control API on %s", ", ".join(bound_control))
        log.info("relay: public address %s, realm %s, relayed ports %s, shared secret in %s",
                 public, relay.realm, relay.ports, relay.secret_file)
        log.info("freecall %s node %s listening on %s; role: relay", __version__,
                 config.node.name, ", ".join(listening))
        self.notifier.ready("relay on " + ", ".join(listening))
        self.notifier.start_watchdog(loop)

    async def _start_sip(self, loop: asyncio.AbstractEventLoop) -> tuple[int, bytes]:
        """The SIP edge's TLS listener with the node's TLS identity (docs/relay.md)."""
        config = self.config
        spec = config.relay.sip
        assert spec is not None
        tls = config.sip.tls
        certificate = make_self_signed(tls.certificate, tls.private_key, config.node.name)
        tls_key = bytes.fromhex(certificate_fingerprint(certificate))
        sec = config.security
        if sec.rate_limit:
            self._limiter = SourceLimiter(sec.rate_limit, sec.rate_window, sec.rate_block,
                                          max_sources=sec.max_sources)
        transport = SipTransport(
            [spec], self._on_sip, on_flow_closed=self._on_sip_closed,
            on_framing_error=None,
            server_ssl=server_context(tls.certificate, tls.private_key),
            client_ssl=client_context(tls.certificate, tls.private_key),
            options=TransportOptions(max_message_size=config.sip.max_message_size))
        bound = await transport.start()
        self.sip = transport
        self._edge_timer = Timer(loop, self._on_edge_timer)
        return bound[0].port, tls_key

    def _start_edge(self, public: str, port: int, tls_key: bytes) -> None:
        assert self.peering is not None and self.sip is not None
        config = self.config
        spec = config.relay.sip
        host = public if spec is None or spec.is_wildcard else spec.host
        self.sip.peer_key_check = self.peering.tls_key_ok
        self.edge = SipEdge(host=host, port=port, node_id=self.peering.identity.node_id,
                            tls_fingerprint=tls_key,
                            secret=self.peering.identity.sign(b"freecall-relay-sip-edge-v1"),
                            records_for=self.peering.records_for,
                            max_attached=config.relay.max_attached,
                            server=f"freecall {__version__}", alive=self.sip.is_open,
                            record_of=self._record_of)
        log.info("relay: SIP edge on tls:%s:%d for attached nodes, TLS key sha256:%s", host,
                 port, tls_key.hex())

    def _record_of(self, node_id: bytes) -> NodeRecord | None:
        gossip = self.peering.gossip if self.peering is not None else None
        return gossip.cache.get(node_id) if gossip is not None else None

    def _on_sip(self, data: bytes, flow: Flow, now: float) -> None:
        """One message on the SIP edge: rate limit, parse, forward (relay.sipedge)."""
        transport, edge = self.sip, self.edge
        if transport is None:
            return
        if self._limiter is not None and self._limiter.check(str(flow.remote[0]), now) \
                is not Decision.PASS:
            return
        try:
            msg = parse_message(data, datagram=False)
        except SipParseError as error:
            answer = make_error_response(error, f"freecall {__version__}")
            if answer is not None:
                transport.send(answer, flow)
            if error.fatal:
                transport.close_flow(flow)
            return
        if edge is None:
            return
        try:
            out = edge.receive(msg, flow, now, time.time())
        except (LookupError, ValueError) as error:
            log.info("SIP edge: dropped a message from %s: %s", flow, error)
            return
        for payload, target in out:
            transport.send(payload, target)
        if isinstance(msg, Request) and msg.method == "REGISTER" and flow.conn is not None \
                and any(a.flow.conn == flow.conn for a in edge.attached.values()):
            transport.keep_alive(flow.conn, math.inf)  # the node's pings keep it, RFC 5626
        if self._edge_timer is not None:
            self._edge_timer.arm(edge.get_timer())

    def _on_sip_closed(self, flow: Flow) -> None:
        if self.edge is not None:
            for node in self.edge.flow_closed(flow):
                log.info("node %s detached: its connection closed", node.hex()[:16])

    def _on_edge_timer(self, now: float) -> None:
        if self.edge is None:
            return
        for node in self.edge.handle_timer(now):
            log.info("node %s detached: its attachment expired", node.hex()[:16])
        if self._edge_timer is not None:
            self._edge_timer.arm(self.edge.get_timer())

    def _node_secret(self, node: str) -> bytes | None:
        """Node-key TURN credentials (relay.credentials): the secret shared with the node whose
        id is ``node`` (hex), if its record is in our host cache. One X25519 per node, kept."""
        secret = self._node_secrets.get(node)
        if secret is not None:
            return secret
        peering = self.peering
        if peering is None or peering.gossip is None or len(node) != 2 * NODE_ID_SIZE:
            return None
        try:
            node_id = bytes.fromhex(node)
        except ValueError:
            return None
        record = peering.gossip.cache.get(node_id)  # a full node id: only that node's record
        if record is None:
            return None
        identity = peering.identity
        secret = node_key_secret(identity.x25519(), identity.public_key, record.public_key)
        if len(self._node_secrets) >= NODE_SECRETS_KEPT:
            self._node_secrets.pop(next(iter(self._node_secrets)))
        self._node_secrets[node] = secret
        return secret

    def _on_sighup(self) -> None:
        """``systemctl reload``: a relay has nothing to apply live yet; it says so instead of
        dying of the signal's default action."""
        self.notifier.reloading()
        log.info("reload: a relay node applies configuration changes on restart only")
        self.notifier.ready("relay (reload: restart to apply changes)")

    async def _start_peering(self, public: str, relay_port: int, sip_port: int | None = None,
                             tls_key: bytes | None = None) -> PeeringService:
        """Join the mesh as a seed that announces STUN and TURN (flags and addresses), and
        the SIP edge with its TLS key when it is on."""
        config = self.config
        listen = config.peering.listen
        assert listen is not None
        gossip_host = public if ipaddress.ip_address(listen.host).is_unspecified else listen.host
        identity = NodeIdentity.load_or_create(config.state_dir)
        base = announcement_for(
            identity, gossip=Address(AddrKind.GOSSIP, gossip_host, listen.port),
            sip=[Address(AddrKind.SIP_TLS, public, sip_port)] if sip_port is not None else [],
            routes=[], tls_key=tls_key, name=config.node.name)
        announcement = Announcement(
            addresses=(*base.addresses, Address(AddrKind.STUN, public, relay_port),
                       Address(AddrKind.RELAY, public, relay_port)),
            routes=base.routes,
            extensions=base.extensions,
            flags=Flag.RELAY | Flag.STUN,
        )
        peering = config.peering
        service = PeeringService(
            identity,
            announcement,
            listen=(listen.host, listen.port),
            state_dir=config.state_dir,
            config=GossipConfig(interval=peering.interval, group_bits=peering.group_bits,
                                capacity=peering.capacity),
            seeds=[(seed.host, seed.port) for seed in peering.seeds],
            srv_domain=peering.srv_domain,
            mdns=peering.mdns,
            dns=None,
            dns_timeout=config.dns.timeout,
        )
        await service.start()
        return service

    async def _log_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            self._log_counters("")

    def _log_counters(self, when: str) -> None:
        """One line with the relay's counters: every STATS_INTERVAL, and the totals at stop."""
        if self.relay is not None and self.relay.core is not None:
            core = self.relay.core
            s = core.stats
            log.info("relay%s: %d allocation(s); relayed %d packets, %d bytes; %d requests, "
                     "%d errors, %d dropped", when, core.allocations, s.relayed_packets,
                     s.relayed_bytes, s.requests, s.errors, s.dropped)
        if self.edge is not None and self.sip is not None:
            edge, counters = self.edge, self.sip.counters
            log.info("relay SIP edge%s: %d node(s) attached; %d forwarded, %d refused, "
                     "%d attach(es) refused; %d keep-alive ping(s) answered", when,
                     len(edge.attached), edge.forwarded, edge.refused, edge.attach_refused,
                     counters.keepalives_in)

    async def run(self) -> None:
        await self._stopping.wait()
        await self.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        self.notifier.stopping()
        if self.control is not None:
            await self.control.stop()
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self.peering is not None:
            await self.peering.stop()
        self._log_counters(" at stop")
        if self._edge_timer is not None:
            self._edge_timer.cancel()
        if self.sip is not None:
            await self.sip.close()
        if self.relay is not None:
            self.relay.close()
        self.notifier.close()
        log.info("freecall stopped")
