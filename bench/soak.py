"""One hour (``--minutes``) of steady load on five nodes, watched for leaks (issue 11, item 5).

    .venv/bin/python bench/soak.py                # 60 minutes, a call a second held 30 s
    .venv/bin/python bench/soak.py --minutes 10

The load and the checks are tests/harness/soak.py's (tests/interop/test_soak.py runs two
minutes of it): five gossiping nodes, calls from a SIPp uac on A to a SIPp uas on B through
both daemons, ten registrations refreshed at B; every ``--sample`` seconds each node's RSS, open
descriptors, asyncio tasks, timer heap entries, transactions, proxied requests and calls with
media state. Printed: start, end and slope per hour of each after the warmup; exit 1 when one
grew past its tolerance (tests/harness/soak.py ``TOLERANCE``), a call or a refresh failed, or a
log holds an error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from harness import Harness  # noqa: E402
from harness.soak import run_soak  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=1.0, help="calls per second")
    parser.add_argument("--hold", type=float, default=30.0, help="seconds per call")
    parser.add_argument("--refresh", type=float, default=20.0,
                        help="seconds between registration refreshes")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=120.0,
                        help="seconds before the steady state is measured")
    parser.add_argument("--media-ports", type=int, default=34000,
                        help="first of A's and B's 800 media ports (two soaks at once need two)")
    parser.add_argument("--census", action="store_true",
                        help="run A and B under bench/census.py (tracemalloc): where memory "
                             "grows, in <logs>/{a,b}/state/census.txt")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; "
          f"{args.minutes:g} min, {args.rate:g} calls/s held {args.hold:g} s", flush=True)
    run_dir = Path(os.environ.get("FREECALL_BENCH_DIR", "/tmp")) / f"freecall-soak-{os.getpid()}"
    with Harness(run_dir) as h:
        census = [sys.executable, str(ROOT / "bench" / "census.py")] if args.census else None
        result = run_soak(h, seconds=args.minutes * 60, rate=args.rate, hold=args.hold,
                          refresh=args.refresh, sample=args.sample, warmup=args.warmup,
                          log=lambda line: print(line, flush=True), command=census,
                          media_ports=args.media_ports)
    print(result.report())
    print("\n" + ("PASS" if not result.failures
                  else "FAIL:\n  " + "\n  ".join(result.failures)))
    print(f"(logs in {run_dir})")
    sys.exit(1 if result.failures else 0)


if __name__ == "__main__":
    main()
