"""Round trips and byte layouts of every ZRTP message (RFC 6189 section 5)."""

from __future__ import annotations

import struct

import pytest

from freecall.srtp.zrtp_messages import (
    ClearAck,
    Commit,
    Conf2Ack,
    Confirm,
    ConfirmPlain,
    DHPart,
    Error,
    ErrorAck,
    GoClear,
    Hello,
    HelloAck,
    Message,
    Ping,
    PingAck,
    RelayAck,
    SasRelay,
    SasRelayPlain,
    ZrtpError,
    classify_datagram,
    decode_message,
    decode_packet,
    encode_packet,
    is_zrtp_packet,
    openpgp_packet_length,
    trim_openpgp_signature,
)

H = bytes(range(32))
ZID = bytes(range(100, 112))
MAC = b"MACMACMA"


def sample_messages() -> list[tuple[Message, int]]:
    """Every message type with the length in words that section 5 gives for it."""
    hello = Hello(
        version=b"1.10",
        client_id=b"freecall".ljust(16),
        h3=H,
        zid=ZID,
        signature_capable=True,
        mitm=False,
        passive=True,
        hash_types=(b"S256", b"S384"),
        cipher_types=(b"AES1",),
        auth_tag_types=(b"HS32", b"HS80"),
        key_agreement_types=(b"X255", b"EC25", b"DH3k", b"Mult"),
        sas_types=(b"B32 ", b"B256"),
        mac=MAC,
    )
    algos = dict(
        hash_type=b"S256",
        cipher_type=b"AES1",
        auth_tag_type=b"HS80",
        sas_type=b"B32 ",
        mac=MAC,
    )
    ids = dict(rs1_id=b"1" * 8, rs2_id=b"2" * 8, aux_id=b"3" * 8, pbx_id=b"4" * 8)
    return [
        (hello, 20 + 11 + 2),
        (HelloAck(), 3),
        (Commit(h2=H, zid=ZID, key_agreement_type=b"DH3k", hvi=H, **algos), 29),
        (Commit(h2=H, zid=ZID, key_agreement_type=b"Mult", nonce=H[:16], **algos), 25),
        (
            Commit(h2=H, zid=ZID, key_agreement_type=b"Prsh", nonce=H[:16], key_id=H[:8], **algos),
            27,
        ),
        (DHPart(part=1, h1=H, pv=b"\x07" * 384, mac=MAC, **ids), 117),  # DH3k, Table 5
        (DHPart(part=2, h1=H, pv=b"\x07" * 64, mac=MAC, **ids), 37),  # EC25, Table 5
        (DHPart(part=2, h1=H, pv=b"\x07" * 32, mac=MAC, **ids), 29),  # X255
        (Confirm(part=1, confirm_mac=MAC, iv=H[:16], encrypted=b"e" * 40), 19),
        (Confirm(part=2, confirm_mac=MAC, iv=H[:16], encrypted=b"e" * 60), 24),
        (Conf2Ack(), 3),
        (Error(code=0x62), 4),
        (ErrorAck(), 3),
        (GoClear(clear_mac=MAC), 5),
        (ClearAck(), 3),
        (SasRelay(mac=MAC, iv=H[:16], encrypted=b"s" * 40), 19),
        (RelayAck(), 3),
        (Ping(version=b"1.10", endpoint_hash=b"E" * 8), 6),
        (PingAck(b"1.10", b"S" * 8, b"R" * 8, 0xDEADBEEF), 9),
    ]


@pytest.mark.parametrize(("message", "words"), sample_messages())
def test_round_trip_and_length(message: Message, words: int) -> None:
    encoded = message.encode()
    assert len(encoded) == 4 * words
    assert encoded[:2] == b"\x50\x5a"  # preamble
    assert struct.unpack("!H", encoded[2:4])[0] == words
    assert decode_message(encoded) == message
    # And framed in a packet.
    packet = encode_packet(encoded, 0x1234, 0xCAFEBABE)
    decoded = decode_packet(packet)
    assert (decoded.sequence, decoded.ssrc, decoded.message) == (0x1234, 0xCAFEBABE, encoded)


