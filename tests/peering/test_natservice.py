"""NatService's asyncio loop (freecall.peering.natservice): a gathering that contradicts STUN
brings the next probe forward, at most once per RECHECK_MIN, and a change of verdict wakes the
relay link at once instead of at its next look (IDLE_CHECK).

The STUN server is freecall's own relay core (freecall.relay.server) on a real loopback UDP
socket; the peering service and SIP transport are small stand-ins with only what NatService
touches (records, set_nat; loop, connect), since neither is under test here."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, cast

import pytest

from freecall.config import NatConfig
from freecall.peering import natservice
from freecall.peering.nat import NatView
from freecall.peering.records import (
    Address,
    AddrKind,
    Ext,
    Flag,
    NodeIdentity,
    NodeRecord,
    decode_record,
)
from freecall.relay.server import RelayServer, TurnSettings


class _NoPorts:
    def open(self, family: int, even: bool) -> tuple[str, int] | None:
        return None

    def close(self, relayed: tuple[str, int]) -> None:
        pass


class _StunServer(asyncio.DatagramProtocol):
    """The relay's STUN core on a socket; remembers when each new transaction arrived."""

    def __init__(self) -> None:
        self.core = RelayServer(TurnSettings(realm="r", secret="s" * 16), _NoPorts())
        self.probes: list[float] = []
        self._seen: set[bytes] = set()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        tid = data[8:20]
        if tid not in self._seen:
            self._seen.add(tid)
            self.probes.append(time.monotonic())
        self.core.receive(data, (addr[0], addr[1]), 0.0)
        assert self.transport is not None
        for _relayed, out, destination in self.core.datagrams_to_send():
            self.transport.sendto(out, destination)


class _Peering:
    def __init__(self, records: list[NodeRecord]) -> None:
        self._records = records
        self.published: list[dict[str, Any]] = []

    def records(self) -> list[NodeRecord]:
        return self._records

    def set_nat(self, **kwargs: Any) -> None:
        self.published.append(kwargs)


class _Transport:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.connects: list[tuple[str, tuple[str, int], float]] = []
        self.on_flow_opened: Any = None
        self.on_pong: Any = None

    def connect(self, kind: str, addr: tuple[str, int]) -> None:
        # no flow: NatService counts a failure and backs off, which is enough here
        self.connects.append((kind, addr, time.monotonic()))


def _service(config: NatConfig, *, stun: list[tuple[str, int]], records: list[NodeRecord],
             local: bool, view: NatView) -> tuple[natservice.NatService, _Transport, _Peering]:
    transport, peering = _Transport(), _Peering(records)
    service = natservice.NatService(
        config, transport=transport, peering=peering,  # type: ignore[arg-type]
        identity=NodeIdentity.generate(), stun=stun, is_local=lambda host: local,
        sent_by="127.0.0.1:5061", view=view)
    return service, transport, peering


async def _until(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_contradicting_gathering_brings_the_probe_forward_once_per_recheck_min(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(natservice, "RECHECK_MIN", 0.4)
    asyncio.run(asyncio.wait_for(_recheck(0.4), 20))


async def _recheck(recheck: float) -> None:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(_StunServer,
                                                            local_addr=("127.0.0.1", 0))
    view = NatView()
    service, _, peering = _service(
        NatConfig(stun=True, attach="never", probe_interval=3600.0),
        stun=[transport.get_extra_info("sockname")[:2]], records=[], local=True, view=view)
    service.start()
    try:
        await _until(lambda: view.stun.behind_nat is False, 3.0)
        assert len(server.probes) == 1
        assert view.behind_nat is False and view.source == "stun"
        # The media now says "behind NAT" again and again for 1.5 s (a laptop that moved):
        # STUN is asked again, but no more than once per RECHECK_MIN.
        started = time.monotonic()
        while time.monotonic() - started < 1.5:
            view.from_media(True, [("203.0.113.9", 4000)])
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.1)
        probes = server.probes
        gaps = [b - a for a, b in itertools.pairwise(probes)]
        assert 2 <= len(probes) <= 2 + int(1.6 / recheck), probes
        assert min(gaps) >= recheck - 0.05, gaps
        assert view.behind_nat is False  # STUN's answer still wins over the gathering
        assert view.source == "stun" and not peering.published[-1]["reflexive"]
    finally:
        await service.stop()
        transport.close()


def test_a_change_of_verdict_wakes_the_relay_link_at_once() -> None:
    asyncio.run(asyncio.wait_for(_wake(), 20))


async def _wake() -> None:
    relay = NodeIdentity.generate()
    record = decode_record(relay.make_record(
        seq=1, expires=int(time.time()) + 3600,
        addresses=(Address(AddrKind.SIP_TLS, "127.0.0.1", 1),), flags=Flag.RELAY,
        extensions=((Ext.TLS_FINGERPRINT, bytes(range(32))),)).raw)
    view = NatView()
    service, transport, peering = _service(
        NatConfig(stun=False, attach="auto"), stun=[], records=[record], local=False,
        view=view)
    service.start()
    try:
        await asyncio.sleep(0.2)  # the loop has looked once and waits IDLE_CHECK (5 s)
        assert transport.connects == [] and view.behind_nat is None
        woken = time.monotonic()
        view.from_media(True, [("203.0.113.9", 4000)])
        await _until(lambda: transport.connects, 1.0)
        kind, addr, at = transport.connects[0]
        assert (kind, addr) == ("tls", ("127.0.0.1", 1))
        assert at - woken < natservice.IDLE_CHECK / 5
        # the record publishes the media's reflexive address: the verdict came from there
        assert peering.published[-1]["reflexive"] == ("203.0.113.9", 4000)
    finally:
        await service.stop()
