"""freecall.srtp: media keys. ZRTP (RFC 6189) core and SRTP helpers.

- `zrtp`: the sans-I/O ZRTP state machine (`ZrtpSession`, `ZrtpConfig`, events).
- `zrtp_messages`: packet framing, every message format, datagram demultiplexing.
- `zrtp_crypto`: KDF, hash chain, DH3k / EC25 / X255, AES-CFB, algorithm negotiation.
- `sas`: B32 and B256 rendering; the PGP word lists live in ``data/``.
- `keys`: the node's ZID and the retained-secret cache file.
- `srtp_policy`: ZRTP keys to pylibsrtp policies.
- `crc32c`: the CRC-32C that frames ZRTP packets.
- `bridge`: the media bridge: per-call RTP on loopback <-> ZRTP-keyed SRTP on the wire.
- `calls`: the SDP side of the bridge, as the proxy's media hook.
- `rtp`: RTP/RTCP header helpers and loss accounting (RFC 3550 appendix A.3).
- `media_ports`: even/odd port pairs from the configured range.
"""
