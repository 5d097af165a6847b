"""The control API of a relay node: status, peers and Prometheus metrics (issue 9, 10).

A relay has no softphones, calls or keys, so those resources answer empty lists (and 404 for
a call); what an operator watches is served: ``/api/status`` (``freecall status``),
``/api/peers`` and ``/metrics`` with the relay's allocations and traffic, and its SIP edge's
attached nodes, forwarded and refused requests and open TLS connections. The same token,
Unix socket and loopback-only default as the endpoint's API (control.* keys).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..control.api import ApiError, ControlServer, KeysProvider, load_or_create_token
from ..control.model import EventBus
from ..control.service import Exposition

if TYPE_CHECKING:
    from .daemon import RelayDaemon


class RelayControl:
    """The :class:`~freecall.control.api.Backend` of a relay node."""

    def __init__(self, daemon: RelayDaemon) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.bus = EventBus(time.time)
        self.server: ControlServer | None = None

    async def start(self) -> list[str]:
        control = self.config.control
        token = load_or_create_token(Path(control.token_file))
        self.server = ControlServer(
            self, token=token,
            listen=(control.listen.host, control.listen.port) if control.listen else None,
            socket_path=Path(control.socket) if control.socket else None,
            allow_from=control.allow_from)
        return await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        self.bus.close()

    # -- the Backend ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        daemon = self.daemon
        peering = daemon.peering
        relay = daemon.relay
        core = relay.core if relay is not None else None
        listeners = list(daemon.listening)
        if self.server is not None:
            listeners += [f"control:{b}" for b in self.server.bound]
        return {
            "version": __version__,
            "node_id": peering.identity.node_id.hex() if peering is not None else None,
            "uptime_s": round(self.loop.time() - self.started, 1),
            "listeners": listeners,
            "key_fingerprint": None,
            "role": "relay",
            "name": self.config.node.name,
            "peers": peering.known_nodes() if peering is not None else 0,
            "allocations": core.allocations if core is not None else 0,
            "sip_edge": self.sip_edge(),
        }

    def sip_edge(self) -> dict[str, Any] | None:
        """The SIP edge's figures (``/api/status`` ``sip_edge``; null when ``relay.sip`` is
        off): what its stop line logs, live."""
        daemon = self.daemon
        edge, transport = daemon.edge, daemon.sip
        if edge is None or transport is None:
            return None
        counters = transport.counters
        return {"attached": len(edge.attached), "max_attached": edge.max_attached,
                "forwarded": edge.forwarded, "refused": edge.refused,
                "attach_refused": edge.attach_refused,
                "keepalives_answered": counters.keepalives_in,
                "connections_open": sum(counters.connections_open.values()),
                "connections_refused": counters.connections_refused}

    def registrations(self) -> list[dict[str, Any]]:
        return []

    def peers(self) -> list[dict[str, Any]]:
        peering = self.daemon.peering
        return [] if peering is None else [dict(p) for p in peering.peers()]

    def calls(self) -> list[dict[str, Any]]:
        return []

    def call(self, call_id: str) -> dict[str, Any] | None:
        return None

    def hang_up(self, call_id: str) -> dict[str, Any]:
        raise ApiError(404, "a relay node has no calls")

    def confirm_sas(self, call_id: str, verified: bool) -> dict[str, Any]:
        raise ApiError(404, "a relay node has no calls")

    def keys(self) -> KeysProvider | None:
        return None

    def reload(self) -> dict[str, Any]:
        return {"applied": [], "restart_needed": ["*"], "users_added": [], "users_removed": [],
                "calls_kept": 0, "note": "a relay node applies configuration on restart"}

    def metrics(self) -> str:
        out = Exposition()
        out.add("freecall_uptime_seconds", "gauge", "Seconds since the daemon started.",
                self.loop.time() - self.started)
        relay = self.daemon.relay
        core = relay.core if relay is not None else None
        if core is not None:
            stats = core.stats
            out.add("freecall_relay_allocations", "gauge", "TURN allocations now.",
                    core.allocations)
            out.add("freecall_relay_allocations_created_total", "counter",
                    "TURN allocations made.", stats.allocations_created)
            out.add("freecall_relay_allocations_expired_total", "counter",
                    "TURN allocations that expired without a refresh.",
                    stats.allocations_expired)
            out.add("freecall_relay_requests_total", "counter", "STUN/TURN requests.",
                    stats.requests)
            out.add("freecall_relay_errors_total", "counter",
                    "STUN/TURN error responses (401 challenges included).", stats.errors)
            out.add("freecall_relay_dropped_total", "counter",
                    "Datagrams discarded: not STUN, malformed, no permission, over bandwidth.",
                    stats.dropped)
            out.add("freecall_relay_packets_total", "counter", "Datagrams relayed.",
                    stats.relayed_packets)
            out.add("freecall_relay_bytes_total", "counter", "Bytes relayed.",
                    stats.relayed_bytes)
        edge = self.sip_edge()
        if edge is not None:
            out.add("freecall_relay_sip_attached", "gauge",
                    "Nodes attached to the SIP edge now (relay.max_attached at most).",
                    edge["attached"])
            out.add("freecall_relay_sip_forwarded_total", "counter",
                    "Requests the SIP edge forwarded to or from an attached node.",
                    edge["forwarded"])
            out.add("freecall_relay_sip_refused_total", "counter",
                    "Requests the SIP edge refused (403 routed elsewhere, 404 node not "
                    "attached, 483).", edge["refused"])
            out.add("freecall_relay_sip_attach_refused_total", "counter",
                    "Attaching REGISTERs refused (no or bad proof, table full).",
                    edge["attach_refused"])
            out.add("freecall_relay_sip_keepalives_total", "counter",
                    "RFC 5626 CRLF pings answered on the SIP edge.",
                    edge["keepalives_answered"])
            out.add("freecall_relay_sip_connections", "gauge",
                    "TLS connections open on the SIP edge.", edge["connections_open"])
        peering = self.daemon.peering
        out.add("freecall_peers", "gauge", "Nodes in the host cache.",
                peering.known_nodes() if peering is not None else 0)
        gossip = peering.gossip if peering is not None else None
        if gossip is not None:
            out.labelled("freecall_gossip_events_total", "counter",
                         "Gossip traffic and drops by kind (docs/peering.md).",
                         {(("kind", k),): v for k, v in sorted(gossip.stats.items())})
        return out.text()
