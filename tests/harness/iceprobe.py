"""One ICE agent (freecall.srtp.ice) on a real UDP socket, driven over stdin/stdout: the NAT
lab runs one in each home namespace and plays the signalling between them.

    python iceprobe.py --bind 10.0.1.2 --stun 198.51.100.1:3478 \
        [--turn 198.51.100.1:3478 --user U --password P] [--controlling]

Lines out (JSON): ``{"params": ...}`` once gathering is complete, ``{"selected": ...}`` when a
pair is selected (or ``{"failed": reason}``), then ``{"received": N, "sources": [...]}`` after
the media phase. Line in: the far end's ``params``. Media: 50 packets, one every 20 ms, each
``0x80 <seq> probe-<name>`` (an RTP-like first octet, so it is not taken for STUN).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from typing import Any

from freecall.srtp.ice import (
    Candidate,
    GatheringComplete,
    IceAgent,
    IceFailed,
    IceParameters,
    PairSelected,
    TurnServer,
)

Addr = tuple[str, int]


def _addr(text: str) -> Addr:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _params_json(params: IceParameters) -> dict[str, Any]:
    return {"ufrag": params.ufrag, "pwd": params.pwd,
            "candidates": [c.to_sdp() for c in params.candidates]}


def _params_from(data: dict[str, Any]) -> IceParameters:
    return IceParameters(data["ufrag"], data["pwd"],
                         tuple(Candidate.from_sdp(c) for c in data["candidates"]))


class Probe(asyncio.DatagramProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, agent: IceAgent) -> None:
        self.loop = loop
        self.agent = agent
        self.transport: asyncio.DatagramTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.gathered = asyncio.Event()
        self.done = asyncio.Event()
        self.received: list[bytes] = []
        self.sources: set[str] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        if data and (data[0] < 4 or 0x40 <= data[0] <= 0x4F):
            inner = self.agent.receive(data, addr, self.loop.time())
            if inner is not None:
                self._media(*inner, via=f"{addr[0]}:{addr[1]}")
            self.pump()
        else:
            self._media(data, addr, via="direct")

    def _media(self, data: bytes, peer: Addr, via: str) -> None:
        if data.startswith(b"\x80"):
            self.received.append(data)
            self.sources.add(f"{peer[0]}:{peer[1]} via {via}")

    def pump(self) -> None:
        assert self.transport is not None
        for data, dest in self.agent.datagrams_to_send():
            self.transport.sendto(data, dest)
        while (event := self.agent.next_event()) is not None:
            if isinstance(event, GatheringComplete):
                self.gathered.set()
            elif isinstance(event, PairSelected):
                _say({"selected": {"local": event.local.to_sdp(), "remote": event.remote.to_sdp(),
                                   "relayed": event.relayed}})
                self.done.set()
            elif isinstance(event, IceFailed):
                _say({"failed": event.reason})
                self.done.set()
        if self.timer is not None:
            self.timer.cancel()
        at = self.agent.get_timer()
        self.timer = self.loop.call_at(at, self.fire) if at is not None else None

    def fire(self) -> None:
        self.timer = None
        self.agent.handle_timer(self.loop.time())
        self.pump()

    def send_media(self, payload: bytes) -> None:
        selected = self.agent.selected
        assert selected is not None and self.transport is not None
        if selected.base == "relay":
            wrapped = self.agent.wrap(payload, selected.remote.addr)
            if wrapped is not None:
                self.transport.sendto(*wrapped)
        else:
            self.transport.sendto(payload, selected.remote.addr)


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True)
    parser.add_argument("--name", default="probe")
    parser.add_argument("--stun", default=None)
    parser.add_argument("--turn", default=None)
    parser.add_argument("--user", default="")
    parser.add_argument("--password", default="")
    parser.add_argument("--controlling", action="store_true")
    args = parser.parse_args(argv)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.bind, 0))
    port = sock.getsockname()[1]
    agent = IceAgent(
        controlling=args.controlling, host_addresses=[(args.bind, port)],
        stun_servers=[_addr(args.stun)] if args.stun else [],
        turn_servers=[TurnServer(_addr(args.turn), args.user, args.password)]
        if args.turn else [],
    )
    probe = Probe(loop, agent)
    transport, _ = await loop.create_datagram_endpoint(lambda: probe, sock=sock)
    agent.gather(loop.time())
    probe.pump()
    await asyncio.wait_for(probe.gathered.wait(), 10)
    _say({"params": _params_json(agent.local_parameters)})
    line = await loop.run_in_executor(None, sys.stdin.readline)
    agent.set_remote(_params_from(json.loads(line)), loop.time())
    probe.pump()
    await asyncio.wait_for(probe.done.wait(), 20)
    if agent.selected is not None:
        for seq in range(50):
            probe.send_media(b"\x80" + bytes([seq]) + f"probe-{args.name}".encode())
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)
    _say({"received": len(probe.received), "sources": sorted(probe.sources)})
    agent.close(loop.time())
    probe.pump()
    await asyncio.sleep(0.1)
    transport.close()


if __name__ == "__main__":
    asyncio.run(main())
