"""OpenPGP verification of the ZRTP SAS hash with the real GnuPG (issue 7).

Each test makes its nodes' keyrings in temporary homes. The tamper tests are the issue's: a
flipped bit in the signature, a signature by another key with the right user ID, an expired
key, a revoked key; plus the downgrade (a known peer that does not sign) and a reflected
signature of our own.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from freecall.gpgverify.gpg import GpgHome, normalise_address, normalise_fingerprint
from freecall.gpgverify.pins import PinStore
from freecall.gpgverify.service import KeyPaths, KeyStore, SasKeys
from freecall.gpgverify.verdict import Outcome
from harness.keys import make_user_key

ALICE = "alice@a.test"
BOB = "bob@b.test"


def node(tmp_path: Path, name: str, addresses: list[str]) -> tuple[KeyStore, str]:
    store = KeyStore(KeyPaths.for_state(tmp_path / name))
    return store, store.own_key(None, name, addresses)


def offered(store: KeyStore, fingerprint: str, address: str) -> bytes:
    return store.keyring.export(fingerprint, armor=False, address=address)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[KeyStore, str, KeyStore, str]]:
    a, fa = node(tmp_path, "a", [ALICE])
    b, fb = node(tmp_path, "b", [BOB])
    yield a, fa, b, fb
    a.close()
    b.close()


def test_address_normalisation() -> None:
    assert normalise_address("sip:Alice@A.Test;transport=tls") == "Alice@a.test"
    assert normalise_address("freecall laptop <alice@a.test>") == ALICE
    assert normalise_address("sips:bob@b.test:5061") == BOB
    assert normalise_fingerprint("0123 4567 89ab cdef 0123  4567 89AB CDEF 0123 4567") == \
        "0123456789ABCDEF0123456789ABCDEF01234567"
    with pytest.raises(ValueError):
        normalise_fingerprint("1234")


def test_first_use_then_verified_then_a_new_key_is_suspected_until_trusted(
    pair: tuple[KeyStore, str, KeyStore, str], tmp_path: Path
) -> None:
    a, fa, b, _ = pair
    sashash = os.urandom(32)
    signature = a.keyring.sign(fa, sashash)
    assert 60 < len(signature) < 300  # fits the Confirm signature block (RFC 6189 7.2.1)

    first = b.verify(ALICE, signature, sashash, offered(a, fa, ALICE), None)
    assert first.outcome is Outcome.TRUSTED_FIRST_USE, first
    assert b.pins.get(ALICE) is not None and b.pins.get(ALICE).fingerprint == fa  # type: ignore[union-attr]

    again = os.urandom(32)
    second = b.verify(ALICE, a.keyring.sign(fa, again), again, None, None)
    assert second.outcome is Outcome.VERIFIED, second

    # Alice's node lost its state and made a new key: a different key for the same address
    a2, fa2 = node(tmp_path, "a2", [ALICE])
    third_hash = os.urandom(32)
    third = b.verify(ALICE, a2.keyring.sign(fa2, third_hash), third_hash,
                     offered(a2, fa2, ALICE), None)
    assert third.outcome is Outcome.MITM_SUSPECTED and third.peer_key == fa2, third
    assert b.pins.get(ALICE).fingerprint == fa  # type: ignore[union-attr]  # never re-pinned silently

    b.trust(ALICE, fa2)  # `freecall keys trust alice@a.test FPR`
    fourth = os.urandom(32)
    assert b.verify(ALICE, a2.keyring.sign(fa2, fourth), fourth, None, None).outcome \
        is Outcome.VERIFIED
    a2.close()


def test_imported_key_verifies_on_the_first_call(
    pair: tuple[KeyStore, str, KeyStore, str]
) -> None:
    a, fa, b, _ = pair
    assert b.import_file(a.keyring.export(fa)) == [fa]  # `freecall keys import alice.asc`
    sashash = os.urandom(32)
    verdict = b.verify(ALICE, a.keyring.sign(fa, sashash), sashash, None, None)
    assert verdict.outcome is Outcome.VERIFIED, verdict
    assert b.pins.get(ALICE).how == "keyring"  # type: ignore[union-attr]


def test_flipped_bit_is_suspected(pair: tuple[KeyStore, str, KeyStore, str]) -> None:
    a, fa, b, _ = pair
    b.import_file(a.keyring.export(fa))
    sashash = os.urandom(32)
    signature = bytearray(a.keyring.sign(fa, sashash))
    for position in (len(signature) - 3, len(signature) // 2):
        tampered = bytearray(signature)
        tampered[position] ^= 0x01
        verdict = b.verify(ALICE, bytes(tampered), sashash, None, None)
        assert verdict.outcome is Outcome.MITM_SUSPECTED, (position, verdict)
    # the right signature over another leg's hash (what a relaying MITM forwards)
    other = os.urandom(32)
    assert b.verify(ALICE, bytes(signature), other, None, None).outcome \
        is Outcome.MITM_SUSPECTED


def test_another_key_with_the_right_user_id(
    pair: tuple[KeyStore, str, KeyStore, str], tmp_path: Path
) -> None:
    a, fa, b, _ = pair
    b.import_file(a.keyring.export(fa))
    mallory, fm = node(tmp_path, "mallory", [ALICE])
    sashash = os.urandom(32)
    verdict = b.verify(ALICE, mallory.keyring.sign(fm, sashash), sashash,
                       offered(mallory, fm, ALICE), None)
    assert verdict.outcome is Outcome.MITM_SUSPECTED and verdict.peer_key == fm, verdict
    # with no key known for alice, mallory's key is only first-use (never "verified")
    fresh, _ = node(tmp_path, "fresh", [BOB])
    again = os.urandom(32)
    assert fresh.verify(ALICE, mallory.keyring.sign(fm, again), again,
                        offered(mallory, fm, ALICE), None).outcome is Outcome.TRUSTED_FIRST_USE
    mallory.close()
    fresh.close()


def test_key_without_the_address_does_not_count(
    pair: tuple[KeyStore, str, KeyStore, str], tmp_path: Path
) -> None:
    _, _, b, _ = pair
    carol, fc = node(tmp_path, "carol", ["carol@c.test"])
    sashash = os.urandom(32)
    verdict = b.verify(ALICE, carol.keyring.sign(fc, sashash), sashash,
                       carol.keyring.export(fc, armor=False), None)
    assert verdict.outcome is Outcome.UNVERIFIED, verdict
    assert b.pins.get(ALICE) is None
    carol.close()


def test_expired_key(pair: tuple[KeyStore, str, KeyStore, str], tmp_path: Path) -> None:
    _, _, b, _ = pair
    home = tmp_path / "old"
    old = GpgHome(home)
    ten_days_ago = str(int(time.time()) - 10 * 86400)
    subprocess.run(["gpg", "--homedir", old.path, "--batch", "--faked-system-time",
                    ten_days_ago, "--passphrase", "", "--pinentry-mode", "loopback",
                    "--quick-generate-key", f"old <{ALICE}>", "ed25519", "sign", "1d"],
                   check=True, capture_output=True)
    fingerprint = old.list_keys()[0].fingerprint
    sashash = os.urandom(32)
    signature = subprocess.run(
        ["gpg", "--homedir", old.path, "--batch", "--faked-system-time", ten_days_ago,
         "--detach-sign", "--digest-algo", "SHA256", "-u", fingerprint],
        input=sashash, check=True, capture_output=True).stdout
    b.import_file(old.export(fingerprint))
    verdict = b.verify(ALICE, signature, sashash, None, None)
    assert verdict.outcome is Outcome.UNVERIFIED and "expired" in verdict.reason, verdict
    old.close()


def test_revoked_key(pair: tuple[KeyStore, str, KeyStore, str]) -> None:
    a, fa, b, _ = pair
    sashash = os.urandom(32)
    signature = a.keyring.sign(fa, sashash)
    b.import_file(a.keyring.export(fa))
    revocation = (a.paths.home / "openpgp-revocs.d" / f"{fa}.rev").read_text()
    # GnuPG stores it with a ':' before the armour so that it is not imported by accident
    b.import_file(revocation.replace(":-----BEGIN", "-----BEGIN").encode())
    verdict = b.verify(ALICE, signature, sashash, None, None)
    assert verdict.outcome is Outcome.MITM_SUSPECTED and "revoked" in verdict.reason, verdict


def test_downgrade_and_no_key(pair: tuple[KeyStore, str, KeyStore, str]) -> None:
    a, fa, b, _ = pair
    sashash = os.urandom(32)
    assert b.verify(ALICE, None, sashash, None, None).outcome is Outcome.UNVERIFIED
    b.import_file(a.keyring.export(fa))
    verdict = b.verify(ALICE, None, sashash, None, None)
    assert verdict.outcome is Outcome.MITM_SUSPECTED and "no signature" in verdict.reason
    # a signature by a key we cannot find, nothing offered
    c = b.verify(BOB, a.keyring.sign(fa, sashash), sashash, None, None)
    assert c.outcome is Outcome.UNVERIFIED


def test_our_own_signature_reflected(pair: tuple[KeyStore, str, KeyStore, str]) -> None:
    _, _, b, fb = pair
    sashash = os.urandom(32)
    verdict = b.verify(ALICE, b.keyring.sign(fb, sashash), sashash, None, fb)
    assert verdict.outcome is not Outcome.VERIFIED
    assert verdict.outcome is Outcome.MITM_SUSPECTED


def test_continuity_mismatch(pair: tuple[KeyStore, str, KeyStore, str]) -> None:
    a, fa, b, _ = pair
    sashash = os.urandom(32)
    assert b.verify(ALICE, None, sashash, None, None, continuity_mismatch=True).outcome \
        is Outcome.MITM_SUSPECTED
    b.import_file(a.keyring.export(fa))
    explained = b.verify(ALICE, a.keyring.sign(fa, sashash), sashash, None, None,
                         continuity_mismatch=True)
    assert explained.outcome is Outcome.VERIFIED and explained.lifts_cache_mismatch


def test_garbage_signatures_and_offers(pair: tuple[KeyStore, str, KeyStore, str]) -> None:
    _, _, b, _ = pair
    sashash = os.urandom(32)
    for junk in (b"\x00", os.urandom(100), b"\x88" * 40, os.urandom(5000)):
        verdict = b.verify(ALICE, junk, sashash, os.urandom(300), None)
        assert verdict.outcome in (Outcome.MITM_SUSPECTED, Outcome.UNVERIFIED), junk[:8]
    assert b.pins.get(ALICE) is None


def test_node_key_names_every_address_and_gains_new_ones(tmp_path: Path) -> None:
    store, fingerprint = node(tmp_path, "n", [ALICE, "carol@a.test"])
    assert set(store.keyring.key(fingerprint).addresses) == {ALICE, "carol@a.test"}  # type: ignore[union-attr]
    again = store.own_key(None, "n", [ALICE, "carol@a.test", "dave@a.test"])
    assert again == fingerprint
    assert "dave@a.test" in store.keyring.key(fingerprint).addresses  # type: ignore[union-attr]
    only = store.keyring.export(fingerprint, armor=False, address="carol@a.test")
    assert len(only) < 400  # small enough for an SDP attribute
    store.close()


def test_long_state_directory(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*(["very-long-directory-name"] * 5))
    store, fingerprint = node(deep, "n", [ALICE])
    assert len(str(store.paths.home)) > 108
    sashash = os.urandom(32)
    assert store.keyring.sign(fingerprint, sashash)  # the agent's socket fits
    store.close()


def test_pins_survive_and_damage_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    pins = PinStore(path)
    pins.pin("sip:alice@A.test", "0123456789ABCDEF0123456789ABCDEF01234567", "first-use")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    other = PinStore(path)  # the CLI in another process
    assert other.get(ALICE) is not None
    other.forget(ALICE)
    assert pins.get(ALICE) is None  # the daemon sees the CLI's change
    path.write_text("{not json")
    assert PinStore(path).all() == []
    assert list(tmp_path.glob("pins.json.damaged-*"))


def test_async_face_signs_off_the_loop(tmp_path: Path) -> None:
    asyncio.run(_async_face(tmp_path))


async def _async_face(tmp_path: Path) -> None:
    keys = SasKeys(KeyPaths.for_state(tmp_path / "s"), name="s", addresses=[ALICE, BOB])
    fingerprint = await keys.start()
    offer = keys.offer("sip:bob@b.test")
    assert offer is not None and keys.offer("sip:bob@127.0.0.1") == offer
    assert base64.b64decode(offer)
    sashash = os.urandom(32)
    signature = await keys.sign(sashash)
    verdict = await keys.verify(BOB, signature, sashash, None)
    assert verdict.outcome is Outcome.MITM_SUSPECTED  # our own signature is never the peer's
    assert fingerprint
    # a reload added carol: the node key gains her user ID, and her calls offer it
    await keys.set_addresses([ALICE, BOB, "carol@b.test"])
    assert keys.store is not None
    assert "carol@b.test" in keys.store.keyring.key(fingerprint).addresses  # type: ignore[union-attr]
    carol = keys.offer("sip:carol@b.test")
    assert carol is not None and carol not in (offer, keys.offer(ALICE))
    await keys.close()


def test_a_voice_check_from_an_earlier_call_counts_unless_an_attack_shows() -> None:
    from freecall.gpgverify.verdict import Verdict, with_voice_check

    unverified = Verdict(Outcome.UNVERIFIED, "no signature and no key")
    assert with_voice_check(unverified, True).outcome is Outcome.VERIFIED
    assert with_voice_check(unverified, False) is unverified
    for outcome in (Outcome.MITM_SUSPECTED, Outcome.TRUSTED_FIRST_USE, Outcome.VERIFIED):
        verdict = Verdict(outcome, "why")
        assert with_voice_check(verdict, True) is verdict


def test_a_key_the_peer_nodes_record_names_is_expected_on_first_contact(
    pair: tuple[KeyStore, str, KeyStore, str], tmp_path: Path
) -> None:
    """The host-cache record of alice's node names fa: a first call signed by fa is verified
    (and pinned "record"); a key with the right user ID that the record does not name is an
    attacker's; no signature from a node whose record names a key is a downgrade."""
    a, fa, b, _ = pair
    record = "the host-cache record of node 0123456789abcdef"
    sashash = os.urandom(32)
    verdict = b.verify(ALICE, a.keyring.sign(fa, sashash), sashash, offered(a, fa, ALICE),
                       None, named=fa, named_by=record)
    assert verdict.outcome is Outcome.VERIFIED and record in verdict.reason, verdict
    assert b.pins.get(ALICE).how == "record"  # type: ignore[union-attr]
    b.forget(ALICE)

    mallory, fm = node(tmp_path, "mallory", [ALICE])
    sashash = os.urandom(32)
    verdict = b.verify(ALICE, mallory.keyring.sign(fm, sashash), sashash,
                       offered(mallory, fm, ALICE), None, named=fa, named_by=record)
    assert verdict.outcome is Outcome.MITM_SUSPECTED and verdict.peer_key == fm, verdict
    assert record in verdict.reason and b.pins.get(ALICE) is None
    assert b.verify(ALICE, None, sashash, None, None, named=fa).outcome \
        is Outcome.MITM_SUSPECTED
    # the record's key signed but was not offered (and never seen): nothing to check it with
    fresh, _ = node(tmp_path, "fresh", [BOB])
    assert fresh.verify(ALICE, a.keyring.sign(fa, sashash), sashash, None, None,
                        named=fa).outcome is Outcome.UNVERIFIED
    fresh.close()
    # the record's key has no user ID for the address: it does not speak for it
    carol, fc = node(tmp_path, "carol", ["carol@c.test"])
    verdict = b.verify(ALICE, carol.keyring.sign(fc, sashash), sashash,
                       offered(carol, fc, "carol@c.test"), None, named=fc)
    assert verdict.outcome is Outcome.UNVERIFIED and "no user ID" in verdict.reason, verdict
    # what the user decided comes first: a pin outranks the record
    b.trust(ALICE, fm)
    verdict = b.verify(ALICE, a.keyring.sign(fa, sashash), sashash, offered(a, fa, ALICE),
                       None, named=fa)
    assert verdict.outcome is Outcome.MITM_SUSPECTED, verdict
    mallory.close()
    carol.close()


