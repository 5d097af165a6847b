"""The verification outcome of one call, decided from facts GnuPG and ZRTP established.

Pure: no GnuPG, no files. RFC 6189 section 7.2: each endpoint signs its own sashash; a man in
the middle who re-keys both legs faces two different sashash values and cannot produce the
far end's signature over ours. So a signature counts only if it verifies over OUR sashash,
by a key one of whose user IDs is the peer's address, and that key is the one we expect
(pinned, or imported by the user, or, for a first contact, named by the signed host-cache
record of the peer node the call went to or came from). Whatever GnuPG's trust database says
is irrelevant.

Outcomes (the issue's words, shown to users):
  verified           a good signature by the expected key (pinned, imported, or named by the
                     peer node's record: docs/security.md says what each proves)
  trusted-first-use  a good signature by a key bound to the address, seen for the first time
                     (now pinned): no attacker on this call unless one was already there on
                     the first one
  unverified         no signature or no usable key: the SAS must be compared by voice
  mitm-suspected     evidence of an attacker: a signature that does not verify over our
                     hash, a key other than the pinned one, a revoked key, a known key that
                     did not sign, or a ZRTP retained-secret mismatch (section 4.3.2)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from freecall.gpgverify.gpg import SignatureCheck


class Outcome(StrEnum):
    VERIFIED = "verified"
    TRUSTED_FIRST_USE = "trusted-first-use"
    UNVERIFIED = "unverified"
    MITM_SUSPECTED = "mitm-suspected"


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    reason: str
    peer_key: str | None = None  # the fingerprint that signed, when known
    pin: str | None = None  # pin ``peer_key`` for the address with this kind (pins.HOW)
    lifts_cache_mismatch: bool = False  # RFC 6189 4.6.1.1: a valid signature is evidence


def decide(
    address: str,
    check: SignatureCheck | None,
    *,
    pinned: str | None,
    imported: frozenset[str],
    named: str | None = None,
    named_by: str = "the peer node's record",
    continuity_mismatch: bool = False,
) -> Verdict:
    """One call's outcome.

    ``check``: GnuPG's result for the peer's signature over our sashash (None: the peer sent
    none). ``pinned``: the fingerprint pinned for ``address``. ``imported``: fingerprints of
    keys in the user's keyring whose user IDs name ``address``. ``named``: the fingerprint
    the peer node's host-cache record names (``named_by`` says which record); it counts only
    when neither a pin nor an imported key does: what the user decided comes first.
    """
    expected = ({pinned} if pinned else set()) | set(imported)
    record = None
    if named and not expected:
        expected, record = {named}, named
    verdict = _decide_signature(address, check, pinned, expected, record, named_by)
    if continuity_mismatch and verdict.outcome is not Outcome.VERIFIED:
        return Verdict(Outcome.MITM_SUSPECTED,
                       "ZRTP retained secrets differ from the last call (RFC 6189 4.3.2)",
                       verdict.peer_key)
    if continuity_mismatch:
        return Verdict(Outcome.VERIFIED, verdict.reason + "; the retained-secret mismatch is "
                       "explained (the peer lost its cache)", verdict.peer_key, verdict.pin,
                       lifts_cache_mismatch=True)
    return verdict


def _decide_signature(
    address: str,
    check: SignatureCheck | None,
    pinned: str | None,
    expected: set[str],
    record: str | None,
    named_by: str,
) -> Verdict:
    known = f"named by {named_by}" if record else "known"
    if check is None:
        if expected:
            return Verdict(Outcome.MITM_SUSPECTED,
                           f"no signature, yet {address} has a key {known} (a man in the "
                           "middle cannot sign; a downgrade looks like this)")
        return Verdict(Outcome.UNVERIFIED, f"no signature and no key for {address}: compare "
                       "the SAS by voice")
    if check.status in ("bad", "malformed"):
        return Verdict(Outcome.MITM_SUSPECTED,
                       f"the signature does not verify over our SAS hash ({check.detail})",
                       check.fingerprint)
    if check.status == "revoked-key":
        return Verdict(Outcome.MITM_SUSPECTED, f"signed by a revoked key {check.fingerprint}",
                       check.fingerprint)
    fingerprint = check.fingerprint
    if check.status == "no-key":
        if expected and fingerprint not in expected:
            return Verdict(Outcome.MITM_SUSPECTED,
                           f"signed by an unknown key {fingerprint or '?'}, not the one "
                           f"{known} for {address}", fingerprint)
        return Verdict(Outcome.UNVERIFIED,
                       f"signed by key {fingerprint or '?'} which we do not have", fingerprint)
    if check.status == "expired-key":
        return Verdict(Outcome.UNVERIFIED, f"the key {fingerprint} has expired: compare the "
                       "SAS by voice, then renew or trust a new key", fingerprint)
    # a good signature over our sashash
    bound = address in check.addresses
    if fingerprint in expected and bound:
        if fingerprint == record:
            return Verdict(Outcome.VERIFIED, f"signed by the key {named_by} names for "
                           f"{address}", fingerprint, pin="record")
        how = "pinned" if fingerprint == pinned else "imported"
        return Verdict(Outcome.VERIFIED, f"signed by the {how} key for {address}", fingerprint,
                       pin=None if fingerprint == pinned else "keyring")
    if fingerprint in expected:
        # the expected key signed, but none of its user IDs names the address (any more):
        # not evidence of an attacker, and not evidence of who speaks either
        return Verdict(Outcome.UNVERIFIED, f"signed by {fingerprint}, the key {known} for "
                       f"{address}, which has no user ID for it", fingerprint)
    if expected:
        return Verdict(Outcome.MITM_SUSPECTED,
                       f"signed by {fingerprint}, not the key {known} for {address} "
                       f"({', '.join(sorted(expected))})", fingerprint)
    if not bound:
        return Verdict(Outcome.UNVERIFIED,
                       f"signed by {fingerprint}, a key with no user ID for {address}",
                       fingerprint)
    return Verdict(Outcome.TRUSTED_FIRST_USE,
                   f"first key seen for {address}: {fingerprint}, now pinned", fingerprint,
                   pin="first-use")


def with_voice_check(verdict: Verdict, sas_verified: bool) -> Verdict:
    """An ``unverified`` call whose SAS the users compared by voice in an earlier call (ZRTP's V
    flag, RFC 6189 section 7.1, kept with the retained secret) counts as verified. Evidence of
    an attacker is never overridden, and a first-use key stays first use."""
    if sas_verified and verdict.outcome is Outcome.UNVERIFIED:
        return Verdict(Outcome.VERIFIED, "the SAS was confirmed by voice in an earlier call "
                       f"({verdict.reason})", verdict.peer_key)
    return verdict

