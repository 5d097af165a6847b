"""Pure helpers of the bridge: RFC 3550 A.3 loss accounting, RTP/RTCP split, port pairs."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from freecall.srtp.media_ports import PortPairPool
from freecall.srtp.rtp import (
    ReceptionStats,
    is_rtcp_type,
    looks_like_rtp,
    rtp_sequence,
    rtp_ssrc,
)


def rtp_packet(seq: int, ssrc: int, payload: bytes) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + payload


def rtcp_receiver_report(ssrc: int) -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


def feed(seqs: list[int]) -> ReceptionStats:
    stats = ReceptionStats()
    for seq in seqs:
        stats.update(seq & 0xFFFF)
    return stats


def test_in_order_no_loss() -> None:
    s = feed(list(range(100, 200)))
    assert (s.expected, s.total_received, s.lost) == (100, 100, 0)
    assert s.extended_max == 199


def test_gaps_are_lost() -> None:
    s = feed([1, 2, 5, 6, 10])
    assert s.expected == 10 and s.total_received == 5 and s.lost == 5
    assert s.fraction_lost == pytest.approx(0.5)


def test_wraparound_counts_a_cycle() -> None:
    s = feed(list(range(65530, 65536)) + list(range(0, 10)))
    assert s.extended_max == 65536 + 9
    assert (s.expected, s.lost) == (16, 0)


def test_reordered_and_duplicate_packets() -> None:
    s = feed([1, 2, 4, 3, 5, 5])
    assert s.expected == 5 and s.total_received == 6
    assert s.lost == 0  # never negative


def test_first_packet_near_the_top_of_the_range() -> None:
    s = feed([65500, 65501, 65502])
    assert (s.expected, s.lost) == (3, 0)


def test_restart_needs_two_sequential_packets_and_keeps_totals() -> None:
    s = feed([10, 11, 12])
    s.update(40000)  # one stray packet far away: ignored (A.3 bad_seq)
    assert s.total_received == 3 and s.restarts == 0
    s.update(40001)  # ... but two in a row: the sender restarted
    s.update(40002)
    assert s.restarts == 1
    assert s.total_received == 5 and s.expected == 3 + 2


@given(st.lists(st.integers(0, 2000), min_size=1, max_size=300))
def test_lost_plus_received_covers_expected(raw: list[int]) -> None:
    seqs = sorted(set(raw))
    s = feed(seqs)
    assert s.total_received == len(seqs)
    assert s.expected == seqs[-1] - seqs[0] + 1
    assert s.lost == s.expected - len(seqs)


def test_rtp_rtcp_split() -> None:
    rtp = rtp_packet(7, 0xDEADBEEF, b"x" * 160)
    rtcp = rtcp_receiver_report(1)
    assert looks_like_rtp(rtp) and not looks_like_rtp(rtcp)
    assert is_rtcp_type(rtcp[1]) and not is_rtcp_type(rtp[1])
    assert rtp_sequence(rtp) == 7 and rtp_ssrc(rtp) == 0xDEADBEEF
    assert not looks_like_rtp(b"\x80\x00")


def test_port_pairs_are_even_and_reused_last() -> None:
    pool = PortPairPool(20001, 20010)
    assert pool.capacity == 4  # 20002, 20004, 20006, 20008 (20010 has no 20011)
    a, b = pool.take(), pool.take()
    assert (a, b) == (20002, 20004)
    pool.give_back(20002)
    assert [pool.take(), pool.take(), pool.take()] == [20006, 20008, 20002]
    assert pool.take() is None
    pool.give_back(12345)  # unknown: ignored
    assert len(pool) == 0 and pool.in_use == 4
    with pytest.raises(ValueError):
        PortPairPool(20001, 20001)
