"""The ICE agent (srtp/ice.py) on virtual time: two agents behind simulated NATs, the relay's
real STUN/TURN core (relay/server.py) on the public side, every datagram through a NAT model.

NAT behaviours after RFC 4787: endpoint-independent mapping and filtering ("full cone"),
endpoint-independent mapping with address-and-port-dependent filtering ("port-restricted"),
and address-and-port-dependent mapping ("symmetric"). Private addresses are not routed between
homes, so only server-reflexive, peer-reflexive and relayed paths can work.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
from dataclasses import dataclass, field

import pytest

from freecall.relay.credentials import turn_password
from freecall.relay.server import RelayServer, TurnSettings
from freecall.relay.stun import Attr, Class, Method, encode_message, parse_message
from freecall.srtp import ice
from freecall.srtp.ice import (
    Candidate,
    ConsentLost,
    GatheringComplete,
    IceAgent,
    IceError,
    IceFailed,
    IceParameters,
    PairSelected,
    TurnServer,
)
from turnclient import REALM, SECRET, WALL, FakePorts

Addr = tuple[str, int]
SERVER: Addr = ("198.51.100.1", 3478)
LATENCY = 0.015


@dataclass
class Nat:
    """One home router: ``kind`` is "full-cone", "port-restricted" or "symmetric"."""

    public_ip: str
    kind: str
    next_port: itertools.count[int] = field(default_factory=lambda: itertools.count(40000))
    mappings: dict[tuple[Addr, Addr | None], int] = field(default_factory=dict)
    inside: dict[int, Addr] = field(default_factory=dict)
    allowed: dict[int, set[Addr]] = field(default_factory=dict)

    def outbound(self, source: Addr, dest: Addr) -> Addr:
        key = (source, dest if self.kind == "symmetric" else None)
        port = self.mappings.get(key)
        if port is None:
            port = next(self.next_port)
            self.mappings[key] = port
            self.inside[port] = source
            self.allowed[port] = set()
        self.allowed[port].add(dest)
        return (self.public_ip, port)

    def inbound(self, source: Addr, port: int) -> Addr | None:
        internal = self.inside.get(port)
        if internal is None:
            return None
        if self.kind != "full-cone" and source not in self.allowed[port]:
            return None
        return internal


@dataclass
class Node:
    agent: IceAgent
    addr: Addr
    nat: Nat | None
    media: list[tuple[bytes, Addr]] = field(default_factory=list)
    events: list[object] = field(default_factory=list)


class World:
    """Virtual time, a relay server, and nodes (each one agent on one socket)."""

    def __init__(self, seed: int = 1, loss: float = 0.0) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self.loss = loss
        self.queue: list[tuple[float, int, Addr, bytes, Addr]] = []
        self.seq = itertools.count()
        self.ports = FakePorts()
        counter = itertools.count()
        self.relay = RelayServer(
            TurnSettings(realm=REALM, secret=SECRET, wall_offset=WALL,
                         allow_peers=(ipaddress.ip_network("203.0.113.0/24"),
                                      ipaddress.ip_network("198.51.100.0/24"))),
            self.ports,
            urandom=lambda n: bytes((next(counter) + i) % 256 for i in range(n)),
        )
        self.nodes: list[Node] = []
        self.nats: dict[str, Nat] = {}
        self.relayed_media = 0

    def urandom(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def add(self, name: int, nat_kind: str | None, *, controlling: bool,
            turn: bool = True, stun: bool = True) -> Node:
        if nat_kind is None:
            addr: Addr = (f"198.51.100.{10 + name}", 20000)
            nat = None
        else:
            addr = (f"10.0.{name}.2", 20000)
            nat = Nat(f"203.0.113.{name}", nat_kind)
            self.nats[nat.public_ip] = nat
        username = f"{int(WALL) + 3600}:node{name}"
        agent = IceAgent(
            controlling=controlling, host_addresses=[addr],
            stun_servers=[SERVER] if stun else [],
            turn_servers=[TurnServer(SERVER, username, turn_password(SECRET, username))]
            if turn else [],
            urandom=self.urandom,
        )
        node = Node(agent, addr, nat)
        self.nodes.append(node)
        return node

    # -- the network ---------------------------------------------------------------------------

    def send(self, source: Addr, data: bytes, dest: Addr) -> None:
        node = next((n for n in self.nodes if n.addr == source), None)
        if node is not None and node.nat is not None:
            if dest[0].startswith("10."):
                return  # private addresses are not routed between homes
            source = node.nat.outbound(source, dest)
        if self.loss and self.rng.random() < self.loss:
            return
        heapq.heappush(self.queue, (self.now + LATENCY, next(self.seq), source, data, dest))

    def deliver(self, source: Addr, data: bytes, dest: Addr) -> None:
        if dest == SERVER:
            self.relay.receive(data, source, self.now)
            self.flush_relay()
            return
        if dest[0] == SERVER[0]:
            self.relay.receive_relayed(dest, data, source, self.now)
            self.flush_relay()
            return
        nat = self.nats.get(dest[0])
        if nat is not None:
            internal = nat.inbound(source, dest[1])
            if internal is None:
                return
            dest = internal
        node = next((n for n in self.nodes if n.addr == dest), None)
        if node is None:
            return
        if data[0] < 4 or 0x40 <= data[0] <= 0x4F:
            inner = node.agent.receive(data, source, self.now)
            if inner is not None:
                node.media.append(inner)
        else:
            node.media.append((data, source))
        self.pump(node)

    def flush_relay(self) -> None:
        for relayed, data, dest in self.relay.datagrams_to_send():
            source = relayed if relayed is not None else SERVER
            heapq.heappush(self.queue, (self.now + LATENCY, next(self.seq), source, data, dest))

    def pump(self, node: Node) -> None:
        for data, dest in node.agent.datagrams_to_send():
            self.send(node.addr, data, dest)
        while (event := node.agent.next_event()) is not None:
            node.events.append(event)

    def run(self, until: float) -> None:
        while self.now < until:
            deadlines = [t for n in self.nodes if (t := n.agent.get_timer()) is not None]
            relay_timer = self.relay.get_timer()
            next_packet = self.queue[0][0] if self.queue else None
            candidates = [t for t in (*deadlines, next_packet, relay_timer) if t is not None]
            if not candidates:
                self.now = until
                return
            at = max(self.now, min(candidates))
            if at > until:
                self.now = until
                return
            self.now = at
            if next_packet is not None and next_packet <= at:
                _, _, source, data, dest = heapq.heappop(self.queue)
                self.deliver(source, data, dest)
                continue
            if relay_timer is not None and relay_timer <= at:
                self.relay.handle_timer(at)
                self.flush_relay()
            for node in self.nodes:
                t = node.agent.get_timer()
                if t is not None and t <= at:
                    node.agent.handle_timer(at)
                    self.pump(node)

    # -- helpers -------------------------------------------------------------------------------

    def gather(self) -> None:
        for node in self.nodes:
            node.agent.gather(self.now)
            self.pump(node)
        self.run(self.now + 5.0)
        for node in self.nodes:
            assert any(isinstance(e, GatheringComplete) for e in node.events), node.events

    def exchange(self, a: Node, b: Node) -> None:
        """The offer/answer: each side gets the other's parameters."""
        a.agent.set_remote(b.agent.local_parameters, self.now)
        b.agent.set_remote(a.agent.local_parameters, self.now)
        self.pump(a)
        self.pump(b)

    def send_media(self, node: Node, payload: bytes) -> None:
        selected = node.agent.selected
        assert selected is not None
        peer = selected.remote.addr
        if selected.base == "relay":
            wrapped = node.agent.wrap(payload, peer)
            assert wrapped is not None
            self.send(node.addr, *wrapped)
        else:
            self.send(node.addr, payload, peer)


