"""The STUN/TURN core on virtual time: every method, error codes, expiry, quotas, credentials,
bounded state under floods of bogus requests, and hostile bytes."""

from __future__ import annotations

import ipaddress
import struct
import tracemalloc
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from freecall.relay.server import (
    CHANNEL_LIFETIME,
    PERMISSION_LIFETIME,
    Addr,
    RelayServer,
    peer_forbidden,
)
from freecall.relay.stun import (
    Attr,
    Class,
    Method,
    decode_error_code,
    decode_xor_address,
    encode_message,
    encode_xor_address,
    parse_message,
)
from turnclient import WALL, Client, FakePorts, error_of, make_server, tid

PEER = ("192.0.2.99", 6000)  # documentation range: not global, so tests allow it explicitly
ALLOW = (ipaddress.ip_network("192.0.2.0/24"),)


def allocated(**overrides: Any) -> tuple[RelayServer, FakePorts, Client, Addr]:
    server, ports = make_server(allow_peers=ALLOW, **overrides)
    client = Client(server)
    response = client.allocate()
    assert response.cls == Class.SUCCESS, error_of(response)
    return server, ports, client, client.relayed(response)


# -- STUN binding (RFC 5389) ----------------------------------------------------------------


def test_binding_answers_with_xor_mapped_address_and_fingerprint() -> None:
    server, _ = make_server()
    t = tid()
    server.receive(encode_message(Method.BINDING, Class.REQUEST, t, []), ("203.0.113.7", 1234), 0)
    [(relayed, data, dest)] = server.datagrams_to_send()
    assert relayed is None and dest == ("203.0.113.7", 1234)
    response = parse_message(data)  # checks the FINGERPRINT
    assert response.has_fingerprint
    assert (response.method, response.cls, response.transaction_id) == (
        Method.BINDING, Class.SUCCESS, t)
    value = response.get(Attr.XOR_MAPPED_ADDRESS)
    assert value is not None and decode_xor_address(value, t) == ("203.0.113.7", 1234)


def test_binding_over_ipv6_source() -> None:
    server, _ = make_server()
    t = tid()
    server.receive(encode_message(Method.BINDING, Class.REQUEST, t, []), ("2001:db8::5", 9), 0)
    [(_, data, _)] = server.datagrams_to_send()
    value = parse_message(data).get(Attr.XOR_MAPPED_ADDRESS)
    assert value is not None and decode_xor_address(value, t) == ("2001:db8::5", 9)


def test_unknown_comprehension_required_attribute_gets_420() -> None:
    server, _ = make_server()
    t = tid()
    server.receive(encode_message(Method.BINDING, Class.REQUEST, t, [(0x0003, b"\0\0\0\6")]),
                   ("203.0.113.7", 1), 0)
    [(_, data, _)] = server.datagrams_to_send()
    response = parse_message(data)
    assert error_of(response) == 420
    assert response.get(Attr.UNKNOWN_ATTRIBUTES) == b"\x00\x03"


def test_unknown_optional_attribute_is_ignored() -> None:
    server, _ = make_server()
    server.receive(encode_message(Method.BINDING, Class.REQUEST, tid(), [(0x8055, b"x")]),
                   ("203.0.113.7", 1), 0)
    [(_, data, _)] = server.datagrams_to_send()
    assert parse_message(data).cls == Class.SUCCESS


def test_unknown_method_request_gets_400() -> None:
    server, _ = make_server()
    server.receive(encode_message(0x0055, Class.REQUEST, tid(), []), ("203.0.113.7", 1), 0)
    [(_, data, _)] = server.datagrams_to_send()
    assert error_of(parse_message(data)) == 400


def test_non_stun_responses_and_indications_are_dropped() -> None:
    server, _ = make_server()
    source = ("203.0.113.7", 1)
    for data in (b"", b"\x80" * 40, b"GET / HTTP/1.1\r\n\r\n",
                 encode_message(Method.BINDING, Class.SUCCESS, tid(), []),
                 encode_message(Method.BINDING, Class.INDICATION, tid(), []),
                 encode_message(Method.BINDING, Class.REQUEST, tid(), [])[:-4],  # bad length
                 b"\x40\x00\x00\x04abcd"):  # ChannelData without an allocation
        server.receive(data, source, 0)
    assert server.datagrams_to_send() == []
    assert server.stats.dropped == 7


