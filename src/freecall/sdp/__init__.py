"""Session descriptions: parse, serialise, rewrite (RFC 8866), offer/answer (RFC 3264).

Typical use in the proxy::

    offer = sdp.parse(body)                      # SdpError on anything malformed
    out = offer.copy()
    out.rewrite_endpoints("192.0.2.10", [(20000, 20001), None])   # per media line
    out.media[0].set_zrtp_hash(sdp.ZrtpHash("1.10", hello_hash_hex))
    out.media[0].remove_attribute("crypto")      # SDES keys stay on the loopback leg
    out.origin = replace(out.origin, session_version=our_counter)
    body = out.to_bytes()                        # always CRLF

Everything here is pure: no I/O, no clock, no randomness.
"""

from freecall.sdp.errors import SdpError
from freecall.sdp.fields import (
    STATIC_PAYLOAD_TYPES,
    Attribute,
    Bandwidth,
    Connection,
    Crypto,
    Direction,
    Fmtp,
    MediaLine,
    Origin,
    Rtcp,
    RtpMap,
    Timing,
    ZrtpHash,
)
from freecall.sdp.offer_answer import (
    NegotiatedCodec,
    answer_direction,
    direction_allowed,
    is_held,
    is_on_hold,
    negotiated_codecs,
    pair_media,
)
from freecall.sdp.session import (
    MAX_SDP_LINES,
    MAX_SDP_SIZE,
    Line,
    MediaDescription,
    SessionDescription,
    parse,
)

__all__ = [
    "MAX_SDP_LINES",
    "MAX_SDP_SIZE",
    "STATIC_PAYLOAD_TYPES",
    "Attribute",
    "Bandwidth",
    "Connection",
    "Crypto",
    "Direction",
    "Fmtp",
    "Line",
    "MediaDescription",
    "MediaLine",
    "NegotiatedCodec",
    "Origin",
    "Rtcp",
    "RtpMap",
    "SdpError",
    "SessionDescription",
    "Timing",
    "ZrtpHash",
    "answer_direction",
    "direction_allowed",
    "is_held",
    "is_on_hold",
    "negotiated_codecs",
    "pair_media",
    "parse",
]