def selected_event(node: Node) -> PairSelected:
    found = [e for e in node.events if isinstance(e, PairSelected)]
    assert len(found) == 1, node.events
    return found[0]


def call(world: World, a: Node, b: Node) -> tuple[PairSelected, PairSelected]:
    world.gather()
    world.exchange(a, b)
    world.run(world.now + 10.0)
    sa, sb = selected_event(a), selected_event(b)
    # Media both ways over the selected pair (RTP's first octet 0x80).
    before = world.relay.stats.relayed_packets
    for i in range(5):
        world.send_media(a, b"\x80" + bytes([i]) + b"a" * 20)
        world.send_media(b, b"\x80" + bytes([i]) + b"b" * 20)
    world.run(world.now + 1.0)
    world.relayed_media = world.relay.stats.relayed_packets - before
    assert len([m for m, _ in b.media if m.endswith(b"a" * 20)]) == 5
    assert len([m for m, _ in a.media if m.endswith(b"b" * 20)]) == 5
    return sa, sb


# -- the NAT matrix ------------------------------------------------------------------------------


def test_both_public_hosts_connect_directly() -> None:
    world = World()
    a = world.add(1, None, controlling=True)
    b = world.add(2, None, controlling=False)
    sa, sb = call(world, a, b)
    assert sa.remote.kind == "host" and not sa.relayed
    assert sb.remote.addr == a.addr and not sb.relayed
    assert world.relayed_media == 0


