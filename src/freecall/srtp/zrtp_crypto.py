"""ZRTP cryptographic building blocks (RFC 6189 sections 4.4-4.5, 5.1, 9), no protocol state.

Hashes and MACs, the NIST SP 800-108 KDF of section 4.5.1, the H0-H3 hash chain of section 9,
the key agreement types of section 5.1.5 (DH3k, EC25 and X255, the last as registered later
and implemented by bzrtp), the AES-CFB used for Confirm (section 5.7) and the algorithm
negotiation of section 4.1.2. Randomness always comes from an injected ``urandom``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from freecall.srtp.zrtp_messages import MAC_LEN, ErrorCode, ZrtpError

Urandom = Callable[[int], bytes]


# ---------------------------------------------------------------------------------------------
# Hashes, MACs, KDF
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HashAlgorithm:
    """A negotiable hash (section 5.1.2) and its HMAC (section 5.1.2.1)."""

    block: bytes
    digest_size: int
    name: str

    def hash(self, data: bytes) -> bytes:
        return hashlib.new(self.name, data).digest()

    def hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, self.name).digest()


S256 = HashAlgorithm(b"S256", 32, "sha256")
S384 = HashAlgorithm(b"S384", 48, "sha384")
HASHES: dict[bytes, HashAlgorithm] = {S256.block: S256, S384.block: S384}


def implicit_hash(data: bytes) -> bytes:
    """SHA-256, the implicit hash of section 5.1.2.2 (hash chain, Hello hash)."""
    return hashlib.sha256(data).digest()


def implicit_mac(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA-256 truncated to 64 bits: MACs keyed by the hash chain (section 8.1.1)."""
    return hmac.new(key, data, "sha256").digest()[:MAC_LEN]


def kdf(ki: bytes, label: bytes, context: bytes, bits: int, hash_algo: HashAlgorithm) -> bytes:
    """KDF(KI, Label, Context, L) = HMAC(KI, i || Label || 0x00 || Context || L) (section 4.5.1).

    i is the fixed counter 1, L the output length in bits; output truncated to the left L bits.
    """
    if bits <= 0 or bits > hash_algo.digest_size * 8 or bits % 8:
        raise ValueError("KDF length must be a whole number of octets within the hash size")
    data = (1).to_bytes(4, "big") + label + b"\x00" + context + bits.to_bytes(4, "big")
    return hash_algo.hmac(ki, data)[: bits // 8]


def ct_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison for MACs and hash images."""
    return hmac.compare_digest(a, b)


@dataclass(frozen=True)
class HashChain:
    """H0..H3 (section 9): H0 random, Hn = SHA-256(Hn-1); sent in reverse order."""

    h0: bytes = field(repr=False)

    @property
    def h1(self) -> bytes:
        return implicit_hash(self.h0)

    @property
    def h2(self) -> bytes:
        return implicit_hash(self.h1)

    @property
    def h3(self) -> bytes:
        return implicit_hash(self.h2)

    @classmethod
    def generate(cls, urandom: Urandom) -> HashChain:
        return cls(urandom(32))


# ---------------------------------------------------------------------------------------------
# Confirm encryption: full-block CFB (section 5.7)
# ---------------------------------------------------------------------------------------------


def _cfb(key: bytes, iv: bytes, data: bytes, decrypt: bool) -> bytes:
    """CFB-128 from the AES block function: C_i = P_i XOR AES_K(C_i-1), C_0 = IV.

    Written out on AES-ECB because `cryptography` is retiring its CFB mode to "decrepit"; the
    messages are a few hundred octets, so block-at-a-time costs nothing.
    """
    if len(iv) != 16:
        raise ValueError("CFB IV must be 16 octets")
    block = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - CFB core
    out = bytearray()
    feedback = iv
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        stream = block.update(feedback)
        result = bytes(a ^ b for a, b in zip(chunk, stream, strict=False))
        out += result
        feedback = chunk if decrypt else result
    return bytes(out)


def cfb_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES in 128-bit CFB, last block truncated (NIST SP 800-38A, as section 5.7 requires)."""
    return _cfb(key, iv, data, decrypt=False)


def cfb_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """Inverse of `cfb_encrypt`."""
    return _cfb(key, iv, data, decrypt=True)


# ---------------------------------------------------------------------------------------------
# Key agreement (section 4.4.1, 5.1.5)
# ---------------------------------------------------------------------------------------------

# RFC 3526 section 4: 3072-bit MODP group, generator 2.
DH3K_PRIME = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
    "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
    "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
    "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
    "F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6"
    "955817183995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33A85521ABDF1CBA64"
    "ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7ABF5AE8CDB0933D71E8C94E04A25619DCEE3D226"
    "1AD2EE6BF12FFA06D98A0864D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF",
    16,
)
DH3K_GENERATOR = 2

_P256_ORDER = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)


class DhError(ZrtpError):
    """A peer public value that must be rejected (Error 0x61, section 4.4.1.2/4.4.1.3)."""

    code = ErrorCode.BAD_DH_PUBLIC_VALUE


class KeyAgreement(Protocol):
    """One ephemeral key pair of a negotiated Key Agreement Type."""

    @property
    def block(self) -> bytes: ...

    @property
    def public_value(self) -> bytes: ...

    def shared_secret(self, peer_pv: bytes) -> bytes: ...


