"""ZRTP primitives: DH group, key agreements, KDF, hash chain, CFB, negotiation."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from freecall.srtp.zrtp_crypto import (
    DH3K_PRIME,
    S256,
    S384,
    X255,
    Dh3k,
    DhError,
    Ec25,
    HashChain,
    cfb_decrypt,
    cfb_encrypt,
    choose_first,
    choose_key_agreement,
    implicit_mac,
    kdf,
    with_mandatory,
)


def _arctan_inv(x: int, one: int) -> int:
    total = term = one // x
    x2, n, sign = x * x, 1, -1
    while term:
        term //= x2
        n += 2
        total += sign * (term // n)
        sign = -sign
    return total


def test_dh3k_prime_is_rfc3526_group_15() -> None:
    # RFC 3526 section 4: p = 2^3072 - 2^3008 - 1 + 2^64 * ( [2^2942 pi] + 1690314 ).
    guard = 64
    one = 1 << (2942 + guard)
    pi = 4 * (4 * _arctan_inv(5, one) - _arctan_inv(239, one))  # Machin
    floor_pi = pi >> guard
    expected = 2**3072 - 2**3008 - 1 + 2**64 * (floor_pi + 1690314)
    assert expected == DH3K_PRIME


def fixed(data: bytes) -> Callable[[int], bytes]:
    def urandom(n: int) -> bytes:
        assert n <= len(data)
        return data[:n]

    return urandom


def test_x255_rfc7748_vector() -> None:
    # RFC 7748 section 6.1: pv and DHResult are the raw 32-octet strings.
    alice = X255(
        fixed(bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    )
    bob = X255(
        fixed(bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"))
    )
    assert alice.public_value.hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert bob.public_value.hex() == (
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    )
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert alice.shared_secret(bob.public_value).hex() == shared
    assert bob.shared_secret(alice.public_value).hex() == shared


def test_x255_rejects_low_order_point_and_bad_length() -> None:
    me = X255(fixed(b"\x11" * 32))
    with pytest.raises(DhError):
        me.shared_secret(bytes(32))  # the identity: all-zero shared secret
    with pytest.raises(DhError):
        me.shared_secret(b"\x01" * 31)


def test_dh3k_agreement_and_checks() -> None:
    a = Dh3k(fixed(b"\x42" * 32))
    b = Dh3k(fixed(b"\x17" * 32))
    assert len(a.public_value) == 384
    assert a.public_value == pow(2, int.from_bytes(b"\x42" * 32, "big"), DH3K_PRIME).to_bytes(
        384, "big"
    )
    secret = a.shared_secret(b.public_value)
    assert secret == b.shared_secret(a.public_value)
    assert len(secret) == 384
    for bad in (0, 1, DH3K_PRIME - 1, DH3K_PRIME, 2**3072 - 1):
        with pytest.raises(DhError):
            a.shared_secret(bad.to_bytes(384, "big"))
    with pytest.raises(DhError):
        a.shared_secret(b"\x02" * 256)


def test_ec25_format_and_point_check() -> None:
    a = Ec25(fixed(b"\x05" * 40))
    b = Ec25(fixed(b"\x09" * 40))
    assert len(a.public_value) == 64
    # X || Y of the public point, big-endian (section 5.1.5).
    point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + a.public_value)
    assert point.public_numbers().x.to_bytes(32, "big") == a.public_value[:32]
    secret = a.shared_secret(b.public_value)
    assert secret == b.shared_secret(a.public_value)
    assert len(secret) == 32  # DHResult is X only
    off_curve = a.public_value[:32] + bytes([a.public_value[32] ^ 1]) + a.public_value[33:]
    with pytest.raises(DhError):
        a.shared_secret(off_curve)
    with pytest.raises(DhError):
        a.shared_secret(bytes(64))


def test_kdf_layout() -> None:
    # KDF(KI, Label, Context, L) = HMAC(KI, 00000001 || Label || 00 || Context || L).
    key, context = b"k" * 32, b"c" * 56
    manual = hmac.new(
        key, b"\x00\x00\x00\x01SAS\x00" + context + (256).to_bytes(4, "big"), hashlib.sha256
    ).digest()
    assert kdf(key, b"SAS", context, 256, S256) == manual
    salt = kdf(key, b"Initiator SRTP master salt", context, 112, S256)
    assert len(salt) == 14
    manual_salt = hmac.new(
        key,
        b"\x00\x00\x00\x01Initiator SRTP master salt\x00" + context + (112).to_bytes(4, "big"),
        hashlib.sha256,
    ).digest()[:14]
    assert salt == manual_salt
    assert len(kdf(key, b"x", context, 384, S384)) == 48
    with pytest.raises(ValueError):
        kdf(key, b"x", context, 384, S256)


def test_hash_chain_and_implicit_mac() -> None:
    chain = HashChain(b"\x00" * 32)
    assert chain.h1 == hashlib.sha256(b"\x00" * 32).digest()
    assert chain.h3 == hashlib.sha256(hashlib.sha256(chain.h1).digest()).digest()
    assert implicit_mac(chain.h2, b"msg") == hmac.new(chain.h2, b"msg", "sha256").digest()[:8]
    assert "00" * 32 not in repr(chain)


def test_cfb_nist_sp800_38a_vectors() -> None:
    # SP 800-38A F.3.13 CFB128-AES128.Encrypt, blocks 1-2.
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    iv = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
    plain = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
    cipher = bytes.fromhex("3b3fd92eb72dad20333449f8e83cfb4ac8a64537a0b3a93fcde3cdad9f1ce58b")
    assert cfb_encrypt(key, iv, plain) == cipher
    assert cfb_decrypt(key, iv, cipher) == plain
    # Final block truncated, not padded.
    assert cfb_encrypt(key, iv, plain[:20]) == cipher[:20]
    assert cfb_decrypt(key, iv, cipher[:20]) == plain[:20]


def test_key_agreement_negotiation_rfc_example() -> None:
    # Section 4.1.2's example: Alice DH2k, DH3k, EC25; Bob EC38, EC25, DH3k -> EC25.
    alice = (b"DH2k", b"DH3k", b"EC25")
    bob = (b"EC38", b"EC25", b"DH3k")
    # We support DH3k/EC25/X255 only; our list stands for Alice without DH2k.
    assert choose_key_agreement((b"DH3k", b"EC25"), bob) == b"EC25"
    assert choose_key_agreement((b"EC25", b"DH3k"), alice) == b"EC25"


def test_key_agreement_negotiation_is_symmetric_and_prefers_faster() -> None:
    ours = (b"X255", b"EC25", b"DH3k")
    bzrtp = (b"DH3k", b"X255", b"Mult")  # a peer preferring DH3k first
    assert choose_key_agreement(ours, bzrtp) == b"X255"
    assert choose_key_agreement((b"DH3k", b"X255"), (b"X255", b"DH3k")) == b"X255"
    assert choose_key_agreement((b"EC25", b"DH3k"), (b"X255",)) == b"DH3k"  # implicit DH3k
    assert choose_key_agreement((b"X255",), (b"EC38",)) is None


def test_mandatory_algorithms_are_implied() -> None:
    assert with_mandatory((), "auth") == (b"HS32", b"HS80")
    assert with_mandatory((b"HS80",), "auth") == (b"HS80", b"HS32")
    assert choose_first((b"S384", b"S256"), (b"N256",), "hash") == b"S256"
    assert choose_first((b"B256", b"B32 "), (), "sas") == b"B32 "
