"""The STUN codec against RFC 5769 test vectors and aioice's independent codec, both ways;
TURN REST credentials against coturn's formula; the relay configuration section."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import stat
from pathlib import Path

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st

from freecall.config import ConfigError, load_config, parse_config
from freecall.relay.credentials import (
    NonceBox,
    load_or_create_secret,
    node_credentials,
    parse_username,
    turn_password,
)
from freecall.relay.stun import (
    Attr,
    Class,
    Method,
    StunError,
    decode_xor_address,
    encode_message,
    encode_xor_address,
    is_stun,
    long_term_key,
    parse_message,
)

# RFC 5769 section 2.1: sample request with short-term auth (password "VOkJxbRl1RmTxUk/WvJxBt")
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74"
    "002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020000800"
    "149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf")
# RFC 5769 section 2.2: sample IPv4 response
RFC5769_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220002000"
    "080001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d780280004c07d4c96")


def test_rfc5769_request_vector() -> None:
    msg = parse_message(RFC5769_REQUEST)
    assert (msg.method, msg.cls) == (Method.BINDING, Class.REQUEST)
    assert msg.get(Attr.USERNAME) == b"evtj:h6vY"
    assert msg.has_fingerprint
    assert msg.check_integrity(b"VOkJxbRl1RmTxUk/WvJxBt")
    assert not msg.check_integrity(b"wrong")
    assert msg.unknown_required(frozenset({Attr.USERNAME, Attr.MESSAGE_INTEGRITY})) == [0x0024]


def test_rfc5769_response_vector() -> None:
    msg = parse_message(RFC5769_RESPONSE)
    value = msg.get(Attr.XOR_MAPPED_ADDRESS)
    assert value is not None
    assert decode_xor_address(value, msg.transaction_id) == ("192.0.2.1", 32853)
    assert msg.check_integrity(b"VOkJxbRl1RmTxUk/WvJxBt")


def test_our_messages_parse_in_aioice_with_integrity_and_fingerprint() -> None:
    tid = os.urandom(12)
    key = long_term_key("1:n", "realm", "pw")
    data = encode_message(Method.ALLOCATE, Class.SUCCESS, tid, [
        (Attr.XOR_RELAYED_ADDRESS, encode_xor_address(("198.51.100.7", 50001), tid)),
        (Attr.LIFETIME, (600).to_bytes(4, "big")),
        (Attr.XOR_MAPPED_ADDRESS, encode_xor_address(("2001:db8::1", 9), tid)),
        (Attr.SOFTWARE, b"freecall x")], key=key)
    theirs = aioice_stun.parse_message(data)  # raises if the FINGERPRINT is wrong
    assert theirs.message_method == aioice_stun.Method.ALLOCATE
    assert theirs.message_class == aioice_stun.Class.RESPONSE
    assert theirs.attributes["XOR-RELAYED-ADDRESS"] == ("198.51.100.7", 50001)
    assert theirs.attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::1", 9)
    assert theirs.attributes["LIFETIME"] == 600
    assert theirs.check_message_integrity(key)


def test_aioice_messages_parse_here() -> None:
    key = long_term_key("1:n", "realm", "pw")
    theirs = aioice_stun.Message(aioice_stun.Method.CHANNEL_BIND, aioice_stun.Class.REQUEST)
    theirs.attributes["CHANNEL-NUMBER"] = 0x4001
    theirs.attributes["XOR-PEER-ADDRESS"] = ("192.0.2.5", 7000)
    theirs.attributes["USERNAME"] = "1:n"
    theirs.add_message_integrity(key)
    msg = parse_message(bytes(theirs))
    assert (msg.method, msg.cls) == (Method.CHANNEL_BIND, Class.REQUEST)
    assert msg.get(Attr.CHANNEL_NUMBER) == b"\x40\x01\0\0"
    value = msg.get(Attr.XOR_PEER_ADDRESS)
    assert value is not None
    assert decode_xor_address(value, msg.transaction_id) == ("192.0.2.5", 7000)
    assert msg.check_integrity(key) and msg.has_fingerprint


@pytest.mark.parametrize(("data", "why"), [
    (b"", "shorter"),
    (b"\xc0" + RFC5769_RESPONSE[1:], "two bits"),
    (RFC5769_RESPONSE[:4] + b"\0\0\0\0" + RFC5769_RESPONSE[8:], "cookie"),
    (RFC5769_RESPONSE[:-1], "length"),
    (RFC5769_RESPONSE[:-4] + b"\0\0\0\0", "FINGERPRINT"),
    (bytes.fromhex("000100042112a442") + bytes(12) + b"\0\x06\0\x09", "past the end"),
    (bytes.fromhex("000100022112a442") + bytes(12) + b"\0\x06", "multiple of 4"),
])
def test_malformed_messages_raise_stun_error_only(data: bytes, why: str) -> None:
    with pytest.raises(StunError, match=why):
        parse_message(data)


def test_attributes_after_integrity_are_ignored_and_count_is_capped() -> None:
    tid = bytes(12)
    signed = encode_message(Method.BINDING, Class.REQUEST, tid, [(Attr.USERNAME, b"u")],
                            key=b"k", fingerprint=False)
    body = signed[20:] + b"\0\x06\0\x01x\0\0\0"
    data = signed[:2] + len(body).to_bytes(2, "big") + signed[4:20] + body
    assert [k for k, _ in parse_message(data).attributes] == [Attr.USERNAME,
                                                              Attr.MESSAGE_INTEGRITY]
    many = encode_message(Method.BINDING, Class.REQUEST, tid, [(0x8000, b"")] * 65)
    with pytest.raises(StunError, match="too many"):
        parse_message(many)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_parser_raises_nothing_but_stun_error(data: bytes) -> None:
    for candidate in (data, bytes.fromhex("000100002112a442") + data[:12].ljust(12, b"\0")
                      + data[12:]):
        fixed = bytearray(candidate)
        if len(fixed) >= 4:
            fixed[2:4] = max(len(fixed) - 20, 0).to_bytes(2, "big")
        for blob in (candidate, bytes(fixed)):
            with contextlib.suppress(StunError):
                parse_message(blob)
            is_stun(blob)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x7FFF).filter(lambda k: k not in (8, 0x8028)),
                          st.binary(max_size=40)), max_size=10),
       st.sampled_from(list(Method)), st.sampled_from(list(Class)))
def test_round_trip(attrs: list[tuple[int, bytes]], method: Method, cls: Class) -> None:
    tid = os.urandom(12)
    msg = parse_message(encode_message(method, cls, tid, attrs))
    assert (msg.method, msg.cls, msg.transaction_id) == (method, cls, tid)
    assert msg.attributes == attrs[:64]


# -- credentials ------------------------------------------------------------------------------


def test_turn_rest_password_is_coturns_formula() -> None:
    expected = base64.b64encode(hmac.new(b"north", b"1700000000:node1", hashlib.sha1).digest())
    assert turn_password("north", "1700000000:node1") == expected.decode()


def test_node_credentials_and_username_parsing() -> None:
    user, password = node_credentials("s3cret-s3cret-s3cret", "abcd", 1000.0, ttl=60)
    assert user == "1060:abcd" and password == turn_password("s3cret-s3cret-s3cret", user)
    assert parse_username(user) == (1060, "abcd")
    for bad in ("abcd", "x:abcd", "1060:", "", "9" * 13 + ":n"):
        assert parse_username(bad) is None
    with pytest.raises(ValueError):
        node_credentials("s", "a:b", 0)


def test_nonce_box() -> None:
    box = NonceBox(b"k" * 32, lifetime=10)
    nonce = box.make(5.0, ("192.0.2.1", 1))
    assert box.check(nonce, 14.0, ("192.0.2.1", 99))  # bound to the IP, not the port
    assert not box.check(nonce, 16.0, ("192.0.2.1", 1))  # stale
    assert not box.check(nonce, 6.0, ("192.0.2.2", 1))  # another client
    assert not NonceBox(b"j" * 32).check(nonce, 6.0, ("192.0.2.1", 1))  # not ours
    for junk in (b"", b"\xff\xfe", b"zz.zz", b"5." + b"0" * 100):
        assert not box.check(junk, 6.0, ("192.0.2.1", 1))


def test_secret_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "relay-secret"
    secret = load_or_create_secret(path)
    assert len(secret) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == secret
    path.write_text("short\n")
    with pytest.raises(ValueError, match="shorter"):
        load_or_create_secret(path)


# -- configuration ------------------------------------------------------------------------------


def test_relay_config_defaults_and_resolution(tmp_path: Path) -> None:
    cfg = load_config(None, overrides={"node.state_dir": str(tmp_path), "node.role": "relay"},
                      hostname="vps1.example")
    relay = cfg.relay
    assert str(relay.listen) == "udp:0.0.0.0:3478"
    assert relay.realm == "vps1"
    assert relay.secret_file == str(tmp_path / "relay-secret")
    assert (relay.ports.first, relay.ports.last) == (49152, 65535)
    assert relay.allow_peers == ()
    assert relay.max_lifetime == 3600


def test_relay_config_errors_name_key_and_line() -> None:
    text = """node:
  role: relay
