"""Parsing, typed access and byte-exact round trips (RFC 8866), on real-world bodies."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest

from freecall import sdp
from freecall.sdp import Connection, Direction, SdpError

# The byte-exact third-party vectors copied into the repository (tests/vectors/MANIFEST.md).
VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def crlf(*lines: str) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode()


# What baresip 3.x sends for an audio call (values as in its SDP module; address loopback).
BARESIP = crlf(
    "v=0",
    "o=- 1618452382 3213214386 IN IP4 127.0.0.1",
    "s=-",
    "c=IN IP4 127.0.0.1",
    "t=0 0",
    "m=audio 10000 RTP/AVP 96 9 0 8 101",
    "b=AS:128",
    "a=rtpmap:96 opus/48000/2",
    "a=fmtp:96 stereo=1;sprop-stereo=1",
    "a=rtpmap:9 G722/8000",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-15",
    "a=sendrecv",
    "a=label:1",
    "a=rtcp-rsize",
    "a=ssrc:1234565 cname:ab@cd",
    "a=ptime:20",
)

# Linphone with ZRTP, RTCP-XR, AVPF feedback and an explicit a=rtcp (RFC 3605).
LINPHONE = crlf(
    "v=0",
    "o=alice 2213 1609 IN IP4 127.0.0.1",
    "s=Talk",
    "c=IN IP4 127.0.0.1",
    "t=0 0",
    "a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics",
    "a=record:off",
    "m=audio 7078 RTP/AVPF 96 97 0 8 101",
    "a=rtpmap:96 opus/48000/2",
    "a=fmtp:96 useinbandfec=1",
    "a=rtpmap:97 speex/16000",
    "a=rtpmap:101 telephone-event/8000",
    "a=rtcp:7079",
    "a=rtcp-fb:* trr-int 1000",
    "a=rtcp-fb:* ccm tmmbr",
    "a=zrtp-hash:1.10 7be1e4252cb63a9f55c7cef42def47c30a85422c1f3a67e47e62f34b423ea6da",
    "m=video 9078 RTP/AVPF 96",
    "a=rtpmap:96 VP8/90000",
    "a=recvonly",
)

# SIPp's pfca_uac_apattern_crypto_simple_aescm128sha180.xml after keyword substitution.
SIPP_SDES = crlf(
    "v=0",
    "o=16001 0 0 IN IP4 127.0.0.1",
    "s=-",
    "c=IN IP4 127.0.0.1",
    "t=0 0",
    "m=audio 6000 RTP/AVP 0 18 9 103 8 101",
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4",
    "a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj",
    "a=rtcp:6001",
    "a=sendrecv",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:18 G729/8000",
    "a=rtpmap:9 G722/16000",
    "a=fmtp:9 bitrate=64000",
    "a=rtpmap:103 G7221/16000",
    "a=fmtp:103 bitrate=32000",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-11,16",
)

REAL_WORLD = {"baresip": BARESIP, "linphone": LINPHONE, "sipp-sdes": SIPP_SDES}


def sip_body(path: Path) -> bytes:
    """The body of a stored SIP message (after the first empty line, CRLF or LF)."""
    raw = path.read_bytes()
    for separator in (b"\r\n\r\n", b"\n\n"):
        if separator in raw:
            return raw.split(separator, 1)[1]
    return b""


def vector_bodies() -> list[tuple[str, bytes]]:
    paths = sorted((VECTORS / "callflows/rfc3665/messages").glob("*/*.sip"))
    paths += sorted((VECTORS / "rfc5118").glob("*/*.dat"))
    out = []
    for path in paths:
        body = sip_body(path)
        if body.startswith(b"v="):
            out.append((f"{path.parent.name}/{path.name}", body))
    return out


VECTOR_BODIES = vector_bodies()


def test_the_vector_set_has_the_expected_sdp_bodies() -> None:
    # 3 RFC 5118 bodies in each of the two copies and the RFC 3665 offers and answers.
    assert len(VECTOR_BODIES) >= 60
    assert sum(1 for name, _ in VECTOR_BODIES if name.startswith("archive-lf/")) == 3


@pytest.mark.parametrize(("name", "body"), VECTOR_BODIES, ids=[n for n, _ in VECTOR_BODIES])
def test_every_vector_body_parses_and_round_trips(name: str, body: bytes) -> None:
    description = sdp.parse(body)
    expected = body if b"\r\n" in body else body.replace(b"\n", b"\r\n")
    assert description.to_bytes() == expected
    assert sdp.parse(description.to_bytes()) == description
    assert description.origin.session_version >= 0
    for index in range(len(description.media)):
        assert description.effective_connection(index) is not None


@pytest.mark.parametrize("name", sorted(REAL_WORLD))
def test_real_world_bodies_round_trip_byte_for_byte(name: str) -> None:
    body = REAL_WORLD[name]
    assert sdp.parse(body).to_bytes() == body
    assert bytes(sdp.parse(body)) == body
    assert str(sdp.parse(body)) == body.decode()


def test_rfc5118_ipv6_in_sdp() -> None:
    description = sdp.parse(sip_body(VECTORS / "rfc5118/archive-lf/ipv6-in-sdp.dat"))
    origin = description.origin
    assert (origin.username, origin.session_id, origin.session_version) == (
        "assistant",
        "971731711378798081",
        0,
    )
    assert (origin.addrtype, origin.address) == ("IP6", "2001:db8::20")
    assert description.connection == Connection("2001:db8::20", "IP6")
    assert description.session_name == "Live video feed for today's meeting"
    assert [t.render() for t in description.timings] == ["3338481189 3370017201"]
    assert [m.media_type for m in description.media] == ["audio", "video"]
    assert description.media[1].rtpmap(107) == sdp.RtpMap(107, "H263-1998", 90000)


def test_rfc5118_multiple_ip_in_sdp_has_per_media_connections() -> None:
    description = sdp.parse(sip_body(VECTORS / "rfc5118/archive-lf/mult-ip-in-sdp.dat"))
    assert description.session_name == ""  # "s=" with nothing: tolerated
    assert description.connection is None
    audio, video = (description.effective_connection(i) for i in range(2))
    assert audio == Connection("192.0.2.1")
    assert video == Connection("2001:db8::1", "IP6")
    assert video is not None and video.ip == ipaddress.IPv6Address("2001:db8::1")


def test_rfc5118_ipv4_mapped_ipv6() -> None:
    description = sdp.parse(sip_body(VECTORS / "rfc5118/archive-lf/ipv4-mapped-ipv6.dat"))
    connection = description.connection
    assert connection is not None
    assert connection.address == "::ffff:192.0.2.2"
    assert connection.ip == ipaddress.IPv6Address("::ffff:192.0.2.2")
    assert description.origin.address == "::ffff:192.0.2.2"


def test_rfc3665_offer() -> None:
    path = VECTORS / "callflows/rfc3665/messages/3.01_successful-session-establishment/F01.sip"
    description = sdp.parse(sip_body(path))
    media = description.media[0]
    assert media.media_line == sdp.MediaLine("audio", 49172, "RTP/AVP", ("0",))
    assert media.codec(0) == sdp.RtpMap(0, "PCMU", 8000)
    assert description.effective_direction(0) is Direction.SENDRECV


def test_baresip_typed_access() -> None:
    description = sdp.parse(BARESIP)
    audio = description.media[0]
    assert audio.formats == ("96", "9", "0", "8", "101")
    assert audio.rtpmap("96") == sdp.RtpMap(96, "opus", 48000, "2")
    assert audio.rtpmap(96) is not None and audio.rtpmap(96).channels == 2  # type: ignore[union-attr]
    assert audio.fmtp(96) == "stereo=1;sprop-stereo=1"
    assert audio.fmtp("101") == "0-15"
    assert audio.fmtp(0) is None
    assert audio.bandwidths == [sdp.Bandwidth("AS", 128)]
    assert audio.direction is Direction.SENDRECV
    assert audio.attribute("ssrc") == sdp.Attribute("ssrc", "1234565 cname:ab@cd")
    assert audio.attribute_values("rtcp-rsize") == [None]
    assert audio.has_attribute("label") and not audio.has_attribute("Label")
    assert audio.rtcp is None
    assert set(audio.rtpmaps) == {"96", "9", "0", "8", "101"}


def test_linphone_typed_access() -> None:
    description = sdp.parse(LINPHONE)
    audio, video = description.media
    assert audio.proto == "RTP/AVPF" and audio.media_line.is_rtp
    assert audio.rtcp == sdp.Rtcp(7079)
    assert audio.zrtp_hashes == [
        sdp.ZrtpHash("1.10", "7be1e4252cb63a9f55c7cef42def47c30a85422c1f3a67e47e62f34b423ea6da")
    ]
    assert audio.zrtp_hashes[0].digest[:2] == b"\x7b\xe1"
    assert audio.codec(0) == sdp.RtpMap(0, "PCMU", 8000)  # static, no rtpmap line
    assert audio.codec(8) == sdp.RtpMap(8, "PCMA", 8000)
    assert description.attribute("record") == sdp.Attribute("record", "off")
    assert description.effective_direction(0) is Direction.SENDRECV
    assert description.effective_direction(1) is Direction.RECVONLY
    assert video.rtpmap(96) == sdp.RtpMap(96, "VP8", 90000)


def test_sipp_crypto_lines() -> None:
    audio = sdp.parse(SIPP_SDES).media[0]
    first, second = audio.crypto
    assert (first.tag, first.suite) == (1, "AES_CM_128_HMAC_SHA1_80")
    assert first.key_params.startswith("inline:WVNf") and first.key_params.endswith("|1:4")
    assert second.suite == "AES_CM_128_HMAC_SHA1_32"
    assert audio.rtcp == sdp.Rtcp(6001)


def test_session_level_direction_is_the_default() -> None:
    body = crlf(
        "v=0",
        "o=- 1 1 IN IP4 192.0.2.1",
        "s=-",
        "c=IN IP4 192.0.2.1",
        "t=0 0",
        "a=sendonly",
        "m=audio 4000 RTP/AVP 0",
        "m=video 4002 RTP/AVP 31",
        "a=inactive",
    )
    description = sdp.parse(body)
    assert description.direction is Direction.SENDONLY
    assert description.media[0].direction is None
    assert description.effective_direction(0) is Direction.SENDONLY
    assert description.effective_direction(1) is Direction.INACTIVE


def test_multicast_connection_forms() -> None:
    assert Connection.parse("IN IP4 224.2.36.42/127") == Connection("224.2.36.42", ttl=127)
    assert Connection.parse("IN IP4 224.2.1.1/127/3") == Connection("224.2.1.1", ttl=127, count=3)
    assert Connection.parse("IN IP6 FF15::101/3") == Connection("FF15::101", "IP6", count=3)
    assert Connection.parse("IN IP4 host.example.com").ip is None
    assert Connection.parse("IN IP4 0.0.0.0").is_null
    assert Connection("224.2.1.1", ttl=127, count=3).render() == "IN IP4 224.2.1.1/127/3"
    # An address type we do not know is opaque, slashes and all (RFC 8866 extn-addr).
    assert Connection.parse("ATM NSAP 47.0005.80/x").address == "47.0005.80/x"


@pytest.mark.parametrize(
    "value",
    [
        "IN IP4",
        "IN IP4 192.0.2.1 extra",
        "IN IP4 192.0.2.300",
        "IN IP4 192.0.2",
        "IN IP6 2001:db8:::1",
        "IN IP6 192.0.2.1",
        "IN IP4 224.2.1.1/256",
        "IN IP4 224.2.1.1/1/2/3",
        "IN IP6 ff15::1/1/2",
        "IN IP4 224.2.1.1/x",
        "IN IP4 bad!name",
    ],
)
def test_bad_connection_lines(value: str) -> None:
    with pytest.raises(SdpError):
        Connection.parse(value)


def test_lf_input_is_accepted_and_crlf_is_emitted() -> None:
    body = BARESIP.replace(b"\r\n", b"\n")
    assert sdp.parse(body).to_bytes() == BARESIP
    mixed = BARESIP.replace(b"\r\n", b"\n", 3)
    assert sdp.parse(mixed).to_bytes() == BARESIP


def test_trailing_empty_lines_and_missing_final_newline_are_tolerated() -> None:
    assert sdp.parse(BARESIP + b"\r\n\r\n").to_bytes() == BARESIP
    assert sdp.parse(BARESIP[:-2]).to_bytes() == BARESIP


def test_str_input_and_non_utf8_bytes_round_trip() -> None:
    assert sdp.parse(BARESIP.decode()).to_bytes() == BARESIP
    latin1 = BARESIP.replace(b"s=-", b"s=Caf\xe9 \xff")
    description = sdp.parse(latin1)
    assert description.to_bytes() == latin1
    assert description.session_name.startswith("Caf")


def test_unknown_lines_and_odd_spacing_are_kept() -> None:
    body = crlf(
        "v=0",
        "o=-  42  7 IN IP4 192.0.2.1",
        "s= ",
        "i=A session",
        "u=http://example.com/s",
        "e=alice@example.com",
        "p=+1 617 555-6011",
        "c=IN IP4 192.0.2.1",
        "b=CT:128",
        "t=2873397496 2873404696",
        "r=7d 1h 0 25h",
        "z=2882844526 -1h 2898848070 0",
        "k=prompt",
        "a=x-unknown:whatever the value is",
        "a=tool:freecall",
        "m=audio 49170/2 RTP/AVP 0",
        "i=voice",
        "b=TIAS:64000",
        "k=clear:abc",
        "a=x-private",
    )
    description = sdp.parse(body)
    assert description.to_bytes() == body
    assert description.origin.session_id == "42"
    assert description.origin.session_version == 7
    assert description.media[0].media_line.port_count == 2
    assert description.bandwidths == [sdp.Bandwidth("CT", 128)]
    assert description.media[0].bandwidths == [sdp.Bandwidth("TIAS", 64000)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"\r\n\r\n", "empty"),
        (b"o=- 1 1 IN IP4 192.0.2.1\r\n", "start with v=0"),
        (b"v=1\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\n", "version"),
        (b"v=0\r\ns=-\r\nt=0 0\r\n", "exactly one o="),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\nt=0 0\r\n", "exactly one s="),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\n", "at least one t="),
        (
            b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\n\r\nm=audio 1 RTP/AVP 0\r\n",
            "empty line",
        ),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nx=1\r\n", "unknown type"),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nA=b\r\n", "unknown type"),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nv 0\r\n", "<type>=<value>"),
        (b"v=0\r\no=- 1 1 IN IP4\r\ns=-\r\nt=0 0\r\n", "o= needs 6"),
        (b"v=0\r\no=- 1 x IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\n", "sess-version"),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0\r\n", "t= needs 2"),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=audio 70000 RTP/AVP 0\r\n", "port"),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=audio 1\r\n", "m= needs"),
        (
            b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=audio 1 RTP/AVP 0\r\nt=0 0\r\n",
            "not allowed in a media",
        ),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nb=AS\r\n", "b= needs"),
        (
            b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\n"
            b"c=IN IP4 192.0.2.1\r\nc=IN IP4 192.0.2.2\r\nt=0 0\r\n",
            "at most one",
        ),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\na=sendonly:x\r\n", "takes no value"),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\na=rtpmap\r\n", "needs a value"),
        (
            b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\na=rtpmap:300 x/8000\r\n",
            "payload type",
        ),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\na=rtpmap:96 opus\r\n", "clock rate"),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\na=rtcp:port\r\n", "rtcp port"),
        (
            b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\na=zrtp-hash:1.10 abcdef\r\n",
            "64 hex",
        ),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\na=crypto:1 AES\r\n", "crypto needs"),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\na=bad name\r\n", "not a token"),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=a\rb\r\nt=0 0\r\n", "CR"),
        (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=a\x00b\r\nt=0 0\r\n", "NUL"),
        (
            b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=\xd9\xa1 0\r\n",
            "t= start",
        ),  # Arabic-Indic 1
    ],
)
def test_malformed_descriptions_raise_sdp_error(body: bytes, message: str) -> None:
    with pytest.raises(SdpError, match=message) as info:
        sdp.parse(body)
    assert isinstance(info.value, ValueError)


def test_errors_name_the_line() -> None:
    with pytest.raises(SdpError) as info:
        sdp.parse(BARESIP.replace(b"a=rtpmap:9 G722/8000", b"a=rtpmap:9 G722"))
    assert info.value.line == 10
    assert str(info.value).startswith("line 10: ")


def test_size_and_line_bounds() -> None:
    with pytest.raises(SdpError, match="larger than"):
        sdp.parse(BARESIP + b"a=x:" + b"y" * sdp.MAX_SDP_SIZE + b"\r\n")
    many = BARESIP + b"a=x\r\n" * sdp.MAX_SDP_LINES
    with pytest.raises(SdpError, match="more than"):
        sdp.parse(many)
    assert len(sdp.parse(many, max_lines=2 * sdp.MAX_SDP_LINES).media[0].attributes) > 1000
    with pytest.raises(SdpError, match="larger than"):
        sdp.parse(BARESIP, max_size=100)
    with pytest.raises(SdpError, match="larger than"):
        sdp.parse(BARESIP.decode(), max_size=100)


def test_huge_numbers_are_rejected_not_converted() -> None:
    body = BARESIP.replace(b"3213214386", b"9" * 5000)
    with pytest.raises(SdpError, match="at most 64 digits"):
        sdp.parse(body)


def test_typed_values_validate_on_construction() -> None:
    with pytest.raises(SdpError):
        sdp.MediaLine("audio", 65536, "RTP/AVP", ("0",))
    with pytest.raises(SdpError):
        sdp.MediaLine("audio", 1, "RTP/AVP", ("a b",))
    with pytest.raises(SdpError):
        sdp.Attribute("a:b", None)
    with pytest.raises(SdpError):
        sdp.Attribute("x", "line\r\nbreak")
    with pytest.raises(SdpError):
        sdp.Origin("-", "1", -1, "192.0.2.1")
    with pytest.raises(SdpError):
        sdp.Origin("-", "1", True, "192.0.2.1")
    with pytest.raises(SdpError):
        sdp.Connection("192.0.2.1", ttl=300)
    with pytest.raises(SdpError):
        sdp.Connection("2001:db8::1", "IP6", ttl=3)
    with pytest.raises(SdpError):
        sdp.ZrtpHash("1.10", "00")
    with pytest.raises(SdpError):
        sdp.Line("x", "1")
    assert sdp.MediaLine("audio", 1, "RTP/AVP", ["0", "8"]).formats == ("0", "8")  # type: ignore[arg-type]


def test_direction_helpers() -> None:
    assert Direction.SENDONLY.reversed() is Direction.RECVONLY
    assert Direction.INACTIVE.reversed() is Direction.INACTIVE
    assert Direction.SENDRECV.sends and Direction.SENDRECV.receives
    assert not Direction.INACTIVE.sends and not Direction.INACTIVE.receives
    assert Direction.from_flags(True, False) is Direction.SENDONLY
    assert str(Direction.RECVONLY) == "recvonly"


def test_fmtp_with_a_tab_and_without_parameters() -> None:
    assert sdp.Fmtp.parse("101\t0-15") == sdp.Fmtp("101", "0-15")
    assert sdp.Fmtp.parse("101") == sdp.Fmtp("101", "")
    assert sdp.Fmtp("101").render() == "101"


@pytest.mark.parametrize(
    "line",
    [
        "a=" + "x" * 60_000,
        "a=rtpmap:" + "9" * 60_000,
        "m=audio 1 RTP/AVP " + "0 " * 30_000,
        "c=IN IP4 " + "1." * 30_000,
        "c=IN IP6 " + ":" * 60_000,
        "o=" + " " * 60_000,
        "b=" + ":" * 60_000,
        "a=fmtp:" + " \t" * 30_000,
    ],
)
def test_pathological_lines_are_handled_quickly(line: str) -> None:
    body = BARESIP.decode() + line + "\r\n"
    started = time.perf_counter()
    try:
        description = sdp.parse(body)
    except SdpError:
        pass
    else:
        assert sdp.parse(description.to_bytes()) == description
    assert time.perf_counter() - started < 2.0
