"""Node-key TURN credentials (relay/credentials.py): a node derives its password from its own
node key and the relay's; the relay from the node's host-cache record. No shared secret."""

from __future__ import annotations

from collections.abc import Callable

from freecall.peering.records import NodeIdentity
from freecall.relay.credentials import node_key_credentials, node_key_secret
from freecall.relay.server import RelayServer
from freecall.relay.stun import Class
from turnclient import WALL, Client, error_of, make_server

RELAY = NodeIdentity.from_seed(bytes(range(32)))
NODE = NodeIdentity.from_seed(bytes(range(1, 33)))
STRANGER = NodeIdentity.from_seed(bytes(range(2, 34)))


def relay_lookup(known: dict[str, bytes]) -> Callable[[str], bytes | None]:
    def node_secret(node: str) -> bytes | None:
        public = known.get(node)
        if public is None:
            return None
        return node_key_secret(RELAY.x25519(), RELAY.public_key, public)
    return node_secret


def client_for(identity: NodeIdentity, server: RelayServer, ttl: float = 3600) -> Client:
    node = identity.node_id.hex()
    username, password = node_key_credentials(
        identity.x25519(), identity.public_key, RELAY.public_key, node, WALL, ttl)
    expiry = int(username.split(":")[0])
    return Client(server, node=node, expiry=expiry, password=password)


def test_both_sides_derive_the_same_secret() -> None:
    mine = node_key_secret(NODE.x25519(), NODE.public_key, RELAY.public_key)
    theirs = node_key_secret(RELAY.x25519(), RELAY.public_key, NODE.public_key)
    assert mine == theirs and len(mine) == 32
    assert node_key_secret(STRANGER.x25519(), STRANGER.public_key, RELAY.public_key) != mine


def test_a_known_node_allocates_with_its_node_key() -> None:
    server, _ = make_server(node_secret=relay_lookup({NODE.node_id.hex(): NODE.public_key}))
    client = client_for(NODE, server)
    response = client.allocate()
    assert response.cls == Class.SUCCESS, error_of(response)
    assert server.allocations == 1


def test_unknown_nodes_and_forged_keys_are_refused() -> None:
    known = {NODE.node_id.hex(): NODE.public_key}
    server, _ = make_server(node_secret=relay_lookup(known))
    # a node the relay does not know (no record in its host cache)
    assert error_of(client_for(STRANGER, server).allocate()) == 401
    # a stranger claiming the known node's id, with its own key
    forged = client_for(STRANGER, server)
    forged.node = NODE.node_id.hex()
    assert error_of(forged.allocate()) == 401
    assert server.allocations == 0


def test_expired_node_credentials_are_refused() -> None:
    server, _ = make_server(node_secret=relay_lookup({NODE.node_id.hex(): NODE.public_key}))
    assert error_of(client_for(NODE, server, ttl=-10).allocate()) == 401


def test_shared_secret_credentials_still_work_beside_node_keys() -> None:
    server, _ = make_server(node_secret=relay_lookup({}))
    response = Client(server).allocate()
    assert response.cls == Class.SUCCESS, error_of(response)