# -- authentication (RFC 5389 section 10.2, TURN REST credentials) -----------------------------


def test_allocate_without_credentials_gets_401_with_realm_and_nonce() -> None:
    server, ports = make_server()
    client = Client(server)
    response = client.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, b"\x11\0\0\0")],
                              retry=False)
    assert error_of(response) == 401
    assert response.get(Attr.REALM) == b"relay.test"
    assert response.get(Attr.NONCE)
    assert response.integrity_at is None
    assert server.allocations == 0 and not ports.open_now


def test_allocate_with_rest_credentials_succeeds_and_is_signed() -> None:
    _server, ports, client, relayed = allocated()
    assert relayed in ports.open_now
    response = parse_message(client.inbox[-1])
    assert response.check_integrity(client.key)
    lifetime = response.get(Attr.LIFETIME)
    assert lifetime is not None and int.from_bytes(lifetime, "big") == 600
    mapped = response.get(Attr.XOR_MAPPED_ADDRESS)
    assert mapped is not None
    assert decode_xor_address(mapped, response.transaction_id) == client.addr


def test_wrong_secret_expired_username_and_bad_shapes_get_401() -> None:
    server, _ = make_server()
    for client in (Client(server, secret="not-the-secret-at-all"),
                   Client(server, expiry=int(WALL) - 1),
                   Client(server, node="")):
        assert error_of(client.allocate()) == 401
    assert server.allocations == 0


def test_expiry_is_checked_against_the_clock() -> None:
    server, _ = make_server()
    client = Client(server, expiry=int(WALL) + 100)
    assert client.allocate().cls == Class.SUCCESS
    client.now = 101
    assert error_of(client.refresh()) == 401  # expired: the node must fetch new credentials


def test_wrong_realm_gets_401() -> None:
    server, _ = make_server()
    client = Client(server, realm=b"other.realm")
    client.nonce = b"0.x"
    assert error_of(client.allocate()) in (401, 438)
    assert server.allocations == 0


def test_stale_nonce_gets_438_and_the_retry_works() -> None:
    server, _ = make_server(nonce_lifetime=60)
    client = Client(server)
    assert client.allocate().cls == Class.SUCCESS
    old = client.nonce
    client.now = 61
    response = client.request(Method.REFRESH, [], retry=False)
    assert error_of(response) == 438
    assert response.get(Attr.NONCE) not in (None, old)
    assert client.refresh().cls == Class.SUCCESS  # learns the new nonce and retries


def test_forged_nonce_and_nonce_of_another_client_get_438() -> None:
    server, _ = make_server()
    alice = Client(server)
    alice.allocate()
    mallory = Client(server, addr=("203.0.113.66", 1))
    mallory.nonce = b"0." + b"0" * 24
    transport = [(Attr.REQUESTED_TRANSPORT, b"\x11\0\0\0")]
    assert error_of(mallory.request(Method.ALLOCATE, transport, retry=False)) == 438
    eve = Client(server, addr=("203.0.113.67", 1))
    eve.nonce = alice.nonce  # a nonce is bound to the client's address
    assert error_of(eve.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, b"\x11\0\0\0")],
                                retry=False)) == 438


def test_missing_username_with_integrity_gets_400() -> None:
    server, _ = make_server()
    client = Client(server)
    client.allocate()
    data = encode_message(Method.REFRESH, Class.REQUEST, tid(), [(Attr.NONCE, client.nonce)],
                          key=client.key)
    [(_, response, _)] = client.send(data)
    assert error_of(parse_message(response)) == 400


