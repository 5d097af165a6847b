"""The C hop (`freecall.srtp._hop.Hop`) on its own, over real UDP sockets on loopback.

Known answers (libsrtp's srtp_validate vectors) through the hop, the hop against the Python
path (`srtp_call` on a twin session, `ReceptionStats`) byte for byte on random packets, and
every case that must reach the Python fallback unchanged.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pylibsrtp
import pytest

import vectorlib
from freecall.srtp import _hop
from freecall.srtp.rtp import ReceptionStats
from freecall.srtp.srtp_policy import srtp_call, srtp_pointers

Policy = pylibsrtp.Policy
Addr = tuple[Any, ...]
VECTORS = vectorlib.VECTORS / "srtp"


def x(value: str) -> bytes:
    return bytes.fromhex(value)


@pytest.fixture
def sink() -> Iterator[socket.socket]:
    """Where a hop sends (a real socket that we read back)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2.0)
    yield s
    s.close()


@pytest.fixture
def out() -> Iterator[socket.socket]:
    """The socket a hop sends from."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    yield s
    s.close()


class Fallback:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, Addr]] = []

    def __call__(self, data: bytes, addr: Addr) -> None:
        self.calls.append((data, addr))


def session(key: bytes, direction: str, profile: int = Policy.SRTP_PROFILE_AES128_CM_SHA1_80
            ) -> pylibsrtp.Session:
    ssrc_type = Policy.SSRC_ANY_OUTBOUND if direction == "protect" else Policy.SSRC_ANY_INBOUND
    return pylibsrtp.Session(Policy(key=key, ssrc_type=ssrc_type, srtp_profile=profile))


def hop(sess: pylibsrtp.Session, name: str, out: socket.socket, sink: socket.socket,
        fallback: Fallback, **kw: Any) -> _hop.Hop:
    pointers = srtp_pointers(sess, name)
    assert pointers is not None
    return _hop.Hop(sess, *pointers, out.fileno(), sink.getsockname(), fallback,
                    unprotect=name == "unprotect", **kw)


def rtp(seq: int, ssrc: int, payload: bytes, pt: int = 0) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc) + payload


SRC: Addr = ("127.0.0.1", 40000)


def test_the_extension_is_built() -> None:
    """The test environment must have it: CI builds it (gcc, python3-dev), never a skip."""
    assert _hop.Hop.__module__ == "freecall.srtp._hop"
    assert len(pylibsrtp.Session(
        Policy(key=bytes(30), ssrc_type=Policy.SSRC_ANY_OUTBOUND))._cdata) == _hop.MAX_PACKET
    assert _hop.MAX_TRAILER == pylibsrtp.SRTP_MAX_TRAILER_LEN


@pytest.mark.parametrize(
    ("profile", "protected_key"),
    [
        (Policy.SRTP_PROFILE_AES128_CM_SHA1_80, "aes_cm_128_hmac_sha1_80"),
        (Policy.SRTP_PROFILE_AES128_CM_SHA1_32, "aes_cm_128_hmac_sha1_32_variant"),
    ],
)
def test_known_answers_through_the_hop(
    profile: int, protected_key: str, out: socket.socket, sink: socket.socket
) -> None:
    vectors = json.loads((VECTORS / "libsrtp_srtp_validate_vectors.json").read_text())
    base = vectors["aes_cm_128_hmac_sha1_80"]
    key = x(base["master_key"] + base["master_salt"])
    plain, expected = x(base["rtp_plaintext"]), x(vectors[protected_key]["srtp_protected"])
    fb = Fallback()
    tx = hop(session(key, "protect", profile), "protect", out, sink, fb)
    tx(plain, SRC)
    assert sink.recv(2048) == expected
    rx = hop(session(key, "unprotect", profile), "unprotect", out, sink, fb)
    rx(expected, SRC)
    assert sink.recv(2048) == plain
    assert fb.calls == []
    assert tx.counters == (1, len(plain), 1, len(expected), 0, 0)
    assert rx.counters == (1, len(expected), 1, len(plain), 0, 0)
    tampered = bytearray(expected)
    tampered[-1] ^= 1
    fresh = hop(session(key, "unprotect", profile), "unprotect", out, sink, fb)
    fresh(bytes(tampered), SRC)
    assert fb.calls == [(bytes(tampered), SRC)]
    assert fresh.counters == (0, 0, 0, 0, 0, 0)


def test_hop_equals_the_python_path_on_random_packets(
    out: socket.socket, sink: socket.socket
) -> None:
    """Same keys, same packets: the hop's output is the Python path's, byte for byte, and its
    RFC 3550 A.3 state after reordering, loss, wraps and restarts is ReceptionStats'."""
    rng = random.Random(6)
    key = os.urandom(30)
    fb = Fallback()
    tx_native = hop(session(key, "protect"), "protect", out, sink, fb)
    tx_python = srtp_call(session(key, "protect"), "protect")
    rx_native = hop(session(key, "unprotect"), "unprotect", out, sink, fb)
    rx_python = srtp_call(session(key, "unprotect"), "unprotect")
    stats = ReceptionStats()
    ssrc = rng.getrandbits(32)
    seq = rng.randrange(65536)
    accepted = 0
    pending: list[tuple[int, bytes]] = []
    for _ in range(600):
        step = rng.choices([1, 2, 0, -3, 4000, -40], weights=[80, 6, 2, 4, 1, 1])[0]
        seq = (seq + step) & 0xFFFF
        payload = rng.randbytes(rng.choice([0, 1, 160, 320, 1200]))
        packet = rtp(seq, ssrc, payload, pt=rng.choice([0, 8, 96, 127]))
        try:
            protected = tx_python(packet)
        except pylibsrtp.Error:  # libsrtp protects a sequence number once (no repeat_tx)
            dropped = tx_native.counters[4]
            tx_native(packet, SRC)
            assert tx_native.counters[4] == dropped + 1
            continue
        tx_native(packet, SRC)
        assert sink.recv(2048) == protected
        pending.append((seq, protected))
        if len(pending) < 4 and rng.random() < 0.7:
            continue
        seq_out, wire = pending.pop(rng.randrange(len(pending)))  # reordered on the wire
        if rng.random() < 0.03:
            continue  # lost
        if rng.random() < 0.03:
            pending.append((seq_out, wire))  # duplicated
        try:
            expected = rx_python(wire)
        except pylibsrtp.Error:  # a duplicate, or older than the replay window
            rx_native(wire, SRC)
            assert fb.calls[-1] == (wire, SRC)
            continue
        rx_native(wire, SRC)
        assert sink.recv(2048) == expected
        stats.update(seq_out)
        accepted += 1
        assert rx_native.rx_state == stats.state()
    assert accepted > 400
    assert stats.lost > 0 and stats.restarts > 0
    assert rx_native.counters[0] == accepted
    restored = ReceptionStats()
    restored.set_state(rx_native.rx_state)
    assert restored.as_dict() == stats.as_dict()


