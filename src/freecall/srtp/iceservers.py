"""Where a node's media gathers ICE candidates: configured servers and relays of the mesh.

Configured ``media.stun`` and ``media.turn`` (UDP) come first. Relay nodes learnt from the host
cache (records with the RELAY flag and a RELAY or STUN address) add a STUN server each (up to
`MAX_STUN`) and one TURN server, with node-key credentials (freecall.relay.credentials: only
mesh nodes the relay knows get an allocation). Relays come in the node's one order of
preference (freecall.peering.nat.rank_relays: the relay its signalling is attached to first,
then rendezvous hashing on the two node ids), so the load spreads over relays, a node keeps the
same one while the set is stable, and its media and its signalling go through the same relay.

A node that is not behind NAT (the one verdict of freecall.peering.nat.NatView: node-level
STUN, else the media gathering) takes no relayed candidate from the mesh: peers behind NAT reach
it directly, and the relays' quota is kept for nodes that need it (RFC 8445 section 5.1.1.2
leaves the choice of servers to the agent). A configured ``media.turn`` is always used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..config import HostPort
from ..config import TurnServer as TurnConfig
from ..peering.nat import rank_relays
from ..peering.records import AddrKind, NodeIdentity, NodeRecord
from ..relay.credentials import node_key_credentials
from .bridge import IceServers
from .ice import TurnServer

MAX_STUN = 2
CREDENTIAL_TTL = 24 * 3600.0
"""Node-key TURN credentials are asked for per stream; a day covers any call."""


def mesh_relays(records: Iterable[NodeRecord], own_id: bytes,
                preferred: bytes | None = None) -> list[NodeRecord]:
    """Relay records with an address to use, in the node's order (``preferred``: the relay
    its signalling is attached to, else ``nat.relay``)."""
    return [r for r in rank_relays(records, own_id, preferred)
            if r.addresses_of(AddrKind.RELAY) or r.addresses_of(AddrKind.STUN)]


def prefer(ranked: Sequence[NodeRecord], preferred: bytes | None) -> list[NodeRecord]:
    """``ranked`` (a :func:`mesh_relays` list without ``preferred``) with the relay
    ``preferred`` moved first: the same list as ``mesh_relays(..., preferred)`` without
    hashing again, since rank_relays' last step is this stable sort."""
    if preferred is None:
        return list(ranked)
    return sorted(ranked, key=lambda r: r.node_id != preferred)


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


__all__ = ["MAX_STUN", "ice_servers", "mesh_relays", "prefer"]
