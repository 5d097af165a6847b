"""sd_notify without libsystemd: path and abstract sockets, watchdog pings from the loop."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

from freecall.ops.sdnotify import Notifier


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    with tempfile.TemporaryDirectory(prefix="fcn") as directory:
        path = os.path.join(directory, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2)
        yield sock, path
        sock.close()


def test_ready_reloading_stopping_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("serving 1 user")
    fields = sock.recv(4096).decode().split("\n")
    assert "READY=1" in fields and "STATUS=serving 1 user" in fields
    assert f"MAINPID={os.getpid()}" in fields
    notifier.reloading()
    reloading = sock.recv(4096).decode().split("\n")
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert int(reloading[1].split("=")[1]) > 0
    notifier.stopping()
    assert sock.recv(4096).decode().startswith("STOPPING=1")
    notifier.close()


def test_abstract_socket() -> None:
    name = f"freecall-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert sock.recv(100) == b"STATUS=hello"


def test_without_systemd_nothing_is_sent_and_a_dead_socket_is_reported_once(
    tmp_path: object, caplog: pytest.LogCaptureFixture,
) -> None:
    assert not Notifier({}).ready("x")
    assert not Notifier({"NOTIFY_SOCKET": "relative/ignored"}).enabled
    gone = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert not gone.ready("x") and not gone.ready("y")
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


def test_watchdog_pings_at_half_the_interval(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    assert notifier.watchdog_interval == pytest.approx(0.05)
    other = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # meant for another process

    async def run() -> None:
        notifier.start_watchdog(asyncio.get_running_loop())
        await asyncio.sleep(0.23)
        notifier.close()

    asyncio.run(run())
    sock.setblocking(False)
    pings = 0
    while True:
        try:
            assert sock.recv(100) == b"WATCHDOG=1"
        except BlockingIOError:
            break
        pings += 1
    assert 4 <= pings <= 6
