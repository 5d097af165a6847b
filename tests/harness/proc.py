"""Processes the harness starts: bounded waits, stopped by PID, never left behind.

Three layers keep a test from leaking processes (which on a shared machine would hold ports and
break the next run):
  1. the fixture's finalizer calls ``stop()`` on every process it started, failure or not;
  2. ``atexit`` stops whatever is still registered when the interpreter exits;
  3. each child runs under ``setpriv --pdeathsig KILL``, so the kernel kills it if the Python
     process dies without running (1) or (2) (SIGKILL, OOM). Caveat: the signal follows the
     *thread* that forked the child, so start processes from the test's own thread.
Children get their own session (``start_new_session``): a Ctrl-C or ``timeout`` aimed at the test
runner's process group does not hit them half-way (gotcha T1); the harness stops them in order.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

_SETPRIV = shutil.which("setpriv")
_LIVE: set[ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


def pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --``: the kernel kills the command when its parent dies.

    For commands run under a wrapper (``timeout CMD``): the wrapper dies with the harness, and the
    command with the wrapper.
    """
    return [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []


class HarnessTimeout(AssertionError):
    """A bounded wait ran out. An AssertionError, so pytest shows it as a test failure."""


def wait_until(
    predicate: Callable[[], T | bool | None],
    timeout: float,
    *,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise HarnessTimeout(f"timed out after {timeout:g} s waiting for {text}")
        time.sleep(interval)


def tail(path: Path, lines: int = 30) -> str:
    """Last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path}: unreadable)"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """A child process with its output in a log file; ``stop()`` is bounded and idempotent."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
        pdeathsig: bool = True,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.stdin = stdin
        self.pdeathsig = pdeathsig and _SETPRIV is not None
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> ManagedProcess:
        if self.popen is not None:
            raise RuntimeError(f"{self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = self.argv
        if self.pdeathsig:
            argv = [*pdeathsig_prefix(), *argv]
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                argv, stdin=self.stdin, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                env=self.env, start_new_session=True, close_fds=True,
            )
        self.started_at = time.monotonic()
        with _LIVE_LOCK:
            _LIVE.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} not started"
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait(self, timeout: float) -> int | None:
        """Exit status, or None if still running after ``timeout`` seconds."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, timeout: float = 5.0, *, sig: int = signal.SIGTERM) -> int | None:
        """``sig``, wait up to ``timeout``, then SIGKILL and reap. Only this PID is signalled."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.send_signal(sig)
            if self.wait(timeout) is None:
                self.send_signal(signal.SIGKILL)
                self.wait(5.0)
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return self.popen.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def describe_exit(self) -> str:
        """For errors: how the process ended and the end of its log."""
        state = "running" if self.alive() else f"exited with {self.returncode}"
        return f"{self.name} ({state}); last lines of {self.log_path}:\n{tail(self.log_path)}"

    def __repr__(self) -> str:
        pid = self.popen.pid if self.popen else None
        return f"<ManagedProcess {self.name} pid={pid} rc={self.returncode}>"


@atexit.register
def _stop_leftovers() -> None:
    with _LIVE_LOCK:
        leftovers = list(_LIVE)
    for proc in leftovers:
        proc.stop(timeout=2.0)


class LogWatcher:
    """Follows a growing log file; ``wait_for`` finds a regex at or after a cursor.

    The cursor lets a test wait for the *next* occurrence (the second call's "connected"),
    not one already seen.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cursor = 0  # character offset into the text read so far

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """Move the cursor to the end: later waits only see new output."""
        self.cursor = len(self.text())
        return self.cursor

    def search(self, pattern: str | re.Pattern[str], *, since: int | None = None,
               advance: bool = True) -> re.Match[str] | None:
        start = self.cursor if since is None else since
        m = re.compile(pattern).search(self.text(), start)
        if m and advance:
            self.cursor = m.end()
        return m

    def wait_for(
        self,
        pattern: str | re.Pattern[str],
        timeout: float,
        *,
        since: int | None = None,
        fail: str | re.Pattern[str] | None = None,
        process: ManagedProcess | None = None,
    ) -> re.Match[str]:
        """Wait for ``pattern``; raise early if ``fail`` matches first or ``process`` exits."""
        start = self.cursor if since is None else since
        ok = re.compile(pattern)
        bad = re.compile(fail) if fail is not None else None
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            m = ok.search(text, start)
            if m:
                self.cursor = m.end()
                return m
            if bad is not None:
                b = bad.search(text, start)
                if b:
                    raise AssertionError(f"{self.path.name}: {b.group(0)!r} while waiting for "
                                         f"{ok.pattern!r}\n{tail(self.path)}")
            if process is not None and not process.alive():
                raise AssertionError(f"{ok.pattern!r} never came: {process.describe_exit()}")
            if time.monotonic() >= deadline:
                raise HarnessTimeout(f"timed out after {timeout:g} s waiting for {ok.pattern!r} "
                                     f"in {self.path}:\n{tail(self.path)}")
            time.sleep(0.05)


def _proc_net_ports(kind: str) -> set[int]:
    ports: set[int] = set()
    for family in ("", "6"):
        try:
            lines = Path(f"/proc/net/{kind}{family}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if kind == "tcp" and state != "0A":  # LISTEN
                continue
            ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def port_listening(port: int, kind: str = "udp") -> bool:
    """True if some socket is bound to ``port`` (UDP) or listening on it (TCP), any address.

    Reads /proc/net directly: no dependency on ``ss`` and no connection attempt that a server
    would log.
    """
    return port in _proc_net_ports(kind)


def wait_port(port: int, kind: str, timeout: float, process: ManagedProcess | None = None) -> None:
    """Wait until ``port`` is bound; fail at once (with its log) if ``process`` exits first."""

    def ready() -> bool:
        if process is not None and not process.alive():
            raise AssertionError(f"{kind} port {port} never opened: {process.describe_exit()}")
        return port_listening(port, kind)

    wait_until(ready, timeout, message=f"{kind} port {port} to listen")