@pytest.mark.parametrize("kind", ["full-cone", "port-restricted"])
def test_cone_nats_connect_directly_through_server_reflexive_addresses(kind: str) -> None:
    world = World()
    a = world.add(1, kind, controlling=True)
    b = world.add(2, kind, controlling=False)
    sa, sb = call(world, a, b)
    assert not sa.relayed and not sb.relayed
    assert sa.remote.host == "203.0.113.2"
    assert sb.remote.host == "203.0.113.1"
    assert world.relayed_media == 0  # checks may cross the relay, media never does


def test_both_symmetric_nats_go_through_the_relay() -> None:
    world = World()
    a = world.add(1, "symmetric", controlling=True)
    b = world.add(2, "symmetric", controlling=False)
    sa, sb = call(world, a, b)
    assert sa.relayed or sb.relayed
    assert world.relayed_media >= 10


def test_a_direct_pair_frees_both_allocations_and_is_valid_before_selected() -> None:
    world = World()
    a = world.add(1, "full-cone", controlling=True)
    b = world.add(2, "full-cone", controlling=False)
    world.gather()
    assert world.relay.allocations == 2
    call(world, a, b)
    assert world.relay.allocations == 0  # RFC 8445 section 8.3: unused relayed candidates go
    for node in (a, b):
        kinds = [type(e).__name__ for e in node.events]
        assert "PairValid" in kinds
        assert kinds.index("PairValid") <= kinds.index("PairSelected")


def test_a_gathered_agent_keeps_its_bindings_alive_until_the_call() -> None:
    """A pre-gathered socket (the bridge's warm pool) sends a Binding indication to each server
    every 15 s, so its server-reflexive and relayed candidates stay true while it waits."""
    world = World()
    node = world.add(1, "full-cone", controlling=True)
    world.gather()
    sent: list[tuple[bytes, Addr]] = []
    start = world.now
    while world.now < start + 61.0:
        timer = node.agent.get_timer()
        assert timer is not None
        world.now = max(world.now, timer)
        node.agent.handle_timer(world.now)
        sent += node.agent.datagrams_to_send()
    indications = [d for d, dest in sent if dest == SERVER and d[:2] == b"\x00\x11"]
    assert 4 <= len(indications) <= 5  # 15 s apart, one server for both STUN and TURN
    other = world.add(2, "full-cone", controlling=False)
    other.agent.gather(world.now)
    world.pump(other)
    world.run(world.now + 5.0)
    world.exchange(node, other)
    assert node.agent._keepalive_at is None  # checks and consent take over


def test_symmetric_to_full_cone_connects_without_relay() -> None:
    """The symmetric side's check reaches the cone side's server-reflexive address; the cone
    side learns the symmetric side's mapping as a peer-reflexive candidate."""
    world = World()
    a = world.add(1, "symmetric", controlling=True)
    b = world.add(2, "full-cone", controlling=False)
    sa, sb = call(world, a, b)
    assert not sa.relayed and not sb.relayed
    assert sb.remote.kind == "prflx"
    assert world.relayed_media == 0


def test_symmetric_nats_without_a_relay_fail() -> None:
    world = World()
    a = world.add(1, "symmetric", controlling=True, turn=False)
    b = world.add(2, "symmetric", controlling=False, turn=False)
    world.gather()
    world.exchange(a, b)
    world.run(world.now + 20.0)
    assert any(isinstance(e, IceFailed) for e in a.events)
    assert a.agent.selected is None and b.agent.selected is None


@pytest.mark.parametrize("seed", range(5))
def test_lossy_links_still_select_a_pair(seed: int) -> None:
    world = World(seed=seed, loss=0.2)
    a = world.add(1, "port-restricted", controlling=True)
    b = world.add(2, "symmetric", controlling=False)
    world.gather()
    world.exchange(a, b)
    world.run(world.now + 12.0)
    assert a.agent.selected is not None and b.agent.selected is not None


# -- roles, credentials, consent ------------------------------------------------------------------


def test_role_conflict_is_resolved_by_tie_breaker() -> None:
    world = World()
    a = world.add(1, None, controlling=True, turn=False, stun=False)
    b = world.add(2, None, controlling=True, turn=False, stun=False)
    sa, sb = call(world, a, b)
    assert a.agent.controlling != b.agent.controlling
    assert a.agent.stats["role_conflicts"] + b.agent.stats["role_conflicts"] >= 1
    assert sa.remote.addr == b.addr and sb.remote.addr == a.addr


