"""The rewrites the proxy performs: endpoints, attributes, versions, hold, rejected streams."""

from __future__ import annotations

import pytest

from freecall import sdp
from freecall.sdp import Connection, Direction, SdpError

ZRTP = "1.10 " + "ab" * 32


def crlf(*lines: str) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode()


# A softphone's offer on loopback: audio with a=rtcp, video without, a rejected third stream.
OFFER = crlf(
    "v=0",
    "o=alice 2890844526 2890844526 IN IP4 127.0.0.1",
    "s=-",
    "c=IN IP4 127.0.0.1",
    "t=0 0",
    "m=audio 49170 RTP/AVP 0 8 101",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32",
    "a=rtcp:49171 IN IP4 127.0.0.1",
    "a=sendrecv",
    "m=video 51372 RTP/AVP 31",
    "c=IN IP4 127.0.0.1",
    "a=rtpmap:31 H261/90000",
    "m=text 0 RTP/AVP 98",
    "a=rtpmap:98 t140/1000",
)


def test_rewrite_one_media_line() -> None:
    description = sdp.parse(OFFER)
    description.rewrite_media_endpoint(0, "192.0.2.10", 20000, 20001)
    audio = description.media[0]
    assert audio.port == 20000
    assert audio.connection == Connection("192.0.2.10")
    assert audio.rtcp == sdp.Rtcp(20001, Connection("192.0.2.10"))
    # The new c= sits right after the m= line (RFC 8866 order m i c b k a), the rest in place.
    assert [line.render() for line in audio.lines[:3]] == [
        "m=audio 20000 RTP/AVP 0 8 101",
        "c=IN IP4 192.0.2.10",
        "a=rtpmap:0 PCMU/8000",
    ]
    assert description.media[1] == sdp.parse(OFFER).media[1]  # untouched
    assert description.connection == Connection("127.0.0.1")  # session level untouched


def test_rewrite_keeps_a_port_only_rtcp_attribute_port_only() -> None:
    body = OFFER.replace(b"a=rtcp:49171 IN IP4 127.0.0.1", b"a=rtcp:49171")
    description = sdp.parse(body)
    description.media[0].rewrite_endpoint("192.0.2.10", 30000)
    assert description.media[0].rtcp == sdp.Rtcp(30001)


def test_rewrite_adds_rtcp_only_when_it_is_not_port_plus_one() -> None:
    description = sdp.parse(OFFER)
    video = description.media[1]
    video.rewrite_endpoint("192.0.2.10", 30000, 30001)
    assert not video.has_attribute("rtcp")
    video.rewrite_endpoint("192.0.2.10", 30000, 30100)
    assert video.rtcp == sdp.Rtcp(30100)
    # rtcp-mux style: RTCP on the RTP port.
    video.rewrite_endpoint("192.0.2.10", 30000, 30000)
    assert video.rtcp == sdp.Rtcp(30000)


def test_rewrite_to_ipv6() -> None:
    description = sdp.parse(OFFER)
    description.rewrite_media_endpoint(0, "2001:db8::10", 20000, 20001)
    assert description.media[0].connection == Connection("2001:db8::10", "IP6")
    assert description.media[0].rtcp == sdp.Rtcp(20001, Connection("2001:db8::10", "IP6"))
    with pytest.raises(SdpError):
        description.rewrite_media_endpoint(0, "not an address", 20000)
    with pytest.raises(SdpError):
        description.rewrite_media_endpoint(0, "192.0.2.10", 70000)


def test_rewrite_all_endpoints_leaves_no_loopback_address() -> None:
    description = sdp.parse(OFFER)
    description.rewrite_endpoints("192.0.2.10", [(20000, 20001), 20002, None])
    out = description.to_bytes()
    assert b"127.0.0.1" not in out
    assert description.connection == Connection("192.0.2.10")
    assert description.origin.address == "192.0.2.10"
    assert description.origin.session_version == 2890844526  # not bumped implicitly
    audio, video, text = description.media
    assert (audio.port, video.port, text.port) == (20000, 20002, 0)
    assert audio.connections == [] and video.connections == []
    assert audio.rtcp == sdp.Rtcp(20001, Connection("192.0.2.10"))
    assert all(description.effective_connection(i) == Connection("192.0.2.10") for i in (0, 1))
    reparsed = sdp.parse(out)
    assert reparsed == description
    # Everything but the rewritten lines is unchanged, in order.
    unchanged = [line for line in OFFER.decode().split("\r\n") if "127.0.0.1" not in line]
    kept = out.decode().split("\r\n")
    for line in unchanged:
        if not line.startswith(("m=audio", "m=video")):
            assert line in kept


