"""The pure parts of "behind NAT" (freecall.peering.nat): STUN reading and classification, the
attach proof, relay choice, and the relay link's RFC 5626 timing on virtual time."""

from __future__ import annotations

import random

import pytest

from freecall.peering.nat import (
    PONG_TIMEOUT,
    Close,
    Connect,
    Publish,
    RelayLink,
    SendPing,
    SendRegister,
    attach_proof,
    binding_request,
    check_attach_proof,
    classify,
    mapped_address,
    relay_candidates,
)
from freecall.peering.records import (
    Address,
    AddrKind,
    Ext,
    Flag,
    NodeIdentity,
    RelayVia,
    decode_record,
)
from freecall.relay.server import RelayServer, TurnSettings

TLS_KEY = bytes(range(32))


def test_a_binding_answered_by_the_real_server_core_gives_the_mapped_address() -> None:
    class NoPorts:
        def open(self, family: int, even: bool) -> tuple[str, int] | None:
            return None

        def close(self, relayed: tuple[str, int]) -> None:
            pass

    server = RelayServer(TurnSettings(realm="r", secret="s" * 16), NoPorts())
    tid = bytes(range(12))
    server.receive(binding_request(tid), ("203.0.113.7", 40000), 0.0)
    answers = server.datagrams_to_send()
    assert answers, "the server answered nothing"
    data = answers[0][1]
    assert mapped_address(data, tid) == ("203.0.113.7", 40000)
    assert mapped_address(data, bytes(12)) is None  # another transaction
    assert mapped_address(b"garbage" * 5, tid) is None
    assert mapped_address(data[:-3], tid) is None


def test_classify() -> None:
    local = {"10.0.2.2"}.__contains__
    assert classify([], local).behind_nat is None
    assert classify([("10.0.2.2", 5)], local).behind_nat is False
    one = classify([("198.51.100.12", 5)], local)
    assert (one.behind_nat, one.mapping) == (True, "unknown")
    same = classify([("198.51.100.12", 5), ("198.51.100.12", 5)], local)
    assert same.mapping == "endpoint-independent"
    moved = classify([("198.51.100.12", 5), ("198.51.100.12", 6)], local)
    assert moved.mapping == "address-dependent"
    assert moved.summary()["public_address"] == "198.51.100.12:5"


def test_the_attach_proof_binds_the_node_key_the_relay_key_and_the_time() -> None:
    node = NodeIdentity.generate()
    proof = attach_proof(node, TLS_KEY, 1000.0)
    assert check_attach_proof(proof, TLS_KEY, 1100.0) == node.node_id
    with pytest.raises(ValueError, match="signature"):
        check_attach_proof(proof, bytes(32), 1000.0)  # shown to another relay
    with pytest.raises(ValueError, match="stale"):
        check_attach_proof(proof, TLS_KEY, 1000.0 + 301)
    other = NodeIdentity.generate()
    forged = proof.replace(proof.split(";")[0], "pk=" + attach_proof(other, TLS_KEY, 1000.0)
                           .split(";")[0][3:])
    with pytest.raises(ValueError, match="signature"):
        check_attach_proof(forged, TLS_KEY, 1000.0)
    for junk in ("", "pk=;ts=;sig=", "pk=x;ts=1;sig=y", "ts=1000", proof + ";" + proof):
        with pytest.raises(ValueError):
            check_attach_proof(junk if junk != proof + ";" + proof else "pk=a" * 80,
                               TLS_KEY, 1000.0)


def test_relay_via_round_trips_and_unknown_sizes_are_ignored() -> None:
    via = RelayVia(bytes(16), TLS_KEY, "198.51.100.1", 5061)
    assert RelayVia.decode(via.encode()) == via
    v6 = RelayVia(bytes(16), TLS_KEY, "2001:db8::1", 5061)
    assert RelayVia.decode(v6.encode()) == v6
    assert RelayVia.decode(via.encode() + b"x") is None
    node = NodeIdentity.generate()
    record = node.make_record(seq=1, expires=10, extensions=((Ext.VIA_RELAY, via.encode()),))
    assert decode_record(record.raw).via_relay == via


def _relay_record(ident: NodeIdentity, *, tls: bool = True, flag: bool = True) -> bytes:
    addresses = (Address(AddrKind.SIP_TLS, "198.51.100.1", 5061),)
    extensions = ((Ext.TLS_FINGERPRINT, TLS_KEY),) if tls else ()
    return ident.make_record(seq=1, expires=10, addresses=addresses,
                             flags=Flag.RELAY if flag else 0, extensions=extensions).raw