def test_hello_layout_byte_exact() -> None:
    hello = Hello(
        version=b"1.10",
        client_id=b"C" * 16,
        h3=H,
        zid=ZID,
        signature_capable=True,
        mitm=True,
        passive=True,
        hash_types=(b"S256",),
        cipher_types=(b"AES1", b"AES3"),
        auth_tag_types=(b"HS32", b"HS80", b"SK32"),
        key_agreement_types=(b"DH3k", b"EC25", b"X255", b"Mult"),
        sas_types=(b"B32 ", b"B256", b"B999", b"B777", b"B666"),
        mac=MAC,
    )
    expected = (
        b"\x50\x5a\x00\x25"  # preamble, 20 + 15 + 2 = 37 words
        + b"Hello   "
        + b"1.10"
        + b"C" * 16
        + H
        + ZID
        # 0|S|M|P, 8 unused bits, hc=1 | cc=2, ac=3 | kc=4, sc=5
        + bytes([0b0111_0000, 0x01, 0x23, 0x45])
        + b"S256AES1AES3HS32HS80SK32DH3kEC25X255MultB32 B256B999B777B666"
        + MAC
    )
    assert hello.encode() == expected
    assert decode_message(expected) == hello


def test_hello_ignores_unused_bits() -> None:
    encoded = bytearray(sample_messages()[0][0].encode())
    encoded[12 + 64] |= 0x0F  # low nibble of the flag octet is unused
    encoded[12 + 65] |= 0xF0  # so is the high nibble of the next
    decoded = decode_message(bytes(encoded))
    assert isinstance(decoded, Hello)
    assert decoded.hash_types == (b"S256", b"S384")


def test_confirm_plain_flags_and_signature() -> None:
    plain = ConfirmPlain(
        h0=H,
        pbx_enrollment=True,
        sas_verified=True,
        allow_clear=False,
        disclosure=True,
        cache_expiration=3600,
        signature_type=b"PGP ",
        signature=b"\xc2\x03abc",  # 5 octets, padded to 8
    )
    data = plain.encode()
    assert len(data) == 40 + 4 + 8
    # 15 unused bits, sig len = 3 words (type block + 2), flags 0000EVAD = 0b1101
    assert data[32:36] == bytes([0, 0, 3, 0b1101])
    assert data[36:40] == (3600).to_bytes(4, "big")
    assert data[40:44] == b"PGP "
    decoded = ConfirmPlain.decode(data)
    assert decoded.signature == b"\xc2\x03abc\x00\x00\x00"
    assert decoded.signature_type == b"PGP "
    assert (decoded.pbx_enrollment, decoded.sas_verified, decoded.allow_clear) == (1, 1, 0)
    assert decoded.disclosure
    unsigned = ConfirmPlain(h0=H)
    assert ConfirmPlain.decode(unsigned.encode()) == unsigned
    assert len(unsigned.encode()) == 40


def test_confirm_plain_rejects_wrong_sig_len() -> None:
    data = bytearray(ConfirmPlain(h0=H).encode())
    data[34] = 1  # claims 1 word of signature that is not there
    with pytest.raises(ZrtpError):
        ConfirmPlain.decode(bytes(data))


def test_confirm_plain_max_signature() -> None:
    ConfirmPlain(h0=H, signature_type=b"PGP ", signature=b"x" * 2040).encode()
    with pytest.raises(ValueError, match="511"):
        ConfirmPlain(h0=H, signature_type=b"PGP ", signature=b"x" * 2041).encode()


def test_sasrelay_plain_round_trip() -> None:
    plain = SasRelayPlain(
        sas_verified=True,
        rendering_scheme=b"B256",
        sashash=H,
        signature_type=b"X509",
        signature=b"cert+sig",
    )
    assert SasRelayPlain.decode(plain.encode()) == plain
    assert len(SasRelayPlain().encode()) == 40


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"\x50\x5a\x00\x03HelloAC",  # not whole words
        b"\x50\x5b\x00\x03HelloACK",  # preamble
        b"\x50\x5a\x00\x04HelloACK",  # length field
        b"\x50\x5a\x00\x03Unknown!",  # type
        b"\x50\x5a\x00\x04HelloACK\x00\x00\x00\x00",  # HelloACK with a body
        b"\x50\x5a\x00\x05Commit  " + b"\x00" * 8,  # too short
        b"\x50\x5a\x00\x05Error   " + b"\x00" * 8,
    ],
)
def test_decode_rejects(bad: bytes) -> None:
    with pytest.raises(ZrtpError):
        decode_message(bad)


