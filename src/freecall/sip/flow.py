"""Where a message came from or goes to: the transport, the peer and the connection.

The protocol cores never touch sockets; they name a :class:`Flow` and the asyncio edge maps it to
a socket (UDP) or a connection (TCP/TLS).  For stream transports a response must go back over the
connection the request came on (RFC 3261 section 18.2.2), hence the connection id.

A flow is an immutable named tuple: several are made for every message (a frozen dataclass
costs three times as much to build), and they compare and hash as values.
"""

from __future__ import annotations

from typing import NamedTuple

Addr = tuple[str, int]

RELIABLE_TRANSPORTS = frozenset({"tcp", "tls", "ws", "wss", "sctp"})


class Flow(NamedTuple):
    """A transport association with one peer."""

    transport: str  # "udp", "tcp", "tls" (lower case)
    remote: Addr
    local: Addr | None = None  # the listener it was received on or must be sent from
    conn: int | None = None  # connection id of a stream transport, when one exists

    @property
    def reliable(self) -> bool:
        return self.transport in RELIABLE_TRANSPORTS

    @property
    def via_transport(self) -> str:
        """The transport token for a Via header (RFC 3261 section 20.42)."""
        return self.transport.upper()

    def __str__(self) -> str:
        host, port = self.remote
        if ":" in host:
            host = f"[{host}]"
        return f"{self.transport}:{host}:{port}"
