"""The SDP side of the media bridge (freecall.srtp.calls) with stand-in streams: what each side
sees, when streams start, re-offers, hold, refusals."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from freecall import sdp
from freecall.sip.message import Request, Response, parse_message
from freecall.sip.proxy import Side
from freecall.srtp.calls import MediaCalls, MediaRefused
from freecall.srtp.ice import Candidate, IceParameters

KEY = ("call-1", "tag-a")
HASH = "1.10 " + "ab" * 32

PHONE_OFFER = (
    "v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n"
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n"
    "a=rtcp-mux\r\na=sendrecv\r\n"
    "m=application 40010 TCP/BFCP *\r\n"
)
FAR_ANSWER = (
    "v=0\r\no=bob 7 7 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\n"
    f"m=audio 30000 RTP/AVP 0 101\r\na=rtcp:30005\r\na=zrtp-hash:{HASH}\r\n"
    "m=application 0 TCP/BFCP *\r\n"
)


@dataclass(eq=False)
class FakeStream:
    phone_port: int
    net_port: int
    zrtp_hash_attribute: str | None = "1.10 " + "cd" * 32
    softphone: tuple[object, ...] | None = None
    remote: tuple[object, ...] | None = None
    timeouts: list[float | None] = field(default_factory=list)
    started: int = 0
    released: bool = False
    ice: IceParameters | None = None
    remote_ice: list[tuple[IceParameters | None, bool]] = field(default_factory=list)

    @property
    def ice_parameters(self) -> IceParameters | None:
        return self.ice

    def set_remote_ice(self, params: IceParameters | None, *, controlling: bool) -> None:
        self.remote_ice.append((params, controlling))

    @property
    def local_softphone_rtp(self) -> tuple[str, int]:
        return ("127.0.0.1", self.phone_port)

    @property
    def local_network_rtp(self) -> tuple[str, int]:
        return ("192.0.2.10", self.net_port)

    def set_softphone_target(
        self, rtp: tuple[str, int], rtcp: tuple[str, int] | None = None
    ) -> None:
        self.softphone = (rtp, rtcp)

    def set_remote(self, rtp: tuple[str, int], rtcp: tuple[str, int] | None = None, *,
                   rtcp_mux: bool = False, zrtp_hash: str | None = None) -> None:
        self.remote = (rtp, rtcp, rtcp_mux, zrtp_hash)

    def set_rtp_timeout(self, seconds: float | None) -> None:
        self.timeouts.append(seconds)

    def start(self) -> None:
        self.started += 1

    def release(self) -> None:
        self.released = True


class FakeFactory:
    rtp_timeout: float | None = 30.0

    def __init__(self, capacity: int = 10, ice: IceParameters | None = None) -> None:
        self.capacity = capacity
        self.made: list[FakeStream] = []
        self.ice = ice

    def allocate_now(self, *, label: str = "", first: object = None) -> FakeStream:
        if len(self.made) >= self.capacity:
            raise RuntimeError("no pair")
        n = len(self.made)
        stream = FakeStream(21000 + 4 * n, 21002 + 4 * n, ice=self.ice)
        self.made.append(stream)
        return stream


def test_an_outgoing_call_offer_and_answer() -> None:
    factory = FakeFactory()
    calls = MediaCalls(factory)
    out = sdp.parse(calls.toward_network(KEY, PHONE_OFFER.encode()))
    [stream] = factory.made
    audio, app = out.media
    # the far end sees our media address and network ports, our zrtp-hash, no SDES, no mux
    assert out.connection is not None and out.connection.address == "192.0.2.10"
    assert out.origin.address == "192.0.2.10"
    assert audio.port == 21002 and audio.formats == ("0", "8", "101")
    assert [h.render() for h in audio.zrtp_hashes] == ["1.10 " + "cd" * 32]
    assert not audio.crypto and not audio.has_attribute("rtcp-mux")
    assert app.is_rejected  # not RTP: not bridged
    assert "127.0.0.1" not in out.to_str()
    assert stream.softphone == (("127.0.0.1", 40000), None)
    assert stream.started == 0  # the far end's address is not known yet

    back = sdp.parse(calls.toward_softphone(KEY, FAR_ANSWER.encode()))
    assert back.connection is not None and back.connection.address == "127.0.0.1"
    assert back.media[0].port == 21000
    rtcp = back.media[0].rtcp
    assert rtcp is not None and rtcp.port == 21001
    assert not back.media[0].zrtp_hashes
    assert stream.remote == (("198.51.100.9", 30000), ("198.51.100.9", 30005), False, HASH)
    assert stream.started == 1 and len(factory.made) == 1

    # a re-INVITE from the far end putting the call on hold: same stream, no idle timeout
    hold = FAR_ANSWER.replace("a=rtcp:30005", "a=sendonly")
    calls.toward_softphone(KEY, hold.encode())
    assert len(factory.made) == 1 and stream.started == 1
    calls.toward_softphone(KEY, FAR_ANSWER.encode())  # taken off hold
    assert stream.timeouts == [30.0, 30.0, None, 30.0]
    calls.release(KEY)
    assert stream.released and KEY not in calls.calls


def test_an_incoming_call_starts_when_the_softphone_answers() -> None:
    factory = FakeFactory()
    calls = MediaCalls(factory)
    offer = FAR_ANSWER.replace("m=application 0", "m=video 0")
    to_phone = sdp.parse(calls.toward_softphone(KEY, offer.encode()))
    assert to_phone.media[0].port == 21000 and factory.made[0].started == 0
    answer = PHONE_OFFER.split("m=application", maxsplit=1)[0]
    to_far = sdp.parse(calls.toward_network(KEY, answer.encode()))
    assert to_far.media[0].port == 21002
    assert factory.made[0].started == 1


def test_refusals_and_what_is_left_alone() -> None:
    calls = MediaCalls(FakeFactory(capacity=0))
    with pytest.raises(MediaRefused) as refused:
        calls.toward_network(KEY, PHONE_OFFER.encode())
    assert refused.value.status == 503 and KEY not in calls.calls
    with pytest.raises(MediaRefused) as refused:
        calls.toward_network(KEY, b"v=0\r\nnot sdp\r\n")
    assert refused.value.status == 488

    calls = MediaCalls(FakeFactory())
    invite = parse_message(
        ("INVITE sip:bob@b.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n"
         "From: <sip:alice@a.test>;tag=tag-a\r\nTo: <sip:bob@b.test>\r\nCall-ID: call-1\r\n"
         "CSeq: 1 INVITE\r\nContent-Type: application/sdp\r\nContent-Length: "
         f"{len(PHONE_OFFER)}\r\n\r\n{PHONE_OFFER}").encode())
    assert isinstance(invite, Request)
    # softphone to softphone: untouched; a non-SDP body: untouched
    assert calls.crossing(invite, KEY, Side.SOFTPHONE, Side.SOFTPHONE) is None
    assert invite.body == PHONE_OFFER.encode()
    assert calls.crossing(invite, KEY, Side.SOFTPHONE, Side.PUBLIC) is None
    assert b"192.0.2.10" in invite.body and b"127.0.0.1" not in invite.body
    # an answer from the far end that cannot be bridged never reaches the softphone as it is
    response = Response(200, "OK", [], b"garbage")
    response.append("Content-Type", "application/sdp")
    assert calls.crossing(response, KEY, Side.PUBLIC, Side.SOFTPHONE) is None
    assert response.body == b"" and response.get("content-type") is None
    assert calls.broken == [KEY]


def test_our_openpgp_key_goes_out_and_the_far_ends_comes_in() -> None:
    """Issue 7: ``a=freecall-openpgp`` carries the local party's key toward the network only;
    the far end's is kept for the signature check and never reaches the softphone."""
    asked: list[str] = []

    def offer(local: str) -> str | None:
        asked.append(local)
        return "bXkga2V5"  # base64 of b"my key"

    calls = MediaCalls(FakeFactory(), key_offer=offer)
    out = sdp.parse(calls.toward_network(KEY, PHONE_OFFER.encode(), "sip:alice@a.test"))
    assert out.attribute_values("freecall-openpgp") == ["bXkga2V5"]
    assert asked == ["sip:alice@a.test"]
    theirs = FAR_ANSWER.replace("t=0 0\r\n", "t=0 0\r\na=freecall-openpgp:dGhlaXIga2V5\r\n")
    back = calls.toward_softphone(KEY, theirs.encode())
    assert b"freecall-openpgp" not in back
    assert calls.calls[KEY].offered_key == b"their key"
    # a softphone cannot smuggle one out, and garbage from the far end is ignored
    calls2 = MediaCalls(FakeFactory())
    smuggled = PHONE_OFFER.replace("t=0 0\r\n", "t=0 0\r\na=freecall-openpgp:ZXZpbA==\r\n")
    assert b"freecall-openpgp" not in calls2.toward_network(KEY, smuggled.encode(), "sip:a@b")
    for junk in ("!!not base64!!", "A" * 20000, ""):
        bad = FAR_ANSWER.replace("t=0 0\r\n", f"t=0 0\r\na=freecall-openpgp:{junk}\r\n")
        calls2.toward_softphone(KEY, bad.encode())
        assert calls2.calls[KEY].offered_key is None