def test_rewrite_all_pins_streams_left_alone_to_their_old_address() -> None:
    body = crlf(
        "v=0",
        "o=- 1 1 IN IP4 127.0.0.1",
        "s=-",
        "c=IN IP4 127.0.0.1",
        "t=0 0",
        "m=audio 4000 RTP/AVP 0",
        "m=video 4002 RTP/AVP 31",
    )
    description = sdp.parse(body)
    description.rewrite_endpoints("192.0.2.10", [20000, None], origin=False)
    assert description.effective_connection(0) == Connection("192.0.2.10")
    assert description.effective_connection(1) == Connection("127.0.0.1")
    assert description.media[1].port == 4002
    assert description.origin.address == "127.0.0.1"
    with pytest.raises(SdpError, match="2 media lines"):
        description.rewrite_endpoints("192.0.2.10", [20000])


def test_rewrite_adds_a_session_connection_when_there_was_none() -> None:
    body = crlf(
        "v=0",
        "o=- 1 1 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "m=audio 4000 RTP/AVP 0",
        "c=IN IP4 127.0.0.1",
    )
    description = sdp.parse(body)
    description.rewrite_endpoints("192.0.2.10", [20000])
    assert [line.render() for line in description.lines] == [
        "v=0",
        "o=- 1 1 IN IP4 192.0.2.10",
        "s=-",
        "c=IN IP4 192.0.2.10",
        "t=0 0",
    ]


def test_set_add_and_remove_attributes() -> None:
    description = sdp.parse(OFFER)
    audio = description.media[0]
    assert audio.remove_attribute("crypto") == 1
    assert audio.crypto == []
    audio.set_zrtp_hash(sdp.ZrtpHash.parse(ZRTP))
    assert audio.attribute_values("zrtp-hash") == [ZRTP]
    audio.set_zrtp_hash(sdp.ZrtpHash("1.10", "cd" * 32))
    assert audio.zrtp_hashes == [sdp.ZrtpHash("1.10", "cd" * 32)]
    audio.set_zrtp_hash(None)
    assert audio.zrtp_hashes == []
    audio.add_attribute("ptime", "20")
    audio.add_attribute("ptime", "30")
    assert audio.attribute_values("ptime") == ["20", "30"]
    audio.set_attribute("ptime", "40")
    assert audio.attribute_values("ptime") == ["40"]
    audio.set_attribute("x-flag")
    assert audio.attribute("x-flag") == sdp.Attribute("x-flag")
    assert audio.remove_attribute("absent") == 0
    assert audio.lines[-1].render() == "a=x-flag"
    with pytest.raises(SdpError):
        audio.set_attribute("bad name", "x")
    with pytest.raises(SdpError):
        audio.add_attribute("rtpmap", "nonsense")
    with pytest.raises(SdpError):
        audio.add_attribute("sendonly", "value")
    assert sdp.parse(description.to_bytes()) == description


def test_set_attribute_replaces_in_place() -> None:
    description = sdp.parse(OFFER)
    audio = description.media[0]
    before = [line.render() for line in audio.lines]
    audio.set_attribute("rtpmap", "0 PCMU/8000")
    # The first rtpmap is replaced where it was, the second (same name) removed.
    after = [line.render() for line in audio.lines]
    assert after == [line for line in before if line != "a=rtpmap:101 telephone-event/8000"]


def test_session_level_attributes() -> None:
    description = sdp.parse(OFFER)
    description.add_attribute("tool", "freecall")
    assert description.lines[-1].render() == "a=tool:freecall"
    description.set_zrtp_hash(sdp.ZrtpHash.parse(ZRTP))
    assert description.zrtp_hashes == [sdp.ZrtpHash.parse(ZRTP)]
    # Session attributes stay in the session section, before the first m= line.
    text = description.to_str()
    assert text.index("a=zrtp-hash") < text.index("m=audio")


