"""Our ZrtpSession against libbzrtp (linphone's ZRTP library), in process, on virtual time.

bzrtp checks CRC, hash chain, every MAC, hvi and the Confirm encryption itself, so reaching
the secure state with the same SAS and crossed SRTP keys proves the wire formats and the key
derivation. Skipped when libbzrtp is not installed (it comes with linphone-cli).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from freecall.srtp.keys import RetainedSecrets
from freecall.srtp.zrtp import SecureStateReached, ZrtpConfig
from zrtp.bzrtp_peer import AUTH_IDS, KA_IDS, BzrtpPeer, load_library
from zrtp.zrtp_harness import Endpoint, make_endpoint, packet_type

LIB = load_library()
# libbzrtp0 comes with linphone-cli, which scripts/test installs: a missing library is a broken
# test environment, so it fails here rather than skipping.
assert LIB is not None, "libbzrtp.so.0 not found: install linphone-cli (scripts/test does)"
pytestmark = [pytest.mark.interop]

Drop = Callable[[str, bytes], bool]  # (direction "ours"/"bzrtp", message type) -> drop?


def exchange(
    ours: Endpoint,
    peer: BzrtpPeer,
    drop: Drop | None = None,
    bzrtp_delay_ms: int = 0,
    limit_ms: int = 5000,
) -> list[tuple[int, str, bytes]]:
    """Run both on a 5 ms virtual clock until both are secure (or the limit)."""
    log: list[tuple[int, str, bytes]] = []
    ours.session.start(0.0)
    started = False
    for ms in range(0, limit_ms, 5):
        now = ms / 1000
        if not started and ms >= bzrtp_delay_ms:
            peer.start()
            started = True
        if started:
            peer.iterate(ms)
        timer = ours.session.get_timer()
        if timer is not None and timer <= now:
            ours.session.handle_timer(now)
        for _ in range(10):  # let answers bounce within the same tick
            moved = False
            for pkt in ours.session.datagrams_to_send():
                moved = True
                kind = packet_type(pkt)
                log.append((ms, "ours", kind))
                if started and not (drop and drop("ours", kind)):
                    peer.receive(pkt)
            for pkt in peer.outbox:
                moved = True
                kind = packet_type(pkt)
                log.append((ms, "bzrtp", kind))
                if not (drop and drop("bzrtp", kind)):
                    ours.session.receive(pkt, now)
            peer.outbox.clear()
            if not moved:
                break
        ours.drain_events()
        if ours.secure is not None and peer.result is not None:
            break
    return log


def no_hello_ack(direction: str, kind: bytes) -> bool:
    return direction == "ours" and kind == b"HelloACK"


def check(ours: Endpoint, peer: BzrtpPeer) -> SecureStateReached:
    result = ours.secure
    assert result is not None, (ours.events, peer.status)
    assert peer.result is not None and peer.secure
    # bzrtp shows B256 words as "word1:word2", we as "word1 word2": same words.
    assert result.sas == peer.result.sas.replace(":", " ")
    assert result.keys.outbound.key == peer.result.peer_key
    assert result.keys.outbound.salt == peer.result.peer_salt
    assert result.keys.inbound.key == peer.result.self_key
    assert result.keys.inbound.salt == peer.result.self_salt
    assert peer.result.auth_tag == AUTH_IDS[result.auth_tag]
    assert peer.result.key_agreement == KA_IDS[result.key_agreement]
    return result


@pytest.mark.parametrize("ka", ["X255", "DH3k"])
@pytest.mark.parametrize("auth", ["HS32", "HS80"])
@pytest.mark.parametrize("we_commit", [True, False])
def test_interop(ka: str, auth: str, we_commit: bool) -> None:
    assert LIB is not None
    peer = BzrtpPeer(LIB, ssrc=0x1111, key_agreements=(ka,), auth_tags=(auth,))
    cfg = ZrtpConfig(key_agreement_types=(ka,), auth_tag_types=(auth,), passive=not we_commit)
    ours = make_endpoint("A", cfg, ssrc=0x2222, seed=7)
    try:
        # bzrtp commits once its Hello is acknowledged; withholding our HelloACKs makes our
        # Commit (which also acknowledges, section 6) decide the roles.
        exchange(ours, peer, drop=no_hello_ack if we_commit else None)
        result = check(ours, peer)
        assert result.key_agreement == ka and result.auth_tag == auth
        assert result.role == ("initiator" if we_commit else "responder")
    finally:
        peer.close()


def test_interop_b256_and_hello_hash_binding() -> None:
    assert LIB is not None
    peer = BzrtpPeer(LIB, ssrc=0x1111, sas_types=("B256",))
    ours = make_endpoint("A", ZrtpConfig(sas_types=("B256", "B32")), ssrc=0x2222, seed=8)
    try:
        assert peer.set_peer_hello_hash(ours.session.zrtp_hash_attribute) == 0
        ours.session.set_expected_peer_hello_hash(peer.hello_hash, 0.0)
        exchange(ours, peer)
        result = check(ours, peer)
        assert result.sas_type == "B256" and result.sas is not None and " " in result.sas
        assert result.hello_hash_verified
    finally:
        peer.close()


def test_interop_default_preferences() -> None:
    """bzrtp's own defaults against ours: whatever is picked, both sides agree."""
    assert LIB is not None
    peer = BzrtpPeer(LIB, ssrc=0x1111)
    ours = make_endpoint("A", ZrtpConfig(), ssrc=0x2222, seed=9)
    try:
        exchange(ours, peer)
        check(ours, peer)
    finally:
        peer.close()


