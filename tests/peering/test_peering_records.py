"""Node identity and signed records: format, verification, hostile input."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from freecall.peering.records import (
    MAX_RECORD_SIZE,
    MAX_TTL,
    Address,
    AddrKind,
    Ext,
    Flag,
    NodeIdentity,
    NodeRecord,
    RecordCodec,
    RecordError,
    decode_record,
    ed25519_to_x25519_public,
    encode_body,
    node_id_of,
    normalize_route,
    route_group,
)

NOW = 1_700_000_000.0
SEED = bytes(range(32))


def make(
    ident: NodeIdentity | None = None, seq: int = 1, **kw: Any
) -> tuple[NodeIdentity, NodeRecord]:
    ident = ident or NodeIdentity.from_seed(SEED)
    args: dict[str, Any] = {
        "seq": seq,
        "expires": int(NOW) + 3600,
        "addresses": (
            Address(AddrKind.GOSSIP, "192.0.2.10", 5064),
            Address(AddrKind.SIP_TLS, "2001:db8::1", 5061),
        ),
        "routes": ("Example.ORG.", "alice@Example.org"),
    }
    args.update(kw)
    return ident, ident.make_record(**args)


def test_round_trip_and_fields() -> None:
    ident, rec = make(flags=Flag.RELAY, extensions=((Ext.TLS_FINGERPRINT, b"\x01" * 32),))
    again = decode_record(rec.raw)
    assert again == rec
    assert rec.node_id == node_id_of(ident.public_key) == ident.node_id
    assert len(rec.node_id) == 16 and rec.key == rec.node_id[:8]
    assert rec.routes == ("example.org", "alice@example.org")
    assert rec.domains == ("example.org",) and rec.users == ("alice@example.org",)
    assert rec.gossip_addr == ("192.0.2.10", 5064)
    assert rec.addresses_of(AddrKind.SIP_TLS)[0].host == "2001:db8::1"
    assert rec.relay and rec.tls_fingerprint == b"\x01" * 32 and rec.openpgp_fingerprint is None
    rec.verify_signature()
    rec.check_time(NOW)
    assert rec.summary()["routes"] == ["example.org", "alice@example.org"]


def test_layout_is_documented_one() -> None:
    """docs/peering.md: version, flags, key, seq, expires, counted lists, signature."""
    ident, rec = make(routes=("a.example",), addresses=(Address(1, "192.0.2.1", 5064),))
    raw = rec.raw
    assert raw[0] == 1 and raw[1] == 0 and raw[2:34] == ident.public_key
    assert struct.unpack(">QI", raw[34:46]) == (1, int(NOW) + 3600)
    assert raw[46] == 1 and raw[47:55] == bytes((1, 4, 192, 0, 2, 1, 0x13, 0xC8))
    assert raw[55] == 1 and raw[56] == 9 and raw[57:66] == b"a.example"
    assert raw[66] == 0 and len(raw) == 67 + 64


def test_every_flipped_byte_is_caught() -> None:
    _, rec = make()
    for i in range(len(rec.raw)):
        bad = bytearray(rec.raw)
        bad[i] ^= 0x40
        with pytest.raises(RecordError):
            decode_record(bytes(bad)).verify_signature()


def test_signature_by_another_key_is_forged() -> None:
    _, rec = make()
    other = NodeIdentity.from_seed(b"\x07" * 32)
    body = rec.raw[:-64]
    forged = body + other.sign(b"freecall-record-v1\x00" + body)
    with pytest.raises(RecordError) as exc:
        decode_record(forged).verify_signature()
    assert exc.value.reason == "forged"


def test_oversized_and_limits() -> None:
    ident = NodeIdentity.from_seed(SEED)
    routes = tuple(f"user{i}-{'x' * 40}@example.org" for i in range(30))
    with pytest.raises(RecordError) as exc:
        ident.make_record(seq=1, expires=int(NOW) + 60, routes=routes)
    assert exc.value.reason == "oversized"
    with pytest.raises(RecordError):
        decode_record(b"\x01" * (MAX_RECORD_SIZE + 1))
    with pytest.raises(RecordError):
        encode_body(ident.public_key, 1, 1, (), tuple(f"d{i}.org" for i in range(33)))


def test_time_checks() -> None:
    _, rec = make(expires=int(NOW) - 1)
    with pytest.raises(RecordError, match="expired"):
        rec.check_time(NOW)
    _, rec = make(expires=int(NOW + MAX_TTL + 3600))
    with pytest.raises(RecordError, match="future"):
        rec.check_time(NOW)


def test_newer_than_orders_by_seq_then_signature() -> None:
    ident, a = make(seq=5)
    _, b = make(ident, seq=6)
    assert b.newer_than(a) and not a.newer_than(b)
    _, c = make(ident, seq=6, routes=("other.example",))
    assert c.newer_than(b) != b.newer_than(c)  # equal seq: one deterministic winner


def test_route_normalization() -> None:
    assert normalize_route("Example.ORG.") == "example.org"
    assert normalize_route("Bob@Example.Net") == "Bob@example.net"
    assert normalize_route("bücher.example") == "xn--bcher-kva.example"
    for bad in ("", "a b.org", "a@@b.org", "@b.org", "a..b", "x" * 300):
        with pytest.raises(RecordError):
            normalize_route(bad)
    assert route_group("Example.org", 6) == route_group("example.org.", 6)


def test_codec_verifies_once_and_caches_failures() -> None:
    _, rec = make()
    codec = RecordCodec(capacity=4)
    assert codec.load(rec.raw) == rec
    assert codec.load(rec.raw) == rec
    assert codec.verifications == 1
    bad = rec.raw[:-1] + bytes((rec.raw[-1] ^ 1,))
    for _ in range(3):
        with pytest.raises(RecordError):
            codec.load(bad)
    assert codec.verifications == 2
    for i in range(10):  # bounded
        _, r = make(seq=10 + i)
        codec.load(r.raw)
    assert len(codec._cache) <= 4


def test_identity_file(tmp_path: Path) -> None:
    a = NodeIdentity.load_or_create(tmp_path)
    path = tmp_path / "node.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    b = NodeIdentity.load_or_create(tmp_path)
    assert a.public_key == b.public_key
    path.write_bytes(b"not a key")
    with pytest.raises(RecordError):
        NodeIdentity.load_or_create(tmp_path)


def test_x25519_from_node_keys_agree() -> None:
    a = NodeIdentity.from_seed(b"\x01" * 32)
    b = NodeIdentity.from_seed(b"\x02" * 32)
    pa = X25519PublicKey.from_public_bytes(ed25519_to_x25519_public(a.public_key))
    pb = X25519PublicKey.from_public_bytes(ed25519_to_x25519_public(b.public_key))
    assert a.x25519().exchange(pb) == b.x25519().exchange(pa)
    assert a.x25519().public_key().public_bytes_raw() == ed25519_to_x25519_public(a.public_key)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1200))
def test_decode_random_bytes_only_raises_record_error(data: bytes) -> None:
    try:
        rec = decode_record(data)
    except RecordError:
        return
    with pytest.raises(RecordError):
        rec.verify_signature()


_, _VALID = make()


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(_VALID.raw) - 1), st.integers(1, 255), st.integers(0, 40))
def test_mutated_record_never_verifies(pos: int, xor: int, cut: int) -> None:
    data = bytearray(_VALID.raw)
    data[pos] ^= xor
    data = data[: len(data) - cut] if cut else data
    try:
        decode_record(bytes(data)).verify_signature()
    except RecordError:
        return
    pytest.fail("mutated record accepted")


FPR_V4 = bytes.fromhex("0123456789ABCDEF0123456789ABCDEF01234567")


def test_openpgp_fingerprint_field_round_trip_and_old_format() -> None:
    """The OpenPGP key that signs the node's SAS hashes (issue 7): an optional TLV, 22 bytes."""
    _, plain = make()
    _, rec = make(extensions=((Ext.OPENPGP_FINGERPRINT, FPR_V4),
                              (Ext.TLS_FINGERPRINT, b"\x01" * 32)))
    assert len(rec.raw) == len(plain.raw) + 2 + 20 + 2 + 32
    again = decode_record(rec.raw)
    assert again == rec and again.openpgp_fingerprint == FPR_V4
    again.verify_signature()
    assert rec.summary()["openpgp"] == FPR_V4.hex().upper()
    # a record without the field (every node before it, or with OpenPGP off) parses the same
    assert decode_record(plain.raw).openpgp_fingerprint is None
    assert plain.summary()["openpgp"] is None
    _, v6 = make(extensions=((Ext.OPENPGP_FINGERPRINT, b"\x02" * 32),))
    assert decode_record(v6.raw).openpgp_fingerprint == b"\x02" * 32


