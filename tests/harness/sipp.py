"""SIPp 3.6 runs with bounded time, free ports and parsed results.

Exit codes (SIPp's own): 0 every call succeeded; 1 at least one failed; 97 stopped by an internal
command; 99 normal exit with no call processed; 255 (-1) fatal, e.g. ``-timeout`` with
``-timeout_error``; 254 (-2) fatal binding error.

Ports: SIPp binds its SIP port, a UDP control port (``-cp``, default 8888) and media ports from
``-mp`` (audio and video, each with RTCP: 4 ports). Each run takes its own block, so parallel runs
never meet on 8888 or 6000 (SIPp's defaults).

Gotcha K1: the built-in uac aborts a call on a 180 that arrives after the 200, which any
multi-worker or asynchronous proxy (freecall included) may produce; use ``UAS_NO180`` as the UAS
scenario (the built-in uas without 180) when that is not what the test is about.
"""

from __future__ import annotations

import csv
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ports import BlockSource, PortBlock
from .proc import ManagedProcess, wait_port, wait_until

SCENARIOS = Path(__file__).parent / "scenarios"
UAS_NO180 = SCENARIOS / "uas_no180.xml"
BUILTIN = ("uac", "uas", "regexp", "3pcc-C-A", "3pcc-C-B", "3pcc-A", "3pcc-B", "branchc",
           "branchs", "uac_pcap")


def _bound_in(netns: Sequence[str], port: int) -> bool:
    """Whether a socket is bound to ``port`` inside the network namespace of ``netns``."""
    done = subprocess.run([*netns, "ss", "-Hlnu", f"sport = :{port}"], capture_output=True,
                          text=True, check=False)
    return bool(done.stdout.strip())


def parse_stats_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a ``-trace_stat`` file (``;``-separated, header first, one row per period)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    rows = list(csv.reader(text.splitlines(), delimiter=";"))
    if len(rows) < 2:
        return []
    header = rows[0]
    return [dict(zip(header, row, strict=False)) for row in rows[1:] if row]


@dataclass(frozen=True, slots=True)
class SippResult:
    """How a SIPp run ended. ``stats`` is the last row of the statistics CSV."""

    returncode: int | None  # None: killed after the time limit
    stats: Mapping[str, str]
    duration_s: float
    stats_csv: Path
    error_log: Path
    screen_log: Path
    output_log: Path
    rows: Sequence[Mapping[str, str]] = field(default=())

    def _count(self, column: str) -> int:
        try:
            return int(self.stats.get(column, "0") or 0)
        except ValueError:
            return 0

    @property
    def successful(self) -> int:
        return self._count("SuccessfulCall(C)")

    @property
    def failed(self) -> int:
        return self._count("FailedCall(C)")

    @property
    def created(self) -> int:
        return self._count("TotalCallCreated")

    @property
    def retransmissions(self) -> int:
        return self._count("Retransmissions(C)")

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.failed == 0

    def errors(self, limit: int = 4000) -> str:
        """Start of SIPp's error log (it can grow to megabytes under overload)."""
        try:
            with open(self.error_log, errors="replace") as f:
                return f.read(limit)
        except FileNotFoundError:
            return ""

    def __str__(self) -> str:
        return (f"sipp rc={self.returncode} successful={self.successful} failed={self.failed} "
                f"created={self.created} retrans={self.retransmissions} "
                f"in {self.duration_s:.2f} s (errors: {self.error_log})")


class SippProcess:
    """One SIPp instance; ``wait()`` returns its ``SippResult``."""

    def __init__(self, process: ManagedProcess, port: int, prefix: Path, time_limit: float) -> None:
        self.process = process
        self.port = port
        self.stats_csv = prefix.with_suffix(".csv")
        self.error_log = prefix.with_name(prefix.name + "_errors.log")
        self.screen_log = prefix.with_name(prefix.name + "_screen.log")
        self.time_limit = time_limit
        self._result: SippResult | None = None

    @property
    def addr(self) -> str:
        """``127.0.0.1:PORT``, the target for a SIPp uac (or a proxy's next hop)."""
        return f"127.0.0.1:{self.port}"

    def wait(self, timeout: float | None = None) -> SippResult:
        """Wait for SIPp to finish (bounded: its time limit + 10 s), then stop it and parse."""
        if self._result is None:
            limit = self.time_limit + 10 if timeout is None else timeout
            rc = self.process.wait(limit)
            if rc is None:
                self.process.stop(2.0)
            self._result = self._collect(rc)
        return self._result

    def stop(self) -> SippResult:
        """End it now, keeping its statistics. A UAS exits by itself only 4 s after its last
        call (the closing pause of SIPp's uas scenario, which absorbs retransmissions); stop it
        when the test no longer needs it rather than ``wait()``."""
        if self._result is None:
            rc = self.process.stop(3.0)
            self._result = self._collect(rc)
        return self._result

    def _collect(self, rc: int | None) -> SippResult:
        rows = parse_stats_csv(self.stats_csv)
        return SippResult(
            returncode=rc, stats=rows[-1] if rows else {},
            duration_s=time.monotonic() - self.process.started_at, stats_csv=self.stats_csv,
            error_log=self.error_log, screen_log=self.screen_log,
            output_log=self.process.log_path, rows=rows,
        )


