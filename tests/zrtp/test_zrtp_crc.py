"""CRC-32C known answers (RFC 3720 B.4, the CRC-32C check value) and ZRTP byte order."""

from __future__ import annotations

import pytest

from freecall.srtp.crc32c import crc32c, crc32c_bytes


def test_check_value() -> None:
    # The standard CRC catalogue check value for CRC-32C (Castagnoli).
    assert crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        # RFC 3720 (iSCSI) Appendix B.4, the octets as they are sent.
        (bytes(32), "aa36918a"),
        (b"\xff" * 32, "43aba862"),
        (bytes(range(32)), "4e79dd46"),
        (bytes(range(31, -1, -1)), "5cdb3f11"),
    ],
)
def test_rfc3720_vectors_and_wire_order(data: bytes, wire: str) -> None:
    # RFC 4960 Appendix B byte order, as ZRTP (and bzrtp) put the CRC on the wire.
    assert crc32c_bytes(data).hex() == wire
    assert crc32c(data) == int.from_bytes(bytes.fromhex(wire), "little")


def test_incremental() -> None:
    data = bytes(range(200))
    assert crc32c(data[100:], crc32c(data[:100])) == crc32c(data)
    assert crc32c(b"") == 0