# -- ICE between nodes (RFC 8839) ---------------------------------------------------------------

OUR_ICE = IceParameters("ufragOURS", "p" * 24, (
    Candidate("h1", 1, 2130706431, "192.0.2.10", 21002, "host"),
    Candidate("r1", 1, 16777215, "203.0.113.5", 50000, "relay"),
))
FAR_ICE = (
    "a=ice-ufrag:FARufrag\r\na=ice-pwd:" + "q" * 24 + "\r\n"
    "a=candidate:f1 1 UDP 2130706431 198.51.100.9 30000 typ host\r\n"
)
PHONE_ICE = "a=ice-ufrag:loop\r\na=ice-pwd:" + "l" * 24 + "\r\n" + (
    "a=candidate:1 1 UDP 2130706431 127.0.0.1 40000 typ host\r\n")


def _far(ice: str, mux: bool = True) -> bytes:
    return (
        "v=0\r\no=bob 7 7 IN IP4 198.51.100.9\r\ns=-\r\nc=IN IP4 198.51.100.9\r\nt=0 0\r\n"
        f"m=audio 30000 RTP/AVP 0\r\na=zrtp-hash:{HASH}\r\n"
        + ("a=rtcp-mux\r\n" if mux else "") + ice
    ).encode()


def test_our_offer_carries_our_candidates_and_the_answer_starts_checks_as_controlling() -> None:
    factory = FakeFactory(ice=OUR_ICE)
    calls = MediaCalls(factory)
    offer = PHONE_OFFER.replace("a=sendrecv\r\n", "a=sendrecv\r\n" + PHONE_ICE)
    out = sdp.parse(calls.toward_network(KEY, offer.encode()))
    audio = out.media[0]
    assert audio.attribute_values("ice-ufrag") == ["ufragOURS"]
    assert [v for v in audio.attribute_values("candidate") if v and "127.0.0.1" in v] == []
    assert len(audio.attribute_values("candidate")) == 2  # ours, not the softphone's
    assert audio.has_attribute("rtcp-mux")
    [stream] = factory.made
    assert stream.remote_ice == []  # nothing to check before the answer
    back = sdp.parse(calls.toward_softphone(KEY, _far(FAR_ICE)))
    [(params, controlling)] = stream.remote_ice
    assert controlling and params is not None and params.ufrag == "FARufrag"
    assert params.candidates[0].addr == ("198.51.100.9", 30000)
    for name in ("ice-ufrag", "ice-pwd", "candidate", "rtcp-mux"):
        assert not back.media[0].has_attribute(name), name  # the softphone sees none of it


