"""Turn ZRTP's keys into libsrtp policies (RFC 6189 section 4.5.3, RFC 3711).

ZRTP derives one master key and salt per direction: we protect what we send with our own
(outbound) key and unprotect what the peer sends with its key (inbound). ZRTP uses no MKI and
the default key derivation rate; SRTCP uses the same master key and salt (section 4.5.3). With
HS32 libsrtp's AES_CM_128_HMAC_SHA1_32 profile keeps an 80-bit tag on SRTCP, as RFC 5764
section 4.1.2 does.
"""

from __future__ import annotations

from collections.abc import Callable

import pylibsrtp

try:  # pylibsrtp's cffi binding, for `srtp_call`
    from pylibsrtp._binding import ffi, lib
except ImportError:  # pragma: no cover - other pylibsrtp layouts use the public methods
    ffi = lib = None

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


def srtp_call(session: pylibsrtp.Session, name: str) -> Callable[[bytes], bytes]:
    """``session.protect`` or ``session.unprotect`` with pylibsrtp's per-call wrapper folded in.

    The same libsrtp call on the session's own buffer, with the same checks and errors, but one
    Python frame and no ``int *`` allocated per packet: about 0.6 us of the 2 us pylibsrtp
    takes per packet here (bench/media.py). Falls back to the public method if pylibsrtp's
    internals differ from those of the versions this was written against (0.10-1.0).
    """
    public: Callable[[bytes], bytes] = getattr(session, name)
    try:
        ctx = session._srtp[0]
        cdata = session._cdata
        buffer = session._buffer
        func = {"protect": lib.srtp_protect, "unprotect": lib.srtp_unprotect}[name]
        errors = pylibsrtp.ERRORS
        len_p = ffi.new("int *")
        limit = len(cdata) - (pylibsrtp.SRTP_MAX_TRAILER_LEN if name == "protect" else 0)
    except (AttributeError, KeyError, TypeError):
        return public
    error = pylibsrtp.Error

    def call(data: bytes, _keep: pylibsrtp.Session = session) -> bytes:  # _keep: the context
        n = len(data)
        if n > limit:
            raise ValueError("packet is too long")
        buffer[0:n] = data
        len_p[0] = n
        rc = func(ctx, cdata, len_p)
        if rc:
            raise error(errors[rc])
        return buffer[0 : len_p[0]]  # type: ignore[no-any-return]

    return call


def srtp_pointers(session: pylibsrtp.Session, name: str) -> tuple[int, int] | None:
    """(srtp_t, function) of a pylibsrtp session as integers, for the C hop (`_hop.Hop`).

    ``name`` is ``protect`` or ``unprotect``: libsrtp 2.x's ``srtp_protect`` and
    ``srtp_unprotect`` as pylibsrtp bundles them (``int (*)(srtp_t, void *, int *)``, which
    `_hop.c` declares). None when pylibsrtp's internals are not the ones this was written
    against (0.10-1.0) or declare another signature: the bridge then stays on Python.
    """
    if ffi is None:
        return None
    try:
        func = {"protect": lib.srtp_protect, "unprotect": lib.srtp_unprotect}[name]
        if ffi.typeof(func).cname != _SRTP_FN:
            return None
        ctx = int(ffi.cast("uintptr_t", session._srtp[0]))
        fn = int(ffi.cast("uintptr_t", ffi.addressof(lib, f"srtp_{name}")))
    except (AttributeError, KeyError, TypeError):
        return None
    return (ctx, fn) if ctx and fn else None


_SRTP_FN = "srtp_err_status_t(*)(struct srtp_ctx_t_ *, void *, int *)"
