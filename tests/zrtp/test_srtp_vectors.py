"""SRTP known answers (libsrtp, RFC 3711 B.2/B.3, OpenSSL SRTPKDF) and ZRTP-keyed policies."""

from __future__ import annotations

import json
import re
from typing import Any

import pylibsrtp
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import vectorlib
from freecall.srtp.srtp_policy import srtp_call, srtp_policies, srtp_sessions
from zrtp.zrtp_harness import make_pair

VECTORS = vectorlib.VECTORS / "srtp"
Policy = pylibsrtp.Policy


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


def x(value: str) -> bytes:
    return bytes.fromhex(value)


# -- libsrtp srtp_validate vectors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "protected_key"),
    [
        (Policy.SRTP_PROFILE_AES128_CM_SHA1_80, ("aes_cm_128_hmac_sha1_80", "srtp_protected")),
        (
            Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
            ("aes_cm_128_hmac_sha1_32_variant", "srtp_protected"),
        ),
    ],
)
def test_libsrtp_aes_cm(profile: int, protected_key: tuple[str, str]) -> None:
    vectors = load("libsrtp_srtp_validate_vectors.json")
    base = vectors["aes_cm_128_hmac_sha1_80"]
    key = x(base["master_key"] + base["master_salt"])
    expected = x(vectors[protected_key[0]][protected_key[1]])
    tx = pylibsrtp.Session(
        Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile)
    )
    rx = pylibsrtp.Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=profile))
    assert tx.protect(x(base["rtp_plaintext"])) == expected
    assert rx.unprotect(expected) == x(base["rtp_plaintext"])
    # SRTCP keeps the 80-bit tag with either profile (RFC 5764 4.1.2).
    assert tx.protect_rtcp(x(base["rtcp_plaintext"])) == x(base["srtcp_protected"])
    assert rx.unprotect_rtcp(x(base["srtcp_protected"])) == x(base["rtcp_plaintext"])
    tampered = bytearray(expected)
    tampered[-1] ^= 1
    with pytest.raises(pylibsrtp.Error):
        pylibsrtp.Session(
            Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=profile)
        ).unprotect(bytes(tampered))


def test_srtp_call_is_the_public_call() -> None:
    """The bridge's folded-in pylibsrtp call: the libsrtp vector, the same errors (a forged tag,
    a replay, an oversized packet) and the public methods still work on the same session."""
    vectors = load("libsrtp_srtp_validate_vectors.json")
    base = vectors["aes_cm_128_hmac_sha1_80"]
    key = x(base["master_key"] + base["master_salt"])
    plain, expected = x(base["rtp_plaintext"]), x(base["srtp_protected"])
    profile = Policy.SRTP_PROFILE_AES128_CM_SHA1_80
    tx = pylibsrtp.Session(
        Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile)
    )
    rx = pylibsrtp.Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=profile))
    protect, unprotect = srtp_call(tx, "protect"), srtp_call(rx, "unprotect")
    assert protect is not tx.protect  # the fast form, not the fallback, with this pylibsrtp
    assert protect(plain) == expected
    tampered = bytearray(expected)
    tampered[-1] ^= 1
    with pytest.raises(pylibsrtp.Error, match="authentication failure"):
        unprotect(bytes(tampered))
    assert unprotect(expected) == plain
    with pytest.raises(pylibsrtp.Error, match="replay check failed"):
        unprotect(expected)
    with pytest.raises(ValueError, match="too long"):
        protect(plain[:12] + bytes(1500))
    assert tx.protect_rtcp(x(base["rtcp_plaintext"])) == x(base["srtcp_protected"])


def test_libsrtp_aead_aes_128_gcm() -> None:
    v = load("libsrtp_srtp_validate_vectors.json")["aead_aes_128_gcm"]
    key = x(v["master_key"] + v["master_salt"])
    profile = Policy.SRTP_PROFILE_AEAD_AES_128_GCM
    tx = pylibsrtp.Session(
        Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile)
    )
    rx = pylibsrtp.Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=profile))
    assert tx.protect(x(v["rtp_plaintext"])) == x(v["srtp_protected"])
    assert rx.unprotect(x(v["srtp_protected"])) == x(v["rtp_plaintext"])
    assert tx.protect_rtcp(x(v["rtcp_plaintext"])) == x(v["srtcp_protected"])
    assert rx.unprotect_rtcp(x(v["srtcp_protected"])) == x(v["rtcp_plaintext"])


# -- RFC 3711 AES-CM and key derivation, with our own PRF -------------------------------------


def aes_cm_keystream(key: bytes, iv: int, blocks: int, first: int = 0) -> list[bytes]:
    """RFC 3711 4.1.1: block i = AES_K(IV + i), IV a 128-bit integer."""
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return [
        enc.update(((iv + i) % (1 << 128)).to_bytes(16, "big"))
        for i in range(first, first + blocks)
    ]


