"""The control API: JSON over HTTP on loopback (bearer token) and on a Unix socket (no token).

Resources and shapes are fixed by docs/CONTRACT.md and described with examples in docs/api.md.
The server is asyncio streams plus the strict reader of ``http.py``: every connection has a
deadline per request (a slow or silent peer is cut off), the number of connections is capped,
and anything unparseable is answered with a 4xx and closed. Requests from addresses outside
``control.allow_from`` (loopback by default) are refused before the token is even looked at,
so binding ``control.listen`` wider does not by itself open the API to the network.

What the API shows and does comes from a :class:`Backend` (``service.py`` binds it to the
daemon; tests may bind it to anything). The dashboard's static files are served at ``/``
without a token: they hold no data, and the page asks for the token (URL fragment).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from .http import HttpError, HttpRequest, RequestParser, render_response
from .model import EventBus

log = logging.getLogger("freecall.control")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"),
                                   ipaddress.ip_network("::1/128"))

JSON = "application/json"
API_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"))
PAGE_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),  # the event stream URL carries the token
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
     "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
)
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png",
                ".svg": "image/svg+xml"}


class ApiError(Exception):
    """A request the backend cannot carry out: ``status`` and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class KeysProvider(Protocol):
    """The OpenPGP key store behind ``/api/keys`` (issue 7 plugs the GnuPG store in).

    Each method may raise :class:`ApiError` (e.g. 400 for a malformed fingerprint). The
    key-store methods are coroutines: GnuPG blocks, so they run on the store's worker and the
    event loop serves other requests (and calls) meanwhile.
    """

    async def list_keys(self) -> list[dict[str, Any]]:
        """Known peer keys: ``[{address, fingerprint, trust, ...}]``."""

    async def trust(self, address: str, fingerprint: str) -> dict[str, Any]:
        """Pin ``fingerprint`` for ``address``; the resulting key entry."""

    async def forget(self, address: str) -> dict[str, Any]:
        """Drop what is known about ``address``; what was removed."""

    def own_fingerprint(self) -> str | None:
        """This node's (or user's) signing key, shown in ``/api/status``."""


