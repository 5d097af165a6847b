"""A tiny in-memory TURN client for the relay core's unit tests (tests/relay): signed requests
built with the relay's own codec (aioice cross-checks the codec separately), a fake port
allocator."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from freecall.relay.credentials import turn_password
from freecall.relay.server import Addr, RelayServer, TurnSettings
from freecall.relay.stun import (
    Attr,
    Class,
    Method,
    StunMessage,
    decode_error_code,
    decode_xor_address,
    encode_message,
    encode_xor_address,
    long_term_key,
    parse_message,
)

SECRET = "test-shared-secret-0123456789"
REALM = "relay.test"
WALL = 1_700_000_000.0  # Unix time at now == 0


class FakePorts:
    """RelayPorts without sockets: hands out 198.51.100.1:50000, :50001, ..."""

    def __init__(self, limit: int = 1000) -> None:
        self.open_now: set[Addr] = set()
        self.counter = itertools.count(50000)
        self.limit = limit

    def open(self, family: int, even: bool) -> Addr | None:
        if len(self.open_now) >= self.limit:
            return None
        port = next(self.counter)
        if even and port % 2:
            port = next(self.counter)
        addr = ("198.51.100.1", port)
        self.open_now.add(addr)
        return addr

    def close(self, relayed: Addr) -> None:
        self.open_now.remove(relayed)


def make_server(**overrides: Any) -> tuple[RelayServer, FakePorts]:
    ports = FakePorts(overrides.pop("port_limit", 1000))
    settings = TurnSettings(realm=REALM, secret=SECRET, wall_offset=WALL, **overrides)
    counter = itertools.count()
    return RelayServer(settings, ports,
                       urandom=lambda n: bytes((next(counter) + i) % 256 for i in range(n))
                       ), ports


_tids = itertools.count(1)


def tid() -> bytes:
    return next(_tids).to_bytes(12, "big")


@dataclass
class Client:
    """One TURN client at ``addr``, for node ``node``, talking to ``server`` in memory."""

    server: RelayServer
    addr: Addr = ("203.0.113.5", 40000)
    node: str = "node-a"
    expiry: int = int(WALL) + 3600
    secret: str = SECRET
    nonce: bytes = b""
    realm: bytes = REALM.encode()
    now: float = 0.0
    inbox: list[bytes] = field(default_factory=list)
    password: str | None = None
    """Overrides the shared-secret password (node-key credentials)."""

    @property
    def username(self) -> str:
        return f"{self.expiry}:{self.node}"

    @property
    def key(self) -> bytes:
        password = self.password or turn_password(self.secret, self.username)
        return long_term_key(self.username, self.realm.decode(), password)

    def send(self, data: bytes) -> list[tuple[Addr | None, bytes, Addr]]:
        self.server.receive(data, self.addr, self.now)
        out = self.server.datagrams_to_send()
        self.inbox.extend(d for _, d, dest in out if dest == self.addr)
        return out

    def request(self, method: int, attrs: Sequence[tuple[int, bytes]] | None = None, *,
                signed: bool = True, transaction: bytes | None = None,
                retry: bool = True) -> StunMessage:
        """Send a request (signed with the long-term key once a nonce is known); on 401/438
        learn realm and nonce and retry once, like a real client."""
        t = transaction or tid()
        body = list(attrs or [])
        if signed and self.nonce:
            body += [(Attr.USERNAME, self.username.encode()), (Attr.REALM, self.realm),
                     (Attr.NONCE, self.nonce)]
            data = encode_message(method, Class.REQUEST, t, body, key=self.key)
        else:
            data = encode_message(method, Class.REQUEST, t, body)
        out = self.send(data)
        responses = [parse_message(d) for _, d, dest in out if dest == self.addr]
        assert len(responses) == 1, out
        response = responses[0]
        code = error_of(response)
        if code in (401, 438) and signed and retry:
            nonce = response.get(Attr.NONCE)
            assert nonce is not None
            self.nonce = nonce
            return self.request(method, attrs, signed=True, retry=False)
        return response

    def allocate(self, *extra: tuple[int, bytes]) -> StunMessage:
        return self.request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, b"\x11\0\0\0"),
                                              *extra])

    def relayed(self, response: StunMessage) -> Addr:
        value = response.get(Attr.XOR_RELAYED_ADDRESS)
        assert value is not None
        return decode_xor_address(value, response.transaction_id)

    def permission(self, *peers: Addr) -> StunMessage:
        t = tid()
        return self.request(Method.CREATE_PERMISSION, [
            (Attr.XOR_PEER_ADDRESS, encode_xor_address(p, t)) for p in peers], transaction=t)

    def bind_channel(self, number: int, peer: Addr) -> StunMessage:
        t = tid()
        return self.request(Method.CHANNEL_BIND, [
            (Attr.CHANNEL_NUMBER, number.to_bytes(2, "big") + b"\0\0"),
            (Attr.XOR_PEER_ADDRESS, encode_xor_address(peer, t))], transaction=t)

    def refresh(self, lifetime: int | None = None) -> StunMessage:
        attrs = [] if lifetime is None else [(Attr.LIFETIME, lifetime.to_bytes(4, "big"))]
        return self.request(Method.REFRESH, attrs)


def error_of(msg: StunMessage) -> int | None:
    if msg.cls != Class.ERROR:
        return None
    value = msg.get(Attr.ERROR_CODE)
    assert value is not None
    return decode_error_code(value)[0]
