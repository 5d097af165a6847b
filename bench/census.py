"""``freecall run`` under tracemalloc: where the daemon's memory grows (issue 11, the soak).

    .venv/bin/python bench/soak.py --minutes 40 --census      # A and B run under this wrapper
    .venv/bin/python bench/census.py -c CONFIG --state-dir DIR  # by hand, like ``freecall run``

Every ``FREECALL_CENSUS_EVERY`` seconds (default 300) a thread takes a tracemalloc snapshot and
appends to ``<state-dir>/census.txt`` the allocation sites (file:line) that grew most since the
first snapshot, taken ``FREECALL_CENSUS_BASE`` seconds (default 120) after start, with the
traced total. A soak's RSS rising in steps then says which code holds the memory, not only that
it grew. tracemalloc costs CPU and memory of its own: figures from such a run are for finding
causes, not for the soak's RSS table.
"""

from __future__ import annotations

import gc
import os
import runpy
import sys
import threading
import time
import tracemalloc
from pathlib import Path


def _state_dir(argv: list[str]) -> Path:
    for i, arg in enumerate(argv):
        if arg == "--state-dir" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--state-dir="):
            return Path(arg.split("=", 1)[1])
    return Path(".")


def _watch(out: Path, base_after: float, every: float) -> None:
    started = time.monotonic()
    time.sleep(base_after)
    own = [tracemalloc.Filter(False, tracemalloc.__file__)]  # the snapshots themselves
    base = tracemalloc.take_snapshot().filter_traces(own)
    with out.open("a") as f:
        f.write(f"base at {time.monotonic() - started:.0f} s: "
                f"{tracemalloc.get_traced_memory()[0] / 1e6:.1f} MB traced\n")
    while True:
        time.sleep(every)
        snap = tracemalloc.take_snapshot().filter_traces(own)
        stats = snap.compare_to(base, "lineno")
        traced, peak = tracemalloc.get_traced_memory()
        lines = [f"\n== {time.monotonic() - started:.0f} s: {traced / 1e6:.1f} MB traced "
                 f"(peak {peak / 1e6:.1f}); largest growth since the base:"]
        for stat in stats[:25]:
            frame = stat.traceback[0]
            lines.append(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  "
                         f"{frame.filename}:{frame.lineno}")
        lines += _instances(os.environ.get("FREECALL_CENSUS_TYPES", "MediaStream,ZrtpSession"))
        with out.open("a") as f:
            f.write("\n".join(lines) + "\n")


def _describe(obj: object) -> str:
    text = repr(obj) if isinstance(obj, tuple | list) and len(obj) < 6 else ""
    return f"{type(obj).__module__}.{type(obj).__qualname__} {text[:120]}"


def _instances(names: str) -> list[str]:
    """Live instances of the named classes, and what holds the first one (two levels): a
    count that grows with the calls made is a leak, and the holders say whose."""
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    if not wanted:
        return []

    def count() -> dict[str, list[object]]:
        found: dict[str, list[object]] = {n: [] for n in wanted}
        for obj in gc.get_objects():
            name = type(obj).__name__
            if name in found:
                found[name].append(obj)
        return found

    # Before a collection: garbage in reference cycles is still there (it waits for the
    # cyclic collector); after: what something really holds (a leak if it keeps growing).
    before = {n: len(v) for n, v in count().items()}
    gc.collect()
    found = count()
    lines = ["  instances before a full collection / after: " + ", ".join(
        f"{n} {before[n]} / {len(v)}" for n, v in sorted(found.items()))]
    for name in sorted(found):
        objs = found[name]
        if not objs:
            continue
        sample = min(objs, key=lambda o: getattr(o, "id", 0))  # the oldest, for streams
        lines.append(f"  holders of the oldest {name} {sample!r:.80}:")
        for holder in gc.get_referrers(sample):
            if holder is objs or holder is found:
                continue
            lines.append(f"    {_describe(holder)}")
            for outer in gc.get_referrers(holder)[:6]:
                if outer is not objs and outer is not found:
                    lines.append(f"      <- {_describe(outer)}")
        del objs
    return lines


def main() -> None:
    argv = sys.argv[1:]
    tracemalloc.start(1)
    out = _state_dir(argv) / "census.txt"
    threading.Thread(target=_watch, daemon=True, args=(
        out, float(os.environ.get("FREECALL_CENSUS_BASE", "120")),
        float(os.environ.get("FREECALL_CENSUS_EVERY", "300")))).start()
    sys.argv = ["freecall", "run", *argv]
    runpy.run_module("freecall", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
