"""Where a node's media gathers ICE candidates: configured servers and relays of the mesh.

Configured ``media.stun`` and ``media.turn`` (UDP) come first. Relay nodes learnt from the host
cache (records with the RELAY flag and a RELAY or STUN address) add a STUN server each (up to
`MAX_STUN`) and one TURN server, with node-key credentials (freecall.relay.credentials: only
mesh nodes the relay knows get an allocation). Each node prefers its own relay among those known
(rendezvous hashing on the two node ids), so the load spreads over relays and a node keeps the
same one while the set is stable.

A node whose gathering showed a public address (its server-reflexive address is its own) takes
no relayed candidate from the mesh: peers behind NAT reach it directly, and the relays' quota
is kept for nodes that need it (RFC 8445 section 5.1.1.2 leaves the choice of servers to the
agent). A configured ``media.turn`` is always used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from ..config import HostPort
from ..config import TurnServer as TurnConfig
from ..peering.records import AddrKind, NodeIdentity, NodeRecord
from ..relay.credentials import node_key_credentials
from .bridge import IceServers
from .ice import TurnServer

MAX_STUN = 2
CREDENTIAL_TTL = 24 * 3600.0
"""Node-key TURN credentials are asked for per stream; a day covers any call."""


def _rank(own_id: bytes, record: NodeRecord) -> bytes:
    """Rendezvous (highest random weight) hashing: every node ranks relays differently."""
    return hashlib.sha256(own_id + record.node_id).digest()


def mesh_relays(records: Iterable[NodeRecord], own_id: bytes) -> list[NodeRecord]:
    """Relay records with an address to use, this node's preferred first."""
    relays = [r for r in records if r.relay and r.node_id != own_id and (
        r.addresses_of(AddrKind.RELAY) or r.addresses_of(AddrKind.STUN))]
    relays.sort(key=lambda r: _rank(own_id, r), reverse=True)
    return relays


def ice_servers(
    *,
    stun: Sequence[HostPort],
    turn: Sequence[TurnConfig],
    relays: Sequence[NodeRecord],
    identity: NodeIdentity | None,
    wall_now: float,
    behind_nat: bool | None,
) -> IceServers:
    """The servers for the next stream's gathering (module docstring)."""
    stun_out: list[tuple[str, int]] = [(s.host, s.port) for s in stun]
    turn_out: list[TurnServer] = [
        TurnServer((t.server.host, t.server.port), t.username, t.password)
        for t in turn if t.transport == "udp"
    ]
    for record in relays:
        if len(stun_out) >= len(stun) + MAX_STUN:
            break
        addresses = record.addresses_of(AddrKind.STUN) or record.addresses_of(AddrKind.RELAY)
        stun_out.append(addresses[0].addr)
    if not turn_out and identity is not None and behind_nat is not False:
        for record in relays:
            addresses = record.addresses_of(AddrKind.RELAY)
            if not addresses:
                continue
            username, password = node_key_credentials(
                identity.x25519(), identity.public_key, record.public_key,
                identity.node_id.hex(), wall_now, CREDENTIAL_TTL)
            turn_out.append(TurnServer(addresses[0].addr, username, password))
            break
    return IceServers(tuple(dict.fromkeys(stun_out)), tuple(turn_out))


__all__ = ["MAX_STUN", "ice_servers", "mesh_relays"]
