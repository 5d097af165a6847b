"""Which STUN and TURN servers a stream gathers from (freecall.srtp.iceservers): configured
ones first, then the mesh's relays from the host cache with node-key credentials the relay
itself can check (freecall.relay.credentials)."""

from __future__ import annotations

import base64
import time

from freecall.config import HostPort
from freecall.config import TurnServer as TurnConfig
from freecall.peering.records import Address, AddrKind, Flag, NodeIdentity, NodeRecord
from freecall.relay.credentials import node_key_password, node_key_secret, parse_username
from freecall.srtp.iceservers import ice_servers, mesh_relays, prefer


def _relay(number: int) -> tuple[NodeIdentity, NodeRecord]:
    identity = NodeIdentity.generate()
    host = f"198.51.100.{number}"
    record = identity.make_record(
        seq=1, expires=int(time.time()) + 3600,
        addresses=(Address(AddrKind.STUN, host, 3478), Address(AddrKind.RELAY, host, 3478)),
        flags=Flag.RELAY | Flag.STUN)
    return identity, record


def test_mesh_relays_are_ranked_per_node_and_need_an_address() -> None:
    me = NodeIdentity.generate()
    relays = [_relay(i)[1] for i in range(1, 6)]
    plain = NodeIdentity.generate().make_record(seq=1, expires=int(time.time()) + 3600)
    ranked = mesh_relays([*relays, plain], me.node_id)
    assert sorted(r.node_id for r in ranked) == sorted(r.node_id for r in relays)
    assert mesh_relays(reversed(relays), me.node_id) == ranked  # order-independent
    other = mesh_relays(relays, NodeIdentity.generate().node_id)
    assert len(other) == 5  # (another node usually prefers another relay: rendezvous hashing)


def test_prefer_moves_a_relay_first_like_ranking_with_it() -> None:
    me = NodeIdentity.generate()
    relays = [_relay(i)[1] for i in range(1, 6)]
    ranked = mesh_relays(relays, me.node_id)
    for chosen in relays:
        assert prefer(ranked, chosen.node_id) == mesh_relays(relays, me.node_id, chosen.node_id)
        assert prefer(ranked, chosen.node_id)[0] == chosen
    assert prefer(ranked, None) == ranked
    assert prefer(ranked, b"\x00" * 32) == ranked  # a relay no longer listed changes nothing


def test_a_node_behind_nat_gets_its_relay_with_credentials_the_relay_can_check() -> None:
    me = NodeIdentity.generate()
    relay_identity, record = _relay(1)
    servers = ice_servers(stun=[HostPort("192.0.2.1", 3478)], turn=[], relays=[record],
                          identity=me, wall_now=1_700_000_000.0, behind_nat=None)
    assert servers.stun == (("192.0.2.1", 3478), ("198.51.100.1", 3478))
    [turn] = servers.turn
    assert turn.addr == ("198.51.100.1", 3478)
    parsed = parse_username(turn.username)
    assert parsed is not None and parsed[1] == me.node_id.hex()
    # the relay derives the same password from its own key and ours (relay/daemon.py)
    secret = node_key_secret(relay_identity.x25519(), relay_identity.public_key, me.public_key)
    assert turn.password == node_key_password(secret, turn.username)
    assert base64.b64decode(turn.password)


def test_a_public_node_takes_no_relay_but_a_configured_turn_server_always() -> None:
    me = NodeIdentity.generate()
    _, record = _relay(1)
    servers = ice_servers(stun=[], turn=[], relays=[record], identity=me,
                          wall_now=time.time(), behind_nat=False)
    assert servers.turn == () and servers.stun == (("198.51.100.1", 3478),)
    configured = TurnConfig(HostPort("203.0.113.9", 3478), "udp", "user", "pw")
    tcp = TurnConfig(HostPort("203.0.113.10", 443), "tcp", "user", "pw")
    servers = ice_servers(stun=[], turn=[configured, tcp], relays=[record], identity=me,
                          wall_now=time.time(), behind_nat=False)
    assert [t.addr for t in servers.turn] == [("203.0.113.9", 3478)]  # UDP only for now
