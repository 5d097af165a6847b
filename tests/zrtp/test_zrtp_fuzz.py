"""Malformed input only ever raises ZrtpError (decoders) or nothing (sessions)."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freecall.srtp.zrtp import ZrtpSession
from freecall.srtp.zrtp_messages import (
    ConfirmPlain,
    SasRelayPlain,
    ZrtpError,
    decode_message,
    decode_packet,
    encode_packet,
    trim_openpgp_signature,
)
from zrtp.test_zrtp_messages import sample_messages
from zrtp.zrtp_harness import make_endpoint, make_pair

VALID = [m.encode() for m, _ in sample_messages()]


def _decode_everything(data: bytes) -> None:
    for decoder in (decode_packet, decode_message, ConfirmPlain.decode, SasRelayPlain.decode):
        with contextlib.suppress(ZrtpError):
            decoder(data)
    trim_openpgp_signature(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    _decode_everything(data)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=6),
    st.integers(0, 8),
)
def test_mutated_valid_messages(message: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(message)
    for pos, value in edits:
        if data:
            data[pos % len(data)] = value
    data = data[: len(data) - 4 * cut] if cut < len(data) // 4 else data
    _decode_everything(bytes(data))
    # Also framed with a valid CRC, as an attacker could send it.
    _decode_everything(encode_packet(bytes(data), 1, 2))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=200),
            st.sampled_from(VALID).map(lambda m: encode_packet(m, 3, 4)),
        ),
        max_size=12,
    )
)
def test_session_survives_garbage(datagrams: list[bytes]) -> None:
    ep = make_endpoint("A")
    session: ZrtpSession = ep.session
    session.start(0.0)
    for i, data in enumerate(datagrams):
        session.receive(data, i * 0.01)
        session.handle_timer(i * 0.01)
    session.datagrams_to_send()
    ep.drain_events()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(0, 400), st.integers(0, 255))
def test_live_exchange_with_one_corrupted_packet(index: int, pos: int, value: int) -> None:
    """Any single byte change in flight (CRC recomputed) must not raise out of a session."""
    link = make_pair()
    seen = {"n": 0}

    def corrupt(who: str, kind: bytes, pkt: bytes) -> bytes | None:
        seen["n"] += 1
        if seen["n"] - 1 != index:
            return pkt
        decoded = decode_packet(pkt)
        msg = bytearray(decoded.message)
        msg[pos % len(msg)] = value
        return encode_packet(bytes(msg), decoded.sequence, decoded.ssrc)

    link.filter = corrupt
    link.start()
    link.run()
    a, b = link.a, link.b
    # Either both agree, or the damage was detected; never a silent disagreement.
    if a.secure is not None and b.secure is not None:
        assert a.secure.keys.outbound == b.secure.keys.inbound
        assert a.secure.sas == b.secure.sas
