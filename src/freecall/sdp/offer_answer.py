"""RFC 3264 offer/answer helpers: pairing streams, negotiated codecs, directions and hold.

The daemon is not an answerer itself (the softphones are), but it must understand what was
agreed: which streams are live (to allocate and bridge media ports), which codec each side
will send (for the call record and the dashboard), and whether a re-offer puts the call on
hold (to pause the bridge and tell the other side).
"""

from __future__ import annotations

from dataclasses import dataclass

from freecall.sdp.errors import SdpError
from freecall.sdp.fields import Direction, RtpMap
from freecall.sdp.session import MediaDescription, SessionDescription


def pair_media(
    offer: SessionDescription, answer: SessionDescription
) -> list[tuple[MediaDescription, MediaDescription]]:
    """Match answer streams to offer streams by index (RFC 3264 section 6).

    "The answer MUST contain exactly the same number of "m=" lines as the offer" and the media
    type of an accepted stream must match the offer's; an answer that breaks either raises
    :class:`SdpError`.  Rejected answer streams (port 0) may carry any media type.
    """
    if len(offer.media) != len(answer.media):
        raise SdpError(f"answer has {len(answer.media)} m= lines for {len(offer.media)} offered")
    pairs = list(zip(offer.media, answer.media, strict=True))
    for index, (offered, answered) in enumerate(pairs):
        if not answered.is_rejected and offered.media_type != answered.media_type:
            raise SdpError(
                f"stream {index}: answered {answered.media_type!r} to {offered.media_type!r}"
            )
    return pairs


def answer_direction(offered: Direction, wanted: Direction) -> Direction:
    """The direction an answer may carry given the offer's and what the answerer wants.

    RFC 3264 section 6.1: sendonly may be answered recvonly or inactive; recvonly may be
    answered sendonly or inactive; inactive must be answered inactive; sendrecv leaves the
    answerer free.  ``wanted`` is narrowed to what the offer allows.
    """
    return Direction.from_flags(
        wanted.sends and offered.receives, wanted.receives and offered.sends
    )


def direction_allowed(offered: Direction, answered: Direction) -> bool:
    """Whether ``answered`` is a legal answer to ``offered`` (RFC 3264 section 6.1)."""
    return answer_direction(offered, answered) == answered


@dataclass(frozen=True, slots=True)
class NegotiatedCodec:
    """One format both sides listed: the answer's format and the matching offer format.

    With RTP, each side sends with the payload type number the *receiver* listed, so the
    offerer sends ``answer_format`` and the answerer sends ``offer_format``; they are equal
    unless the answerer renumbered a dynamic payload type (allowed: RFC 3264 section 6.1
    makes keeping the number a SHOULD).
    """

    answer_format: str
    offer_format: str
    codec: RtpMap | None
    fmtp: str | None


def _same_format(
    offered: MediaDescription, offer_fmt: str, answered: MediaDescription, answer_fmt: str
) -> bool:
    if not (offered.media_line.is_rtp and answered.media_line.is_rtp):
        return offer_fmt == answer_fmt
    offer_codec = offered.codec(offer_fmt)
    answer_codec = answered.codec(answer_fmt)
    if offer_codec is None or answer_codec is None:
        # An RTP format neither side described (no rtpmap, not static): only the number says.
        return offer_fmt == answer_fmt and offer_codec is None and answer_codec is None
    return offer_codec.same_codec(answer_codec)


def negotiated_codecs(
    offered: MediaDescription, answered: MediaDescription
) -> list[NegotiatedCodec]:
    """The formats common to an offered stream and its answer, in the answerer's order.

    RTP formats match by codec (encoding name, clock rate, channels, from ``a=rtpmap`` or the
    RFC 3551 static table), preferring the same payload type number; other protocols match
    by the format string.  A rejected stream (either side port 0) has no codecs.
    """
    if offered.is_rejected or answered.is_rejected:
        return []
    result: list[NegotiatedCodec] = []
    used: set[str] = set()
    for answer_fmt in answered.formats:
        candidates = [f for f in offered.formats if f not in used]
        same_number = [f for f in candidates if f == answer_fmt]
        match = next(
            (f for f in same_number + candidates if _same_format(offered, f, answered, answer_fmt)),
            None,
        )
        if match is None:
            continue
        used.add(match)
        result.append(
            NegotiatedCodec(
                answer_format=answer_fmt,
                offer_format=match,
                codec=answered.codec(answer_fmt) or offered.codec(match),
                fmtp=answered.fmtp(answer_fmt),
            )
        )
    return result


def is_held(description: SessionDescription, index: int) -> bool:
    """Whether the sender of ``description`` puts stream ``index`` on hold.

    RFC 3264 section 8.4: hold is signalled by sendonly (or inactive) in a new offer; the
    older RFC 2543 way, a connection address of 0.0.0.0, is still sent by some phones and is
    recognised too.  A rejected stream is not "held".
    """
    media = description.media[index]
    if media.is_rejected:
        return False
    if not description.effective_direction(index).receives:
        return True
    connection = description.effective_connection(index)
    return connection is not None and connection.is_null


def is_on_hold(description: SessionDescription) -> bool:
    """True when every live stream is held and at least one stream is live."""
    live = [i for i, media in enumerate(description.media) if not media.is_rejected]
    return bool(live) and all(is_held(description, i) for i in live)
