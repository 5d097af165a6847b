"""RFC 3264 helpers: stream pairing, codec intersection, direction rules, hold detection."""

from __future__ import annotations

from itertools import product
from pathlib import Path

import pytest

from freecall import sdp
from freecall.sdp import Direction, SdpError

# The byte-exact third-party vectors copied into the repository (tests/vectors/MANIFEST.md).
VECTORS = Path(__file__).resolve().parents[1] / "vectors"
FLOW = VECTORS / "callflows/rfc3665/messages/3.01_successful-session-establishment"


def crlf(*lines: str) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode()


def body_of(path: Path) -> bytes:
    return path.read_bytes().split(b"\r\n\r\n", 1)[1]


OFFER = sdp.parse(
    crlf(
        "v=0",
        "o=alice 1 1 IN IP4 192.0.2.1",
        "s=-",
        "c=IN IP4 192.0.2.1",
        "t=0 0",
        "m=audio 49170 RTP/AVP 0 8 97 101",
        "a=rtpmap:97 opus/48000/2",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-15",
        "m=video 51372 RTP/AVP 31 96",
        "a=rtpmap:96 VP8/90000",
        "m=application 9 TCP/BFCP *",
    )
)


def answer(*media: str) -> sdp.SessionDescription:
    return sdp.parse(
        crlf("v=0", "o=bob 2 2 IN IP4 192.0.2.2", "s=-", "c=IN IP4 192.0.2.2", "t=0 0", *media)
    )


def test_rfc3665_offer_and_answer_pair_up() -> None:
    offer = sdp.parse(body_of(FLOW / "F01.sip"))
    reply = sdp.parse(body_of(FLOW / "F03.sip"))
    ((offered, answered),) = sdp.pair_media(offer, reply)
    codecs = sdp.negotiated_codecs(offered, answered)
    assert [(c.answer_format, c.offer_format) for c in codecs] == [("0", "0")]
    assert codecs[0].codec == sdp.RtpMap(0, "PCMU", 8000)


def test_codecs_keep_the_answerers_order_and_match_renumbered_dynamic_types() -> None:
    reply = answer(
        "m=audio 3456 RTP/AVP 101 8 96 9",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-11",
        "a=rtpmap:96 OPUS/48000/2",  # renumbered, and the name differs in case (RFC 4855)
        "m=video 0 RTP/AVP 31",
        "m=application 9 TCP/BFCP *",
    )
    (audio_o, audio_a), (video_o, video_a), (app_o, app_a) = sdp.pair_media(OFFER, reply)
    codecs = sdp.negotiated_codecs(audio_o, audio_a)
    assert [(c.answer_format, c.offer_format) for c in codecs] == [
        ("101", "101"),
        ("8", "8"),
        ("96", "97"),
    ]
    assert codecs[0].fmtp == "0-11"
    assert codecs[1].codec == sdp.RtpMap(8, "PCMA", 8000)
    assert codecs[2].codec == sdp.RtpMap(96, "OPUS", 48000, "2")
    assert sdp.negotiated_codecs(video_o, video_a) == []  # rejected: port 0
    assert [c.answer_format for c in sdp.negotiated_codecs(app_o, app_a)] == ["*"]


def test_same_number_different_codec_does_not_match() -> None:
    reply = answer(
        "m=audio 3456 RTP/AVP 97",
        "a=rtpmap:97 speex/16000",
        "m=video 5000 RTP/AVP 96",
        "a=rtpmap:96 VP8/90000",
        "m=application 0 TCP/BFCP *",
    )
    (audio_o, audio_a), (video_o, video_a), _ = sdp.pair_media(OFFER, reply)
    assert sdp.negotiated_codecs(audio_o, audio_a) == []
    assert [c.answer_format for c in sdp.negotiated_codecs(video_o, video_a)] == ["96"]


def test_channel_count_matters() -> None:
    offered = sdp.parse(
        crlf(
            "v=0",
            "o=- 1 1 IN IP4 192.0.2.1",
            "s=-",
            "t=0 0",
            "m=audio 1 RTP/AVP 96 97",
            "a=rtpmap:96 L16/16000",
            "a=rtpmap:97 L16/16000/2",
        )
    ).media[0]
    answered = sdp.parse(
        crlf(
            "v=0",
            "o=- 1 1 IN IP4 192.0.2.1",
            "s=-",
            "t=0 0",
            "m=audio 2 RTP/AVP 100",
            "a=rtpmap:100 L16/16000/2",
        )
    ).media[0]
    assert [
        (c.answer_format, c.offer_format) for c in sdp.negotiated_codecs(offered, answered)
    ] == [("100", "97")]