def test_what_goes_to_the_python_fallback(out: socket.socket, sink: socket.socket) -> None:
    key = os.urandom(30)
    fb = Fallback()
    tx = hop(session(key, "protect"), "protect", out, sink, fb)
    too_long = rtp(1, 1, bytes(_hop.MAX_PACKET - _hop.MAX_TRAILER - 11))
    cases = [
        b"",
        b"\x80",
        rtp(1, 1, b"")[:11],  # shorter than the fixed header
        b"\x40" + rtp(1, 1, b"x")[1:],  # RTP version 1
        struct.pack("!BBHI", 0x81, 201, 1, 7),  # RTCP RR muxed on the RTP port (RFC 5761)
        struct.pack("!BBHI", 0x80, 223, 1, 7),
        too_long,
    ]
    for data in cases:
        tx(data, SRC)
    tx(bytearray(rtp(1, 1, b"x")), SRC)  # type: ignore[arg-type]  # not bytes
    assert [d for d, _ in fb.calls] == [*cases, bytearray(rtp(1, 1, b"x"))]
    assert tx.counters == (0, 0, 0, 0, 0, 0)
    tx(rtp(1, 1, bytes(_hop.MAX_PACKET - _hop.MAX_TRAILER - 12)), SRC)  # the longest accepted
    assert len(sink.recv(4096)) == _hop.MAX_PACKET - _hop.MAX_TRAILER + 10
    # Version 2 with the second octet just outside RFC 5761's RTCP range is RTP.
    tx(struct.pack("!BBHII", 0x80, 191, 2, 0, 1), SRC)
    tx(struct.pack("!BBHII", 0x80, 224, 3, 0, 1), SRC)
    assert len(sink.recv(2048)) == len(sink.recv(2048)) == 22
    assert len(fb.calls) == len(cases) + 1

    fb.calls.clear()
    rx = hop(session(key, "unprotect"), "unprotect", out, sink, fb)
    forged = rtp(5, 1, os.urandom(20))
    zrtp = b"\x10\x00\x00\x01ZRTP" + bytes(12)
    stun = struct.pack("!HHI", 1, 0, 0x2112A442) + bytes(12)
    tx2 = srtp_call(session(key, "protect"), "protect")
    good = tx2(rtp(9, 1, b"abc"))
    rx(good, SRC)
    assert sink.recv(2048) == rtp(9, 1, b"abc")
    for data in (forged, zrtp, stun, good, b"\x80\x00", bytes(_hop.MAX_PACKET + 1)):
        rx(data, SRC)  # `good` again: a replay
    assert [d for d, _ in fb.calls] == [
        forged, zrtp, stun, good, b"\x80\x00", bytes(_hop.MAX_PACKET + 1)]
    assert rx.counters == (1, len(good), 1, 15, 0, 0)


