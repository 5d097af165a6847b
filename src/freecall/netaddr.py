"""This host's own addresses, for what a node announces when it listens on a wildcard.

``sip.advertise`` documents the order: a configured address, else the first ``public``
listener that is not a wildcard, else the address of the interface with the default route.
A host with no default route (a LAN, a network namespace) falls back to its first global or
private interface address, found with ``ifaddr`` (a dependency of ``zeroconf``).
"""

from __future__ import annotations

import ipaddress
import socket

import ifaddr

# Documentation addresses (RFC 5737, RFC 3849): connecting a UDP socket to them only asks the
# kernel which source address its routing table would pick; no packet is sent.
_PROBE = {socket.AF_INET: "192.0.2.1", socket.AF_INET6: "2001:db8::1"}


def default_route_address(family: socket.AddressFamily = socket.AF_INET) -> str | None:
    """The source address the kernel would use toward the Internet, or None (no route)."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((_PROBE[family], 9))
            host = str(probe.getsockname()[0])
    except OSError:
        return None
    return None if ipaddress.ip_address(host).is_unspecified else host


def interface_addresses(version: int = 4) -> list[str]:
    """Addresses of the up interfaces, loopback and link-local left out."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                address = ipaddress.ip_address(text.split("%")[0])
            except ValueError:
                continue
            if address.version != version or address.is_loopback or address.is_link_local:
                continue
            if str(address) not in found:
                found.append(str(address))
    return found


def own_address(version: int = 4) -> str | None:
    """This host's best guess at the address others reach it on (module docstring)."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    host = default_route_address(family)
    if host is not None:
        return host
    others = interface_addresses(version)
    return others[0] if others else None