class Sipp:
    """Starts SIPp runs in ``directory`` (logs, CSVs) with ports from fresh blocks."""

    def __init__(self, directory: Path, block_source: BlockSource, binary: str = "sipp") -> None:
        self.directory = directory
        self.block_source = block_source
        self.binary = binary
        self.processes: list[SippProcess] = []
        self._count = 0

    def start(
        self,
        scenario: str | Path = "uac",
        target: str | None = None,
        *,
        name: str | None = None,
        service: str = "service",
        calls: int = 1,
        rate: float | None = None,
        max_concurrent: int | None = None,
        time_limit: float = 30.0,
        transport: str = "u1",
        remote_sending_address: str | None = None,
        auth: tuple[str, str] | None = None,
        variables: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        ready_timeout: float = 5.0,
        netns: Sequence[str] = (),
    ) -> SippProcess:
        """Start SIPp. ``scenario`` is a built-in name (``uac``, ``uas``) or an XML file.

        A UAS (no ``target``) is waited for until its port is bound. ``time_limit`` becomes
        ``-timeout``; a uac also gets ``-timeout_error`` so running out of time is a failure.
        """
        self._count += 1
        label = name or f"sipp{self._count}_{Path(str(scenario)).stem}"
        block: PortBlock = self.block_source.block()
        port = block.take(1)
        control_port = block.take(1)
        media_port = block.take(8, align=4)
        self.directory.mkdir(parents=True, exist_ok=True)
        prefix = self.directory / label
        argv = [self.binary]
        if isinstance(scenario, Path) or str(scenario).endswith(".xml"):
            argv += ["-sf", str(scenario)]
        elif scenario in BUILTIN:
            argv += ["-sn", str(scenario)]
        else:
            raise ValueError(f"unknown SIPp scenario {scenario!r}")
        if target is not None:
            argv.append(target)
        argv += [
            "-i", "127.0.0.1", "-p", str(port), "-mi", "127.0.0.1", "-mp", str(media_port),
            "-cp", str(control_port), "-t", transport, "-s", service, "-m", str(calls),
            "-nostdin", "-timeout", f"{time_limit:g}s",
            "-trace_stat", "-stf", str(prefix.with_suffix(".csv")), "-fd", "1",
            "-trace_screen", "-screen_file", str(prefix.with_name(prefix.name + "_screen.log")),
            "-trace_err", "-error_file", str(prefix.with_name(prefix.name + "_errors.log")),
            "-buff_size", "4194304",
        ]
        if target is not None:
            argv.append("-timeout_error")
        if rate is not None:
            argv += ["-r", f"{rate:g}"]
        if max_concurrent is not None:
            argv += ["-l", str(max_concurrent)]
        if remote_sending_address is not None:
            argv += ["-rsa", remote_sending_address]
        if auth is not None:
            argv += ["-au", auth[0], "-ap", auth[1]]
        for key, value in (variables or {}).items():
            argv += ["-key", key, value]
        argv += list(extra_args)
        proc = ManagedProcess(label, [*netns, *argv],
                              log_path=prefix.with_name(prefix.name + ".out"),
                              cwd=self.directory).start()
        sp = SippProcess(proc, port, prefix, time_limit)
        self.processes.append(sp)
        if target is None and netns:  # its port is in that namespace: ask it there
            wait_until(lambda: _bound_in(netns, port), ready_timeout,
                       message=f"SIPp {label} to bind port {port}")
        elif target is None:
            kind = "tcp" if transport.startswith("t") else "udp"
            wait_port(port, kind, ready_timeout, proc)
        return sp

    def run(self, scenario: str | Path = "uac", target: str | None = None,
            **kwargs: Any) -> SippResult:
        """``start`` and ``wait``: for a uac that must finish by itself."""
        return self.start(scenario, target, **kwargs).wait()

    def stop_all(self) -> None:
        for sp in reversed(self.processes):
            sp.stop()
