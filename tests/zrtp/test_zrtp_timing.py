"""CPU cost of a whole exchange, both endpoints in one process (target: well under 200 ms).

The product goal is ZRTP done within 200 ms of the first media packet on loopback, so the two
sides' computation together must leave most of that budget to the network and the event loop.
Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest

from freecall.srtp.keys import RetainedSecrets
from freecall.srtp.zrtp import ZrtpConfig, ZrtpSession
from zrtp.zrtp_harness import Endpoint, Link

RUNS = 7


def one_exchange(ka: str) -> float:
    cfg = ZrtpConfig(key_agreement_types=(ka,))
    ca, cb = RetainedSecrets(None), RetainedSecrets(None)
    start = time.perf_counter()
    a = ZrtpSession(cfg, ca.zid, ca, ssrc=1, urandom=os.urandom)
    b = ZrtpSession(cfg, cb.zid, cb, ssrc=2, urandom=os.urandom)
    link = Link(Endpoint("A", a, ca), Endpoint("B", b, cb))
    link.start()
    elapsed = time.perf_counter() - start
    assert link.a.secure is not None and link.b.secure is not None
    return elapsed


@pytest.mark.parametrize("ka", ["X255", "EC25", "DH3k"])
def test_exchange_time(ka: str) -> None:
    one_exchange(ka)  # warm up imports and tables
    times = [one_exchange(ka) for _ in range(RUNS)]
    median = statistics.median(times)
    print(
        f"\nZRTP {ka}: median {median * 1000:.1f} ms, max {max(times) * 1000:.1f} ms "
        f"for both endpoints (Hello..Conf2ACK, with commit contention)"
    )
    assert median < 0.2
