"""The freecall daemon under test: a config on free loopback ports, ``freecall run``, readiness.

Written before the daemon exists, against docs/CONTRACT.md: ``freecall run -c FILE --state-dir
DIR``, the control API on ``control.listen`` with the bearer token in ``<state_dir>/control.token``.
The generated configuration is validated with ``freecall.config`` before the daemon starts, so a
harness mistake shows up as a config error, not as a daemon that never answers.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import socket
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .addr import SipAddr
from .ports import BlockSource
from .proc import ManagedProcess, wait_port, wait_until

MEDIA_NATIVE = os.environ.get("FREECALL_TEST_MEDIA_NATIVE", "auto")
"""``media.native`` of every daemon under test: ``FREECALL_TEST_MEDIA_NATIVE=off`` runs the
suite's calls on the Python media path instead of the C hop (issue 6)."""


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, recursing into mappings (lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def unix_get(state_dir: Path, path: str, timeout: float = 5.0) -> bytes:
    """GET ``path`` on the control Unix socket of the daemon (endpoint or relay) whose state
    directory is ``state_dir`` (``control.sock``, no token): the body, raising on a status
    other than 200. It works across network namespaces (the socket is a file)."""

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(state_dir / "control.sock"))

    conn = _Conn("localhost")
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, f"GET {path}: {response.status} {body[:200]!r}"
        return body
    finally:
        conn.close()


def unix_api(state_dir: Path, path: str, timeout: float = 5.0) -> Any:
    """:func:`unix_get` decoded as JSON."""
    return json.loads(unix_get(state_dir, path, timeout))


def unix_metric(state_dir: Path, name: str, timeout: float = 5.0) -> float:
    """The unlabelled sample ``name`` of ``/metrics`` over the Unix socket; fails if absent."""
    text = unix_get(state_dir, "/metrics", timeout).decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics:\n{text}"
    return float(match.group(1))


class FreecallDaemon:
    """One freecall node on 127.0.0.1 with its own ports and state directory.

    ``sip_addr`` is where softphones register (udp and tcp on the same port); ``public_addr`` the
    node side (udp, tcp; tls on port + 1); ``users`` maps user names to passwords.
    """

    def __init__(
        self,
        name: str,
        *,
        directory: Path,
        ports: BlockSource,
        users: Mapping[str, str] | None = None,
        domains: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        public_host: str = "127.0.0.1",
        netns: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.public_host = public_host  # e.g. 127.0.0.2: each node its own "host" on loopback
        self.directory = directory
        self.users = dict(users or {})
        self.domains = list(domains)
        block = ports.block()
        self.sip_port = block.take(1)
        self.public_port = block.take(2)  # udp+tcp, tls on +1
        self.control_port = block.take(1)
        self.peering_port = block.take(1)
        self.media_ports = block.take_range(20, align=2)
        self.state_dir = directory / "state"
        self.config_path = directory / "freecall.yaml"
        self.log_path = directory / "freecall.log"
        self.extra_config = dict(config or {})
        self.command = list(command) if command is not None else [
            sys.executable, "-m", "freecall", "run"]
        self.env = env
        self.netns = list(netns)  # e.g. ["ip", "netns", "exec", "h1"]: runs on that host
        self.process: ManagedProcess | None = None

    @property
    def sip_addr(self) -> SipAddr:
        return SipAddr("127.0.0.1", self.sip_port, "udp")

    @property
    def public_addr(self) -> SipAddr:
        return SipAddr(self.public_host, self.public_port, "udp")

    @property
    def tls_port(self) -> int:
        return self.public_port + 1

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def config_dict(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "node": {"name": self.name, "state_dir": str(self.state_dir)},
            "sip": {
                "listen": [f"udp:127.0.0.1:{self.sip_port}", f"tcp:127.0.0.1:{self.sip_port}"],
                "public": [f"udp:{self.public_host}:{self.public_port}",
                           f"tcp:{self.public_host}:{self.public_port}",
                           f"tls:{self.public_host}:{self.public_port + 1}"],
                "advertise": self.public_host,
                "domains": self.domains,
            },
            "users": {user: {"password": pw} for user, pw in self.users.items()},
            "peering": {"listen": f"udp:{self.public_host}:{self.peering_port}", "mdns": False},
            "media": {"address": self.public_host,
                      "ports": f"{self.media_ports[0]}-{self.media_ports[1]}",
                      "native": MEDIA_NATIVE},
            "control": {"listen": f"127.0.0.1:{self.control_port}"},
            "log": {"level": "debug", "sip_trace": True},
        }
        return deep_merge(base, self.extra_config)

    def write_config(self) -> Path:
        from freecall.config import parse_config

        self.directory.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.config_dict(), sort_keys=False)
        parse_config(text, source=str(self.config_path))  # raises ConfigError naming the key
        self.config_path.write_text(text)
        return self.config_path

    def start(self, timeout: float = 15.0, *, wait_control: bool = False) -> FreecallDaemon:
        """Start the daemon; ready when it logged its start-up line and its softphone port (and,
        when asked, the control port) is bound."""
        self.write_config()
        starts = _runs(self.log_text())
        process = self.process = ManagedProcess(
            f"freecall-{self.name}",
            [*self.netns, *self.command, "-c", str(self.config_path),
             "--state-dir", str(self.state_dir)],
            log_path=self.log_path, cwd=self.directory, env=self.env,
        ).start()
        # Ready means the daemon said so (its "listening on" line, logged once every part is
        # up), not merely that a port is bound.
        wait_until(lambda: _started(process, starts), timeout, message=f"{self.name} to start")
        if self.netns:  # its ports are in another namespace
            return self
        wait_port(self.sip_port, "udp", timeout, self.process)
        wait_port(self.sip_port, "tcp", timeout, self.process)
        if wait_control:
            wait_port(self.control_port, "tcp", timeout, self.process)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.process.stop(timeout) if self.process else None

    def token(self) -> str:
        return (self.state_dir / "control.token").read_text().strip()

    def api(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        """Call the control API (JSON in and out) with the bearer token."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.control_url + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self.token()}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read()
        return json.loads(payload) if payload else None

    def unix_api(self, path: str, timeout: float = 5.0) -> Any:
        """GET on the control API's Unix socket (no token): it reaches a daemon in another
        network namespace, where its TCP listener is on that namespace's loopback."""
        return unix_api(self.state_dir, path, timeout)

    def metrics_text(self, timeout: float = 5.0) -> str:
        """``/metrics`` (Prometheus text) with the bearer token."""
        req = urllib.request.Request(self.control_url + "/metrics",
                                     headers={"Authorization": f"Bearer {self.token()}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return str(resp.read().decode())

    def metric(self, name: str) -> float:
        """The value of the unlabelled sample ``name`` in ``/metrics``; fails if absent."""
        match = re.search(rf"^{re.escape(name)} (\S+)$", self.metrics_text(), re.MULTILINE)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def log_text(self) -> str:
        return self.process.log_text() if self.process else ""

    def __repr__(self) -> str:
        return f"<FreecallDaemon {self.name} sip={self.sip_addr} public={self.public_addr}>"


def _started(process: ManagedProcess, earlier_runs: int) -> bool:
    """The daemon logged its "listening on" line for this run (or died: raise)."""
    if not process.alive():
        raise AssertionError(f"freecall never started: {process.describe_exit()}")
    return _runs(process.log_text()) > earlier_runs


def _runs(log: str) -> int:
    """Start-ups in a daemon log (the daemon's "node NAME listening on" line, once a run)."""
    return len(re.findall(r" node \S+ listening on ", log))
