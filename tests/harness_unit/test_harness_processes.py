"""Process handling: bounded stops, log waits, port readiness, artifacts, the daemon wrapper."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from harness.daemon import FreecallDaemon, deep_merge
from harness.ports import PortAllocator, PortPool
from harness.proc import (
    HarnessTimeout,
    LogWatcher,
    ManagedProcess,
    port_listening,
    wait_port,
    wait_until,
)
from harness.session import Harness, keep_artifacts


def test_stop_is_bounded_even_when_sigterm_is_ignored(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           "print('up', flush=True); time.sleep(60)"
    proc = ManagedProcess("stubborn", [sys.executable, "-c", code],
                          log_path=tmp_path / "p.log").start()
    LogWatcher(proc.log_path).wait_for("up", 10, process=proc)
    t = time.monotonic()
    rc = proc.stop(timeout=0.5)
    assert rc == -signal.SIGKILL
    assert time.monotonic() - t < 3
    assert not proc.alive()
    assert proc.stop() == rc  # idempotent


def test_process_output_and_exit(tmp_path: Path) -> None:
    proc = ManagedProcess("echo", [sys.executable, "-c", "print('hello'); raise SystemExit(3)"],
                          log_path=tmp_path / "e.log").start()
    assert proc.wait(10) == 3
    assert "hello" in proc.log_text()
    assert "exited with 3" in proc.describe_exit()


def test_log_watcher_cursor_and_failure(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    log.write_text("Call 1 connected.\nCall 1 ended\n")
    w = LogWatcher(log)
    assert w.wait_for(r"Call (\d+) connected", 1).group(1) == "1"
    with pytest.raises(HarnessTimeout, match="timed out"):
        w.wait_for("connected", 0.2)  # already consumed: waits for a new one
    w.cursor = 0
    with pytest.raises(AssertionError, match="'ended' while waiting"):
        w.wait_for("never", 5, fail="ended")
    w.mark()
    with log.open("a") as f:
        f.write("Call 2 connected.\n")
    assert w.wait_for(r"Call (\d+) connected", 1).group(1) == "2"


def test_wait_until() -> None:
    values = iter([0, 0, 7])
    assert wait_until(lambda: next(values), 5, interval=0.01) == 7
    with pytest.raises(HarnessTimeout, match="the moon"):
        wait_until(lambda: False, 0.1, message="the moon")


def test_port_listening() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
        u.bind(("127.0.0.1", 0))
        t.bind(("127.0.0.1", 0))
        uport, tport = u.getsockname()[1], t.getsockname()[1]
        assert port_listening(uport, "udp")
        assert not port_listening(tport, "tcp")  # bound, not listening
        t.listen()
        assert port_listening(tport, "tcp")
        wait_port(uport, "udp", 1)


def test_wait_port_fails_fast_when_the_process_dies(tmp_path: Path) -> None:
    proc = ManagedProcess("dies", [sys.executable, "-c", "print('boom')"],
                          log_path=tmp_path / "d.log").start()
    t = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)never opened.*boom"):
        wait_port(1, "udp", 10, proc)
    assert time.monotonic() - t < 5


def test_keep_artifacts_skips_fifos_and_cuts_big_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "ua").mkdir(parents=True)
    (run / "ua" / "log.txt").write_text("x" * 100)
    os.mkfifo(run / "ua" / "in")
    dest = keep_artifacts(run, tmp_path / "kept", max_file_bytes=10)
    assert (dest / "ua" / "log.txt").read_text().startswith("x" * 10 + "\n[... cut")
    assert not (dest / "ua" / "in").exists()


FAKE_DAEMON = """
import socket, sys, time, yaml
args = sys.argv[1:]
cfg = yaml.safe_load(open(args[args.index("-c") + 1]))
host, port = cfg["sip"]["listen"][0].split(":")[1:]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((host, int(port)))
t = socket.socket(); t.bind((host, int(port))); t.listen()
c = socket.socket(); c.bind(tuple(cfg["control"]["listen"].split(":")[:1]) +
                            (int(cfg["control"]["listen"].split(":")[1]),)); c.listen()
print("fake daemon up", args, flush=True)
print("freecall 0.0 node n1 listening on udp", flush=True)  # the real one's start-up line
time.sleep(60)
"""


def test_daemon_wrapper_with_a_fake_daemon(tmp_path: Path) -> None:
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE_DAEMON)
    alloc = PortAllocator(lock_dir=tmp_path / "locks")
    with Harness(tmp_path / "run", alloc) as h:
        node = h.daemon("n1", users={"alice": "pw"}, domains=["example.org"],
                        config={"security": {"policy": "require"}},
                        command=[sys.executable, str(fake), "run"])
        assert node.sip_addr.port == node.sip_port and str(node.sip_addr).startswith("127.0.0.1:")
        cfg = node.config_dict()
        assert cfg["users"] == {"alice": {"password": "pw"}}
        assert cfg["security"] == {"policy": "require"}
        assert cfg["sip"]["domains"] == ["example.org"]
        assert "--state-dir" in node.log_text()
    assert not node.process or not node.process.alive()
    assert (tmp_path / "run" / "summary.json").exists()


def test_daemon_config_errors_surface_before_start(tmp_path: Path) -> None:
    from freecall.config import ConfigError

    pool = PortPool(PortAllocator(lock_dir=tmp_path / "locks"))
    node = FreecallDaemon("n", directory=tmp_path / "n", ports=pool,
                          config={"security": {"policy": "maybe"}})
    with pytest.raises(ConfigError, match=r"security\.policy"):
        node.start()
    pool.release()


def test_deep_merge() -> None:
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [2]}, "e": 3}) == {"a": {"b": 1, "c": [2]}, "d": 1, "e": 3}
    assert base == {"a": {"b": 1, "c": [1]}, "d": 1}


def test_names_are_unique_per_test(tmp_path: Path) -> None:
    with Harness(tmp_path / "run", PortAllocator(lock_dir=tmp_path / "locks")) as h:
        h.process("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"])
        with pytest.raises(ValueError, match="unique"):
            h.process("sleeper", ["true"])
        started = h.started[0]
    assert isinstance(started, ManagedProcess) and not started.alive()