def test_latching_and_targets(out: socket.socket, sink: socket.socket) -> None:
    key = os.urandom(30)
    fb = Fallback()
    latched: list[Addr] = []
    tx = srtp_call(session(key, "protect"), "protect")
    rx = hop(session(key, "unprotect"), "unprotect", out, sink, fb,
             source=("127.0.0.1", 40000), latch=latched.append)
    rx(tx(rtp(1, 1, b"a")), ("127.0.0.1", 40000))
    rx(tx(rtp(2, 1, b"b")), ("127.0.0." + "1", 40000))  # equal, another object
    assert latched == []
    third = tx(rtp(3, 1, b"c"))
    rx(third, ("127.0.0.1", 40002))  # authenticated from a new source
    assert latched == [("127.0.0.1", 40002)]
    rx(third, ("127.0.0.1", 40004))  # a replay from elsewhere: no latch, the Python path's
    assert fb.calls == [(third, ("127.0.0.1", 40004))]
    assert latched == [("127.0.0.1", 40002)]
    rx.set_source(("127.0.0.1", 40002))
    rx(tx(rtp(4, 1, b"d")), ("127.0.0.1", 40002))
    assert latched == [("127.0.0.1", 40002)]
    assert [sink.recv(2048)[12:] for _ in range(4)] == [b"a", b"b", b"c", b"d"]
    # set_dest moves where the hop sends.
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    other.settimeout(2.0)
    with other:
        rx.set_dest(other.getsockname())
        rx(tx(rtp(5, 1, b"e")), ("127.0.0.1", 40002))
        assert other.recv(2048)[12:] == b"e"
    assert rx.take() == (5, 5 * (13 + 10), 5, 5 * 13, 0, 0)
    assert rx.counters == (0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="IPv4"):
        rx.set_dest(("::1", 5))
    with pytest.raises(ValueError, match="port"):
        rx.set_dest(("127.0.0.1", 0))


def test_send_errors_are_counted(out: socket.socket, sink: socket.socket) -> None:
    """A send the kernel refuses (here: an IPv6 destination on an IPv4 socket) is counted,
    never raised into the event loop."""
    key = os.urandom(30)
    tx = hop(session(key, "protect"), "protect", out, sink, Fallback())
    tx.set_dest(("::1", 9, 0, 0))
    tx(rtp(1, 1, b"x"), SRC)
    assert tx.counters == (1, 13, 0, 0, 0, 1)


def test_a_stream_holding_its_hop_is_collected(out: socket.socket, sink: socket.socket) -> None:
    """stream -> hop -> stream's bound method is a cycle: the hop takes part in GC."""
    import gc
    import weakref

    class Owner:
        def fallback(self, data: bytes, addr: Addr) -> None: ...

    owner = Owner()
    sess = session(os.urandom(30), "protect")
    pointers = srtp_pointers(sess, "protect")
    assert pointers is not None
    owner.hop = _hop.Hop(sess, *pointers, out.fileno(), sink.getsockname(),  # type: ignore[attr-defined]
                         owner.fallback)
    ref = weakref.ref(owner)
    del owner, sess
    gc.collect()
    assert ref() is None


def test_without_the_extension_the_bridge_runs_python() -> None:
    """Where no compiler built it, the bridge imports, says so, and keeps the Python path
    (the shared softphone socket included)."""
    import subprocess
    import sys

    code = """
import asyncio, sys
sys.modules["freecall.srtp._hop"] = None  # as if the optional build had been skipped
from freecall.srtp import bridge
from freecall.srtp.keys import RetainedSecrets

async def main():
    engine = bridge.MediaEngine(asyncio.get_running_loop(), address="127.0.0.1",
                                port_range=(40000, 40003), retained_secrets=RetainedSecrets(None))
    assert engine.stats()["native"] is False
    engine.close()
    # media.phone_socket: shared works too, routed by the Python router
    import socket
    engine = bridge.MediaEngine(asyncio.get_running_loop(), address="127.0.0.1",
                                port_range=(40000, 40005), retained_secrets=RetainedSecrets(None),
                                phone_socket="shared", policy="off")
    stream = await engine.allocate()
    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    phone.bind(("127.0.0.1", 0))
    stream.set_softphone_target(phone.getsockname())
    stream.set_remote(("127.0.0.1", 9))
    stream.start()
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    packet = bytes([0x80, 0]) + bytes(170)
    stranger.sendto(packet, stream.local_softphone_rtp)
    phone.sendto(packet, stream.local_softphone_rtp)
    for _ in range(200):
        await asyncio.sleep(0.01)
        if stream.phone_rtp_in and engine.stats()["phone_unrouted"]:
            break
    assert stream.phone_rtp_in == 1 and engine.stats()["phone_unrouted"] == 1, engine.stats()
    engine.close()

assert bridge.NATIVE_AVAILABLE is False
asyncio.run(main())
print("python path")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "python path"
