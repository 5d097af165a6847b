"""Property tests: generated descriptions round-trip; mutated bytes raise only SdpError."""

from __future__ import annotations

import contextlib
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freecall import sdp
from freecall.sdp import SdpError

TOKEN_ALPHABET = string.ascii_letters + string.digits + "!#$%&'*+-.^_`{|}~"
tokens = st.text(TOKEN_ALPHABET, min_size=1, max_size=12)
# Free text: anything but CR, LF, NUL; surrogates excluded (not text a caller could have).
free_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"), max_size=30)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
hosts = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True)
ports = st.integers(0, 65535)
payload_types = st.integers(0, 127)
hex64 = st.text("0123456789abcdefABCDEF", min_size=64, max_size=64)


@st.composite
def addresses(draw: st.DrawFn) -> tuple[str, str]:
    kind = draw(st.sampled_from(["IP4", "IP6", "FQDN"]))
    if kind == "IP4":
        return "IP4", draw(ipv4)
    if kind == "IP6":
        return "IP6", draw(ipv6)
    return "IP4", draw(hosts)


@st.composite
def connection_lines(draw: st.DrawFn) -> str:
    addrtype, address = draw(addresses())
    return f"c=IN {addrtype} {address}"


@st.composite
def attribute_lines(draw: st.DrawFn) -> str:
    kind = draw(
        st.sampled_from(
            ["rtpmap", "fmtp", "rtcp", "direction", "zrtp-hash", "crypto", "flag", "value"]
        )
    )
    if kind == "rtpmap":
        pt = draw(payload_types)
        channels = draw(st.sampled_from(["", "/2", "/1"]))
        return (
            f"a=rtpmap:{pt} {draw(tokens).replace('/', '')}/{draw(st.integers(1, 96000))}{channels}"
        )
    if kind == "fmtp":
        return f"a=fmtp:{draw(payload_types)} {draw(free_text).strip() or 'x=1'}"
    if kind == "rtcp":
        port = draw(ports)
        if draw(st.booleans()):
            addrtype, address = draw(addresses())
            return f"a=rtcp:{port} IN {addrtype} {address}"
        return f"a=rtcp:{port}"
    if kind == "direction":
        return "a=" + draw(st.sampled_from(["sendrecv", "sendonly", "recvonly", "inactive"]))
    if kind == "zrtp-hash":
        return f"a=zrtp-hash:1.10 {draw(hex64)}"
    if kind == "crypto":
        return f"a=crypto:{draw(st.integers(1, 99))} AES_CM_128_HMAC_SHA1_80 inline:{draw(tokens)}"
    name = draw(
        tokens.filter(
            lambda t: (
                t
                not in {
                    "rtpmap",
                    "fmtp",
                    "rtcp",
                    "zrtp-hash",
                    "crypto",
                    "sendrecv",
                    "sendonly",
                    "recvonly",
                    "inactive",
                }
            )
        )
    )
    if kind == "flag":
        return f"a={name}"
    return f"a={name}:{draw(free_text)}"


@st.composite
def media_sections(draw: st.DrawFn) -> list[str]:
    media = draw(st.sampled_from(["audio", "video", "text", "application"]))
    count = draw(st.sampled_from(["", "/2"]))
    proto = draw(st.sampled_from(["RTP/AVP", "RTP/SAVP", "UDP/TLS/RTP/SAVPF", "TCP/BFCP"]))
    formats = draw(st.lists(payload_types.map(str), min_size=1, max_size=6))
    lines = [f"m={media} {draw(ports)}{count} {proto} {' '.join(formats)}"]
    if draw(st.booleans()):
        lines.append(f"i={draw(free_text)}")
    lines += draw(st.lists(connection_lines(), max_size=2))
    if draw(st.booleans()):
        lines.append(
            f"b={draw(st.sampled_from(['AS', 'TIAS', 'CT']))}:{draw(st.integers(0, 10**9))}"
        )
    lines += draw(st.lists(attribute_lines(), max_size=6))
    return lines


@st.composite
def descriptions(draw: st.DrawFn) -> bytes:
    addrtype, address = draw(addresses())
    lines = [
        "v=0",
        f"o={draw(tokens)} {draw(st.integers(0, 2**64))} {draw(st.integers(0, 2**64))} "
        f"IN {addrtype} {address}",
        f"s={draw(free_text)}",
    ]
    if draw(st.booleans()):
        lines.append(draw(connection_lines()))
    lines.append(f"t={draw(st.integers(0, 2**32))} {draw(st.integers(0, 2**32))}")
    lines += draw(st.lists(attribute_lines(), max_size=4))
    for section in draw(st.lists(media_sections(), max_size=4)):
        lines += section
    return "".join(f"{line}\r\n" for line in lines).encode()


def exercise(description: sdp.SessionDescription) -> None:
    """Call every typed accessor: on a parsed description none of them may raise."""
    _ = (description.origin, description.session_name, description.timings)
    _ = (description.connection, description.bandwidths, description.attributes)
    _ = (description.direction, description.zrtp_hashes, description.crypto)
    for index, media in enumerate(description.media):
        _ = (media.media_line, media.connections, media.bandwidths, media.rtcp, media.crypto)
        _ = (media.zrtp_hashes, media.direction, media.rtpmaps, media.is_rejected)
        _ = (description.effective_connection(index), description.effective_direction(index))
        _ = sdp.is_held(description, index)
        for fmt in media.formats:
            _ = (media.codec(fmt), media.fmtp(fmt))
        _ = sdp.negotiated_codecs(media, media)
    _ = sdp.is_on_hold(description)


@given(descriptions())
@settings(max_examples=120, deadline=None)
def test_generated_descriptions_round_trip(body: bytes) -> None:
    description = sdp.parse(body)
    assert description.to_bytes() == body
    assert sdp.parse(description.to_bytes()) == description
    exercise(description)
    description.bump_version()
    description.rewrite_endpoints(
        "192.0.2.10", [20000 + 2 * i for i in range(len(description.media))]
    )
    assert sdp.parse(description.to_bytes()) == description


def mutate(body: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    data = bytearray(body)
    for kind, position, value in edits:
        if not data:
            data.append(value)
            continue
        index = position % len(data)
        if kind == 0:
            data[index] = value
        elif kind == 1:
            data.insert(index, value)
        else:
            del data[index]
    return bytes(data)


interesting_bytes = st.one_of(
    st.integers(0, 255),
    st.sampled_from(list(b"\r\n\x00 =:/.-0123456789vomcta\x80\xff")),
)


@given(
    descriptions(),
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 10**6), interesting_bytes),
        min_size=1,
        max_size=8,
    ),
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_bytes_raise_only_sdp_error(body: bytes, edits: list[tuple[int, int, int]]) -> None:
    data = mutate(body, edits)
    try:
        description = sdp.parse(data)
    except SdpError:
        return
    exercise(description)
    assert sdp.parse(description.to_bytes()) == description


@given(st.binary(max_size=400))
@settings(max_examples=200, deadline=None)
def test_random_bytes_raise_only_sdp_error(data: bytes) -> None:
    with contextlib.suppress(SdpError):
        exercise(sdp.parse(data))


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_random_text_raises_only_sdp_error(text: str) -> None:
    with contextlib.suppress(SdpError):
        exercise(sdp.parse("v=0\r\n" + text))