def srtp_kdf(
    master_key: bytes,
    master_salt: bytes,
    label: int,
    index: int,
    kdr: int,
    length: int,
    index_bits: int = 48,
) -> bytes:
    """RFC 3711 4.3.1: x = key_id XOR master_salt, key_id = label || r, r = index DIV kdr."""
    r = index // kdr if kdr else 0
    key_id = (label << index_bits) | r
    salt = int.from_bytes(master_salt, "big")
    x_value = key_id ^ salt
    blocks = aes_cm_keystream(master_key, x_value << 16, (length + 15) // 16)
    return b"".join(blocks)[:length]


def test_rfc3711_b2_keystream() -> None:
    v = load("rfc3711_vectors.json")["B.2_aes_cm_keystream"]
    iv = int.from_bytes(x(v["session_salt_112bit"]), "big") << 16
    for counter_hex, block in v["keystream_blocks"].items():
        counter = int(counter_hex, 16)
        assert aes_cm_keystream(x(v["session_key"]), iv, 1, counter)[0] == x(block)


def test_rfc3711_b3_key_derivation() -> None:
    v = load("rfc3711_vectors.json")["B.3_key_derivation"]
    key, salt = x(v["master_key"]), x(v["master_salt"])
    assert srtp_kdf(key, salt, 0, 0, 0, 16) == x(v["cipher_key_label0"])
    assert srtp_kdf(key, salt, 2, 0, 0, 14) == x(v["cipher_salt_label2"])
    assert srtp_kdf(key, salt, 1, 0, 0, 20) == x(v["auth_key_label1_first_160_bits"])
    assert srtp_kdf(key, salt, 1, 0, 0, 94) == x(v["auth_key_label1_full_94_bytes"])


def _openssl_cases() -> list[dict[str, str]]:
    text = (VECTORS / "openssl_evpkdf_srtp.txt").read_text() if VECTORS.exists() else ""
    cases = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith("#") or "=" not in line:
                continue
            name, _, value = (part.strip() for part in line.partition("="))
            if name.startswith("Ctrl."):
                name, value = value.split(":", 1)
            fields[name] = value
        if fields.get("KDF") == "SRTPKDF" and "Output" in fields and "Result" not in fields:
            cases.append(fields)
    return cases


OPENSSL_CASES = _openssl_cases()


@pytest.mark.parametrize("case", OPENSSL_CASES, ids=[str(i) for i in range(len(OPENSSL_CASES))])
def test_openssl_srtpkdf_cases(case: dict[str, str]) -> None:
    label = int(case.get("label", "0"))
    index_bits = 32 if label >= 3 else 48  # SRTCP labels use the 31-bit index in 32 bits
    kdr = int(case.get("kdr", "0"))  # the rate itself (a power of two, or 0 for none)
    index = int(case.get("hexindex", "0") or "0", 16)
    out = x(case["Output"])
    got = srtp_kdf(x(case["hexkey"]), x(case["hexsalt"]), label, index, kdr, len(out), index_bits)
    assert got == out


def test_openssl_cases_were_found() -> None:
    assert len(OPENSSL_CASES) >= 20


# -- ZRTP keys into libsrtp policies ------------------------------------------------------------

RTP = bytes.fromhex("800F1234DECAFBADCAFEBABE") + b"\xab" * 160
RTCP = bytes.fromhex("81C8000BCAFEBABE") + b"\xab" * 40


@pytest.mark.parametrize("auth", ["HS32", "HS80"])
def test_zrtp_keys_make_working_policies(auth: str) -> None:
    from freecall.srtp.zrtp import ZrtpConfig

    cfg = ZrtpConfig(auth_tag_types=(auth,))
    link = make_pair(cfg, cfg)
    link.start()
    link.run()
    ra, rb = link.a.secure, link.b.secure
    assert ra is not None and rb is not None
    a_tx, a_rx = srtp_sessions(ra.keys)
    b_tx, b_rx = srtp_sessions(rb.keys)
    srtp = a_tx.protect(RTP)
    assert len(srtp) == len(RTP) + (4 if auth == "HS32" else 10)
    assert b_rx.unprotect(srtp) == RTP
    back = b_tx.protect(RTP)
    assert a_rx.unprotect(back) == RTP
    assert b_rx.unprotect_rtcp(a_tx.protect_rtcp(RTCP)) == RTCP
    # The wrong direction's key does not authenticate.
    with pytest.raises(pylibsrtp.Error):
        a_rx.unprotect(a_tx.protect(RTP[:12] + b"\x01" + RTP[13:]))
    outbound, inbound = srtp_policies(ra.keys)
    assert outbound.key == ra.keys.outbound.key_and_salt
    assert inbound.key == rb.keys.outbound.key_and_salt
    assert outbound.ssrc_type == Policy.SSRC_ANY_OUTBOUND