def test_undescribed_dynamic_types_match_only_by_number() -> None:
    offered = sdp.parse(
        crlf("v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-", "t=0 0", "m=audio 1 RTP/AVP 96 99")
    ).media[0]
    answered = sdp.parse(
        crlf("v=0", "o=- 1 1 IN IP4 192.0.2.1", "s=-", "t=0 0", "m=audio 2 RTP/AVP 99 98")
    ).media[0]
    assert [c.answer_format for c in sdp.negotiated_codecs(offered, answered)] == ["99"]


def test_pairing_rejects_a_wrong_number_of_streams_or_a_changed_media_type() -> None:
    with pytest.raises(SdpError, match="2 m= lines for 3 offered"):
        sdp.pair_media(OFFER, answer("m=audio 1 RTP/AVP 0", "m=video 0 RTP/AVP 31"))
    with pytest.raises(SdpError, match="stream 1"):
        sdp.pair_media(
            OFFER,
            answer("m=audio 1 RTP/AVP 0", "m=audio 2 RTP/AVP 0", "m=application 0 TCP/BFCP *"),
        )
    # A rejected stream may come back with any media type.
    pairs = sdp.pair_media(
        OFFER, answer("m=audio 1 RTP/AVP 0", "m=audio 0 RTP/AVP 0", "m=application 0 TCP/BFCP *")
    )
    assert len(pairs) == 3


# RFC 3264 section 6.1, the table of legal answers.
LEGAL = {
    Direction.SENDRECV: set(Direction),
    Direction.SENDONLY: {Direction.RECVONLY, Direction.INACTIVE},
    Direction.RECVONLY: {Direction.SENDONLY, Direction.INACTIVE},
    Direction.INACTIVE: {Direction.INACTIVE},
}


@pytest.mark.parametrize(("offered", "answered"), list(product(Direction, Direction)))
def test_direction_rules(offered: Direction, answered: Direction) -> None:
    assert sdp.direction_allowed(offered, answered) == (answered in LEGAL[offered])
    chosen = sdp.answer_direction(offered, answered)
    assert chosen in LEGAL[offered]
    if answered in LEGAL[offered]:
        assert chosen is answered


def test_answer_direction_examples() -> None:
    assert sdp.answer_direction(Direction.SENDONLY, Direction.SENDRECV) is Direction.RECVONLY
    assert sdp.answer_direction(Direction.RECVONLY, Direction.SENDRECV) is Direction.SENDONLY
    assert sdp.answer_direction(Direction.INACTIVE, Direction.SENDRECV) is Direction.INACTIVE
    assert sdp.answer_direction(Direction.SENDONLY, Direction.SENDONLY) is Direction.INACTIVE


def test_hold_detection() -> None:
    held = answer(
        "m=audio 1 RTP/AVP 0",
        "a=sendonly",
        "m=video 2 RTP/AVP 31",
        "a=inactive",
        "m=application 0 TCP/BFCP *",
    )
    assert sdp.is_held(held, 0) and sdp.is_held(held, 1) and not sdp.is_held(held, 2)
    assert sdp.is_on_hold(held)
    partly = answer(
        "m=audio 1 RTP/AVP 0", "a=sendonly", "m=video 2 RTP/AVP 31", "m=text 0 RTP/AVP 0"
    )
    assert sdp.is_held(partly, 0) and not sdp.is_held(partly, 1)
    assert not sdp.is_on_hold(partly)
    recvonly = answer("m=audio 1 RTP/AVP 0", "a=recvonly")
    assert not sdp.is_on_hold(recvonly)
    assert not sdp.is_on_hold(answer("m=audio 0 RTP/AVP 0"))  # nothing live
    assert not sdp.is_on_hold(answer())


def test_rfc2543_hold_by_null_address() -> None:
    legacy = sdp.parse(
        crlf(
            "v=0",
            "o=- 1 2 IN IP4 192.0.2.1",
            "s=-",
            "c=IN IP4 0.0.0.0",
            "t=0 0",
            "m=audio 49170 RTP/AVP 0",
        )
    )
    assert sdp.is_held(legacy, 0) and sdp.is_on_hold(legacy)
