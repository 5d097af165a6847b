"""The SDP side of the media bridge: every offer and answer that crosses the node's edge.

The proxy calls :meth:`MediaCalls.rewrite` for each SIP message with a body as it leaves
through a listener (issue 6, build 1):

* softphone -> network (an offer of our caller, or our callee's answer): each live RTP stream
  gets a bridge stream; the softphone's address becomes its target, and the SDP names our
  media address and the stream's network ports, carries ``a=zrtp-hash`` (RFC 6189 section
  8.1) and no ``a=crypto`` (SDES keys of the loopback leg never leave the host);
* network -> softphone (the far end's offer, or its answer, early or final): the far end's
  address, RTCP port and ``a=zrtp-hash`` go to the stream; the SDP names the loopback address
  and the stream's softphone ports, without ZRTP or SDES attributes;
* softphone -> softphone and anything else: untouched (media stays on the host).

Codecs, formats and directions pass through untouched: the bridge never transcodes.  Streams
are per dialog (Call-ID and the caller's tag) and m-line index (RFC 3264 section 8 keeps
indexes stable across re-offers), so a re-INVITE, an UPDATE, early media and forked answers
reuse them; a stream held (``sendonly``, ``recvonly``, ``inactive``) has no inactivity
timeout while held.  A stream starts (ZRTP Hello) once both its targets are known.

ICE between nodes (RFC 8445 with RFC 8839's SDP): toward the network, the softphone's own ICE
attributes (loopback candidates) are removed, and the stream's ``a=ice-ufrag``, ``a=ice-pwd``
and ``a=candidate`` lines are added with ``a=rtcp-mux`` (one component: RFC 5761), in every
offer of ours and in an answer to an offer that had them.  The offerer controls (RFC 8839
section 4.4.1.1).  An answer without ICE, or an offer without ICE or without ``a=rtcp-mux``,
means no ICE for that stream: the SDP address and latching, as with any SIP endpoint.  The
answerer starts its checks when its answer leaves (RFC 8445 section 6.1.3.3 in spirit: not
during minutes of ringing, which would exhaust the ICE timeout), the offerer when the answer
arrives.  Toward the softphone every ICE attribute and ``a=rtcp-mux`` are removed: the loopback
legs use RTCP on port + 1 (RFC 5761 section 5.1.1: without it in the answer, no muxing).
:meth:`MediaCalls.release` frees a dialog's streams (the daemon calls it when the call ends);
unused allocations of a forked or failed offer go with it.

Pure of I/O itself: the streams come from a :class:`StreamFactory` (the daemon's
:class:`~freecall.srtp.bridge.MediaEngine`, a fake in tests).
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from .. import sdp
from ..sdp import Direction, SdpError, ZrtpHash
from ..sip.message import Request, Response
from ..sip.proxy import Side
from ..transport import LogLimiter
from .ice import IceError, IceParameters

log = logging.getLogger("freecall.media")

DialogKey = tuple[str, str]
"""(Call-ID, the caller's From tag): one call's media."""

ICE_ATTRIBUTES = ("ice-ufrag", "ice-pwd", "ice-options", "ice-lite", "ice-mismatch",
                  "ice-pacing", "candidate", "remote-candidates", "end-of-candidates")
"""RFC 8839 section 5: never copied from one side to the other (each leg has its own ICE)."""

OPENPGP_ATTRIBUTE = "freecall-openpgp"
"""Session-level ``a=freecall-openpgp:<base64 key>``: the local party's OpenPGP public key,
offered to the far end so it can check our SAS signature (RFC 6189 section 7.2) on first
contact. Added toward the network, taken out (and kept) toward the softphone."""
MAX_OFFERED_KEY = 8192  # bytes of key; an offer larger than this is ignored


class Stream(Protocol):
    """What the SDP side needs of a bridge stream (:class:`~freecall.srtp.bridge.MediaStream`)."""

    @property
    def local_softphone_rtp(self) -> tuple[str, int]: ...
    @property
    def local_network_rtp(self) -> tuple[str, int]: ...
    @property
    def zrtp_hash_attribute(self) -> str | None: ...
    def set_softphone_target(
        self, rtp: tuple[str, int], rtcp: tuple[str, int] | None = None
    ) -> None: ...
    def set_remote(
        self,
        rtp: tuple[str, int],
        rtcp: tuple[str, int] | None = None,
        *,
        rtcp_mux: bool = False,
        zrtp_hash: str | None = None,
    ) -> None: ...
    def set_rtp_timeout(self, seconds: float | None) -> None: ...
    @property
    def ice_parameters(self) -> IceParameters | None: ...
    def set_remote_ice(self, params: IceParameters | None, *, controlling: bool) -> None: ...
    def start(self) -> None: ...
    def release(self) -> None: ...


class StreamFactory(Protocol):
    """Makes bridge streams at once (sockets bound before the SDP naming them is sent)."""

    rtp_timeout: float | None

    def allocate_now(self, *, label: str = "", first: Stream | None = None) -> Stream:
        """A stream, or MediaCapacityError (a RuntimeError) when none is free."""


class MediaRefused(Exception):
    """The message cannot cross: ``status`` is the answer to give (488, 503)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(eq=False)
class _Leg:
    """One m-line of one dialog: its bridge stream and what each side's SDP said."""

    stream: Stream
    softphone_known: bool = False
    remote_known: bool = False
    started: bool = False
    remote_ice: IceParameters | None = None
    """The far end's ICE attributes from its offer, applied when our answer leaves."""
    ice: bool = False  # ICE runs on this stream (both sides' SDP had it)


@dataclass(eq=False)
class CallMedia:
    """The media of one dialog."""

    key: DialogKey
    legs: dict[int, _Leg] = field(default_factory=dict)
    offered_key: bytes | None = None  # the far end's OpenPGP key from its SDP, if any
    remote_sdp: bool = False
    """An SDP of the far end crossed (its key offer, if any, is in ``offered_key``). ZRTP can
    finish before: the far end's Hello arrives while its answer is lost or late."""
    codec: str | None = None
    """The first codec of the last SDP that crossed (the answer's: the one in use), for the
    control API."""
    we_offered: bool | None = None
    """Our side sent the first SDP (the initial offer): ICE's controlling agent."""

    def streams(self) -> Iterator[Stream]:
        for leg in self.legs.values():
            yield leg.stream


class MediaCalls:
    """Per-dialog streams and the SDP rewriting (module docstring)."""

    def __init__(
        self, factory: StreamFactory, key_offer: Callable[[str], str | None] | None = None,
        on_remote_sdp: Callable[[DialogKey], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.factory = factory
        self.clock = clock
        self._refusals = LogLimiter()
        """A flood of INVITEs once the media ports are gone must not become a log flood."""
        self.key_offer = key_offer
        """The base64 OpenPGP key to offer for a local address (``sip:alice@a.test``)."""
        self.on_remote_sdp = on_remote_sdp
        """Called after each SDP of the far end crossed (the daemon's verification waits
        for the first: it carries the far end's OpenPGP key)."""
        self.calls: dict[DialogKey, CallMedia] = {}
        self.broken: list[DialogKey] = []
        """Dialogs whose answer could not be bridged (the daemon ends them)."""

    # -- the proxy's hook ---------------------------------------------------------------------
    def crossing(
        self, message: Request | Response, key: DialogKey, ingress: Side, egress: Side
    ) -> int | None:
        """:class:`~freecall.sip.proxy.MediaHook`: rewrite an SDP body crossing between a
        softphone and the network; leave everything else alone."""
        if ingress is egress or message.content_type != "application/sdp":
            return None
        try:
            if egress is Side.PUBLIC:
                local = message.from_ if isinstance(message, Request) else message.to
                message.body = self.toward_network(key, message.body, str(local.uri))
            else:
                message.body = self.toward_softphone(key, message.body)
        except MediaRefused as refused:
            what = message.method if isinstance(message, Request) else message.status
            suffix = self._refusals.allow(self.clock())
            if suffix is not None:
                log.warning("call %s: %s SDP toward the %s not bridged: %s%s", key[0], what,
                            egress.value, refused.reason, suffix)
            if isinstance(message, Request) and message.method != "ACK":
                return refused.status
            # An answer we cannot bridge must not reach the other side as it is (its
            # addresses would carry media around the bridge, in clear): drop it, end the call.
            message.body = b""
            message.remove("content-type")
            self.broken.append(key)
        return None

    def toward_network(self, key: DialogKey, body: bytes, local: str | None = None) -> bytes:
        """An SDP from our softphone, leaving for the far end (module docstring); ``local``
        is the address of our party, whose OpenPGP key goes along."""
        description = _parse(body)
        call = self.calls.get(key)
        if call is None:
            call = self.calls[key] = CallMedia(key)
        if call.we_offered is None:
            call.we_offered = True
        ports: list[tuple[int, int] | None] = []
        first: Stream | None = None
        for name in ICE_ATTRIBUTES:
            description.remove_attribute(name)
        try:
            for index, media in enumerate(description.media):
                if media.is_rejected or not media.media_line.is_rtp:
                    if not media.is_rejected:
                        media.reject()  # not RTP (e.g. an application stream): not bridged
                    ports.append(None)
                    continue
                connection = description.effective_connection(index)
                if connection is None or connection.is_null:
                    raise MediaRefused(488, f"m-line {index} has no address")
                leg = self._leg(call, index, first)
                first = first or leg.stream
                rtcp = media.rtcp
                leg.stream.set_softphone_target(
                    (connection.address, media.port),
                    (rtcp.connection.address if rtcp.connection else connection.address,
                     rtcp.port) if rtcp is not None else None,
                )
                leg.softphone_known = True
                port = leg.stream.local_network_rtp[1]
                ports.append((port, port + 1))
                for name in ("crypto", "rtcp-mux", "zrtp-hash", *ICE_ATTRIBUTES):
                    media.remove_attribute(name)
                self._add_ice(call, leg, media)
                self._hold(leg, description.effective_direction(index))
            if any(p is not None for p in ports):
                description.rewrite_endpoints(self._network_address(call), ports)
                call.codec = _first_codec(description) or call.codec
            for index, media in enumerate(description.media):
                bridged = call.legs.get(index)
                if bridged is not None and not media.is_rejected:
                    value = bridged.stream.zrtp_hash_attribute
                    media.set_zrtp_hash(ZrtpHash.parse(value) if value else None)
                    self._maybe_start(bridged)
        except MediaRefused:
            if not any(leg.started for leg in call.legs.values()):
                self.release(key)
            raise
        description.remove_attribute(OPENPGP_ATTRIBUTE)
        offer = self.key_offer(local) if self.key_offer is not None and local else None
        if offer:
            description.set_attribute(OPENPGP_ATTRIBUTE, offer)
        return description.to_bytes()

    def toward_softphone(self, key: DialogKey, body: bytes) -> bytes:
        """An SDP from the far end, going to our softphone (module docstring)."""
        description = _parse(body)
        call = self.calls.get(key)
        if call is None:
            call = self.calls[key] = CallMedia(key)
        if call.we_offered is None:
            call.we_offered = False
        ports: list[tuple[int, int] | None] = []
        first: Stream | None = None
        session_ice = [(a.name, a.value) for a in description.attributes
                       if a.name in ("ice-ufrag", "ice-pwd")]
        for index, media in enumerate(description.media):
            if media.is_rejected or not media.media_line.is_rtp:
                if not media.is_rejected:
                    media.reject()
                dropped = call.legs.pop(index, None)
                if dropped is not None:
                    dropped.stream.release()
                ports.append(None)
                continue
            connection = description.effective_connection(index)
            if connection is None:
                raise MediaRefused(488, f"m-line {index} has no address")
            leg = self._leg(call, index, first)
            first = first or leg.stream
            hashes = media.zrtp_hashes or description.zrtp_hashes
            self._remote_ice(call, leg, media, session_ice)
            rtcp = media.rtcp
            leg.stream.set_remote(
                (connection.address, media.port),
                (rtcp.connection.address if rtcp.connection else connection.address, rtcp.port)
                if rtcp is not None else None,
                zrtp_hash=hashes[0].render() if hashes else None,
            )
            leg.remote_known = True
            phone_port = leg.stream.local_softphone_rtp[1]
            ports.append((phone_port, phone_port + 1))
            for name in ("zrtp-hash", "crypto", "rtcp-mux", *ICE_ATTRIBUTES):
                media.remove_attribute(name)
            self._hold(leg, description.effective_direction(index))
            self._maybe_start(leg)
        for name in ("zrtp-hash", "crypto", *ICE_ATTRIBUTES):
            description.remove_attribute(name)
        for value in description.attribute_values(OPENPGP_ATTRIBUTE):
            call.offered_key = _offered_key(value) or call.offered_key
        description.remove_attribute(OPENPGP_ATTRIBUTE)
        call.remote_sdp = True
        if self.on_remote_sdp is not None:
            self.on_remote_sdp(key)
        if any(p is not None for p in ports):
            call.codec = _first_codec(description) or call.codec
            loopback = next(iter(call.streams())).local_softphone_rtp[0]
            description.rewrite_endpoints(loopback, ports)
        return description.to_bytes()

    def release(self, key: DialogKey) -> None:
        """The dialog ended (BYE, a final failure, a timeout): close its streams."""
        call = self.calls.pop(key, None)
        if call is None:
            return
        for stream in call.streams():
            stream.release()

    def find(self, stream: object) -> DialogKey | None:
        """The dialog a stream belongs to (events from the engine name the stream)."""
        for key, call in self.calls.items():
            if any(s is stream for s in call.streams()):
                return key
        return None

    def close(self) -> None:
        for key in list(self.calls):
            self.release(key)

    # -- helpers --------------------------------------------------------------------------------
    def _leg(self, call: CallMedia, index: int, first: Stream | None) -> _Leg:
        leg = call.legs.get(index)
        if leg is None:
            try:
                stream = self.factory.allocate_now(label=f"{call.key[0]}/{index}", first=first)
            except RuntimeError as error:  # MediaCapacityError: no port pair, stream cap
                raise MediaRefused(503, f"no media ports: {error}") from error
            leg = call.legs[index] = _Leg(stream)
        return leg

    @staticmethod
    def _remote_ice(call: CallMedia, leg: _Leg, media: sdp.MediaDescription,
                    session: list[tuple[str, str | None]]) -> None:
        """The far end's ICE attributes: an answer's apply now, an offer's when we answer."""
        params: IceParameters | None = None
        if media.has_attribute("rtcp-mux"):  # one component only (module docstring)
            attributes = [*session, *((a.name, a.value) for a in media.attributes)]
            try:
                params = IceParameters.from_attributes(attributes)
            except IceError as error:
                log.info("call %s: far end's ICE attributes ignored: %s", call.key[0], error)
        if call.we_offered:
            leg.ice = params is not None
            leg.stream.set_remote_ice(params, controlling=True)
        else:
            leg.remote_ice = params
            if params is None:
                leg.ice = False
                leg.stream.set_remote_ice(None, controlling=False)

    @staticmethod
    def _add_ice(call: CallMedia, leg: _Leg, media: sdp.MediaDescription) -> None:
        """Our ICE attributes into an SDP leaving for the far end (module docstring)."""
        ours = leg.stream.ice_parameters
        if ours is None:
            return
        if not call.we_offered:
            if leg.remote_ice is None and not leg.ice:
                return  # the far end's offer had no ICE: answer without (RFC 8839 4.3.1)
            if leg.remote_ice is not None:
                params, leg.remote_ice = leg.remote_ice, None
                leg.ice = True
                leg.stream.set_remote_ice(params, controlling=False)
                ours = leg.stream.ice_parameters
                if ours is None:
                    return
        for name, value in ours.sdp_attributes():
            media.add_attribute(name, value)
        media.add_attribute("rtcp-mux")

    def _network_address(self, call: CallMedia) -> str:
        return next(iter(call.streams())).local_network_rtp[0]

    def _hold(self, leg: _Leg, direction: Direction) -> None:
        """No inactivity timeout while a side does not send (hold, RFC 3264 section 8.4)."""
        flowing = direction is Direction.SENDRECV
        leg.stream.set_rtp_timeout(self.factory.rtp_timeout if flowing else None)

    @staticmethod
    def _maybe_start(leg: _Leg) -> None:
        if leg.softphone_known and leg.remote_known and not leg.started:
            leg.started = True
            leg.stream.start()


def _offered_key(value: str | None) -> bytes | None:
    """The key bytes of an ``a=freecall-openpgp`` value, or None if absurd (it is hostile)."""
    if not value or len(value) > MAX_OFFERED_KEY * 4 // 3 + 4:
        return None
    try:
        return base64.b64decode(value, validate=True) or None
    except (binascii.Error, ValueError):
        return None


def _parse(body: bytes) -> sdp.SessionDescription:
    try:
        return sdp.parse(body)
    except SdpError as error:
        raise MediaRefused(488, f"malformed SDP: {error}") from error


def _first_codec(description: sdp.SessionDescription) -> str | None:
    """``PCMU/8000``: the first format of the first live RTP stream (RFC 3264: in an answer,
    the one the answerer will send)."""
    for media in description.media:
        if media.is_rejected or not media.media_line.is_rtp or not media.formats:
            continue
        try:
            codec = media.codec(media.formats[0])
        except SdpError:
            return None
        return None if codec is None else f"{codec.encoding}/{codec.clock_rate}"
    return None
