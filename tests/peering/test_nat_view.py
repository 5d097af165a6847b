"""One view of the node's NAT situation (issue 9 follow-up): the single "behind NAT?" verdict
(freecall.peering.nat.NatView: node-level STUN first, the media gathering otherwise, each
informing the other) and the single order of preference over relays (rank_relays), shared by
the SIP attachment, node-level STUN and the media's STUN/TURN choice."""

from __future__ import annotations

import time

from freecall.peering.nat import NatStatus, NatView, rank_relays, relay_candidates
from freecall.peering.records import Address, AddrKind, Ext, Flag, NodeIdentity, NodeRecord
from freecall.srtp.iceservers import ice_servers, mesh_relays

SYMMETRIC = NatStatus(("203.0.113.9", 40000), True, "address-dependent")
PUBLIC = NatStatus(("198.51.100.7", 40000), False, "none")
NO_ANSWER = NatStatus(None, None, "unknown")


def test_stun_answer_wins_and_the_gathering_decides_without_one() -> None:
    view = NatView()
    heard: list[bool | None] = []
    view.listeners.append(lambda: heard.append(view.behind_nat))
    assert (view.behind_nat, view.source) == (None, "none")
    view.from_media(True, [("203.0.113.9", 20002)])  # no STUN answer yet: the gathering rules
    assert (view.behind_nat, view.source, view.recheck) == (True, "media", False)
    assert view.summary()["public_address"] == "203.0.113.9:20002"
    view.from_stun(PUBLIC)  # STUN answered: it wins, and the disagreement is on record
    assert (view.behind_nat, view.source, view.public) == (False, "stun", PUBLIC.public)
    summary = view.summary()
    assert summary["behind_nat"] is False and summary["stun_behind_nat"] is False
    assert summary["media_behind_nat"] is True and summary["verdict_changes"] == 1
    assert heard == [True, False]  # each change of verdict was announced once


def test_a_gathering_that_contradicts_stun_asks_for_a_new_probe_once() -> None:
    view = NatView()
    calls: list[str] = []
    view.listeners.append(lambda: calls.append("wake"))
    view.from_stun(SYMMETRIC)
    assert calls == ["wake"]
    view.from_media(True, [("203.0.113.9", 20002)])  # agrees: nothing to do
    assert (view.recheck, calls) == (False, ["wake"])
    view.from_media(False)  # disagrees: the verdict stays STUN's, a probe is wanted
    assert (view.behind_nat, view.recheck, calls) == (True, True, ["wake", "wake"])
    view.from_media(False)  # already asked: no second wake-up per gathering
    assert calls == ["wake", "wake"]
    view.from_stun(PUBLIC)  # the new probe: the network did change
    assert (view.behind_nat, view.recheck) == (False, False)


def test_no_stun_answer_falls_back_to_the_gathering() -> None:
    view = NatView()
    view.from_media(False)
    view.from_stun(NO_ANSWER)
    assert (view.behind_nat, view.source) == (False, "media")


def _relay(number: int, *, sip: bool = True, tls_key: bool = True,
           turn: bool = True) -> tuple[NodeIdentity, NodeRecord]:
    identity = NodeIdentity.generate()
    host = f"198.51.100.{number}"
    addresses = [Address(AddrKind.STUN, host, 3478)]
    if turn:
        addresses.append(Address(AddrKind.RELAY, host, 3478))
    if sip:
        addresses.append(Address(AddrKind.SIP_TLS, host, 5061))
    extensions = ((Ext.TLS_FINGERPRINT, bytes([number]) * 32),) if tls_key else ()
    record = identity.make_record(seq=1, expires=int(time.time()) + 3600,
                                  addresses=tuple(addresses), flags=Flag.RELAY | Flag.STUN,
                                  extensions=extensions)
    return identity, record


def test_signalling_and_media_prefer_the_same_relay() -> None:
    records = [_relay(i)[1] for i in range(1, 7)]
    firsts = set()
    for _ in range(40):
        me = NodeIdentity.generate()
        attach = relay_candidates(records, me.node_id)
        turn = mesh_relays(records, me.node_id)
        assert [r.node_id for r in attach] == [r.node_id for r in turn]
        assert [r.node_id for r in rank_relays(records, me.node_id)] == \
            [r.node_id for r in turn]
        firsts.add(attach[0].node_id)
        servers = ice_servers(stun=(), turn=(), relays=turn, identity=me,
                              wall_now=time.time(), behind_nat=True)
        attached_host = next(r for r in records if r.node_id == attach[0].node_id
                             ).addresses_of(AddrKind.RELAY)[0].addr
        assert servers.turn[0].addr == attached_host
    assert len(firsts) >= 3  # rendezvous hashing spreads the nodes over the relays


def test_turn_follows_the_relay_attached_to_when_the_best_one_has_no_sip_edge() -> None:
    me = NodeIdentity.generate()
    records = [_relay(i, sip=i % 2 == 0) for i in range(1, 7)]
    ranked = rank_relays([r for _, r in records], me.node_id)
    attach = relay_candidates([r for _, r in records], me.node_id)
    assert all(r.addresses_of(AddrKind.SIP_TLS) for r in ranked
               if r.node_id == attach[0].node_id)
    # attached to the best relay with a SIP edge; TURN then goes there too
    turn = mesh_relays([r for _, r in records], me.node_id, attach[0].node_id)
    assert turn[0].node_id == attach[0].node_id
    assert [r.node_id for r in turn[1:]] == [r.node_id for r in ranked
                                             if r.node_id != attach[0].node_id]


def test_a_relay_is_attached_to_only_with_the_tls_key_its_record_names() -> None:
    me = NodeIdentity.generate()
    keyless = _relay(1, tls_key=False)[1]
    keyed = _relay(2)[1]
    found = relay_candidates([keyless, keyed], me.node_id, keyless.node_id)
    assert [r.node_id for r in found] == [keyed.node_id]
    assert found[0].tls_fingerprint == bytes([2]) * 32
    # the preferred relay is first for media even so (TURN needs no TLS key: node-key
    # credentials are bound to its record's node key)
    assert mesh_relays([keyless, keyed], me.node_id, keyless.node_id)[0] == keyless
    assert rank_relays([keyless, keyed, _relay(3)[1]], keyed.node_id)[0].node_id != \
        keyed.node_id  # never our own record