def test_a_passphrase_protected_key_of_the_user(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """openpgp.key names a passphrase-protected key in the user's own keyring; the passphrase
    comes from openpgp.passphrase_file (first line, read once, mode 0600 or refused)."""
    home = Path(tempfile.mkdtemp(prefix="fcu"))  # short: the agent's socket lives in it
    try:
        fingerprint = make_user_key(home, f"Alice <{ALICE}>", "correct horse")
        secret = tmp_path / "passphrase"
        secret.write_text("correct horse\n")
        secret.chmod(0o600)
        paths = KeyPaths(home, tmp_path / "seen", tmp_path / "pins.json")

        async def started(passphrase_file: Path) -> SasKeys:
            keys = SasKeys(paths, key=fingerprint, addresses=[ALICE],
                           passphrase_file=str(passphrase_file))
            assert await keys.start() == fingerprint
            return keys

        async def main() -> None:
            keys = await started(secret)
            assert keys.can_sign and keys.offer(ALICE)
            sashash = os.urandom(32)
            signature = await keys.sign(sashash)
            assert signature is not None
            assert keys.store is not None
            assert keys.store.keyring.verify(signature, sashash).status == "good"
            await keys.close()
            GpgHome(home).close()  # the agent forgets the passphrase it was given

            secret.write_text("wrong horse\n")
            keys = await started(secret)
            assert not keys.can_sign and keys.offer(ALICE) is None
            assert await keys.sign(sashash) is None  # calls go on unsigned
            await keys.close()

            secret.write_text("correct horse\n")
            secret.chmod(0o644)
            keys = await started(secret)
            assert not keys.can_sign
            await keys.close()

            keys = SasKeys(paths, key=fingerprint, addresses=[ALICE])  # no passphrase at all
            await keys.start()
            assert not keys.can_sign
            await keys.close()

        with caplog.at_level(logging.ERROR, "freecall.gpgverify"):
            asyncio.run(main())
        wrong, open_to_all, none = [r.getMessage() for r in caplog.records
                                    if r.name == "freecall.gpgverify"]
        assert (f"OpenPGP key {fingerprint} cannot sign with the passphrase in {secret}: gpg "
                "could not sign: bad passphrase. Calls go on UNSIGNED") in wrong, wrong
        assert "open to other users (mode 0644): chmod 600" in open_to_all, open_to_all
        assert "needs a passphrase (openpgp.passphrase_file, or a gpg-agent" in none, none
    finally:
        GpgHome(home).close()
        shutil.rmtree(home, ignore_errors=True)
