"""Two ZrtpSessions in memory on virtual time: the whole of RFC 6189 sections 4 and 6."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from freecall.srtp.keys import RetainedSecrets
from freecall.srtp.zrtp import (
    Failed,
    HelloReceived,
    PeerSignature,
    ProtocolError,
    SasSignatureNeeded,
    SecureStateReached,
    SecurityWarning,
    State,
    ZrtpConfig,
    ZrtpSession,
)
from freecall.srtp.zrtp_messages import (
    Commit,
    ErrorCode,
    GoClear,
    Ping,
    PingAck,
    decode_message,
    decode_packet,
    encode_packet,
)
from zrtp.zrtp_harness import (
    Endpoint,
    FakePeer,
    Filter,
    Link,
    make_endpoint,
    make_pair,
    packet_type,
    rewrite,
)

HELLO, COMMIT, DH1, DH2 = b"Hello   ", b"Commit  ", b"DHPart1 ", b"DHPart2 "
CONF1, CONF2, C2ACK = b"Confirm1", b"Confirm2", b"Conf2ACK"
PASSIVE = ZrtpConfig(passive=True)


def assert_agreed(link: Link) -> tuple[SecureStateReached, SecureStateReached]:
    a, b = link.a.secure, link.b.secure
    assert a is not None and b is not None, (link.a.events, link.b.events)
    assert a.sas == b.sas and a.sas is not None
    assert a.sashash == b.sashash
    assert a.keys.outbound == b.keys.inbound
    assert a.keys.inbound == b.keys.outbound
    assert a.keys.outbound != a.keys.inbound
    assert {a.role, b.role} == {"initiator", "responder"}
    assert a.peer_zid == link.b.session._zid and b.peer_zid == link.a.session._zid
    for result in (a, b):
        assert len(result.keys.outbound.key) == 16
        assert len(result.keys.outbound.salt) == 14
    return a, b


def drop(kind: bytes, sender: str | None = None, times: int = 1) -> Filter:
    """Drop the first ``times`` packets of ``kind`` (from ``sender`` if given)."""
    left = {"n": times}

    def fn(who: str, k: bytes, pkt: bytes) -> bytes | None:
        if k == kind and (sender is None or who == sender) and left["n"] > 0:
            left["n"] -= 1
            return None
        return pkt

    return fn


def tamper(kind: bytes, sender: str, edit: Callable[[bytearray], None], times: int = 1) -> Filter:
    left = {"n": times}

    def fn(who: str, k: bytes, pkt: bytes) -> bytes | None:
        if k == kind and who == sender and left["n"] > 0:
            left["n"] -= 1
            return rewrite(pkt, edit)
        return pkt

    return fn


def codes(ep: Endpoint, local: bool) -> list[int]:
    return [e.code for e in ep.of_type(ProtocolError) if e.local == local]


# -- agreement ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ka", ["DH3k", "EC25", "X255"])
@pytest.mark.parametrize("auth", ["HS32", "HS80"])
def test_agreement_per_key_agreement_and_auth_tag(ka: str, auth: str) -> None:
    cfg = ZrtpConfig(key_agreement_types=(ka,), auth_tag_types=(auth,))
    link = make_pair(cfg, cfg)
    link.start()
    link.run()
    a, b = assert_agreed(link)
    for result in (a, b):
        assert result.key_agreement == ka
        assert result.auth_tag == auth
        assert result.cipher == "AES1"
        assert result.hash == "S256"
        assert result.keys.srtp_profile.endswith(auth[2:])
        assert result.continuity == "new"
        assert not result.sas_verified
        assert result.sas is not None and len(result.sas) == 4  # B32 by default
    assert link.now == 0.0  # no loss: done without any timer


def test_default_config_prefers_x255_and_b256_renders_words() -> None:
    cfg = ZrtpConfig(sas_types=("B256",))
    link = make_pair(cfg, cfg)
    link.start()
    link.run()
    a, _ = assert_agreed(link)
    assert a.key_agreement == "X255"
    assert a.sas_type == "B256"
    assert a.sas is not None and len(a.sas.split()) == 2


def test_s384_hash_can_be_negotiated() -> None:
    cfg = ZrtpConfig(hash_types=("S384", "S256"))
    link = make_pair(cfg, cfg)
    link.start()
    link.run()
    a, b = assert_agreed(link)
    assert a.hash == b.hash == "S384"


def test_hello_hash_for_sdp_and_binding() -> None:
    link = make_pair()
    a, b = link.a.session, link.b.session
    assert a.zrtp_hash_attribute == f"1.10 {a.local_hello_hash}"
    a.set_expected_peer_hello_hash(b.zrtp_hash_attribute, 0.0)
    b.set_expected_peer_hello_hash(bytes.fromhex(a.local_hello_hash), 0.0)
    link.start()
    link.run()
    ra, rb = assert_agreed(link)
    assert ra.hello_hash_verified and rb.hello_hash_verified
    assert ra.peer_hello_hash == b.local_hello_hash
    hello_event = link.a.of_type(HelloReceived)[0]
    assert hello_event.peer_hello_hash == b.local_hello_hash
    assert hello_event.client_id == "freecall"


def test_wrong_hello_hash_rejects_the_hello() -> None:
    link = make_pair()
    link.a.session.set_expected_peer_hello_hash("1.10 " + "00" * 32, 0.0)
    link.start()
    link.run(limit=20)
    assert link.a.secure is None and link.b.secure is None
    assert link.a.of_type(SecurityWarning)
    failed_a, failed_b = link.a.failed, link.b.failed
    assert failed_a is not None and failed_b is not None
    assert link.now == pytest.approx(12.2)  # the extended Hello span, then give up


# -- retransmissions (section 6) ------------------------------------------------------------


def test_lost_hellos_follow_t1_schedule() -> None:
    link = make_pair()
    link.filter = drop(HELLO, sender="A", times=3)
    link.start()
    assert link.a.session.get_timer() == pytest.approx(0.05)
    link.run()
    assert_agreed(link)
    assert link.sent("A", HELLO) == pytest.approx([0.0, 0.05, 0.15, 0.35])


def test_hello_schedule_without_a_peer() -> None:
    ep = make_endpoint("A")
    ep.session.start(0.0)
    sent = [0.0] if ep.session.datagrams_to_send() else []
    timers = []
    while (t := ep.session.get_timer()) is not None:
        timers.append(t)
        ep.session.handle_timer(t)
        sent += [t] * len(ep.session.datagrams_to_send())
    ep.drain_events()
    expected = [0.0, 0.05, 0.15] + [0.15 + 0.2 * i for i in range(1, 19)]
    assert sent == pytest.approx(expected)  # 1 + 20 retransmissions, last at 3.75 s
    assert timers[-1] == pytest.approx(3.95)
    assert ep.failed is not None and "no ZRTP peer" in ep.failed.reason


def test_hello_schedule_extends_when_peer_known() -> None:
    ep = make_endpoint("A", expected_peer_hello_hash="ab" * 32)
    ep.session.start(0.0)
    ep.session.datagrams_to_send()
    last_sent = 0.0
    while (t := ep.session.get_timer()) is not None:
        ep.session.handle_timer(t)
        if ep.session.datagrams_to_send():
            last_sent = t
    ep.drain_events()
    assert 11.8 < last_sent < 12.0
    assert ep.failed is not None


def test_lost_commit_is_retransmitted_on_t2() -> None:
    link = make_pair(config_b=PASSIVE)
    link.filter = drop(COMMIT, sender="A", times=2)
    link.start()
    assert link.a.session.get_timer() == pytest.approx(0.15)
    link.run()
    ra, _ = assert_agreed(link)
    assert ra.role == "initiator"
    assert link.sent("A", COMMIT) == pytest.approx([0.0, 0.15, 0.45])


def test_t2_schedule_exhausts_after_ten_retransmissions() -> None:
    link = make_pair(config_b=PASSIVE)
    link.filter = drop(COMMIT, sender="A", times=100)
    link.start()
    link.run(limit=30)
    expected = [0.0, 0.15, 0.45, 1.05, 2.25, 3.45, 4.65, 5.85, 7.05, 8.25, 9.45]
    assert link.sent("A", COMMIT) == pytest.approx(expected)
    assert link.a.failed is not None and link.b.failed is not None
    assert codes(link.a, local=True) == [ErrorCode.PROTOCOL_TIMEOUT]
    assert codes(link.b, local=False) == [ErrorCode.PROTOCOL_TIMEOUT]
    assert link.sent("A", b"Error   ")[0] == pytest.approx(10.65)


@pytest.mark.parametrize(
    ("lost", "sender", "resent_kind", "resent_by"),
    [
        (DH1, "B", COMMIT, "A"),  # initiator repeats Commit, responder repeats DHPart1
        (DH2, "A", DH2, "A"),
        (CONF1, "B", DH2, "A"),  # responder re-sends Confirm1 on the repeated DHPart2
        (CONF2, "A", CONF2, "A"),
        (C2ACK, "B", CONF2, "A"),
    ],
)
def test_lost_message_recovers(
    lost: bytes, sender: str, resent_kind: bytes, resent_by: str
) -> None:
    link = make_pair(config_b=PASSIVE)
    link.filter = drop(lost, sender=sender)
    link.start()
    assert link.a.session.get_timer() == pytest.approx(0.15)
    link.run()
    assert_agreed(link)
    assert link.sent(resent_by, resent_kind) == pytest.approx([0.0, 0.15])
    assert link.sent(sender, lost) == pytest.approx([0.0, 0.15])


def test_srtp_media_stands_in_for_conf2ack() -> None:
    link = make_pair(config_b=PASSIVE)
    link.filter = drop(C2ACK, times=100)
    link.start()
    assert link.b.secure is not None
    assert link.a.session.state is State.CONFIRM2_SENT
    keys = link.a.session.keys
    assert keys is not None and keys.inbound == link.b.secure.keys.outbound
    link.a.session.srtp_media_received(0.01)
    link.pump()
    assert_agreed(link)
    assert link.a.session.get_timer() is None


def test_responder_gives_up_after_ten_silent_seconds() -> None:
    link = make_pair(config_b=PASSIVE)

    def silence_after_commit(who: str, kind: bytes, pkt: bytes) -> bytes | None:
        return None if who == "A" and kind in (DH2, b"Error   ") else pkt

    link.filter = silence_after_commit
    link.start()
    link.run(limit=30)
    assert link.b.failed is not None
    assert link.sent("B", b"Error   ")[0] == pytest.approx(10.0)
    assert codes(link.b, local=True)[0] == ErrorCode.PROTOCOL_TIMEOUT


# -- commit contention (section 4.2) --------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("a_first", [True, False])
def test_commit_contention_larger_hvi_wins(seed: int, a_first: bool) -> None:
    link = make_pair(seed=seed)
    link.start(a_first=a_first)
    link.run()
    ra, _rb = assert_agreed(link)
    commits = {
        who: decode_message(decode_packet(pkt).message)
        for who, pkt in link.packets
        if packet_type(pkt) == COMMIT
    }
    assert set(commits) == {"A", "B"}  # both committed at once
    hvi = {who: int.from_bytes(c.hvi or b"", "big") for who, c in commits.items()}  # type: ignore[union-attr]
    winner = "A" if ra.role == "initiator" else "B"
    loser = "B" if winner == "A" else "A"
    assert hvi[winner] > hvi[loser]


def test_preshared_commit_is_answered_with_dh_commit() -> None:
    ep = make_endpoint("B")
    peer = FakePeer()
    ep.session.start(0.0)
    our_hello = decode_packet(ep.session.datagrams_to_send()[0]).message
    ep.session.receive(peer.packet(peer.hello()), 0.0)
    ep.session.datagrams_to_send()
    ep.session.receive(peer.packet(peer.commit(our_hello, key_agreement_type=b"Prsh")), 0.0)
    out = [decode_message(decode_packet(p).message) for p in ep.session.datagrams_to_send()]
    commits = [m for m in out if isinstance(m, Commit)]
    assert len(commits) == 1 and commits[0].is_dh
    assert ep.session.role == "initiator"


# -- tampering and attacks --------------------------------------------------------------------

PV_OFFSET = 12 + 64  # message header + H1 + four IDs


def flip_pv(msg: bytearray) -> None:
    msg[PV_OFFSET + 5] ^= 0x01


@pytest.mark.parametrize("ka", ["X255", "DH3k"])
def test_changed_pvi_fails_hvi_check(ka: str) -> None:
    cfg = ZrtpConfig(key_agreement_types=(ka,))
    link = make_pair(cfg, ZrtpConfig(key_agreement_types=(ka,), passive=True))
    link.filter = tamper(DH2, "A", flip_pv)
    link.start()
    link.run()
    assert link.b.failed is not None and link.a.failed is not None
    assert codes(link.b, local=True) == [ErrorCode.HVI_MISMATCH]
    assert codes(link.a, local=False) == [ErrorCode.HVI_MISMATCH]
    assert link.a.session.get_timer() is None and link.b.session.get_timer() is None  # ErrorACK


@pytest.mark.parametrize(
    ("ka", "value"),
    [
        ("DH3k", (1).to_bytes(384, "big")),
        ("DH3k", bytes.fromhex("ff" * 384)),  # >= p
        ("EC25", bytes(64)),  # not on the curve
        ("X255", bytes(32)),  # low order point
    ],
)
def test_bad_public_value_is_rejected(ka: str, value: bytes) -> None:
    def set_pv(msg: bytearray) -> None:
        msg[PV_OFFSET : PV_OFFSET + len(value)] = value

    link = make_pair(
        ZrtpConfig(key_agreement_types=(ka,)),
        ZrtpConfig(key_agreement_types=(ka,), passive=True),
    )
    link.filter = tamper(DH2, "A", set_pv)
    link.start()
    link.run()
    assert codes(link.b, local=True) == [ErrorCode.BAD_DH_PUBLIC_VALUE]
    link2 = make_pair(
        ZrtpConfig(key_agreement_types=(ka,)),
        ZrtpConfig(key_agreement_types=(ka,), passive=True),
    )
    link2.filter = tamper(DH1, "B", set_pv)
    link2.start()
    link2.run()
    assert codes(link2.a, local=True) == [ErrorCode.BAD_DH_PUBLIC_VALUE]


def test_changed_pvr_is_caught_by_confirm_mac() -> None:
    link = make_pair(config_b=PASSIVE)
    link.filter = tamper(DH1, "B", flip_pv)
    link.start()
    link.run()
    assert codes(link.a, local=True) == [ErrorCode.BAD_CONFIRM_MAC]
    assert link.a.secure is None and link.b.secure is None


@pytest.mark.parametrize(("kind", "sender"), [(DH1, "B"), (DH2, "A"), (COMMIT, "A")])
def test_wrong_hash_image_is_dropped_and_exchange_recovers(kind: bytes, sender: str) -> None:
    def flip_hash_image(msg: bytearray) -> None:
        msg[12] ^= 0x80  # first octet of H1 (DHPart) or H2 (Commit)

    link = make_pair(config_b=PASSIVE)
    link.filter = tamper(kind, sender, flip_hash_image)
    link.start()
    link.run()
    assert_agreed(link)  # the genuine retransmission gets through
    receiver = link.b if sender == "A" else link.a
    assert any("hash image" in w.reason for w in receiver.of_type(SecurityWarning))
    assert not codes(link.a, local=True) and not codes(link.b, local=True)


@pytest.mark.parametrize(("kind", "sender", "detector"), [(CONF1, "B", "A"), (CONF2, "A", "B")])
def test_bad_confirm_mac(kind: bytes, sender: str, detector: str) -> None:
    def flip_encrypted(msg: bytearray) -> None:
        msg[40] ^= 0x01  # inside the encrypted region

    link = make_pair(config_b=PASSIVE)
    link.filter = tamper(kind, sender, flip_encrypted)
    link.start()
    link.run()
    ep = link.a if detector == "A" else link.b
    assert codes(ep, local=True) == [ErrorCode.BAD_CONFIRM_MAC]
    assert link.a.secure is None or link.b.secure is None
    assert ep.secure is None


def test_altered_hello_is_detected_through_its_mac() -> None:
    def change_client_id(msg: bytearray) -> None:
        msg[16:20] = b"EVIL"

    link = make_pair(config_b=PASSIVE)
    link.filter = tamper(HELLO, "B", change_client_id, times=100)
    link.start()
    link.run()
    # The initiator checks the responder's Hello MAC once DHPart1 reveals H1 -> H2.
    assert codes(link.a, local=True) == [ErrorCode.HELLO_COMPONENTS_MISMATCH]


def test_goclear_is_refused() -> None:
    link = make_pair(config_b=PASSIVE)
    link.start()
    link.run()
    assert_agreed(link)
    a_keys = link.a.session._keys
    assert a_keys is not None
    clear_mac = link.a.session._hash.hmac(a_keys.mackeyi, b"GoClear ")[:8]
    bad = encode_packet(GoClear(clear_mac=b"\x00" * 8).encode(), 7, 0xAAAA)
    link.b.session.receive(bad, 1.0)
    link.b.drain_events()
    assert not link.b.session.datagrams_to_send()
    assert any("bad clear_mac" in w.reason for w in link.b.of_type(SecurityWarning))
    good = encode_packet(GoClear(clear_mac=clear_mac).encode(), 8, 0xAAAA)
    link.b.session.receive(good, 1.0)
    link.b.drain_events()
    out = link.b.session.datagrams_to_send()
    assert [packet_type(p) for p in out] == [b"Error   "]
    assert codes(link.b, local=True) == [ErrorCode.GOCLEAR_NOT_ALLOWED]
    assert link.b.session.is_secure  # keys stay; nothing went clear
    assert not link.a.secure.peer_allow_clear  # type: ignore[union-attr]


def test_error_after_secure_does_not_tear_down() -> None:
    link = make_pair()
    link.start()
    link.run()
    assert_agreed(link)
    link.a.session.receive(encode_packet(b"\x50\x5a\x00\x04Error   \x00\x00\x00\x70", 1, 2), 1.0)
    link.a.drain_events()
    assert link.a.session.is_secure
    assert link.a.of_type(SecurityWarning)


# -- algorithm support and discovery checks ------------------------------------------------------


def _fake_exchange(session: ZrtpSession, peer: FakePeer, hello: bytes) -> bytes:
    session.start(0.0)
    our_hello = decode_packet(session.datagrams_to_send()[0]).message
    session.receive(peer.packet(hello), 0.0)
    return our_hello


def test_peer_with_only_unknown_algorithms_falls_back_to_mandatory() -> None:
    ep = make_endpoint("A")
    peer = FakePeer()
    hello = peer.hello(
        hash_types=(b"N256",),
        cipher_types=(b"2FS3",),
        auth_tag_types=(b"SK32",),
        key_agreement_types=(b"EC38",),
        sas_types=(b"B999",),
    )
    _fake_exchange(ep.session, peer, hello)
    ep.session.receive(peer.packet(b"\x50\x5a\x00\x03HelloACK"), 0.0)
    out = [decode_message(decode_packet(p).message) for p in ep.session.datagrams_to_send()]
    commit = next(m for m in out if isinstance(m, Commit))
    # Section 5.2: mandatory algorithms are implied, so the peer still supports these.
    assert commit.key_agreement_type == b"DH3k"
    assert commit.hash_type == b"S256"
    assert commit.cipher_type == b"AES1"
    assert commit.auth_tag_type == b"HS80"
    assert commit.sas_type == b"B32 "


@pytest.mark.parametrize(
    ("choice", "code"),
    [
        ({"hash_type": b"S384"}, ErrorCode.HASH_NOT_SUPPORTED),
        ({"cipher_type": b"AES3"}, ErrorCode.CIPHER_NOT_SUPPORTED),
        ({"auth_tag_type": b"SK32"}, ErrorCode.AUTH_TAG_NOT_SUPPORTED),
        ({"key_agreement_type": b"EC38"}, ErrorCode.KEY_EXCHANGE_NOT_SUPPORTED),
        ({"key_agreement_type": b"Mult"}, ErrorCode.KEY_EXCHANGE_NOT_SUPPORTED),
        ({"sas_type": b"B999"}, ErrorCode.SAS_NOT_SUPPORTED),
    ],
)
def test_commit_with_unsupported_algorithm(choice: dict[str, bytes], code: int) -> None:
    ep = make_endpoint("B", PASSIVE)
    peer = FakePeer()
    our_hello = _fake_exchange(ep.session, peer, peer.hello())
    ep.session.receive(peer.packet(peer.commit(our_hello, **choice)), 0.0)
    ep.drain_events()
    assert codes(ep, local=True) == [code]
    assert ep.failed is not None
    assert packet_type(ep.session.datagrams_to_send()[-1]) == b"Error   "


def test_old_version_gets_error_and_newer_is_ignored() -> None:
    ep = make_endpoint("A")
    peer = FakePeer()
    _fake_exchange(ep.session, peer, peer.hello(version=b"2.00"))
    ep.drain_events()
    assert not ep.of_type(HelloReceived) and ep.failed is None
    assert [packet_type(p) for p in ep.session.datagrams_to_send()] == [b"HelloACK"]
    ep2 = make_endpoint("A")
    peer2 = FakePeer()
    _fake_exchange(ep2.session, peer2, peer2.hello(version=b"1.00"))
    ep2.drain_events()
    assert codes(ep2, local=True) == [ErrorCode.UNSUPPORTED_VERSION]
    # "1.11" and "1.1 " are the same version (only 3 octets count, section 4.1.1).
    ep3 = make_endpoint("A")
    peer3 = FakePeer()
    _fake_exchange(ep3.session, peer3, peer3.hello(version=b"1.11"))
    ep3.drain_events()
    assert ep3.of_type(HelloReceived)


def test_equal_zids_and_ssrc_collision() -> None:
    ep = make_endpoint("A")
    peer = FakePeer(zid=ep.session._zid)
    _fake_exchange(ep.session, peer, peer.hello())
    ep.drain_events()
    assert codes(ep, local=True) == [ErrorCode.EQUAL_ZIDS]
    ep2 = make_endpoint("A", ssrc=0xFACE)
    peer2 = FakePeer(ssrc=0xFACE)
    _fake_exchange(ep2.session, peer2, peer2.hello())
    ep2.drain_events()
    assert codes(ep2, local=True) == [ErrorCode.SSRC_COLLISION]


def test_ping_gets_pingack() -> None:
    ep = make_endpoint("A")
    ep.session.start(0.0)
    ep.session.datagrams_to_send()
    ping = Ping(version=b"1.10", endpoint_hash=b"E" * 8).encode()
    ep.session.receive(encode_packet(ping, 5, 0x12345678), 0.0)
    (reply,) = ep.session.datagrams_to_send()
    ack = decode_message(decode_packet(reply).message)
    assert isinstance(ack, PingAck)
    assert ack.received_endpoint_hash == b"E" * 8
    assert ack.received_ssrc == 0x12345678
    assert ack.sender_endpoint_hash == ep.session._zid[:8]


def test_sequence_numbers_increase_on_every_packet() -> None:
    link = make_pair(config_b=PASSIVE)
    link.filter = drop(COMMIT, sender="A")
    link.start()
    link.run()
    seqs = [decode_packet(p).sequence for who, p in link.packets if who == "A"]
    assert all((b - a) % 65536 == 1 for a, b in itertools.pairwise(seqs))
    commits = [decode_packet(p) for who, p in link.packets if packet_type(p) == COMMIT]
    assert commits[0].message == commits[1].message  # identical retransmission (section 6)


# -- retained secrets and continuity (sections 4.3, 4.6.1) ---------------------------------------


def call(ca: RetainedSecrets, cb: RetainedSecrets, seed: int, **cfg: object) -> Link:
    link = make_pair(ZrtpConfig(**cfg), ZrtpConfig(**cfg), ca, cb, seed=seed)  # type: ignore[arg-type]
    link.start()
    link.run()
    assert_agreed(link)
    return link


def caches(tmp_path: Path) -> tuple[RetainedSecrets, RetainedSecrets]:
    return RetainedSecrets(tmp_path / "a"), RetainedSecrets(tmp_path / "b")


def test_second_call_matches_and_v_flag_flows(tmp_path: Path) -> None:
    ca, cb = caches(tmp_path)
    first = call(ca, cb, seed=1)
    assert first.a.secure.continuity == "new"  # type: ignore[union-attr]
    rs1 = ca.lookup(cb.zid).rs1
    assert rs1 is not None and rs1 == cb.lookup(ca.zid).rs1
    second = call(ca, cb, seed=2)
    ra, rb = assert_agreed(second)
    assert ra.continuity == rb.continuity == "match"
    assert ra.sas != first.a.secure.sas or ra.sashash != first.a.secure.sashash  # type: ignore[union-attr]
    assert ca.lookup(cb.zid).rs2 == rs1  # old rs1 moved to rs2
    assert not ra.sas_verified
    second.a.session.mark_sas_verified()
    second.b.session.mark_sas_verified()
    third = call(RetainedSecrets(tmp_path / "a"), RetainedSecrets(tmp_path / "b"), seed=3)
    ra, rb = assert_agreed(third)
    assert ra.sas_verified and rb.sas_verified
    assert ra.local_sas_verified and ra.peer_sas_verified


def test_wrong_retained_secret_is_a_mismatch_until_sas_verified(tmp_path: Path) -> None:
    ca, cb = caches(tmp_path)
    call(ca, cb, seed=1)
    cb.update(ca.zid, b"\x66" * 32, 0xFFFFFFFF, keep_old_as_rs2=False)  # B's cache is off
    cb.update(ca.zid, b"\x67" * 32, 0xFFFFFFFF, keep_old_as_rs2=True)
    before_a = ca.lookup(cb.zid)
    link = call(ca, cb, seed=2)
    ra, rb = assert_agreed(link)
    assert ra.continuity == rb.continuity == "mismatch"
    assert ra.cache_update_deferred and rb.cache_update_deferred
    assert ca.lookup(cb.zid) == before_a  # untouched until the user acts
    again = call(ca, cb, seed=3)
    assert again.a.secure.continuity == "mismatch"  # type: ignore[union-attr]
    again.a.session.mark_sas_verified()
    again.b.session.mark_sas_verified()
    healed = call(ca, cb, seed=4)
    ra, rb = assert_agreed(healed)
    assert ra.continuity == rb.continuity == "match"
    assert ra.sas_verified


def test_peer_that_lost_its_cache(tmp_path: Path) -> None:
    ca, cb = caches(tmp_path)
    call(ca, cb, seed=1)
    cb.forget(ca.zid)
    link = call(ca, cb, seed=2)
    ra, rb = assert_agreed(link)
    assert ra.continuity == "mismatch"  # we expected a secret and it was gone
    assert rb.continuity == "new"


def test_rs2_recovers_an_interrupted_update(tmp_path: Path) -> None:
    ca, cb = caches(tmp_path)
    call(ca, cb, seed=1)
    shutil.copy(tmp_path / "b", tmp_path / "b.saved")
    call(ca, cb, seed=2)  # A and B both move on ...
    shutil.copy(tmp_path / "a", tmp_path / "a.saved")
    for seed in (3, 4, 5):  # whichever side ends up initiator
        shutil.copy(tmp_path / "a.saved", tmp_path / "a")
        shutil.copy(tmp_path / "b.saved", tmp_path / "b")  # ... but B's update was lost
        ca2, cb2 = RetainedSecrets(tmp_path / "a"), RetainedSecrets(tmp_path / "b")
        assert ca2.lookup(cb2.zid).rs2 == cb2.lookup(ca2.zid).rs1
        link = call(ca2, cb2, seed=seed)
        ra, rb = assert_agreed(link)
        assert ra.continuity == rb.continuity == "match"
        assert ca2.lookup(cb2.zid).rs1 == cb2.lookup(ca2.zid).rs1  # back in sync


def test_signature_evidence_lifts_a_deferred_update(tmp_path: Path) -> None:
    ca, cb = caches(tmp_path)
    call(ca, cb, seed=1)
    cb.forget(ca.zid)
    link = call(ca, cb, seed=2)
    before = ca.lookup(cb.zid).rs1
    link.a.session.peer_signature_verified()
    assert ca.lookup(cb.zid).rs1 != before
    assert ca.lookup(cb.zid).rs1 == cb.lookup(ca.zid).rs1


def test_aux_secret_match_and_mismatch() -> None:
    def run(aux_a: bytes, aux_b: bytes | None) -> Link:
        link = Link(
            make_endpoint("A", seed=1, aux_secret=aux_a),
            make_endpoint("B", seed=2, aux_secret=aux_b),
        )
        link.start()
        link.run()
        assert_agreed(link)
        return link

    same = run(b"family key", b"family key")
    assert not same.a.of_type(SecurityWarning)
    differs = run(b"family key", b"other key")
    assert differs.a.of_type(SecurityWarning) and differs.b.of_type(SecurityWarning)
    # Same randomness, so only s2 differs: the keys must too.
    assert same.a.secure.keys != differs.a.secure.keys  # type: ignore[union-attr]
    one_sided = run(b"family key", None)
    assert one_sided.a.of_type(SecurityWarning) and not one_sided.b.of_type(SecurityWarning)


def test_cacheless_endpoint(tmp_path: Path) -> None:
    ca, cb = caches(tmp_path)
    call(ca, cb, seed=1, cache_expiration=0)
    assert ca.lookup(cb.zid).rs1 is None and cb.lookup(ca.zid).rs1 is None


# -- signing hook (section 7.2) -----------------------------------------------------------------

SIGNING = ZrtpConfig(sign_sas=True, signature_capable=True)
PGP_SIG = b"\xc2\x09" + b"signature"  # a new-format OpenPGP packet, 11 octets


def test_signature_hook_holds_confirm_until_provided() -> None:
    link = make_pair(SIGNING, ZrtpConfig(sign_sas=True, signature_capable=True, passive=True))
    link.start()
    link.run(limit=0.5)
    # Both asked; the responder holds Confirm1.
    need_a = link.a.of_type(SasSignatureNeeded)
    need_b = link.b.of_type(SasSignatureNeeded)
    assert len(need_a) == 1 and len(need_b) == 1
    assert need_a[0].sashash == need_b[0].sashash
    assert link.b.session.state is State.RESPONDER_SIGNING
    assert not link.sent("B", CONF1)
    link.b.session.provide_signature(b"PGP ", PGP_SIG, 0.5)  # padded on the wire
    link.now = 0.5
    link.pump()
    assert link.sent("B", CONF1) == [0.5]
    # The initiator saw B's signature and now holds Confirm2 for its own.
    sig_at_a = link.a.of_type(PeerSignature)
    assert [(s.sig_type, s.sig_bytes) for s in sig_at_a] == [(b"PGP ", PGP_SIG)]
    assert link.a.session.state is State.INITIATOR_SIGNING
    for event in link.a.events + link.b.events:
        assert need_a[0].sashash.hex() not in repr(event)
    link.a.session.provide_signature(b"X509", b"cert-and-sig", 0.6)
    link.now = 0.6
    link.run()
    _ra, rb = assert_agreed(link)
    sig_at_b = link.b.of_type(PeerSignature)
    assert [(s.sig_type, s.sig_bytes) for s in sig_at_b] == [(b"X509", b"cert-and-sig")]
    assert sig_at_b[0].sashash == rb.sashash == need_b[0].sashash


def test_signature_wait_is_bounded() -> None:
    link = make_pair(SIGNING, ZrtpConfig(sign_sas=True, signature_capable=True, passive=True))
    link.start()
    link.run()
    assert_agreed(link)
    assert link.sent("B", CONF1) == pytest.approx([2.0])
    assert not link.a.of_type(PeerSignature) and not link.b.of_type(PeerSignature)
    assert any("no SAS signature" in w.reason for w in link.b.of_type(SecurityWarning))


def test_unsigned_answer_and_peer_without_s_flag() -> None:
    link = make_pair(SIGNING, ZrtpConfig(signature_capable=False, passive=True))
    link.start()
    link.run()
    assert_agreed(link)
    assert not link.a.of_type(SasSignatureNeeded)  # B cannot check signatures
    link2 = make_pair(SIGNING, ZrtpConfig(sign_sas=True, signature_capable=True, passive=True))

    def answer_unsigned(ep: Endpoint, event: object) -> None:
        if isinstance(event, SasSignatureNeeded):
            ep.session.provide_signature(b"PGP ", None, link2.now)

    link2.on_event = answer_unsigned
    link2.start()
    link2.run()
    assert_agreed(link2)
    assert link2.now == 0.0
    assert not link2.b.of_type(PeerSignature)


# -- multistream (section 4.4.3) ----------------------------------------------------------------


def test_second_stream_uses_multistream(tmp_path: Path) -> None:
    ca, cb = caches(tmp_path)
    first = call(ca, cb, seed=1)
    r1a, r1b = assert_agreed(first)
    assert r1a.multistream_context is not None and r1b.multistream_context is not None
    rs1_before = ca.lookup(cb.zid).rs1
    video = Link(
        make_endpoint("A", cache=ca, seed=11, multistream=r1a.multistream_context),
        make_endpoint("B", cache=cb, seed=12, multistream=r1b.multistream_context),
    )
    video.start()
    video.run()
    ra, rb = assert_agreed(video)
    assert ra.multistream and rb.multistream
    assert ra.key_agreement == "Mult"
    assert ra.sas == r1a.sas  # one SAS per call
    assert ra.keys.outbound not in (r1a.keys.outbound, r1a.keys.inbound)
    assert ca.lookup(cb.zid).rs1 == rs1_before  # Multistream does not touch the cache
    assert not [p for _, p in video.packets if packet_type(p) in (DH1, DH2)]


def test_streams_built_up_front_then_attached(tmp_path: Path) -> None:
    """The bridge's order: all Hellos (and a=zrtp-hash) at SDP time, DH first, then Mult."""
    ca, cb = caches(tmp_path)
    audio = Link(make_endpoint("A", cache=ca, seed=1), make_endpoint("B", cache=cb, seed=2))
    video = Link(
        make_endpoint("A", cache=ca, seed=3, offer_multistream=True),
        make_endpoint("B", cache=cb, seed=4, offer_multistream=True),
    )
    hashes = (video.a.session.local_hello_hash, video.b.session.local_hello_hash)
    audio.start()
    audio.run()
    ra, rb = assert_agreed(audio)
    assert ra.multistream_context is not None and rb.multistream_context is not None
    video.a.session.attach_multistream(ra.multistream_context)
    video.b.session.attach_multistream(rb.multistream_context)
    video.a.session.set_expected_peer_hello_hash(hashes[1], 0.0)
    video.start()
    video.run()
    va, vb = assert_agreed(video)
    assert va.multistream and va.hello_hash_verified and vb.sas == rb.sas