@pytest.mark.parametrize(
    ("direction", "kind"),
    [("ours", b"Commit  "), ("bzrtp", b"DHPart1 "), ("ours", b"DHPart2 "), ("ours", b"Confirm2")],
)
def test_interop_recovers_from_loss(direction: str, kind: bytes) -> None:
    assert LIB is not None
    peer = BzrtpPeer(LIB, ssrc=0x1111)
    ours = make_endpoint("A", ZrtpConfig(), ssrc=0x2222, seed=10)
    dropped = {"done": False}

    def drop_once(where: str, what: bytes) -> bool:
        if no_hello_ack(where, what):
            return True  # keeps us the initiator
        if where == direction and what == kind and not dropped["done"]:
            dropped["done"] = True
            return True
        return False

    try:
        log = exchange(ours, peer, drop=drop_once)
        assert check(ours, peer).role == "initiator"
        assert dropped["done"]
        assert len([1 for _, who, k in log if k == kind and who == direction]) >= 2
    finally:
        peer.close()


def test_interop_retained_secrets_and_v_flag(tmp_path: Path) -> None:
    """bzrtp's sqlite ZID cache and ours agree on rs1 IDs, s1 and the new rs1 every call."""
    assert LIB is not None
    cache = RetainedSecrets(tmp_path / "ours")
    bz_cache = str(tmp_path / "bzrtp.sqlite")
    seen = []
    for call in range(4):
        peer = BzrtpPeer(LIB, ssrc=0x1111, cache_path=bz_cache)
        ours = make_endpoint("A", ZrtpConfig(), cache=cache, ssrc=0x2222, seed=30 + call)
        try:
            exchange(ours, peer, drop=no_hello_ack if call % 2 else None)
            result = check(ours, peer)
            assert peer.result is not None
            seen.append((result.continuity, peer.result.cache_mismatch, result.sas_verified))
            if call == 1:
                peer.sas_verified()
                ours.session.mark_sas_verified()
        finally:
            peer.close()
    assert seen == [("new", 0, False), ("match", 0, False), ("match", 0, True), ("match", 0, True)]
    # We forget bzrtp: it expected a secret and reports a cache mismatch; we see a new peer.
    for zid in cache.peers():
        cache.forget(zid)
    peer = BzrtpPeer(LIB, ssrc=0x1111, cache_path=bz_cache)
    ours = make_endpoint("A", ZrtpConfig(), cache=cache, ssrc=0x2222, seed=40)
    try:
        exchange(ours, peer)
        result = check(ours, peer)
        assert peer.result is not None and peer.result.cache_mismatch == 1
        assert result.continuity == "new"
    finally:
        peer.close()
