"""Turn ZRTP's keys into libsrtp policies (RFC 6189 section 4.5.3, RFC 3711).

ZRTP derives one master key and salt per direction: we protect what we send with our own
(outbound) key and unprotect what the peer sends with its key (inbound). ZRTP uses no MKI and
the default key derivation rate; SRTCP uses the same master key and salt (section 4.5.3). With
HS32 libsrtp's AES_CM_128_HMAC_SHA1_32 profile keeps an 80-bit tag on SRTCP, as RFC 5764
section 4.1.2 does.
"""

from __future__ import annotations

import pylibsrtp

from freecall.srtp.zrtp import SessionKeys

_PROFILES = {
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AES_CM_128_HMAC_SHA1_32": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
}


def srtp_policies(keys: SessionKeys) -> tuple[pylibsrtp.Policy, pylibsrtp.Policy]:
    """(outbound, inbound) policies for any SSRC in each direction."""
    profile = _PROFILES[keys.srtp_profile]
    outbound = pylibsrtp.Policy(
        key=keys.outbound.key_and_salt,
        ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
        srtp_profile=profile,
    )
    inbound = pylibsrtp.Policy(
        key=keys.inbound.key_and_salt,
        ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
        srtp_profile=profile,
    )
    return outbound, inbound


def srtp_sessions(keys: SessionKeys) -> tuple[pylibsrtp.Session, pylibsrtp.Session]:
    """(protecting, unprotecting) libsrtp sessions built from `srtp_policies`."""
    outbound, inbound = srtp_policies(keys)
    return pylibsrtp.Session(outbound), pylibsrtp.Session(inbound)
