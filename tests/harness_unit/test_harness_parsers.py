"""Parsers of what the tools print: baresip rtp_stats, oRTP statistics, SIPp's CSV."""

from __future__ import annotations

from pathlib import Path

from harness.baresip import parse_rtp_stats
from harness.linphonec import parse_ortp_stats
from harness.sipp import SippResult, parse_stats_csv

BARESIP_LOG = """\
alice@127.0.0.1: Call established: sip:bob@127.0.0.1:5070;transport=udp
call: terminate call '29082d0912c281c1' with sip:bob@127.0.0.1:5070;transport=udp
sip:alice@127.0.0.1:5070: Call with sip:bob@127.0.0.1:5070 terminated (duration: 3 secs)

audio           Transmit:     Receive:
packets:            151          149
avg. bitrate:      64.3         64.3  (kbit/s)
errors:               0            0
ua: stop all (forced=0)
sip:alice@127.0.0.1:5070: Call with sip:bob@127.0.0.1:5070 terminated (duration: 14 secs)

audio           Transmit:     Receive:
packets:            700          698
avg. bitrate:      64.1         64.3  (kbit/s)
errors:               0            0
pkt.report:         137          136
lost:                 0            2
jitter:             1.0          1.2  (ms)
ua: stop all (forced=0)
"""


def test_rtp_stats_blocks() -> None:
    first, second = parse_rtp_stats(BARESIP_LOG)
    assert first.media == "audio"
    assert (first.tx_packets, first.rx_packets, first.rx_lost) == (151, 149, 0)
    assert first.rx["avg. bitrate"] == 64.3
    assert (second.rx_packets, second.rx_lost) == (698, 2)
    assert second.tx["jitter"] == 1.0 and second.rx["jitter"] == 1.2
    assert second.rx["pkt.report"] == 136


def test_rtp_stats_none() -> None:
    assert parse_rtp_stats("baresip is ready.\n") == []


ORTP_LOG = """\
2026-11-21 13:24:32:420 ortp-message-             AUDIO SESSION'S RTP STATISTICS
2026-11-21 13:24:32:420 ortp-message------------------------------------------------------------
2026-11-21 13:24:32:420 ortp-message-sent                                        150 packets
2026-11-21 13:24:32:420 ortp-message-                                   0 duplicated packets
2026-11-21 13:24:32:420 ortp-message-                                          25800 bytes
2026-11-21 13:24:32:420 ortp-message-received                                    148 packets
2026-11-21 13:24:32:420 ortp-message-                                   0 duplicated packets
2026-11-21 13:24:32:420 ortp-message-incoming delivered to the app             25284 bytes
2026-11-21 13:24:32:420 ortp-message-incoming cumulative lost                      2 packets
2026-11-21 13:24:33:000 ortp-message-something else
"""


def test_ortp_stats() -> None:
    (stats,) = parse_ortp_stats(ORTP_LOG)
    assert (stats.sent, stats.received, stats.lost) == (150, 148, 2)
    assert parse_ortp_stats("") == []


HEADER = ("StartTime;LastResetTime;CurrentTime;ElapsedTime(P);ElapsedTime(C);TargetRate;"
          "TotalCallCreated;CurrentCall;SuccessfulCall(P);SuccessfulCall(C);FailedCall(P);"
          "FailedCall(C);Retransmissions(P);Retransmissions(C);")


def test_sipp_csv(tmp_path: Path) -> None:
    csv_path = tmp_path / "uac.csv"
    csv_path.write_text(
        HEADER + "\n"
        "2026-11-21\t13:24:38.46;x;y;00:00:01;00:00:01;10;5;2;3;3;0;0;0;0;\n"
        "2026-11-21\t13:24:38.46;x;y;00:00:01;00:00:02;10;10;0;7;10;0;1;4;20;\n"
    )
    rows = parse_stats_csv(csv_path)
    assert len(rows) == 2
    assert rows[-1]["SuccessfulCall(C)"] == "10"
    result = SippResult(returncode=1, stats=rows[-1], duration_s=2.0, stats_csv=csv_path,
                        error_log=tmp_path / "none.log", screen_log=tmp_path / "s",
                        output_log=tmp_path / "o", rows=rows)
    assert (result.successful, result.failed, result.created, result.retransmissions) == \
        (10, 1, 10, 20)
    assert not result.ok
    assert result.errors() == ""
    assert "successful=10 failed=1" in str(result)


def test_sipp_csv_missing_or_empty(tmp_path: Path) -> None:
    assert parse_stats_csv(tmp_path / "missing.csv") == []
    (tmp_path / "h.csv").write_text(HEADER + "\n")
    assert parse_stats_csv(tmp_path / "h.csv") == []