def test_commit_length_must_match_mode() -> None:
    dh = Commit(
        h2=H,
        zid=ZID,
        hash_type=b"S256",
        cipher_type=b"AES1",
        auth_tag_type=b"HS80",
        key_agreement_type=b"DH3k",
        sas_type=b"B32 ",
        hvi=H,
    ).encode()
    as_mult = dh[: 12 + 56] + b"Mult" + dh[12 + 60 :]
    with pytest.raises(ZrtpError, match="25 words"):
        decode_message(as_mult)


def test_hello_counts_must_match_length() -> None:
    encoded = bytearray(sample_messages()[0][0].encode())
    encoded[12 + 67] += 1  # one more SAS type than present
    with pytest.raises(ZrtpError):
        decode_message(bytes(encoded))


def test_packet_header_and_crc() -> None:
    message = HelloAck().encode()
    packet = encode_packet(message, 0xFFFF, 0x01020304)
    assert packet[:12] == bytes.fromhex("1000ffff5a52545001020304")
    assert len(packet) == 12 + 12 + 4
    corrupted = bytearray(packet)
    corrupted[15] ^= 1
    with pytest.raises(ZrtpError, match="CRC"):
        decode_packet(bytes(corrupted))
    bad_crc = packet[:-1] + bytes([packet[-1] ^ 0x80])
    with pytest.raises(ZrtpError, match="CRC"):
        decode_packet(bad_crc)
    with pytest.raises(ZrtpError, match="fragmented"):
        decode_packet(b"\x11" + packet[1:])


def test_demultiplexing() -> None:
    zrtp = encode_packet(HelloAck().encode(), 1, 2)
    rtp = bytes.fromhex("800F1234DECAFBADCAFEBABE") + b"\xab" * 16
    rtcp = bytes.fromhex("81C8000BCAFEBABE") + b"\xab" * 16
    stun = bytes.fromhex("000100002112a442") + b"\x00" * 12
    dtls = b"\x16\xfe\xfd" + b"\x00" * 20
    assert is_zrtp_packet(zrtp)
    assert not is_zrtp_packet(rtp)
    assert not is_zrtp_packet(stun)
    assert classify_datagram(zrtp) == "zrtp"
    assert classify_datagram(rtp) == "rtp"
    assert classify_datagram(rtcp) == "rtcp"
    assert classify_datagram(stun) == "stun"
    assert classify_datagram(dtls) == "dtls"
    assert classify_datagram(b"") == "unknown"
    assert classify_datagram(b"\xff\xff") == "unknown"


def test_openpgp_signature_trimming() -> None:
    new_format = b"\xc2\x05" + b"abcde"  # tag 2, new format, 5-octet body
    assert openpgp_packet_length(new_format + b"\x00") == 7
    assert trim_openpgp_signature(new_format + b"\x00") == new_format
    two_octet = b"\xc2\xc0\x10" + b"x" * 0xD0  # (0xc0-192)<<8 + 0x10 + 192 = 208
    assert openpgp_packet_length(two_octet) == 3 + 208
    five_octet = b"\xc2\xff\x00\x00\x00\x03xyz"
    assert openpgp_packet_length(five_octet) == 9
    old_format = b"\x88\x04" + b"wxyz" + b"\x00\x00"  # tag 2, old format, 1-octet length
    assert trim_openpgp_signature(old_format) == old_format[:6]
    assert openpgp_packet_length(b"\x89\x00\x04wxyz") == 7  # 2-octet length
    assert trim_openpgp_signature(b"not pgp") == b"not pgp"
    assert trim_openpgp_signature(b"\xc2\x05abc") == b"\xc2\x05abc"  # truncated: unchanged
    assert trim_openpgp_signature(new_format + b"\x01") == new_format + b"\x01"  # not padding
    assert openpgp_packet_length(b"\xc2\xe1") is None  # partial length
    assert openpgp_packet_length(b"\x8b") is None  # indeterminate length