def test_openpgp_fingerprint_of_another_size_is_ignored_not_refused() -> None:
    """A later format (another size) signed by some node must not make this node refuse the
    record (and ban its sender): the field is ignored; making such a record is refused."""
    ident, rec = make()
    with pytest.raises(RecordError):
        make(extensions=((Ext.OPENPGP_FINGERPRINT, b"\x01" * 21),))
    # hand-built: the same layout with a 21-byte value in the extension
    body = rec.raw[:-64 - 1] + bytes((1, Ext.OPENPGP_FINGERPRINT, 21)) + b"\x01" * 21
    from freecall.peering.records import SIGN_CONTEXT

    odd = decode_record(body + ident.sign(SIGN_CONTEXT + body))
    odd.verify_signature()
    assert odd.extension(Ext.OPENPGP_FINGERPRINT) == b"\x01" * 21
    assert odd.openpgp_fingerprint is None


def test_openpgp_fingerprint_and_the_size_limit() -> None:
    """With the fingerprint, a record still refuses to grow past MAX_RECORD_SIZE; the
    daemon's announcement keeps the fingerprint and leaves out routes instead."""
    from freecall.peering.service import announcement_for

    ident = NodeIdentity.from_seed(SEED)
    routes = tuple(f"user{i:02d}-{'x' * 30}@example.org" for i in range(32))
    with pytest.raises(RecordError) as refused:
        ident.make_record(seq=1, expires=int(NOW) + 60, routes=routes,
                          extensions=((Ext.OPENPGP_FINGERPRINT, FPR_V4),))
    assert refused.value.reason == "oversized"
    ann = announcement_for(ident, gossip=Address(AddrKind.GOSSIP, "192.0.2.10", 5064), sip=[],
                           routes=routes, tls_key=b"\x01" * 32, name="n", openpgp_key=FPR_V4)
    rec = ident.make_record(seq=1, expires=int(NOW) + 60, addresses=ann.addresses,
                            routes=ann.routes, extensions=ann.extensions)
    assert rec.openpgp_fingerprint == FPR_V4 and len(rec.raw) <= MAX_RECORD_SIZE
    assert 0 < len(ann.routes) < len(routes)