relay:
  listen: "tcp:0.0.0.0:3478"
  ports: "80-90"
  max_lifetime: 60
  allow_peers: ["10.0.0.1/8"]
  bandwidth_kbps: -1
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    messages = [str(p) for p in info.value.problems]
    assert any(m.startswith("relay.listen: line 4: bad transport 'tcp'") for m in messages)
    assert any(m.startswith("relay.ports: line 5: relayed ports must be 1024") for m in messages)
    assert any(m.startswith("relay.max_lifetime: line 6: must be between 600") for m in messages)
    assert any(m.startswith("relay.allow_peers[0]: line 7: bad CIDR") for m in messages)
    assert any(m.startswith("relay.bandwidth_kbps: line 8:") for m in messages)


def test_relay_listen_inside_the_relayed_ports_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"relay.listen: line 4: udp port 50000 lies inside"):
        parse_config('node:\n  role: relay\nrelay:\n  listen: "udp:0.0.0.0:50000"\n')
    parse_config('relay:\n  listen: "udp:0.0.0.0:50000"\n')  # an endpoint ignores relay:


def test_relay_listen_conflicting_with_gossip_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"relay.listen: .*already used by peering.listen"):
        parse_config('node: {role: relay}\npeering: {listen: "udp:0.0.0.0:3478"}\n')
