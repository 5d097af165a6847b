"""Read UDP datagrams out of a tcpdump capture (classic pcap, Ethernet or Linux cooked).

Enough for the media tests to look at what crossed the wire: every IPv4 UDP datagram with its
addresses and payload, in capture order. Fragments and IPv6 are skipped (the tests use
IPv4 loopback, where nothing is fragmented).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

_LINKTYPE_ETHERNET = 1
_LINKTYPE_LINUX_SLL = 113
_LINKTYPE_RAW = 101


@dataclass(frozen=True)
class Datagram:
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes

    def between(self, a: str, b: str) -> bool:
        """Sent from host ``a`` to host ``b`` or back."""
        return {self.src[0], self.dst[0]} == {a, b}


def udp_datagrams(path: Path) -> list[Datagram]:
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic == b"\xd4\xc3\xb2\xa1":
        endian = "<"
    elif magic == b"\xa1\xb2\xc3\xd4":
        endian = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap file (pcapng? use tcpdump -w)")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    offset = 24
    out: list[Datagram] = []
    while offset + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[offset + 8 : offset + 12])[0]
        frame = data[offset + 16 : offset + 16 + incl]
        offset += 16 + incl
        datagram = _udp(frame, linktype)
        if datagram is not None:
            out.append(datagram)
    return out


def _udp(frame: bytes, linktype: int) -> Datagram | None:
    if linktype == _LINKTYPE_ETHERNET:
        if len(frame) < 14 or frame[12:14] != b"\x08\x00":
            return None
        ip = frame[14:]
    elif linktype == _LINKTYPE_LINUX_SLL:
        if len(frame) < 16 or frame[14:16] != b"\x08\x00":
            return None
        ip = frame[16:]
    elif linktype == _LINKTYPE_RAW:
        ip = frame
    else:
        return None
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
        return None
    if struct.unpack(">H", ip[6:8])[0] & 0x3FFF:  # a fragment
        return None
    header = (ip[0] & 0x0F) * 4
    total = struct.unpack(">H", ip[2:4])[0]
    udp = ip[header:total]
    if len(udp) < 8:
        return None
    sport, dport, length = struct.unpack(">HHH", udp[:6])
    src = ".".join(str(b) for b in ip[12:16])
    dst = ".".join(str(b) for b in ip[16:20])
    return Datagram((src, sport), (dst, dport), udp[8:length])
