"""Short Authentication String rendering (RFC 6189 section 5.1.6, 7).

sasvalue is the leftmost 32 bits of sashash (section 4.5.2). "B32 " renders its leftmost
20 bits as four z-base-32 characters; "B256" renders its leftmost 16 bits as two words of the
PGP word list, the even (two-syllable) list for the first octet and the odd (three-syllable)
list for the second. The word lists ship byte-exact in ``data/`` (copied from the shared
vectors, whose SHA-256 a test checks).
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

B32_ALPHABET = "ybndrfg8ejkmcpqxot1uwisza345h769"


@cache
def _word_list(name: str) -> tuple[str, ...]:
    """Load one 256-word list; cached because it never changes (read-only, no state)."""
    text = files("freecall.srtp").joinpath("data", name).read_text(encoding="ascii")
    words = tuple(text.split("\n")[:256])
    if len(words) != 256 or not all(words):
        raise RuntimeError(f"PGP word list {name} is damaged")
    return words


def pgp_words_even() -> tuple[str, ...]:
    """The two-syllable PGP words, indexed by octet value."""
    return _word_list("pgp_words_even.txt")


def pgp_words_odd() -> tuple[str, ...]:
    """The three-syllable PGP words, indexed by octet value."""
    return _word_list("pgp_words_odd.txt")


def sas_value(sashash: bytes) -> int:
    """sasvalue = sashash truncated to its leftmost 32 bits (section 4.5.2)."""
    if len(sashash) < 4:
        raise ValueError("sashash too short")
    return int.from_bytes(sashash[:4], "big")


def render_b32(sashash: bytes) -> str:
    """Section 5.1.6 base32: four characters, most significant quintet first."""
    bits = sas_value(sashash)
    return "".join(B32_ALPHABET[(bits >> shift) & 31] for shift in (27, 22, 17, 12))


def render_b256(sashash: bytes) -> str:
    """Section 5.1.6 base256: even word for octet 0, odd word for octet 1, space separated."""
    if len(sashash) < 2:
        raise ValueError("sashash too short")
    return f"{pgp_words_even()[sashash[0]]} {pgp_words_odd()[sashash[1]]}"


def render_sas(sas_type: bytes, sashash: bytes) -> str:
    """Render for a negotiated SAS Type Block (b"B32 " or b"B256")."""
    if sas_type == b"B32 ":
        return render_b32(sashash)
    if sas_type == b"B256":
        return render_b256(sashash)
    raise ValueError(f"unsupported SAS type {sas_type!r}")
