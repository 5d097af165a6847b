"""The systemd notification protocol (sd_notify(3)), without libsystemd.

``Type=notify`` units learn that the daemon is ready (``READY=1``, sent once every listener is
bound), reloading (``RELOADING=1`` with ``MONOTONIC_USEC``, as systemd 253's
``Type=notify-reload`` wants), stopping (``STOPPING=1``), and that its event loop still turns
(``WATCHDOG=1`` every half ``WATCHDOG_USEC``): a hung loop gets the service restarted. The
messages are datagrams on the Unix socket named by ``$NOTIFY_SOCKET`` (``@`` = the abstract
namespace). Outside systemd the variable is unset and every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger("freecall.systemd")


class Notifier:
    """Sends sd_notify messages when ``$NOTIFY_SOCKET`` is set; a no-op otherwise."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._socket: socket.socket | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of ``KEY=VALUE`` lines; False (logged once) if it cannot be sent."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message, self.address)
        except OSError as error:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd on %s: %s", self.address.lstrip("\0"), error)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping systemd's watchdog from the event loop itself, so a stuck loop stops pings."""
        if self.watchdog_interval is None or not self.enabled:
            return

        def ping() -> None:
            self.send("WATCHDOG=1")
            assert self.watchdog_interval is not None
            self._watchdog = loop.call_later(self.watchdog_interval, ping)

        ping()

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