def test_checks_with_a_wrong_password_are_refused_and_learn_nothing() -> None:
    world = World()
    a = world.add(1, None, controlling=True, turn=False, stun=False)
    b = world.add(2, None, controlling=False, turn=False, stun=False)
    world.gather()
    forged = IceParameters(b.agent.ufrag, "x" * 24, b.agent.local_parameters.candidates)
    a.agent.set_remote(forged, world.now)  # a signs with a password b does not have
    b.agent.set_remote(IceParameters(a.agent.ufrag, "y" * 24, ()), world.now)
    world.pump(a)
    world.pump(b)
    world.run(world.now + 20.0)
    assert a.agent.selected is None and b.agent.selected is None
    assert b.agent.stats["bad_stun"] > 0
    assert b.agent.remote_candidates == []  # no peer-reflexive candidate from a forged check


def test_unsolicited_and_garbage_stun_change_nothing() -> None:
    world = World()
    a = world.add(1, None, controlling=True, turn=False, stun=False)
    b = world.add(2, None, controlling=False, turn=False, stun=False)
    call(world, a, b)
    selected = a.agent.selected
    tid = bytes(12)
    response = encode_message(Method.BINDING, Class.SUCCESS, tid, [])
    for junk in (response, b"\x00\x01\x00\x00" + b"\x00" * 16, b"\x01" * 3, b"\x40\x00\x00\x10"):
        assert a.agent.receive(junk, ("198.51.100.99", 1), world.now) is None
    assert a.agent.selected is selected


def test_consent_lost_when_the_peer_goes_silent() -> None:
    world = World()
    a = world.add(1, None, controlling=True, turn=False, stun=False)
    b = world.add(2, None, controlling=False, turn=False, stun=False)
    call(world, a, b)
    world.run(world.now + 20.0)
    assert not any(isinstance(e, ConsentLost) for e in a.events)  # answered every few seconds
    world.nodes.remove(b)  # b vanishes
    world.run(world.now + 40.0)
    assert any(isinstance(e, ConsentLost) for e in a.events)


def test_turn_allocation_is_refreshed_and_released() -> None:
    world = World()
    a = world.add(1, "symmetric", controlling=True)
    b = world.add(2, "symmetric", controlling=False)
    call(world, a, b)
    # The side whose selected pair is direct (from its socket to the other's relayed address)
    # released its allocation at selection (RFC 8445 section 8.3); the relayed side keeps it.
    used = sum(1 for n in (a, b) if n.agent.selected is not None
               and n.agent.selected.base == "relay")
    assert used >= 1
    assert world.relay.allocations == used
    world.run(world.now + 1300.0)  # twice the 600 s lifetime: refreshes keep it
    assert world.relay.allocations == used
    for node in (a, b):
        node.agent.close(world.now)
        world.pump(node)
    world.run(world.now + 1.0)
    assert world.relay.allocations == 0


def test_closing_while_the_allocate_is_answered_still_releases_it() -> None:
    """The relay allocated, its success answer is still on the way when the agent closes (a
    pooled stream retired at once): the Refresh(0) goes anyway, with the credentials the
    challenge gave, so the allocation does not outlive the stream by its lifetime."""
    world = World()
    a = world.add(1, None, controlling=True, stun=False)
    a.agent.gather(world.now)
    world.pump(a)
    while world.relay.allocations == 0:
        assert world.now < 5.0, "the relay never allocated"
        world.run(world.now + LATENCY / 8)
    assert not any(isinstance(e, GatheringComplete) for e in a.events)  # answer in flight
    a.agent.close(world.now)
    world.pump(a)
    world.run(world.now + 1.0)
    assert world.relay.allocations == 0


def test_wrong_turn_credentials_give_no_relayed_candidate() -> None:
    world = World()
    node = world.add(1, "symmetric", controlling=True)
    node.agent._turns[0].server = TurnServer(SERVER, f"{int(WALL) + 3600}:node1", "wrong")
    world.gather()
    event = next(e for e in node.events if isinstance(e, GatheringComplete))
    assert {c.kind for c in event.candidates} == {"host", "srflx"}
    assert any("refused" in f for f in event.failures)


def test_silent_servers_end_gathering_in_bounded_time() -> None:
    world = World()
    node = world.add(1, None, controlling=True)
    node.agent.stun_servers = [("198.51.100.250", 3478)]
    node.agent._turns[0].server = TurnServer(("198.51.100.251", 3478), "u", "p")
    node.agent.gather(0.0)
    world.pump(node)
    world.run(4.0)
    event = next(e for e in node.events if isinstance(e, GatheringComplete))
    assert len(event.failures) == 2
    assert [c.kind for c in event.candidates] == ["host"]


# -- SDP attributes (RFC 8839) -------------------------------------------------------------------


