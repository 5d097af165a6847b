"""Addresses shared by the wrappers (a registrar's, a daemon's)."""

from __future__ import annotations

from typing import Literal, NamedTuple

SipTransport = Literal["udp", "tcp", "tls"]


class SipAddr(NamedTuple):
    """Where a registrar/proxy listens; ``str()`` gives ``host:port`` (``[v6]:port``)."""

    host: str
    port: int
    transport: SipTransport = "udp"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def of(cls, value: str | tuple[str, int] | SipAddr, transport: SipTransport = "udp") -> SipAddr:
        if isinstance(value, SipAddr):
            return value
        if isinstance(value, tuple):
            return cls(value[0], int(value[1]), transport)
        host, _, port = value.rpartition(":")
        return cls(host.strip("[]"), int(port), transport)
