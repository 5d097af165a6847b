"""freecall configuration: one YAML file into frozen dataclasses.

Every key is optional; ``load_config(None)`` gives a daemon that serves softphones on
127.0.0.1:5060. The YAML is read through PyYAML's *composer* (nodes with line marks), never through
``yaml.safe_load``, so that every problem can name the key path and the line
(``sip.listen[1]: line 7: bad transport 'udpx' (expected udp, tcp or tls)``), and so that YAML 1.1
surprises do not reach the daemon: ``policy: off`` stays the string ``off`` (not ``False``),
``password: 0123`` stays ``"0123"``. Unknown keys are errors with a "did you mean" hint.

The schema *is* the dataclasses below: each field carries its help text in ``metadata``, which
``python -m freecall.config --reference`` turns into ``docs/configuration.md``.

Three stages, kept apart so each can be tested:
  ``parse_config(text)``    YAML -> Config, values as written (``~`` kept, ``""`` = automatic);
  ``resolve_config(cfg)``   fills the automatic values (host name, realm, paths in the state dir),
                            expands ``~``, reads ``password_file``s;
  ``load_config(path)``     both, from a file or from nothing (defaults).
``ensure_auto_user`` is the one step with a side effect (it writes a password file); the daemon
calls it at start-up.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import io
import ipaddress
import json
import math
import os
import pwd
import re
import socket
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from freecall.storage import atomic_write

__all__ = [
    "DEFAULT_STATE_DIR",
    "AutoUser",
    "Config",
    "ConfigError",
    "ControlConfig",
    "DnsConfig",
    "HostPort",
    "Listener",
    "LogConfig",
    "MediaConfig",
    "NodeConfig",
    "OpenPGPConfig",
    "PeeringConfig",
    "PortRange",
    "Problem",
    "RegistrationConfig",
    "RelayConfig",
    "SecurityConfig",
    "SipConfig",
    "TimersConfig",
    "TlsConfig",
    "TurnServer",
    "UserConfig",
    "config_to_dict",
    "ensure_auto_user",
    "load_config",
    "parse_config",
    "parse_duration",
    "reference_markdown",
    "resolve_config",
    "softphone_instructions",
]

DEFAULT_STATE_DIR = "~/.local/share/freecall"
AUTO_USER_FILE = "auto-user.json"

Transport = Literal["udp", "tcp", "tls"]
TRANSPORTS: tuple[Transport, ...] = ("udp", "tcp", "tls")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_OVERRIDE_SOURCE = "<override>"


# --------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the configuration, located by key path and line."""

    path: str
    message: str
    line: int | None = None  # 1-based; None for a default value or a cross-key check
    override: bool = False  # the value came from the command line, not the file

    def __str__(self) -> str:
        parts = [self.path] if self.path else []
        if self.override:
            parts.append("command line")
        elif self.line is not None:
            parts.append(f"line {self.line}")
        parts.append(self.message)
        return ": ".join(parts)


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every reason, not just the first."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        return "\n".join(prefix + str(p) for p in self.problems)


# --------------------------------------------------------------------------------------------
# Value types that appear inside the configuration


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _split_host_port(text: str, *, bare_ipv6: bool = False) -> tuple[str, str | None]:
    """``"[::1]:5060"`` -> ``("::1", "5060")``; ``"host"`` -> ``("host", None)``.

    With ``bare_ipv6``, an unbracketed IPv6 address is taken as a host without port (only where
    the port may be left out; ``::1:5060`` is itself a valid IPv6 address).
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']' in {text!r}")
        return host, rest[1:]
    if text.count(":") > 1:
        if bare_ipv6 and _is_ip(text):
            return text, None
        raise ValueError(f"an IPv6 address needs brackets: {text!r} (e.g. [::1]:5060)")
    host, sep, port = text.partition(":")
    return host, (port if sep else None)


def _parse_port(text: str, *, allow_zero: bool = False) -> int:
    if not text.isdigit():
        raise ValueError(f"bad port {text!r}")
    port = int(text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} out of range ({0 if allow_zero else 1}-65535)")
    return port


def _parse_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"not an IP address: {text!r}") from None


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


def _parse_hostname_or_ip(text: str) -> str:
    """A DNS name (lower-cased, trailing dot removed) or an IP literal (brackets allowed)."""
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    host = host.rstrip(".").lower()
    if not _HOSTNAME_RE.match(host):
        raise ValueError(f"not a host name or IP address: {text!r}")
    return host


@dataclass(frozen=True, slots=True)
class Listener:
    """A socket to listen on: ``"udp:127.0.0.1:5060"``, ``"tls:[::1]:5061"``.

    The host must be an IP literal (``0.0.0.0`` / ``::`` = every address): a bind address that
    needs DNS would make start-up depend on the resolver. Port 0 lets the kernel choose, which tests
    use; the daemon reports the real port in ``/api/status``.
    """

    transport: Transport
    host: str
    port: int

    @classmethod
    def parse(
        cls, text: str, *, transports: Sequence[str] = TRANSPORTS, default_port: int | None = None
    ) -> Listener:
        """Parse ``TRANSPORT:HOST[:PORT]``; raise ``ValueError`` with a readable message."""
        transport, sep, rest = text.strip().partition(":")
        if not sep:
            raise ValueError(f"expected TRANSPORT:HOST:PORT, e.g. udp:127.0.0.1:5060, got {text!r}")
        transport = transport.lower()
        if transport not in transports:
            raise ValueError(f"bad transport {transport!r} (expected {_or_list(transports)})")
        host, port_text = _split_host_port(rest)
        ip = _parse_ip(host)
        if port_text is None:
            if default_port is None:
                raise ValueError(f"missing port in {text!r}")
            port = default_port
        else:
            port = _parse_port(port_text, allow_zero=True)
        return cls(typing.cast(Transport, transport), ip, port)

    def __str__(self) -> str:
        return f"{self.transport}:{_format_host(self.host)}:{self.port}"

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def socket_type(self) -> Literal["udp", "tcp"]:
        """The kernel socket kind (TLS runs over TCP), for bind-conflict checks."""
        return "udp" if self.transport == "udp" else "tcp"

    @property
    def is_wildcard(self) -> bool:
        return ipaddress.ip_address(self.host).is_unspecified


@dataclass(frozen=True, slots=True)
class HostPort:
    """``host:port`` where host is a DNS name or an IP literal (``[v6]:port``)."""

    host: str
    port: int

    @classmethod
    def parse(
        cls, text: str, *, default_port: int | None = None, ip_only: bool = False
    ) -> HostPort:
        host, port_text = _split_host_port(text.strip(), bare_ipv6=default_port is not None)
        host = _parse_ip(host) if ip_only else _parse_hostname_or_ip(host)
        if port_text is None:
            if default_port is None:
                raise ValueError(f"missing port in {text!r} (expected HOST:PORT)")
            return cls(host, default_port)
        return cls(host, _parse_port(port_text))

    def __str__(self) -> str:
        return f"{_format_host(self.host)}:{self.port}"


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive range of UDP ports, ``"20000-29999"``."""

    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> PortRange:
        first, sep, last = text.strip().partition("-")
        if not sep:
            raise ValueError(f"expected FIRST-LAST, e.g. 20000-29999, got {text!r}")
        lo, hi = _parse_port(first.strip()), _parse_port(last.strip())
        if hi <= lo:
            raise ValueError(f"empty port range {text!r} (needs at least 2 ports: RTP and RTCP)")
        return cls(lo, hi)

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __len__(self) -> int:
        return self.last - self.first + 1


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0,
                   "d": 86400.0}