def test_candidate_round_trip_and_priority_formula() -> None:
    cand = Candidate("1234", 1, ice.candidate_priority("srflx"), "203.0.113.1", 40000, "srflx",
                     ("10.0.1.2", 20000))
    text = cand.to_sdp()
    assert text == (f"1234 1 UDP {cand.priority} 203.0.113.1 40000 typ srflx"
                    " raddr 10.0.1.2 rport 20000")
    assert Candidate.from_sdp(text) == cand
    # RFC 8445 section 5.1.2.1 with type preference 126, local preference 65535, component 1
    assert ice.candidate_priority("host") == 126 * 2**24 + 65535 * 2**8 + 255
    assert ice.pair_priority(5, 3) == 3 * 2**32 + 10 + 1


@pytest.mark.parametrize("value", [
    "", "1 1 UDP 1 1.2.3.4 5", "1 1 TCP 1 1.2.3.4 5 typ host", "1 1 UDP 1 host.example 5 typ host",
    "1 1 UDP 1 1.2.3.4 70000 typ host", "1 1 UDP 1 1.2.3.4 5 typ nope",
    "f!o 1 UDP 1 1.2.3.4 5 typ host",
    "1 0 UDP 1 1.2.3.4 5 typ host", "1 1 UDP 0 1.2.3.4 5 typ host",
])
def test_bad_candidates_are_refused(value: str) -> None:
    with pytest.raises(IceError):
        Candidate.from_sdp(value)


def test_parameters_from_attributes() -> None:
    agent = IceAgent(controlling=True, host_addresses=[("192.0.2.1", 20000)])
    attrs: list[tuple[str, str | None]] = list(agent.local_parameters.sdp_attributes())
    attrs.append(("candidate", "garbage"))  # skipped, not fatal
    params = IceParameters.from_attributes(attrs)
    assert params == agent.local_parameters
    assert IceParameters.from_attributes([("sendrecv", None)]) is None
    with pytest.raises(IceError):
        IceParameters.from_attributes([("ice-ufrag", "abcd")])
    with pytest.raises(IceError):
        IceParameters.from_attributes([("ice-ufrag", "ab"), ("ice-pwd", "p" * 22)])


def test_remote_candidates_are_bounded() -> None:
    agent = IceAgent(controlling=True, host_addresses=[("192.0.2.1", 20000)])
    many = tuple(Candidate(str(i), 1, 100 + i, "198.51.100.7", 1000 + i, "host")
                 for i in range(200))
    agent.set_remote(IceParameters("abcd", "p" * 22, many), 0.0)
    assert len(agent.remote_candidates) == ice.MAX_REMOTE_CANDIDATES
    assert len(agent._pairs) <= ice.MAX_PAIRS


def test_response_from_another_address_fails_the_check() -> None:
    """RFC 8445 section 7.2.5.2.1: a non-symmetric answer is not a success."""
    agent = IceAgent(controlling=True, host_addresses=[("192.0.2.1", 20000)],
                     urandom=random.Random(3).randbytes)
    agent.gather(0.0)
    remote = Candidate("1", 1, ice.candidate_priority("host"), "198.51.100.7", 5000, "host")
    agent.set_remote(IceParameters("abcd", "p" * 22, (remote,)), 0.0)
    agent.handle_timer(0.0)
    (request, dest), = agent.datagrams_to_send()
    assert dest == remote.addr
    msg = parse_message(request)
    reply = encode_message(Method.BINDING, Class.SUCCESS, msg.transaction_id, [
        (Attr.XOR_MAPPED_ADDRESS, bytes(8))], key=b"p" * 22)
    agent.receive(reply, ("198.51.100.8", 5000), 0.01)
    assert agent.selected is None
    assert all(p.state == "failed" for p in agent._pairs.values())


def test_checks_that_arrive_before_the_answer_are_answered_and_retriggered() -> None:
    """The answerer starts checking as soon as it has the offer; the offerer gets the answer
    (through SIP) later. Its early checks are answered at once and re-checked after."""
    world = World()
    a = world.add(1, "full-cone", controlling=True)
    b = world.add(2, "port-restricted", controlling=False)
    world.gather()
    b.agent.set_remote(a.agent.local_parameters, world.now)
    world.pump(b)
    world.run(world.now + 0.5)
    early = a.agent.stats["checks_received"]
    assert early > 0 and not any(isinstance(e, PairSelected) for e in a.events)
    a.agent.set_remote(b.agent.local_parameters, world.now)
    world.pump(a)
    world.run(world.now + 5.0)
    sa, sb = selected_event(a), selected_event(b)
    assert not sa.relayed and not sb.relayed