def test_tampered_request_gets_401() -> None:
    server, _ = make_server()
    client = Client(server)
    client.allocate()
    data = bytearray(encode_message(
        Method.REFRESH, Class.REQUEST, tid(),
        [(Attr.LIFETIME, b"\0\0\x0e\x10"), (Attr.USERNAME, client.username.encode()),
         (Attr.REALM, client.realm), (Attr.NONCE, client.nonce)],
        key=client.key, fingerprint=False))
    data[24] ^= 1  # LIFETIME changed after signing
    [(_, response, _)] = client.send(bytes(data))
    assert error_of(parse_message(response)) == 401


# -- Allocate (RFC 5766 section 6) -----------------------------------------------------------


def test_allocate_errors() -> None:
    server, _ = make_server()
    client = Client(server)
    assert error_of(client.request(Method.ALLOCATE, [])) == 400  # no REQUESTED-TRANSPORT
    tcp = client.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, b"\x06\0\0\0")])
    assert error_of(tcp) == 442
    v6 = client.allocate((Attr.REQUESTED_ADDRESS_FAMILY, b"\x02\0\0\0"))
    assert error_of(v6) == 440
    df = client.allocate((Attr.DONT_FRAGMENT, b""))
    assert error_of(df) == 420 and df.get(Attr.UNKNOWN_ATTRIBUTES) == b"\x00\x1a"
    bad_lifetime = client.allocate((Attr.LIFETIME, b"\0\0"))
    assert error_of(bad_lifetime) == 400
    assert server.allocations == 0


def test_second_allocate_from_the_same_five_tuple_gets_437_and_retransmission_is_replayed() -> None:
    server, _ = make_server()
    client = Client(server)
    assert error_of(client.refresh()) == 437  # learns the nonce on the way
    t = tid()
    first = client.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, b"\x11\0\0\0")],
                           transaction=t)
    assert first.cls == Class.SUCCESS
    again = client.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, b"\x11\0\0\0")],
                           transaction=t)
    assert again.raw == first.raw
    assert error_of(client.allocate()) == 437
    assert server.allocations == 1


def test_lifetime_is_clamped_between_default_and_maximum() -> None:
    for asked, granted in ((60, 600), (1200, 1200), (99999, 3600)):
        server, _ = make_server()
        response = Client(server).allocate((Attr.LIFETIME, asked.to_bytes(4, "big")))
        value = response.get(Attr.LIFETIME)
        assert value is not None and int.from_bytes(value, "big") == granted


def test_even_port_is_honoured() -> None:
    server, _ = make_server()
    client = Client(server)
    client.allocate()  # takes 50000
    other = Client(server, addr=("203.0.113.5", 40001))
    relayed = other.relayed(other.allocate((Attr.EVEN_PORT, b"\0")))
    assert relayed[1] % 2 == 0


# -- quotas ---------------------------------------------------------------------------------


def test_allocations_per_node_quota_gives_486_and_other_nodes_keep_working() -> None:
    server, _ = make_server(allocations_per_user=2)
    greedy = [Client(server, addr=("203.0.113.5", 41000 + i), node="greedy") for i in range(3)]
    assert [error_of(c.allocate()) for c in greedy] == [None, None, 486]
    modest = Client(server, addr=("203.0.113.6", 1), node="modest")
    assert modest.allocate().cls == Class.SUCCESS
    greedy[0].refresh(0)  # gives one back
    assert greedy[2].allocate().cls == Class.SUCCESS


def test_total_allocations_and_ports_exhausted_give_508() -> None:
    server, _ = make_server(max_allocations=2)
    clients = [Client(server, addr=("203.0.113.5", 42000 + i), node=f"n{i}") for i in range(3)]
    assert [error_of(c.allocate()) for c in clients] == [None, None, 508]
    server, _ = make_server(port_limit=1)
    clients = [Client(server, addr=("203.0.113.5", 42000 + i), node=f"n{i}") for i in range(2)]
    assert [error_of(c.allocate()) for c in clients] == [None, 508]


