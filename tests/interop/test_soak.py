"""Two minutes of bench/soak.py's steady load (issue 11, item 5): five gossiping nodes, a call a
second through two daemons held 10 s, eleven registrations refreshed every 10 s; RSS,
descriptors, tasks, timers, transactions and calls with media state within their tolerances
over the second minute, no call left unconfirmed (its ACK lost), every call and refresh
completes, no error in any log. The issue asks
for ten minutes in CI; the suite's 15 minute budget allows about two, so the hold is shortened
to reach the steady state sooner (bench/soak.py runs the hour, with figures in
docs/performance.md).
"""

from __future__ import annotations

import pytest

from harness import Harness
from harness.soak import run_soak

SECONDS = 120


@pytest.mark.slow
def test_two_minutes_of_steady_load_leave_no_growth(harness: Harness) -> None:
    result = run_soak(harness, seconds=SECONDS, rate=1.0, hold=10.0, refresh=10.0, sample=5.0,
                      warmup=40.0, media_ports=36000)  # bench/soak.py's are 34000-34799
    print("\n" + result.report())
    assert not result.failures, "\n".join(result.failures)
    assert result.calls.successful >= SECONDS - 10 - 1
    assert result.registrations_ok >= 11 * (SECONDS // 10)