def parse_duration(text: str) -> float:
    """``"2"``, ``"2.5s"``, ``"500ms"``, ``"3m"``, ``"1h"``, ``"1d"`` -> seconds (float)."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(f"bad duration {text!r} (e.g. 2, 2.5s, 500ms, 3m, 1h)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _format_duration(seconds: float) -> str:
    if seconds != int(seconds):
        ms = seconds * 1000
        return f"{ms:g}ms" if ms == int(ms) else f"{seconds:g}s"
    s = int(seconds)
    if s and s % 86400 == 0:
        return f"{s // 86400}d"
    if s and s % 3600 == 0:
        return f"{s // 3600}h"
    if s and s % 60 == 0 and s < 3600:
        return f"{s // 60}m"
    return f"{s}s"


def _or_list(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


# --------------------------------------------------------------------------------------------
# Field parsers (text -> value; ValueError on bad input) and checks (value -> message or None)


def _duration_int(text: str) -> int:
    seconds = parse_duration(text)
    if seconds != int(seconds):
        raise ValueError(f"must be whole seconds, got {text!r}")
    return int(seconds)


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _between(lo: float, hi: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        return None if lo <= value <= hi else f"must be between {lo:g} and {hi:g}"

    return check


def _cidr(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        hint = " (host bits set: use the network address)" if "host bits" in str(exc) else ""
        raise ValueError(f"bad CIDR {text!r}{hint}") from None


def _digest_algorithm(text: str) -> str:
    for name in ("MD5", "SHA-256", "SHA-512-256"):
        if text.upper() == name:
            return name
    raise ValueError(f"unknown digest algorithm {text!r} (expected MD5, SHA-256 or SHA-512-256)")


def _listener(transports: Sequence[str]) -> Callable[[str], Listener]:
    def parse(text: str) -> Listener:
        return Listener.parse(text, transports=transports)

    return parse


def _host_port(default_port: int | None, *, ip_only: bool = False) -> Callable[[str], HostPort]:
    def parse(text: str) -> HostPort:
        return HostPort.parse(text, default_port=default_port, ip_only=ip_only)

    return parse


def _unicast_ip(text: str) -> str:
    ip = _parse_ip(text.strip().strip("[]"))
    if ipaddress.ip_address(ip).is_unspecified:
        raise ValueError(f"{ip} is a wildcard, not an address others can reach")
    return ip


def _advertise(text: str) -> str:
    host = _parse_hostname_or_ip(text)
    if _is_ip(host) and ipaddress.ip_address(host).is_unspecified:
        raise ValueError(f"{host} is a wildcard, not an address others can reach")
    return host


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _domain(text: str) -> str:
    return _parse_hostname_or_ip(text)


_USER_RE = re.compile(r"^[A-Za-z0-9\-_.!~*'()&=+$,;?/]{1,64}$")


def _user_name(text: str) -> str:
    if not _USER_RE.match(text):
        raise ValueError(
            f"bad user name {text!r} (letters, digits and -_.!~*'()&=+$,;?/ only, at most 64)"
        )
    return text


def _route_key(text: str) -> str:
    user, sep, domain = text.rpartition("@")
    if sep:
        return f"{_user_name(user)}@{_domain(domain)}"
    return _domain(text)


_SIP_URI_RE = re.compile(
    r"^(?P<scheme>sips?):(?:(?P<user>[^@;?]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]+)"
    r"(?::(?P<port>\d+))?(?P<params>(?:;[^;?]*)*)$"
)


def _sip_uri(text: str) -> str:
    """A next-hop URI: ``sip:HOST[:PORT][;transport=udp|tcp|tls]`` (``sips:`` implies TLS)."""
    m = _SIP_URI_RE.match(text.strip())
    if not m:
        raise ValueError(f"bad SIP URI {text!r} (e.g. sip:192.0.2.20:5061;transport=tls)")
    _parse_hostname_or_ip(m.group("host"))
    if m.group("port"):
        _parse_port(m.group("port"))
    for param in filter(None, m.group("params").split(";")):
        name, _, value = param.partition("=")
        if name.lower() == "transport" and value.lower() not in TRANSPORTS:
            raise ValueError(f"bad transport {value!r} in {text!r} (expected udp, tcp or tls)")
    return text.strip()


_FPR_RE = re.compile(r"^(?:[0-9A-F]{40}|[0-9A-F]{64})$")


def _fingerprint(text: str) -> str:
    fpr = re.sub(r"\s+", "", text).upper().removeprefix("0X")
    if not _FPR_RE.match(fpr):
        raise ValueError(
            f"bad OpenPGP fingerprint {text!r} (40 hex digits for v4 keys, 64 for v5/v6)"
        )
    return fpr


_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _node_name(text: str) -> str:
    if text and not _NODE_NAME_RE.match(text):
        raise ValueError(f"bad node name {text!r} (letters, digits, '.', '_', '-'; at most 63)")
    return text


def _realm(text: str) -> str:
    if any(c in text for c in '"\\') or any(ord(c) < 0x20 for c in text):
        raise ValueError(f"bad realm {text!r} (no quotes, backslashes or control characters)")
    return text


# --------------------------------------------------------------------------------------------
# Schema helpers


def setting(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
    key_parse: Callable[[str], str] | None = None,
    doc_type: str | None = None,
    path: bool = False,
) -> Any:
    """A configuration field: its default, its help text (the documentation) and how to read it.

    ``parse`` reads a scalar (for a list or mapping: each item); ``check`` validates the converted
    value; ``key_parse`` validates mapping keys; ``path`` marks a file system path (``~`` expanded,
    relative to the state directory).
    """
    metadata = {"help": help, "parse": parse, "check": check, "key_parse": key_parse,
                "doc_type": doc_type, "path": path}
    if dataclasses.is_dataclass(default) or isinstance(default, Mapping):
        value = default
        return field(default_factory=lambda: value, metadata=metadata)
    return field(default=default, metadata=metadata)


_SECTION = types.MappingProxyType({"section": True})  # field metadata of a nested section


def _frozen_map(items: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(items or {}))


# --------------------------------------------------------------------------------------------
# The schema


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Who this node is and where it keeps its state."""

    name: str = setting(
        "", "Name of this node, shown to peers and used as the default realm. "
        '`""`: the host name.', parse=_node_name)
    state_dir: str = setting(
        DEFAULT_STATE_DIR,
        "Directory holding all state: the node key (`gnupg/`), `hostcache.json`, `zrtp-cache`, "
        "`calls.jsonl`, `pins.json`, the control socket and token, the generated TLS certificate "
        "and the generated user's password. Use `/var/lib/freecall` for a system service. "
        "A relative path is relative to the configuration file's directory. "
        "`freecall run --state-dir` overrides it.",
        path=True)
    role: Literal["endpoint", "relay"] = setting(
        "endpoint", "`endpoint` serves local softphones; `relay` is a public node that seeds the "
        "mesh and offers STUN and media relaying. `freecall run --role` overrides it.")


@dataclass(frozen=True, slots=True)
class RegistrationConfig:
    """Limits the registrar applies to REGISTER (RFC 3261 section 10.3)."""

    min_expires: int = setting(
        60, "Shortest registration accepted; a shorter non-zero Expires gets "
        "`423 Interval Too Brief` with this value in Min-Expires.",
        parse=_duration_int, check=_between(1, 86400), doc_type="duration (whole seconds)")
    max_expires: int = setting(
        3600, "Longest registration granted; longer requests are shortened to this.",
        parse=_duration_int, check=_between(1, 7 * 86400), doc_type="duration (whole seconds)")
    default_expires: int = setting(
        600, "Registration time granted when the REGISTER names no Expires.",
        parse=_duration_int, check=_between(1, 7 * 86400), doc_type="duration (whole seconds)")
    max_contacts: int = setting(
        5, "Most contacts (devices) one user may register at the same time; more get `403`.",
        check=_between(1, 100))


