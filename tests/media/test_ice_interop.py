"""Our ICE agent against aioice's (the aiortc project's ICE, written by others) over real UDP
sockets: both roles, checks, nomination, media both ways, and consent checks answered."""

from __future__ import annotations

import asyncio

import aioice
import pytest

from freecall.srtp.ice import Candidate, IceAgent, IceParameters, PairSelected

HOST = "192.0.2.2"  # aioice gathers on the interface addresses; this VM's eth0 (local traffic)


class Edge(asyncio.DatagramProtocol):
    """The asyncio side of one agent: a socket, the agent's outputs, its timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.agent: IceAgent | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.media: asyncio.Queue[bytes] = asyncio.Queue()
        self.selected = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.agent is not None
        if data[0] < 4:
            self.agent.receive(data, addr, self.loop.time())
            self.pump()
        else:
            self.media.put_nowait(data)

    def pump(self) -> None:
        assert self.agent is not None and self.transport is not None
        for data, dest in self.agent.datagrams_to_send():
            self.transport.sendto(data, dest)
        while (event := self.agent.next_event()) is not None:
            if isinstance(event, PairSelected):
                self.selected.set()
        if self.timer is not None:
            self.timer.cancel()
        at = self.agent.get_timer()
        if at is not None:
            self.timer = self.loop.call_at(at, self.fire)

    def fire(self) -> None:
        assert self.agent is not None
        self.timer = None
        self.agent.handle_timer(self.loop.time())
        self.pump()


@pytest.mark.parametrize("we_control", [True, False])
def test_our_agent_and_aioice_select_a_pair_and_carry_media(we_control: bool) -> None:
    asyncio.run(_agents_meet(we_control))


async def _agents_meet(we_control: bool) -> None:
    loop = asyncio.get_running_loop()
    edge = Edge(loop)
    transport, _ = await loop.create_datagram_endpoint(lambda: edge, local_addr=(HOST, 0))
    port = transport.get_extra_info("sockname")[1]
    agent = IceAgent(controlling=we_control, host_addresses=[(HOST, port)])
    edge.agent = agent
    agent.gather(loop.time())
    edge.pump()

    theirs = aioice.Connection(ice_controlling=not we_control, components=1, use_ipv6=False)
    try:
        await theirs.gather_candidates()
        remote = IceParameters(
            theirs.local_username, theirs.local_password,
            tuple(Candidate.from_sdp(c.to_sdp()) for c in theirs.local_candidates
                  if c.host == HOST),
        )
        assert remote.candidates, theirs.local_candidates
        theirs.remote_username = agent.ufrag
        theirs.remote_password = agent.pwd
        for cand in agent.local_candidates:
            await theirs.add_remote_candidate(aioice.Candidate.from_sdp(cand.to_sdp()))
        await theirs.add_remote_candidate(None)
        agent.set_remote(remote, loop.time())
        edge.pump()
        await asyncio.wait_for(theirs.connect(), 10)
        await asyncio.wait_for(edge.selected.wait(), 10)
        selected = agent.selected
        assert selected is not None and selected.remote.host == HOST

        # Media both ways over the pair both agents chose.
        await theirs.send(b"\x80\x00from-aioice")
        assert await asyncio.wait_for(edge.media.get(), 5) == b"\x80\x00from-aioice"
        assert edge.transport is not None
        edge.transport.sendto(b"\x80\x00from-freecall", selected.remote.addr)
        assert await asyncio.wait_for(theirs.recv(), 5) == b"\x80\x00from-freecall"
        assert agent.stats["bad_stun"] == 0
    finally:
        await theirs.close()
        if edge.timer is not None:
            edge.timer.cancel()
        transport.close()
