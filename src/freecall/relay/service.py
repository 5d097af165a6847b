"""The relay's asyncio edge: sockets around :class:`~freecall.relay.server.RelayServer`.

All the asyncio there is: non-blocking UDP sockets read with ``loop.add_reader`` (a readable
socket is drained in one go, then everything the core produced is sent), and one
``loop.call_at`` timer re-armed from ``get_timer()``. Plain sockets rather than
``DatagramProtocol`` objects: one allocation is one more socket, and reading a batch per wake-up
is what keeps relaying cheap (bench/relay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Callable

from freecall.config import PortRange

from .server import Addr, RelayServer, TurnSettings

__all__ = ["RelayService", "SocketPorts"]

log = logging.getLogger("freecall.relay")

BATCH = 256  # datagrams read per wake-up before the loop gets a turn
SOCKET_BUFFER = 1 << 21  # per socket; media bursts must not overflow the kernel queue
MAX_DATAGRAM = 65535


def _tune(sock: socket.socket) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


class SocketPorts:
    """:class:`~freecall.relay.server.RelayPorts` on real sockets: one per allocation, on a
    random free port of ``relay.ports`` (random so relayed addresses are not guessable)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        bind_host: str,
        public_host: str,
        ports: PortRange,
        on_readable: Callable[[Addr, socket.socket], None],
        rng: random.Random | None = None,
    ) -> None:
        self.loop = loop
        self.bind_host = bind_host
        self.public_host = public_host
        self.range = ports
        self.on_readable = on_readable
        self.rng = rng or random.SystemRandom()
        self.sockets: dict[Addr, socket.socket] = {}

    def _bind(self, port: int) -> socket.socket | None:
        family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((self.bind_host, port))
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)
        _tune(sock)
        return sock

    def open(self, family: int, even: bool) -> Addr | None:
        first, size = self.range.first, len(self.range)
        start = self.rng.randrange(size)
        for i in range(size):
            port = first + (start + i) % size
            if even and port % 2:
                continue
            if (self.public_host, port) in self.sockets:
                continue
            sock = self._bind(port)
            if sock is None:
                continue
            key = (self.public_host, port)
            self.sockets[key] = sock
            self.loop.add_reader(sock.fileno(), self.on_readable, key, sock)
            return key
        return None

    def close(self, relayed: Addr) -> None:
        sock = self.sockets.pop(relayed, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def close_all(self) -> None:
        for key in list(self.sockets):
            self.close(key)


class RelayService:
    """STUN and TURN on one UDP address (``relay.listen``), relayed ports in ``relay.ports``."""

    def __init__(
        self,
        settings: TurnSettings,
        listen: tuple[str, int],
        public_host: str,
        ports: PortRange,
    ) -> None:
        self.settings = settings
        self.listen = listen
        self.public_host = public_host
        self.port_range = ports
        self.core: RelayServer | None = None
        self.ports: SocketPorts | None = None
        self.bound: Addr | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None

    async def start(self) -> Addr:
        """Bind ``listen``; returns the bound address (port 0 picks one)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        _tune(sock)
        self._sock = sock
        bound = sock.getsockname()
        self.bound = (str(bound[0]), int(bound[1]))
        self.ports = SocketPorts(loop, host, self.public_host, self.port_range,
                                 self._on_relayed_readable)
        self.core = RelayServer(self.settings, self.ports, family=6 if ":" in host else 4)
        loop.add_reader(sock.fileno(), self._on_readable)
        return self.bound

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.ports is not None:
            self.ports.close_all()
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    # -- reading ----------------------------------------------------------------------------
    def _on_readable(self) -> None:
        sock, core, loop = self._sock, self.core, self._loop
        if sock is None or core is None or loop is None:
            return
        now = loop.time()
        recv, receive = sock.recvfrom, core.receive
        for _ in range(BATCH):
            try:
                data, addr = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # an ICMP error reported on the socket: nothing to read
                continue
            receive(data, (addr[0], addr[1]), now)
        self._flush()

    def _on_relayed_readable(self, key: Addr, sock: socket.socket) -> None:
        core, loop = self.core, self._loop
        if core is None or loop is None:
            return
        now = loop.time()
        recv, receive = sock.recvfrom, core.receive_relayed
        for _ in range(BATCH):
            try:
                data, addr = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            receive(key, data, (addr[0], addr[1]), now)
        self._flush()

    # -- sending and the timer -----------------------------------------------------------
    def _flush(self) -> None:
        core, ports, listen = self.core, self.ports, self._sock
        if core is None or ports is None or listen is None:
            return
        sockets = ports.sockets
        for relayed, data, dest in core.datagrams_to_send():
            sock = listen if relayed is None else sockets.get(relayed)
            if sock is None:
                continue
            try:
                sock.sendto(data, dest)
            except OSError:  # a full buffer or an unreachable peer: UDP drops
                core.stats.dropped += 1
        self._arm()

    def _arm(self) -> None:
        core, loop = self.core, self._loop
        if core is None or loop is None:
            return
        deadline = core.get_timer()
        if deadline == self._deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadline = deadline
        if deadline is not None:
            self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._deadline = None
        if self.core is not None and self._loop is not None:
            self.core.handle_timer(self._loop.time())
        self._flush()
