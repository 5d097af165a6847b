"""A datagram transport whose socket is read in C (`freecall.srtp._hop.Reader`), for media.

uvloop's datagram transport reads a socket until it is empty, so a media socket that gets 50
packets a second mostly ends each wake-up in a failing ``recvmsg``, and it makes a bytes
object and an address tuple for every datagram before calling the protocol. This transport
owns a plain non-blocking UDP socket instead and registers a C `Reader` with
``loop.add_reader``: one ``recvmmsg`` per wake-up in the common case, and a C hop (a secure
stream's `Hop` installed as the protocol's ``datagram_received``) runs on the Reader's buffer
with no Python object at all. Everything else reaches the protocol as the loop's own
transport would deliver it (``datagram_received(bytes, (host, port))``, ``error_received``,
``connection_lost``), so the bridge does not know which transport it has
(docs/performance.md, "Secure media (issue 6)").

Works on any loop with ``add_reader`` (uvloop, asyncio's selector loops).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from freecall.srtp import _hop

Addr = tuple[Any, ...]


class NativeDatagramTransport(asyncio.DatagramTransport):
    """The part of `asyncio.DatagramTransport` the media bridge, ZRTP and ICE use.

    Sends go straight to ``socket.sendto``; a send the kernel refuses (``EAGAIN`` included:
    media is not queued, late audio is worse than none, and ZRTP retransmits) goes to the
    protocol's ``error_received``, where asyncio's transport would buffer ``EAGAIN``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.DatagramProtocol,
        *,
        batch: int = 16,
        limit: int = 64,
        routes: dict[int, _hop.Hop] | None = None,
    ) -> None:
        """Take ``sock`` (bound, UDP) and start reading it at once: ``limit`` datagrams at
        most per wake-up, ``batch`` per ``recvmmsg``. Calls ``protocol.connection_made``.
        ``routes`` (``_hop.route_key(source)`` to a hop) serves a socket shared by several
        sources; the others reach the protocol. Raises `NotImplementedError` where the loop
        has no ``add_reader``."""
        super().__init__({"socket": sock, "sockname": sock.getsockname(), "peername": None})
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._closing = False
        self._reader = _hop.Reader(self._fd, protocol, batch=batch, limit=limit, routes=routes)
        loop.add_reader(self._fd, self._reader)
        protocol.connection_made(self)

    @property
    def reader(self) -> _hop.Reader:
        return self._reader

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if self._closing:
            return
        try:
            if addr is None:
                self._sock.send(data)
            else:
                self._sock.sendto(data, addr)
        except OSError as exc:
            self._protocol.error_received(exc)

    def close(self) -> None:
        """Stop reading now (also in the middle of a wake-up), then, on the next loop turn,
        ``connection_lost(None)`` and close the socket, as asyncio's transports do."""
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        self._reader.close()
        self._loop.call_soon(self._lost)

    def _lost(self) -> None:
        try:
            self._protocol.connection_lost(None)
        finally:
            self._sock.close()

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.DatagramProtocol)
        self._protocol = protocol
        if not self._closing:
            self._reader.protocol = protocol

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        return f"<NativeDatagramTransport fd={self._fd} {state}>"