class Dh3k:
    """DH3k: pv = g^svi mod p, 384 octets; DHResult fixed to 384 octets (section 4.4.1.4).

    The secret exponent is 256 bits, twice the AES-128 key length (section 5.1.5).
    """

    block = b"DH3k"
    pv_length = 384

    def __init__(self, urandom: Urandom) -> None:
        secret = 0
        while secret <= 1:
            secret = int.from_bytes(urandom(32), "big")
        self._secret = secret
        self.public_value = pow(DH3K_GENERATOR, secret, DH3K_PRIME).to_bytes(384, "big")

    def shared_secret(self, peer_pv: bytes) -> bytes:
        if len(peer_pv) != self.pv_length:
            raise DhError("DH3k public value must be 384 octets")
        value = int.from_bytes(peer_pv, "big")
        # Reject 0, 1, p-1 and anything not reduced mod p (section 4.4.1.2, Error 0x61).
        if value <= 1 or value >= DH3K_PRIME - 1:
            raise DhError("DH3k public value is 0, 1, p-1 or out of range")
        return pow(value, self._secret, DH3K_PRIME).to_bytes(384, "big")

    def __repr__(self) -> str:
        return "Dh3k(<secret>)"


class Ec25:
    """EC25: ECDH on NIST P-256; pv = X || Y (64 octets), DHResult = X (section 5.1.5)."""

    block = b"EC25"
    pv_length = 64

    def __init__(self, urandom: Urandom) -> None:
        scalar = int.from_bytes(urandom(40), "big") % (_P256_ORDER - 1) + 1
        self._key = ec.derive_private_key(scalar, ec.SECP256R1())
        numbers = self._key.public_key().public_numbers()
        self.public_value = numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")

    def shared_secret(self, peer_pv: bytes) -> bytes:
        if len(peer_pv) != self.pv_length:
            raise DhError("EC25 public value must be 64 octets")
        try:
            # Partial public-key validation (SP 800-56A 5.6.2.6): on the curve, not infinity.
            peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + peer_pv)
            return self._key.exchange(ec.ECDH(), peer)
        except (ValueError, InvalidKey) as exc:
            raise DhError("EC25 public value is not a point on P-256") from exc

    def __repr__(self) -> str:
        return "Ec25(<secret>)"


class X255:
    """X255: X25519 (RFC 7748); pv and DHResult are the raw 32-octet strings, as bzrtp does."""

    block = b"X255"
    pv_length = 32

    def __init__(self, urandom: Urandom) -> None:
        self._key = x25519.X25519PrivateKey.from_private_bytes(urandom(32))
        self.public_value = self._key.public_key().public_bytes_raw()

    def shared_secret(self, peer_pv: bytes) -> bytes:
        if len(peer_pv) != self.pv_length:
            raise DhError("X255 public value must be 32 octets")
        try:
            peer = x25519.X25519PublicKey.from_public_bytes(peer_pv)
            # cryptography refuses the all-zero result of a low-order point.
            return self._key.exchange(peer)
        except ValueError as exc:
            raise DhError("X255 public value gives a weak shared secret") from exc

    def __repr__(self) -> str:
        return "X255(<secret>)"


KEY_AGREEMENTS: dict[bytes, Callable[[Urandom], KeyAgreement]] = {
    Dh3k.block: Dh3k,
    Ec25.block: Ec25,
    X255.block: X255,
}
PV_LENGTHS: dict[bytes, int] = {Dh3k.block: 384, Ec25.block: 64, X255.block: 32}

# Section 4.1.2 ranks DH-2048, ECDH-256, DH-3072, ECDH-384, ECDH-521 from fastest to slowest;
# X255 and X448 come from bzrtp's ranking (bzrtp.h), the only deployed peer that offers them.
SPEED_RANK: tuple[bytes, ...] = (
    b"DH2k",
    b"X255",
    b"EC25",
    b"X448",
    b"DH3k",
    b"EC38",
    b"EC52",
)

# ---------------------------------------------------------------------------------------------
# Algorithms and negotiation (sections 4.1.2, 5.1)
# ---------------------------------------------------------------------------------------------

CIPHER_KEY_BITS: dict[bytes, int] = {b"AES1": 128}
AUTH_TAGS: tuple[bytes, ...] = (b"HS32", b"HS80")
SAS_TYPES: tuple[bytes, ...] = (b"B32 ", b"B256")

# "If a mandatory algorithm is not included in the list, it is implicitly added to the end"
# (section 5.2). Mult is mandatory only with several streams, so it is not implied here.
MANDATORY: dict[str, tuple[bytes, ...]] = {
    "hash": (b"S256",),
    "cipher": (b"AES1",),
    "auth": (b"HS32", b"HS80"),
    "key_agreement": (b"DH3k",),
    "sas": (b"B32 ",),
}


def with_mandatory(offered: Sequence[bytes], kind: str) -> tuple[bytes, ...]:
    """The peer's preference list with the implicit mandatory algorithms appended (5.2)."""
    result = list(offered)
    for algo in MANDATORY[kind]:
        if algo not in result:
            result.append(algo)
    return tuple(result)


def choose_key_agreement(ours: Sequence[bytes], theirs: Sequence[bytes]) -> bytes | None:
    """Section 4.1.2: each side's first common choice; if they differ, take the faster one.

    Both sides compute the same answer, so neither wastes its precomputed DH key pair.
    Multistream and Preshared are never chosen here.
    """
    dh_theirs = [k for k in with_mandatory(theirs, "key_agreement") if k in PV_LENGTHS]
    ours_common = [k for k in ours if k in dh_theirs]
    theirs_common = [k for k in dh_theirs if k in ours]
    if not ours_common:
        return None
    a, b = ours_common[0], theirs_common[0]
    if a == b:
        return a
    rank = {k: i for i, k in enumerate(SPEED_RANK)}
    return a if rank.get(a, len(rank)) <= rank.get(b, len(rank)) else b


def choose_first(ours: Sequence[bytes], theirs: Sequence[bytes], kind: str) -> bytes | None:
    """The initiator's pick among the algorithms in common: our first preference (4.1.2)."""
    available = with_mandatory(theirs, kind)
    for algo in ours:
        if algo in available:
            return algo
    return None