def test_multistream_commit_without_first_stream_keys() -> None:
    ep = make_endpoint("B", PASSIVE, offer_multistream=True)
    peer = FakePeer()
    our_hello = _fake_exchange(ep.session, peer, peer.hello(key_agreement_types=(b"Mult",)))
    ep.session.receive(peer.packet(peer.commit(our_hello, key_agreement_type=b"Mult")), 0.0)
    ep.drain_events()
    assert codes(ep, local=True) == [ErrorCode.NO_SHARED_SECRET]


def test_multistream_nonce_reuse_is_refused(tmp_path: Path) -> None:
    ca, cb = caches(tmp_path)
    first = call(ca, cb, seed=1)
    ctx_b = first.b.secure.multistream_context  # type: ignore[union-attr]
    assert ctx_b is not None
    reused = b"\x42" * 16
    ctx_b.used_nonces.add(reused)
    ep = make_endpoint("B", cache=cb, seed=21, multistream=ctx_b)
    peer = FakePeer(zid=ca.zid)
    hello = peer.hello(key_agreement_types=(b"Mult",))
    our_hello = _fake_exchange(ep.session, peer, hello)
    ep.session.receive(
        peer.packet(peer.commit(our_hello, key_agreement_type=b"Mult", nonce=reused)), 0.0
    )
    ep.drain_events()
    assert codes(ep, local=True) == [ErrorCode.NONCE_REUSE]