def test_bump_version() -> None:
    description = sdp.parse(OFFER)
    assert description.bump_version() == 2890844527
    assert description.origin.session_version == 2890844527
    assert description.lines[1].render() == "o=alice 2890844526 2890844527 IN IP4 127.0.0.1"
    big = sdp.parse(OFFER.replace(b"2890844526 IN", b"9" * 40 + b" IN"))
    assert big.bump_version() == 10**40


def test_origin_setter_and_copy_are_independent() -> None:
    description = sdp.parse(OFFER)
    clone = description.copy()
    clone.origin = sdp.Origin("freecall", "1", 7, "192.0.2.10")
    clone.media[0].reject()
    clone.media.append(sdp.MediaDescription.create(sdp.MediaLine("audio", 0, "RTP/AVP", ("0",))))
    assert description == sdp.parse(OFFER)
    assert clone != description
    assert clone.origin.render() == "freecall 1 7 IN IP4 192.0.2.10"
    assert len(clone.media) == 4 and len(description.media) == 3


def test_hold_and_resume_re_offer() -> None:
    description = sdp.parse(OFFER)
    description.media[0].set_direction(Direction.SENDONLY)
    description.bump_version()
    assert description.media[0].direction is Direction.SENDONLY
    assert description.media[0].attribute_values("sendrecv") == []
    assert sdp.is_held(description, 0)
    description.media[0].set_direction(Direction.INACTIVE)
    assert sdp.is_held(description, 0)
    description.media[0].set_direction(None)
    assert description.media[0].attribute_values("inactive") == []
    assert description.effective_direction(0) is Direction.SENDRECV
    assert not sdp.is_held(description, 0)
    description.set_direction(Direction.SENDONLY)
    assert sdp.is_held(description, 1)


def test_reject_and_bandwidths() -> None:
    description = sdp.parse(OFFER)
    video = description.media[1]
    video.reject()
    assert video.is_rejected and video.port == 0
    assert video.formats == ("31",)  # formats kept: SDP needs at least one
    video.set_bandwidths([sdp.Bandwidth("AS", 64), sdp.Bandwidth("TIAS", 64000)])
    assert [line.render() for line in video.lines[:4]] == [
        "m=video 0 RTP/AVP 31",
        "c=IN IP4 127.0.0.1",
        "b=AS:64",
        "b=TIAS:64000",
    ]
    video.set_bandwidths([])
    assert video.bandwidths == []
    video.set_port(5000)
    assert not video.is_rejected


def test_create_a_description_from_scratch() -> None:
    description = sdp.SessionDescription.create(
        sdp.Origin("freecall", "3", 1, "192.0.2.10"),
        connection=Connection("192.0.2.10"),
    )
    description.media.append(
        sdp.MediaDescription.create(
            sdp.MediaLine("audio", 20000, "RTP/AVP", ("0", "101")),
            attributes=[
                sdp.Attribute("rtpmap", "101 telephone-event/8000"),
                sdp.Attribute("sendrecv"),
            ],
        )
    )
    assert description.to_bytes() == crlf(
        "v=0",
        "o=freecall 3 1 IN IP4 192.0.2.10",
        "s=-",
        "c=IN IP4 192.0.2.10",
        "t=0 0",
        "m=audio 20000 RTP/AVP 0 101",
        "a=rtpmap:101 telephone-event/8000",
        "a=sendrecv",
    )
    assert sdp.parse(description.to_bytes()) == description


def test_constructors_refuse_broken_structure() -> None:
    with pytest.raises(SdpError, match="start with an m="):
        sdp.MediaDescription([sdp.Line("a", "sendrecv")])
    with pytest.raises(SdpError, match="not allowed in a media"):
        sdp.MediaDescription([sdp.Line("m", "audio 1 RTP/AVP 0"), sdp.Line("o", "x")])
    with pytest.raises(SdpError, match="exactly one o="):
        sdp.SessionDescription([sdp.Line("v", "0"), sdp.Line("s", "-"), sdp.Line("t", "0 0")])
    with pytest.raises(SdpError, match="o= needs"):
        sdp.SessionDescription([sdp.Line("v", "0"), sdp.Line("o", "x"), sdp.Line("s", "-")])
