"""Real DNS servers for tests: dnsmasq on loopback with records from the test, and a black hole.

A test reads::

    zone = (DnsZone()
            .host("sip1.example.test", "127.0.0.1")
            .srv("_sip._udp.example.test", "sip1.example.test", 5070, priority=10)
            .naptr("example.test", 10, 10, "s", "SIP+D2U", replacement="_sip._udp.example.test")
            .enum("+15550100", "sip:bob@example.test"))
    with Dnsmasq(run_dir, port, zone) as server:
        ...  # ask 127.0.0.1:port; server.queries("example.test", "NAPTR") counts what it saw

dnsmasq (Debian package ``dnsmasq-base``, see scripts/debian-packages.txt) runs in the foreground
as a managed process (bounded start and stop, killed with the test runner), reads no system file
(``--conf-file=/dev/null --no-resolv --no-hosts``), listens on 127.0.0.1 only, and is
*authoritative* for the test zones (``--auth-zone``): negative answers then carry an SOA, so
resolvers can cache them as RFC 2308 says; every TTL, the SOA minimum included, is ``ttl``;
queries for other names are REFUSED.  A second instance with ``DnsZone(zones=())`` is a plain
recursive resolver: it forwards with :meth:`DnsZone.forward`, e.g. one domain to a
:class:`BlackHoleDns` (that domain hangs) and everything else to the authoritative instance::

    resolver = DnsZone(zones=()).forward("slow.invalid", hole.address).forward("", auth.address)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from .proc import ManagedProcess, wait_port, wait_until
from .session import MissingTool

DNSMASQ = "/usr/sbin/dnsmasq"


def dnsmasq_binary() -> str:
    path = DNSMASQ if os.access(DNSMASQ, os.X_OK) else shutil.which("dnsmasq")
    if path is None:
        raise MissingTool("dnsmasq is not installed (package dnsmasq-base, "
                          "see scripts/debian-packages.txt)")
    return path


@dataclass
class DnsZone:
    """Records for dnsmasq, built by chained calls; ``zones`` are served authoritatively."""

    zones: tuple[str, ...] = ("test", "e164.arpa")
    args: list[str] = field(default_factory=list)

    def host(self, name: str, *addresses: str) -> DnsZone:
        """A and/or AAAA records (``--host-record``)."""
        self.args.append(f"--host-record={name},{','.join(addresses)}")
        return self

    def srv(self, name: str, target: str, port: int, *, priority: int = 0,
            weight: int = 0) -> DnsZone:
        """An SRV record, ``name`` being ``_service._proto.domain`` (``--srv-host``)."""
        self.args.append(f"--srv-host={name},{target},{port},{priority},{weight}")
        return self

    def naptr(self, name: str, order: int, preference: int, flags: str, service: str,
              regexp: str = "", replacement: str = "") -> DnsZone:
        """A NAPTR record (``--naptr-record``); commas are not allowed in the fields."""
        for value in (flags, service, regexp, replacement):
            if "," in value:
                raise ValueError(f"dnsmasq cannot hold a comma in a NAPTR field: {value!r}")
        fields = [name, str(order), str(preference), flags, service, regexp]
        if replacement:
            fields.append(replacement)
        self.args.append("--naptr-record=" + ",".join(fields))
        return self

    def enum(self, number: str, uri: str, *, order: int = 100, preference: int = 10,
             suffix: str = "e164.arpa", service: str = "E2U+sip") -> DnsZone:
        """A terminal ENUM rule (RFC 6116) for an E.164 number: ``!^.*$!<uri>!``."""
        digits = [d for d in number if d.isdigit()]
        domain = ".".join(reversed(digits)) + "." + suffix
        return self.naptr(domain, order, preference, "u", service, f"!^.*$!{uri}!")

    def forward(self, domain: str, server: tuple[str, int]) -> DnsZone:
        """Send queries for ``domain`` to another server; ``domain=""``: every other query.
        Only for a recursive instance (``zones=()``): an authoritative one refuses the rest."""
        host, port = server
        self.args.append(f"--server=/{domain}/{host}#{port}" if domain else
                         f"--server={host}#{port}")
        return self


_QUERY_RE = re.compile(r"(?:query|auth)\[(?P<type>[A-Z0-9]+)\] (?P<name>\S+) from")


class Dnsmasq:
    """dnsmasq serving a :class:`DnsZone` on ``127.0.0.1:port`` (see the module docstring)."""

    def __init__(self, run_dir: Path, port: int, zone: DnsZone, *, ttl: int = 60,
                 name: str = "dnsmasq") -> None:
        self.run_dir = run_dir
        self.port = port
        self.zone = zone
        self.ttl = ttl
        self.name = name
        self.log_path = run_dir / f"{name}.log"
        self.process: ManagedProcess | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def argv(self) -> list[str]:
        auth: list[str] = []
        if self.zone.zones:
            first = self.zone.zones[0]
            auth = [
                # every query on 127.0.0.1 is answered authoritatively (negative answers carry
                # the SOA); names outside the zones are REFUSED
                f"--auth-server=ns.{first},127.0.0.1",
                *(f"--auth-zone={z}" for z in self.zone.zones),
                f"--auth-ttl={self.ttl}",
                f"--auth-soa=1,hostmaster.{first},1200,120,1209600",
            ]
        return [
            dnsmasq_binary(),
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--pid-file=",
            "--user=",
            "--log-queries",
            "--log-facility=-",
            *auth,
            f"--local-ttl={self.ttl}",
            *self.zone.args,
        ]

    def start(self, timeout: float = 5.0) -> Dnsmasq:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(self.name, self.argv(), log_path=self.log_path).start()
        wait_port(self.port, "udp", timeout, self.process)
        wait_until(lambda: "started" in self.process_log(), timeout,
                   message=f"{self.name} to log its start")
        return self

    def process_log(self) -> str:
        return self.process.log_text() if self.process is not None else ""

    def queries(self, name: str | None = None, rdtype: str | None = None) -> int:
        """How many queries dnsmasq logged, for ``name`` and/or ``rdtype`` if given."""
        count = 0
        for m in _QUERY_RE.finditer(self.process_log()):
            if name is not None and m.group("name").lower() != name.lower().rstrip("."):
                continue
            if rdtype is not None and m.group("type") != rdtype.upper():
                continue
            count += 1
        return count

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.process is None:
            return None
        return self.process.stop(timeout)

    def __enter__(self) -> Dnsmasq:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class BlackHoleDns:
    """A DNS server that never answers: a UDP socket on loopback that nobody reads (queries
    stay in the kernel's buffer until :meth:`received` drains and counts them)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.setblocking(False)
        self._count = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def received(self) -> int:
        """Queries received so far."""
        while True:
            try:
                self.sock.recv(4096)
            except (BlockingIOError, OSError):
                return self._count
            self._count += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> BlackHoleDns:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["BlackHoleDns", "DnsZone", "Dnsmasq", "dnsmasq_binary"]