class Backend(Protocol):
    """What the API serves and acts on (``service.ControlService`` for the daemon)."""

    bus: EventBus

    def status(self) -> dict[str, Any]: ...
    def registrations(self) -> list[dict[str, Any]]: ...
    def peers(self) -> list[dict[str, Any]]: ...
    def calls(self) -> list[dict[str, Any]]: ...
    def call(self, call_id: str) -> dict[str, Any] | None: ...
    def hang_up(self, call_id: str) -> dict[str, Any]: ...
    def confirm_sas(self, call_id: str, verified: bool) -> dict[str, Any]: ...
    def keys(self) -> KeysProvider | None: ...
    def reload(self) -> dict[str, Any]: ...
    def metrics(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one peer can hold: tests shrink them, nothing else needs to."""

    request_timeout: float = 10.0  # the whole of one request (head and body), from its start
    idle_timeout: float = 30.0  # a kept-alive connection with no next request
    max_connections: int = 64
    heartbeat: float = 15.0  # SSE comment lines keep proxies and dead peers honest
    read_size: int = 16 * 1024


def allowed_peer(host: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in networks)


def load_or_create_token(path: Path) -> str:
    """The bearer token: read it, or create it (mode 0600, atomically) on first start."""
    from ..storage import atomic_write  # noqa: PLC0415 -- keeps this module light for tests

    try:
        token = path.read_text().strip()
        if len(token) >= 32:
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                path.chmod(0o600)
            return token
    except FileNotFoundError:
        pass
    token = os.urandom(32).hex()
    atomic_write(path, (token + "\n").encode(), 0o600)
    return token


class ControlServer:
    """HTTP on ``listen`` (token) and on ``socket_path`` (no token), one API (module doc)."""

    def __init__(
        self,
        backend: Backend,
        *,
        token: str,
        listen: tuple[str, int] | None,
        socket_path: Path | None,
        allow_from: Sequence[IPNetwork] = LOOPBACK,
        limits: Limits | None = None,
    ) -> None:
        self.backend = backend
        self.token = token.encode()
        self.listen = listen
        self.socket_path = socket_path
        self.allow_from = tuple(allow_from)
        self.limits = limits or Limits()
        self.servers: list[asyncio.Server] = []
        self.bound: list[str] = []
        self.http_port: int | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._static = _static_files()
        self.refused = 0
        self.requests = 0

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> list[str]:
        if self.socket_path is not None:
            await self._start_unix(self.socket_path)
        if self.listen is not None:
            host, port = self.listen
            if not allowed_peer(host, LOOPBACK):
                log.warning("control API listens beyond loopback (%s:%d); it answers only "
                            "requests from %s, with the token", host, port,
                            ", ".join(map(str, self.allow_from)))
            server = await asyncio.start_server(
                functools_partial(self._serve, False), host, port, reuse_address=True,
                limit=self.limits.read_size)
            self.servers.append(server)
            sockname = server.sockets[0].getsockname()
            self.http_port = int(sockname[1])
            self.bound.append(f"http://{_format_host(host)}:{self.http_port}")
        return self.bound

    async def _start_unix(self, path: Path) -> None:
        """Bind the Unix socket with mode 0600 from the first instant (umask), replacing a
        stale socket file but never a live one or anything that is not a socket."""
        if len(os.fsencode(path)) >= 108:  # sun_path (Linux): a clear message, not EINVAL
            raise OSError(f"{path}: too long for a Unix socket (107 bytes at most); set "
                          "control.socket to a shorter path")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise OSError(f"{path} exists and is not a socket")
            if _socket_alive(path):
                raise OSError(f"{path}: another daemon is serving this state directory")
            path.unlink()
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(
                functools_partial(self._serve, True), str(path), limit=self.limits.read_size)
        finally:
            os.umask(old)
        path.chmod(0o600)
        self.servers.append(server)
        self.bound.append(f"unix:{path}")

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        self.backend.bus.close()
        for writer in list(self._connections):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
        self.servers.clear()

    # -- connections --------------------------------------------------------------------------
    async def _serve(self, unix: bool, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._connections.add(writer)
        try:
            await self._connection(unix, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug must cost one connection, never the daemon
            log.exception("control API connection failed")
        finally:
            self._connections.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            await _linger(reader, writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _connection(self, unix: bool, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if len(self._connections) > self.limits.max_connections:
            await self._send(writer, _error(503, "too many connections", keep_alive=False))
            return
        if not unix:
            peer = writer.get_extra_info("peername")
            host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            if not allowed_peer(host, self.allow_from):
                self.refused += 1
                log.warning("control API: refused a connection from %s (not in "
                            "control.allow_from)", host)
                await self._send(writer, _error(403, "this address may not use the control "
                                                "API (control.allow_from)", keep_alive=False))
                return
        parser = RequestParser()
        first = True
        while True:
            try:
                request = await self._read_request(reader, parser, first)
            except HttpError as error:
                await self._send(writer, _error(error.status, error.reason, keep_alive=False))
                return
            if request is None:
                return
            first = False
            self.requests += 1
            keep = request.keep_alive
            if request.path == "/api/events" and request.method == "GET":
                if not self._authorized(request, unix):
                    await self._send(writer, _unauthorized(keep_alive=False))
                    return
                await self._events(request, reader, writer)
                return
            response = await self._respond(request, unix, keep)
            await self._send(writer, response)
            if not keep:
                return

    async def _read_request(self, reader: asyncio.StreamReader, parser: RequestParser,
                            first: bool) -> HttpRequest | None:
        """The next request, or None when the peer closed or idled out between requests."""
        request = parser.next_request()
        if request is not None:
            return request
        limits = self.limits
        if parser.buffered == 0:
            try:  # waiting for the first byte of the next request
                async with asyncio.timeout(limits.request_timeout if first
                                           else limits.idle_timeout):
                    data = await reader.read(limits.read_size)
            except TimeoutError:
                if first:
                    raise HttpError(408, "no request") from None
                return None
            if not data:
                return None
            parser.feed(data)
        try:
            async with asyncio.timeout(limits.request_timeout):
                while (request := parser.next_request()) is None:
                    data = await reader.read(limits.read_size)
                    if not data:
                        raise HttpError(400, "connection closed inside a request")
                    parser.feed(data)
        except TimeoutError:
            raise HttpError(408, "request not completed in time") from None
        return request

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        async with asyncio.timeout(self.limits.request_timeout):
            await writer.drain()

    def _authorized(self, request: HttpRequest, unix: bool) -> bool:
        if unix:
            return True
        supplied: str | None = None
        auth = request.header("authorization")
        if auth is not None and auth[:7].lower() == "bearer ":
            supplied = auth[7:].strip()
        elif request.path == "/api/events":  # EventSource cannot set headers
            supplied = request.query.get("token")
        if not supplied:
            return False
        return hmac.compare_digest(supplied.encode("utf-8", "replace"), self.token)

    # -- requests -----------------------------------------------------------------------------
    async def _respond(self, request: HttpRequest, unix: bool, keep: bool) -> bytes:
        path, method = request.path, request.method
        if not path.startswith("/api/") and path != "/metrics":
            return self._static_response(request, keep)
        if not self._authorized(request, unix):
            return _unauthorized(keep_alive=keep)
        try:
            if path == "/metrics":
                _only(method, "GET")
                body = self.backend.metrics().encode()
                return render_response(200, body, content_type="text/plain; version=0.0.4",
                                       headers=API_HEADERS, keep_alive=keep)
            result = await self._route(method, path, request)
        except ApiError as error:
            return _error(error.status, error.message, keep_alive=keep,
                          allow=getattr(error, "allow", None))
        except HttpError as error:
            return _error(error.status, error.reason, keep_alive=keep)
        return _json(200, result, keep_alive=keep)

    async def _route(self, method: str, path: str, request: HttpRequest) -> Any:
        backend = self.backend
        parts = path.strip("/").split("/")[1:]  # after "api"
        match parts:
            case ["status"]:
                _only(method, "GET")
                return backend.status()
            case ["registrations"]:
                _only(method, "GET")
                return backend.registrations()
            case ["peers"]:
                _only(method, "GET")
                return backend.peers()
            case ["calls"]:
                _only(method, "GET")
                return backend.calls()
            case ["calls", call_id]:
                _only(method, "GET")
                found = backend.call(call_id)
                if found is None:
                    raise ApiError(404, f"no call {call_id}")
                return found
            case ["calls", call_id, "hangup"]:
                _only(method, "POST")
                return backend.hang_up(call_id)
            case ["calls", call_id, "confirm-sas"]:
                _only(method, "POST")
                body = _body(request)
                verified = body.get("verified", True)
                if not isinstance(verified, bool):
                    raise ApiError(400, '"verified" must be true or false')
                return backend.confirm_sas(call_id, verified)
            case ["keys"]:
                _only(method, "GET")
                keys = backend.keys()
                return [] if keys is None else await keys.list_keys()
            case ["keys", "trust"]:
                _only(method, "POST")
                body = _body(request)
                address, fingerprint = body.get("address"), body.get("fingerprint")
                if not isinstance(address, str) or not isinstance(fingerprint, str):
                    raise ApiError(400, 'expected {"address": "...", "fingerprint": "..."}')
                return await _keys(backend).trust(address, fingerprint)
            case ["keys", "forget"]:
                _only(method, "POST")
                address = _body(request).get("address")
                if not isinstance(address, str):
                    raise ApiError(400, 'expected {"address": "..."}')
                return await _keys(backend).forget(address)
            case ["reload"]:
                _only(method, "POST")
                return backend.reload()
        raise ApiError(404, f"no resource {path}")

    def _static_response(self, request: HttpRequest, keep: bool) -> bytes:
        name = "index.html" if request.path == "/" else request.path.lstrip("/")
        content = self._static.get(name)
        if content is None:
            return _error(404, f"no resource {request.path}", keep_alive=keep)
        if request.method not in ("GET", "HEAD"):
            return _error(405, "only GET", keep_alive=keep, allow="GET, HEAD")
        body, content_type = content
        response = render_response(200, body, content_type=content_type,
                                   headers=PAGE_HEADERS, keep_alive=keep)
        if request.method == "HEAD":
            return response[: len(response) - len(body)]
        return response

    # -- server-sent events -------------------------------------------------------------------
    async def _events(self, request: HttpRequest, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """``text/event-stream`` until the client leaves, falls behind, or the server stops.

        Each event is ``id: N`` and ``data: {json}`` (the type is inside the JSON, so
        ``onmessage`` sees them all); ``Last-Event-ID`` or ``?since=N`` replays what the
        history still holds.
        """
        since_text = request.header("last-event-id") or request.query.get("since")
        since = int(since_text) if since_text and since_text.isdigit() else None
        sub = self.backend.bus.subscribe(since)
        wake = asyncio.Event()
        sub.wake = wake.set
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
            b"X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n"
            b"retry: 2000\n: freecall events\n\n")
        gone = asyncio.ensure_future(reader.read(1))  # any byte or EOF: the client is done
        try:
            await writer.drain()
            while not sub.closed or sub.queue:
                for event in sub.take():
                    data = json.dumps(event, separators=(",", ":"))
                    writer.write(f"id: {event['id']}\ndata: {data}\n\n".encode())
                if sub.closed:
                    break
                async with asyncio.timeout(self.limits.request_timeout):
                    await writer.drain()
                wake.clear()
                waiter = asyncio.ensure_future(wake.wait())
                done, _ = await asyncio.wait({waiter, gone}, timeout=self.limits.heartbeat,
                                             return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if gone in done:
                    return
                if not done:
                    writer.write(b": keep-alive\n\n")
            if sub.dropped:
                writer.write(b'data: {"type":"dropped","reason":"too slow"}\n\n')
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.drain()
        finally:
            gone.cancel()
            self.backend.bus.unsubscribe(sub)


def functools_partial(
    func: Callable[[bool, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    unix: bool,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """``functools.partial`` with the types asyncio's start_server wants."""

    def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Awaitable[None]:
        return func(unix, reader, writer)

    return handler


class _MethodNotAllowed(ApiError):
    def __init__(self, allow: str) -> None:
        super().__init__(405, f"use {allow}")
        self.allow = allow


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise _MethodNotAllowed(allowed)


def _keys(backend: Backend) -> KeysProvider:
    keys = backend.keys()
    if keys is None:
        raise ApiError(501, "no OpenPGP key store: signing is off (openpgp.sign) or GnuPG failed")
    return keys


def _body(request: HttpRequest) -> dict[str, Any]:
    if not request.body:
        return {}
    try:
        value = json.loads(request.body)
    except (ValueError, RecursionError):
        raise ApiError(400, "body is not JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "body must be a JSON object")
    return value


def _json(status: int, value: Any, *, keep_alive: bool = True) -> bytes:
    body = json.dumps(value, separators=(",", ":")).encode()
    return render_response(status, body, content_type=JSON, headers=API_HEADERS,
                           keep_alive=keep_alive)


def _error(status: int, message: str, *, keep_alive: bool = True,
           allow: str | None = None) -> bytes:
    headers = API_HEADERS + ((("Allow", allow),) if allow else ())
    body = json.dumps({"error": message}).encode()
    return render_response(status, body, content_type=JSON, headers=headers,
                           keep_alive=keep_alive)


def _unauthorized(*, keep_alive: bool) -> bytes:
    body = json.dumps({"error": "missing or wrong token (Authorization: Bearer, see "
                                "control.token in the state directory)"}).encode()
    return render_response(401, body, content_type=JSON,
                           headers=(*API_HEADERS, ("WWW-Authenticate", 'Bearer realm="freecall"')),
                           keep_alive=keep_alive)


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The dashboard, read once from the package (a fixed list: no path ever reaches the
    file system)."""
    out: dict[str, tuple[bytes, str]] = {}
    try:
        root = resources.files("freecall.control").joinpath("web")
        for item in root.iterdir():
            suffix = Path(item.name).suffix
            if item.is_file() and suffix in STATIC_TYPES:
                out[item.name] = (item.read_bytes(), STATIC_TYPES[suffix])
    except (FileNotFoundError, NotADirectoryError, ModuleNotFoundError):
        log.warning("dashboard files are missing from the package")
    return out


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close and read what the peer still sends (briefly, boundedly) before closing:
    closing a socket with unread input sends a reset, which can destroy the answer we just
    wrote (an error response to a request we did not read to its end)."""
    if writer.is_closing():
        return
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(0.5):
            for _ in range(16):
                if not await reader.read(64 * 1024):
                    break


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
