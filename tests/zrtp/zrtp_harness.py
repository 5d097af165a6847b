"""Two ZrtpSessions wired back to back on a virtual clock (no sockets, no sleeping).

Like aioquic's tests: datagrams move from one session to the other through `Link`, which can
drop, tamper with or record them; time jumps straight to the next deadline.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from freecall.srtp.keys import RetainedSecrets
from freecall.srtp.zrtp import (
    Failed,
    SecureStateReached,
    ZrtpConfig,
    ZrtpEvent,
    ZrtpSession,
)
from freecall.srtp.zrtp_messages import decode_packet, encode_packet, message_type

T = TypeVar("T")
Filter = Callable[[str, bytes, bytes], bytes | None]  # (sender, type block, packet) -> packet


def seeded_urandom(seed: int) -> Callable[[int], bytes]:
    """Deterministic randomness for reproducible runs (tests only)."""
    rng = random.Random(seed)
    return rng.randbytes


def packet_type(packet: bytes) -> bytes:
    return message_type(decode_packet(packet).message)


def rewrite(packet: bytes, edit: Callable[[bytearray], None]) -> bytes:
    """Change the message inside a packet and re-frame it with a valid CRC (an attacker)."""
    decoded = decode_packet(packet)
    message = bytearray(decoded.message)
    edit(message)
    return encode_packet(bytes(message), decoded.sequence, decoded.ssrc)


@dataclass
class Endpoint:
    name: str
    session: ZrtpSession
    cache: RetainedSecrets
    events: list[ZrtpEvent] = field(default_factory=list)

    def drain_events(self) -> None:
        while (event := self.session.next_event()) is not None:
            self.events.append(event)

    def of_type(self, kind: type[T]) -> list[T]:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def secure(self) -> SecureStateReached | None:
        found = self.of_type(SecureStateReached)
        return found[0] if found else None

    @property
    def failed(self) -> Failed | None:
        found = self.of_type(Failed)
        return found[0] if found else None


@dataclass
class Link:
    """Carries datagrams between two endpoints; ``filter`` may drop (None) or alter them."""

    a: Endpoint
    b: Endpoint
    now: float = 0.0
    filter: Filter | None = None
    log: list[tuple[float, str, bytes]] = field(default_factory=list)
    packets: list[tuple[str, bytes]] = field(default_factory=list)
    on_event: Callable[[Endpoint, ZrtpEvent], None] | None = None

    def start(self, a_first: bool = True) -> None:
        first, second = (self.a, self.b) if a_first else (self.b, self.a)
        first.session.start(self.now)
        second.session.start(self.now)
        self.pump()

    def other(self, ep: Endpoint) -> Endpoint:
        return self.b if ep is self.a else self.a

    def pump(self) -> None:
        """Deliver everything queued, repeatedly, until both sides are quiet at ``now``."""
        for _ in range(1000):
            moved = False
            for ep in (self.a, self.b):
                for pkt in ep.session.datagrams_to_send():
                    moved = True
                    kind = packet_type(pkt)
                    self.log.append((self.now, ep.name, kind))
                    self.packets.append((ep.name, pkt))
                    out = self.filter(ep.name, kind, pkt) if self.filter else pkt
                    if out is not None:
                        self.other(ep).session.receive(out, self.now)
                self._events(ep)
            if not moved:
                return
        raise AssertionError("endpoints never went quiet")

    def _events(self, ep: Endpoint) -> None:
        while (event := ep.session.next_event()) is not None:
            ep.events.append(event)
            if self.on_event is not None:
                self.on_event(ep, event)

    def next_deadline(self) -> float | None:
        timers = [t for t in (self.a.session.get_timer(), self.b.session.get_timer()) if t]
        return min(timers) if timers else None

    def advance(self, until: float) -> None:
        """Run timers in order up to ``until``."""
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > until:
                self.now = max(self.now, until)
                self.pump()
                return
            self.now = max(self.now, deadline)
            for ep in (self.a, self.b):
                timer = ep.session.get_timer()
                if timer is not None and timer <= self.now:
                    ep.session.handle_timer(self.now)
            self.pump()

    def run(self, limit: float = 30.0) -> None:
        """Run until both sides are done (secure or failed) and no timer is pending."""
        self.pump()
        while True:
            deadline = self.next_deadline()
            done = all(ep.secure is not None or ep.failed is not None for ep in (self.a, self.b))
            if deadline is None or (done and deadline > self.now + limit) or deadline > limit:
                return
            self.advance(deadline)

    def sent(self, name: str, kind: bytes) -> list[float]:
        return [t for t, who, k in self.log if who == name and k == kind]


def make_endpoint(
    name: str,
    config: ZrtpConfig | None = None,
    cache: RetainedSecrets | None = None,
    seed: int = 1,
    ssrc: int | None = None,
    **kwargs: object,
) -> Endpoint:
    urandom = seeded_urandom(seed)
    cache = cache if cache is not None else RetainedSecrets(None, urandom=urandom)
    session = ZrtpSession(
        config or ZrtpConfig(),
        cache.zid,
        cache,
        ssrc=ssrc if ssrc is not None else 0x1000 + seed,
        urandom=urandom,
        **kwargs,  # type: ignore[arg-type]
    )
    return Endpoint(name, session, cache)


def make_pair(
    config_a: ZrtpConfig | None = None,
    config_b: ZrtpConfig | None = None,
    cache_a: RetainedSecrets | None = None,
    cache_b: RetainedSecrets | None = None,
    seed: int = 1,
) -> Link:
    a = make_endpoint("A", config_a, cache_a, seed=seed * 2 + 1)
    b = make_endpoint("B", config_b, cache_b, seed=seed * 2 + 2)
    return Link(a, b)


class FakePeer:
    """A hand-driven ZRTP endpoint that builds correctly chained and MAC-ed messages.

    Used to send what a real session never would (odd algorithm choices, old versions).
    """

    def __init__(self, seed: int = 99, zid: bytes | None = None, ssrc: int = 0xFACE) -> None:
        from freecall.srtp.zrtp_crypto import HashChain

        self.urandom = seeded_urandom(seed)
        self.chain = HashChain.generate(self.urandom)
        self.zid = zid or self.urandom(12)
        self.ssrc = ssrc
        self.seq = 0

    def packet(self, message: bytes) -> bytes:
        from freecall.srtp.zrtp_messages import encode_packet

        self.seq += 1
        return encode_packet(message, self.seq, self.ssrc)

    def hello(self, version: bytes = b"1.10", **lists: tuple[bytes, ...]) -> bytes:
        from freecall.srtp.zrtp_crypto import implicit_mac
        from freecall.srtp.zrtp_messages import Hello

        encoded = Hello(
            version=version,
            client_id=b"FakePeer".ljust(16),
            h3=self.chain.h3,
            zid=self.zid,
            **lists,  # type: ignore[arg-type]
        ).encode()
        self.hello_raw = encoded[:-8] + implicit_mac(self.chain.h2, encoded[:-8])
        return self.hello_raw

    def commit(self, peer_hello: bytes, **choices: bytes) -> bytes:
        from freecall.srtp.zrtp_crypto import implicit_mac
        from freecall.srtp.zrtp_messages import Commit

        fields = {
            "hash_type": b"S256",
            "cipher_type": b"AES1",
            "auth_tag_type": b"HS80",
            "key_agreement_type": b"DH3k",
            "sas_type": b"B32 ",
        }
        nonce = choices.pop("nonce", None)
        fields.update(choices)
        extra: dict[str, bytes] = {}
        if fields["key_agreement_type"] in (b"Mult", b"Prsh"):
            extra["nonce"] = nonce or self.urandom(16)
            if fields["key_agreement_type"] == b"Prsh":
                extra["key_id"] = self.urandom(8)
        else:
            extra["hvi"] = self.urandom(32)
        encoded = Commit(h2=self.chain.h2, zid=self.zid, **fields, **extra).encode()
        return encoded[:-8] + implicit_mac(self.chain.h1, encoded[:-8])
