"""freecall.srtp: media keys. ZRTP (RFC 6189) core and SRTP helpers.

- `zrtp`: the sans-I/O ZRTP state machine (`ZrtpSession`, `ZrtpConfig`, events).
- `zrtp_messages`: packet framing, every message format, datagram demultiplexing.
- `zrtp_crypto`: KDF, hash chain, DH3k / EC25 / X255, AES-CFB, algorithm negotiation.
- `sas`: B32 and B256 rendering; the PGP word lists live in ``data/``.
- `keys`: the node's ZID and the retained-secret cache file.
- `srtp_policy`: ZRTP keys to pylibsrtp policies.
- `crc32c`: the CRC-32C that frames ZRTP packets.
"""