def test_bandwidth_token_bucket_drops_the_excess() -> None:
    server, _, client, _relayed = allocated(bandwidth=10_000)  # 10 kB/s, 8 kB burst minimum
    assert client.bind_channel(0x4000, PEER).cls == Class.SUCCESS
    payload = b"x" * 1000
    frame = struct.pack("!HH", 0x4000, len(payload)) + payload
    sent = 0
    for _ in range(50):  # 50 kB at one instant: only the burst passes
        server.receive(frame, client.addr, client.now)
        sent += len(server.datagrams_to_send())
    assert 9 <= sent <= 11
    client.now += 1.0  # one more second of budget
    for _ in range(50):
        server.receive(frame, client.addr, client.now)
        sent += len(server.datagrams_to_send())
    assert 19 <= sent <= 21


def test_permissions_per_allocation_are_bounded() -> None:
    _server, _, client, _ = allocated(max_permissions=3)
    peers = [(f"192.0.2.{i}", 1) for i in range(1, 5)]
    assert client.permission(*peers[:3]).cls == Class.SUCCESS
    assert error_of(client.permission(peers[3])) == 508
    client.now += PERMISSION_LIFETIME + 1  # they expire, room again
    assert client.permission(peers[3]).cls == Class.SUCCESS


# -- Refresh (RFC 5766 section 7) and expiry ---------------------------------------------------


def test_refresh_extends_and_zero_deletes() -> None:
    server, ports, client, relayed = allocated()
    client.now = 500
    response = client.refresh(1200)
    value = response.get(Attr.LIFETIME)
    assert value is not None and int.from_bytes(value, "big") == 1200
    server.handle_timer(700)  # the first deadline passes: still alive
    assert server.allocations == 1
    assert client.refresh(0).cls == Class.SUCCESS
    assert server.allocations == 0 and relayed not in ports.open_now
    assert error_of(client.refresh()) == 437


def test_allocation_expires_on_the_timer() -> None:
    server, ports, _client, _relayed = allocated()
    assert server.get_timer() is not None
    now = 0.0
    while server.allocations:
        deadline = server.get_timer()
        assert deadline is not None
        now = deadline
        server.handle_timer(now)
    assert now == 600
    assert not ports.open_now and server.stats.allocations_expired == 1
    deadline = server.get_timer()
    assert deadline is None or deadline > now


def test_requests_without_allocation_get_437() -> None:
    server, _ = make_server(allow_peers=ALLOW)
    client = Client(server)
    assert error_of(client.refresh()) == 437
    assert error_of(client.permission(PEER)) == 437
    assert error_of(client.bind_channel(0x4000, PEER)) == 437


def test_another_node_cannot_use_the_allocation_441() -> None:
    server, _, client, _ = allocated()
    thief = Client(server, addr=client.addr, node="thief")
    assert error_of(thief.refresh()) == 441


# -- permissions, Send and Data (RFC 5766 sections 8-10) ---------------------------------------


def test_send_indication_needs_a_permission_and_data_comes_back_as_data_indication() -> None:
    server, _, client, relayed = allocated()
    t = tid()
    send = encode_message(Method.SEND, Class.INDICATION, t, [
        (Attr.XOR_PEER_ADDRESS, encode_xor_address(PEER, t)), (Attr.DATA, b"hello")])
    assert client.send(send) == []  # no permission: dropped
    assert client.permission(PEER).cls == Class.SUCCESS
    assert client.send(send) == [(relayed, b"hello", PEER)]
    server.receive_relayed(relayed, b"back", PEER, client.now)
    [(via, data, dest)] = server.datagrams_to_send()
    assert via is None and dest == client.addr
    indication = parse_message(data)
    assert (indication.method, indication.cls) == (Method.DATA, Class.INDICATION)
    assert indication.get(Attr.DATA) == b"back"
    peer = indication.get(Attr.XOR_PEER_ADDRESS)
    assert peer is not None and decode_xor_address(peer, indication.transaction_id) == PEER
    # a permission is for the IP, any port (RFC 5766 section 8)
    server.receive_relayed(relayed, b"other port", ("192.0.2.99", 7), client.now)
    assert len(server.datagrams_to_send()) == 1
    server.receive_relayed(relayed, b"stranger", ("192.0.2.100", 6000), client.now)
    assert server.datagrams_to_send() == []


