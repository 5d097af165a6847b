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
import signal
import time

from freecall import __version__
from freecall.config import Config
from freecall.netaddr import own_address
from freecall.ops.sdnotify import Notifier
from freecall.peering.gossip import GossipConfig
from freecall.peering.records import NODE_ID_SIZE, Address, AddrKind, Flag, NodeIdentity
from freecall.peering.service import Announcement, PeeringService, announcement_for

from .control import RelayControl
from .credentials import load_or_create_secret, node_key_secret
from .server import TurnSettings
from .service import RelayService

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
        if config.peering.listen is not None:
            self.peering = await self._start_peering(public, bound[1])
            if self.peering.bound is not None:
                host, port = self.peering.bound
                listening.append(f"udp:{host}:{port} (gossip)")
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

    async def _start_peering(self, public: str, relay_port: int) -> PeeringService:
        """Join the mesh as a seed that announces STUN and TURN (flags and addresses)."""
        config = self.config
        listen = config.peering.listen
        assert listen is not None
        gossip_host = public if ipaddress.ip_address(listen.host).is_unspecified else listen.host
        identity = NodeIdentity.load_or_create(config.state_dir)
        base = announcement_for(
            identity, gossip=Address(AddrKind.GOSSIP, gossip_host, listen.port), sip=[],
            routes=[], tls_key=None, name=config.node.name)
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
        if self.relay is not None:
            self.relay.close()
        self.notifier.close()
        log.info("freecall stopped")
