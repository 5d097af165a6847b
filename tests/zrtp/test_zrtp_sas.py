"""SAS rendering (RFC 6189 section 5.1.6) and the shipped PGP word lists."""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files

import pytest

import vectorlib
from freecall.srtp.sas import (
    B32_ALPHABET,
    pgp_words_even,
    pgp_words_odd,
    render_b32,
    render_b256,
    render_sas,
    sas_value,
)

VECTORS = vectorlib.VECTORS


def _sums() -> dict[str, str]:
    sums = {}
    for line in (VECTORS / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.removeprefix("./")] = digest
    return sums


@pytest.mark.parametrize("name", ["pgp_words_even.txt", "pgp_words_odd.txt"])
def test_word_lists_are_byte_exact(name: str) -> None:
    shipped = files("freecall.srtp").joinpath("data", name).read_bytes()
    assert hashlib.sha256(shipped).hexdigest() == _sums()[f"zrtp/{name}"]
    assert shipped == (VECTORS / "zrtp" / name).read_bytes()


def test_word_lists_match_the_table() -> None:
    even, odd = pgp_words_even(), pgp_words_odd()
    rows = [
        line.split("\t")
        for line in (VECTORS / "zrtp/pgp_wordlist.tsv").read_text().splitlines()
        if not line.startswith("#")
    ]
    assert len(rows) == 256
    for byte, hexa, even_word, odd_word in rows:
        assert int(hexa, 16) == int(byte)
        assert even[int(byte)] == even_word
        assert odd[int(byte)] == odd_word


def test_rendering_rules_match_the_vector_description() -> None:
    spec = json.loads((VECTORS / "zrtp/sas_rendering.json").read_text())
    assert spec["B32"]["alphabet"] == B32_ALPHABET


def test_b32_known_values() -> None:
    assert render_b32(bytes(32)) == "yyyy"
    assert render_b32(b"\xff" * 32) == "9999"
    # Quintets 1, 2, 3, 4 in the leftmost 20 bits: 00001 00010 00011 00100.
    bits = (1 << 15) | (2 << 10) | (3 << 5) | 4
    sashash = (bits << 12).to_bytes(4, "big") + bytes(28)
    assert render_b32(sashash) == "bndr"
    # Only the leftmost 20 bits count.
    assert render_b32(b"\x00\x00\x0f\xff" + b"\xff" * 28) == "yyyy"
    assert render_b32(b"\x00\x00\x10\x00" + bytes(28)) == "yyyb"


def test_b256_known_values() -> None:
    assert render_b256(b"\x00\x00" + bytes(30)) == "aardvark adroitness"
    assert render_b256(b"\xff\xff" + bytes(30)) == "Zulu Yucatan"
    assert render_b256(b"\x01\x02") == "absurd aftermath"
    assert render_sas(b"B256", b"\x00\x01") == "aardvark adviser"
    assert render_sas(b"B32 ", bytes(4)) == "yyyy"
    with pytest.raises(ValueError):
        render_sas(b"B999", bytes(4))


def test_sas_value_is_leftmost_32_bits() -> None:
    assert sas_value(bytes.fromhex("01020304") + b"\xff" * 28) == 0x01020304
