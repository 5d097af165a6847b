"""The control server over real sockets (TCP on loopback and the Unix socket), with a small
in-test backend: authentication, the peer check, file modes, timeouts against slow peers,
garbage, the connection cap and the event stream. The daemon itself is exercised in
tests/interop/test_control.py."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import stat
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from freecall.control.api import (
    ApiError,
    ControlServer,
    KeysProvider,
    Limits,
    load_or_create_token,
)
from freecall.control.model import EventBus
from freecall.gpgverify.service import KeyPaths, SasKeys

TOKEN = "t" * 64


class Backend:
    """Just enough daemon for the server: fixed answers, a real event bus."""

    def __init__(self, keys: KeysProvider | None = None) -> None:
        self.bus = EventBus(lambda: 1_700_000_000.0)
        self.hung_up: list[str] = []
        self.key_store = keys

    def status(self) -> dict[str, Any]:
        return {"version": "test", "node_id": None, "uptime_s": 1.0, "listeners": [],
                "key_fingerprint": None, "role": "endpoint"}

    def registrations(self) -> list[dict[str, Any]]:
        return []

    def peers(self) -> list[dict[str, Any]]:
        return []

    def calls(self) -> list[dict[str, Any]]:
        return [{"id": "c1"}]

    def call(self, call_id: str) -> dict[str, Any] | None:
        return {"id": call_id} if call_id == "c1" else None

    def hang_up(self, call_id: str) -> dict[str, Any]:
        if call_id != "c1":
            raise ApiError(404, "no call")
        self.hung_up.append(call_id)
        return {"id": call_id, "state": "ended"}

    def confirm_sas(self, call_id: str, verified: bool) -> dict[str, Any]:
        return {"id": call_id, "verified": verified}

    def keys(self) -> KeysProvider | None:
        return self.key_store

    def reload(self) -> dict[str, Any]:
        raise ApiError(501, "not yet")

    def metrics(self) -> str:
        return "freecall_up 1\n"




@asynccontextmanager
async def serving(tmp_path: Path, backend: Backend | None = None,
                  **options: Any) -> AsyncIterator[tuple[ControlServer, Backend]]:
    backend = backend or Backend()
    options.setdefault("limits", Limits(request_timeout=0.5, idle_timeout=0.5, heartbeat=0.3))
    server = ControlServer(backend, token=TOKEN, listen=("127.0.0.1", 0),
                           socket_path=tmp_path / "control.sock", **options)
    await server.start()
    try:
        yield server, backend
    finally:
        await server.stop()


async def exchange(server: ControlServer, data: bytes, *, unix: Path | None = None,
                   local: str | None = None) -> bytes:
    """Send raw bytes, read until the server closes (bounded)."""
    if unix is not None:
        reader, writer = await asyncio.open_unix_connection(str(unix))
    else:
        assert server.http_port is not None
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.http_port, local_addr=(local, 0) if local else None)
    writer.write(data)
    await writer.drain()
    try:
        async with asyncio.timeout(5):
            return await reader.read(-1)
    finally:
        writer.close()


def request(method: str, path: str, *, token: str | None = TOKEN, body: Any = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    payload = b"" if body is None else json.dumps(body).encode()
    if payload:
        lines.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def json_of(response: bytes) -> Any:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def test_token_is_required_and_compared(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _):
            assert status_of(await exchange(server, request("GET", "/api/status",
                                                            token=None))) == 401
            wrong = await exchange(server, request("GET", "/api/status", token="t" * 63 + "u"))
            assert status_of(wrong) == 401 and b"WWW-Authenticate: Bearer" in wrong
            assert status_of(await exchange(server, request("GET", "/metrics",
                                                            token="")) ) == 401
            # the query token is for the event stream only (EventSource cannot set headers)
            assert status_of(await exchange(server, request(
                "GET", f"/api/status?token={TOKEN}", token=None))) == 401
            ok = await exchange(server, request("GET", "/api/status"))
            assert status_of(ok) == 200 and json_of(ok)["version"] == "test"
            # the dashboard's files need no token: they hold no data
            page = await exchange(server, request("GET", "/", token=None))
            assert status_of(page) == 200 and b"Content-Security-Policy" in page
            assert status_of(await exchange(server, request("GET", "/../etc/passwd",
                                                            token=None))) == 404
    run(main())


def test_routes_methods_and_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, backend):
            answers = {}
            for method, path, body in [
                ("GET", "/api/calls", None), ("GET", "/api/calls/c1", None),
                ("GET", "/api/calls/zz", None), ("POST", "/api/calls/c1/hangup", None),
                ("GET", "/api/calls/c1/hangup", None),
                ("POST", "/api/calls/c1/confirm-sas", {"verified": False}),
                ("POST", "/api/calls/c1/confirm-sas", {"verified": "yes"}),
                ("GET", "/api/keys", None),
                ("POST", "/api/keys/trust", {"address": "bob@b.test", "fingerprint": "AB"}),
                ("POST", "/api/reload", None), ("GET", "/api/nothing", None),
                ("GET", "/metrics", None),
            ]:
                answers[(method, path, json.dumps(body))] = await exchange(
                    server, request(method, path, body=body))
            statuses = [status_of(a) for a in answers.values()]
            assert statuses == [200, 200, 404, 200, 405, 200, 400, 200, 501, 501, 404, 200]
            assert backend.hung_up == ["c1"]
            assert json_of(answers[("GET", "/api/keys", "null")]) == []
            assert b"Allow: POST" in answers[("GET", "/api/calls/c1/hangup", "null")]
            bad_json = await exchange(server, request("POST", "/api/keys/trust", body=None)
                                      .replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n{x"
                                               b"}"))
            assert status_of(bad_json) == 400
    run(main())


def test_the_unix_socket_needs_no_token_and_only_its_owner_can_use_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _):
            sock = tmp_path / "control.sock"
            mode = sock.stat().st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            answer = await exchange(server, request("GET", "/api/calls", token=None), unix=sock)
            assert status_of(answer) == 200 and json_of(answer) == [{"id": "c1"}]
        assert not sock.exists()  # removed at stop
    run(main())


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    async def main() -> None:
        (tmp_path / "control.sock").write_text("")
        with pytest.raises(OSError, match="not a socket"):
            async with serving(tmp_path):
                pass
        (tmp_path / "control.sock").unlink()
        async with serving(tmp_path):
            second = ControlServer(Backend(), token=TOKEN, listen=None,
                                   socket_path=tmp_path / "control.sock")
            with pytest.raises(OSError, match="another daemon"):
                await second.start()
    run(main())


def test_a_socket_path_too_long_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    async def main() -> None:
        server = ControlServer(Backend(), token=TOKEN, listen=None,
                               socket_path=tmp_path / ("x" * 120) / "control.sock")
        with pytest.raises(OSError, match="too long for a Unix socket"):
            await server.start()
    run(main())


def test_token_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "control.token"
    token = load_or_create_token(path)
    assert len(token) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    assert load_or_create_token(path) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_peers_outside_allow_from_are_refused_even_with_the_token(tmp_path: Path) -> None:
    async def main() -> None:
        only = (ipaddress.ip_network("127.0.0.2/32"),)
        async with serving(tmp_path, allow_from=only) as (server, _):
            refused = await exchange(server, request("GET", "/api/status"))
            assert status_of(refused) == 403 and server.refused == 1
            allowed = await exchange(server, request("GET", "/api/status"), local="127.0.0.2")
            assert status_of(allowed) == 200
    run(main())


def test_slow_silent_and_garbage_peers_are_cut_off(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _):
            loop = asyncio.get_running_loop()
            # silent: 408 after request_timeout
            began = loop.time()
            assert status_of(await exchange(server, b"")) == 408
            assert loop.time() - began < 2.0
            # slowloris: a byte at a time, never finishing the head
            assert server.http_port is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
            began = loop.time()
            answer = b""
            for byte in b"GET /api/status HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                writer.write(bytes([byte]))
                try:
                    answer = await asyncio.wait_for(reader.read(4096), 0.05)
                except TimeoutError:
                    continue
                break
            writer.close()
            assert status_of(answer) == 408 and loop.time() - began < 2.5
            # garbage and oversize: 4xx and closed, and the server still serves
            for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200)
                         + b"\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 5000,
                         os.urandom(3000) + b"\n\n"):
                answer = await exchange(server, junk)
                assert 400 <= status_of(answer) < 500, answer[:80]
            assert status_of(await exchange(server, request("GET", "/api/status"))) == 200
    run(main())


def test_connections_are_capped(tmp_path: Path) -> None:
    async def main() -> None:
        limits = Limits(request_timeout=2.0, idle_timeout=2.0, max_connections=4)
        async with serving(tmp_path, limits=limits) as (server, _):
            assert server.http_port is not None
            held = [await asyncio.open_connection("127.0.0.1", server.http_port)
                    for _ in range(4)]
            await asyncio.sleep(0.1)
            assert status_of(await exchange(server, request("GET", "/api/status"))) == 503
            for _, writer in held:
                writer.close()
            await asyncio.sleep(0.2)
            assert status_of(await exchange(server, request("GET", "/api/status"))) == 200
    run(main())


def test_keep_alive_serves_several_requests_on_one_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, _):
            one = request("GET", "/api/calls").replace(b"Connection: close\r\n", b"")
            answer = await exchange(server, one + one + request("GET", "/api/status"))
            assert answer.count(b"HTTP/1.1 200 OK") == 3
    run(main())


def test_event_stream_with_the_query_token_in_order_and_replayed(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, backend):
            assert status_of(await exchange(server, request(
                "GET", "/api/events?token=wrong", token=None))) == 401
            assert server.http_port is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
            writer.write(request("GET", f"/api/events?token={TOKEN}", token=None))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"200 OK" in head and b"text/event-stream" in head
            for i in range(3):
                backend.bus.publish("peer", n=i)
            got: list[dict[str, Any]] = []
            async with asyncio.timeout(5):
                while len(got) < 3:
                    line = await reader.readline()
                    if line.startswith(b"data: "):
                        got.append(json.loads(line[6:]))
            assert [e["n"] for e in got] == [0, 1, 2]
            assert [e["type"] for e in got] == ["peer"] * 3
            async with asyncio.timeout(2):  # heartbeats keep the stream alive
                while (line := await reader.readline()) != b": keep-alive\n":
                    pass
            writer.close()
            await asyncio.sleep(0.1)
            assert not backend.bus.subscribers  # the stream's end unsubscribed it
            # a reconnection with Last-Event-ID gets what it missed
            replay = request("GET", "/api/events").replace(
                b"\r\n\r\n", b"\r\nLast-Event-ID: 2\r\n\r\n")
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "control.sock"))
            writer.write(replay)
            await writer.drain()
            async with asyncio.timeout(5):
                while not (line := await reader.readline()).startswith(b"data: "):
                    pass
            assert json.loads(line[6:])["n"] == 2
            writer.close()
    run(main())


def test_stop_ends_open_event_streams(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_server, _):
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "control.sock"))
            writer.write(request("GET", "/api/events", token=None))
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
        async with asyncio.timeout(3):
            assert await reader.read(-1) is not None  # EOF, not a hang
        writer.close()
    run(main())


def test_key_requests_run_on_the_gpg_worker_while_the_loop_serves_others(tmp_path: Path) -> None:
    """/api/keys with the real GnuPG store (issue 7): while the store's one gpg worker is busy
    the request waits for it, and the event loop meanwhile answers other requests."""
    async def main() -> None:
        keys = SasKeys(KeyPaths.for_state(tmp_path / "s"), name="s", addresses=["a@a.test"])
        fingerprint = await keys.start()
        gate = threading.Event()
        busy = asyncio.ensure_future(keys._in_worker(gate.wait, 10))  # a long gpg job
        try:
            async with serving(tmp_path, Backend(keys)) as (server, _):
                listing = asyncio.ensure_future(exchange(server, request("GET", "/api/keys")))
                await asyncio.sleep(0.3)
                assert not listing.done()  # queued behind the worker's job
                assert status_of(await exchange(server, request("GET", "/api/status"))) == 200
                gate.set()
                answer = await listing
                assert status_of(answer) == 200
                assert [k["source"] for k in json_of(answer)
                        if k["fingerprint"] == fingerprint] == ["own"]
                trusted = await exchange(server, request(
                    "POST", "/api/keys/trust", body={"address": "b@b.test",
                                                     "fingerprint": "AB" * 20}))
                assert json_of(trusted)["pin"] == "trusted"
        finally:
            gate.set()
            await busy
            await keys.close()

    run(main())
