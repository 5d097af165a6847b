"""What the control API's call model costs the daemon per call (issue 8).

    .venv/bin/python bench/control.py            # 20,000 calls, one event subscriber
    .venv/bin/python bench/control.py --calls 100000 --subscribers 3

Each call goes through what the daemon feeds the model: started, answered, a security update
(the OpenPGP verdict), ended. The subscribers drain their queues every 100 calls, as a live
``freecall watch`` or dashboard would. Printed: microseconds per call, and the share of one
core that the model takes at 1,000 calls/s.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from freecall.control.model import CallBook, EventBus


@dataclass
class BenchCall:
    id: str
    call_id: str
    from_tag: str
    caller: str = "sip:alice@a.test"
    callee: str = "sip:bob@b.test"
    started: float = 0.0
    direction: str = "out"
    route: str = "static"
    answered: float | None = None
    ended: float | None = None
    outcome: str = "trying"


def run(calls: int, subscribers: int) -> float:
    now = [0.0]
    bus = EventBus(lambda: now[0])
    book = CallBook(bus)
    subs = [bus.subscribe() for _ in range(subscribers)]
    start = time.perf_counter()
    for i in range(calls):
        now[0] = i * 0.001
        call = BenchCall(id=f"{i:012x}", call_id=f"c{i}", from_tag=f"t{i}", started=now[0])
        book.started(call)
        call.answered = now[0]
        book.answered(call)
        book.update_security((call.call_id, call.from_tag), verification="verified",
                             peer_key="0123456789ABCDEF0123456789ABCDEF01234567")
        call.ended, call.outcome = now[0], "hung up"
        book.ended(call)
        if i % 100 == 99:
            for sub in subs:
                sub.take()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--subscribers", type=int, default=1)
    args = parser.parse_args()
    run(1000, args.subscribers)  # warm-up
    per_call = min(run(args.calls, args.subscribers) for _ in range(3))
    print(f"call model: {per_call * 1e6:.1f} us per call (start, answer, security, end; "
          f"{args.subscribers} subscriber(s)); {per_call * 1000 * 100:.1f} % of a core "
          "at 1,000 calls/s")


if __name__ == "__main__":
    main()