def test_relay_candidates_need_the_flag_a_tls_address_and_a_key() -> None:
    good, other = NodeIdentity.generate(), NodeIdentity.generate()
    records = [decode_record(_relay_record(good)), decode_record(_relay_record(other)),
               decode_record(_relay_record(NodeIdentity.generate(), tls=False)),
               decode_record(_relay_record(NodeIdentity.generate(), flag=False))]
    found = relay_candidates(records, b"\0" * 8)
    assert {r.node_id for r in found} == {good.node_id, other.node_id}
    assert relay_candidates(records, b"\0" * 8, other.node_id)[0].node_id == other.node_id
    assert relay_candidates(records, good.node_id) == [r for r in found
                                                   if r.node_id == other.node_id]


RELAY_A = RelayVia(b"a" * 16, TLS_KEY, "198.51.100.1", 5061)
RELAY_B = RelayVia(b"b" * 16, TLS_KEY, "198.51.100.2", 5061)


def _drain(link: RelayLink) -> list[object]:
    out: list[object] = []
    while (action := link.next_action()) is not None:
        out.append(action)
    return out


def _attached(keepalive: float = 120.0) -> RelayLink:
    link = RelayLink(random.Random(1), keepalive=keepalive, retry_base=30.0)
    link.want([RELAY_A, RELAY_B], 0.0)
    assert _drain(link) == [Connect(RELAY_A)]
    link.connected(0.1)
    assert _drain(link) == [SendRegister(RELAY_A)]
    link.registered(200, 600, 0.2)
    assert _drain(link) == [Publish(RELAY_A)]
    return link


def test_pings_come_at_80_to_100_percent_of_the_interval_and_pongs_keep_the_flow() -> None:
    link = _attached()
    now = last = 0.2
    gaps: list[float] = []
    registers = 0
    while len(gaps) < 50:
        deadline = link.get_timer()
        assert deadline is not None
        now = deadline
        link.handle_timer(now)
        for action in _drain(link):
            if action == SendPing():
                gaps.append(now - last)
                now += 0.05
                link.pong(now)
                last = now
            else:  # the attachment's renewal at 80% of the 600 s granted
                assert action == SendRegister(RELAY_A)
                registers += 1
                link.registered(200, 600, now)
    assert all(96.0 <= g <= 120.0 for g in gaps), (min(gaps), max(gaps))
    assert max(gaps) - min(gaps) > 5  # randomised, not one fixed period
    assert link.state == "attached" and link.pings == link.pongs == 50
    assert registers >= 50 * 96 // 480 - 1


def test_no_pong_within_10_s_fails_the_flow_and_backs_off_to_the_next_relay() -> None:
    link = _attached()
    ping_at = link.get_timer()
    assert ping_at is not None
    link.handle_timer(ping_at)
    assert _drain(link) == [SendPing()]
    assert link.get_timer() == pytest.approx(ping_at + PONG_TIMEOUT)
    link.handle_timer(ping_at + PONG_TIMEOUT)
    actions = _drain(link)
    assert len(actions) == 1 and isinstance(actions[0], Close), actions
    assert link.state == "waiting" and link.published == RELAY_A  # record not withdrawn
    retry = link.get_timer()
    assert retry is not None
    # RFC 5626 section 4.5: base-time (30 s) times 50-100% on the first failure
    assert 15.0 <= retry - (ping_at + PONG_TIMEOUT) <= 30.0
    link.handle_timer(retry)
    assert _drain(link) == [Connect(RELAY_B)]


def test_back_off_doubles_up_to_the_maximum_and_resets_once_attached() -> None:
    link = RelayLink(random.Random(2), retry_base=30.0, retry_max=1800.0)
    link.want([RELAY_A], 0.0)
    now, waits = 0.0, []
    for _ in range(10):
        _drain(link)
        link.lost("refused", now)
        retry = link.get_timer()
        assert retry is not None
        waits.append(retry - now)
        now = retry
        link.handle_timer(now)
    for n, wait in enumerate(waits):
        full = min(1800.0, 30.0 * 2 ** n)
        assert full / 2 <= wait <= full, (n, wait)
    _drain(link)
    link.connected(now)
    link.registered(200, None, now)
    assert link.failures == 0 and link.state == "attached"


def test_a_refused_register_is_a_failure_and_detach_withdraws_the_relay() -> None:
    link = RelayLink(random.Random(3))
    link.want([RELAY_A], 0.0)
    _drain(link)
    link.connected(0.0)
    _drain(link)
    link.registered(403, None, 0.1)
    assert isinstance(_drain(link)[0], Close) and link.state == "waiting"
    link = _attached()
    refresh = 0.2 + 0.8 * 600
    link.handle_timer(refresh)
    assert SendRegister(RELAY_A) in _drain(link)
    link.want([], refresh + 1)
    assert _drain(link) == [Close("no relay wanted"), Publish(None)]
    assert link.state == "idle" and link.get_timer() is None