def test_an_answer_without_ice_turns_ice_off() -> None:
    factory = FakeFactory(ice=OUR_ICE)
    calls = MediaCalls(factory)
    calls.toward_network(KEY, PHONE_OFFER.encode())
    calls.toward_softphone(KEY, _far("", mux=False))
    assert factory.made[0].remote_ice == [(None, True)]


def test_the_answerer_checks_only_once_its_answer_leaves() -> None:
    factory = FakeFactory(ice=OUR_ICE)
    calls = MediaCalls(factory)
    calls.toward_softphone(KEY, _far(FAR_ICE))  # the far end's offer: the phone rings
    [stream] = factory.made
    assert stream.remote_ice == []
    answer = PHONE_OFFER.replace("a=rtcp-mux\r\n", "")
    out = sdp.parse(calls.toward_network(KEY, answer.encode()))
    [(params, controlling)] = stream.remote_ice
    assert not controlling and params is not None and params.ufrag == "FARufrag"
    assert out.media[0].attribute_values("ice-ufrag") == ["ufragOURS"]
    assert out.media[0].has_attribute("rtcp-mux")


@pytest.mark.parametrize("ice, mux", [("", True), (FAR_ICE, False)])
def test_an_offer_without_ice_or_without_mux_is_answered_without_ice(ice: str, mux: bool) -> None:
    factory = FakeFactory(ice=OUR_ICE)
    calls = MediaCalls(factory)
    calls.toward_softphone(KEY, _far(ice, mux=mux))
    [stream] = factory.made
    assert stream.remote_ice == [(None, False)]
    out = sdp.parse(calls.toward_network(KEY, PHONE_OFFER.encode()))
    assert not out.media[0].has_attribute("ice-ufrag")
    assert not out.media[0].has_attribute("candidate")
    assert not out.media[0].has_attribute("rtcp-mux")
