"""The little of RTP the media bridge needs per packet (RFC 3550), pure and allocation-free.

The bridge never parses RTP beyond the fixed header: it forwards payloads unchanged. What it does
need is to tell RTP from RTCP on a shared port (RFC 5761 section 4: payload types 192-223 are
RTCP, the range no RTP payload type may use when muxing) and to count loss from sequence numbers
the way RFC 3550 appendix A.3 does, so that the control API can show per-call reception quality
without waiting for the far end's RTCP receiver reports.
"""

from __future__ import annotations

from typing import Final

RTP_HEADER_LEN: Final = 12  # RFC 3550 section 5.1, without CSRCs
RTP_SEQ_MOD: Final = 1 << 16
MAX_DROPOUT: Final = 3000  # RFC 3550 A.3: a jump this far ahead is still "in order"
MAX_MISORDER: Final = 100  # and this far behind is a late packet, not a restart


def is_rtcp_type(second_octet: int) -> bool:
    """RFC 5761 section 4: RTCP packet types 192-223 (SR 200, RR 201, ...) on a muxed port."""
    return 192 <= second_octet <= 223


def looks_like_rtp(data: bytes) -> bool:
    """Version 2, a full fixed header, and not an RTCP packet type (RFC 3550 5.1, RFC 5761)."""
    return len(data) >= RTP_HEADER_LEN and data[0] >> 6 == 2 and not is_rtcp_type(data[1])


def rtp_sequence(data: bytes) -> int:
    """The 16-bit sequence number of an RTP packet (octets 2-3)."""
    return data[2] << 8 | data[3]


def rtp_ssrc(data: bytes) -> int:
    """The SSRC of an RTP packet (octets 8-11), also the sender SSRC of an RTCP packet (4-7)."""
    return int.from_bytes(data[8:12], "big")


class ReceptionStats:
    """RFC 3550 appendix A.3 for one incoming stream: extended highest sequence, expected, lost.

    Called once per authenticated packet, so it keeps to integer arithmetic on slots. Two
    departures from A.3, both because the bridge only feeds it packets whose source is already
    established (SRTP authenticated, or a latched clear-mode source): there is no probation
    (MIN_SEQUENTIAL), and a restart of the sequence (two consecutive packets after a large jump)
    keeps the totals counted so far instead of zeroing them, so `lost` covers the whole call.
    Reordered and duplicate packets count as received (A.3 does the same; libsrtp's replay
    check already drops duplicates in SRTP mode); `lost` never goes below zero.
    """

    __slots__ = (
        "_bad_seq",
        "_base_seq",
        "_cycles",
        "_expected_before",
        "_received_before",
        "max_seq",
        "received",
        "restarts",
    )

    def __init__(self) -> None:
        self.max_seq = -1  # -1: no packet yet
        self._base_seq = 0
        self._cycles = 0
        self._bad_seq = RTP_SEQ_MOD + 1  # A.3: "so seq == bad_seq is false"
        self.received = 0  # in the current sequence run (since the last restart)
        self._expected_before = 0  # totals of earlier runs, kept across restarts
        self._received_before = 0
        self.restarts = 0

    def update(self, seq: int) -> None:
        """Account for one packet with sequence number ``seq`` (A.3 ``update_seq``)."""
        max_seq = self.max_seq
        if max_seq < 0:
            self._init(seq)
            self.received = 1
            return
        udelta = (seq - max_seq) & 0xFFFF
        if udelta < MAX_DROPOUT:
            if seq < max_seq:
                self._cycles += RTP_SEQ_MOD  # wrapped: count another 64K cycle
            self.max_seq = seq
        elif udelta <= RTP_SEQ_MOD - MAX_MISORDER:
            if seq == self._bad_seq:
                # Two sequential packets after a big jump: the sender restarted its sequence
                # (A.3: "assume the other side restarted without telling us").
                self._expected_before += self.expected_in_run
                self._received_before += self.received
                self.restarts += 1
                self._init(seq)
            else:
                self._bad_seq = (seq + 1) & 0xFFFF
                return
        # else: duplicate or reordered packet, counted as received
        self.received += 1

    def _init(self, seq: int) -> None:
        self._base_seq = seq
        self.max_seq = seq
        self._bad_seq = RTP_SEQ_MOD + 1
        self._cycles = 0
        self.received = 0

    def state(self) -> tuple[int, int, int, int, int, int, int, int]:
        """The whole A.3 state, in the order the C hop keeps it (`_hop.Hop.rx_state`)."""
        return (self.max_seq, self._base_seq, self._cycles, self._bad_seq, self.received,
                self._expected_before, self._received_before, self.restarts)

    def set_state(self, state: tuple[int, int, int, int, int, int, int, int]) -> None:
        """Take back the state the C hop kept while it received (see `state`)."""
        (self.max_seq, self._base_seq, self._cycles, self._bad_seq, self.received,
         self._expected_before, self._received_before, self.restarts) = state

    @property
    def extended_max(self) -> int:
        """Extended highest sequence number received (cycles << 16 | max_seq), -1 if none."""
        return -1 if self.max_seq < 0 else self._cycles + self.max_seq

    @property
    def expected_in_run(self) -> int:
        if self.max_seq < 0:
            return 0
        return self._cycles + self.max_seq - self._base_seq + 1

    @property
    def expected(self) -> int:
        """Packets the sender sent, judging from the sequence numbers (A.3), whole call."""
        return self._expected_before + self.expected_in_run

    @property
    def total_received(self) -> int:
        return self._received_before + self.received

    @property
    def lost(self) -> int:
        """Expected minus received, never negative (duplicates can push it below zero)."""
        return max(0, self.expected - self.total_received)

    @property
    def fraction_lost(self) -> float:
        expected = self.expected
        return self.lost / expected if expected else 0.0

    def as_dict(self) -> dict[str, int | float]:
        return {
            "expected": self.expected,
            "received": self.total_received,
            "lost": self.lost,
            "fraction_lost": round(self.fraction_lost, 6),
            "restarts": self.restarts,
        }


__all__ = [
    "MAX_DROPOUT",
    "MAX_MISORDER",
    "RTP_HEADER_LEN",
    "RTP_SEQ_MOD",
    "ReceptionStats",
    "is_rtcp_type",
    "looks_like_rtp",
    "rtp_sequence",
    "rtp_ssrc",
]
