"""``Harness``: everything one test starts, and its orderly end.

One object per test owns the run directory, the ports and every process. ``close()`` stops the
processes in *reverse start order* (softphones before the registrar they are registered with:
baresip may hang on quit while its registrar is gone, gotcha B4), releases the ports and writes
a summary, whatever the test's outcome. Usable without pytest (``with Harness(dir) as h:``).
"""

from __future__ import annotations

import json
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from .addr import SipAddr
from .baresip import Baresip
from .daemon import FreecallDaemon
from .linphonec import Linphonec
from .ports import PortAllocator, PortPool
from .proc import ManagedProcess
from .sipp import Sipp


class MissingTool(RuntimeError):
    """A program the test needs is not installed.

    The fixtures turn this into a test failure: scripts/test installs every program.
    """


class _Stoppable(Protocol):
    name: str

    def stop(self, timeout: float = ...) -> int | None: ...


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise MissingTool(f"{binary} is not installed (see scripts/debian-packages.txt)")
    return path


class Harness:
    """Run directory, ports and processes of one test."""

    def __init__(self, run_dir: Path, allocator: PortAllocator | None = None,
                 on_missing: Callable[[str], None] | None = None) -> None:
        self.run_dir = run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.pool = PortPool(allocator or PortAllocator())
        self.started: list[_Stoppable] = []
        self._sipp: Sipp | None = None
        self._on_missing = on_missing
        self.stop_errors: list[str] = []

    def _require(self, binary: str) -> None:
        try:
            require(binary)
        except MissingTool as exc:
            if self._on_missing is not None:
                self._on_missing(str(exc))  # pytest.fail in the fixtures
            raise

    def _dir(self, name: str) -> Path:
        path = self.run_dir / name
        if path.exists():
            raise ValueError(f"{name!r} already used in this test: names must be unique")
        path.mkdir(parents=True)
        return path

    # -- factories -----------------------------------------------------------------------------

    def baresip(self, name: str, *, registrar: str | tuple[str, int] | SipAddr,
                start: bool = True, **options: Any) -> Baresip:
        """A baresip UA (see ``Baresip`` for options: password, domain, tone_hz, answer, ...)."""
        self._require(options.get("binary", "baresip"))
        ua = Baresip(name, directory=self._dir(name), ports=self.pool.block(),
                     registrar=registrar, **options)
        if start:
            self.started.append(ua)
            ua.start()
        return ua

    def linphonec(self, name: str, *, registrar: str | tuple[str, int] | SipAddr,
                  start: bool = True, **options: Any) -> Linphonec:
        """A linphonec UA (see ``Linphonec``: password, media_encryption, auto_answer, ...)."""
        self._require(options.get("binary", "linphonec"))
        ua = Linphonec(name, directory=self._dir(name), ports=self.pool.block(),
                       registrar=registrar, **options)
        if start:
            self.started.append(ua)
            ua.start()
        return ua

    @property
    def sipp(self) -> Sipp:
        """The SIPp runner of this test (``sipp.start(...)``, ``sipp.run(...)``)."""
        if self._sipp is None:
            self._require("sipp")
            self._sipp = Sipp(self._dir("sipp"), self.pool)
        return self._sipp

    def daemon(self, name: str = "node", *, users: Mapping[str, str] | None = None,
               start: bool = True, **options: Any) -> FreecallDaemon:
        """A freecall daemon on its own ports (see ``FreecallDaemon``)."""
        node = FreecallDaemon(name, directory=self._dir(name), ports=self.pool, users=users,
                              **options)
        if start:
            self.started.append(node)
            node.start()
        return node

    def process(self, name: str, argv: Sequence[str], **options: Any) -> ManagedProcess:
        """Any other program (a DNS server, a reference proxy), stopped with the rest."""
        directory = self._dir(name)
        proc = ManagedProcess(name, argv, log_path=directory / f"{name}.log", cwd=directory,
                              **options)
        self.started.append(proc)
        return proc.start()

    # -- the end -------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop everything (reverse start order), release ports, write ``summary.json``."""
        summary = []
        if self._sipp is not None:  # SIPp runs are clients of what the test started before them
            for sp in self._sipp.processes:
                result = sp.stop()
                summary.append({"name": sp.process.name, "returncode": result.returncode,
                                "successful": result.successful, "failed": result.failed})
        for item in reversed(self.started):
            try:
                rc = item.stop()
            except Exception as exc:
                rc = None
                self.stop_errors.append(f"{item.name}: {type(exc).__name__}: {exc}")
            entry: dict[str, Any] = {"name": item.name, "returncode": rc}
            if isinstance(item, Baresip) and item.ctrl is not None:
                events = [{k: v for k, v in e.items() if k != "_t"} for e in item.ctrl.events]
                (item.directory / "events.json").write_text(json.dumps(events, indent=1))
                entry["events"] = [e.get("type") for e in events]
            summary.append(entry)
        self.started.clear()
        self.pool.release()
        (self.run_dir / "summary.json").write_text(json.dumps(
            {"processes": summary, "stop_errors": self.stop_errors}, indent=1))
        return self.stop_errors

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def keep_artifacts(run_dir: Path, dest: Path, *, max_file_bytes: int = 2 << 20) -> Path:
    """Copy a run directory for a failed test: regular files only (no FIFOs, which would block,
    nor sockets), each cut to ``max_file_bytes`` (SIPp error logs can reach many MB)."""
    for src in sorted(run_dir.rglob("*")):
        rel = src.relative_to(run_dir)
        try:
            mode = src.lstat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(mode):
            (dest / rel).mkdir(parents=True, exist_ok=True)
        elif stat.S_ISREG(mode):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as fin, open(dest / rel, "wb") as fout:
                fout.write(fin.read(max_file_bytes))
                if fin.read(1):
                    fout.write(b"\n[... cut by the harness ...]\n")
    return dest
