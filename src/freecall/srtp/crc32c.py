"""CRC-32C (Castagnoli, RFC 3309 / RFC 4960 Appendix B), table driven.

ZRTP (RFC 6189 section 5) protects each packet with this CRC to tell transmission errors from
attacks. `zlib.crc32` is the wrong polynomial, so this is written out. Reflected algorithm:
polynomial 0x1EDC6F41 (0x82F63B78 bit-reversed), initial value and final XOR 0xFFFFFFFF.

Byte order on the wire follows RFC 4960 Appendix B as the ZRTP implementations do (bzrtp,
libzrtp, GNU ZRTP): the CRC value is written least significant byte first. See `crc32c_bytes`.
"""

from __future__ import annotations

_POLY_REFLECTED = 0x82F63B78


def _make_table() -> tuple[int, ...]:
    """Build the 256-entry lookup table once at import (immutable)."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_POLY_REFLECTED if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """Return the CRC-32C of ``data``; pass a previous result as ``crc`` to continue it."""
    value = crc ^ 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        value = (value >> 8) ^ table[(value ^ byte) & 0xFF]
    return value ^ 0xFFFFFFFF


def crc32c_bytes(data: bytes) -> bytes:
    """The 4 CRC octets as carried in a ZRTP packet (RFC 4960 Appendix B order)."""
    return crc32c(data).to_bytes(4, "little")