def test_permission_expires_after_300_seconds_unless_refreshed() -> None:
    server, _, client, relayed = allocated()
    client.permission(PEER)
    client.now = PERMISSION_LIFETIME - 1
    client.permission(PEER)  # refreshed
    client.now = PERMISSION_LIFETIME + 10
    server.receive_relayed(relayed, b"x", PEER, client.now)
    assert len(server.datagrams_to_send()) == 1
    client.now = 2 * PERMISSION_LIFETIME
    server.receive_relayed(relayed, b"x", PEER, client.now)
    assert server.datagrams_to_send() == []


def test_forbidden_peers_get_403_unless_allowed() -> None:
    server, _ = make_server()  # allow_peers empty
    client = Client(server)
    client.allocate()
    for host in ("127.0.0.1", "10.1.2.3", "192.168.0.9", "172.16.0.1", "169.254.1.1",
                 "224.0.0.1", "0.0.0.0", "100.64.0.1", "::ffff:127.0.0.1"):
        if ":" in host:
            continue  # IPv4 allocation: IPv6 peers are a family mismatch
        assert error_of(client.permission((host, 1))) == 403, host
        assert error_of(client.bind_channel(0x4001, (host, 1))) == 403, host
    assert client.permission(("8.8.8.8", 53)).cls == Class.SUCCESS
    assert error_of(client.permission(("2001:4860::1", 1))) == 443
    assert peer_forbidden("::ffff:127.0.0.1", ())
    assert not peer_forbidden("127.0.0.1", (ipaddress.ip_network("127.0.0.0/8"),))


def test_create_permission_installs_all_or_nothing() -> None:
    server, _, client, relayed = allocated()
    assert error_of(client.permission(PEER, ("127.0.0.1", 1))) == 403
    server.receive_relayed(relayed, b"x", PEER, client.now)
    assert server.datagrams_to_send() == []


# -- channels (RFC 5766 section 11) -----------------------------------------------------------


def test_channel_bind_relays_channel_data_both_ways() -> None:
    server, _, client, relayed = allocated()
    assert client.bind_channel(0x4000, PEER).cls == Class.SUCCESS
    assert client.send(struct.pack("!HH", 0x4000, 3) + b"abc" + b"\0") == [
        (relayed, b"abc", PEER)]
    server.receive_relayed(relayed, b"reply", PEER, client.now)
    [(via, data, dest)] = server.datagrams_to_send()
    assert (via, data, dest) == (None, struct.pack("!HH", 0x4000, 5) + b"reply", client.addr)
    assert client.send(struct.pack("!HH", 0x4001, 3) + b"abc") == []  # unbound channel
    assert client.send(struct.pack("!HH", 0x4000, 30) + b"abc") == []  # length past the end


def test_channel_bind_errors() -> None:
    _server, _, client, _ = allocated()
    assert error_of(client.bind_channel(0x3FFF, PEER)) == 400
    assert error_of(client.bind_channel(0x8000, PEER)) == 400
    assert error_of(client.request(Method.CHANNEL_BIND, [])) == 400
    assert client.bind_channel(0x4000, PEER).cls == Class.SUCCESS
    assert client.bind_channel(0x4000, PEER).cls == Class.SUCCESS  # refresh is fine
    assert error_of(client.bind_channel(0x4000, ("192.0.2.98", 1))) == 400
    assert error_of(client.bind_channel(0x4001, PEER)) == 400


def test_channel_expires_after_ten_minutes_then_data_indications_resume() -> None:
    server, _, client, relayed = allocated()
    client.refresh(3600)
    client.bind_channel(0x4000, PEER)
    client.now = CHANNEL_LIFETIME - 1
    client.permission(PEER)  # the permission is kept alive, the channel is not
    client.now = CHANNEL_LIFETIME + 1
    assert client.send(struct.pack("!HH", 0x4000, 1) + b"a") == []
    server.receive_relayed(relayed, b"x", PEER, client.now)
    [(_, data, _)] = server.datagrams_to_send()
    assert parse_message(data).method == Method.DATA
    deadline = server.get_timer()
    assert deadline is not None
    server.handle_timer(max(deadline, client.now + 30))
    allocation = server.allocation_of(client.addr)
    assert allocation is not None and not allocation.channels and not allocation.peer_channels