@dataclass(frozen=True, slots=True)
class TimersConfig:
    """SIP transaction timers (RFC 3261 section 17 and 16.6)."""

    t1: float = setting(
        0.5, "RTT estimate: first retransmission interval over UDP; timers B, F, H, J are 64*T1.",
        parse=parse_duration, check=_between(0.01, 10), doc_type="duration")
    t2: float = setting(
        4.0, "Cap on the retransmission interval of non-INVITE requests and INVITE responses.",
        parse=parse_duration, check=_between(0.01, 60), doc_type="duration")
    t4: float = setting(
        5.0, "Maximum time a message stays in the network (timers I and K over UDP).",
        parse=parse_duration, check=_between(0.01, 60), doc_type="duration")
    timer_c: float = setting(
        185.0, "Proxy INVITE timer C: a forwarded INVITE with no final answer after this long is "
        "cancelled. RFC 3261 requires more than 3 minutes.",
        parse=parse_duration, check=_between(1, 3600), doc_type="duration")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Certificate for the `tls:` listeners (node to node signalling)."""

    certificate: str = setting(
        "", 'PEM certificate (chain) file. `""`: `<state_dir>/tls/cert.pem`, a self-signed '
        "certificate generated on first start. Node identity is proven by signed node records "
        "and ZRTP/OpenPGP, so a self-signed certificate is the normal case.", path=True)
    private_key: str = setting(
        "", 'PEM private key file for `certificate`. `""`: `<state_dir>/tls/key.pem` (generated, '
        "mode 0600).", path=True)
    ca_file: str = setting(
        "", 'PEM bundle of CAs that peer certificates must chain to when `verify_peer` is on. '
        '`""`: the system store.', path=True)
    verify_peer: bool = setting(
        False, "Require peers' TLS certificates to verify against `ca_file` (and their host "
        "name). Off by default: peers' certificates are self-signed (see `certificate`).")


def _default_listen() -> tuple[Listener, ...]:
    return (Listener("udp", "127.0.0.1", 5060), Listener("tcp", "127.0.0.1", 5060))


@dataclass(frozen=True, slots=True)
class SipConfig:
    """Signalling: the softphone side (registrar and outbound proxy) and the node side."""

    listen: tuple[Listener, ...] = setting(
        _default_listen(), "Softphone side: where local softphones register and send calls. "
        "Each entry is `TRANSPORT:HOST:PORT` with TRANSPORT `udp`, `tcp` or `tls` and HOST an IP "
        "literal (`[::1]` for IPv6); port 0 picks a free port.",
        parse=_listener(TRANSPORTS), doc_type="list of listeners")
    public: tuple[Listener, ...] = setting(
        (), "Node side: where other freecall nodes (and plain SIP peers) reach this node, e.g. "
        '`["udp:0.0.0.0:5062", "tcp:0.0.0.0:5062", "tls:0.0.0.0:5061"]`. Same syntax as '
        "`listen`. Off (`[]`) unless configured: a node with no configuration opens nothing "
        "beyond loopback.", parse=_listener(TRANSPORTS), doc_type="list of listeners")
    advertise: str | None = setting(
        None, "Host name or address other nodes use to reach this node (Via, Contact, node "
        "record). `null`: the first `public` address that is not a wildcard, else the address of "
        "the interface with the default route.", parse=_advertise,
        doc_type="host name or IP address, or null")
    domains: tuple[str, ...] = setting(
        (), "Domains this node serves: `alice@example.org` is local if `example.org` is listed. "
        "`[]`: the node serves only its own addresses (its listener IPs, `localhost` and "
        "`node.name`), so `sip:alice@127.0.0.1` works with no DNS at all.",
        parse=_domain, doc_type="list of domain names")
    realm: str = setting(
        "", 'Digest authentication realm in challenges. `""`: the first of `domains`, else '
        "`node.name`.", parse=_realm)
    allow_register_from: tuple[IPNetwork, ...] = setting(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        "Source networks (CIDR) allowed to REGISTER; others get `403` before any "
        "authentication. Loopback only by default: softphones run on this machine. Widen it "
        "(e.g. `192.168.1.0/24`) together with `listen` for phones on the LAN.",
        parse=_cidr, doc_type="list of CIDRs")
    digest_algorithms: tuple[str, ...] = setting(
        ("MD5",), "Digest algorithms offered in challenges, in order (RFC 8760). MD5 only by "
        "default: baresip 1.0 (libre) refuses a challenge set that contains an algorithm it "
        "does not know, and sipsak and SIPp answer only the first. Add `SHA-256` (first or "
        "second) when every phone supports it.",
        parse=_digest_algorithm, doc_type="list of MD5, SHA-256, SHA-512-256")
    trusted: tuple[IPNetwork, ...] = setting(
        (), "Source networks (CIDR) whose requests on the softphone side are proxied without "
        "digest authentication, like a trusted PBX or gateway. Empty by default: every "
        "softphone request is authenticated. Registrations from trusted sources still bind "
        "only users that exist.",
        parse=_cidr, doc_type="list of CIDRs")
    auto_user: bool = setting(
        True, "When `users` is empty, create one user named after the login (`$USER`) with a "
        "random password, stored in `<state_dir>/auto-user.json` (mode 0600) on first start and "
        "printed with how to point a softphone at the node. `false`: no users, no "
        "registrations.")
    user_agent: str = setting(
        "freecall", "Value of the User-Agent and Server headers. `\"\"` leaves them out "
        "(less fingerprinting).")
    max_message_size: int = setting(
        65535, "Largest SIP message accepted, in bytes; bigger ones are dropped (UDP) or get "
        "`513` and the connection closed (TCP, TLS).", check=_between(1500, 1 << 20))
    registration: RegistrationConfig = field(default_factory=RegistrationConfig, metadata=_SECTION)
    timers: TimersConfig = field(default_factory=TimersConfig, metadata=_SECTION)
    tls: TlsConfig = field(default_factory=TlsConfig, metadata=_SECTION)


@dataclass(frozen=True, slots=True)
class UserConfig:
    """A local user; the key in `users` is the SIP user part (`alice` in `sip:alice@domain`)."""

    password: str = setting(
        "", "Digest password. Exactly one of `password` and `password_file` must be set.")
    password_file: str = setting(
        "", "File holding the password (first line; trailing newline ignored), so the "
        "configuration itself can be world-readable. Relative to the state directory.",
        path=True)


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """How SIP destinations are resolved (RFC 3263 NAPTR/SRV/A/AAAA, ENUM)."""

    servers: tuple[HostPort, ...] = setting(
        (), "Resolvers to ask, as `IP[:PORT]` (port 53 by default). `[]`: the system resolver "
        "(`/etc/resolv.conf`).", parse=_host_port(53, ip_only=True),
        doc_type="list of IP:PORT")
    timeout: float = setting(
        2.0, "Time allowed for one DNS lookup, retries included.",
        parse=parse_duration, check=_between(0.05, 60), doc_type="duration")
    enum_suffixes: tuple[str, ...] = setting(
        ("e164.arpa",), "ENUM (RFC 6116) zones tried in order for `tel:` and numeric user parts. "
        "`[]` turns ENUM off.", parse=_domain, doc_type="list of domain names")


@dataclass(frozen=True, slots=True)
class PeeringConfig:
    """The gossip host cache that tells this node which node serves which address."""

    listen: Listener | None = setting(  # noqa: RUF009 -- frozen value
        Listener("udp", "0.0.0.0", 5064),  # noqa: S104
        "Gossip socket, `udp:HOST:PORT`. `null` turns gossip off (static `routes` and DNS "
        "only). Gossip (and mDNS) run only when `sip.public` is set: a node that other nodes "
        "cannot reach opens nothing beyond loopback.", parse=_listener(("udp",)),
        doc_type="listener or null")
    seeds: tuple[HostPort, ...] = setting(
        (), "Nodes contacted first to join the mesh, as `HOST:PORT` (port 5064 by default).",
        parse=_host_port(5064), doc_type="list of HOST:PORT")
    srv_domain: str | None = setting(
        None, "Domain whose `_freecall._udp.<srv_domain>` SRV records list more seeds. `null`: "
        "none.", parse=_domain, doc_type="domain name or null")
    mdns: bool = setting(
        True, "Find and announce nodes on the local network by multicast DNS.")
    group_bits: int = setting(
        6, "The mesh is cut into `2**group_bits` groups, each storing the records homed in it "
        "(docs/peering.md). Must be the same on every node of a mesh: about log2(sqrt(nodes)), "
        "6 up to a few thousand nodes, 7 for ten thousand.", check=_between(0, 12))
    interval: float = setting(
        1.0, "One gossip round: each node opens one exchange per round. Must be the same on "
        "every node of a mesh.", parse=parse_duration, check=_between(0.05, 60),
        doc_type="duration")
    capacity: int = setting(
        4096, "Most node records the host cache keeps (about 1 KiB each at most).",
        check=_between(64, 1_000_000))


@dataclass(frozen=True, slots=True)
class TurnServer:
    """A TURN server (RFC 8656) used when no direct media path works."""

    server: HostPort = setting(  # noqa: RUF009 -- frozen value
        HostPort("", 3478), "Server as `HOST[:PORT]` (port 3478 by default).",
        parse=_host_port(3478), doc_type="HOST:PORT")
    transport: Literal["udp", "tcp", "tls"] = setting(
        "udp", "Transport to the TURN server.")
    username: str = setting("", "TURN long-term credential user name.")
    password: str = setting("", "TURN long-term credential password.")


@dataclass(frozen=True, slots=True)
class MediaConfig:
    """The media bridge (RTP from softphones, SRTP/ZRTP between nodes)."""

    address: str | None = setting(
        None, "IP address put into SDP towards other nodes. `null`: the `sip.advertise` address "
        "(resolved, if a name).", parse=_unicast_ip, doc_type="IP address or null")
    ports: PortRange = setting(  # noqa: RUF009 -- frozen value
        PortRange(20000, 29999), "UDP ports for media sockets, `FIRST-LAST`.",
        parse=PortRange.parse, doc_type="port range")
    stun: tuple[HostPort, ...] = setting(
        (), "STUN servers (`HOST[:PORT]`, port 3478 by default) used to learn the public "
        "address behind NAT. Relay nodes from the host cache are used as well.",
        parse=_host_port(3478), doc_type="list of HOST:PORT")
    turn: tuple[TurnServer, ...] = setting(
        (), "TURN servers (`{server, transport, username, password}`) for when no direct path "
        "works. Relay nodes are also learned from the host cache.",
        doc_type="list of TURN servers")
    rtp_timeout: float | None = setting(
        30.0, "A call whose far end sends no media this long is ended with BYE (not while it is "
        "on hold). `null`: never.", parse=parse_duration, check=_between(1, 86400),
        doc_type="duration or null")
    ice: bool = setting(
        True, "ICE (RFC 8445) toward far ends whose SDP offers it too (other freecall nodes): "
        "host, server-reflexive and relayed candidates, checks, and media on the pair that "
        "works, through NAT. `false`: the SDP address and latching only.")
    ice_pool: int = setting(
        2, "Media streams kept gathered in advance (STUN and TURN answers take a round trip "
        "or two, and an offer names its candidates the moment it leaves). Only used when "
        "there are servers to gather from; `0`: gather per call (candidates that come late "
        "are still used, but not signalled).", check=_between(0, 64))
    native: Literal["auto", "off"] = setting(
        "auto", "`auto`: a secure call's per-packet path (SRTP and the send, each way) runs in "
        "C where the optional extension `freecall.srtp._hop` was built (it needs a C compiler "
        "at install), and the media sockets are read in C too (batched `recvmmsg`); `off`: "
        "always the Python handlers on the event loop's own sockets. ZRTP, RTCP, STUN, relayed "
        "media and clear calls are Python either way. A change applies to calls from their "
        "next change of state (how sockets are read: to media streams set up after it).")
    phone_socket: Literal["per-stream", "shared"] = setting(
        "per-stream", "`per-stream`: each media stream has its own loopback RTP/RTCP port pair "
        "toward the softphone. `shared`: one loopback port pair (taken from `media.ports` at "
        "start) serves every call's softphone side, each packet going to the call whose "
        "softphone SDP names its source address; cheaper per packet with many calls (the "
        "sockets are read in batches). It requires softphones doing symmetric RTP (RFC 4961: "
        "sending RTP and RTCP from the ports their SDP names, as baresip, Linphone and every "
        "common softphone do): packets from any other source are dropped and counted "
        "(`phone_unrouted` in the media stats), and so are packets a softphone sends before "
        "its SDP reached the daemon. The network side keeps one socket pair per stream. Read "
        "at start.")


def _relay_ports(text: str) -> PortRange:
    ports = PortRange.parse(text)
    if ports.first < 1024:
        raise ValueError(f"relayed ports must be 1024 or above, got {text!r}")
    return ports


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """The relay role (`node.role: relay`): STUN (RFC 5389) and TURN (RFC 5766) for nodes that
    cannot reach each other directly (docs/relay.md). Ignored by endpoints."""

    listen: Listener = setting(  # noqa: RUF009 -- frozen value
        Listener("udp", "0.0.0.0", 3478),  # noqa: S104
        "STUN and TURN socket, `udp:HOST:PORT` (3478 is the standard port).",
        parse=_listener(("udp",)), doc_type="listener")
    address: str | None = setting(
        None, "Public IP address of the relay: put in XOR-RELAYED-ADDRESS (where peers send "
        "media) and in the node record. `null`: the `listen` host if it is not a wildcard, "
        "else `sip.advertise`, else the address of the interface with the default route.",
        parse=_unicast_ip, doc_type="IP address or null")
    realm: str = setting(
        "", 'TURN realm (RFC 5389 section 15.7) in challenges. `""`: `node.name`.',
        parse=_realm)
    secret_file: str = setting(
        "", "File holding the shared secret TURN credentials are derived from (TURN REST: "
        "user name `EXPIRY:NODE`, password base64(HMAC-SHA1(secret, user name)), the scheme "
        "of coturn's `static-auth-secret`). `\"\"`: `<state_dir>/relay-secret`, generated "
        "(mode 0600) on first start.", path=True)
    ports: PortRange = setting(  # noqa: RUF009 -- frozen value
        PortRange(49152, 65535), "UDP ports for relayed transport addresses, `FIRST-LAST`; "
        "one per allocation. Open them in the firewall.",
        parse=_relay_ports, doc_type="port range")
    max_allocations: int = setting(
        1000, "Most allocations in total; more get `508 Insufficient Capacity`.",
        check=_between(1, 1_000_000))
    allocations_per_user: int = setting(
        10, "Most allocations one node (the part of the user name after the expiry) may "
        "hold; more get `486 Allocation Quota Reached`.", check=_between(1, 10_000))
    bandwidth_kbps: int = setting(
        2000, "Bandwidth of one allocation, both directions together, in kbit/s (a token "
        "bucket with one second of burst); excess packets are dropped. A G.711 call through a "
        "relay uses about 200. `0`: unlimited.", check=_between(0, 10_000_000))
    max_lifetime: int = setting(
        3600, "Longest lifetime granted to an Allocate or Refresh (RFC 5766 section 6.2); "
        "clients refresh before it ends.", parse=_duration_int, check=_between(600, 86400),
        doc_type="duration (whole seconds)")
    max_permissions: int = setting(
        64, "Most permissions (peer IP addresses) and, separately, channels per allocation; "
        "more get `508`.", check=_between(1, 16383))
    allow_peers: tuple[IPNetwork, ...] = setting(
        (), "Peer networks (CIDR) the relay may send to although they are loopback, private, "
        "link-local or otherwise not global (refused with `403` by default, so the relay "
        "cannot be turned against the network it sits in). Tests use `127.0.0.0/8`.",
        parse=_cidr, doc_type="list of CIDRs")
    sip: Listener | None = setting(  # noqa: RUF009 -- frozen value
        Listener("tls", "0.0.0.0", 5061),  # noqa: S104
        "SIP edge for nodes behind NAT, `tls:HOST:PORT` (5061 is the standard port): "
        "attached nodes keep a TLS connection here and calls for them are forwarded over it "
        "(docs/relay.md, \"SIP edge\"). Only attached nodes are reachable through it; it "
        "needs peering (attached nodes are checked against the host cache). `null`: off.",
        parse=_listener(("tls",)), doc_type="listener or null")
    max_attached: int = setting(
        10000, "Most nodes attached to the SIP edge at once; more get `503`.",
        check=_between(1, 1_000_000))


def _node_id(text: str) -> str:
    value = text.strip().lower()
    if len(value) != 32 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"expected a node id (32 hex digits), got {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class NatConfig:
    """An endpoint behind NAT (docs/peering.md, "Behind NAT"): node-level STUN, and the TLS
    connection it keeps to a relay node that calls reach it through."""

    stun: bool = setting(
        True, "Learn the public address by STUN (RFC 5389) from `media.stun` and the relay "
        "nodes of the host cache, and publish it in the node record.")
    attach: Literal["auto", "always", "never"] = setting(
        "auto", "`auto`: attach to a relay node when the node is behind NAT (by node-level "
        "STUN, or by the media gathering while STUN has no answer); `always`: attach "
        "whatever either says; `never`: do not.")
    relay: str | None = setting(
        None, "Node id (32 hex digits) of the relay to attach to first. `null`: any relay of "
        "the host cache.", parse=_node_id, doc_type="node id or null")
    keepalive: float = setting(
        120.0, "RFC 5626 keep-alive interval on the connection to the relay: a CRLF ping is "
        "sent at a random 80-100% of it; no pong within 10 s and the node reconnects.",
        parse=parse_duration, check=_between(1, 3600), doc_type="duration")
    expires: float = setting(
        600.0, "Lifetime asked for the attachment; renewed at 80% of what the relay grants.",
        parse=parse_duration, check=_between(60, 86400), doc_type="duration")
    retry_base: float = setting(
        30.0, "RFC 5626 section 4.5 back-off after the connection to the relay failed: the "
        "wait doubles from this with each failure in a row (randomised 50-100%).",
        parse=parse_duration, check=_between(0.1, 3600), doc_type="duration")
    retry_max: float = setting(
        1800.0, "Longest back-off wait.", parse=parse_duration, check=_between(1, 86400),
        doc_type="duration")
    probe_interval: float = setting(
        300.0, "How often STUN is asked again (a NAT's public address may change).",
        parse=parse_duration, check=_between(1, 86400), doc_type="duration")


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """What to do about media encryption and authentication."""

    policy: Literal["require", "prefer", "off"] = setting(
        "prefer", "`require`: refuse calls whose media cannot be encrypted with ZRTP/SRTP; "
        "`prefer`: encrypt when the peer can, else proceed in clear and show the call as "
        "insecure; `off`: never negotiate encryption (testing only).")
    zrtp_timeout: float = setting(
        5.0, "How long ZRTP may take from the start of media. A far end that showed no sign of "
        "ZRTP by then goes on in clear under `prefer`; one that did and did not finish is a "
        "failure under every policy (a downgrade attempt looks like that).",
        parse=parse_duration, check=_between(0.1, 120), doc_type="duration")
    on_mitm: Literal["hangup", "warn"] = setting(
        "hangup", "When ZRTP suspects a man in the middle (bad OpenPGP signature over the SAS, "
        "retained-secret mismatch): `hangup` ends the call, `warn` keeps it and raises an alert.")
    auth_failures: int = setting(
        5, "Failed digest answers (wrong password or unknown user) one source IP may give within "
        "`auth_window` before it is locked out (password guessing such as sipvicious `svcrack`). "
        "A locked-out source gets a plain challenge for every attempt, right password or not. "
        "`0`: never lock out.", check=_between(0, 1000))
    auth_window: float = setting(
        60.0, "Time over which `auth_failures` are counted.",
        parse=parse_duration, check=_between(0.1, 86400), doc_type="duration")
    lockout: float = setting(
        300.0, "How long a source that reached `auth_failures` stays locked out; other sources "
        "(a legitimate softphone elsewhere) are not affected.",
        parse=parse_duration, check=_between(1, 7 * 86400), doc_type="duration")
    rate_limit: int = setting(
        200, "Requests and responses one source IP may send to the public SIP listeners within "
        "`rate_window` (a token bucket, like Kamailio's pike module). A source over it is "
        "blocked: its messages are dropped unanswered for `rate_block`, with one log line and "
        "the `freecall_ratelimit_blocked_total` metric per block. `0`: no limit.",
        check=_between(0, 10_000_000))
    rate_window: float = setting(
        2.0, "Time over which `rate_limit` messages are allowed.",
        parse=parse_duration, check=_between(0.01, 3600), doc_type="duration")
    rate_block: float = setting(
        60.0, "How long a source over `rate_limit` is dropped; then it is counted afresh.",
        parse=parse_duration, check=_between(1, 86400), doc_type="duration")
    rate_softphones: bool = setting(
        False, "Apply `rate_limit` to the softphone listeners (`sip.listen`) as well. Off: "
        "local softphones and load tests on loopback are never limited.")
    rate_exempt: tuple[IPNetwork, ...] = setting(
        (), "Source networks (CIDR) never rate limited, e.g. a known busy peer node or gateway.",
        parse=_cidr, doc_type="list of CIDRs")
    calls_per_source: int = setting(
        20, "Calls in progress one source IP on the public SIP listeners may have: INVITEs "
        "not yet answered, or answered but not yet acknowledged (ACK), each holding media "
        "ports. Its next INVITE gets `503 Service Unavailable` with `Retry-After`, with one "
        "log line and the `freecall_overload_refused_total` metric, until some are confirmed "
        "or end. It stops a flood of INVITEs that are never acknowledged, sent from many "
        "ports, from taking every media port pair. `rate_exempt` sources are not capped. "
        "`0`: no cap.", check=_between(0, 1_000_000))
    max_sources: int = setting(
        10_000, "Most source IPs the rate limiter and the lockout each remember (least recently "
        "seen forgotten first), so a flood from spoofed addresses cannot grow memory.",
        check=_between(1, 10_000_000))


@dataclass(frozen=True, slots=True)
class OpenPGPConfig:
    """The OpenPGP key that signs the ZRTP SAS hash, proving who is speaking."""

    key: str | None = setting(
        None, "Fingerprint (40 or 64 hex digits, spaces allowed) of a key in `home` to sign "
        "with. `null`: the node's own key, generated on first start.",
        parse=_fingerprint, doc_type="fingerprint or null")
    home: str = setting(
        "", 'GnuPG home directory. `""`: `<state_dir>/gnupg`, the daemon\'s own keyring (it never '
        "touches `~/.gnupg` unless told to).", path=True)
    binary: str = setting("gpg", "GnuPG executable, looked up in `PATH` unless absolute.")
    passphrase_file: str = setting(
        "", 'File whose first line is the passphrase of `key`, read once at start (never put it '
        "in this file). It must not be open to other users (mode 0600 or 0400), else it is "
        "refused. `\"\"`: no passphrase, or gpg-agent already holds it. A key that cannot "
        "sign (a wrong passphrase) is one error line at start; calls then go on unsigned "
        "(peers see them `unverified`) and the key is neither offered nor announced.",
        path=True)
    sign: bool = setting(
        True, "Sign the SAS hash of every call and check the peer's signature (RFC 6189 "
        "section 7.2). `false`: calls end `unverified` unless the SAS is confirmed by voice.")


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The control API used by the CLI and the dashboard."""

    listen: HostPort | None = setting(  # noqa: RUF009 -- frozen value
        HostPort("127.0.0.1", 5099), "HTTP control API and dashboard, `IP:PORT` "
        "(`Authorization: Bearer` with the token). `null`: HTTP off; the Unix socket stays.",
        parse=_host_port(None, ip_only=True), doc_type="IP:PORT or null")
    token_file: str = setting(
        "", 'File with the bearer token (created, mode 0600, on first start). `""`: '
        "`<state_dir>/control.token`.", path=True)
    socket: str = setting(
        "", 'Unix socket with the same API and no token (file permissions protect it). `""`: '
        "`<state_dir>/control.sock`.", path=True)
    allow_from: tuple[IPNetwork, ...] = setting(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        "Source networks (CIDR) whose HTTP requests the control API answers (with the token); "
        "others get `403`. Loopback only by default, so a wider `listen` alone opens nothing: "
        "widen both to reach the API from elsewhere.",
        parse=_cidr, doc_type="list of CIDRs")
    notify: bool = setting(
        False, "Desktop notification (`notify-send`) when a call's security changes: secure "
        "with the SAS to compare, insecure, or a suspected man in the middle.")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Logging (to standard error; systemd's journal picks it up)."""

    level: Literal["debug", "info", "warning", "error"] = setting(
        "info", "Least severe level written.")
    sip_trace: bool = setting(
        False, "Log every SIP message sent and received (at level info). Messages contain "
        "credentials digests and addresses: for debugging only.")
    format: Literal["auto", "text", "journal"] = setting(
        "auto", "`text`: time, level, logger and message on each line. `journal`: the level as "
        "a syslog priority prefix (`<6>`) and no time stamp, which systemd's journal reads "
        "(`journalctl -p warning` then works). `auto`: `journal` when standard error is the "
        "journal (`$JOURNAL_STREAM`), else `text`. Every event is one line either way.")
    call_records: bool = setting(
        True, "Write one JSON line per finished call to `<state_dir>/calls.jsonl` (time, "
        "parties, duration, route, security outcome; never the SAS or keys).")
    call_records_max_size: int = setting(
        10 << 20, "Size in bytes at which `calls.jsonl` is rotated to `calls.jsonl.1`.",
        check=_between(4096, 1 << 40))
    call_records_keep: int = setting(
        5, "Rotated call record files kept (`calls.jsonl.1` to `.N`); `0` keeps none.",
        check=_between(0, 1000))


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration: what ``load_config`` returns."""

    node: NodeConfig = field(default_factory=NodeConfig, metadata=_SECTION)
    sip: SipConfig = field(default_factory=SipConfig, metadata=_SECTION)
    users: Mapping[str, UserConfig] = setting(
        _frozen_map(), "Local users, by SIP user name: `alice: {password: secret}`. Empty: see "
        "`sip.auto_user`.", key_parse=_user_name, doc_type="mapping of user name to user")
    routes: Mapping[str, str] = setting(
        _frozen_map(), "Static next hops, tried before the host cache and DNS: a domain or "
        "`user@domain` mapped to a SIP URI, e.g. `example.net: \"sip:192.0.2.20:5061;"
        "transport=tls\"`.", key_parse=_route_key, parse=_sip_uri,
        doc_type="mapping of domain or user@domain to SIP URI")
    dns: DnsConfig = field(default_factory=DnsConfig, metadata=_SECTION)
    peering: PeeringConfig = field(default_factory=PeeringConfig, metadata=_SECTION)
    media: MediaConfig = field(default_factory=MediaConfig, metadata=_SECTION)
    relay: RelayConfig = field(default_factory=RelayConfig, metadata=_SECTION)
    nat: NatConfig = field(default_factory=NatConfig, metadata=_SECTION)
    security: SecurityConfig = field(default_factory=SecurityConfig, metadata=_SECTION)
    openpgp: OpenPGPConfig = field(default_factory=OpenPGPConfig, metadata=_SECTION)
    control: ControlConfig = field(default_factory=ControlConfig, metadata=_SECTION)
    log: LogConfig = field(default_factory=LogConfig, metadata=_SECTION)

    @property
    def state_dir(self) -> Path:
        return Path(self.node.state_dir)


# --------------------------------------------------------------------------------------------
# YAML nodes -> dataclasses


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_NULL_WORDS = {"", "~", "null"}
_SAFE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _join(path: str, key: str) -> str:
    if not _SAFE_KEY_RE.match(key):
        key = json.dumps(key)
        return f"{path}[{key}]" if path else f"[{key}]"
    return f"{path}.{key}" if path else key


class _Reader:
    """Walks composed YAML nodes along the schema, collecting problems instead of stopping."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.lines: dict[str, int] = {}
        self.tainted: set[str] = set()  # paths whose value is not the user's (fell back)

    def problem(self, path: str, node: yaml.Node | None, message: str) -> None:
        override = node is not None and node.start_mark.name == _OVERRIDE_SOURCE
        line = None if node is None or override else node.start_mark.line + 1
        self.problems.append(Problem(path, message, line, override))
        self.tainted.add(path)

    # -- scalars ---------------------------------------------------------------------------

    def _is_null(self, node: yaml.Node) -> bool:
        return (isinstance(node, yaml.ScalarNode) and node.style is None
                and node.value.strip().lower() in _NULL_WORDS)

    def _scalar(self, node: yaml.Node, path: str, what: str) -> str | None:
        if isinstance(node, yaml.ScalarNode):
            return str(node.value)
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
        self.problem(path, node, f"expected {what}, got {kind}")
        return None

    def convert(self, node: yaml.Node, tp: Any, path: str, meta: Mapping[str, Any]) -> Any:
        """Return the value for ``node`` read as type ``tp``; ``_INVALID`` after a problem."""
        if node.start_mark.name != _OVERRIDE_SOURCE:
            self.lines.setdefault(path, node.start_mark.line + 1)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (types.UnionType, typing.Union):
            inner = [a for a in args if a is not type(None)]
            if self._is_null(node):
                return None
            return self.convert(node, inner[0], path, meta)
        if origin is tuple:
            return self._tuple(node, args[0], path, meta)
        if origin is Mapping or origin is dict:
            return self._mapping(node, args[1], path, meta)
        if dataclasses.is_dataclass(tp) and meta.get("parse") is None:
            return self.dataclass(node, typing.cast(type[Any], tp), path)
        if tp is str and self._is_null(node):
            return ""  # "" = automatic / not set, for every string key
        text = self._scalar(node, path, _describe_type(tp, meta))
        if text is None:
            return _INVALID
        parse = meta.get("parse")
        if parse is not None:
            try:
                value = parse(text)
            except ValueError as exc:
                self.problem(path, node, str(exc))
                return _INVALID
        elif tp is bool:
            lowered = text.strip().lower()
            if lowered not in _BOOL_WORDS:
                self.problem(path, node, f"expected true or false, got {text!r}")
                return _INVALID
            value = _BOOL_WORDS[lowered]
        elif tp is int:
            try:
                value = int(text.strip().replace("_", ""), 10)
            except ValueError:
                self.problem(path, node, f"expected an integer, got {text!r}")
                return _INVALID
        elif tp is float:
            try:
                value = float(text)
            except ValueError:
                value = None
            if value is None or not math.isfinite(value):
                self.problem(path, node, f"expected a number, got {text!r}")
                return _INVALID
        elif tp is str:
            value = text
        elif origin is Literal:
            choices = [str(a) for a in args]
            if text not in choices:
                hint = _did_you_mean(text, choices)
                self.problem(path, node,
                             f"bad value {text!r} (expected {_or_list(choices)}){hint}")
                return _INVALID
            value = text
        else:  # pragma: no cover -- a schema bug, not a user error
            raise TypeError(f"unsupported config type {tp!r} at {path}")
        check = meta.get("check")
        if check is not None:
            message = check(value)
            if message:
                self.problem(path, node, message)
                return _INVALID
        return value

    # -- containers ------------------------------------------------------------------------

    def _tuple(self, node: yaml.Node, item_tp: Any, path: str, meta: Mapping[str, Any]) -> Any:
        if self._is_null(node):
            return ()
        if not isinstance(node, yaml.SequenceNode):
            example = node.value if isinstance(node, yaml.ScalarNode) else "..."
            self.problem(path, node, f"expected a list, e.g. [{example}]")
            return _INVALID
        items = []
        ok = True
        for i, item in enumerate(node.value):
            value = self.convert(item, item_tp, f"{path}[{i}]", meta)
            ok = ok and value is not _INVALID
            items.append(value)
        if not ok:
            self.tainted.add(path)  # the whole list falls back on its default
            return _INVALID
        return tuple(items)

    def _pairs(
        self, node: yaml.MappingNode, path: str
    ) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
        """Key/value pairs with string keys; merge keys (``<<``) applied, duplicates reported."""
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = str(key_node.value)
                if key in seen:
                    self.problem(_join(path, key), key_node,
                                 f"duplicate key (first at line {seen[key]})")
                seen.setdefault(key, key_node.start_mark.line + 1)
        try:
            yaml.SafeLoader.flatten_mapping(typing.cast(Any, _FLATTENER), node)
        except yaml.MarkedYAMLError as exc:
            self.problem(path, node, exc.problem or "bad merge key")
            return
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(path, key_node, "a key must be a plain string")
                continue
            yield str(key_node.value), key_node, value_node

    def _mapping(self, node: yaml.Node, value_tp: Any, path: str,
                 meta: Mapping[str, Any]) -> Any:
        if self._is_null(node):
            return _frozen_map()
        if not isinstance(node, yaml.MappingNode):
            self.problem(path, node, "expected a mapping (key: value)")
            return _INVALID
        key_parse = meta.get("key_parse")
        result: dict[str, Any] = {}
        for raw_key, key_node, value_node in self._pairs(node, path):
            key_path = _join(path, raw_key)
            key = raw_key
            if key_parse is not None:
                try:
                    key = key_parse(raw_key)
                except ValueError as exc:
                    self.problem(key_path, key_node, str(exc))
                    continue
            value = self.convert(value_node, value_tp, key_path, meta if not
                                 dataclasses.is_dataclass(value_tp) else {})
            if value is not _INVALID:
                result[key] = value  # keep the good entries, so cross-key checks still see them
        return _frozen_map(result)

    def dataclass(self, node: yaml.Node | None, cls: type[Any], path: str) -> Any:
        if node is None or self._is_null(node):
            return cls()
        if not isinstance(node, yaml.MappingNode):
            self.problem(path, node, "expected a mapping (key: value)")
            return cls()
        hints = typing.get_type_hints(cls)
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, key_node, value_node in self._pairs(node, path):
            key_path = _join(path, key)
            f = by_name.get(key)
            if f is None:
                self.problem(key_path, key_node, "unknown key" + _unknown_key_hint(key, cls, path))
                continue
            value = self.convert(value_node, hints[key], key_path, f.metadata)
            if value is _INVALID:
                kwargs.pop(key, None)  # fall back on the default, keep looking for problems
            else:
                kwargs[key] = value
        return cls(**kwargs)


_INVALID: Any = object()


class _Flattener(yaml.SafeLoader):
    """Gives ``flatten_mapping`` the constructor state it needs, without any stream."""

    def __init__(self) -> None:
        yaml.constructor.SafeConstructor.__init__(self)


_FLATTENER = _Flattener()


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _schema_paths(cls: type[Any] = Config, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every key path of the schema with its field (sections included)."""
    for f in dataclasses.fields(cls):
        path = _join(prefix, f.name)
        yield path, f
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _schema_paths(typing.cast(type[Any], tp), path)


def _unknown_key_hint(key: str, cls: type[Any], path: str) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {_join(path, close[0])!r}?"
    elsewhere = [p for p, _ in _schema_paths() if p.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; did you mean {elsewhere[0]!r}?"
    return f" (known keys here: {', '.join(names)})"


def _describe_type(tp: Any, meta: Mapping[str, Any] | None = None) -> str:
    if meta and meta.get("doc_type"):
        return str(meta["doc_type"])
    if meta and meta.get("path"):
        return "path"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return f"{_describe_type(inner[0])} or null"
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return f"list of {_describe_type(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp, str(tp))


# --------------------------------------------------------------------------------------------
# Cross-key checks


def _check(config: Config, lines: Mapping[str, int], tainted: set[str]) -> list[Problem]:
    """Checks that involve several keys; values that already had a problem are left out."""
    problems: list[Problem] = []

    def is_tainted(path: str) -> bool:
        return any(path == t or path.startswith((t + ".", t + "[")) for t in tainted)

    def add(path: str, message: str) -> None:
        if not is_tainted(path):
            problems.append(Problem(path, message, lines.get(path)))

    reg = config.sip.registration
    if not reg.min_expires <= reg.default_expires <= reg.max_expires:
        given = [k for k in ("default_expires", "min_expires", "max_expires")
                 if f"sip.registration.{k}" in lines] or ["default_expires"]
        add(f"sip.registration.{given[0]}",
            "needs min_expires <= default_expires <= max_expires, got "
            f"{reg.min_expires} / {reg.default_expires} / {reg.max_expires}")
    timers = config.sip.timers
    if timers.t2 < timers.t1:
        add("sip.timers.t2", f"must not be shorter than t1 ({timers.t1:g}s)")

    for i, domain in enumerate(config.sip.domains):
        if domain in config.sip.domains[:i]:
            add(f"sip.domains[{i}]", f"duplicate domain {domain!r}")

    tls = config.sip.tls
    if bool(tls.certificate) != bool(tls.private_key):
        add("sip.tls.private_key" if tls.certificate else "sip.tls.certificate",
            "certificate and private_key must be given together (or both left out)")

    for name, user in config.users.items():
        path = _join("users", name)
        if bool(user.password) == bool(user.password_file):
            add(path, "set exactly one of password and password_file")

    for i, turn in enumerate(config.media.turn):
        if not turn.server.host:
            add(f"media.turn[{i}].server", "missing server")

    # Sockets that would collide at bind time: same kind and port, and the same host or a
    # wildcard of the same family (0.0.0.0 covers every IPv4 address; :: may cover both).
    bound: list[tuple[str, Literal["udp", "tcp"], str, int]] = []
    for i, lst in enumerate(config.sip.listen):
        bound.append((f"sip.listen[{i}]", lst.socket_type, lst.host, lst.port))
    for i, lst in enumerate(config.sip.public):
        bound.append((f"sip.public[{i}]", lst.socket_type, lst.host, lst.port))
    if config.peering.listen is not None:
        lst = config.peering.listen
        bound.append(("peering.listen", lst.socket_type, lst.host, lst.port))
    if config.control.listen is not None:
        ctl = config.control.listen
        bound.append(("control.listen", "tcp", ctl.host, ctl.port))
    if config.node.role == "relay":
        lst = config.relay.listen
        bound.append(("relay.listen", "udp", lst.host, lst.port))
        if lst.port in config.relay.ports:
            add("relay.listen", f"udp port {lst.port} lies inside relay.ports "
                f"({config.relay.ports})")
    bound = [b for b in bound if not is_tainted(b[0])]
    for i, (path, kind, host, port) in enumerate(bound):
        if port == 0:
            continue
        for other_path, other_kind, other_host, other_port in bound[:i]:
            if kind == other_kind and port == other_port and _hosts_overlap(host, other_host):
                add(path, f"{kind} port {port} on {host} is already used by {other_path}")
                break
        if kind == "udp" and port in config.media.ports and path != "relay.listen":
            add(path, f"udp port {port} lies inside media.ports ({config.media.ports})")
    return problems


def _hosts_overlap(a: str, b: str) -> bool:
    ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if ia == ib:
        return True
    if ia.version == ib.version:
        return ia.is_unspecified or ib.is_unspecified
    # IPv6 wildcard sockets accept IPv4 too unless IPV6_V6ONLY is set (Linux default: not set)
    return (ia.version == 6 and ia.is_unspecified) or (ib.version == 6 and ib.is_unspecified)


# --------------------------------------------------------------------------------------------
# Public entry points


def _compose(text: str, source: str) -> tuple[yaml.Node | None, list[Problem]]:
    stream = io.StringIO(text)
    stream.name = source
    loader = yaml.SafeLoader(stream)
    try:
        return loader.get_single_node(), []
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = " ".join(filter(None, [exc.context, exc.problem])) or "YAML syntax error"
        return None, [Problem("", f"YAML syntax error: {message}",
                              mark.line + 1 if mark else None)]
    except yaml.YAMLError as exc:
        return None, [Problem("", f"YAML error: {exc}")]
    finally:
        loader.dispose()


def _override_node(value: object) -> yaml.Node:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    text = yaml.safe_dump(value, default_flow_style=True)
    stream = io.StringIO(text)
    stream.name = _OVERRIDE_SOURCE
    node = yaml.SafeLoader(stream).get_single_node()
    assert node is not None
    return node


def _apply_overrides(root: yaml.Node | None, overrides: Mapping[str, object]) -> yaml.Node:
    """Put command-line values (``{"node.state_dir": "/x"}``) into the composed tree."""
    if root is None or (isinstance(root, yaml.ScalarNode) and root.value.strip() in _NULL_WORDS):
        root = yaml.MappingNode("tag:yaml.org,2002:map", [])
    for dotted, value in overrides.items():
        node = root
        keys = dotted.split(".")
        for depth, key in enumerate(keys):
            if not isinstance(node, yaml.MappingNode):
                break
            last = depth == len(keys) - 1
            for i, (key_node, value_node) in enumerate(node.value):
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                    if last:
                        node.value[i] = (key_node, _override_node(value))
                    node = value_node
                    break
            else:
                key_node = yaml.ScalarNode("tag:yaml.org,2002:str", key)
                key_node.start_mark = key_node.end_mark = _override_mark()
                child = _override_node(value) if last else yaml.MappingNode(
                    "tag:yaml.org,2002:map", [], _override_mark(), _override_mark())
                node.value.append((key_node, child))
                node = child
    return root


def _override_mark() -> yaml.Mark:
    return yaml.Mark(_OVERRIDE_SOURCE, 0, 0, 0, None, 0)


def parse_config(
    text: str, *, source: str = "<config>", overrides: Mapping[str, object] | None = None
) -> Config:
    """Validate YAML ``text`` into a Config with values as written (nothing resolved).

    ``overrides`` maps dotted key paths to values that replace the file's (command-line options);
    they are validated like the file. Raises ``ConfigError`` listing every problem.
    """
    root, problems = _compose(text, source)
    if problems:
        raise ConfigError(problems, source)
    if overrides:
        root = _apply_overrides(root, overrides)
    reader = _Reader()
    if root is not None and not isinstance(root, yaml.MappingNode) and not reader._is_null(root):
        raise ConfigError([Problem("", "the file must be a mapping of sections (node:, sip:, ...)",
                                   root.start_mark.line + 1)], source)
    config = reader.dataclass(root, Config, "")
    # cross-key checks run even after problems (invalid values fell back on their defaults), so
    # one run reports everything
    problems = reader.problems + _check(config, reader.lines, reader.tainted)
    if problems:
        raise ConfigError(problems, source)
    return typing.cast(Config, config)


def _expand(path: str, base: Path, environ: Mapping[str, str]) -> str:
    if path == "~" or path.startswith("~/"):
        home = environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
        path = home + path[1:]
    elif path.startswith("~"):
        path = os.path.expanduser(path)  # ~user/...
    p = Path(path)
    if not p.is_absolute():
        p = base / p
    return os.path.normpath(p)


def resolve_config(
    config: Config,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    hostname: str | None = None,
    check_files: bool = True,
) -> Config:
    """Fill the automatic values so the daemon sees concrete ones.

    ``~`` is expanded; ``node.state_dir`` is made absolute against ``base_dir`` (the configuration
    file's directory, else the working directory); other relative paths are relative to the state
    directory. ``node.name`` gets the host name, ``sip.realm`` the first domain or the node name,
    the TLS, control and GnuPG paths their places in the state directory. With ``check_files``,
    files named explicitly (TLS, password files) must be readable; ``password_file`` contents
    become ``password``.
    """
    env = os.environ if environ is None else environ
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    problems: list[Problem] = []

    name = config.node.name or _node_name_from_host(hostname or socket.gethostname())
    state = _expand(config.node.state_dir, base, env)
    state_path = Path(state)

    def path_in_state(value: str, default: str) -> str:
        return _expand(value, state_path, env) if value else str(state_path / default)

    def readable(path_key: str, file: str) -> None:
        if check_files and not os.access(file, os.R_OK):
            why = "does not exist" if not os.path.exists(file) else "is not readable"
            problems.append(Problem(path_key, f"file {file!r} {why}"))

    tls = config.sip.tls
    if tls.certificate:
        readable("sip.tls.certificate", path_in_state(tls.certificate, ""))
        readable("sip.tls.private_key", path_in_state(tls.private_key, ""))
    if tls.ca_file:
        readable("sip.tls.ca_file", path_in_state(tls.ca_file, ""))
    new_tls = dataclasses.replace(
        tls,
        certificate=path_in_state(tls.certificate, "tls/cert.pem"),
        private_key=path_in_state(tls.private_key, "tls/key.pem"),
        ca_file=_expand(tls.ca_file, state_path, env) if tls.ca_file else "",
    )

    users: dict[str, UserConfig] = {}
    for user, given in config.users.items():
        ucfg = given
        if ucfg.password_file:
            file = _expand(ucfg.password_file, state_path, env)
            password = ""
            if check_files:
                try:
                    password = Path(file).read_text(encoding="utf-8").splitlines()[0]
                except (OSError, UnicodeDecodeError, IndexError) as exc:
                    why = "is empty" if isinstance(exc, IndexError) else f"cannot be read ({exc})"
                    problems.append(Problem(_join(_join("users", user), "password_file"),
                                            f"file {file!r} {why}"))
            ucfg = dataclasses.replace(ucfg, password=password, password_file=file)
        users[user] = ucfg

    if problems:
        raise ConfigError(problems)

    return dataclasses.replace(
        config,
        node=dataclasses.replace(config.node, name=name, state_dir=state),
        sip=dataclasses.replace(
            config.sip,
            realm=config.sip.realm or (config.sip.domains[0] if config.sip.domains else name),
            tls=new_tls,
        ),
        users=_frozen_map(users),
        openpgp=dataclasses.replace(config.openpgp,
                                    home=path_in_state(config.openpgp.home, "gnupg")),
        control=dataclasses.replace(
            config.control,
            token_file=path_in_state(config.control.token_file, "control.token"),
            socket=path_in_state(config.control.socket, "control.sock"),
        ),
        relay=dataclasses.replace(
            config.relay,
            realm=config.relay.realm or name,
            secret_file=path_in_state(config.relay.secret_file, "relay-secret"),
        ),
    )


def _node_name_from_host(host: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", host.split(".", 1)[0] or host)[:63].strip("-._")
    return name or "freecall"


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    hostname: str | None = None,
    check_files: bool = True,
) -> Config:
    """Read, validate and resolve the configuration; ``path=None`` means "no file": defaults.

    ``overrides`` are dotted keys from the command line, e.g.
    ``{"node.state_dir": args.state_dir, "node.role": args.role}`` (``None`` values are skipped).
    Raises ``ConfigError`` naming the key path and line of every problem; the daemon must refuse to
    start on it.
    """
    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    # paths given on the command line are relative to the working directory, not to the file
    path_keys = {p for p, f in _schema_paths() if f.metadata.get("path")}
    for key, value in ov.items():
        if key in path_keys and isinstance(value, str | os.PathLike):
            text = os.fspath(value)
            if not text.startswith("~") and not os.path.isabs(text):
                ov[key] = os.path.abspath(text)
    if path is None:
        config = parse_config("", source="<defaults>", overrides=ov)
        base = Path.cwd()
        source = "<defaults>"
    else:
        source = os.fspath(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([Problem("", f"cannot read the configuration: {exc}")],
                              source) from None
        config = parse_config(text, source=source, overrides=ov)
        base = Path(path).resolve().parent
    try:
        return resolve_config(config, base_dir=base, environ=environ, hostname=hostname,
                              check_files=check_files)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source) from None


# --------------------------------------------------------------------------------------------
# The generated user (sip.auto_user)


@dataclass(frozen=True, slots=True)
class AutoUser:
    """The user created when the configuration names none."""

    name: str
    password: str
    path: Path  # where the password is kept (mode 0600)
    created: bool  # True on the start that generated it


def _login_name(environ: Mapping[str, str]) -> str:
    for var in ("USER", "LOGNAME"):
        if environ.get(var):
            name = environ[var]
            break
    else:
        try:
            name = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            name = "user"
    name = re.sub(r"[^A-Za-z0-9\-_.]", "", name)[:64]
    return name or "user"


def ensure_auto_user(
    config: Config,
    *,
    environ: Mapping[str, str] | None = None,
    urandom: Callable[[int], bytes] = os.urandom,
) -> tuple[Config, AutoUser | None]:
    """Give a configuration without users its one generated user (``sip.auto_user``).

    The name and password are kept in ``<state_dir>/auto-user.json`` (mode 0600, atomic write), so
    they survive restarts and the softphone keeps working. Returns the configuration with that user
    added, and the user (``None`` when ``users`` is set or ``auto_user`` is off).
    """
    if config.users or not config.sip.auto_user:
        return config, None
    path = config.state_dir / AUTO_USER_FILE
    created = False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        name, password = _user_name(str(data["user"])), str(data["password"])
        if not password:
            raise ValueError("empty password")
    except FileNotFoundError:
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = _login_name(os.environ if environ is None else environ)
        # base32 without padding: 80 random bits, easy to type into a phone's settings
        password = base64.b32encode(urandom(10)).decode("ascii").lower()
        atomic_write(path, (json.dumps({"user": name, "password": password}) + "\n").encode())
        created = True
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError([Problem("sip.auto_user", f"cannot use {path}: {exc}; fix or delete "
                                   "it (a new password is generated)")]) from None
    users = _frozen_map({name: UserConfig(password=password)})
    return dataclasses.replace(config, users=users), AutoUser(name, password, path, created)


def softphone_instructions(config: Config, user: str, *, password: str = "") -> str:
    """Lines telling a person how to point a softphone at this node (printed at start-up).

    ``password`` is shown as given: the password itself, or a hint such as
    ``f"in {auto_user.path}"``; empty means "the one configured for this user".
    """
    listeners = config.sip.listen
    if not listeners:
        return "No softphone listener (sip.listen is empty)."
    first = listeners[0]
    if first.is_wildcard:
        host = "127.0.0.1" if first.family == socket.AF_INET else "::1"
    else:
        host = first.host
    domain = config.sip.domains[0] if config.sip.domains else host
    proxy = f"{_format_host(host)}:{first.port}"
    transports = sorted({str(lst.transport) for lst in listeners if lst.port == first.port})
    aor = f"sip:{user}@{_format_host(domain)}"
    return "\n".join([
        "Point a softphone (baresip, Linphone, ...) at this node:",
        f"  SIP address : {aor}",
        f"  user name   : {user}",
        f"  password    : {password or 'the one configured for this user'}",
        f"  proxy       : {proxy} ({', '.join(transports)})",
        f"  baresip     : <{aor};transport={first.transport}>;"
        f'outbound="sip:{proxy};transport={first.transport}";auth_pass=PASSWORD',
    ])


# --------------------------------------------------------------------------------------------
# Plain values (for `freecall config show`, the reference and tests)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, Listener | HostPort | PortRange):
            return str(value)
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value


def config_to_dict(config: Config) -> dict[str, Any]:
    """The configuration as plain YAML/JSON values; ``parse_config`` reads it back unchanged."""
    result = _plain(config)
    assert isinstance(result, dict)
    return result


# --------------------------------------------------------------------------------------------
# Reference documentation


def _doc_default(value: Any, meta: Mapping[str, Any]) -> str:
    if "duration" in str(meta.get("doc_type") or "") and isinstance(value, int | float):
        return _format_duration(value)
    return json.dumps(_plain(value))


_REFERENCE_INTRO = """\
# freecall configuration reference

<!-- Generated by `python -m freecall.config --reference` from the field help in
     src/freecall/config.py. Do not edit: tests/test_config.py checks that it is current. -->

freecall reads one YAML file (`freecall run -c FILE`; check one with `freecall config check FILE`).
**Every key is optional**: with no file at all the daemon serves softphones on
`udp:127.0.0.1:5060` and `tcp:127.0.0.1:5060` with one generated user (see `sip.auto_user`).
`etc/freecall.yaml` lists every key with its default.

Conventions:

- Unknown keys are errors (they are usually typos). Every error names the key path and the line,
  e.g. `sip.listen[1]: line 7: bad transport 'udpx' (expected udp, tcp or tls)`; the daemon
  refuses to start on any error.
- Values are read as written: `policy: off` is the word `off` and `password: 0123` the string
  `0123` (plain YAML 1.1 would turn them into `false` and `83`).
- *duration*: seconds (`2`, `0.5`) or a number with a unit `ms`, `s`, `m`, `h`, `d` (`500ms`, `3m`).
- *listener*: `TRANSPORT:HOST:PORT`; TRANSPORT is `udp`, `tcp` or `tls`; HOST is an IP literal,
  IPv6 in brackets (`tls:[::1]:5061`), `0.0.0.0` or `[::]` for every address; PORT 0 lets the
  kernel choose.
- *HOST:PORT*: a host name or IP literal and a port; where the text names a default port, the port
  may be left out.
- `""` for a name or path means *automatic* (the text says what it becomes); `null` is read the
  same way. `~` at the start of a path is the home directory. Relative paths are relative to the
  state directory, except `node.state_dir`, which is relative to the configuration file.
"""


def _reference_field(path: str, f: dataclasses.Field[Any], tp: Any, default: Any) -> list[str]:
    lines = [f"- **`{path}`** ({_describe_type(tp, f.metadata)}; default "
             f"`{_doc_default(default, f.metadata)}`):", f"  {f.metadata['help']}"]
    args = typing.get_args(tp)
    item = args[-1] if typing.get_origin(tp) in (tuple, Mapping) and args else None
    if item is not None and dataclasses.is_dataclass(item):
        item_cls = typing.cast(type[Any], item)
        item_hints = typing.get_type_hints(item_cls)
        lines.append("  Each entry has these keys:")
        for sub in dataclasses.fields(item_cls):
            sub_type = _describe_type(item_hints[sub.name], sub.metadata)
            sub_default = _doc_default(getattr(item_cls(), sub.name), sub.metadata)
            lines.append(f"  - **`{sub.name}`** ({sub_type}; default `{sub_default}`): "
                         f"{sub.metadata['help']}")
    return lines


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from the schema."""
    out = [_REFERENCE_INTRO]

    def emit(cls: type[Any], prefix: str, level: int) -> None:
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            path = _join(prefix, f.name)
            if f.metadata.get("section"):
                sub = typing.cast(type[Any], hints[f.name])
                out.extend(["", f"{'#' * level} `{path}`", "", (sub.__doc__ or "").strip(), ""])
                emit(sub, path, min(level + 1, 4))
                continue
            if not prefix:  # a top-level key that is not a section: users, routes
                out.extend(["", f"{'#' * level} `{path}`", ""])
            out.extend(_reference_field(path, f, hints[f.name], getattr(defaults, f.name)))

    emit(Config, "", 2)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out))
    return text.rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# python -m freecall.config


def main(argv: Sequence[str] | None = None) -> int:
    """``--reference``: print the Markdown reference; ``check FILE``: validate a file."""
    import argparse  # noqa: PLC0415 -- only for this small command line

    parser = argparse.ArgumentParser(prog="python -m freecall.config")
    parser.add_argument("--reference", action="store_true",
                        help="print the Markdown configuration reference")
    parser.add_argument("--defaults", action="store_true",
                        help="print the default configuration as YAML")
    parser.add_argument("command", nargs="?", choices=["check", "show"])
    parser.add_argument("file", nargs="?")
    args = parser.parse_args(argv)
    if args.reference:
        sys.stdout.write(reference_markdown())
        return 0
    if args.defaults:
        sys.stdout.write(yaml.safe_dump(config_to_dict(Config()), sort_keys=False))
        return 0
    if args.command in ("check", "show"):
        try:
            config = load_config(args.file)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        if args.command == "show":
            sys.stdout.write(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        else:
            print(f"{args.file or '<defaults>'}: OK")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