# -- hygiene -------------------------------------------------------------------------------------


def test_no_key_material_in_reprs() -> None:
    link = make_pair()
    link.start()
    link.run()
    ra, _ = assert_agreed(link)
    secrets = [ra.keys.outbound.key, ra.keys.inbound.salt, ra.sashash]
    assert ra.exported_key is not None
    secrets.append(ra.exported_key)
    texts = [repr(ra), repr(ra.keys), repr(link.a.session), repr(ra.multistream_context)]
    texts += [repr(e) for e in link.a.events]
    for text in texts:
        for secret in secrets:
            assert secret.hex() not in text
            assert repr(secret) not in text


def test_close_drops_keys_and_timers() -> None:
    link = make_pair(config_b=PASSIVE)
    link.filter = drop(C2ACK, times=100)
    link.start()
    link.a.session.close()
    assert link.a.session.keys is None
    assert link.a.session.get_timer() is None
    link.a.session.receive(b"garbage", 1.0)
    assert link.a.session.state is State.CLOSED


def test_mark_sas_verified_needs_secure_state() -> None:
    ep = make_endpoint("A")
    with pytest.raises(RuntimeError):
        ep.session.mark_sas_verified()


def test_failed_event_once() -> None:
    link = make_pair(config_b=PASSIVE)
    link.filter = tamper(DH2, "A", flip_pv)
    link.start()
    link.run()
    assert len(link.b.of_type(Failed)) == 1 and len(link.a.of_type(Failed)) == 1