# -- floods and hostile bytes --------------------------------------------------------------------


def test_flood_of_bogus_requests_keeps_no_state_and_service_continues() -> None:
    server, _, client, _ = allocated()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(20000):
        source = (f"198.18.{i // 250 % 250}.{i % 250}", 1000 + i % 50000)
        t = i.to_bytes(12, "big")
        kind = i % 4
        if kind == 0:  # unauthenticated Allocate
            data = encode_message(Method.ALLOCATE, Class.REQUEST, t,
                                  [(Attr.REQUESTED_TRANSPORT, b"\x11\0\0\0")])
        elif kind == 1:  # signed with garbage
            data = encode_message(Method.ALLOCATE, Class.REQUEST, t, [
                (Attr.USERNAME, b"9999999999:x"), (Attr.REALM, b"relay.test"),
                (Attr.NONCE, b"0.abc")], key=b"k")
        elif kind == 2:
            data = encode_message(Method.CHANNEL_BIND, Class.REQUEST, t, [])
        else:
            data = bytes([0x40, 0, 0, 8]) + t
        server.receive(data, source, float(i) / 1000)
        server.datagrams_to_send()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert server.allocations == 1
    assert grown < 200_000, grown
    assert client.refresh().cls == Class.SUCCESS  # the real client is still served
    assert len(server._expiries) <= 2 * server.allocations + 64


def test_many_create_delete_cycles_keep_the_timer_heap_bounded() -> None:
    server, _ = make_server(allocations_per_user=1)
    client = Client(server)
    for _ in range(500):
        assert client.allocate().cls == Class.SUCCESS
        assert client.refresh(0).cls == Class.SUCCESS
    assert len(server._expiries) <= 64 + 2


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_hostile_bytes_never_raise(data: bytes) -> None:
    server, _, client, relayed = allocated()
    server.receive(data, ("203.0.113.9", 1), 0.5)
    server.receive(data, client.addr, 0.5)
    server.receive_relayed(relayed, data, PEER, 0.5)
    server.receive_relayed(("0.0.0.0", 1), data, PEER, 0.5)
    for _, out, _ in server.datagrams_to_send():
        assert isinstance(out, bytes)


_attr = st.tuples(st.sampled_from([int(a) for a in Attr] + [0x0003, 0x7FFF, 0xFFFF]),
                  st.binary(max_size=24))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([int(m) for m in Method] + [0x55]), st.sampled_from(list(Class)),
       st.lists(_attr, max_size=8))
def test_well_framed_messages_with_hostile_attributes_never_raise(
    method: int, cls: Class, attrs: list[tuple[int, bytes]]
) -> None:
    server, _, client, relayed = allocated()
    data = encode_message(method, cls, tid(), attrs)
    server.receive(data, client.addr, 1.0)
    for _, out, dest in server.datagrams_to_send():
        if dest == client.addr and out[0] < 0x40:
            parse_message(out)  # whatever we answer is well-formed STUN
    server.receive_relayed(relayed, data, PEER, 1.0)
    server.datagrams_to_send()


def test_error_reason_phrase_is_readable() -> None:
    server, _ = make_server()
    server.receive(encode_message(0x0055, Class.REQUEST, tid(), []), ("203.0.113.7", 1), 0)
    [(_, data, _)] = server.datagrams_to_send()
    value = parse_message(data).get(Attr.ERROR_CODE)
    assert value is not None
    assert decode_error_code(value) == (400, "Bad Request: unknown method")


def test_server_is_pure() -> None:
    import freecall.relay.server as module

    source = open(module.__file__).read()  # noqa: SIM115
    for banned in ("import asyncio", "import socket", "import time"):
        assert banned not in source
    assert isinstance(make_server()[0], RelayServer)
